"""LoRA (Hu et al., 2021): trainable low-rank adapters beside frozen Linear weights, as stage 3 trains them.

A `LoRALinear` is an `nn.Linear` whose frozen weight keeps its name (`...q_proj.weight`), so base checkpoints
load into a LoRA model unchanged; the adapter adds `...q_proj.lora_A` (r, in) and `...q_proj.lora_B` (out, r):

    y = x W^T + dropout(x) A^T B^T * alpha / r

Initialised as PEFT does (A Kaiming-uniform, B zero), a wrapped model starts equal to its base.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.models import kernels

# the Linear layers of a LLaMA block, by their Hugging Face names
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(InputError):
    """A LoRA setting, base checkpoint or adapter that cannot work, and why."""


def is_lora_key(name: str) -> bool:
    """True for the state-dict names of adapter weights (`...q_proj.lora_A`, `...q_proj.lora_B`)."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """W + B A * scaling, computed in fp32 and returned in W's dtype."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scaling).to(weight.dtype)


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update, scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a second weight; the base's is reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.scaling = rank, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **kw))
        self.lora_dropout = nn.Dropout(dropout)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init of A
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        base = kernels.linear(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)
        return base + update * self.scaling

    def merge(self) -> nn.Linear:
        """A plain Linear computing the same function (in eval mode): W + B A * scaling."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(merged_weight(self.weight.detach(), self.lora_A.detach(),
                                                  self.lora_B.detach(), self.scaling))
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def parse_targets(targets: str | Iterable[str]) -> list[str]:
    """'q_proj,v_proj' (or a list) -> ['q_proj', 'v_proj'], refusing names a LLaMA block does not have."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise LoRAError(f"LoRA target modules {unknown or names}: expected a non-empty selection of "
                        f"{', '.join(LORA_TARGETS)}")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str | Iterable[str]) -> list[str]:
    """Wrap the target Linear layers of every block in LoRALinear and freeze every other parameter (fairseq's
    trainer optimises only parameters that require grad). Returns the wrapped modules' names."""
    if rank <= 0:
        raise LoRAError(f"LoRA rank {rank}: must be positive")
    targets = set(parse_targets(targets))
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not wrapped:
        raise LoRAError(f"no Linear layer named {sorted(targets)} in the model")
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_key(name)
    return wrapped
