"""make-corpus and demo: the offline demo's spoken corpus, and the whole demo end to end."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.demo.corpus import make_corpus
from speechgpt_fairseq.demo.world import answer_shapes
from speechgpt_fairseq.errors import InputError


class MakeCorpus:
    """Make a small spoken corpus with espeak-ng, nothing downloaded, about a small world of people and their facts:
    sentences that use its words, split into train / valid / test before synthesis (held-out sentences are never
    heard in training), with every answer's shape added to the training sentences, and spoken twice (in a drawn
    voice and rate, and in the assistant's voice); questions about the people, split by (person, relation) and
    spoken several times, with spoken answers; the world's knowledge as text instructions; fairseq audio
    manifests, transcripts and a LLaMA-style sentencepiece tokenizer. Written whole or not at all."""

    help = "make a spoken corpus with espeak-ng (the demo's data)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="corpus directory to write")
        p.add_argument("--sentences", type=positive_int, nargs=3, default=[4000, 200, 100],
                       metavar=("TRAIN", "VALID", "TEST"),
                       help="distinct sentences per split (default 4000 200 100); the training split also gets "
                            f"every answer's shape with every person and value ({len(answer_shapes())})")
        p.add_argument("--renditions", type=positive_int, nargs=3, default=[10, 2, 3],
                       metavar=("TRAIN", "VALID", "TEST"),
                       help="times each question of a split is spoken, in drawn voices and rates (default 10 2 3)")
        p.add_argument("--vocab-size", type=int, default=1000, help="pieces of the tokenizer (default 1000)")
        p.add_argument("--seed", type=int, default=1, help="seed of every draw (default 1)")
        p.add_argument("--workers", type=int, default=2, help="espeak-ng processes in parallel (default 2)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing corpus directory (only one holding nothing but corpus files)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> None:
        stats = make_corpus(args.out, tuple(args.sentences), tuple(args.renditions), seed=args.seed,
                            vocab_size=args.vocab_size, workers=args.workers, overwrite=args.overwrite,
                            show_progress=not args.no_progress)
        counts = lambda d: "/".join(map(str, d.values()))  # noqa: E731
        print(f"wrote {args.out}: {counts(stats['sentences'])} sentences, {counts(stats['questions'])} questions spoken "
              f"{counts(stats['spoken questions'])} times (train/valid/test), {stats['knowledge']} text instructions, "
              f"{stats['seconds'] / 60:.1f} minutes of speech")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


class Demo:
    """The offline demo, end to end, in about fourteen minutes on two CPU cores: make a spoken corpus with
    espeak-ng, extract units (MFCC k-means, or --hubert), train stages 1, 2 and 3 with fairseq-hydra-train on
    the examples/demo configs, evaluate on held-out speech with fairseq-generate against the untrained model,
    hold one spoken chat turn, and write OUT/report/report.md with the validation curves. Every command is
    printed before it runs (a tutorial to copy); each one's output is in OUT/logs. Run it again with the same
    --out to continue after an interruption: finished steps are not redone."""

    help = "the offline demo: corpus, units, three stages, evaluation, chat, report"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="working directory of the demo (created; reused to resume)")
        p.add_argument("--hubert", default=None, help="fairseq HuBERT checkpoint for the units (default: MFCC)")
        p.add_argument("--layer", type=int, default=11, help="its layer (default 11)")
        p.add_argument("--mfcc-average", type=positive_int, default=None, metavar="N",
                       help="MFCC units: fit k-means on frames averaged over N (odd; learn-kmeans --mfcc-average; "
                            "default 9; 1 gives fairseq's features; docs/quickstart.md has what 1, 5 and 7 gave)")
        p.add_argument("--quick", action="store_true",
                       help="a tiny corpus and a few updates: checks the pipeline in a minute or two; no bar applied")
        p.add_argument("--config-dir", default=None, help="the demo configs (default: examples/demo of this clone)")
        p.add_argument("--workers", type=int, default=2, help="espeak-ng processes in parallel (default 2)")

    @staticmethod
    def run(args) -> None:
        from speechgpt_fairseq.demo.pipeline import DemoPipeline, Sizes
        from speechgpt_fairseq.demo.report import MEASURES, write_report

        if args.config_dir is not None and not Path(args.config_dir).is_dir():
            raise FileNotFoundError(f"{args.config_dir}: no such directory (--config-dir: the demo's stage configs)")
        pipeline = DemoPipeline(args.out, Sizes.quick() if args.quick else Sizes(), hubert=args.hubert,
                                layer=args.layer, config_dir=args.config_dir, workers=args.workers,
                                mfcc_average=args.mfcc_average)
        start = time.perf_counter()
        times = pipeline.run(log=lambda line: print(line, flush=True))
        result = write_report(args.out, times, time.perf_counter() - start, quick=args.quick)
        t, u = result["trained"], result["untrained"]
        print(f"\nreport: {Path(args.out) / 'report' / 'report.md'}")
        for m in MEASURES:
            print(f"{m.label}: {fmt(t[m.key])}" + ("" if m.trained_only else f" (untrained {fmt(u[m.key])})"))
        if args.quick or all(result["met"].values()):
            print(f"demo: {result['verdict']}")
        else:
            raise InputError(f"{result['verdict']} (see the report)")
