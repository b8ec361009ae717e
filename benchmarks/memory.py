"""Peak memory and training throughput with activation checkpointing and the chunked output-layer loss, on and off.

The model and batch have the shape of train_step.py (8 layers, width 512, vocabulary 33006, 4 x 1024 tokens).
One step is forward, our criterion (`speechgpt_cross_entropy`, per-modality metrics included), backward and
`AdamW.step`. The four settings are: neither (the anchor), `model.checkpoint_activations`,
`criterion.loss_chunk_tokens`, and both. Each runs in a fresh process. After one untimed step (which also
allocates AdamW's state) the peak is reset and the timed steps run: `peak` is then the process's peak memory
(on a CPU its peak resident set, VmHWM, the Python runtime included; on a GPU `torch.cuda.max_memory_allocated`)
and `step peak` is that minus the memory in use before the timed steps, i.e. what a training step needs on top
of the model and the optimizer state. All settings see the same weights and batch, so their first-step losses
must agree. Read `ratio` as the setting's value over the anchor's: below 1 for memory means it saves memory,
below 1 for tokens/s means it costs time (activation checkpointing recomputes each block; the chunked loss
recomputes nothing).

    python benchmarks/memory.py [--steps 2] [--device cpu] [--batch 4] [--seq 1024] [--chunk 1024] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = {"plain": (False, False), "checkpoint_activations": (True, False), "chunked_loss": (False, True),
            "both": (True, True)}


def worker(args) -> dict:
    """One setting, in this process: a few training steps; what it measured."""
    from speechgpt_fairseq.criterions.cross_entropy import SpeechGPTCrossEntropyCriterion
    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from train_step import VOCAB, Task, build_ours  # the shape of the training-step benchmark

    recompute, chunked = SETTINGS[args.setting]
    device = torch.device(args.device)
    vocab = Vocabulary.units_only(num_units=VOCAB - 3 - 6)
    task = Task(vocab)
    torch.manual_seed(args.seed)
    model = build_ours(task.target_dictionary, args.seq).to(device).train()
    model.decoder.cfg.checkpoint_activations = recompute
    criterion = SpeechGPTCrossEntropyCriterion(task, loss_chunk_tokens=args.chunk if chunked else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(task.target_dictionary.nspecial, VOCAB, (args.batch, args.seq + 1), device=device)
    sample = {"net_input": {"src_tokens": batch[:, :-1]}, "target": batch[:, 1:],
              "ntokens": batch[:, 1:].numel(), "nsentences": args.batch}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> float:
        with autocast:
            loss, ntokens, _ = criterion(model, sample)
        (loss / ntokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item() / ntokens

    first_loss, times = step(), []
    reset_peak(device)
    before = memory(device)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_memory(device)
    return {"setting": args.setting, "peak_mb": peak, "step_peak_mb": peak - before, "first_loss": first_loss,
            "tokens_per_s": sample["ntokens"] / statistics.median(times)}


def memory(device: torch.device) -> float:
    """MB in use now: allocated on the GPU, resident (VmRSS) on a CPU."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _proc_status_mb("VmRSS")


def peak_memory(device: torch.device) -> float:
    """MB at the peak since `reset_peak`."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _proc_status_mb("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS to the current RSS
            f.write("5")


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) / 2**10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting, after one untimed step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--chunk", type=int, default=1024, help="criterion.loss_chunk_tokens when the chunked loss is on")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as a bf16 training run")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the token batch")
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # a worker process: one setting
    args = p.parse_args()
    if args.setting:
        print(json.dumps(worker(args)))
        return

    from train_step import DIM, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, machine

    print(f"machine: {machine(torch.device(args.device))} ({args.device}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"shape: {LAYERS} layers, width {DIM}, ffn {FFN}, {HEADS} heads, {KV_HEADS} kv heads, vocab {VOCAB}, "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, chunk {args.chunk} tokens; 1 untimed + {args.steps} timed steps")
    measured = {}
    for setting in SETTINGS:
        cmd = [sys.executable, __file__, "--setting", setting, "--steps", str(args.steps), "--device", args.device,
               "--batch", str(args.batch), "--seq", str(args.seq), "--chunk", str(args.chunk), "--seed",
               str(args.seed), *(["--bf16"] if args.bf16 else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        measured[setting] = m = json.loads(out.strip().splitlines()[-1])
        print(f"{setting:>22}: peak {m['peak_mb']:8,.0f} MB (step peak {m['step_peak_mb']:8,.0f} MB), "
              f"{m['tokens_per_s']:8,.0f} tokens/s, first-step loss {m['first_loss']:.4f}")
    anchor = measured["plain"]
    for setting, m in measured.items():
        if setting != "plain":
            print(f"ratio {setting}/plain: step peak {m['step_peak_mb'] / anchor['step_peak_mb']:.3f}, "
                  f"tokens/s {m['tokens_per_s'] / anchor['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
