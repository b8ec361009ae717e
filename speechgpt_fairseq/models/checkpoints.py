"""Checkpoint rules, in one place: what a checkpoint of ours holds and when it fits a model."""
from __future__ import annotations

import os

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.utils import merge_with_parent
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

from speechgpt_fairseq.data.vocabulary import Vocabulary


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None):
    """(model in eval mode, task) of a fairseq checkpoint of ours, the task built from the vocabulary it carries
    (no data directory needed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    cfg = state["cfg"]
    vocab_dict = (state.get("task_state") or {}).get("vocabulary")
    if vocab_dict is None:
        raise ValueError(f"{path}: carries no vocabulary (task state); was it written by speechgpt-fairseq?")
    name = cfg.task._name
    task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY[name](), cfg.task)
    task = TASK_REGISTRY[name](task_cfg, Vocabulary.from_dict(vocab_dict, source=path))
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), task
