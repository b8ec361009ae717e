"""Hugging Face LLaMA <-> fairseq checkpoints: config, weights and tokenizer, both ways.

Weight map (ours keeps HF's submodule names, so it is a prefix change):

    HF LlamaForCausalLM                fairseq SpeechGPTLlamaModel
    model.embed_tokens.weight          decoder.embed_tokens.weight
    model.layers.{i}.*                 decoder.layers.{i}.*
    model.norm.weight                  decoder.norm.weight
    lm_head.weight                     decoder.lm_head.weight   (absent when tied)

What a checkpoint of ours holds and when it fits a model (vocabulary digest, LoRA state, the layout written
here) is models/checkpoints.py's; this module only translates.

PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors/.bin) come in through `import_peft`:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight    decoder.layers.{i}.self_attn.q_proj.lora_A
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from speechgpt_fairseq.atomic_files import atomic_dir, check_output_dir
from speechgpt_fairseq.data.vocabulary import SLOW_433, VOCAB_FILE, Vocabulary
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.models.checkpoints import (checkpoint_model_config, checkpoint_vocabulary, fairseq_checkpoint,
                                                  merge_lora_state, plain_weights, read_weights, unreadable)
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, validate_config
from speechgpt_fairseq.models.lora import LORA_TARGETS

logger = logging.getLogger(__name__)

# rows added for units and SpeechGPT tokens: mean of the existing rows plus this much of their per-dimension std
NEW_ROW_NOISE = 0.01
NEW_ROW_SEED = 0
_SKIPPED_BUFFERS = ("rotary_emb.inv_freq",)


class HFCheckpointError(InputError):
    """A Hugging Face directory or fairseq checkpoint that cannot be converted, and why."""


# ---- names ------------------------------------------------------------------------------------------
def hf_to_fairseq_name(name: str) -> str:
    if name.startswith("model."):
        return "decoder." + name[len("model."):]
    if name.startswith("lm_head."):
        return "decoder." + name
    raise HFCheckpointError(f"unexpected weight {name!r} in a LlamaForCausalLM checkpoint")


def fairseq_to_hf_name(name: str) -> str:
    if name.startswith("decoder.lm_head."):
        return name[len("decoder."):]
    if name.startswith("decoder."):
        return "model." + name[len("decoder."):]
    raise HFCheckpointError(f"unexpected weight {name!r} in a speechgpt_llama checkpoint")


# ---- config -----------------------------------------------------------------------------------------
def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise HFCheckpointError(f"{hf_dir}: no such directory (expected a Hugging Face LlamaForCausalLM directory)")
    if not path.exists():
        raise HFCheckpointError(f"{hf_dir}: no config.json (expected a Hugging Face LlamaForCausalLM directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{path}: unreadable ({e})") from None
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise HFCheckpointError(f"{path}: model_type {config.get('model_type')!r}, architectures {archs}: "
                                f"expected a LLaMA (model_type 'llama', LlamaForCausalLM)")
    problems = []
    kind, _, rope = rope_settings(config)
    if kind not in _ROPE_FIELDS:
        problems.append(f"rope scaling {kind!r} (supported: {', '.join(_ROPE_FIELDS)})")
    elif [key for key in _ROPE_FIELDS[kind] if key not in rope]:
        problems.append(f"rope scaling {kind!r} without {[key for key in _ROPE_FIELDS[kind] if key not in rope]}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (LLaMA has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (LLaMA uses silu)")
    if problems:
        raise HFCheckpointError(f"{path}: unsupported LLaMA variant: " + "; ".join(problems))
    return config


# the rope scalings we compute (models/llama.py), with the config.json keys each needs -> our config fields
_ROPE_FIELDS = {
    "default": {},
    "linear": {"factor": ("rope_scaling_factor", float)},
    "llama3": {"factor": ("rope_scaling_factor", float), "low_freq_factor": ("rope_low_freq_factor", float),
               "high_freq_factor": ("rope_high_freq_factor", float),
               "original_max_position_embeddings": ("rope_original_max_positions", int)},
}


def rope_settings(config: dict) -> tuple[str, float, dict]:
    """(scaling type, theta, scaling parameters) of a config.json: transformers < 5 writes `rope_theta` and
    `rope_scaling` ({"rope_type" or "type", "factor", ...}); 5 writes both into `rope_parameters`. Where both are
    given, `rope_scaling` wins, as transformers 5 reads it."""
    scaling, params = config.get("rope_scaling") or {}, config.get("rope_parameters") or {}
    kind = (scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or params.get("type")
            or "default")
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    return kind, float(theta), {**params, **scaling}


def model_config_from_hf(config: dict) -> SpeechGPTLlamaConfig:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    kind, theta, rope = rope_settings(config)
    scaling = {field: cast(rope[key]) for key, (field, cast) in _ROPE_FIELDS[kind].items()}
    cfg = SpeechGPTLlamaConfig(
        decoder_layers=config["num_hidden_layers"],
        decoder_embed_dim=hidden,
        decoder_ffn_embed_dim=config["intermediate_size"],
        decoder_attention_heads=heads,
        decoder_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim == hidden // heads else head_dim,
        rope_theta=theta,
        rope_scaling="none" if kind == "default" else kind,
        **scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_target_positions=config.get("max_position_embeddings", 2048),
        share_decoder_input_output_embed=bool(config.get("tie_word_embeddings", False)),
    )
    validate_config(cfg)
    return cfg


def hf_config_from_model(cfg, vocab: Vocabulary, dtype: torch.dtype) -> dict:
    heads = cfg.decoder_attention_heads
    rope_type = "default" if cfg.rope_scaling == "none" else cfg.rope_scaling
    rope_scaling = {key: getattr(cfg, field) for key, (field, _) in _ROPE_FIELDS[rope_type].items()}
    rope_scaling = {"rope_type": rope_type, **rope_scaling} if rope_scaling else {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(vocab),
        "hidden_size": cfg.decoder_embed_dim,
        "intermediate_size": cfg.decoder_ffn_embed_dim,
        "num_hidden_layers": cfg.decoder_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.decoder_kv_heads or heads,
        "head_dim": cfg.head_dim or cfg.decoder_embed_dim // heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers < 5
        "rope_scaling": rope_scaling or None,
        "rope_parameters": {**rope_scaling, "rope_type": rope_type, "rope_theta": cfg.rope_theta},  # transformers 5
        "max_position_embeddings": cfg.max_target_positions,
        "tie_word_embeddings": bool(cfg.share_decoder_input_output_embed),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
        "initializer_range": cfg.init_std,
    }


# ---- weights ----------------------------------------------------------------------------------------
def iter_hf_weights(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from model.safetensors / pytorch_model.bin, sharded (with an index) or not."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (hf_dir / index).exists():
            weight_map = json.loads((hf_dir / index).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (hf_dir / single).exists():
            files = [single]
        else:
            continue
        from tqdm import tqdm

        for name in tqdm(files, desc=f"reading {hf_dir.name}", unit=" file", disable=len(files) == 1):
            yield from _load_weight_file(hf_dir / name)
        return
    raise HFCheckpointError(f"{hf_dir}: no weights found; expected model.safetensors or pytorch_model.bin "
                            f"(or their sharded form with an .index.json)")


def _load_weight_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not path.exists():
        raise HFCheckpointError(f"{path}: listed in the index but missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HFCheckpointError(f"{path}: unreadable weights ({unreadable(e)})") from None
    yield from tensors.items()


def extend_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append `rows` rows: the mean of the existing rows plus small seeded noise (see docs/checkpoints.md)."""
    if rows <= 0:
        return weight
    w = weight.float()
    mean, std = w.mean(0), w.std(0)
    g = torch.Generator().manual_seed(NEW_ROW_SEED)
    new = mean + NEW_ROW_NOISE * std * torch.randn(rows, w.size(1), generator=g)
    return torch.cat([weight, new.to(weight.dtype)])


def fairseq_state_from_hf(hf_dir: Path, cfg: SpeechGPTLlamaConfig, vocab: Vocabulary) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in iter_hf_weights(hf_dir):
        if name.endswith(_SKIPPED_BUFFERS):
            continue
        state[hf_to_fairseq_name(name)] = tensor
    if cfg.share_decoder_input_output_embed:
        state.pop("decoder.lm_head.weight", None)
    expected = _expected_shapes(cfg, len(vocab))
    hf_vocab = state.get("decoder.embed_tokens.weight", torch.empty(0, 0)).shape[0]
    for key in ("decoder.embed_tokens.weight", "decoder.lm_head.weight"):
        if key in state:
            if state[key].shape[0] > len(vocab):
                raise HFCheckpointError(f"{hf_dir}: {fairseq_to_hf_name(key)} has {state[key].shape[0]} rows but the "
                                        f"tokenizer has only {len(vocab)} tokens")
            state[key] = extend_rows(state[key], len(vocab) - state[key].shape[0])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{fairseq_to_hf_name(k)} {tuple(state[k].shape)} (config says {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise HFCheckpointError(
            f"{hf_dir}: weights do not match config.json: "
            + "; ".join(filter(None, [
                f"missing {[fairseq_to_hf_name(k) for k in missing[:5]]}" if missing else "",
                f"unexpected {[fairseq_to_hf_name(k) for k in unexpected[:5]]}" if unexpected else "",
                f"wrong shape {wrong[:5]}" if wrong else ""])))
    logger.info(f"embedding rows: {hf_vocab} from the checkpoint, {len(vocab) - hf_vocab} added")
    return state


def _expected_shapes(cfg, vocab_size: int) -> dict[str, tuple[int, ...]]:
    dim, ffn = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
    heads = cfg.decoder_attention_heads
    kv = cfg.decoder_kv_heads or heads
    hd = cfg.head_dim or dim // heads
    shapes = {"decoder.embed_tokens.weight": (vocab_size, dim), "decoder.norm.weight": (dim,)}
    if not cfg.share_decoder_input_output_embed:
        shapes["decoder.lm_head.weight"] = (vocab_size, dim)
    for i in range(cfg.decoder_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, dim), p + "self_attn.k_proj.weight": (kv * hd, dim),
            p + "self_attn.v_proj.weight": (kv * hd, dim), p + "self_attn.o_proj.weight": (dim, heads * hd),
            p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
            p + "mlp.down_proj.weight": (dim, ffn),
            p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
        })
    return shapes


# ---- fairseq checkpoint files ------------------------------------------------------------------------
def _checkpoint_file(path: Path) -> Path:
    """A checkpoint named directly, or the checkpoint.pt of a directory written by convert-hf / import-peft."""
    return path / "checkpoint.pt" if path.is_dir() else path


# ---- the two verbs ----------------------------------------------------------------------------------
# the files each verb writes into OUT: --overwrite replaces an OUT that holds nothing else
CHECKPOINT_DIR_FILES = re.compile(r"checkpoint\.pt|vocab\.json|model\.yaml")
HF_DIR_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                          r"generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json")


def is_checkpoint_dir_file(name: str) -> bool:
    return CHECKPOINT_DIR_FILES.fullmatch(name) is not None


def is_hf_dir_file(name: str) -> bool:
    return HF_DIR_FILES.fullmatch(name) is not None


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, num_units: int | None = None,
               overwrite: bool = False) -> Path:
    """HF LlamaForCausalLM directory -> `out/checkpoint.pt` + `out/vocab.json` (+ `out/model.yaml`)."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_output_dir(out, overwrite, inputs=[hf_dir], ours=is_checkpoint_dir_file)
    config = read_hf_config(hf_dir)
    vocab = Vocabulary.from_tokenizer(hf_dir, num_units)
    model_cfg = model_config_from_hf(config)
    logger.info(f"rotary embedding: theta {model_cfg.rope_theta:g}, scaling {model_cfg.rope_scaling}"
                + (f" (factor {model_cfg.rope_scaling_factor:g})" if model_cfg.rope_scaling != "none" else ""))
    state = fairseq_state_from_hf(hf_dir, model_cfg, vocab)
    write_checkpoint_dir(out, state, model_cfg, vocab, overwrite, inputs=[hf_dir])
    return out


def write_checkpoint_dir(out: Path, weights: dict, model_cfg: SpeechGPTLlamaConfig, vocab: Vocabulary,
                         overwrite: bool, inputs: list[Path]) -> None:
    """`out/checkpoint.pt`, `out/vocab.json` and `out/model.yaml`, written all together or not at all; `out` may not
    be, hold or lie in one of `inputs`."""
    with atomic_dir(out, overwrite, inputs, ours=is_checkpoint_dir_file) as scratch:
        vocab.save(scratch / VOCAB_FILE)
        torch.save(fairseq_checkpoint(weights, model_cfg, vocab, data=str(out.resolve())), scratch / "checkpoint.pt")
        model_yaml = {**OmegaConf.to_container(OmegaConf.structured(model_cfg)), "_name": "speechgpt_llama"}
        (scratch / "model.yaml").write_text(
            "# the model config of checkpoint.pt: use it as the `model:` section of a training config\n"
            + OmegaConf.to_yaml(OmegaConf.create(model_yaml)), encoding="utf-8")


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """fairseq checkpoint of ours -> a directory LlamaForCausalLM and AutoTokenizer load. LoRA adapters are merged
    into the weights they adapt."""
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    check_output_dir(out, overwrite, inputs=[checkpoint], ours=is_hf_dir_file)
    state = read_weights(checkpoint)
    model_cfg = checkpoint_model_config(state, checkpoint)
    vocab = checkpoint_vocabulary(state, checkpoint)
    tensors = {fairseq_to_hf_name(k): v.contiguous() for k, v in plain_weights(state, model_cfg).items()
               if k != "decoder.vocab_digest"}
    dtype = next(iter(tensors.values())).dtype
    with atomic_dir(out, overwrite, inputs=[checkpoint], ours=is_hf_dir_file) as scratch:
        _save_sharded(tensors, scratch, max_shard_bytes, save_file)
        (scratch / "config.json").write_text(json.dumps(hf_config_from_model(model_cfg, vocab, dtype), indent=2))
        (scratch / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": vocab.bos, "eos_token_id": vocab.eos_ids if len(vocab.eos_ids) > 1 else vocab.eos,
             "pad_token_id": vocab.pad}, indent=2))
        write_hf_tokenizer(vocab, scratch, model_max_length=model_cfg.max_target_positions)
    return out


def _save_sharded(tensors: dict, out: Path, max_shard_bytes: int, save_file) -> None:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_hf_tokenizer(vocab: Vocabulary, out: Path, model_max_length: int) -> None:
    """Tokenizer files for AutoTokenizer that encode as the vocabulary does: the added tokens (units, SpeechGPT
    tokens) as added tokens, bos added or not, and for SpeechGPT's encoding the settings with which transformers'
    current tokenizers reproduce 4.33's slow one (legacy, added tokens stripping the spaces beside them)."""
    names = {role: vocab.tokens[getattr(vocab, role)] for role in ("bos", "eos", "unk", "pad")}
    control = (vocab.bos, vocab.eos, vocab.unk, vocab.pad)
    strip = vocab.text_encoding == SLOW_433
    added = {str(i): {"content": vocab.tokens[i], "lstrip": strip and i not in control,
                      "rstrip": strip and i not in control, "normalized": False, "single_word": False,
                      "special": i in control}
             for i in sorted(set(control) | set(range(vocab.base_size, len(vocab))))}
    config = {"added_tokens_decoder": added, "bos_token": names["bos"], "eos_token": names["eos"],
              "unk_token": names["unk"], "pad_token": names["pad"], "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    if vocab.tokenizer_kind == "sentencepiece":
        (out / "tokenizer.model").write_bytes(vocab.tokenizer_model)
        config.update({"tokenizer_class": "LlamaTokenizer", "legacy": strip, "add_bos_token": vocab.add_bos,
                       "add_eos_token": False})
    else:
        (out / "tokenizer.json").write_text(_tokenizers_json(vocab), encoding="utf-8")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {f"{role}_token": name for role, name in names.items()}, indent=2, ensure_ascii=False), encoding="utf-8")


def _tokenizers_json(vocab: Vocabulary) -> str:
    """The vocabulary's tokenizer.json with every added token; units-only vocabularies get a word-level one."""
    if vocab.tokenizer_kind == "tokenizers":
        return vocab.encoder.hf_tokenizer.to_str()
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    base = {t: i for i, t in enumerate(vocab.tokens[:vocab.base_size])}
    tok = Tokenizer(WordLevel(base, unk_token=vocab.tokens[vocab.unk]))
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in vocab.tokens[:vocab.base_size]])
    tok.add_tokens([AddedToken(t, normalized=False) for t in vocab.added_tokens])
    if vocab.add_bos:
        from tokenizers.processors import TemplateProcessing

        bos = vocab.tokens[vocab.bos]
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, vocab.bos)])
    return tok.to_str()


# ---- PEFT LoRA adapters in ---------------------------------------------------------------------------
_PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_MLP = ("gate_proj", "up_proj", "down_proj")
_PEFT_HELP = "expected a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors or adapter_model.bin"


@dataclass
class PeftLoRA:
    """A PEFT LoRA adapter in our terms: the lora_* settings of SpeechGPTLlamaConfig and fairseq-named weights."""

    rank: int
    alpha: float  # our scaling is alpha / rank; rsLoRA's alpha / sqrt(rank) is folded in here
    dropout: float
    targets: list[str]
    weights: dict[str, torch.Tensor]


def read_peft_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refusing what our LoRALinear does not compute the same way."""
    path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise HFCheckpointError(f"{adapter_dir}: no such directory ({_PEFT_HELP})")
    if not path.exists():
        raise HFCheckpointError(f"{adapter_dir}: no adapter_config.json ({_PEFT_HELP})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{path}: unreadable ({e})") from None
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config['peft_type']!r} (only LORA adapters are supported)")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        problems.append(f"r {config.get('r')!r} (expected a positive integer)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out true (weights stored transposed, as for GPT-2's Conv1D; LLaMA's are not)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r} (the adapter trains biases, which LLaMA has none of; expected "
                        f"'none')")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (full copies of modules are not supported)")
    if config.get("use_dora"):
        problems.append("use_dora true (DoRA is not supported)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern (per-module ranks and alphas are not supported)")
    if problems:
        raise HFCheckpointError(f"{path}: unsupported adapter: " + "; ".join(problems))
    return config


def _declared_targets(config: dict, path: Path, num_layers: int) -> set[str]:
    """The block Linear layers `target_modules` selects: a list of (suffixes of) names, or PEFT's regular
    expression over full module names, or "all-linear"."""
    targets = config.get("target_modules")
    if targets == "all-linear":
        return set(LORA_TARGETS)
    if isinstance(targets, str):
        return {t for t in LORA_TARGETS for i in range(num_layers)
                if re.fullmatch(targets, f"model.layers.{i}.{'mlp' if t in _MLP else 'self_attn'}.{t}")}
    if isinstance(targets, list):
        return {t.rsplit(".", 1)[-1] for t in targets} & set(LORA_TARGETS)
    raise HFCheckpointError(f"{path}: target_modules {targets!r}: expected a list of module names or a regular "
                            f"expression")


def read_peft_adapter(adapter_dir: Path, base: dict[str, torch.Tensor], num_layers: int) -> PeftLoRA:
    """A PEFT LoRA adapter directory, checked against the base weights it is to be applied to."""
    config = read_peft_config(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    names = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / n).exists()]
    if not names:
        raise HFCheckpointError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin ({_PEFT_HELP})")
    path = adapter_dir / names[0]
    weights, per_layer = {}, {i: set() for i in range(num_layers)}
    for key, tensor in _load_weight_file(path):
        m = _PEFT_KEY.fullmatch(key)
        module = f"decoder.layers.{m[1]}.{m[2]}.{m[3]}" if m else ""
        if module + ".weight" not in base:
            raise HFCheckpointError(f"{path}: unexpected weight {key!r} (expected LoRA matrices of the base model's "
                                    f"Linear layers, like base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                    f"weight, for {num_layers} layers)")
        weights[f"{module}.lora_{m[4]}"] = tensor
        per_layer[int(m[1])].add(m[3])
    targets = [t for t in LORA_TARGETS if t in per_layer.get(0, ())]
    if not targets:
        raise HFCheckpointError(f"{path}: holds no LoRA weights for layer 0")
    uneven = [f"layer {i}: {sorted(ts)}" for i, ts in per_layer.items() if ts != set(targets)]
    if uneven:
        raise HFCheckpointError(f"{path}: adapters differ between layers (layer 0: {targets}; {', '.join(uneven[:3])});"
                                f" only the same adapters on every layer are supported")
    declared = _declared_targets(config, config_path, num_layers)
    if declared != set(targets):
        raise HFCheckpointError(f"{config_path}: target_modules {config.get('target_modules')!r} selects "
                                f"{sorted(declared)} but {path.name} holds adapters for {targets}")
    rank = config["r"]
    for key in [k for k in weights if k.endswith(".lora_A")]:
        module = key[:-len(".lora_A")]
        out_dim, in_dim = base[module + ".weight"].shape
        for name, want in ((key, (rank, in_dim)), (module + ".lora_B", (out_dim, rank))):
            got = tuple(weights[name].shape) if name in weights else "missing"
            if got != want:
                raise HFCheckpointError(f"{path}: {name} is {got}, expected {want} (r={rank} on a {in_dim} -> {out_dim}"
                                        f" layer of the base)")
    alpha = float(config.get("lora_alpha", 8))  # PEFT's default
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
    return PeftLoRA(rank, alpha, float(config.get("lora_dropout") or 0.0), targets, weights)


def import_peft(base: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike, merge: bool = False,
                overwrite: bool = False) -> Path:
    """A fairseq checkpoint of ours + a PEFT LoRA adapter -> a checkpoint directory like convert-hf's: with `merge`
    the merged model, otherwise a LoRA model whose checkpoint holds only the adapter (lora_base = BASE)."""
    base, out, adapter = _checkpoint_file(Path(base)), Path(out), Path(adapter)
    check_output_dir(out, overwrite, inputs=[base, adapter], ours=is_checkpoint_dir_file)
    state = read_weights(base)
    model_cfg, vocab = checkpoint_model_config(state, base), checkpoint_vocabulary(state, base)
    if model_cfg.lora_rank:
        raise HFCheckpointError(f"{base}: a LoRA checkpoint (lora_rank {model_cfg.lora_rank}); the base must hold "
                                f"plain weights (export-hf, then convert-hf, merges it)")
    lora = read_peft_adapter(adapter, state["model"], model_cfg.decoder_layers)
    logger.info(f"adapter: r={lora.rank}, scaling {lora.alpha / lora.rank:g}, on {', '.join(lora.targets)}")
    if merge:
        weights = merge_lora_state({**state["model"], **lora.weights}, lora.alpha / lora.rank)
    else:
        weights = lora.weights
        model_cfg = replace(model_cfg, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            lora_target_modules=",".join(lora.targets), lora_base=str(base.resolve()))
    write_checkpoint_dir(out, weights, model_cfg, vocab, overwrite, inputs=[base, adapter])
    return out
