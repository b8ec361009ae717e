"""LLaMA as a fairseq language model: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

In reading order: the config, the network (norm, rotary, attention, feed-forward, block, decoder), the key/value
cache generation writes into (`KVCache`: `prefill` a batch of prompts, then `step`), the fairseq model.
Submodule names follow Hugging Face's `modeling_llama.py`, so the weight map between the two is the identity
up to a prefix (see models/hf.py). With `lora_rank > 0` the target Linear layers carry LoRA adapters
(models/lora.py) and only those train; with `lora_base` set the frozen base is read from that checkpoint and
checkpoints hold only the adapters.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from speechgpt_fairseq import fsdp
from speechgpt_fairseq.models import kernels
from speechgpt_fairseq.models.checkpoints import (ModelConfigError, check_checkpoint_fits, drop_base_weights,
                                                  load_base_weights, lora_state_to_load, vocab_digest)
from speechgpt_fairseq.models.lora import LoRAError, apply_lora, parse_targets


@dataclass
class SpeechGPTLlamaConfig(FairseqDataclass):
    decoder_layers: int = field(default=2, metadata={"help": "number of decoder blocks"})
    decoder_embed_dim: int = field(default=128, metadata={"help": "model width (HF hidden_size)"})
    decoder_ffn_embed_dim: int = field(default=352, metadata={"help": "SwiGLU inner width (HF intermediate_size)"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    decoder_kv_heads: int = field(
        default=0, metadata={"help": "key/value heads for grouped-query attention; 0 means one per query head"})
    head_dim: int = field(default=0, metadata={"help": "width of one head; 0 means embed_dim / attention_heads"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base (500000 for Llama 3)"})
    rope_scaling: str = field(
        default="none", metadata={"help": "rotary frequency scaling: none; linear (positions divided by the factor); "
                                          "llama3 (Llama 3.1's: long wavelengths divided by the factor)"})
    rope_scaling_factor: float = field(default=1.0, metadata={"help": "factor of linear and llama3 scaling"})
    rope_low_freq_factor: float = field(
        default=1.0, metadata={"help": "llama3: wavelengths above original_max_positions / this are scaled fully"})
    rope_high_freq_factor: float = field(
        default=4.0, metadata={"help": "llama3: wavelengths below original_max_positions / this are not scaled"})
    rope_original_max_positions: int = field(
        default=8192, metadata={"help": "llama3: the context length the model was pretrained with"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of every RMSNorm"})
    max_target_positions: int = field(default=2048, metadata={"help": "longest sequence the model accepts"})
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie the output layer to the input embedding"})
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save memory"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of linear and embedding weights"})
    # LoRA (stage 3): SpeechGPT trained r=8, alpha=16, dropout 0.05 adapters on q_proj and v_proj
    lora_rank: int = field(
        default=0, metadata={"help": "rank of the LoRA adapters; 0 trains the whole model, > 0 only the adapters"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: updates are scaled by alpha/rank"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input path"})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "comma-separated Linear layers of every block that get adapters: "
                                                   "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"})
    lora_base: str = field(
        default="", metadata={"help": "fairseq checkpoint holding the frozen base weights; when set, the model is "
                                      "built from it and its checkpoints hold only the LoRA weights"})


def validate_config(cfg) -> None:
    heads, kv = cfg.decoder_attention_heads, cfg.decoder_kv_heads or cfg.decoder_attention_heads
    if heads % kv:
        raise ModelConfigError(f"decoder_attention_heads ({heads}) must be a multiple of decoder_kv_heads ({kv})")
    if not cfg.head_dim and cfg.decoder_embed_dim % heads:
        raise ModelConfigError(f"decoder_embed_dim ({cfg.decoder_embed_dim}) must divide by "
                               f"decoder_attention_heads ({heads}), or set head_dim")
    if (cfg.head_dim or cfg.decoder_embed_dim // heads) % 2:
        raise ModelConfigError("the head width must be even for rotary embeddings")
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ModelConfigError(f"rope_scaling {cfg.rope_scaling!r}: expected one of {ROPE_SCALINGS}")
    if cfg.rope_scaling != "none" and cfg.rope_scaling_factor <= 0:
        raise ModelConfigError(f"rope_scaling_factor ({cfg.rope_scaling_factor}) must be positive")
    if cfg.rope_scaling == "llama3" and not cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
        raise ModelConfigError(f"rope_low_freq_factor ({cfg.rope_low_freq_factor}) must be below "
                               f"rope_high_freq_factor ({cfg.rope_high_freq_factor})")
    if cfg.lora_rank < 0:
        raise ModelConfigError(f"lora_rank ({cfg.lora_rank}) must be 0 (no LoRA) or positive")
    if cfg.lora_rank == 0 and cfg.lora_base:
        raise ModelConfigError(f"lora_base is set ({cfg.lora_base}) but lora_rank is 0: set the adapters' rank")
    if cfg.lora_rank:
        if not 0 <= cfg.lora_dropout < 1:
            raise ModelConfigError(f"lora_dropout ({cfg.lora_dropout}) must be in [0, 1)")
        try:
            parse_targets(cfg.lora_target_modules)
        except LoRAError as e:
            raise ModelConfigError(f"lora_target_modules: {e}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalised in fp32 (F.rms_norm computes in fp32 for bf16/fp16 input, then rounds), scaled after the cast
        # back, as LLaMA does
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


def rms_norm(dim: int, eps: float) -> nn.Module:
    """apex's fused RMSNorm where apex is installed, else ours (models/kernels.py logs which)."""
    fused = kernels.apex_rms_norm(dim, eps)
    return RMSNorm(dim, eps) if fused is None else fused


ROPE_SCALINGS = ("none", "linear", "llama3")


def rotary_frequencies(head_dim: int, cfg) -> Tensor:
    """Inverse frequencies (head_dim / 2,) of the rotary embedding, scaled as `cfg.rope_scaling` says."""
    # on the CPU whatever device a model is built on (the meta device included): the tables are derived, not loaded
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":  # position p is rotated as p / factor
        return inv_freq / factor
    if cfg.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than original / low_freq_factor are divided by the factor, shorter than
        # original / high_freq_factor kept, and those between interpolated linearly in original / wavelength
        wavelen = 2 * math.pi / inv_freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_positions / wavelen - low) / (high - low)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > cfg.rope_original_max_positions / low, inv_freq / factor, ramp)
        return torch.where(wavelen < cfg.rope_original_max_positions / high, inv_freq, scaled)
    return inv_freq


class Rotary:
    """cos/sin tables (positions, head_dim) of the rotary embedding, in fp32 whatever the model's dtype (as
    transformers computes them), on the device asked for, grown on demand. Derived from the config: no state. The
    sin table's first half is negated, as `apply_rotary` uses it."""

    def __init__(self, inv_freq: Tensor, max_positions: int):
        self.inv_freq = inv_freq
        self._build(max_positions, inv_freq.device)

    def _build(self, n: int, device: torch.device) -> None:
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
        self.cos, self.sin = emb.cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)

    def __call__(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Tables for positions [start, start + length): (T, D)."""
        if start + length > self.cos.size(0) or self.cos.device != device:
            self._build(max(2 * (start + length), self.cos.size(0)), device)
        return self.cos[start:start + length], self.sin[start:start + length]

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Tables for per-token positions (B, T): (B, 1, T, D), broadcast over heads."""
        if int(positions.max()) >= self.cos.size(0) or self.cos.device != positions.device:
            self._build(max(2 * (int(positions.max()) + 1), self.cos.size(0)), positions.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by position; halves convention: x * cos + rotate_half(x) * sin, where rotate_half(x) is
    (-x2, x1) for halves (x1, x2) (HF's), computed as the halves swapped times the sin table whose first half is
    negated (`Rotary`'s): the same products, one operation fewer."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.n_heads = cfg.decoder_attention_heads
        self.n_kv = cfg.decoder_kv_heads or self.n_heads
        self.head_dim = cfg.head_dim or dim // self.n_heads
        self.q_proj = kernels.Linear(dim, self.n_heads * self.head_dim)
        self.k_proj = kernels.Linear(dim, self.n_kv * self.head_dim)
        self.v_proj = kernels.Linear(dim, self.n_kv * self.head_dim)
        self.o_proj = kernels.Linear(self.n_heads * self.head_dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, causal: bool = True,
                kv: tuple[Tensor, Tensor] | None = None, start: int = 0, qkv_weight: Tensor | None = None,
                o_weight: Tensor | None = None) -> Tensor:
        """`mask` (B, 1, T, S) says which keys each query sees, else `causal` or all; with `kv` (this layer's cache
        buffers, (B, Hkv, N, D)) the new keys and values are written at [start, start + T) and all up to there seen.
        `qkv_weight`: the q/k/v weights fused (`fused_weight`; generation), for one matmul instead of three;
        `o_weight`: the output projection's weight as generation reads it (`StepWeights`)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        if qkv_weight is None:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # fp32 tables; bf16 under autocast
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            qkv = kernels.linear(x, qkv_weight).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
            qk = apply_rotary(qkv[:, :H + Hkv], cos.to(qkv.dtype), sin.to(qkv.dtype))  # queries and keys at once
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        if kv is not None:
            kv[0][:, :, start:start + T] = k
            kv[1][:, :, start:start + T] = v
            k, v = kv[0][:, :, :start + T], kv[1][:, :, :start + T]  # (B, Hkv, S, D), S = start + T
        y = kernels.attention(q, k, v, mask, causal, enable_gqa=Hkv != H).transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y) if o_weight is None else kernels.linear(y, o_weight)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, hidden = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
        self.gate_proj = kernels.Linear(dim, hidden)
        self.up_proj = kernels.Linear(dim, hidden)
        self.down_proj = kernels.Linear(hidden, dim)

    def forward(self, x: Tensor, gate_up_weight: Tensor | None = None, down_weight: Tensor | None = None) -> Tensor:
        """`gate_up_weight`: the gate and up weights fused (`fused_weight`; generation), for one matmul;
        `down_weight`: the down projection's weight as generation reads it (`StepWeights`)."""
        if gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = kernels.linear(x, gate_up_weight).chunk(2, -1)
        h = F.silu(gate) * up
        return self.down_proj(h) if down_weight is None else kernels.linear(h, down_weight)


def fused_weight(linears: list[nn.Module]) -> Tensor | None:
    """The weights of `linears` fused: the row blocks of one (sum of outputs, inputs) tensor, so that one matmul
    computes all their outputs. A generation step then reads q/k/v and gate/up in two matmuls instead of five; at
    batch 1 the step is bound by reading the weights (benchmarks/generate.py bf16 batch 1, 128 new tokens: ours/HF
    1.15 -> 1.27). The first call moves the weights into one buffer, a slice each (the same values and Parameter
    objects; their gradients and optimizer state are untouched); later calls find them there, until something
    gives a weight storage of its own again (`.to(dtype)`, `load_state_dict(assign=True)`). The fused tensor is no
    parameter: use it without gradients. None where the weights cannot share a buffer: LoRA-wrapped layers (their
    adapters add to the product), sharded (DTensor) or meta weights, mixed dtypes or devices."""
    if any(type(m) is not kernels.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    first = weights[0]
    if any(isinstance(w, DTensor) or w.is_meta or w.dtype != first.dtype or w.device != first.device
           or w.size(1) != first.size(1) for w in weights):
        return None
    if not _row_blocks_of_one_buffer(weights):
        fused = torch.cat([w.detach() for w in weights])
        row = 0
        for w in weights:
            w.data = fused[row:row + w.size(0)]
            row += w.size(0)
    return first.detach().as_strided((sum(w.size(0) for w in weights), first.size(1)), (first.size(1), 1))


def _row_blocks_of_one_buffer(weights: list[Tensor]) -> bool:
    """Whether the (contiguous) weights follow each other in one storage, in order."""
    storage, at = weights[0].untyped_storage().data_ptr(), weights[0].data_ptr()
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != storage or w.data_ptr() != at:
            return False
        at += w.numel() * w.element_size()
    return True


def projection_weight(linear: nn.Module) -> Tensor | None:
    """The weight of a plain projection (`kernels.Linear`), detached; None for a LoRA-wrapped, sharded or meta one."""
    w = linear.weight if type(linear) is kernels.Linear else None
    return None if w is None or isinstance(w, DTensor) or w.is_meta else w.detach()


class StepWeights(NamedTuple):
    """A layer's weights as generation steps read them (without gradients): q/k/v fused, the attention's output,
    gate/up fused, down. Each is the weight itself, a fused view (`fused_weight`) or a packed copy of either
    (`kernels.packed_weights`), or None: the module runs on its own (a LoRA-wrapped projection)."""
    qkv: Tensor | None = None
    o: Tensor | None = None
    gate_up: Tensor | None = None
    down: Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = rms_norm(cfg.decoder_embed_dim, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = rms_norm(cfg.decoder_embed_dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, causal: bool = True,
                kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                weights: StepWeights = StepWeights()) -> Tensor:
        """`weights`: the layer's weights as generation reads them (`step_weights`); by default the modules'."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, kv, start, weights.qkv, weights.o)
        return x + self.mlp(self.post_attention_layernorm(x), weights.gate_up, weights.down)

    def step_weights(self) -> StepWeights:
        """The weights generation steps read: q/k/v and gate/up each fused into one tensor where they can be
        (`fused_weight`), the other two as they are (`projection_weight`)."""
        attn, mlp = self.self_attn, self.mlp
        return StepWeights(fused_weight([attn.q_proj, attn.k_proj, attn.v_proj]), projection_weight(attn.o_proj),
                           fused_weight([mlp.gate_proj, mlp.up_proj]), projection_weight(mlp.down_proj))


def positions_within_examples(example_ids: Tensor) -> Tensor:
    """(B, T) example index of each token -> its position inside its example (0 at each example's start)."""
    idx = torch.arange(example_ids.size(1), device=example_ids.device).expand_as(example_ids)
    starts = torch.ones_like(example_ids, dtype=torch.bool)
    starts[:, 1:] = example_ids[:, 1:] != example_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values


class SpeechGPTLlamaDecoder(FairseqIncrementalDecoder):
    """The LLaMA, built from a config and a vocabulary size. Training and scoring run whole sequences
    (`extract_features`); generation runs `prefill` then `step` over a `KVCache` the caller owns."""

    def __init__(self, cfg, vocab_size: int, dictionary=None):
        super().__init__(dictionary)
        self.cfg = cfg
        dim = cfg.decoder_embed_dim
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers))
        self.norm = rms_norm(dim, cfg.rms_norm_eps)
        self.lm_head = None if cfg.share_decoder_input_output_embed else kernels.Linear(dim, vocab_size)
        self.head_dim = cfg.head_dim or dim // cfg.decoder_attention_heads
        self.rotary = Rotary(rotary_frequencies(self.head_dim, cfg), cfg.max_target_positions)
        # the vocabulary the embedding rows belong to, checked when a checkpoint is loaded; zeros: not known
        self.register_buffer("vocab_digest", vocab_digest(None))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the weights of a new model and set the vocabulary digest. Each parameter is drawn whole on the CPU
        from the global RNG, one at a time in module order (linear and embedding weights normal(0, init_std),
        norm weights ones); a sharded (DTensor) parameter keeps its shard of that draw. A model built on the meta
        device and sharded over any number of processes thus starts from the weights it would have built whole,
        and no process ever holds more than one full parameter."""
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                full = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                    full.normal_(mean=0.0, std=self.cfg.init_std)
                elif name == "weight" and full.dim() == 1:  # RMSNorm (ours or apex's)
                    full.fill_(1.0)
                else:
                    raise TypeError(f"no initial value for {type(module).__name__}.{name}")
                if isinstance(param, DTensor):
                    full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.copy_(full)
        self.vocab_digest.copy_(vocab_digest(self.dictionary))

    # ---- whole sequences (training, scoring) -------------------------------------------------
    def extract_features(self, tokens: Tensor, example_ids: Tensor | None = None, **unused) -> Tensor:
        """Hidden states (B, T, C) after the final norm. `example_ids` (B, T) marks packed rows: tokens attend,
        and count positions, only within their own example."""
        x = self.embed_tokens(tokens)  # (B, T, C)
        mask = None
        if example_ids is None:
            cos, sin = self.rotary(0, tokens.size(1), tokens.device)
        else:
            cos, sin = self.rotary.at(positions_within_examples(example_ids))
            same = example_ids.unsqueeze(2) == example_ids.unsqueeze(1)  # (B, T, T)
            mask = (same & torch.ones_like(same[0]).tril()).unsqueeze(1)  # (B, 1, T, T), causal per example
        recompute = self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False) if recompute else layer(x, cos, sin, mask)
        return self.norm(x)

    @property
    def output_weight(self) -> Tensor:
        """(V, C): the output layer's weight (the input embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def output_layer(self, features: Tensor) -> Tensor:
        return kernels.linear(features, self.output_weight)

    def max_positions(self) -> int:
        return self.cfg.max_target_positions

    # ---- generation: prefill, then step ------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> "KVCache":
        """An empty cache for `batch` rows of up to `capacity` tokens each, in the model's dtype and device. It holds
        the weights the steps read without gradients (`set_step_weights`)."""
        w = self.embed_tokens.weight
        cache = KVCache(len(self.layers), batch, self.cfg.decoder_kv_heads or self.cfg.decoder_attention_heads,
                        self.head_dim, capacity, w.dtype, w.device)
        self.set_step_weights(cache)
        return cache

    @torch.no_grad()
    def set_step_weights(self, cache: "KVCache") -> None:
        """Give `cache` the weights its steps read without gradients: each layer's (`Block.step_weights`) and the
        output layer's, packed where `kernels.packed_weights` packs them (bf16 on the CPU). Packed copies hold the
        values of the moment; the cache notes which Parameters they copy, and `step` packs again after any of those
        changes (an optimizer step, a load)."""
        layers = [layer.step_weights() for layer in self.layers]
        output = self.output_weight
        output = None if isinstance(output, DTensor) or output.is_meta else output.detach()
        flat = kernels.packed_weights([w for weights in layers for w in weights] + [output], cache.batch)
        n = len(StepWeights._fields)
        cache.layer_weights = [StepWeights(*flat[i:i + n]) for i in range(0, n * len(layers), n)]
        cache.output_weight = flat[-1]
        packed = any(w is not None and w.is_mkldnn for w in flat)
        cache.packed_from = [p for p in self.parameters() if p.dim() == 2] if packed else []
        cache.packed_version = sum(p._version for p in cache.packed_from)

    def prefill(self, prompts: list[Tensor], cache: "KVCache") -> Tensor:
        """Run prompts of different lengths into an empty cache, one row each; the logits (B, V) that follow each
        prompt. Rows are left-padded: every row's next token goes to the same column."""
        if cache.length or cache.batch != len(prompts):
            raise ValueError(f"prefill takes an empty cache of {len(prompts)} rows (got {cache.batch} rows, "
                             f"{cache.length} positions filled)")
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("prefill needs at least one prompt, each of at least one token")
        longest = max(len(p) for p in prompts)
        tokens = prompts[0].new_zeros(len(prompts), longest)  # the padding id is never seen
        for row, p in enumerate(prompts):
            tokens[row, longest - len(p):] = p
        cache.set_padding(torch.tensor([longest - len(p) for p in prompts], device=tokens.device))
        return self.step(tokens, cache)

    def step(self, tokens: Tensor, cache: "KVCache", every_position: bool = False) -> Tensor:
        """Append `tokens` (B, T) to the cache's rows; the logits (B, V) after the last of them, or (B, T, V) after
        each with `every_position`. Equal to a full forward pass over each row's tokens so far. Without gradients the
        layers run on the cache's weights (`set_step_weights`)."""
        start, T = cache.length, tokens.size(1)
        if start + T > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions; {start} are filled, {T} more do not fit")
        x = self.embed_tokens(tokens)  # (B, T, C)
        cos, sin = self.rotary.at(cache.positions(T)) if cache.padded else self.rotary(start, T, tokens.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once, not in every layer
        mask, causal = cache.attention_mask(T)
        if torch.is_grad_enabled():
            weights, output = [StepWeights()] * len(self.layers), None
        else:
            if cache.packed_from and sum(p._version for p in cache.packed_from) != cache.packed_version:
                self.set_step_weights(cache)  # the weights changed since they were packed
            weights, output = cache.layer_weights, cache.output_weight
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, causal, cache.layer(i), start, weights[i])
        cache.length += T
        h = self.norm(x if every_position else x[:, -1])  # (B, T, C) or (B, C)
        return self.output_layer(h) if output is None else kernels.linear(h, output)

    # ---- fairseq's decoder contract (training, fairseq's stock SequenceGenerator) ----------------
    def forward(self, prev_output_tokens: Tensor, src_lengths=None, encoder_out=None, incremental_state=None,
                features_only: bool = False, example_ids: Tensor | None = None, output_at: Tensor | None = None,
                **unused):
        """(logits or features (B, T, ·), extras), fairseq's way. `output_at` (N,) picks positions of the flattened
        (B * T) sequence: the result is theirs only, (N, ·), and the output layer runs nowhere else (training
        passes the loss positions). With `incremental_state` (fairseq's stock generator) the tokens not yet cached
        go through `step`, and the result covers those only."""
        if incremental_state is None:
            h = self.extract_features(prev_output_tokens, example_ids=example_ids)
            if output_at is not None:
                h = h.reshape(-1, h.size(-1)).index_select(0, output_at)
            return (h if features_only else self.output_layer(h)), {"attn": None}
        cache = self.get_incremental_state(incremental_state, "cache")
        n = prev_output_tokens.size(1)
        if cache is None:  # fairseq does not say how long generation runs: start small, double when full
            cache = self.new_cache(prev_output_tokens.size(0), min(max(64, 2 * n), self.max_positions()))
            self.set_incremental_state(incremental_state, "cache", cache)
        elif n > cache.capacity:
            cache.grow(min(max(2 * cache.capacity, n), self.max_positions()))
        return self.step(prev_output_tokens[:, cache.length:], cache, every_position=True), {"attn": None}

    def reorder_incremental_state(self, incremental_state: dict, new_order: Tensor):
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache is not None:
            cache.reorder(new_order)

    # ---- checkpoints ------------------------------------------------------------------------
    def upgrade_state_dict_named(self, state_dict, name):
        prefix = f"{name}." if name else ""
        check_checkpoint_fits(self, state_dict, prefix)
        return state_dict


class KVCache:
    """Keys and values of every layer for `batch` rows, preallocated for `capacity` tokens per row, so that a step
    writes its keys in place. Rows are left-padded (prompts of different lengths): row b holds its tokens in columns
    [pad[b], length), and every row's next token goes to column `length`. A cache belongs to the model as it was
    when `new_cache` made it: its fused weights (`fused_weight`) read the model's weights in place, and its packed
    copies are made again when the weights change, so training in between is seen, but a model moved to another
    dtype or device needs a new cache."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        # (L, B, Hkv, N, D): a layer's slice is the (B, Hkv, N, D) buffer attention writes into
        self.k = torch.empty(layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0  # columns filled
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) columns before each row's first token
        self.padded = False  # whether any row has padding (then steps need an attention mask)
        # the weights steps read without gradients, per layer and the output layer's (`set_step_weights`); the
        # Parameters packed copies were made from, and the sum of their versions then
        self.layer_weights: list[StepWeights] = [StepWeights()] * layers
        self.output_weight: Tensor | None = None
        self.packed_from: list[Tensor] = []
        self.packed_version = 0

    @property
    def batch(self) -> int:
        return self.k.size(1)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's key and value buffers, (B, Hkv, N, D) each."""
        return self.k[i], self.v[i]

    def positions(self, T: int) -> Tensor:
        """(B, T) positions of the next T tokens of each row, counted from its own first token."""
        columns = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (columns - self.pad.unsqueeze(1)).clamp(min=0)

    def attention_mask(self, T: int) -> tuple[Tensor | None, bool]:
        """(mask (B, 1, T, S) or None, causal) for T new tokens: each sees its row's tokens up to itself. Padding
        queries (a prompt's left padding) see only themselves, so that no row of the softmax is empty."""
        if not self.padded:
            if T == 1:
                return None, False  # one new token sees every cached one
            if self.length == 0:
                return None, True
        end = self.length + T
        columns = torch.arange(end, device=self.pad.device)  # (S,)
        query = torch.arange(self.length, end, device=self.pad.device).unsqueeze(1)  # (T, 1)
        first = torch.minimum(self.pad.view(-1, 1, 1), query)  # (B, T, 1): a padding query starts at itself
        return ((columns >= first) & (columns <= query)).unsqueeze(1), False  # (B, 1, T, S)

    def reorder(self, rows: Tensor) -> None:
        """Keep the rows `rows` names, in that order: beams reordered, finished rows dropped, a row repeated."""
        if len(rows) == self.batch and torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return
        n = self.length
        k, v = self.k, self.v
        if len(rows) > k.size(1):  # more rows than the buffers hold: new ones (in place the gather reads first)
            k = k.new_empty(k.size(0), len(rows), *k.shape[2:])
            v = torch.empty_like(k)
        k[:, :len(rows), :, :n] = self.k[:, rows, :, :n]
        v[:, :len(rows), :, :n] = self.v[:, rows, :, :n]
        self.k, self.v = k[:, :len(rows)], v[:, :len(rows)]
        self.set_padding(self.pad[rows])

    def set_padding(self, pad: Tensor) -> None:
        """Columns (B,) before each row's first token."""
        self.pad, self.padded = pad, bool(pad.any())

    def grow(self, capacity: int) -> None:
        """Hold at least `capacity` tokens per row (a conversation's next turn); copies what is cached."""
        if capacity <= self.capacity:
            return
        k = self.k.new_empty(*self.k.shape[:3], capacity, self.k.size(4))
        v = torch.empty_like(k)
        k[:, :, :, :self.length] = self.k[:, :, :, :self.length]
        v[:, :, :, :self.length] = self.v[:, :, :, :self.length]
        self.k, self.v = k, v


@register_model("speechgpt_llama", dataclass=SpeechGPTLlamaConfig)
class SpeechGPTLlamaModel(FairseqLanguageModel):
    """The LLaMA decoder as a fairseq language model, optionally with LoRA adapters (lora_rank > 0)."""

    @classmethod
    def build_model(cls, cfg, task):
        # under ddp_backend=fsdp2 each rank allocates only its shards (fsdp.py); LoRA models are built whole
        on_meta = fsdp.sharded_start() and not (cfg.lora_rank or cfg.lora_base)
        return cls.from_config(cfg, task.target_dictionary, on_meta=on_meta)

    def reset_parameters(self) -> None:
        self.decoder.reset_parameters()

    @classmethod
    def from_config(cls, cfg: SpeechGPTLlamaConfig, vocab: int | Dictionary, on_meta: bool = False
                    ) -> "SpeechGPTLlamaModel":
        """The model `cfg` describes over a vocabulary: its size, or a fairseq Dictionary, whose digest the model's
        checkpoints then carry (and loading checks). `on_meta`: left on the meta device, for a sharded start
        (fsdp.py shards it, then `reset_parameters` draws each rank's shards); not with LoRA."""
        if on_meta and (cfg.lora_rank or cfg.lora_base):
            raise ModelConfigError("a model with LoRA adapters is built whole, not on the meta device")
        validate_config(cfg)
        dictionary = None if isinstance(vocab, int) else vocab
        with torch.device("meta"):  # no memory, no draws: the weights are drawn once, by reset_parameters
            decoder = SpeechGPTLlamaDecoder(cfg, vocab if dictionary is None else len(dictionary), dictionary)
        if on_meta:
            return cls(decoder)
        device = torch.get_default_device()  # a caller's `with torch.device("meta")` keeps the model unallocated
        if device.type != "meta":
            decoder.to_empty(device=device)
            decoder.reset_parameters()
        if cfg.lora_base:
            base = load_base_weights(cfg.lora_base)
            try:
                check_checkpoint_fits(decoder, base, "decoder.")
            except ModelConfigError as e:
                raise ModelConfigError(f"lora_base {cfg.lora_base}: {e}") from None
            decoder.load_state_dict({k[len("decoder."):]: v for k, v in base.items() if k.startswith("decoder.")})
        if cfg.lora_rank:
            apply_lora(decoder, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        return cls(decoder)

    @property
    def adapter_only(self) -> bool:
        """Whether checkpoints hold only the LoRA weights (the frozen base is read from `lora_base`)."""
        return bool(self.decoder.cfg.lora_rank and self.decoder.cfg.lora_base)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.adapter_only:
            drop_base_weights(state)
        return state

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Also loads, into a LoRA model, an adapter-only state dict (the base stays the one read from lora_base)
        and a plain one (the adapters keep their initial values, so the model equals the loaded weights)."""
        if self.decoder.cfg.lora_rank:
            state_dict = lora_state_to_load(state_dict, super().state_dict(), self.adapter_only)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
