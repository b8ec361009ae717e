"""`speechgpt <verb> ...`: argument parsing and error reporting for every verb."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from speechgpt_fairseq.errors import InputError

# verb -> the class that implements it (module of speechgpt_fairseq.cli, class): a verb's module is imported only
# when that verb runs, so the verbs that need no model do not wait for torch and fairseq to load
VERBS = {
    "build-com": ("builders", "BuildCoM"),
    "build-cross-modal": ("builders", "BuildCrossModal"),
    "build-text-instructions": ("builders", "BuildTextInstructions"),
    "chat": ("chat", "Chat"),
    "convert-hf": ("checkpoints", "ConvertHF"),
    "demo": ("demo", "Demo"),
    "export-hf": ("checkpoints", "ExportHF"),
    "fit-exemplar-vocoder": ("vocoder", "FitExemplarVocoder"),
    "import-peft": ("checkpoints", "ImportPEFT"),
    "learn-kmeans": ("speech", "LearnKmeans"),
    "make-corpus": ("demo", "MakeCorpus"),
    "prepare-units": ("units", "PrepareUnits"),
    "prepare-sft": ("instructions", "PrepareSFT"),
    "round-trip": ("instructions", "RoundTrip"),
    "score": ("instructions", "Score"),
    "speech2unit": ("speech", "Speech2Unit"),
    "t2u-export": ("text_to_unit", "T2UExport"),
    "t2u-import": ("text_to_unit", "T2UImport"),
    "unit2speech": ("vocoder", "Unit2Speech"),
}


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (K, clusters, sentences, tokens): a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def probability(text: str) -> float:
    """argparse type of a probability: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability (a number from 0 to 1)")
    return value


def verb_class(name: str):
    module, cls = VERBS[name]
    return getattr(importlib.import_module(f"speechgpt_fairseq.cli.{module}"), cls)


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `verbs` (all of them by default: what `speechgpt --help` lists)."""
    parser = argparse.ArgumentParser(
        prog="speechgpt", description="SpeechGPT with fairseq: the jobs fairseq has no tool for. "
                                      "Training and evaluation use fairseq-hydra-train and fairseq-generate.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in verbs or VERBS:
        verb = verb_class(name)
        p = sub.add_parser(name, help=verb.help, description=verb.__doc__)
        verb.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = [argv[0]] if argv and argv[0] in VERBS else None  # else every verb, for --help or the error
    args = build_parser(chosen).parse_args(argv)
    # force: importing fairseq has already configured the root logger (at DEBUG)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)
    try:
        verb_class(args.verb).run(args)
    except (InputError, FileNotFoundError) as e:
        # a verdict on the input names the file and record: one line. Anything else (a ValueError from a bug
        # included) keeps its traceback.
        print(f"speechgpt {args.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
