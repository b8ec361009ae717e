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
                   seed: int = 0, layers: int = 2, rope_scaling: dict | None = None) -> Path:
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
                      bos_token_id=bos, eos_token_id=eos, rope_scaling=rope_scaling)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


# Llama 3.1's rope scaling with a context of 64 (head width 16, theta 5e5: short, ramped and long wavelengths all
# occur), and linear scaling
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}

# the model variants the interop tests cover: (name, kwargs of write_hf_llama, tokenizer kind)
HF_VARIANTS = [
    ("mha-untied-sp", dict(kv_heads=4, tied=False, theta=10000.0), "sentencepiece"),
    ("gqa-tied-sp", dict(kv_heads=2, tied=True, theta=10000.0), "sentencepiece"),
    ("gqa-untied-json-llama3rope", dict(kv_heads=1, tied=False, theta=500000.0, rope_scaling=LLAMA3_ROPE),
     "tokenizers"),
    ("mha-tied-json-linearrope", dict(kv_heads=4, tied=True, theta=500000.0, rope_scaling=LINEAR_ROPE),
     "tokenizers"),
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


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run a console command (speechgpt, fairseq-*) as a user would, capturing its output; `input` is its stdin."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)
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


@pytest.fixture
def speechgpt_main(capsys):
    """`speechgpt_main([VERB, ...])`: `speechgpt VERB ...` in this process (quicker than `cli`): its exit status and
    the last line of its stderr, which holds no traceback."""
    import logging

    from speechgpt_fairseq.cli.main import main

    def run(argv: list) -> tuple[int, str]:
        level = logging.root.level
        logging.root.handlers.clear()  # handlers another test's main left on a captured stderr that is closed now
        try:
            status = main([str(a) for a in argv])
        finally:  # and this main's handler writes to this test's captured stderr
            logging.root.handlers.clear()
            logging.root.setLevel(level)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return status, err.strip().splitlines()[-1] if err.strip() else ""
    return run


@pytest.fixture(scope="session")
def make_hf_llama():
    return write_hf_llama


def write_tiny_vocoder(out: Path, num_units: int = 100, num_speakers: int | None = 4,
                       frames_per_unit: int | None = 2, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random unit HiFi-GAN saved as fairseq's released unit vocoders are: (checkpoint, config.json).

    The real generator layout (5 upsamplings, 320 samples per unit at 16 kHz) with few channels; a duration
    predictor that gives every unit `frames_per_unit` frames, or (None) fairseq's random one, whose durations
    differ from unit to unit (1 to 6 frames here); `num_speakers` speaker ids (None: one speaker).
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
        if frames_per_unit is not None:
            generator.dur_predictor.proj.weight.zero_()
        # random weights keep their init; the bias centres them near 2 frames (at its init most units get 1)
        generator.dur_predictor.proj.bias.fill_(float(torch.log(torch.tensor(1.0 + (frames_per_unit or 2)))))
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


def write_hubert(path: Path, layers: int = 2, dim: int = 32, ffn: int = 64, heads: int = 2, channels: int = 32,
                 extractor_mode: str = "default", normalize: bool = False, seed: int = 0, num_labels: int = 20,
                 **model_options) -> Path:
    """A random fairseq HubertModel saved as fairseq's trainer saves a hubert_pretraining checkpoint (mHuBERT's
    and HuBERT-base's format): the cfg with its model and task sections, the weights, and the task's label
    dictionary in task_state; `fairseq.checkpoint_utils.load_model_ensemble_and_task` loads it as it loads those.

    The conv feature extractor has HuBERT's seven layers (400-sample receptive field, 320-sample hop) with
    `channels` channels. extractor_mode "default" is HuBERT-base's (GroupNorm over time in the first conv layer),
    "layer_norm" HuBERT-large's (and then pre-norm transformer layers, as large has). `model_options` are other
    HubertConfig fields (HuBERT-base: conv_pos=128, conv_pos_groups=16, final_dim=256)."""
    from fairseq.data import Dictionary
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf, open_dict

    large = extractor_mode == "layer_norm"
    task_cfg = HubertPretrainingConfig(data=str(path.parent / "labels"), labels=["km"], label_rate=50.0,
                                       normalize=normalize)
    model_cfg = HubertConfig(**{
        "label_rate": 50.0, "extractor_mode": extractor_mode, "encoder_layers": layers, "encoder_embed_dim": dim,
        "encoder_ffn_embed_dim": ffn, "encoder_attention_heads": heads, "conv_pos": 16, "conv_pos_groups": 4,
        "final_dim": 16, "conv_feature_layers": f"[({channels},10,5)] + [({channels},3,2)] * 4 + [({channels},2,2)] * 2",
        "layer_norm_first": large, "conv_bias": large, **model_options})
    labels = Dictionary()
    for i in range(num_labels):
        labels.add_symbol(str(i))
    torch.manual_seed(seed)
    model = HubertModel(model_cfg, task_cfg, [labels])
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.task = OmegaConf.structured(task_cfg)
        cfg.task._name = "hubert_pretraining"
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = "hubert"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                "model": model.state_dict(), "task_state": {"dictionaries": [labels]},
                "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 0}],
                "extra_state": {}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_hubert(tmp_path_factory) -> Path:
    """A tiny random HuBERT-base-style checkpoint: 2 layers of width 32, "default" extractor, task normalize off."""
    return write_hubert(tmp_path_factory.mktemp("hubert") / "tiny_hubert.pt")


@pytest.fixture(scope="session")
def tiny_hubert_large_style(tmp_path_factory) -> Path:
    """A tiny random HuBERT-large-style checkpoint: "layer_norm" extractor, pre-norm layers, task normalize on."""
    return write_hubert(tmp_path_factory.mktemp("hubert_ln") / "tiny_hubert_ln.pt", extractor_mode="layer_norm",
                        normalize=True, seed=1)


@pytest.fixture(scope="session")
def make_hubert():
    return write_hubert


def simple_kmeans(module: str):
    """A module of fairseq's examples/hubert/simple_kmeans recipe, the anchor of our unit extraction. Its scripts
    import their sibling feature_utils, which imports npy_append_array, a recipe dependency we do not install:
    a stand-in is put in its place when it is missing (its writer, used by dump_feature, is never called here)."""
    import importlib
    import importlib.util
    import types

    import fairseq

    directory = str(Path(fairseq.__file__).parent / "examples" / "hubert" / "simple_kmeans")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    if "npy_append_array" not in sys.modules and importlib.util.find_spec("npy_append_array") is None:
        sys.modules["npy_append_array"] = types.ModuleType("npy_append_array")
        sys.modules["npy_append_array"].NpyAppendArray = None
    return importlib.import_module(module)


def read_16k_mono(path, need_waveform=True, use_sample_rate=None, waveform_transforms=None):
    """fairseq's get_features_or_waveform for a 16 kHz mono file: soundfile's float32 samples, no conversion (its
    conversion path needs torchaudio, which is not installed here)."""
    import soundfile as sf

    wav, sr = sf.read(path, dtype="float32")
    if wav.ndim != 1 or sr != use_sample_rate:
        raise ValueError(f"{path}: the torchaudio-free stand-in reads {use_sample_rate} Hz mono files only")
    return wav


def fairseq_recipe_on_cpu(setattr_) -> None:
    """Let fairseq's simple_kmeans readers run here: they call .cuda() (identity without CUDA) and read audio
    through torchaudio (16 kHz mono files are read with soundfile, as fairseq would read them, without it).
    `setattr_` is monkeypatch.setattr in tests, the builtin setattr in the benchmark."""
    import importlib.util

    if not torch.cuda.is_available():
        setattr_(torch.nn.Module, "cuda", lambda self, device=None: self)
        setattr_(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    if importlib.util.find_spec("torchaudio") is None:
        setattr_(simple_kmeans("dump_hubert_feature"), "get_features_or_waveform", read_16k_mono)


def require_program(name: str, package: str) -> None:
    """Skip a test whose system dependency is missing; under CI (CI=true), where `make install` must have
    installed it, fail instead."""
    import shutil

    if shutil.which(name) is None:
        reason = f"{name} is not on PATH (Debian package {package}, which make install installs)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}: under CI a missing system dependency fails the test")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def espeak_ng() -> None:
    """The test speaks with espeak-ng (a Debian package)."""
    require_program("espeak-ng", "espeak-ng")


def espeak(path: Path, text: str, voice: str = "en-us", speed: int = 175) -> Path:
    """Speak `text` with espeak-ng into a 22050 Hz mono wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-w", str(path), "-v", voice, "-s", str(speed), text], check=True)
    return path


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    """Real speech (espeak-ng) as a user's folder holds it: 22050 Hz mono, a stereo file, a 44.1 kHz FLAC and a
    16 kHz file in a subdirectory, of different lengths."""
    import numpy as np
    import soundfile as sf

    from speechgpt_fairseq.speech.audio import to_mono

    require_program("espeak-ng", "espeak-ng")
    root = tmp_path_factory.mktemp("speech")
    espeak(root / "a_hello.wav", "hello, how are you today?")
    wav, sr = sf.read(espeak(root / "tmp.wav", "the red cup is on the small table by the window", "en+f3"))
    sf.write(root / "b_stereo.wav", np.stack([wav, 0.5 * wav], axis=1), sr, subtype="PCM_16")
    wav, sr = sf.read(espeak(root / "tmp.wav", "seven plus two is nine", "en+m3", 150))
    sf.write(root / "c_44k.flac", to_mono(wav, sr, 44100), 44100)
    wav, sr = sf.read(espeak(root / "tmp.wav", "please read the long sentence about speech units and sound "
                                               "waves slowly and clearly, then stop", "en"))
    (root / "sub").mkdir()
    sf.write(root / "sub" / "d_16k.wav", to_mono(wav, sr, 16000), 16000, subtype="PCM_16")
    (root / "tmp.wav").unlink()
    return root


@pytest.fixture
def fairseq_recipe(monkeypatch):
    """`fairseq_recipe("dump_km_label")`: a module of fairseq's simple_kmeans recipe, runnable here for this test."""
    fairseq_recipe_on_cpu(monkeypatch.setattr)
    return simple_kmeans
