"""Model FLOPs utilization (MFU) of a LLaMA-7B-shaped stack computing in bf16: our decoder against HF
`LlamaForCausalLM`.

One training step is forward, next-token cross-entropy (fp32 upcast of the logits, as in train_step.py),
backward and AdamW (`models/kernels.py`'s choice: apex FusedAdam, else torch fused). `--precision` picks how:
- `mixed` (the default): what the paper configs train with (`ddp_backend=fsdp2`, `common.bf16=true`): fp32
  weights, gradients and AdamW state, every block computing in bf16 under FSDP2's mixed-precision policy
  (fsdp.precision_policy), applied the same way to both models. It runs in one process (a process group of one:
  nothing is sharded, the per-block casts are those of a sharded run). 16 bytes per parameter: 7B (108 GB) needs
  a 141 GB H200; on an 80 GB GPU use `--layers 16` (MFU per block is what is compared).
- `bf16`: weights, gradients and optimizer state in bf16, 8 bytes per parameter (the whole 7B fits 80 GB); a
  ceiling, not a configuration anyone should train with (bf16 AdamW updates lose small steps).
The shape is the `llama_7b` preset (32 blocks, width 4096, SwiGLU 11008, 32 heads) with SpeechGPT's 33006-token
vocabulary, sequences of 2048 tokens.

    FLOPs per token = 6 N + 12 L d T

N is the parameter count without the input embedding (a lookup; the output layer is counted), L the blocks,
d the width, T the sequence length (the attention score and value products). MFU = tokens/s x FLOPs per token /
the GPU's peak dense bf16 FLOPs (A100 312 TFLOPs, H100 SXM and H200 989, H100 PCIe 756; `--peak-tflops` for
others). Anchors: 57% for a 7B model on A100s (IBM's FSDP stack), 36-41% on H100s (torchtitan, bf16). Both
models hold the same weights and see the same batch, so their first-step losses must agree.
`ratio ours/HF` is our tokens/s over HF's.

Without a CUDA GPU the script says so and exits 0; `--cpu-smoke` runs a two-block toy shape on the CPU to check
the code path (no MFU there: no peak to divide by).

    python benchmarks/gpu_mfu.py [--precision mixed|bf16] [--layers 32] [--batch 1] [--seq 2048] [--steps 5]
                                 [--checkpoint-activations]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import statistics
import time
from pathlib import Path

import speechgpt_fairseq

speechgpt_fairseq.register()
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
import yaml
from speechgpt_fairseq import fsdp
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models import kernels
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel
from train_step import VOCAB, machine

PRESET = Path(speechgpt_fairseq.__file__).parent / "presets" / "model" / "llama_7b.yaml"
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("A100", 312), ("L40S", 362)]  # dense, no sparsity; first match of the device name wins


def loss_fn(logits: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    """The summed cross-entropy in fp32 over the non-pad targets, divided by their count: the same loss work on
    both sides (HF's `labels=` loss is also an fp32 upcast and a cross-entropy)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                           ignore_index=pad, reduction="sum")
    return loss / target.ne(pad).sum()


def peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def shape(args) -> SpeechGPTLlamaConfig:
    fields = {k: v for k, v in yaml.safe_load(PRESET.read_text()).items() if k != "_name"}
    if args.cpu_smoke:
        fields.update(decoder_embed_dim=256, decoder_ffn_embed_dim=688, decoder_attention_heads=4,
                      decoder_kv_heads=4)
    fields.update(decoder_layers=args.layers, max_target_positions=max(args.seq, 2048),
                  checkpoint_activations=args.checkpoint_activations)
    return SpeechGPTLlamaConfig(**fields)


def build_hf(cfg: SpeechGPTLlamaConfig) -> transformers.LlamaForCausalLM:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.decoder_embed_dim, intermediate_size=cfg.decoder_ffn_embed_dim,
        num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_attention_heads,
        num_key_value_heads=cfg.decoder_kv_heads or cfg.decoder_attention_heads,
        max_position_embeddings=cfg.max_target_positions, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    if cfg.checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def flops_per_token(model: torch.nn.Module, embedding: torch.nn.Module, cfg: SpeechGPTLlamaConfig, seq: int) -> float:
    n = sum(p.numel() for p in model.parameters()) - embedding.weight.numel()
    return 6 * n + 12 * cfg.decoder_layers * cfg.decoder_embed_dim * seq


def measure(name, model, forward, batch, pad, args, device, sync) -> dict:
    """Warm-up and timed training steps of one model; tokens/s (median step), peak memory, first-step loss."""
    optimizer = kernels.adamw(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    tokens, target = batch[:, :-1], batch[:, 1:]
    times, first_loss = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(forward(model, tokens), target, pad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if first_loss is None:
            first_loss = loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    return {"name": name, "tokens_per_s": target.numel() / statistics.median(times), "first_loss": first_loss,
            "peak_gb": peak_gb, "range": (min(times), max(times))}


def report(m: dict, flops: float, peak: float | None) -> None:
    achieved = m["tokens_per_s"] * flops / 1e12
    mfu = f"MFU {100 * achieved / peak:.1f}%" if peak else "MFU n/a (no peak FLOPs for this device)"
    print(f"{m['name']:>5}: {m['tokens_per_s']:,.0f} tokens/s (step {m['range'][0]:.3f}-{m['range'][1]:.3f} s), "
          f"{achieved:.1f} TFLOPs, {mfu}, peak memory {m['peak_gb']:.1f} GB, first-step loss {m['first_loss']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (LLaMA-7B: 32)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward, both models")
    p.add_argument("--precision", choices=("mixed", "bf16"), default="mixed",
                   help="mixed: fp32 weights and AdamW, bf16 compute per block (fsdp2's policy); bf16: all in bf16")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOPs, where not in the table")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ...")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: a two-block toy shape on the CPU (no MFU)")
    args = p.parse_args()
    if args.cpu_smoke:
        args.device, args.layers, args.seq, args.steps, args.warmup = "cpu", min(args.layers, 2), min(args.seq, 64), 1, 1
    elif not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}): nothing to measure. Run this on a GPU machine; "
              f"--cpu-smoke checks the code path on the CPU.")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the kernels' choices (attention backend...)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    name = machine(device)
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    cfg = shape(args)
    vocab = Vocabulary.units_only(num_units=VOCAB - 3 - 6).to_dictionary()
    torch.manual_seed(0)
    batch = torch.randint(vocab.nspecial, VOCAB, (args.batch, args.seq + 1), device=device)

    results, saved = [], None
    weights = torch.float32 if args.precision == "mixed" else torch.bfloat16
    if args.precision == "mixed":  # FSDP2 over a group of one process: its per-block bf16 casts, nothing sharded
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
    with torch.device(device), _default_dtype(weights):
        ours = SpeechGPTLlamaModel.from_config(cfg, vocab).train()
    flops = flops_per_token(ours, ours.decoder.embed_tokens, cfg, args.seq)
    print(f"machine: {name} ({args.device}), peak bf16 {peak or 'unknown'} TFLOPs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"shape: {cfg.decoder_layers} layers, width {cfg.decoder_embed_dim}, ffn {cfg.decoder_ffn_embed_dim}, "
          f"{cfg.decoder_attention_heads} heads, vocab {VOCAB}, batch {args.batch} x seq {args.seq}; "
          f"{sum(p.numel() for p in ours.parameters()):,} parameters; {flops / 1e9:.2f} GFLOPs/token; "
          f"activation checkpointing {'on' if args.checkpoint_activations else 'off'}; precision {args.precision} "
          f"({'fp32 weights and AdamW, bf16 compute per block' if args.precision == 'mixed' else 'all bf16'}); "
          f"warmup {args.warmup}, steps {args.steps}")
    try:
        # the weights go to the CPU between the two models: one 7B model with its state at a time on the GPU
        saved = {k: v.to("cpu", copy=True) for k, v in ours.decoder.state_dict().items() if k != "vocab_digest"}
        if args.precision == "mixed":
            ours = fsdp.shard(ours, dist.group.WORLD, device, bf16=True)
        results.append(measure("ours", ours, lambda m, x: m(x)[0], batch, vocab.pad(), args, device, sync))
        del ours
        _free(device)
        with torch.device(device), _default_dtype(weights):
            hf = build_hf(cfg).train()
        hf.load_state_dict({(k if k.startswith("lm_head") else "model." + k): v for k, v in saved.items()})
        del saved
        if args.precision == "mixed":
            mixed_precision(hf, hf.model.layers, device)
        results.append(measure("HF", hf, lambda m, x: m(input_ids=x, use_cache=False).logits, batch, vocab.pad(),
                               args, device, sync))
    except torch.OutOfMemoryError:
        print(f"out of memory after {[r['name'] for r in results]}: try fewer --layers, a smaller --batch or "
              f"--checkpoint-activations")
        return
    for m in results:
        report(m, flops, peak)
    print(f"ratio ours/HF: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.3f}")


def mixed_precision(model: torch.nn.Module, blocks, device: torch.device) -> None:
    """FSDP2's bf16 policy on each block and the root, as fsdp.shard applies it to ours."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh, policy = DeviceMesh.from_group(dist.group.WORLD, device.type), fsdp.precision_policy(bf16=True)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
