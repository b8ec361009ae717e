"""Training-step throughput of our LLaMA against Hugging Face's `LlamaForCausalLM`, same shape, same batch.

One step is forward, next-token cross-entropy (mean over tokens), backward, `AdamW.step` and `zero_grad`.
Both models hold the same weights and see the same random batch; their steps are timed alternately
(ours, HF, HF, ours, ...) so that drift on a shared machine and the order within a pair hit both alike, and
the median step time is reported as tokens per second, in fp32 and under bf16 autocast.

Read `ratio ours/HF: Z` as our tokens/s over HF's: above 1 ours is faster, below 1 slower. On a busy machine
a few steps can land in a burst of other load; then the s/step ranges are wide and the median ratio swings.
On a CPU the process's CPU seconds per step hardly change under such load: their ratio (HF's over ours,
so again above 1 means ours is faster) is the steadier guide there.

    python benchmarks/train_step.py [--steps 4] [--warmup 2] [--device cpu] [--modes fp32,bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import speechgpt_fairseq

speechgpt_fairseq.register()
import torch
import torch.nn.functional as F
import transformers
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

VOCAB = 33006  # 3 base tokens + units + 6 SpeechGPT tokens
DIM, LAYERS, HEADS, KV_HEADS = 512, 8, 8, 2
# LLaMA's SwiGLU width: 2/3 * 4 * dim = 1365, rounded up to a multiple of 128 -> 1408
FFN = 128 * -(-int(2 * 4 * DIM / 3) // 128)


def build_ours(vocab, seq: int) -> SpeechGPTLlamaModel:
    cfg = SpeechGPTLlamaConfig(decoder_layers=LAYERS, decoder_embed_dim=DIM, decoder_ffn_embed_dim=FFN,
                               decoder_attention_heads=HEADS, decoder_kv_heads=KV_HEADS,
                               max_target_positions=max(seq, 1024), share_decoder_input_output_embed=False)
    return SpeechGPTLlamaModel.from_config(cfg, vocab)


def build_hf(ours: SpeechGPTLlamaModel, seq: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, max_position_embeddings=max(seq, 1024),
                                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg)
    # same submodule names: the weight map is a prefix
    state = {(k if k.startswith("lm_head") else "model." + k): v
             for k, v in ours.decoder.state_dict().items() if k != "vocab_digest"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def loss_fn(logits: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    # our criterion's loss, divided by the token count. HF gets the same function on its logits rather than
    # its `labels=` loss (also an fp32 upcast + cross-entropy), so both sides do identical loss work.
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                           ignore_index=pad, reduction="sum")
    return loss / target.ne(pad).sum()


def make_step(model, forward, opt, tokens, target, pad, autocast, sync):
    def step() -> tuple[float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast():
            loss = loss_fn(forward(model, tokens), target, pad)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, loss.item()
    return step


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and mode (even: balances the order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the token batch")
    args = p.parse_args()
    modes = args.modes.split(",")
    if bad := set(modes) - {"fp32", "bf16"}:
        p.error(f"unknown mode(s) {sorted(bad)} in --modes; expected fp32 and/or bf16")
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    print(f"machine: {machine(device)} ({args.device}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    vocab = Vocabulary.units_only(num_units=VOCAB - 3 - 6).to_dictionary()
    assert len(vocab) == VOCAB, len(vocab)
    pad = vocab.pad()
    torch.manual_seed(args.seed)
    batch = torch.randint(vocab.nspecial, VOCAB, (args.batch, args.seq + 1), device=device)  # no pad tokens
    tokens, target = batch[:, :-1], batch[:, 1:]
    ntok = target.ne(pad).sum().item()
    print(f"shape: {LAYERS} layers, width {DIM}, ffn {FFN}, {HEADS} heads, {KV_HEADS} kv heads, vocab {VOCAB}, "
          f"batch {args.batch} x seq {args.seq} = {ntok} tokens/step; warmup {args.warmup}, steps {args.steps}")

    for mode in modes:
        # fresh models per mode, so AdamW state and weights start equal on both sides
        torch.manual_seed(args.seed)
        ours = build_ours(vocab, args.seq).to(device).train()
        hf = build_hf(ours, args.seq).to(device).train()
        n_ours, n_hf = (sum(q.numel() for q in m.parameters()) for m in (ours, hf))
        print(f"{mode}  parameters  ours: {n_ours:,}  HF: {n_hf:,}")
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode == "bf16"
                    else contextlib.nullcontext)
        steps = {
            "ours": make_step(ours, lambda m, x: m(x)[0], torch.optim.AdamW(ours.parameters(), lr=1e-4),
                              tokens, target, pad, autocast, sync),
            "HF": make_step(hf, lambda m, x: m(input_ids=x, use_cache=False).logits,
                            torch.optim.AdamW(hf.parameters(), lr=1e-4), tokens, target, pad, autocast, sync),
        }
        times, cpu = {name: [] for name in steps}, {name: [] for name in steps}
        losses = {}
        for i in range(args.warmup + args.steps):
            # interleaved, the order flipped every repetition (ours, HF, HF, ours, ...): the step that runs first
            # in a pair measured a few percent slower here, whichever model it was
            for name, step in (list(steps.items()) if (i - args.warmup) % 2 == 0 else reversed(steps.items())):
                dt, dc, loss = step()
                losses.setdefault(name, loss)  # first step: same weights, same batch -> same loss
                if i >= args.warmup:
                    times[name].append(dt)
                    cpu[name].append(dc)
        rate = {name: ntok / statistics.median(t) for name, t in times.items()}
        print(f"{mode}  first-step loss  ours: {losses['ours']:.4f}  HF: {losses['HF']:.4f}")
        # the s/step range shows how noisy the machine was: a wide one calls for more --steps
        print(f"{mode}  " + "  ".join(f"{name}: {rate[name]:,.0f} tok/s (median {statistics.median(t):.2f} s/step, "
                                      f"range {min(t):.2f}-{max(t):.2f})" for name, t in times.items()))
        print(f"ratio ours/HF: {rate['ours'] / rate['HF']:.3f}")
        if device.type == "cpu":
            c = {name: statistics.median(t) for name, t in cpu.items()}
            print(f"{mode}  CPU s/step  ours: {c['ours']:.2f}  HF: {c['HF']:.2f}  "
                  f"CPU-time ratio HF/ours: {c['HF'] / c['ours']:.3f}")
        del ours, hf, steps


if __name__ == "__main__":
    main()
