"""Unit extraction throughput and memory: `speechgpt speech2unit` against fairseq's examples/hubert/simple_kmeans.

Both sides turn the same espeak-ng speech (16 kHz mono wavs of several lengths, one fairseq manifest) into
k-means labels of HuBERT layer --layer, with the same random HuBERT-base-sized checkpoint (12 layers, width 768,
saved as a real fairseq checkpoint) and the same k-means model (1000 clusters, a plain joblib MiniBatchKMeans as
fairseq's learn_kmeans and SpeechGPT's km1000.bin are):

- ours: `speechgpt speech2unit MANIFEST --hubert CKPT --layer L --kmeans KM --out DIR` (files batched by length,
  labels written window by window, features never kept);
- fairseq: dump_hubert_feature.py's main (HubertFeatureReader file by file, features appended to a .npy on disk)
  then dump_km_label.py's dump_label (ApplyKmeans over the memory-mapped features), as the recipe runs them.

Each side runs in a process of its own, timed from after its imports to its last label written (loading the
checkpoint included), with the allocator as users have it. Memory is measured in runs of its own: the peak
resident memory (ru_maxrss) with glibc's mmap threshold fixed at 128 KiB in both (MALLOC_MMAP_THRESHOLD_), so that
freed tensors leave the RSS and the peak follows live memory rather than heap growth, once on the corpus and once
on the corpus listed twice: a peak that stays put when the corpus doubles is memory that does not grow with it.
(Timed under that threshold, every large tensor is a fresh mapping whose pages the kernel zeroes: both sides
slow down, by different amounts.) Ours holds one window of audio and one batch at a time, so its peak can grow
only until its batches are full (`--max-batch-samples`; speech2unit's default is one file per pass on a CPU and
100 s of audio on a GPU). Timed runs alternate (ours, fairseq, fairseq, ours, ...). `ratio ours/fairseq: Z` is our audio seconds per wall second over fairseq's:
above 1 ours is faster. On a shared CPU wall times swing with other load; the CPU-seconds ratio (fairseq's over
ours, again above 1 = ours faster) is the steadier guide there. The script also compares the labels: the lines
that are identical and the share of labels equal to fairseq's fp32 ones. `--bf16` runs our side with
`speech2unit --bf16` (HuBERT under bfloat16 autocast): faster where the CPU has bf16 instructions, and then the
share of equal labels says what that costs (features near a boundary between two clusters change sides).

fairseq's recipe needs npy-append-array (`pip install npy-append-array`); without torchaudio, its audio reader is
given soundfile's samples (what it returns for 16 kHz mono files); without CUDA, its `.cuda()` calls are no-ops.

    python benchmarks/speech2unit.py [--seconds 90] [--layers 12] [--dim 768] [--layer 11] [--repeats 2]
                                     [--device cpu] [--threads N] [--max-batch-samples N] [--bf16]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
import soundfile as sf
import torch
from sklearn.cluster import MiniBatchKMeans
from speechgpt_fairseq.speech.speech2unit import MAX_BATCH_SAMPLES
from train_step import machine  # this script's directory is on sys.path when it runs

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog near the river bank",
    "please call stella and ask her to bring these things with her from the store",
    "six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother bob",
    "we also need a small plastic snake and a big toy frog for the kids",
    "she can scoop these things into three red bags, and we will go meet her wednesday at the train station",
]
VOICES = ["en-us", "en", "en+f3", "en+m3"]
LENGTHS = [3, 6, 10, 15, 22]  # target seconds per file, cycled


def conftest():
    """tests/conftest.py: the HuBERT checkpoint writer and the fairseq-recipe patches the tests use."""
    spec = importlib.util.spec_from_file_location("speechgpt_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_corpus(root: Path, seconds: float) -> list[float]:
    """16 kHz mono wavs of spoken English, cycling through LENGTHS, until `seconds` in all; writes all.tsv
    and twice.tsv (every file listed twice). Returns each file's duration."""
    from speechgpt_fairseq.speech.audio import to_mono

    root.mkdir(parents=True, exist_ok=True)
    durations, lines, i = [], [], 0
    while sum(durations) < seconds:
        target = LENGTHS[i % len(LENGTHS)]
        words = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(8)).split()[:int(target * 3.2)]
        subprocess.run(["espeak-ng", "-w", str(root / "tmp.wav"), "-v", VOICES[i % len(VOICES)], " ".join(words)],
                       check=True)
        wav, sr = sf.read(root / "tmp.wav", dtype="float32")
        wav = to_mono(wav, sr)
        sf.write(root / f"utt{i:03d}.wav", wav, 16000, subtype="PCM_16")
        durations.append(len(wav) / 16000)
        lines.append(f"utt{i:03d}.wav\t{len(wav)}")
        i += 1
    (root / "tmp.wav").unlink()
    (root / "all.tsv").write_text("\n".join([str(root)] + lines) + "\n")
    (root / "twice.tsv").write_text("\n".join([str(root)] + lines + lines) + "\n")
    return durations


def make_kmeans(path: Path, dim: int, clusters: int, seed: int = 0) -> None:
    """A 1000-cluster MiniBatchKMeans on random features, joblib.dump'ed as fairseq's learn_kmeans saves it."""
    x = np.random.default_rng(seed).normal(size=(2 * clusters, dim)).astype(np.float32)
    joblib.dump(MiniBatchKMeans(n_clusters=clusters, n_init=1, max_iter=2, random_state=seed).fit(x), path)


def child(args) -> None:
    """One side, in this process: do the work, then print a JSON line of its wall and CPU seconds and peak RSS."""
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest, out = Path(args.manifest), Path(args.out)
    if args.child == "ours":
        from fairseq import checkpoint_utils  # noqa: F401  (imported before the clock, as fairseq's recipe module does)

        from speechgpt_fairseq.cli.main import main
    else:
        import speechgpt_fairseq  # noqa: F401  (allow-lists the classes fairseq's HuBERT checkpoints hold)
        recipe = conftest()
        recipe.fairseq_recipe_on_cpu(setattr)
        dump_hubert, dump_km = recipe.simple_kmeans("dump_hubert_feature"), recipe.simple_kmeans("dump_km_label")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    if args.child == "ours":
        batching = [] if args.max_batch_samples is None else ["--max-batch-samples", str(args.max_batch_samples)]
        status = main(["speech2unit", str(manifest), "--hubert", args.ckpt, "--layer", str(args.layer), "--kmeans",
                       args.km, "--out", str(out), "--device", args.device, *batching, "--no-progress",
                       *(["--bf16"] if args.bf16 else [])])
        assert status == 0
    else:
        dump_hubert.main(str(manifest.parent), manifest.stem, args.ckpt, args.layer, 1, 0, str(out / "feat"),
                         1_600_000)
        dump_km.dump_label(str(out / "feat"), manifest.stem, args.km, 1, 0, str(out))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_before_mb": rss_before,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_side(side: str, manifest: Path, out: Path, args, ckpt: Path, km: Path, memory: bool = False) -> dict:
    """One run of a side in a process of its own: {"wall", "cpu", "rss_before_mb", "peak_mb"}. `memory`: with the
    mmap threshold fixed (see above), for the peak; else with the allocator's defaults, for the time."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", side, "--manifest", str(manifest), "--out", str(out), "--ckpt",
               str(ckpt), "--km", str(km), "--layer", str(args.layer), "--device", args.device,
               "--threads", str(args.threads)]
    if args.max_batch_samples is not None:
        command += ["--max-batch-samples", str(args.max_batch_samples)]
    if args.bf16:
        command.append("--bf16")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if memory else None
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=90, help="seconds of speech in the corpus (default 90)")
    p.add_argument("--layers", type=int, default=12, help="HuBERT transformer layers (default 12, HuBERT-base)")
    p.add_argument("--dim", type=int, default=768, help="HuBERT width (default 768; ffn 4x, heads dim/64)")
    p.add_argument("--layer", type=int, default=None, help="layer to label (default 11, or --layers if fewer)")
    p.add_argument("--clusters", type=int, default=1000, help="k-means clusters (default 1000)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and corpus size (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (default: torch's choice)")
    p.add_argument("--max-batch-samples", type=int, default=None,
                   help=f"ours: padded samples per batch (default: speech2unit's, one file per pass on a CPU and "
                        f"{MAX_BATCH_SAMPLES} on a GPU); our peak memory grows with the corpus only until its "
                        f"batches are this full")
    p.add_argument("--bf16", action="store_true", help="our side under bfloat16 autocast (speech2unit --bf16)")
    p.add_argument("--workdir", default=None, help="keep the corpus, models and outputs here (default: a temp dir)")
    for hidden in ("--child", "--manifest", "--out", "--ckpt", "--km"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    args.layer = args.layer or min(11, args.layers)
    if importlib.util.find_spec("npy_append_array") is None:
        raise SystemExit("fairseq's simple_kmeans recipe needs npy-append-array: pip install npy-append-array")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not on PATH (Debian package espeak-ng)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="speech2unit_bench_"))
    durations = make_corpus(work / "audio", args.seconds)
    ckpt = conftest().write_hubert(work / "hubert.pt", layers=args.layers, dim=args.dim, ffn=4 * args.dim,
                                   heads=max(1, args.dim // 64), channels=512, conv_pos=128, conv_pos_groups=16,
                                   final_dim=256)  # HuBERT-base's shape at the defaults
    km = work / f"km{args.clusters}.bin"
    make_kmeans(km, args.dim, args.clusters)
    print(f"machine: {machine(torch.device(args.device))} ({args.device}), torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}")
    print(f"HuBERT: {args.layers} layers, width {args.dim}, conv extractor 512 channels, layer {args.layer}, random "
          f"weights; k-means {args.clusters} clusters; ours: --max-batch-samples {args.max_batch_samples or 'default'}")
    print(f"corpus: {len(durations)} files, {sum(durations):.1f} s of espeak-ng speech "
          f"({min(durations):.1f}-{max(durations):.1f} s each); twice: the same files listed twice")

    timed: dict[str, list[dict]] = {"ours": [], "fairseq": []}
    for r in range(args.repeats):
        for side in (("ours", "fairseq") if r % 2 == 0 else ("fairseq", "ours")):
            timed[side].append(run_side(side, work / "audio" / "all.tsv", work / f"out_{side}", args, ckpt, km))
    once, twice = ({side: run_side(side, work / "audio" / tsv, work / f"out_{side}_{tsv[:-4]}", args, ckpt, km,
                                   memory=True) for side in ("ours", "fairseq")} for tsv in ("all.tsv", "twice.tsv"))
    ours_km = (work / "out_ours" / "all.km").read_text().splitlines()
    fairseq_km = (work / "out_fairseq" / "all_0_1.km").read_text().splitlines()
    differ = sum(a != b for a, b in zip(ours_km, fairseq_km)) + abs(len(ours_km) - len(fairseq_km))
    ours_labels, fairseq_labels = (" ".join(lines).split() for lines in (ours_km, fairseq_km))
    equal = sum(a == b for a, b in zip(ours_labels, fairseq_labels)) / max(len(ours_labels), len(fairseq_labels))
    print(f"labels: {len(ours_km)} lines; identical to fairseq's: "
          f"{'yes' if differ == 0 else f'no, {differ} lines differ'}; ours {'bf16' if args.bf16 else 'fp32'}: "
          f"{100 * equal:.2f}% of {len(fairseq_labels)} labels equal to fairseq's fp32 labels")

    rate, cpu = {}, {}
    for side, runs in timed.items():
        walls = [x["wall"] for x in runs]
        rate[side], cpu[side] = sum(durations) / statistics.median(walls), statistics.median(x["cpu"] for x in runs)
        print(f"{side:8s} {rate[side]:6.2f} audio s per wall s (median {statistics.median(walls):.1f} s, range "
              f"{min(walls):.1f}-{max(walls):.1f}; CPU {cpu[side]:.1f} s); peak RSS "
              f"{once[side]['peak_mb']:.0f} MB, corpus twice: {twice[side]['peak_mb']:.0f} MB "
              f"(after imports: {once[side]['rss_before_mb']:.0f} MB)")
    print(f"ratio ours/fairseq: {rate['ours'] / rate['fairseq']:.3f}")
    print(f"CPU seconds fairseq/ours: {cpu['fairseq'] / cpu['ours']:.3f}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
