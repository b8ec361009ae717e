"""Tiny Hugging Face checkpoints in the tokenizer situations real ones come in, each converted with convert-hf.

- llama-sp: LLaMA's sentencepiece tokenizer.model (bos added, pad unset, unk 0);
- speechgpt-sp: SpeechGPT-7B-cm's layout, tokenizer.model + added_tokens.json holding the units and SpeechGPT
  tokens, made by transformers 4.33.1 (tests/data/reference/speechgpt_tokenizer);
- json-pad-eos-nobos: a SmolLM2-Instruct-like byte-level tokenizer.json that adds no bos and sets pad = eos;
- llama3-json-llama3rope / llama3-json-linearrope: a Llama-3-Instruct-like tokenizer.json (bos by its
  post-processor, no unk, no pad, the specials after the ordinary tokens) with two eos ids in
  generation_config.json, and rope scaling llama3 or linear.

Each model is random, then one eos row of the output layer is set so that greedy decoding of the first prompt
ends at that eos after a few tokens: the stop is exercised, not only the length limit.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SPEECHGPT_TOKENIZER = REPO / "tests" / "data" / "reference" / "speechgpt_tokenizer"
SPEECHGPT_REFERENCE = REPO / "tests" / "data" / "reference" / "speechgpt_tokenizer_reference.json"
WORDS = ("the quick brown fox jumps over a lazy dog speech units model sound wave listen speak read write "
         "what is this answer question short long café über 12 345").split()
TEXT_PROMPTS = ["what is the quick brown fox", "listen to the lazy dog speak", "a sound wave 12"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


@dataclass
class Situation:
    """A tiny HF checkpoint, its conversion, and what the tests expect of it."""

    name: str
    hf_dir: Path
    converted: Path
    prompt_texts: list[str]  # what a user types
    prompt_ids: list[list[int]]  # what the checkpoint's own tokenizer gives for them: tokenizer(text).input_ids
    stop_token: str  # the eos the first prompt's greedy generation ends at
    pad_token: str  # the padding token conversion must choose
    add_bos: bool
    text_encoding: str
    eos_tokens: list[str]  # every token generation ends at, the vocabulary's eos first


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def byte_level_bpe(specials_first: list[str], specials_last: list[str], bos_post_processor: str | None):
    """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 / SmolLM style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials_first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials_last])
    if bos_post_processor:
        bos = tok.token_to_id(bos_post_processor)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_post_processor} $A", pair=f"{bos_post_processor} $A {bos_post_processor} $B",
            special_tokens=[(bos_post_processor, bos)])
    return tok


def write_tokenizer(name: str, out: Path, sentencepiece_model: Path) -> dict:
    """The tokenizer files of situation `name` in `out`; returns what config.json / generation_config.json say."""
    if name == "llama-sp":
        shutil.copy(sentencepiece_model, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}))  # as Llama 2's says
        return {"bos_token_id": 1, "eos_token_id": 2}
    if name == "speechgpt-sp":
        for f in SPEECHGPT_TOKENIZER.iterdir():
            shutil.copy(f, out / f.name)
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if name == "json-pad-eos-nobos":  # SmolLM2-Instruct: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
        byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [], None).save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    # Llama 3.x Instruct: the specials follow the ordinary tokens; eos_token <|eot_id|>, generation ends at both
    tok = byte_level_bpe([], ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"], "<|begin_of_text|>")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return {"bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}


SITUATIONS = {  # name: (model settings, stop token, pad chosen, adds bos, text encoding, eos tokens)
    "llama-sp": (dict(kv_heads=4, tied=False), "</s>", "<unk>", True, "standard", ["</s>"]),
    "speechgpt-sp": (dict(kv_heads=4, tied=False), "</s>", "<unk>", True, "transformers-4.33-slow", ["</s>"]),
    "json-pad-eos-nobos": (dict(kv_heads=1, tied=True), "<|im_end|>", "<|endoftext|>", False, "standard",
                           ["<|im_end|>"]),
    "llama3-json-llama3rope": (dict(kv_heads=2, tied=False, theta=500000.0, rope_scaling=LLAMA3_ROPE),
                               "<|end_of_text|>", "<pad>", True, "standard", ["<|eot_id|>", "<|end_of_text|>"]),
    "llama3-json-linearrope": (dict(kv_heads=2, tied=False, theta=500000.0, rope_scaling=LINEAR_ROPE),
                               "<|eot_id|>", "<pad>", True, "standard", ["<|eot_id|>", "<|end_of_text|>"]),
}


def prompts_of(name: str, hf_dir: Path) -> tuple[list[str], list[list[int]]]:
    """The prompts of a situation and their ids from the checkpoint's own tokenizer (SpeechGPT's: transformers
    4.33.1's, recorded; the others: the installed transformers')."""
    if name == "speechgpt-sp":
        reference = json.loads(SPEECHGPT_REFERENCE.read_text(encoding="utf-8"))["inference_prompts"]
        texts = [p["system"] + "[Human]: {} <eoh>. [SpeechGPT]: ".format(p["question"]) for p in reference]
        return texts[:3], [p["ids"] for p in reference[:3]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return TEXT_PROMPTS, [tok(t).input_ids for t in TEXT_PROMPTS]


def write_model(hf_dir: Path, vocab_size: int, ids: dict, settings: dict, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = ids["eos_token_id"]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=settings["kv_heads"], max_position_embeddings=256,
                      rope_theta=settings.get("theta", 10000.0), rope_scaling=settings.get("rope_scaling"),
                      tie_word_embeddings=settings["tied"], initializer_range=0.3, rms_norm_eps=1e-6,
                      bos_token_id=ids["bos_token_id"], eos_token_id=eos, pad_token_id=ids.get("pad_token_id"))
    LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps(ids))


def make_stop_reachable(hf_dir: Path, prompt: list[int], stop: int) -> None:
    """Give `stop` the output row of a token greedy decoding of `prompt` emits a few steps in, scaled by 1.1, so
    that decoding ends at `stop` there (checked)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        free = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]
    generated = free[len(prompt):].tolist()
    head = model.get_output_embeddings().weight
    for k in range(2, 6):
        if generated[k] in generated[:k]:
            continue
        with torch.no_grad():
            original = head[stop].clone()
            head[stop] = 1.1 * head[generated[k]]
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[stop])[0]
        new = out[len(prompt):].tolist()
        if new[-1] == stop and len(new) >= 3:
            model.save_pretrained(hf_dir)
            return
        with torch.no_grad():
            head[stop] = original
    raise AssertionError(f"{hf_dir}: could not make {stop} the end of greedy decoding")


@pytest.fixture(scope="session")
def stop_reachable():
    """`stop_reachable(hf_dir, prompt_ids, stop_id)`: make greedy decoding of the prompt end at stop_id."""
    return make_stop_reachable


@pytest.fixture(scope="module", params=list(SITUATIONS))
def situation(request, tmp_path_factory, sentencepiece_model) -> Situation:
    from speechgpt_fairseq.models.hf import convert_hf

    name = request.param
    settings, stop_token, pad, add_bos, encoding, eos_tokens = SITUATIONS[name]
    root = tmp_path_factory.mktemp(name)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    ids = write_tokenizer(name, hf_dir, sentencepiece_model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    write_model(hf_dir, len(tokenizer), ids, settings)
    texts, prompt_ids = prompts_of(name, hf_dir)
    make_stop_reachable(hf_dir, prompt_ids[0], tokenizer.convert_tokens_to_ids(stop_token))
    converted = convert_hf(hf_dir, root / "fs", num_units=None if name == "speechgpt-sp" else 20)
    return Situation(name, hf_dir, converted, texts, prompt_ids, stop_token, pad, add_bos, encoding, eos_tokens)
