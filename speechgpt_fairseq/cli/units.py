"""prepare-units: binarize unit corpora for stage 1 (unit_lm)."""
from __future__ import annotations

import argparse
from pathlib import Path

from speechgpt_fairseq.atomic_files import check_output_dir
from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.data.binarize import BinarizeError, is_data_file, prepare_units
from speechgpt_fairseq.data.vocabulary import VOCAB_FILE, Vocabulary


def load_vocabulary(spec: str | None, num_units: int | None) -> Vocabulary:
    """--vocab: a vocab.json (or a directory with one, e.g. convert-hf's output), a tokenizer file or a
    Hugging Face tokenizer directory; none gives a units-only vocabulary."""
    if spec is None:
        return Vocabulary.units_only(num_units or 1000)
    path = Path(spec)
    if path.name == VOCAB_FILE or (path.is_dir() and (path / VOCAB_FILE).exists()):
        vocab = Vocabulary.load(path)
        if num_units is not None and num_units != vocab.num_units:
            raise BinarizeError(f"{spec}: has {vocab.num_units} units, --num-units says {num_units}")
        return vocab
    return Vocabulary.from_tokenizer(path, num_units)


def parse_splits(specs: list[str]) -> dict[str, list[str]]:
    """["train=a.km", "train=b.km", "valid=c.km"] -> {"train": ["a.km", "b.km"], "valid": ["c.km"]}: a split named
    more than once is its files concatenated in order."""
    splits: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise BinarizeError(f"{spec!r}: expected SPLIT=FILE, e.g. train=data/train.km")
        if path in splits.get(name, []):
            raise BinarizeError(f"{spec!r}: {path} is given twice for split {name!r}")
        splits.setdefault(name, []).append(path)
    return splits


def add_data_dir_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="data directory to write (task.data); must not exist or be empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier data directory, every split of it (only one holding nothing but "
                        "vocab.json and .bin/.idx files)")


def check_data_dir(args) -> dict[str, list[str]]:
    """The splits of the command line, after checking --out before anything is read: a data directory is replaced
    whole, only with --overwrite, and never one holding files we did not write or one of the inputs."""
    splits = parse_splits(args.splits)
    inputs = [path for paths in splits.values() for path in paths] + ([args.vocab] if args.vocab else [])
    check_output_dir(args.out, args.overwrite, inputs, ours=is_data_file)
    return splits


class PrepareUnits:
    """Binarize unit files (fairseq k-means labels, or SpeechGPT unit strings `<sosp><12><7>…<eosp>`, one
    utterance per line) into fairseq memory-mapped datasets: OUT/SPLIT.bin and .idx, plus OUT/vocab.json.
    k-means labels (one per 20 ms frame, as speech2unit's .km files and fairseq's dump_km_label.py write them)
    have their runs of a repeated unit merged, the units SpeechGPT trained on and the unit vocoder speaks;
    --no-dedup keeps every frame. Unit strings are taken as written. Each utterance starts with the tokenizer's
    bos when the tokenizer adds one. Empty lines are skipped and counted; a malformed line stops with its file
    and line number, and nothing is written. OUT is written whole: an existing one is replaced, every split of
    it, only with --overwrite and only when the run succeeds."""

    help = "binarize unit corpora (k-means labels or SpeechGPT unit strings) for unit_lm"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("splits", nargs="+", metavar="SPLIT=FILE",
                       help="e.g. train=train.km valid=valid.km; a split named twice concatenates its files")
        add_data_dir_arguments(p)
        p.add_argument("--vocab", default=None,
                       help="vocab.json or a directory holding one (convert-hf's output), or a tokenizer "
                            "(tokenizer.model, tokenizer.json, Hugging Face directory); default: units only")
        p.add_argument("--num-units", type=positive_int, default=None, help="K (default 1000, or the vocabulary's)")
        p.add_argument("--open", nargs="*", default=[], metavar="SPLIT",
                       help="splits of prompts: k-means lines are not closed with <eosp>, unit strings may lack it")
        p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                       help="merge runs of a repeated unit in k-means label lines (default; --no-dedup keeps frames)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> None:
        splits = check_data_dir(args)
        vocab = load_vocabulary(args.vocab, args.num_units)
        for stats in prepare_units(splits, args.out, vocab, open_splits=args.open, show_progress=not args.no_progress,
                                   dedup=args.dedup, overwrite=args.overwrite,
                                   inputs=[args.vocab] if args.vocab else []):
            skipped = ", ".join(f"skipped {n}: {reason}" for reason, n in stats.skipped.items()) or "nothing skipped"
            print(f"{stats.path}: {stats.records} utterances, {stats.tokens} tokens ({skipped})")
        print(f"wrote {args.out} ({len(vocab)} tokens in {Path(args.out) / VOCAB_FILE})")
