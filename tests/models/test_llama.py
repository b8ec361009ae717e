"""The LLaMA decoder: incremental decoding and prompt prefill agree with the full forward pass."""
import pytest
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import PromptPrefillGenerator
from speechgpt_fairseq.models.llama import ModelConfigError, SpeechGPTLlamaConfig, SpeechGPTLlamaModel


class _Task:
    def __init__(self, vocab):
        self.target_dictionary = vocab.to_dictionary()


def build(kv_heads=2, tied=False, vocab=None, **kw):
    torch.manual_seed(0)
    vocab = vocab or Vocabulary.units_only(40)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4, decoder_kv_heads=kv_heads,
                               share_decoder_input_output_embed=tied, init_std=0.3, **kw)
    return SpeechGPTLlamaModel.build_model(cfg, _Task(vocab)).eval()


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True), (1, False)])
def test_incremental_decoding_equals_full_forward(kv_heads, tied):
    model = build(kv_heads, tied)
    tokens = torch.randint(3, 49, (3, 11))
    full, _ = model(tokens)
    state, steps = {}, []
    for t in range(tokens.size(1)):
        out, _ = model.decoder(tokens[:, :t + 1], incremental_state=state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_prompt_prefill_runs_one_pass_and_matches():
    model = build()
    tokens = torch.randint(3, 49, (2, 9))
    full, _ = model(tokens)
    calls = []
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    model.decoder.set_pending_prompt(tokens[:, 1:7])  # forced prompt after <s>: positions 1..6
    state, steps = {}, []
    for t in range(tokens.size(1)):
        out, _ = model.decoder(tokens[:, :t + 1], incremental_state=state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert calls == [7, 1, 1]  # one pass over <s> + 6 prompt tokens, then one token per step


def _generate(model, prompts, generator_cls, pad):
    bos = model.decoder.dictionary.bos()
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor([bos] + p) for p in prompts], batch_first=True,
                                          padding_value=pad)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(p) + 1 for p in prompts])},
              "id": torch.arange(len(prompts))}
    gen = generator_cls([model], model.decoder.dictionary, beam_size=1, max_len_b=20)
    hypos = gen.generate([model], sample, prefix_tokens=src[:, 1:], bos_token=bos)
    return [h[0]["tokens"].tolist() for h in hypos]


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    model = build()
    pad = model.decoder.dictionary.pad()
    prompts = [[43, 5, 6, 7, 8, 9, 10], [43, 11], [43, 12, 13, 14]]
    batched = _generate(model, prompts, PromptPrefillGenerator, pad)
    single = [_generate(model, [p], PromptPrefillGenerator, pad)[0] for p in prompts]
    stepwise = _generate(model, prompts, SequenceGenerator, pad)  # fairseq's one-token-per-step path
    assert batched == single == stepwise
    for p, h in zip(prompts, batched):
        assert h[:len(p)] == p and len(h) > len(p)


def test_beam_search_with_prefill_equals_fairseq_stepwise():
    model = build()
    dictionary = model.decoder.dictionary
    src = torch.tensor([[1, 43, 5, 6], [1, 43, 7, 8]])
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([4, 4])}, "id": torch.arange(2)}
    outs = []
    for cls in (PromptPrefillGenerator, SequenceGenerator):
        gen = cls([model], dictionary, beam_size=3, max_len_b=12)
        outs.append([[h["tokens"].tolist() for h in hs] for hs in gen.generate([model], sample,
                                                                                 prefix_tokens=src[:, 1:], bos_token=1)])
    assert outs[0] == outs[1]


def test_activation_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(3, 49, (2, 10))
    grads = []
    for recompute in (False, True):
        model = build(checkpoint_activations=recompute).train()
        logits, _ = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_is_close_to_fp32():
    model = build()
    tokens = torch.randint(3, 49, (2, 10))
    ref, _ = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float().softmax(-1) - ref.softmax(-1)).abs().max() < 0.05


def test_rope_theta_changes_the_model():
    tokens = torch.randint(3, 49, (1, 12))
    a, _ = build(rope_theta=10000.0)(tokens)
    b, _ = build(rope_theta=500000.0)(tokens)
    assert not torch.allclose(a, b)


def test_bad_configs_are_refused():
    with pytest.raises(ModelConfigError, match="multiple of decoder_kv_heads"):
        build(kv_heads=3)
    with pytest.raises(ModelConfigError, match="must divide by"):
        SpeechGPTLlamaModel.build_model(SpeechGPTLlamaConfig(decoder_embed_dim=30, decoder_attention_heads=4),
                                        _Task(Vocabulary.units_only(4)))


def test_checkpoint_of_another_vocabulary_is_refused():
    a, b = build(vocab=Vocabulary.units_only(40)), build(vocab=Vocabulary.units_only(41))
    with pytest.raises(ModelConfigError, match="vocabulary .* differs from the data directory's"):
        b.load_state_dict(a.state_dict())


def test_checkpoint_of_another_shape_is_refused():
    a = build()
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4)
    b = SpeechGPTLlamaModel.build_model(cfg, _Task(Vocabulary.units_only(40)))
    with pytest.raises(ModelConfigError, match="does not fit the configured model"):
        b.load_state_dict(a.state_dict())


def test_prompt_with_a_pad_id_inside_matches_fairseq_stepwise():
    """LLaMA's pad is <unk>: fairseq does not force a prompt position holding it, so prefill stops there."""
    model = build()
    pad = model.decoder.dictionary.pad()
    prompts = [[43, 5, pad, 7, 8], [43, 9, 10, 11]]
    assert _generate(model, prompts, PromptPrefillGenerator, pad) == _generate(model, prompts, SequenceGenerator, pad)


def test_packed_rows_equal_examples_run_alone():
    """Examples packed into one row with example_ids give the logits each has on its own."""
    model = build(kv_heads=2)
    examples = [torch.randint(3, 49, (n,)) for n in (5, 9, 3)]
    row = torch.cat(examples).unsqueeze(0)
    ids = torch.cat([torch.full((len(e),), i) for i, e in enumerate(examples)]).unsqueeze(0)
    packed, _ = model(row, example_ids=ids)
    alone = torch.cat([model(e.unsqueeze(0))[0] for e in examples], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
