"""Shared fixtures: tiny tokenizers and tiny random Hugging Face LLaMA directories, built on the fly."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "user_dir"

WORDS = ("the quick brown fox jumps over a lazy dog speech units model sound wave listen speak read write "
         "café naïve über 日本語 données 12 345 6789 3.14").split()


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A LLaMA-style sentencepiece model (BPE, byte fallback, identity normalization, unk=0 bos=1 eos=2)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(out / "sp"), vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995, minloglevel=2)
    return out / "sp.model"


@pytest.fixture(scope="session")
def tokenizers_json(tmp_path_factory) -> Path:
    """A Llama-3-style byte-level BPE tokenizer.json: no unk and no pad, bos/eos as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def write_hf_llama(out: Path, tokenizer: Path, kv_heads: int = 4, tied: bool = False, theta: float = 10000.0,
                   seed: int = 0, layers: int = 2) -> Path:
    """A tiny random LlamaForCausalLM saved with its tokenizer, as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.suffix == ".model":
        import sentencepiece as spm

        vocab_size, bos, eos = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size(), 1, 2
        (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    else:
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tokenizer))
        vocab_size = t.get_vocab_size()
        bos, eos = t.token_to_id("<|begin_of_text|>"), t.token_to_id("<|end_of_text|>")
        (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>"}))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rope_theta=theta, tie_word_embeddings=tied, initializer_range=0.3, rms_norm_eps=1e-6,
                      bos_token_id=bos, eos_token_id=eos)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


# the model variants the interop tests cover: (name, kwargs of write_hf_llama, tokenizer kind)
HF_VARIANTS = [
    ("mha-untied-sp", dict(kv_heads=4, tied=False, theta=10000.0), "sentencepiece"),
    ("gqa-tied-sp", dict(kv_heads=2, tied=True, theta=10000.0), "sentencepiece"),
    ("gqa-untied-json-theta500k", dict(kv_heads=1, tied=False, theta=500000.0), "tokenizers"),
    ("mha-tied-json", dict(kv_heads=4, tied=True, theta=500000.0), "tokenizers"),
]


@pytest.fixture(scope="session", params=HF_VARIANTS, ids=[v[0] for v in HF_VARIANTS])
def hf_llama(request, tmp_path_factory, sentencepiece_model, tokenizers_json) -> Path:
    name, kwargs, kind = request.param
    tokenizer = sentencepiece_model if kind == "sentencepiece" else tokenizers_json
    return write_hf_llama(tmp_path_factory.mktemp(name) / "hf", tokenizer, **kwargs)


@pytest.fixture(scope="session")
def converted(hf_llama, tmp_path_factory) -> Path:
    """hf_llama converted with K=20 units."""
    from speechgpt_fairseq.models.hf import convert_hf

    return convert_hf(hf_llama, tmp_path_factory.mktemp("converted") / "fs", num_units=20)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console command (speechgpt, fairseq-*) as a user would, capturing its output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def console(name: str) -> str:
    """Path of a console script installed beside this Python."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@pytest.fixture(scope="session")
def cli():
    """`cli("speechgpt", "convert-hf", ...)`: run a console command, raising with its output when it fails."""
    def run(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_cli(console(name), *map(str, args), **kwargs)
    return run


@pytest.fixture(scope="session")
def make_hf_llama():
    return write_hf_llama


def write_tiny_vocoder(out: Path, num_units: int = 100, num_speakers: int | None = 4, frames_per_unit: int = 2,
                       seed: int = 0) -> tuple[Path, Path]:
    """A tiny random unit HiFi-GAN saved as fairseq's released unit vocoders are: (checkpoint, config.json).

    The real generator layout (5 upsamplings, 320 samples per unit at 16 kHz) with few channels; a duration
    predictor that gives every unit `frames_per_unit` frames; `num_speakers` speaker ids (None: one speaker).
    """
    from fairseq.models.text_to_speech.codehifigan import CodeGenerator

    out.mkdir(parents=True, exist_ok=True)
    emb = 16
    cfg = {"resblock": "1", "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
           "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 7, 11],
           "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": num_units,
           "embedding_dim": emb, "model_in_dim": emb * (2 if num_speakers else 1), "segment_size": 8960,
           "code_hop_size": 320, "f0": False, "sampling_rate": 16000, "dur_prediction_weight": 1.0,
           "dur_predictor_params": {"encoder_embed_dim": emb, "var_pred_hidden_dim": emb, "var_pred_kernel_size": 3,
                                    "var_pred_dropout": 0.5}}
    if num_speakers:
        cfg.update(multispkr="from_input_file", num_speakers=num_speakers)
    torch.manual_seed(seed)
    generator = CodeGenerator(cfg)
    with torch.no_grad():  # log-duration predictor: exp(log(1 + n)) - 1 = n frames for every unit
        generator.dur_predictor.proj.weight.zero_()
        generator.dur_predictor.proj.bias.fill_(float(torch.log(torch.tensor(1.0 + frames_per_unit))))
    checkpoint, config = out / "vocoder.pt", out / "config.json"
    torch.save({"generator": generator.state_dict()}, checkpoint)
    config.write_text(json.dumps(cfg, indent=2))
    return checkpoint, config


@pytest.fixture(scope="session")
def tiny_vocoder(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, config.json) of a tiny random multi-speaker unit HiFi-GAN: K=100, 4 speakers, durations of 2."""
    return write_tiny_vocoder(tmp_path_factory.mktemp("vocoder"))


@pytest.fixture(scope="session")
def make_tiny_vocoder():
    return write_tiny_vocoder
