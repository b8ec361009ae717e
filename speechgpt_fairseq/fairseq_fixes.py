"""Fixes for fairseq-fixed 0.12.3.1 under NumPy 2 and torch >= 2.6, applied once when the package is imported.

Each fix is the smallest change that makes fairseq's own code path correct; tests/test_fairseq_fixes.py
proves each one.
"""
from __future__ import annotations

import argparse
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


def apply() -> None:
    """Apply every fix once; importing `speechgpt_fairseq` calls this."""
    global _applied
    if _applied:
        return
    _restore_np_compat_long()
    _keep_last_batch()
    _allow_fairseq_checkpoint_globals()
    _atomic_copies()
    _applied = True
