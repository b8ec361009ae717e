"""Sharded checkpoints: with `ddp_backend=fsdp2` and `distributed_training.use_sharded_state=true`, every rank
writes its own shards of the model and of the optimizer state (torch.distributed.checkpoint) into a directory
beside the checkpoint, `shards-<updates>`, and the checkpoint file fairseq writes on rank 0 is a small index: the
training state without the model and optimizer tensors, naming that directory (relative to itself, so a save
directory can be moved whole). No rank ever holds the full state.

Reading: a run under fsdp2 (any number of processes) loads its own shards; everything else (fairseq-generate,
the Python API, chat, export-hf, `finetune_from_model` under another backend) gets the model's full tensors
assembled in one process, as a checkpoint written whole would hold them. A directory no checkpoint file refers to
any more (fairseq removed it with `keep_interval_updates`) is removed after each save, if it holds nothing but
shard files.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from speechgpt_fairseq.errors import InputError

logger = logging.getLogger(__name__)

INDEX_KEY = "sharded_state"  # in the checkpoint file: the shards directory's name, beside the file
DIRECTORY = re.compile(r"shards-\d+(\.\d+)?")
METADATA = ".metadata"


class ShardedCheckpointError(InputError):
    """A sharded checkpoint whose shards are missing, incomplete, or do not fit the model."""


@dataclass(frozen=True)
class ShardedState:
    """The model's or the optimizer's part of a sharded checkpoint, for the ranks of an fsdp2 run to load their
    shards of (fsdp.ShardedModel.load_state_dict and the optimizer's load_state_dict take it)."""
    directory: str
    part: str  # "model" or "optimizer"

    def load_into(self, target: dict) -> dict:
        """Load this part into `target` (this rank's state dict: DTensor shards are filled in place, other tensors
        replaced); collective, every rank calls it."""
        saved = {path[1] for path in _paths(_metadata(self.directory)).values() if path[0] == self.part}
        missing = sorted(set(target) - saved) if self.part == "model" else []
        if missing:
            raise ShardedCheckpointError(f"{self.directory}: no shards of {len(missing)} tensors of the model, "
                                         f"e.g. {missing[0]}")
        state = {self.part: target}
        dcp.load(state, checkpoint_id=self.directory)
        return state[self.part]


def index_directory(checkpoint: str | os.PathLike, state: dict) -> str | None:
    """The shards directory a checkpoint's state refers to (None for a checkpoint written whole)."""
    name = state.get(INDEX_KEY)
    return None if name is None else os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


def new_directory(save_dir: str, updates: int) -> str:
    """A directory name for the shards of a save at `updates`, agreed by every rank (rank 0 picks one that does
    not exist: an earlier save at the same update count is never overwritten)."""
    choice = [None]
    if dist.get_rank() == 0:
        name, n = f"shards-{updates}", 0
        while os.path.exists(os.path.join(save_dir, name)):
            n += 1
            name = f"shards-{updates}.{n}"
        choice = [name]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def write(directory: str, model: dict, optimizer: dict | None) -> None:
    """Every rank writes its shards of `model` and `optimizer` (sharded state dicts) into `directory`; rank 0 writes
    the metadata last, once every rank's files are written."""
    state = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    dcp.save(state, checkpoint_id=directory)


def read_whole(directory: str, part: str = "model") -> dict:
    """One part of a sharded checkpoint with its full tensors, in this process (no process group): the model as a
    checkpoint written whole holds it, or the optimizer state keyed by parameter name."""
    metadata = _metadata(directory)
    paths = _paths(metadata)
    state: dict = {}
    for key, meta in metadata.state_dict_metadata.items():
        if paths[key][0] != part:
            continue
        value = torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
        _place(state, paths[key], value)
    if part not in state:
        raise ShardedCheckpointError(f"{directory}: holds no {part} state")
    with warnings_of_dcp_silenced():
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    return state[part]


def with_whole_model(checkpoint: str | os.PathLike, state: dict) -> dict:
    """`state` read from `checkpoint`, its model's tensors assembled from the shards if it is a sharded checkpoint's
    index (the optimizer state stays in the shards)."""
    directory = index_directory(checkpoint, state)
    if directory is not None:
        state["model"] = read_whole(directory, "model")
    return state


def is_index(path: str | os.PathLike) -> bool:
    """Whether the file at `path` is a sharded checkpoint's index."""
    if not os.path.isfile(path):
        return False
    try:
        return _directory_name(path) is not None
    except Exception:  # not a checkpoint: its readers say why
        return False


def _directory_name(path: str | os.PathLike) -> str | None:
    """The shards directory a checkpoint file names (None for one written whole); its tensors are not read (the file
    is mapped). Raises what torch.load raises on a file it cannot read."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (state.get(INDEX_KEY) or None) if isinstance(state, dict) else None


_per_rank = False  # set while the ranks of an fsdp2 run load a checkpoint (fsdp._mapped_checkpoint_loads)


@contextlib.contextmanager
def loading_shards_per_rank():
    """While this is open, a sharded checkpoint read through fairseq's `load_checkpoint_to_cpu` gives `ShardedState`
    references for the model and the optimizer, for each rank to load its own shards."""
    global _per_rank
    _per_rank = True
    try:
        yield
    finally:
        _per_rank = False


def install() -> None:
    """fairseq's `checkpoint_utils.load_checkpoint_to_cpu`, which every fairseq reader and `read_checkpoint` use,
    reads a sharded checkpoint's index with its model: whole, or per rank inside `loading_shards_per_rank`."""
    from fairseq import checkpoint_utils

    load = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(load, "sharded", False):
        return

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        state = load(path, *args, **kwargs)
        directory = index_directory(path, state)
        if directory is None:
            return state
        if not _per_rank:
            return with_whole_model(path, state)
        state["model"] = ShardedState(directory, "model")
        if any(p[0] == "optimizer" for p in _paths(_metadata(directory)).values()):
            state["last_optimizer_state"] = ShardedState(directory, "optimizer")
        return state

    load_checkpoint_to_cpu.sharded = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def remove_unreferenced(save_dir: str) -> list[str]:
    """Remove the shards directories in `save_dir` that no checkpoint file there refers to and that hold nothing but
    shard files; nothing is removed if a checkpoint file cannot be read. Returns the names removed."""
    referenced = set()
    for path in sorted(Path(save_dir).glob("checkpoint*.pt")):
        try:
            referenced.add(_directory_name(path))
        except Exception as e:  # a checkpoint being copied, or not ours: keep every directory
            logger.warning(f"{path}: unreadable ({type(e).__name__}); no shards directory removed")
            return []
    removed = []
    for directory in sorted(Path(save_dir).iterdir()):
        if (directory.is_dir() and not directory.is_symlink() and DIRECTORY.fullmatch(directory.name)
                and directory.name not in referenced and _only_shard_files(directory)):
            shutil.rmtree(directory)
            removed.append(directory.name)
    if removed:
        logger.info(f"removed shards no checkpoint refers to any more: {', '.join(removed)}")
    return removed


def _only_shard_files(directory: Path) -> bool:
    return all(p.is_file() and (p.suffix == ".distcp" or p.name == METADATA) for p in directory.iterdir())


def _metadata(directory: str):
    if not os.path.isfile(os.path.join(directory, METADATA)):
        raise ShardedCheckpointError(f"{directory}: no shards metadata ({METADATA}): the shards directory of this "
                                     f"checkpoint is missing or was not written to the end")
    return FileSystemReader(directory).read_metadata()


def _paths(metadata) -> dict[str, tuple]:
    """{flat key: path in the nested state dict} of what a checkpoint holds."""
    planner_data = metadata.planner_data or {}
    return {key: tuple(planner_data.get(key, (key,))) for key in metadata.state_dict_metadata}


def _place(state: dict, path: tuple, value) -> None:
    """state[path[0]][path[1]]... = value, creating dicts (str keys) and lists (int keys) on the way."""
    node = state
    for key, following in zip(path[:-1], path[1:]):
        empty = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = node[key] if node[key] is not None else empty
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


@contextlib.contextmanager
def warnings_of_dcp_silenced():
    """dcp.load(no_dist=True) warns that it assumes a single process, which is what is asked here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        yield
