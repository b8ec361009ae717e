"""Fused-kernel choice: NVIDIA apex's FusedRMSNorm and FusedAdam when apex is importable, torch's otherwise.

apex is not on PyPI (the PyPI package named `apex` is unrelated); whoever has built it gets its kernels with no
config change. Without it the model normalizes with `F.rms_norm`, the `speechgpt_adamw` optimizer runs torch's
`AdamW(fused=True)` (its multi-tensor path where torch has no fused kernel for the parameters), and attention is
`scaled_dot_product_attention`, which runs flash attention on CUDA when the inputs allow it (a generation step
in fp32 on the CPU runs two matmuls instead: torch's CPU kernel is slow for a single query). Linear layers run
`F.linear`, except in fp32 on the CPU without gradients (generation, scoring), where `weight @ x^T` is faster
(`linear`), and in bf16 generation on the CPU, where the steps read copies of the weights in oneDNN's packed layout
(`packed_weights`). Each choice is logged once, with the reason when the faster one could not be used.
"""
from __future__ import annotations

import ast
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)
_logged: set[str] = set()
_attention_kinds_seen: set[tuple] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _apex(module: str, name: str):
    """`apex.<module>.<name>`, or None where apex is not installed."""
    try:
        return getattr(importlib.import_module(f"apex.{module}"), name)
    except (ImportError, AttributeError):
        return None


# ---- RMSNorm ------------------------------------------------------------------------------------
def apex_rms_norm(dim: int, eps: float) -> nn.Module | None:
    """apex's FusedRMSNorm over the last `dim` features (its parameter is `weight`, as ours), or None without apex."""
    fused = _apex("normalization", "FusedRMSNorm")
    if fused is not None:
        try:
            module = fused(dim, eps=eps)
        except ImportError as e:  # apex built without its CUDA extensions
            _log_once(f"kernels: RMSNorm on torch F.rms_norm (apex FusedRMSNorm unusable: {e})")
            return None
        _log_once("kernels: RMSNorm on apex FusedRMSNorm")
        return module
    _log_once("kernels: RMSNorm on torch F.rms_norm (apex not installed)")
    return None


# ---- linear layers -------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` (no bias); `weight` may be a packed copy (`packed_weights`, without gradients). In fp32
    on the CPU without gradients it is computed as `weight @ x^T`, then transposed: torch's CPU BLAS runs
    `x @ weight^T` with few rows (a generation step) as a matrix-vector product on one core at about half the memory
    bandwidth, and the transposed product streams the weight on every core (a decoding step of
    benchmarks/generate.py's model: 13.3 ms of matmuls -> 4.7 ms at batch 1, 23.7 -> 11.7 at batch 8). The sums are
    the same, in another order (fp32 rounding, ~1e-7 relative). A single row is computed as two equal columns: a
    one-column product is a matrix-vector product again."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, weight)
    rows = x.reshape(-1, x.size(-1))
    if not len(rows):
        return F.linear(x, weight)
    _log_once("kernels: linear layers in fp32 on the CPU without gradients as weight @ x^T")
    columns = (rows if len(rows) > 1 else rows.repeat(2, 1)).t()
    y = torch.mm(weight, columns)[:, :len(rows)].t().contiguous()  # (rows, out)
    return y.view(*x.shape[:-1], weight.size(0))


def packed_weights(weights: list[Tensor | None], rows: int) -> list[Tensor | None]:
    """Copies of bf16 CPU weights in oneDNN's packed layout, for products without gradients (`linear`), or the
    weights themselves where they cannot be packed or the copies would not fit in half the memory available (they
    double what the weights take). `F.linear` in bf16 reorders the weight into that layout on every call: a
    generation step reads each weight about twice over, at 10-15 GB/s; packed once, the product streams it at about
    20-25 GB/s (this repository's 2-core CPU) and gives the same values, bit for bit. `rows`: the rows a product
    will usually have (a hint of oneDNN's; any number works). None entries stay None."""
    given = [w for w in weights if w is not None]
    if not given or any(w.device.type != "cpu" or w.dtype != torch.bfloat16 or isinstance(w, DTensor) or w.is_meta
                        for w in given):
        return weights
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        _log_once("kernels: bf16 generation on the CPU with weights as they are (oneDNN has no bf16 here)")
        return weights
    size, available = sum(w.numel() * w.element_size() for w in given), _available_memory()
    if available is None or 2 * size > available:
        where = "unknown" if available is None else f"{available / 2**20:,.0f} MiB"
        _log_once(f"kernels: bf16 generation on the CPU with weights as they are (packed copies would take "
                  f"{size / 2**20:,.1f} MiB; memory available: {where})")
        return weights
    _log_once("kernels: bf16 generation on the CPU reads copies of the weights in oneDNN's packed layout")
    return [None if w is None else torch.ops.mkldnn._reorder_linear_weight(w, max(1, rows)) for w in weights]


def _available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Linear(nn.Linear):
    """`nn.Linear` without bias whose product is `linear`'s (the model's projections)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


# ---- attention ----------------------------------------------------------------------------------
def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, enable_gqa: bool) -> str:
    """The kernel `scaled_dot_product_attention` picks for these inputs: flash, memory-efficient, cudnn or math."""
    if q.device.type != "cuda":
        return f"{q.device.type} (torch's kernel for this device)"
    from torch.backends import cuda

    params = cuda.SDPAParams(q, k, v, mask, 0.0, is_causal, enable_gqa)
    candidates = {1: ("flash", cuda.flash_sdp_enabled, cuda.can_use_flash_attention),
                  2: ("memory-efficient", cuda.mem_efficient_sdp_enabled, cuda.can_use_efficient_attention),
                  0: ("math", cuda.math_sdp_enabled, lambda p: True),
                  3: ("cudnn", cuda.cudnn_sdp_enabled, cuda.can_use_cudnn_attention)}
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [1, 2, 0, 3])()  # torch's own preference
    for backend in order:
        if backend in candidates and candidates[backend][1]() and candidates[backend][2](params):
            return candidates[backend][0]
    return "none (no SDPA kernel accepts these inputs)"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, enable_gqa: bool) -> Tensor:
    """Scaled dot-product attention over (B, H, T, D); logs, once per kind of input, which kernel runs it."""
    if _bf16_training_on_cpu(q):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), mask, is_causal, enable_gqa).to(q.dtype)
    one_query = _one_query_on_cpu(q, mask, is_causal)
    kind = (q.device.type, q.dtype, mask is None, is_causal, one_query)
    if kind not in _attention_kinds_seen:
        _attention_kinds_seen.add(kind)
        where = "packed rows (mask)" if mask is not None else "causal" if is_causal else "cached step"
        backend = ("cpu (matmuls, query heads grouped by key/value head)" if one_query
                   else sdpa_backend(q, k, v, mask, is_causal, enable_gqa))
        _log_once(f"kernels: attention ({q.dtype}, {where}) on {backend}")
    if one_query:
        return _one_query_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)


def _bf16_training_on_cpu(q: Tensor) -> bool:
    """bf16 attention on the CPU with gradients (training under autocast) over fewer than 256 positions: it runs in
    fp32, as torch's CPU flash attention is slower there in bf16, its backward pass most. Forward and backward,
    causal, 2 threads (batch x heads x positions x head width): 43 x 4 x 95 x 32 (the demo's step) 22.5 ms in bf16
    against 10.7 ms in fp32; 32 x 8 x 128 x 64 67.4 against 45.1; 24 x 8 x 192 x 64 70.2 against 67.1; longer ones
    are faster in bf16: 16 x 8 x 256 x 64 58.3 against 62.3, 4 x 8 x 1024 x 64 120.1 against 147.2."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(-2) < 256 and q.requires_grad
            and torch.is_grad_enabled())


def _one_query_on_cpu(q: Tensor, mask: Tensor | None, is_causal: bool) -> bool:
    """A generation step in fp32 on the CPU: one query per row that sees every key. torch's CPU kernel is slower
    there than two matmuls (per layer, batch 8, 544 keys: 440 us against 256 us). In bf16 the matmuls would be ~9x
    faster still (7 ms against 0.8 ms), but their rounding differs from SDPA's by a bf16 ulp, which flips greedy
    picks at near-ties against transformers (benchmarks/generate.py): bf16 keeps SDPA."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.size(2) == 1 and mask is None
            and not is_causal)


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, H, 1, D) over k, v (B, Hkv, S, D); the H / Hkv query heads that
    share a key/value head are the rows of one matmul (no repeated keys)."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    qg = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): head h uses key/value head h // G
    w = (qg @ k.transpose(-1, -2)).mul_(D ** -0.5).softmax(-1)  # (B, Hkv, G, S)
    return (w @ v).reshape(B, H, 1, D)


# ---- AdamW --------------------------------------------------------------------------------------
def adamw(params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) on the fastest kernel here: apex FusedAdam, torch fused, torch foreach."""
    params = list(params)
    fused = _apex("optimizers", "FusedAdam")
    sharded = any(isinstance(p, DTensor) for p in params)
    if fused is not None and not sharded:
        _log_once("kernels: AdamW on apex FusedAdam")
        return fused(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    why = "apex FusedAdam takes no sharded (FSDP2) parameters" if fused is not None else "apex not installed"
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    except RuntimeError as e:  # no fused kernel for these parameters' device or dtype
        _log_once(f"kernels: AdamW on torch's multi-tensor path ({why}; torch has no fused AdamW here: {e})")
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
    _log_once(f"kernels: AdamW on torch fused ({why})")
    return optimizer


@dataclass
class SpeechGPTAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "Adam's betas, e.g. [0.9, 0.999]"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam's epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW) weight decay"})
    lr: list[float] = II("optimization.lr")


@register_optimizer("speechgpt_adamw", dataclass=SpeechGPTAdamWConfig)
class SpeechGPTAdamW(FairseqOptimizer):
    """torch's AdamW (the update of Hugging Face's Trainer, which SpeechGPT trained with) on fused kernels."""

    def __init__(self, cfg, params):
        super().__init__(cfg)
        self._optimizer = adamw(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> dict:
        betas = self.cfg.adam_betas
        if isinstance(betas, str):  # the argparse CLI passes "(0.9, 0.999)"
            betas = ast.literal_eval(betas)
        return {"lr": self.cfg.lr[0], "betas": tuple(betas), "eps": self.cfg.adam_eps,
                "weight_decay": self.cfg.weight_decay}

    @property
    def supports_flat_params(self) -> bool:
        return True
