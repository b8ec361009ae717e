"""`distributed_training.ddp_backend=fsdp2`: sharded data parallelism with torch's FSDP2 in fairseq's trainer.

fairseq's own `fully_sharded` backend is fairscale's FSDP, unreleased since 2022 and broken on CPU. This backend
applies torch's `fully_shard` to every decoder block and then to the whole model, over the data-parallel
process group, so each rank keeps 1/world of every parameter, gradient and optimizer state and gathers one
block at a time. With `optimization.update_freq` above 1, gradients are reduce-scattered once per update, not
per micro-batch (`ShardedModel.no_sync`). With `common.bf16=true` the shards stay fp32 and each block computes
in bf16 (`MixedPrecisionPolicy`), gradients reduced in fp32; fairseq's own bf16 cast and its fp32 master-copy
optimizer are not used. A run launched with this backend builds our models on the meta device: each rank
allocates and draws only its own shards (the weights equal those of the model built whole), and loads a checkpoint
(resume or `finetune_from_model`) by mapping the file and copying out its own shards; no rank ever holds the whole
model. Checkpoints hold the full state, gathered on rank 0: the model is stored as in any fairseq checkpoint
(generation, export-hf and fine-tuning read it under any backend), the optimizer state keyed by parameter name, so
a run resumes with its optimizer under this backend, at any number of processes. With
`distributed_training.use_sharded_state=true` (the paper configs) nothing is gathered: each rank writes its own
shards of both (sharded_checkpoints.py) and loads its own shards on resume; readers outside training assemble the
model from the shards.

Importing the package calls `install()`, which adds the choice to fairseq's config and patches the few
Trainer methods that must differ; every other backend runs through fairseq unchanged.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from speechgpt_fairseq import sharded_checkpoints
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.sharded_checkpoints import ShardedState

logger = logging.getLogger(__name__)

BACKEND = "fsdp2"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, in CPU memory, on rank 0 only
SHARDS = StateDictOptions()  # each rank's own shards (DTensors), for sharded checkpoints


class FSDP2Error(InputError):
    """A configuration the fsdp2 backend cannot run."""


def uses_fsdp2(cfg) -> bool:
    return str(cfg.distributed_training.ddp_backend) == BACKEND


_sharded_start = False  # set while fairseq's main runs with ddp_backend=fsdp2 (see _build_on_meta_under_fsdp2)


def sharded_start() -> bool:
    """Whether models are being built for this backend: then ours are built on the meta device, and each rank
    allocates and draws (or loads) only its own shards."""
    return _sharded_start


def shard(model: nn.Module, group, device: torch.device, bf16: bool) -> "ShardedModel":
    """`fully_shard` each decoder block, then the root (embeddings, final norm, output layer), over `group`. A
    model on the meta device (built by a sharded start) then gets its shards allocated on `device` and drawn by
    its `reset_parameters`. A model sharded already is only wrapped."""
    if not isinstance(model, FSDPModule):
        blocks = getattr(getattr(model, "decoder", None), "layers", None)
        if blocks is None:
            raise FSDP2Error(f"ddp_backend={BACKEND} shards a model's `decoder.layers`; {type(model).__name__} "
                             f"has none")
        mesh, policy = DeviceMesh.from_group(group, device.type), precision_policy(bf16)
        # fully_shard moves what it shards to the mesh's device, block by block: the whole model is never on one
        # GPU; on the meta device it stays there, and to_empty allocates this rank's shards only
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
            model.reset_parameters()
            logger.info(f"{BACKEND}: model built on the meta device; each rank allocated and drew its own shards")
        log_shares(model, group)
    return ShardedModel(model)


def precision_policy(bf16: bool) -> MixedPrecisionPolicy:
    """With `common.bf16=true`: fp32 shards, each block computing in bf16, gradients reduced in fp32."""
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def local_parameters(model: nn.Module) -> int:
    """Parameters this rank holds: its shards of the sharded ones, all of any others."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def log_shares(model: nn.Module, group) -> list[int]:
    """Log (on rank 0) how many parameters each rank holds; returns those counts."""
    counts = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, local_parameters(model), group=group)
    total = sum(p.numel() for p in model.parameters())  # a DTensor's numel is that of the whole tensor
    logger.info(f"{BACKEND}: parameters held per rank: {', '.join(f'{n:,}' for n in counts)} of {total:,} "
                f"({', '.join(f'{n / total:.1%}' for n in counts)})")
    return counts


class ShardedModel(nn.Module):
    """The sharded model as fairseq's trainer sees it: calls and attributes go to the model, while `state_dict`
    gathers the full state on rank 0 and `load_state_dict` takes a full state and keeps this rank's shards.
    Both are collective: every rank calls them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.gather_state = True  # False while a sharded checkpoint is saved: state dicts of this rank's shards

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (copying, unpickling): no recursion
                raise
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """fairseq's trainer runs every micro-batch of an update but the last inside this: their gradients stay
        unsharded on each rank and add up, and the last backward reduce-scatters the sum, once per update. The
        cost is one full-size fp32 gradient per rank between micro-batches."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def state_dict(self, *args, **kwargs) -> dict:
        return get_model_state_dict(self.module, options=FULL if self.gather_state else SHARDS)

    def load_state_dict(self, state_dict, strict: bool = True, model_cfg=None, args=None):
        """Every rank holds the full state (mapped from the checkpoint file, see `_mapped_checkpoint_loads`) and
        keeps its own shards: each is copied into its parameter as soon as it is read, and the pages of a mapped
        file it came from are dropped at once, so a rank's memory never holds more than its shards and one
        tensor's pages of the file. A sharded checkpoint's model (`ShardedState`) is read shard by shard: each
        rank reads only its own rows, straight into its parameters."""
        if isinstance(state_dict, ShardedState):
            own = self.module.state_dict()
            # parameters are loaded in place; the rest (the vocabulary digest) is checked by the model's loading
            state_dict = state_dict.load_into({k: v if isinstance(v, DTensor) else v.clone() for k, v in own.items()})
        self.module.upgrade_state_dict(state_dict)  # the model's checks (vocabulary, shapes) on the full tensors
        own = self.module.state_dict()
        shards = {}
        with torch.no_grad():
            for key, value in state_dict.items():
                full = not isinstance(value, DTensor)  # a sharded checkpoint's shards are in place already
                if full and isinstance(own.get(key), DTensor) and own[key].shape == value.shape:
                    own[key].copy_(_shard_like(value, own[key]))
                    _drop_mapped_pages(value)
                    value = own[key]
                shards[key] = value
        # the model's own loading (LoRA rules, strictness) then sees shards already in place
        return self.module.load_state_dict(shards, strict=strict, model_cfg=model_cfg, args=args)


def _shard_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of `full`, laid out as `like` (no communication: every rank has `full`). FSDP2 shards
    dim 0 as torch.chunk does: the shard is then a view of `full`, converted only where the dtype or device
    differs, so a mapped checkpoint is read only where this rank's rows lie."""
    (placement,) = like.placements
    local_shape = like.to_local().shape
    if isinstance(placement, Shard):
        rank, chunks = like.device_mesh.get_local_rank(), full.chunk(like.device_mesh.size(), placement.dim)
        local = chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
        if local.shape == local_shape:
            return DTensor.from_local(local.to(like.device, like.dtype), like.device_mesh, like.placements,
                                      shape=full.shape, stride=full.stride())
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


_MADV_DONTNEED = 4


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Unmap the pages of a read-only file mapping that hold `tensor` (Linux madvise(MADV_DONTNEED)); they are read
    again from the file if touched. Anything not in such a mapping (memory of its own) is left alone."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if not _in_private_file_mapping(start, end):
        return
    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, end // page * page  # the pages wholly inside the tensor
    if high > low:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED)


def _in_private_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one private mapping of a file, as torch.load(mmap=True) maps a checkpoint (its
    tensors are only read while loading, so their pages are the file's)."""
    with open("/proc/self/maps") as f:
        for line in f:
            bounds, perms, _, _, inode, *path = line.split()
            low, high = (int(x, 16) for x in bounds.split("-"))
            if low <= start < high:
                return end <= high and perms[3] == "p" and inode != "0" and bool(path) and path[0].startswith("/")
    return False


def checkpoint_optimizer_state(optimizer, model: ShardedModel) -> None:
    """Make a fairseq optimizer save its full state (gathered on rank 0), or this rank's shards of it while the
    model's `gather_state` is off, and load a full state or a sharded checkpoint's (`ShardedState`) into its
    shards."""
    inner = optimizer.optimizer

    def state_dict() -> dict:
        return get_optimizer_state_dict(model.module, inner, options=FULL if model.gather_state else SHARDS)

    def load_state_dict(state_dict, optimizer_overrides: dict | None = None) -> None:
        if isinstance(state_dict, ShardedState):
            shards = state_dict.load_into(get_optimizer_state_dict(model.module, inner, options=SHARDS))
            set_optimizer_state_dict(model.module, inner, shards, options=SHARDS)
        else:
            set_optimizer_state_dict(model.module, inner, state_dict, options=StateDictOptions(full_state_dict=True))
        for group in optimizer.param_groups:
            group.update(optimizer_overrides or {})

    optimizer.state_dict, optimizer.load_state_dict = state_dict, load_state_dict


# ---- fairseq integration --------------------------------------------------------------------------
def _add_backend_choice() -> None:
    """Add `fsdp2` to the values fairseq's config (hydra and argparse) accepts for `ddp_backend`."""
    from fairseq.dataclass.constants import DDP_BACKEND_CHOICES as choices

    if BACKEND in choices._member_map_:
        return
    member = object.__new__(choices)
    member._name_ = member._value_ = BACKEND
    choices._member_map_[BACKEND] = member
    choices._value2member_map_[BACKEND] = member
    choices._member_names_.append(BACKEND)


def _patch_trainer() -> None:
    from fairseq import optim
    from fairseq.distributed import utils as distributed_utils
    from fairseq.optim import lr_scheduler
    from fairseq.trainer import Trainer

    if getattr(Trainer, "fsdp2", False):
        return
    init, model, build_optimizer, clip_grad_norm, load_checkpoint, state_dict = (
        Trainer.__init__, Trainer.model, Trainer._build_optimizer, Trainer.clip_grad_norm, Trainer.load_checkpoint,
        Trainer.state_dict)
    always_call_state_dict = Trainer.always_call_state_dict_during_save_checkpoint

    def __init__(self, cfg, task, model, criterion, quantizer=None):
        if not uses_fsdp2(cfg):
            return init(self, cfg, task, model, criterion, quantizer)
        if cfg.distributed_training.distributed_world_size < 2:
            raise FSDP2Error(f"ddp_backend={BACKEND} shards across processes: launch two or more (torchrun "
                             f"--nproc_per_node N ..., or distributed_training.distributed_world_size=N on N GPUs)")
        if cfg.common.fp16 or cfg.common.memory_efficient_fp16 or cfg.common.memory_efficient_bf16:
            raise FSDP2Error(f"ddp_backend={BACKEND} computes in bf16 with common.bf16=true; fp16 and the "
                             f"memory_efficient_* options are not supported")
        if any(p.is_meta for p in model.parameters()):  # a sharded start: fairseq's trainer cannot move it
            device = torch.device("cuda" if torch.cuda.is_available() and not cfg.common.cpu else "cpu")
            model = shard(model, distributed_utils.get_data_parallel_group(), device, bf16=cfg.common.bf16).module
        with _bf16_hidden_from_fairseq(cfg):  # fairseq would cast the model to bf16; FSDP2 casts per block
            init(self, cfg, task, model, criterion, quantizer)

    def sharded_model(self):
        if uses_fsdp2(self.cfg) and self._wrapped_model is None:
            self._wrapped_model = shard(self._model, self.data_parallel_process_group, self.device,
                                        bf16=self.cfg.common.bf16)
        return model.fget(self)

    def _build_optimizer(self):
        if not uses_fsdp2(self.cfg):
            return build_optimizer(self)
        # the optimizer updates the fp32 shards directly: no fairseq fp16/bf16 optimizer wrapper around it
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._optimizer = optim.build_optimizer(self.cfg.optimizer, params)
        checkpoint_optimizer_state(self._optimizer, self.model)
        self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
        self._lr_scheduler.step_update(0)

    def _clip_grad_norm(self, clip_norm):
        if not uses_fsdp2(self.cfg):
            return clip_grad_norm(self, clip_norm)
        # torch's clipping reduces the norm over the shards of every rank (fairseq's does not know DTensors)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        if not uses_fsdp2(self.cfg):
            if not reset_optimizer and sharded_checkpoints.is_index(filename):
                raise FSDP2Error(f"{filename}: a sharded checkpoint's optimizer state is kept in fsdp2's shards: "
                                 f"resume it with ddp_backend={BACKEND}, or add checkpoint.reset_optimizer=true")
            return load_checkpoint(self, filename, reset_optimizer, *args, **kwargs)
        # every rank maps the file and copies its own shards out of it: no rank reads or receives the whole state
        with _mapped_checkpoint_loads(self.cfg):
            return load_checkpoint(self, filename, reset_optimizer, *args, **kwargs)

    def _state_dict(self):
        if not saves_shards(self.cfg):
            return state_dict(self)
        # every rank writes its shards; rank 0's checkpoint file is then the index (fairseq writes it)
        self.model.gather_state = False
        try:
            state = state_dict(self)
        finally:
            self.model.gather_state = True
        save_dir = self.cfg.checkpoint.save_dir
        name = sharded_checkpoints.new_directory(save_dir, self.get_num_updates())
        sharded_checkpoints.write(os.path.join(save_dir, name), state["model"], state.pop("last_optimizer_state", None))
        state["model"], state[sharded_checkpoints.INDEX_KEY] = {}, name
        return state

    def _always_call_state_dict(self) -> bool:
        # gathering the full state is collective: the ranks that do not write must take part
        return uses_fsdp2(self.cfg) or always_call_state_dict.fget(self)

    Trainer.__init__ = __init__
    Trainer.model = property(sharded_model)
    Trainer._build_optimizer = _build_optimizer
    Trainer.clip_grad_norm = _clip_grad_norm
    Trainer.load_checkpoint = _load_checkpoint
    Trainer.state_dict = _state_dict
    Trainer.always_call_state_dict_during_save_checkpoint = property(_always_call_state_dict)
    Trainer.fsdp2 = True


class _MappingTorch:
    """`torch` as fairseq's checkpoint_utils sees it during a sharded load: `torch.load` of the open checkpoint
    maps the file (mmap) instead of reading it, so a rank's memory holds only the pages its shards come from."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        return torch.load(getattr(f, "name", f), *args, mmap=True, **kwargs)


@contextlib.contextmanager
def _mapped_checkpoint_loads(cfg):
    """fairseq loads a checkpoint on rank 0 and broadcasts it whole; here every rank loads it, mapped (or, from a
    sharded checkpoint, its own shards)."""
    from fairseq import checkpoint_utils

    on_all_ranks, checkpoint_utils.torch = cfg.checkpoint.load_checkpoint_on_all_dp_ranks, _MappingTorch()
    cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
    try:
        with sharded_checkpoints.loading_shards_per_rank():
            yield
    finally:
        cfg.checkpoint.load_checkpoint_on_all_dp_ranks, checkpoint_utils.torch = on_all_ranks, torch


def saves_shards(cfg) -> bool:
    """Whether checkpoints are written as each rank's shards (`distributed_training.use_sharded_state=true` under
    this backend) instead of the full state gathered on rank 0."""
    return uses_fsdp2(cfg) and bool(cfg.distributed_training.use_sharded_state)


def _remove_unreferenced_shards_after_saving() -> None:
    """After fairseq saved (and removed old checkpoint files under keep_interval_updates and the like), rank 0
    removes the shards directories no checkpoint file refers to any more."""
    from fairseq import checkpoint_utils

    save_checkpoint = checkpoint_utils.save_checkpoint
    if getattr(save_checkpoint, "fsdp2", False):
        return

    @functools.wraps(save_checkpoint)
    def save_checkpoint_and_remove_unreferenced_shards(cfg, trainer, *args, **kwargs):
        saved = save_checkpoint(cfg, trainer, *args, **kwargs)
        if saves_shards(trainer.cfg) and trainer.is_data_parallel_master and not cfg.no_save:
            sharded_checkpoints.remove_unreferenced(cfg.save_dir)
        return saved

    save_checkpoint_and_remove_unreferenced_shards.fsdp2 = True
    checkpoint_utils.save_checkpoint = save_checkpoint_and_remove_unreferenced_shards


def _build_on_meta_under_fsdp2() -> None:
    """fairseq's launch (`call_main`) runs `main` in this process or in processes it spawns; under fsdp2, main
    now runs with `sharded_start()` true, so that our models are built on the meta device."""
    from fairseq.distributed import utils as distributed_utils

    call_main = distributed_utils.call_main
    if getattr(call_main, "fsdp2", False):
        return

    def call_main_sharded(cfg, main, **kwargs):
        return call_main(cfg, functools.partial(_run_sharded, main) if uses_fsdp2(cfg) else main, **kwargs)

    call_main_sharded.fsdp2 = True
    distributed_utils.call_main = call_main_sharded


def _run_sharded(main, cfg, **kwargs):
    global _sharded_start
    _sharded_start = True
    try:
        return main(cfg, **kwargs)
    finally:
        _sharded_start = False


@contextlib.contextmanager
def _bf16_hidden_from_fairseq(cfg):
    bf16 = cfg.common.bf16
    cfg.common.bf16 = False
    try:
        yield
    finally:
        cfg.common.bf16 = bf16


def install() -> None:
    """Make `ddp_backend=fsdp2` selectable and runnable in fairseq; `speechgpt_fairseq.register()` calls this."""
    _add_backend_choice()
    _patch_trainer()
    _build_on_meta_under_fsdp2()
    _remove_unreferenced_shards_after_saving()
    sharded_checkpoints.install()
