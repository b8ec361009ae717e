"""The generator: tokens against fairseq's stock SequenceGenerator, scores against a full forward pass, n-best
independent of the batch, sampling's kept tokens against transformers' warpers, stop text, conversations."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import (Conversation, Decoding, Endings, FairseqGenerator,
                                                 sampling_candidates, generate)
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

UNITS = Vocabulary.units_only(40)
DICT = UNITS.to_dictionary()
# <s> <sosp> then units; different lengths, so that rows are padded when batched
PROMPTS = [[1, 43, 5, 6, 7, 8, 9, 10, 11], [1, 43, 12], [1, 43, 13, 14, 15], [1, 43, 16, 17]]
LIMIT = 30  # fairseq's max_len_b: tokens after <s>, prompt included


@pytest.fixture(scope="module")
def model():
    """A tiny random LLaMA whose </s> is likely enough that beam search finishes before the length limit."""
    torch.manual_seed(0)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4, decoder_kv_heads=2, init_std=0.3)
    m = SpeechGPTLlamaModel.from_config(cfg, DICT).eval()
    with torch.no_grad():
        m.decoder.lm_head.weight[DICT.eos()] *= 3
    return m


def ours(model, prompts, decoding, seeds=None, endings=None):
    limits = [LIMIT - (len(p) - 1) for p in prompts]  # fairseq's limit, from the same start
    return generate(model.decoder, [torch.tensor(p) for p in prompts], endings or Endings.of(DICT), decoding,
                    limits, seeds=seeds)


def stock(model, prompts, beam, normalize):
    """fairseq's SequenceGenerator: the prompt after <s> forced one token per step, scored by the model."""
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True,
                                          padding_value=DICT.pad())
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(p) for p in prompts])},
              "id": torch.arange(len(prompts))}
    gen = SequenceGenerator([model], DICT, beam_size=beam, max_len_b=LIMIT, normalize_scores=normalize)
    hypos = gen.generate([model], sample, prefix_tokens=src[:, 1:], bos_token=1)
    return [[h["tokens"][len(p) - 1:].tolist() for h in beams] for p, beams in zip(prompts, hypos)]


@pytest.mark.parametrize("beam", [1, 4])
def test_tokens_equal_fairseq_stepwise(model, beam):
    """Greedy, and beam 4 ranked by the summed log-probs (fairseq's scores add the prompt's, the same for every
    hypothesis of a prompt), give fairseq's n-best; every hypothesis ends at </s> before the limit, where the two
    differ (fairseq scores the </s> it forces there)."""
    theirs = stock(model, PROMPTS, beam, normalize=False)
    mine = ours(model, PROMPTS, Decoding(beam=beam, normalize=False))
    assert [[h.tokens for h in beams] for beams in mine] == theirs
    assert all(len(h.tokens) + len(p) - 1 < LIMIT for p, beams in zip(PROMPTS, mine) for h in beams)
    assert all(len(beams) == beam for beams in mine)


DECODINGS = {"greedy": Decoding(), "beam4-lenpen": Decoding(beam=4, len_penalty=1.0),
             "sampling": Decoding(sample=True, temperature=0.7, top_k=8, top_p=0.8, beam=2)}


@pytest.mark.parametrize("name", list(DECODINGS))
def test_nbest_and_scores_do_not_depend_on_the_batch(model, name):
    """A prompt alone and batched with prompts of other lengths (a seed per prompt when sampling): the same
    hypotheses in the same order with the same scores; each positional score is the full forward pass' log-prob
    of that token (the closing </s> added after a stop: 0), and the score is their sum over the length."""
    decoding = DECODINGS[name]
    seeds = [11, 12, 13, 14]
    batched = ours(model, PROMPTS, decoding, seeds)
    for i, prompt in enumerate(PROMPTS):
        alone = ours(model, [prompt], decoding, seeds[i:i + 1])[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        torch.testing.assert_close(torch.tensor([h.score for h in alone]),
                                   torch.tensor([h.score for h in batched[i]]), atol=1e-5, rtol=0)
        for h in batched[i]:
            with torch.no_grad():
                lprobs = model(torch.tensor([prompt + h.tokens]))[0][0].log_softmax(-1)
            expected = lprobs[len(prompt) - 1:-1].gather(1, torch.tensor(h.tokens).unsqueeze(1)).squeeze(1)
            if len(h.tokens) == LIMIT - (len(prompt) - 1) + 1:  # stopped by its limit: the </s> after it is added
                expected[-1] = 0.0
            torch.testing.assert_close(h.positional_scores, expected, atol=1e-5, rtol=0)
            assert abs(h.score - float(expected.sum()) / len(h.tokens)) < 1e-5
    if name != "greedy":
        assert any(len(beams) > 1 and beams[0].tokens != beams[1].tokens for beams in batched)


def test_sampling_keeps_the_tokens_transformers_warpers_keep():
    """Temperature, then top-k, then top-p, on the same logits as transformers' warpers in that order (fairseq's
    sampler ignores top-k when top-p is set)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    for temperature, top_k, top_p in [(0.7, 50, 0.8), (1.3, 0, 0.5), (1.0, 7, 1.0), (0.5, 200, 0.95)]:
        expected = logits.clone()
        warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
                  ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        for warper in warpers:
            expected = warper(None, expected)
        values, ids = sampling_candidates(logits, Decoding(sample=True, temperature=temperature, top_k=top_k,
                                                           top_p=top_p))
        for row in range(len(logits)):
            kept = set(ids[row][values[row].isfinite()].tolist())
            assert kept == set(expected[row].isfinite().nonzero().squeeze(1).tolist())
            torch.testing.assert_close(values[row][values[row].isfinite()], expected[row, sorted(kept, key=lambda i:
                                       -expected[row, i])])
    assert 0 < len(kept) < 200  # top-p cut inside the top-k


# a 0-layer LLaMA that is a bigram table: after token a it predicts CHAIN[a] with certainty
VOCAB = Vocabulary.units_only(5)
CHAIN = {"<s>": "<sosp>", "<sosp>": "<1>", "<1>": "<2>", "<2>": "<3>", "<3>": "<4>", "<4>": "<0>", "<0>": "<1>"}


def chain_model():
    n = len(VOCAB)
    cfg = SpeechGPTLlamaConfig(decoder_layers=0, decoder_embed_dim=n, decoder_attention_heads=1,
                               decoder_ffn_embed_dim=4)
    model = SpeechGPTLlamaModel.from_config(cfg, n).eval()
    with torch.no_grad():
        model.decoder.embed_tokens.weight.copy_(torch.eye(n))
        model.decoder.lm_head.weight.zero_()
        for a, b in CHAIN.items():
            model.decoder.lm_head.weight[VOCAB.index[b], VOCAB.index[a]] = 50.0
    return model


def chain(prompt: list[str], stop_text: str | None, limit: int = 12) -> list[str]:
    endings = Endings.of(VOCAB.to_dictionary(), stop_text)
    (h,), = generate(chain_model().decoder, [torch.tensor([VOCAB.index[t] for t in prompt])], endings,
                     max_new_tokens=limit)
    return [VOCAB.tokens[i] for i in h.tokens]


def test_generation_stops_after_a_multi_token_stop_text():
    assert chain(["<s>", "<sosp>"], "<1><2>") == ["<1>", "<2>", "</s>"]
    assert chain(["<s>", "<sosp>"], None)[:7] == ["<1>", "<2>", "<3>", "<4>", "<0>", "<1>", "<2>"]


def test_stop_text_in_the_prompt_or_across_prompt_and_response_does_not_stop():
    """Only generated tokens count."""
    assert chain(["<s>", "<sosp>", "<1>", "<2>"], "<1><2>") == ["<3>", "<4>", "<0>", "<1>", "<2>", "</s>"]
    assert chain(["<s>", "<sosp>", "<1>"], "<1><2>")[:3] == ["<2>", "<3>", "<4>"]


def test_token_texts_read_byte_pieces(sentencepiece_model):
    """SpeechGPT's <eoa> is several pieces; a byte-fallback piece counts as its character."""
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=5)
    ids = v.encode(" basket<eoa>", continuation=True)
    assert "".join(v.token_texts[i] for i in ids) == " basket<eoa>"


def test_the_prompt_runs_in_one_pass_then_one_token_per_step():
    model = chain_model()
    runs = []
    model.decoder.embed_tokens.register_forward_hook(lambda m, i, o: runs.append(tuple(o.shape[:2])))
    prompts = [torch.tensor([VOCAB.index[t] for t in p]) for p in (["<s>", "<sosp>", "<1>"], ["<3>"])]
    generate(model.decoder, prompts, Endings.of(VOCAB.to_dictionary()), max_new_tokens=5)
    assert runs == [(2, 3)] + [(2, 1)] * 4  # prefill (left-padded to 3), then 4 steps: the 5th token is not read


def test_fairseq_generator_keeps_fairseq_limits_and_refuses_what_it_does_not_do(model):
    from fairseq.dataclass.configs import GenerationConfig

    gen = FairseqGenerator(model, DICT, GenerationConfig(beam=1, max_len_a=0, max_len_b=6, min_len=6))
    (h,), = gen.generate_prompts([torch.tensor([1, 43, 5])], [0])
    assert len(h["tokens"]) == 6 - 2 + 1  # 6 tokens after <s>, 2 of them the prompt's, then </s>
    with pytest.raises(ValueError, match="a prompt of 7 tokens does not fit the length limit of 6"):
        gen.generate_prompts([torch.tensor([1, 43, 5, 6, 7, 8, 9])], [0])
    with pytest.raises(ValueError, match="--no-repeat-ngram-size: not supported"):
        FairseqGenerator(model, DICT, GenerationConfig(no_repeat_ngram_size=2))
    with pytest.raises(ValueError, match="temperature 0.5.*set sample"):
        FairseqGenerator(model, DICT, GenerationConfig(temperature=0.5))


@pytest.mark.parametrize("cut", [True, False])  # the first answer cut by its limit, or ended by the model
def test_a_conversation_holds_its_turns_in_one_cache(model, cut):
    """Turn 2 is read after turn 1 and its answer (only its own tokens computed) and answered as a prompt of the
    whole conversation would be."""
    # the first turn: a prompt this model answers with a few tokens and </s>
    lengths = [len(Conversation(model.decoder, Endings.of(DICT)).reply(p, max_new_tokens=LIMIT).tokens) - 1
               for p in PROMPTS]
    natural, start = max((n, p) for n, p in zip(lengths, PROMPTS) if n < LIMIT - len(p))
    assert natural >= 2
    first_limit = natural - 1 if cut else natural + 3
    conversation = Conversation(model.decoder, Endings.of(DICT))
    first = conversation.reply(start, max_new_tokens=first_limit)
    cache = conversation.cache
    reads = []
    hook = model.decoder.embed_tokens.register_forward_hook(lambda m, i, o: reads.append(o.shape[1]))
    try:
        second = conversation.reply(PROMPTS[2][1:], max_new_tokens=6)
    finally:
        hook.remove()
    assert conversation.cache is cache
    answer = first.tokens[:-1]  # without the closing </s>
    # ended at the limit: its last token was never read; else the model chose </s>
    assert (len(answer) == first_limit) == cut
    assert reads[0] == cut + len(PROMPTS[2]) - 1
    whole = start + answer + PROMPTS[2][1:]
    (expected,), = generate(model.decoder, [torch.tensor(whole)], Endings.of(DICT), max_new_tokens=6)
    assert second.tokens == expected.tokens
    torch.testing.assert_close(second.positional_scores, expected.positional_scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="past the model's 2048 positions: start a new one"):
        conversation.reply([5] * 2040, max_new_tokens=4)
