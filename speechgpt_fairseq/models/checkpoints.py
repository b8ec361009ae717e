"""Checkpoint rules, in one place: what a checkpoint of ours holds, how it is read and written, and when it fits a
model.

A checkpoint is a fairseq checkpoint file (`cfg`, `model`, `task_state`, ...). Its rules:
- the vocabulary: `task_state["vocabulary"]` is the vocabulary itself, and `model["decoder.vocab_digest"]` the
  SHA-256 of its symbols and special ids; a checkpoint whose digest differs from the model's is refused by name
  (all zeros: not known, e.g. a model built from a bare vocabulary size);
- LoRA: a model with `lora_base` set saves only its adapters (and the digest), its frozen base being read from
  that checkpoint; a plain checkpoint loads into a LoRA model (the adapters then start at their initial values);
  `plain_weights` merges adapters into the weights they adapt (export-hf, import-peft --merge);
- shapes: every tensor must have the model's shape, and the error names the first that do not.
Sharded checkpoints (sharded_checkpoints.py) are read whole here wherever a whole model is needed.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.utils import merge_with_parent
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from omegaconf import OmegaConf, open_dict
from torch import Tensor

from speechgpt_fairseq.data.vocabulary import Vocabulary, dictionary_digest
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.models.lora import LoRAError, is_lora_key, merged_weight
from speechgpt_fairseq.sharded_checkpoints import with_whole_model

VOCAB_DIGEST_BYTES = 32  # sha256


class ModelConfigError(InputError):
    """A model configuration, or a checkpoint for it, that cannot work."""


class VocabularyMismatchError(ModelConfigError):
    """A checkpoint trained on another vocabulary than the data's (told apart by their digests)."""


class CheckpointFileError(InputError):
    """A checkpoint file that cannot be read: not a PyTorch checkpoint, or damaged (cut short, overwritten)."""


def unreadable(e: Exception) -> str:
    """Why torch could not read a file, in one line: torch's advice about `weights_only` is left out (it is
    about trusting a real checkpoint, not about a file that is damaged or is no checkpoint)."""
    text = str(e).strip()
    if isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or not text:
        return f"damaged, cut short, or another kind of file ({type(e).__name__})"
    return text.splitlines()[0][:200]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state of a fairseq checkpoint file, on the CPU; a file torch cannot read is refused with our reason
    (torch's own is about `weights_only`, which does not apply to a file that is not a checkpoint)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint: {unreadable(e)}") from None
    except (KeyError, TypeError) as e:  # fairseq's upgrade of old checkpoints, on a torch file of something else
        raise CheckpointFileError(f"{path}: a PyTorch file, but not a fairseq checkpoint (no {e})") from None
    except OSError as e:  # a zip cut short, read with mmap: "[Errno 22] Invalid argument"
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint: damaged, cut short, or unreadable "
                                  f"({e.strerror or type(e).__name__})") from None
    except RuntimeError as e:
        if "zip archive" not in str(e) and "PytorchStreamReader" not in str(e):
            raise  # not the file: a bug, shown with its traceback
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint: {unreadable(e)}") from None


def read_weights(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The state of a checkpoint file of ours, read with torch's weights-only loader (nothing in the file runs), a
    sharded checkpoint's model assembled from its shards. `mmap`: tensors are read page by page as they are used (a
    7B base copied into a model is not held twice in memory)."""
    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointFileError(f"{path}: not a loadable fairseq checkpoint ({unreadable(e)})") from None
    return with_whole_model(path, state)


def checkpoint_model_config(state: dict, path: str | os.PathLike):
    """The model config (SpeechGPTLlamaConfig) a checkpoint of ours was written with; fields it predates take their
    defaults."""
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig

    cfg = OmegaConf.create(state.get("cfg") or {})
    if OmegaConf.select(cfg, "model._name") != "speechgpt_llama":
        raise CheckpointFileError(f"{path}: model {OmegaConf.select(cfg, 'model._name')!r}, expected a "
                                  f"speechgpt_llama checkpoint")
    fields = {k: v for k, v in cfg.model.items() if k in SpeechGPTLlamaConfig.__dataclass_fields__}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SpeechGPTLlamaConfig), fields))


def checkpoint_vocabulary(state: dict, path: str | os.PathLike) -> Vocabulary:
    """The vocabulary a checkpoint of ours carries (task state)."""
    vocab_dict = (state.get("task_state") or {}).get("vocabulary")
    if vocab_dict is None:
        raise CheckpointFileError(f"{path}: carries no vocabulary (task state); was it written by speechgpt-fairseq?")
    return Vocabulary.from_dict(vocab_dict, source=path)


# ---- the vocabulary digest and shapes ---------------------------------------------------------------
def vocab_digest(dictionary) -> Tensor:
    """The digest a model over `dictionary` (a fairseq Dictionary; None: not known) carries: VOCAB_DIGEST_BYTES
    bytes, all zero when not known."""
    if dictionary is None:
        return torch.zeros(VOCAB_DIGEST_BYTES, dtype=torch.uint8)
    return torch.tensor(list(bytes.fromhex(dictionary_digest(dictionary))), dtype=torch.uint8)


def check_checkpoint_fits(decoder, state_dict: dict, prefix: str) -> None:
    """Refuse, with the reason, a checkpoint of another vocabulary or another shape than `decoder`; a state dict
    without a digest (built elsewhere) gets the decoder's, so only its shapes are checked."""
    theirs = state_dict.get(prefix + "vocab_digest")
    emb = state_dict.get(prefix + "embed_tokens.weight")
    n_ours = decoder.embed_tokens.weight.size(0)
    ours = decoder.vocab_digest.cpu()
    if theirs is not None and theirs.any() and ours.any() and not torch.equal(theirs.to(torch.uint8), ours):
        n_theirs = emb.size(0) if emb is not None else None
        what = (f"{n_theirs} tokens against {n_ours}" if n_theirs not in (None, n_ours) else
                f"both have {n_ours} tokens, but other tokens at some ids or other special ids (bos/eos/pad/unk)")
        raise VocabularyMismatchError(
            f"the checkpoint's vocabulary differs from the data directory's ({what}); binarize the data with the "
            f"checkpoint's vocab.json (speechgpt prepare-units / prepare-sft --vocab ...)")
    if theirs is None:
        state_dict[prefix + "vocab_digest"] = decoder.vocab_digest.clone()
    mismatched = [f"{k[len(prefix):]}: checkpoint {tuple(v.shape)}, model {tuple(p.shape)}"
                  for k, p in decoder.state_dict().items()
                  if (v := state_dict.get(prefix + k)) is not None and v.shape != p.shape]
    if mismatched:
        hint = "pick the preset that matches it"
        if any(is_lora_key(m.split(":")[0]) for m in mismatched):
            hint += "; LoRA weights: set lora_rank to the checkpoint's"
        raise ModelConfigError(f"the checkpoint does not fit the configured model ({hint}):\n  "
                               + "\n  ".join(mismatched[:6]))


# ---- LoRA state -------------------------------------------------------------------------------------
def drop_base_weights(state: dict) -> None:
    """An adapter-only checkpoint's model state, in place: the adapters and the vocabulary digest."""
    for key in [k for k in state if not (is_lora_key(k) or k.endswith("vocab_digest"))]:
        del state[key]


def lora_state_to_load(state_dict: dict, own: dict, base_from_lora_base: bool) -> dict:
    """`state_dict` made whole for a LoRA model whose own state is `own`: a plain checkpoint gets the model's initial
    adapters (the model then equals the loaded weights), an adapter-only one the base the model was built with
    (its lora_base: `base_from_lora_base`)."""
    plain = not any(is_lora_key(k) for k in state_dict)
    adapter_only = "decoder.embed_tokens.weight" not in state_dict
    if adapter_only and not base_from_lora_base:
        raise ModelConfigError("the checkpoint holds only LoRA weights but lora_base is not set: name the "
                               "checkpoint of the base weights it was trained on (model.lora_base=PATH)")
    state_dict = dict(state_dict)
    for key, value in own.items():
        if key not in state_dict and ((is_lora_key(key) and plain) or (not is_lora_key(key) and adapter_only)):
            state_dict[key] = value
    return state_dict


def merge_lora_state(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A state dict with LoRA weights -> the plain model's: each adapted W becomes W + B A * scaling."""
    merged = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        if key.endswith(".lora_A"):
            module = key[:-len(".lora_A")]
            merged[module + ".weight"] = merged_weight(state[module + ".weight"], state[key],
                                                       state[module + ".lora_B"], scaling)
    return merged


def load_base_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of the fairseq checkpoint a LoRA model's `lora_base` names; they must be plain (no adapter)."""
    if not os.path.isfile(path):
        raise LoRAError(f"lora_base {path}: no such checkpoint file (the checkpoint holding the frozen base "
                        f"weights; fairseq-generate can point elsewhere with --model-overrides \"{{'lora_base': "
                        f"'PATH'}}\")")
    try:
        state = read_weights(path, mmap=True)["model"]
    except CheckpointFileError as e:
        raise LoRAError(f"lora_base {e}") from None
    if any(is_lora_key(k) for k in state):
        raise LoRAError(f"lora_base {path}: holds LoRA weights; a base must be a plain checkpoint (merge this one "
                        f"first with speechgpt export-hf and convert-hf, or import-peft --merge)")
    return state


def plain_weights(state: dict, model_cfg) -> dict[str, Tensor]:
    """A checkpoint's weights as a model without LoRA has them: adapters merged into their Linear weights, the
    base read from `lora_base` when the checkpoint holds only the adapters."""
    weights = state["model"]
    if not model_cfg.lora_rank:
        return weights
    if "decoder.embed_tokens.weight" not in weights:
        weights = {**load_base_weights(model_cfg.lora_base), **weights}
    return merge_lora_state(weights, model_cfg.lora_alpha / model_cfg.lora_rank)


# ---- writing ----------------------------------------------------------------------------------------
def fairseq_checkpoint(model_state: dict, model_cfg, vocab: Vocabulary, data: str) -> dict:
    """A checkpoint in the layout fairseq's trainer writes, loadable by fairseq-generate and finetune_from_model:
    `model_state` with the vocabulary's digest, the model config, a unit_lm task over `data`, the vocabulary."""
    from fairseq.dataclass.configs import FairseqConfig

    from speechgpt_fairseq.tasks.unit_lm import UnitLMConfig

    cfg = OmegaConf.structured(FairseqConfig())
    with open_dict(cfg):
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = "speechgpt_llama"
        cfg.task = OmegaConf.structured(UnitLMConfig(data=data))
        cfg.task._name = "unit_lm"
        cfg.criterion = {"_name": "speechgpt_cross_entropy"}
    model_state = {**model_state, "decoder.vocab_digest": vocab_digest(vocab.to_dictionary())}
    return {
        "cfg": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
        "model": model_state,
        "task_state": {"vocabulary": vocab.to_dict()},
        "optimizer_history": [{"criterion_name": "SpeechGPTCrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {},
        "last_optimizer_state": None,
    }


# ---- reading a model --------------------------------------------------------------------------------
def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None):
    """(model in eval mode, task) of a fairseq checkpoint of ours, the task built from the vocabulary it carries
    (no data directory needed)."""
    state = read_checkpoint(path)
    cfg = state.get("cfg")
    if cfg is None or "model" not in state:
        raise CheckpointFileError(f"{path}: a PyTorch file, but not a fairseq checkpoint (no 'cfg' and 'model')")
    vocab = checkpoint_vocabulary(state, path)
    name = cfg.task._name
    task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY[name](), cfg.task)
    task = TASK_REGISTRY[name](task_cfg, vocab)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), task
