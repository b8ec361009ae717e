"""Generation throughput: our incremental decoding against Hugging Face's `LlamaForCausalLM.generate`, same weights.

Ours is the path fairseq-generate takes with our tasks: `PromptPrefillGenerator` (fairseq's SequenceGenerator, the
prompt run in one forward pass, our key/value cache), greedy (beam 1). HF's is `generate` with greedy search,
`use_cache=True` and sdpa attention. Both continue the same random prompts (`<s>` + --prompt-len tokens) by
exactly --new-tokens tokens: HF with min_new_tokens = max_new_tokens, ours with fairseq's min_len and length limit
both at the prompt length + --new-tokens (fairseq then ends each hypothesis with `</s>`, one step more than HF),
and the script prints the count each side produced. Greedy on the same weights should give the same tokens; HF
is told never to pick pad, as fairseq's generator never does. The script prints whether they match, and for a row
that diverges, where, and the gap there between the two picks' logits (from a full forward of our model on HF's
tokens). fairseq's beam search, beam 1 included, ranks by the running fp32 sum of log-probs, whose rounding (about
5e-4 at a sum of -4000, what a random model reaches after 400 tokens) can flip a near-tie that argmax would not;
`--search topk1` (fairseq's sampling from the top token only, `--sampling --sampling-topk 1`) is an exact argmax.

Runs are timed alternately (ours, HF, HF, ours, ...), as in train_step.py, and the median is reported as new
tokens per second over the whole call (prompt included). Read `ratio ours/HF: Z` as our tokens/s over HF's:
above 1 ours is faster. On a busy CPU the wall times swing (see the ranges) and with several threads so do the
CPU seconds; `--threads 1` makes the CPU seconds per call (ratio HF/ours, again above 1 = ours faster) a steady guide.

    python benchmarks/generate.py [--new-tokens 512] [--prompt-len 32] [--batches 1,8] [--repeats 3] [--device cpu]
                                  [--threads N] [--search beam|topk1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from fairseq import search
from speechgpt_fairseq.data.prompts import EOA
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import PromptPrefillGenerator
# the same model shape, builders and machine line as the training-step benchmark (this script's directory is on
# sys.path when it runs, from any working directory)
from train_step import DIM, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, build_hf, build_ours, machine


def ours_runner(model, prompts: torch.Tensor, new_tokens: int, stop_text: str | None, strategy: str):
    """One greedy generation as fairseq-generate runs it -> the new tokens of each row."""
    d = model.decoder.dictionary
    P = prompts.size(1)
    topk1 = search.Sampling(d, sampling_topk=1) if strategy == "topk1" else None
    # steps 0..P-1 force the prompt; </s> is barred before step P + new_tokens and the only choice at it
    gen = PromptPrefillGenerator([model], d, stop_text=stop_text, beam_size=1, max_len_a=0,
                                 max_len_b=P + new_tokens, min_len=P + new_tokens, search_strategy=topk1)
    src = torch.cat([prompts.new_full((prompts.size(0), 1), d.bos()), prompts], 1)
    sample = {"id": torch.arange(prompts.size(0)),
              "net_input": {"src_tokens": src, "src_lengths": torch.full((prompts.size(0),), src.size(1))}}

    def run() -> list[torch.Tensor]:
        hypos = gen.generate([model], sample, prefix_tokens=prompts, bos_token=d.bos())
        out = []
        for beams in hypos:
            t = beams[0]["tokens"][P:]
            out.append(t[:-1] if len(t) and t[-1] == d.eos() else t)
        return out
    return run


def hf_runner(hf, d, prompts: torch.Tensor, new_tokens: int):
    d_bos, d_pad, d_eos = d.bos(), d.pad(), d.eos()
    ids = torch.cat([prompts.new_full((prompts.size(0), 1), d_bos), prompts], 1)
    mask = torch.ones_like(ids)

    def run() -> list[torch.Tensor]:
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=d_eos,
                          pad_token_id=d_pad, bos_token_id=d_bos, suppress_tokens=[d_pad])
        return list(out[:, ids.size(1):])
    return run


def timed(run, sync):
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


@torch.no_grad()
def compare(model, prompts: torch.Tensor, ours: list[torch.Tensor], hf: list[torch.Tensor]) -> str:
    """Whether both produced the same tokens; else, per differing row, the first difference and the logit gap
    there (HF's pick over ours, by our model run on HF's tokens without a cache)."""
    diffs = []
    for row, (a, b) in enumerate(zip(ours, hf)):
        n = min(len(a), len(b))
        where = (a[:n] != b[:n]).nonzero()
        if len(where):
            k = int(where[0])
            seq = torch.cat([prompts.new_tensor([model.decoder.dictionary.bos()]), prompts[row], b[:k]])
            logits = model(seq[None])[0][0, -1]
            diffs.append(f"row {row} at new token {k} (gap {(logits[b[k]] - logits[a[k]]).item():.1e})")
        elif len(a) != len(b):
            diffs.append(f"row {row} in length")
    if not diffs:
        return "yes, all rows"
    return f"no, {len(diffs)} of {len(ours)} rows differ: " + "; ".join(diffs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=512, help="tokens each row generates (forced on both sides)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens after <s>")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per side and batch size")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per side and batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--stop-text", default=EOA, help="our generator's stop text, as the instruction tasks set it "
                                                    "(never met here); empty: none")
    p.add_argument("--search", choices=("beam", "topk1"), default="beam",
                   help="ours: beam search with beam 1 (--beam 1) or sampling from the top token (--sampling-topk 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    print(f"machine: {machine(device)} ({args.device}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    vocab = Vocabulary.units_only(num_units=VOCAB - 3 - 6).to_dictionary()
    assert len(vocab) == VOCAB, len(vocab)
    seq = args.prompt_len + args.new_tokens + 2
    torch.manual_seed(args.seed)
    ours = build_ours(vocab, seq).to(device).eval()
    hf = build_hf(ours, seq).to(device).eval()
    print(f"shape: {LAYERS} layers, width {DIM}, ffn {FFN}, {HEADS} heads, {KV_HEADS} kv heads, vocab {VOCAB}, fp32; "
          f"prompt <s> + {args.prompt_len}, {args.new_tokens} new tokens, greedy; warmup {args.warmup}, "
          f"repeats {args.repeats}; ours: search {args.search}, beam 1, stop text {args.stop_text!r}")

    for B in batches:
        prompts = torch.randint(vocab.nspecial, VOCAB, (B, args.prompt_len), device=device)
        runs = {"ours": ours_runner(ours, prompts, args.new_tokens, args.stop_text or None, args.search),
                "HF": hf_runner(hf, vocab, prompts, args.new_tokens)}
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
        print(f"batch {B}  new tokens per row  ours: {counts['ours']}  HF: {counts['HF']}; "
              f"same tokens: {compare(ours, prompts, outs['ours'], outs['HF'])}")
        rate = {n: B * args.new_tokens / statistics.median(t) for n, t in times.items()}
        print(f"batch {B}  " + "  ".join(f"{n}: {rate[n]:,.1f} tok/s (median {statistics.median(t):.2f} s, "
                                         f"range {min(t):.2f}-{max(t):.2f})" for n, t in times.items()))
        print(f"batch {B}  ratio ours/HF: {rate['ours'] / rate['HF']:.3f}")
        if device.type == "cpu":
            c = {n: statistics.median(t) for n, t in cpu.items()}
            print(f"batch {B}  CPU s/call  ours: {c['ours']:.2f}  HF: {c['HF']:.2f}  "
                  f"CPU-time ratio HF/ours: {c['HF'] / c['ours']:.3f}")


if __name__ == "__main__":
    main()
