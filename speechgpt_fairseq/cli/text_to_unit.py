"""t2u-export and t2u-import: data for a text-to-unit model trained and decoded with fairseq's own translation
task (fairseq-preprocess, fairseq-train, fairseq-generate), and its predictions read back as units."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import speechgpt_fairseq
from speechgpt_fairseq.atomic_files import check_output_file
from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.data.text_to_unit import (SOURCE_LANG, TARGET_LANG, UNIT_FORMATS, Split, TextToUnitError,
                                                 export_splits, read_hypotheses, write_units)
from speechgpt_fairseq.speech.units import dedup_units

# A small transformer (0.9M parameters): on the bundled corpus (2000 pairs) it reaches a validation perplexity of
# about 2 in 30 epochs, 10 minutes on one CPU thread. docs/text-to-unit.md has settings for LibriSpeech-size data.
MODEL_ARGS = ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
              "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
              "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
              "--share-decoder-input-output-embed", "--dropout", "0.1"]
OPTIM_ARGS = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam",
              "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
              "--warmup-updates", "200", "--max-tokens", "4096", "--max-epoch", "30"]
GENERATE_ARGS = ["--beam", "5", "--max-len-a", "4", "--max-len-b", "20", "--max-tokens", "8192"]


def user_dir() -> Path:
    """The --user-dir every fairseq command needs (it applies our fairseq fixes): the repository's shim, or the
    package itself when installed without the repository."""
    package = Path(speechgpt_fairseq.__file__).resolve().parent
    shim = package.parent / "user_dir"
    return shim if (shim / "__init__.py").is_file() else package


def parse_split_files(specs: list[str], option: str) -> dict[str, Path]:
    """["train=a.wrd", "b.wrd"] -> {"train": a.wrd, "b": b.wrd}: SPLIT=FILE, or FILE named by its stem."""
    files: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise TextToUnitError(f"{option} {spec!r}: expected [SPLIT=]FILE, e.g. train=data/train.wrd")
        if name in files:
            raise TextToUnitError(f"{option}: split {name!r} is given twice ({files[name]} and {path})")
        files[name] = Path(path)
    return files


def splits_from_args(text: list[str], units: list[str]) -> list[Split]:
    texts, unit_files = parse_split_files(text, "--text"), parse_split_files(units or [], "--units")
    for name, path in unit_files.items():
        if name not in texts:
            raise TextToUnitError(f"--units {path}: split {name!r} has no --text (give --text {name}=FILE; "
                                  f"splits given: {', '.join(texts)})")
    return [Split(name, path, unit_files.get(name)) for name, path in texts.items()]


def training_splits(splits: list[Split]) -> set[str]:
    """The pairs named train, and valid beside them, train the model; any other split is decoded."""
    pairs = {s.name for s in splits if s.units is not None}
    return pairs & {"train", "valid"} if "train" in pairs else set()


def next_commands(out: Path, splits: list[Split]) -> list[list[str]]:
    """The fairseq commands that binarize, train on and decode what t2u-export wrote, then t2u-import.

    The pairs named `train` (and `valid`) train the model; every other split NAME is decoded from its own
    binarization DIR/bin-NAME with the training dictionaries, source only when it has no units."""
    fairseq = ["--user-dir", str(user_dir()), "--source-lang", SOURCE_LANG, "--target-lang", TARGET_LANG]
    bin_dir, save_dir = out / "bin", out / "checkpoints"
    training = training_splits(splits)
    checkpoint = save_dir / ("checkpoint_last.pt" if training == {"train"} else "checkpoint_best.pt")
    commands = []
    if "train" in training:
        valid = ["--validpref", str(out / "valid")] if "valid" in training else []
        commands.append(["fairseq-preprocess", *fairseq, "--trainpref", str(out / "train"), *valid,
                         "--destdir", str(bin_dir)])
        commands.append(["fairseq-train", str(bin_dir), *fairseq, "--task", "translation", *MODEL_ARGS, *OPTIM_ARGS,
                         "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--log-format", "simple",
                         "--log-interval", "50", *([] if valid else ["--disable-validation"])])
    for split in splits:
        if split.name in training:
            continue
        data, results = out / f"bin-{split.name}", out / f"generate-{split.name}"
        dicts = ["--srcdict", str(bin_dir / f"dict.{SOURCE_LANG}.txt")]
        dicts += ["--tgtdict", str(bin_dir / f"dict.{TARGET_LANG}.txt")] if split.units else ["--only-source"]
        commands.append(["fairseq-preprocess", *fairseq, *dicts, "--testpref", str(out / split.name),
                         "--destdir", str(data)])
        if not split.units:  # fairseq-generate reads both dictionaries from the data directory
            commands.append(["cp", str(bin_dir / f"dict.{TARGET_LANG}.txt"), str(data)])
        commands.append(["fairseq-generate", str(data), *fairseq, "--task", "translation", "--gen-subset", "test",
                         "--path", str(checkpoint), *GENERATE_ARGS, "--results-path", str(results)])
        commands.append(["speechgpt", "t2u-import", str(results / "generate-test.txt"),
                         "--source", str(out / f"{split.name}.{SOURCE_LANG}"),
                         "--out", str(out / f"{split.name}.predicted.km")])
    return commands


class T2UExport:
    """Export texts and their units in fairseq's translation format, for a text-to-unit model trained with
    fairseq-train --task translation. Each split NAME becomes DIR/NAME.txt (characters separated by spaces, `|`
    between words) and, when it has units, DIR/NAME.unit (unit ids separated by spaces); a split with texts only
    is what the model will speak. --text and --units take SPLIT=FILE, or FILE for the split named by its stem
    (train.wrd -> train); units are k-means labels or SpeechGPT unit strings, line-aligned with the texts.
    Prints the fairseq commands to run next. A bad line stops with its file and line and nothing is written
    (or is skipped and counted with --skip-bad); other files in DIR are kept."""

    help = "export (text, units) pairs in fairseq's translation format for a text-to-unit model"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--text", action="append", required=True, metavar="[SPLIT=]FILE",
                       help="texts, one utterance per line; repeat for more splits")
        p.add_argument("--units", action="append", metavar="[SPLIT=]FILE",
                       help="the units of a --text split, line-aligned (k-means labels or SpeechGPT unit strings)")
        p.add_argument("--out", metavar="DIR", required=True, help="directory to write SPLIT.txt and SPLIT.unit into")
        p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                       help="merge runs of a repeated unit, as SpeechGPT does (default: on)")
        p.add_argument("--keep-case", action="store_true", help="keep upper case (default: lowercase the text)")
        p.add_argument("--num-units", type=positive_int, default=1000,
                       help="K: unit ids must lie in 0..K-1 (default 1000)")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip bad lines and count them, instead of stopping at the first")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> None:
        out = Path(args.out)
        splits = splits_from_args(args.text, args.units)
        all_stats = export_splits(splits, out, dedup=args.dedup, lowercase=not args.keep_case,
                                  num_units=args.num_units, skip_bad=args.skip_bad, show_progress=not args.no_progress)
        for split in splits:
            stats = all_stats[split.name]
            files = f"{out / split.name}.{SOURCE_LANG}" + (f", .{TARGET_LANG}" if split.units else " (source only)")
            skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats.skipped.items()))
            print(f"wrote {files}: {sum(stats.written.values())} {'pairs' if split.units else 'texts'}; skipped "
                  f"{sum(stats.skipped.values())}" + (f" ({skipped})" if skipped else ""))
        if training_splits(splits):
            print("# next: binarize, train a small transformer, decode and read back "
                  "(docs/text-to-unit.md has settings at scale)")
        else:
            print(f"# next: decode and read back, with the dictionaries in {out / 'bin'} and the model in "
                  f"{out / 'checkpoints'} (no train pairs: change those paths if your model is elsewhere)")
        for command in next_commands(out, splits):
            print(shlex.join(command))


class T2UImport:
    """Read the units a text-to-unit model predicted from fairseq-generate's output (its H- lines; also
    fairseq-interactive's) and write them in input order, one utterance per line, as k-means labels or SpeechGPT
    unit strings. A missing sample or a symbol that is not a unit id stops with the file and line."""

    help = "read a text-to-unit model's fairseq-generate output back as units"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("generate_output", metavar="GENERATE_OUTPUT",
                       help="fairseq-generate's output (e.g. RESULTS/generate-test.txt from --results-path)")
        p.add_argument("--out", metavar="FILE", required=True, help="units file to write")
        p.add_argument("--format", choices=UNIT_FORMATS, default="kmeans",
                       help="kmeans: `12 7 301`; speechgpt: `<sosp><12><7><301><eosp>` (default kmeans)")
        p.add_argument("--source", metavar="FILE",
                       help="the decoded source (DIR/SPLIT.txt): checks that each of its lines has a hypothesis")
        p.add_argument("--dedup", action="store_true", help="merge runs of a repeated unit in the predictions")

    @staticmethod
    def run(args) -> None:
        check_output_file(args.out)
        expected = None
        if args.source is not None:
            if not Path(args.source).is_file():
                raise TextToUnitError(f"{args.source}: no such file (--source: the exported SPLIT.txt)")
            with open(args.source, encoding="utf-8") as f:
                expected = sum(1 for _ in f)
        units = read_hypotheses(args.generate_output, expected)
        if args.dedup:
            units = [dedup_units(u) for u in units]
        write_units(units, args.out, args.format)
        empty = sum(1 for u in units if not u)
        print(f"wrote {args.out}: {len(units)} utterances, {sum(map(len, units)) / len(units):.1f} units on average"
              + (f"; {empty} empty predictions (the model ended at once)" if empty else ""))
