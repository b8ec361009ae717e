"""Checkpoint rules, in one place: what a checkpoint of ours holds and when it fits a model."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.utils import merge_with_parent
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.errors import InputError


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


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None):
    """(model in eval mode, task) of a fairseq checkpoint of ours, the task built from the vocabulary it carries
    (no data directory needed)."""
    state = read_checkpoint(path)
    cfg = state.get("cfg")
    if cfg is None or "model" not in state:
        raise CheckpointFileError(f"{path}: a PyTorch file, but not a fairseq checkpoint (no 'cfg' and 'model')")
    vocab_dict = (state.get("task_state") or {}).get("vocabulary")
    if vocab_dict is None:
        raise InputError(f"{path}: carries no vocabulary (task state); was it written by speechgpt-fairseq?")
    name = cfg.task._name
    task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY[name](), cfg.task)
    task = TASK_REGISTRY[name](task_cfg, Vocabulary.from_dict(vocab_dict, source=path))
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), task
