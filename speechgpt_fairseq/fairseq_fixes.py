"""Fixes for fairseq-fixed 0.12.3.1 under NumPy 2 and torch >= 2.6, and for multi-process training without GPUs,
applied once when the package is imported.

Each fix is the smallest change that makes fairseq's own code path correct; tests/test_fairseq_fixes.py
proves each one (the multi-process ones, with tests/test_distributed.py's training runs).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import types

import numpy as np
import torch

_applied = False


class _NumpyWithCompat(types.ModuleType):
    """numpy as two fairseq modules see it: numpy itself plus the `np.compat.long` alias NumPy 2 removed."""

    compat = types.SimpleNamespace(long=np.int64)

    def __getattr__(self, name: str):
        return getattr(np, name)


def _restore_np_compat_long() -> None:
    """TokenBlockDataset (break_mode="eos") and LanguagePairDataset use `np.compat.long`, gone in NumPy 2."""
    if hasattr(np, "compat"):
        return
    from fairseq.data import language_pair_dataset, token_block_dataset

    shim = _NumpyWithCompat("numpy")
    token_block_dataset.np = shim
    language_pair_dataset.np = shim


def _keep_last_batch() -> None:
    """fairseq drops the last batch when `required_batch_size_multiple` does not divide its size.

    Batches are consecutive runs of the ordered indices, so what was dropped is exactly the tail: it is
    appended back as a final, smaller batch. No example is ever lost.
    """
    from fairseq.data import data_utils

    original = data_utils.batch_by_size
    if getattr(original, "keeps_last_batch", False):
        return

    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                           required_batch_size_multiple, fixed_shapes)
        if fixed_shapes is None:
            batched = sum(len(b) for b in batches)
            if batched < len(indices):
                batches.append(indices[batched:].copy())
        return batches

    batch_by_size.keeps_last_batch = True
    batch_by_size.__doc__ = original.__doc__
    data_utils.batch_by_size = batch_by_size


def fairseq_checkpoint_safe_globals() -> list:
    """The non-tensor objects older fairseq checkpoints (HuBERT, wav2vec 2.0, ...) pickle.

    torch >= 2.6 loads with `weights_only=True`; rather than switching that off, these classes are
    allow-listed: argparse configs, fairseq dictionaries, and the NumPy scalars metrics were saved as.
    """
    from fairseq.data.dictionary import Dictionary

    try:
        from numpy._core.multiarray import scalar as np_scalar
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import scalar as np_scalar
    numpy_dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [argparse.Namespace, Dictionary, np_scalar, np.dtype, *numpy_dtypes]


def _allow_fairseq_checkpoint_globals() -> None:
    torch.serialization.add_safe_globals(fairseq_checkpoint_safe_globals())


def _trusted_broadcast() -> None:
    """A run of two or more processes resumes (or starts from `finetune_from_model`) by loading the checkpoint
    on rank 0 and sending it to the other ranks with `broadcast_object`: rank 0 pickles it, with the
    checkpoint's config as an omegaconf DictConfig and a `_TensorPlaceholder` per tensor, and the other ranks
    unpickle it with torch.load, which under torch >= 2.6 refuses those classes: every such resume failed.
    The receiving ranks now unpickle in full. What they receive is what rank 0 pickled itself, from a checkpoint
    it had loaded with `weights_only=True`; files are still loaded safely."""
    import io

    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils._broadcast_object_slow, "trusted", False):
        return

    def broadcast_object_slow(obj, src_rank: int, group, dist_device: torch.device):
        if distributed_utils.get_rank(group) == src_rank:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = torch.frombuffer(buffer.getbuffer(), dtype=torch.uint8).to(dist_device)
            distributed_utils.broadcast(torch.tensor([data.numel()], device=dist_device), src=src_rank, group=group)
            distributed_utils.broadcast(data, src=src_rank, group=group)
            return obj
        length = torch.zeros(1, dtype=torch.long, device=dist_device)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=dist_device)
        distributed_utils.broadcast(data, src=src_rank, group=group)
        return torch.load(io.BytesIO(data.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow.trusted = True
    distributed_utils._broadcast_object_slow = broadcast_object_slow


def _atomic_copies() -> None:
    """fairseq writes checkpoint_last.pt / checkpoint_best.pt as plain copies of the checkpoint it just saved;
    a kill during the copy leaves a truncated checkpoint_last.pt and the run cannot resume. Local copies now
    go to a temporary file that is renamed into place."""
    import os
    import shutil

    from fairseq.file_io import PathManager

    from speechgpt_fairseq.atomic_files import atomic_file

    original = PathManager.copy
    if getattr(original, "atomic", False):
        return

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in str(dst_path):  # remote storage: leave it to iopath
            return original(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        with atomic_file(dst_path) as tmp:
            shutil.copyfile(src_path, tmp)
        return True

    copy.atomic = True
    PathManager.copy = staticmethod(copy)


def _torchrun_without_gpus() -> None:
    """Under torchrun (or torch.distributed.launch) fairseq sets `device_id = rank % torch.cuda.device_count()`:
    a ZeroDivisionError on a machine without GPUs. The GPU is now torchrun's LOCAL_RANK, and without GPUs the
    device id stays 0 (fairseq would otherwise call `torch.cuda.set_device` for ranks > 0)."""
    import os

    from fairseq.distributed import utils as distributed_utils

    original = distributed_utils._infer_torch_distributed_launch_init
    if getattr(original, "uses_local_rank", False):
        return

    def infer(cfg) -> None:
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        gpus = torch.cuda.device_count()
        cfg.device_id = int(os.environ.get("LOCAL_RANK", cfg.distributed_rank % gpus)) if gpus else 0
        cfg.distributed_no_spawn = True  # torchrun started the processes

    infer.uses_local_rank = True
    distributed_utils._infer_torch_distributed_launch_init = infer


def _ddp_on_cpu() -> None:
    """`ddp_backend=pytorch_ddp` (fairseq's default) hands DistributedDataParallel `device_ids=[device_id]`,
    which torch refuses for a model on the CPU. For CPU models the device arguments are now left out."""
    from torch.nn.parallel import DistributedDataParallel

    from fairseq.models import distributed_fairseq_model

    if distributed_fairseq_model.DistributedDataParallel is not DistributedDataParallel:
        return

    def ddp(module, device_ids=None, output_device=None, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None
        return DistributedDataParallel(module, device_ids=device_ids, output_device=output_device, **kwargs)

    distributed_fairseq_model.DistributedDataParallel = ddp


def _no_tensorboardx_advice() -> None:
    """Importing fairseq logs "Please install tensorboardX" (text_to_speech.py) when it is absent: advice for a
    task we never run, printed before every command's own output. Dropped from that logger only."""
    logging.getLogger("fairseq.tasks.text_to_speech").addFilter(
        lambda record: "tensorboardX" not in record.getMessage())


def _our_checkpoint_refusal_last() -> None:
    """fairseq's trainer turns any error loading a checkpoint's weights into "Cannot load model parameters from
    checkpoint ...; please ensure that the architectures match", the last line a user reads. When the error is
    our refusal (models/checkpoints.py: another vocabulary, another shape) it is raised instead, naming the
    checkpoint and, for a vocabulary, the tokens that differ (read from the vocabulary the checkpoint carries).
    Resuming a checkpoint whose optimizer state covers other parameters (another run's: a LoRA model resumed from a
    full fine-tuning's checkpoint_last, or the reverse) is refused naming the file, not with torch's message."""
    from fairseq.trainer import Trainer

    original = Trainer.load_checkpoint

    @functools.wraps(original)
    def load_checkpoint(self, filename, *args, **kwargs):
        from speechgpt_fairseq.errors import InputError
        from speechgpt_fairseq.models.checkpoints import ModelConfigError, VocabularyMismatchError

        try:
            return original(self, filename, *args, **kwargs)
        except Exception as e:
            if "doesn't match the size of optimizer's group" in str(e):  # torch's, loading the optimizer's state
                raise InputError(
                    f"{os.path.abspath(filename)}: its optimizer state is for other trainable parameters than this "
                    f"model's (a run of another model config wrote it, e.g. with or without LoRA): resume it with its "
                    f"own config, or start from its weights in another checkpoint.save_dir with "
                    f"checkpoint.finetune_from_model") from None
            ours = e if isinstance(e, ModelConfigError) else e.__cause__ or e.__context__
            if not isinstance(ours, ModelConfigError):
                raise
            reason = str(ours)
            if isinstance(ours, VocabularyMismatchError):
                reason = _vocabulary_refusal(filename, self.task, reason)
            raise type(ours)(f"{filename}: {reason}") from None

    Trainer.load_checkpoint = load_checkpoint


def _vocabulary_refusal(filename: str, task, reason: str) -> str:
    """`reason`, with what differs between the vocabulary `filename` carries and the task's data directory."""
    from speechgpt_fairseq.data.vocabulary import Vocabulary, dictionary_difference

    try:  # mmap: the weights are not read, only the small task state
        state = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
        theirs = Vocabulary.from_dict(state["task_state"]["vocabulary"]).to_dictionary()
    except Exception:  # a checkpoint without a readable vocabulary: the digest's reason is all there is
        return reason
    data = getattr(getattr(task, "cfg", None), "data", "the data directory")
    return (f"its vocabulary differs from {data}'s vocab.json ({dictionary_difference(theirs, task.dictionary)}); "
            f"binarize the data with the checkpoint's vocab.json (speechgpt prepare-units / prepare-sft --vocab ...)")


def apply() -> None:
    """Apply every fix once; `speechgpt_fairseq.register()` calls this."""
    global _applied
    if _applied:
        return
    _no_tensorboardx_advice()  # before the first import of fairseq
    _restore_np_compat_long()
    _keep_last_batch()
    _allow_fairseq_checkpoint_globals()
    _trusted_broadcast()
    _atomic_copies()
    _torchrun_without_gpus()
    _ddp_on_cpu()
    _our_checkpoint_refusal_last()
    _applied = True
