"""Generation throughput: our prefill + KV-cache steps against Hugging Face's `LlamaForCausalLM.generate`, same weights.

Ours is the code fairseq-generate, the Python API and chat run (`models/generation.py`: the prompts prefilled in one
pass, then one token per row per step into a preallocated cache), greedy, with the instruction tasks' stop text.
HF's is `generate` with greedy search, `use_cache=True` and sdpa attention. Both continue the same random prompts
(`<s>` + --prompt-len tokens) by exactly N new tokens (min = max new tokens on both sides; HF is told never to pick
pad, as ours never does), in each dtype (the weights cast, no autocast). The script prints whether both produced
the same tokens, and for a row that diverges, where, and the gap there between the two picks' logits (from a full
forward of our model on HF's tokens).

Runs are timed alternately (ours, HF, HF, ours, ...) and the median is reported as new tokens per second over the
whole call (prompt included). Read `ratio ours/HF: Z` as our tokens/s over HF's: above 1 ours is faster. On a busy
CPU the wall times swing (see the ranges); `--threads 1` makes them steadier, and the CPU seconds per call (ratio
HF/ours, again above 1 = ours faster) are printed too. `--profile` prints, per side, where one call's time goes
(torch.profiler's operators, then the time outside them: Python).

    python benchmarks/generate.py [--new-tokens 128,512] [--batches 1,8] [--dtypes fp32,bf16] [--prompt-len 32]
                                  [--repeats 3] [--device cpu] [--threads N] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers
from speechgpt_fairseq.data.prompts import EOA
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import Decoding, Endings, generate
# the same model shape, builders and machine line as the training-step benchmark (this script's directory is on
# sys.path when it runs, from any working directory)
from train_step import DIM, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, build_hf, build_ours, machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours_runner(model, dictionary, prompts: torch.Tensor, new_tokens: int, stop_text: str | None):
    """One greedy generation as fairseq-generate, the API and chat run it -> the new tokens of each row."""
    endings = Endings.of(dictionary, stop_text)
    rows = [torch.cat([prompts.new_tensor([dictionary.bos()]), p]) for p in prompts]

    def run() -> list[torch.Tensor]:
        hypos = generate(model.decoder, rows, endings, Decoding(), new_tokens, min_new_tokens=new_tokens)
        return [torch.tensor(beams[0].tokens[:-1]) for beams in hypos]  # the closing </s> dropped
    return run


def hf_runner(hf, dictionary, prompts: torch.Tensor, new_tokens: int):
    bos, pad, eos = dictionary.bos(), dictionary.pad(), dictionary.eos()
    ids = torch.cat([prompts.new_full((prompts.size(0), 1), bos), prompts], 1)
    mask = torch.ones_like(ids)

    def run() -> list[torch.Tensor]:
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos,
                          pad_token_id=pad, bos_token_id=bos, suppress_tokens=[pad])
        return list(out[:, ids.size(1):].cpu())
    return run


def timed(run, sync):
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = run()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


@torch.no_grad()
def compare(model, prompts: torch.Tensor, bos: int, ours: list[torch.Tensor], hf: list[torch.Tensor]) -> str:
    """Whether both produced the same tokens; else, per differing row, the first difference and the logit gap
    there (HF's pick over ours, by our model run on HF's tokens without a cache)."""
    diffs = []
    for row, (a, b) in enumerate(zip(ours, hf)):
        n = min(len(a), len(b))
        where = (a[:n] != b[:n].to(a.device)).nonzero()
        if len(where):
            k = int(where[0])
            seq = torch.cat([prompts.new_tensor([bos]), prompts[row], b[:k].to(prompts.device)])
            logits = model(seq[None])[0][0, -1].float()
            diffs.append(f"row {row} at new token {k} (gap {(logits[b[k]] - logits[a[k]]).item():.1e})")
        elif len(a) != len(b):
            diffs.append(f"row {row} in length")
    if not diffs:
        return "yes, all rows"
    return f"no, {len(diffs)} of {len(ours)} rows differ: " + "; ".join(diffs)


def profile(name: str, run) -> None:
    """Where one call's time goes: the operators that take most of it, and the time outside any operator."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"  {name}: {wall:.2f} s under the profiler, {in_ops:.2f} s in operators (self time), "
          f"{max(wall - in_ops, 0):.2f} s outside them")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.key:40s} {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:6d} calls")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", default="128,512", help="comma-separated: tokens each row generates (forced)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens after <s>")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (the weights cast)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per side and setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per side and setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--stop-text", default=EOA, help="our stop text, as the instruction tasks set it (never met "
                                                    "here); empty: none")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--profile", action="store_true", help="also profile one call per side and setting")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    lengths = [int(n) for n in args.new_tokens.split(",")]

    print(f"machine: {machine(device)} ({args.device}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    dictionary = Vocabulary.units_only(num_units=VOCAB - 3 - 6).to_dictionary()
    assert len(dictionary) == VOCAB, len(dictionary)
    seq = args.prompt_len + max(lengths) + 2
    torch.manual_seed(args.seed)
    fp32 = build_ours(dictionary, seq).eval()
    hf32 = build_hf(fp32, seq).eval()
    print(f"shape: {LAYERS} layers, width {DIM}, ffn {FFN}, {HEADS} heads, {KV_HEADS} kv heads, vocab {VOCAB}; "
          f"prompt <s> + {args.prompt_len}; greedy; warmup {args.warmup}, repeats {args.repeats}; "
          f"our stop text {args.stop_text!r}")

    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        ours, hf = copy.deepcopy(fp32).to(device, dtype), copy.deepcopy(hf32).to(device, dtype)
        # as from_pretrained(dtype=...) gives it: the rotary frequencies stay fp32 (.to() would round them)
        hf.model.rotary_emb.inv_freq = hf32.model.rotary_emb.inv_freq.to(device)
        for new_tokens in lengths:
            for B in (int(b) for b in args.batches.split(",")):
                setting = f"{dtype_name} batch {B} new {new_tokens}"
                prompts = torch.randint(dictionary.nspecial, VOCAB, (B, args.prompt_len), device=device)
                runs = {"ours": ours_runner(ours, dictionary, prompts, new_tokens, args.stop_text or None),
                        "HF": hf_runner(hf, dictionary, prompts, new_tokens)}
                times, cpu, outs = {n: [] for n in runs}, {n: [] for n in runs}, {}
                for i in range(args.warmup + args.repeats):
                    # interleaved, the order flipped every repetition (ours, HF, HF, ours, ...)
                    for name, run in (list(runs.items()) if (i - args.warmup) % 2 == 0 else reversed(runs.items())):
                        dt, dc, out = timed(run, sync)
                        outs.setdefault(name, out)
                        if i >= args.warmup:
                            times[name].append(dt)
                            cpu[name].append(dc)
                counts = {n: sorted({len(t) for t in o}) for n, o in outs.items()}
                same = compare(ours, prompts, dictionary.bos(), outs["ours"], outs["HF"])
                rate = {n: B * new_tokens / statistics.median(t) for n, t in times.items()}
                print(f"{setting}  new tokens per row  ours: {counts['ours']}  HF: {counts['HF']}; same tokens: {same}")
                print(f"{setting}  " + "  ".join(
                    f"{n}: {rate[n]:,.1f} tok/s (median {statistics.median(t):.2f} s, range {min(t):.2f}-{max(t):.2f})"
                    for n, t in times.items()))
                line = f"{setting}  ratio ours/HF: {rate['ours'] / rate['HF']:.3f}"
                if device.type == "cpu":
                    c = {n: statistics.median(t) for n, t in cpu.items()}
                    line += f"  (CPU s/call ours {c['ours']:.2f}, HF {c['HF']:.2f}: HF/ours {c['HF'] / c['ours']:.3f})"
                print(line, flush=True)
                if args.profile:
                    for name, run in runs.items():
                        profile(f"{setting} {name}", run)


if __name__ == "__main__":
    main()
