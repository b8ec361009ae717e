"""Hugging Face LLaMA <-> fairseq checkpoints: config, weights and tokenizer, both ways.

Weight map (ours keeps HF's submodule names, so it is a prefix change):

    HF LlamaForCausalLM                fairseq SpeechGPTLlamaModel
    model.embed_tokens.weight          decoder.embed_tokens.weight
    model.layers.{i}.*                 decoder.layers.{i}.*
    model.norm.weight                  decoder.norm.weight
    lm_head.weight                     decoder.lm_head.weight   (absent when tied)
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from speechgpt_fairseq.atomic_files import atomic_dir
from speechgpt_fairseq.data.vocabulary import VOCAB_FILE, Vocabulary
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, validate_config

logger = logging.getLogger(__name__)

# rows added for units and SpeechGPT tokens: mean of the existing rows plus this much of their per-dimension std
NEW_ROW_NOISE = 0.01
NEW_ROW_SEED = 0
_SKIPPED_BUFFERS = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
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
    rope = config.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta and the scaling type here
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {config.get('rope_scaling') or rope} (only plain rotary embeddings are "
                        f"supported)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (LLaMA has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (LLaMA uses silu)")
    if problems:
        raise HFCheckpointError(f"{path}: unsupported LLaMA variant: " + "; ".join(problems))
    return config


def rope_theta(config: dict) -> float:
    """transformers < 5 writes `rope_theta`; 5 writes `rope_parameters: {rope_theta, rope_type}`."""
    return (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0


def model_config_from_hf(config: dict) -> SpeechGPTLlamaConfig:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    cfg = SpeechGPTLlamaConfig(
        decoder_layers=config["num_hidden_layers"],
        decoder_embed_dim=hidden,
        decoder_ffn_embed_dim=config["intermediate_size"],
        decoder_attention_heads=heads,
        decoder_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim == hidden // heads else head_dim,
        rope_theta=float(rope_theta(config)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_target_positions=config.get("max_position_embeddings", 2048),
        share_decoder_input_output_embed=bool(config.get("tie_word_embeddings", False)),
    )
    validate_config(cfg)
    return cfg


def hf_config_from_model(cfg, vocab: Vocabulary, dtype: torch.dtype) -> dict:
    heads = cfg.decoder_attention_heads
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
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
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
        raise HFCheckpointError(f"{path}: unreadable weights ({e})") from None
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
def fairseq_checkpoint(model_state: dict, model_cfg: SpeechGPTLlamaConfig, vocab: Vocabulary, data: str) -> dict:
    """A checkpoint in the layout fairseq's trainer writes, loadable by fairseq-generate and finetune_from_model."""
    from fairseq.dataclass.configs import FairseqConfig

    from speechgpt_fairseq.data.vocabulary import dictionary_digest
    from speechgpt_fairseq.tasks.unit_lm import UnitLMConfig

    cfg = OmegaConf.structured(FairseqConfig())
    with _open(cfg):
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = "speechgpt_llama"
        cfg.task = OmegaConf.structured(UnitLMConfig(data=data))
        cfg.task._name = "unit_lm"
        cfg.criterion = {"_name": "speechgpt_cross_entropy"}
    model_state = dict(model_state)
    model_state["decoder.vocab_digest"] = torch.tensor(list(bytes.fromhex(dictionary_digest(vocab.to_dictionary()))),
                                                       dtype=torch.uint8)
    return {
        "cfg": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
        "model": model_state,
        "task_state": {"vocabulary": vocab.to_dict()},
        "optimizer_history": [{"criterion_name": "SpeechGPTCrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {},
        "last_optimizer_state": None,
    }


@contextmanager
def _open(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        yield


def load_fairseq_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise HFCheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HFCheckpointError(f"{path}: not a loadable fairseq checkpoint ({e})") from None


# ---- the two verbs ----------------------------------------------------------------------------------
def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, num_units: int | None = None,
               overwrite: bool = False) -> Path:
    """HF LlamaForCausalLM directory -> `out/checkpoint.pt` + `out/vocab.json` (+ `out/model.yaml`)."""
    hf_dir, out = Path(hf_dir), Path(out)
    config = read_hf_config(hf_dir)
    vocab = Vocabulary.from_tokenizer(hf_dir, num_units)
    model_cfg = model_config_from_hf(config)
    state = fairseq_state_from_hf(hf_dir, model_cfg, vocab)
    with atomic_dir(out, overwrite) as scratch:
        vocab.save(scratch / VOCAB_FILE)
        torch.save(fairseq_checkpoint(state, model_cfg, vocab, data=str(out.resolve())), scratch / "checkpoint.pt")
        model_yaml = {**OmegaConf.to_container(OmegaConf.structured(model_cfg)), "_name": "speechgpt_llama"}
        (scratch / "model.yaml").write_text(
            "# the model config of checkpoint.pt: use it as the `model:` section of a training config\n"
            + OmegaConf.to_yaml(OmegaConf.create(model_yaml)), encoding="utf-8")
    return out


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """fairseq checkpoint of ours -> a directory LlamaForCausalLM and AutoTokenizer load."""
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    state = load_fairseq_checkpoint(checkpoint)
    cfg = OmegaConf.create(state.get("cfg") or {})
    if OmegaConf.select(cfg, "model._name") != "speechgpt_llama":
        raise HFCheckpointError(f"{checkpoint}: model {OmegaConf.select(cfg, 'model._name')!r}, expected a "
                                f"speechgpt_llama checkpoint")
    model_cfg = OmegaConf.merge(OmegaConf.structured(SpeechGPTLlamaConfig), {
        k: v for k, v in cfg.model.items() if k in SpeechGPTLlamaConfig.__dataclass_fields__})
    vocab_dict = (state.get("task_state") or {}).get("vocabulary")
    if vocab_dict is None:
        raise HFCheckpointError(f"{checkpoint}: carries no vocabulary (task_state); was it written by "
                                f"speechgpt-fairseq?")
    vocab = Vocabulary.from_dict(vocab_dict, source=checkpoint)
    tensors = {fairseq_to_hf_name(k): v.contiguous() for k, v in state["model"].items() if k != "decoder.vocab_digest"}
    dtype = next(iter(tensors.values())).dtype
    with atomic_dir(out, overwrite) as scratch:
        _save_sharded(tensors, scratch, max_shard_bytes, save_file)
        (scratch / "config.json").write_text(json.dumps(hf_config_from_model(model_cfg, vocab, dtype), indent=2))
        (scratch / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": vocab.pad}, indent=2))
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
    """Tokenizer files for AutoTokenizer; the added tokens (units, SpeechGPT tokens) are plain added tokens."""
    names = {role: vocab.tokens[getattr(vocab, role)] for role in ("bos", "eos", "unk", "pad")}
    added = {str(i): {"content": vocab.tokens[i], "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": i in (vocab.bos, vocab.eos, vocab.unk, vocab.pad)}
             for i in sorted({vocab.bos, vocab.eos, vocab.unk, vocab.pad} | set(range(vocab.base_size, len(vocab))))}
    config = {"added_tokens_decoder": added, "bos_token": names["bos"], "eos_token": names["eos"],
              "unk_token": names["unk"], "pad_token": names["pad"], "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    if vocab.tokenizer_kind == "sentencepiece":
        (out / "tokenizer.model").write_bytes(vocab.tokenizer_model)
        config.update({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
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
    return tok.to_str()
