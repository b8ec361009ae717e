"""The generator: stop text (several tokens, not inside the prompt), prompt prefill, per-prompt start tokens and
length limits, on a known model."""
import pytest
import torch

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import PromptPrefillGenerator, prompt_batch
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel


def chain_model(vocab: Vocabulary, chain: dict[str, str]):
    """A 0-layer LLaMA that is a bigram table: after token a it predicts chain[a] with certainty."""
    class Task:
        target_dictionary = vocab.to_dictionary()

    n = len(vocab)
    cfg = SpeechGPTLlamaConfig(decoder_layers=0, decoder_embed_dim=n, decoder_attention_heads=1,
                               decoder_ffn_embed_dim=4)
    model = SpeechGPTLlamaModel.build_model(cfg, Task).eval()
    with torch.no_grad():
        model.decoder.embed_tokens.weight.copy_(torch.eye(n))
        model.decoder.lm_head.weight.zero_()
        for a, b in chain.items():
            model.decoder.lm_head.weight[vocab.index[b], vocab.index[a]] = 50.0
    return model


def generate(model, vocab, prompt: list[str], stop_text: str | None):
    d = model.decoder.dictionary
    ids = torch.tensor([[vocab.index[t] for t in prompt]])
    src = torch.cat([torch.tensor([[vocab.bos]]), ids], 1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([src.size(1)])}, "id": torch.tensor([0])}
    gen = PromptPrefillGenerator([model], d, stop_text=stop_text, beam_size=1, max_len_b=14)
    tokens = gen.generate([model], sample, prefix_tokens=ids, bos_token=vocab.bos)[0][0]["tokens"].tolist()
    return [vocab.tokens[i] for i in tokens]


VOCAB = Vocabulary.units_only(5)
CHAIN = {"<s>": "<sosp>", "<sosp>": "<1>", "<1>": "<2>", "<2>": "<3>", "<3>": "<4>", "<4>": "<0>", "<0>": "<1>"}


def test_generation_stops_after_a_multi_token_stop_text():
    model = chain_model(VOCAB, CHAIN)
    assert generate(model, VOCAB, ["<sosp>"], "<1><2>") == ["<sosp>", "<1>", "<2>", "</s>"]
    without = generate(model, VOCAB, ["<sosp>"], None)
    assert without[:7] == ["<sosp>", "<1>", "<2>", "<3>", "<4>", "<0>", "<1>"] and len(without) > 8


def test_stop_text_inside_the_prompt_does_not_stop():
    model = chain_model(VOCAB, CHAIN)
    out = generate(model, VOCAB, ["<sosp>", "<1>", "<2>"], "<1><2>")
    assert out == ["<sosp>", "<1>", "<2>", "<3>", "<4>", "<0>", "<1>", "<2>", "</s>"]


def test_stop_text_spanning_prompt_and_response_does_not_stop():
    """Only generated tokens count: a prompt ending in <1> followed by a generated <2> is not a stop."""
    model = chain_model(VOCAB, CHAIN)
    out = generate(model, VOCAB, ["<sosp>", "<1>"], "<1><2>")
    assert out[:6] == ["<sosp>", "<1>", "<2>", "<3>", "<4>", "<0>"]


def test_token_texts_read_byte_pieces(sentencepiece_model):
    """SpeechGPT's <eoa> is several pieces; a byte-fallback piece counts as its character."""
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=5)
    ids = v.encode(" basket<eoa>", continuation=True)
    assert "".join(v.token_texts[i] for i in ids) == " basket<eoa>"


def test_prompt_steps_do_not_run_the_model_and_score_zero():
    """fairseq steps through a prompt one token at a time; ours encodes it once at step 0 and skips the model
    while every row is inside it. Forced tokens score 0: a hypothesis scores its response."""
    model = chain_model(VOCAB, CHAIN)
    runs = []
    model.decoder.embed_tokens.register_forward_hook(lambda m, i, o: runs.append(o.shape[1]))
    d = model.decoder.dictionary
    prompt = torch.tensor([[VOCAB.index[t] for t in ["<sosp>", "<1>", "<2>", "<3>", "<4>", "<0>"]]])
    src = torch.cat([torch.tensor([[VOCAB.bos]]), prompt], 1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([7])}, "id": torch.tensor([0])}
    gen = PromptPrefillGenerator([model], d, beam_size=1, max_len_a=0, max_len_b=9)
    hypo = gen.generate([model], sample, prefix_tokens=prompt, bos_token=VOCAB.bos)[0][0]
    assert runs[0] == 7 and runs[1:] == [1] * (len(runs) - 1)  # one pass over <s> + prompt, then per token
    assert len(runs) == 1 + (len(hypo["tokens"]) - 1 - 6)  # no run for the prompt steps
    assert hypo["positional_scores"][:6].eq(0).all()


def batch_generate(model, prompts: list[list[str]], **limits):
    d = model.decoder.dictionary
    src, first, forced = prompt_batch([torch.tensor([VOCAB.index[t] for t in p]) for p in prompts], d.pad())
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(p) for p in prompts])},
              "id": torch.arange(len(prompts))}
    gen = PromptPrefillGenerator([model], d, beam_size=1, **limits)
    hypos = gen.generate([model], sample, prefix_tokens=forced, bos_token=first)
    return [[VOCAB.tokens[i] for i in h[0]["tokens"].tolist()] for h in hypos]


def test_each_prompt_starts_from_its_own_first_token():
    """Without a bos (a tokenizer that adds none), a prompt's first token is where its hypothesis starts."""
    model = chain_model(VOCAB, CHAIN)
    rows = batch_generate(model, [["<sosp>", "<1>"], ["<3>"]], max_len_a=0, max_len_b=5)
    assert rows[0] == ["<1>", "<2>", "<3>", "<4>", "<0>", "</s>"]  # <1> forced, then four generated
    assert rows[1] == ["<4>", "<0>", "<1>", "<2>", "<3>", "</s>"]  # from <3>, not from <s> (which gives <sosp>)


def test_a_prompt_longer_than_the_length_limit_is_refused():
    model = chain_model(VOCAB, CHAIN)
    with pytest.raises(ValueError, match="a prompt of 4 tokens does not fit the length limit of 2"):
        batch_generate(model, [["<sosp>", "<1>", "<2>", "<3>"]], max_len_a=0, max_len_b=2)
