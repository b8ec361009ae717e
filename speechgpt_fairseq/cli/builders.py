"""build-cross-modal, build-text-instructions and build-com: instruction data for stages 2 and 3 (cross_modal_sft,
com_sft)."""
from __future__ import annotations

import argparse

from speechgpt_fairseq.atomic_files import check_output_file
from speechgpt_fairseq.cli.main import positive_int, probability
from speechgpt_fairseq.data.builders import (DEFAULT_MIX, BuildStats, build_com, build_cross_modal,
                                             build_text_instructions, load_templates)
from speechgpt_fairseq.data.prompts import COM_FORMATS


def add_common_arguments(p: argparse.ArgumentParser, units: bool = True) -> None:
    """The options the builders share; `units`: those of builders that read speech units."""
    p.add_argument("--out", metavar="FILE", required=True,
                   help="JSON lines file to write ({\"prefix\": ..., \"plain_text\": ...})")
    if units:
        p.add_argument("--seed", type=int, default=0, help="random seed: the same input and seed give the same file")
        p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                       help="merge runs of a repeated unit, as SpeechGPT does (default: on)")
        p.add_argument("--num-units", type=positive_int, default=1000,
                       help="K: unit ids must lie in 0..K-1 (default 1000)")
    p.add_argument("--prefix", default="", help="system prefix of every example (default: none)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records and count them, instead of stopping at the first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def summary(out: str, stats: BuildStats, what: str, kinds: dict[str, str]) -> str:
    """`wrote OUT: N examples from M pairs read (ASR a, TTS t); skipped s (reason: n, ...)`; `kinds` maps the
    kinds of example to their labels."""
    written = ", ".join(f"{label} {stats.written.get(kind, 0)}" for kind, label in kinds.items())
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats.skipped.items()))
    return (f"wrote {out}: {sum(stats.written.values())} examples from {stats.read} {what} read ({written}); "
            f"skipped {sum(stats.skipped.values())}" + (f" ({skipped})" if skipped else ""))


class BuildCrossModal:
    """Build stage-2 instruction data (ASR and TTS examples) from (units, transcript) pairs: line-aligned
    --units and --text files, or a --manifest (TSV with a header naming `units` and `text` columns, or JSON
    lines with those keys). Units are fairseq k-means labels, SpeechGPT unit strings or JSON lists of ints.
    Each pair becomes ASR with probability --asr-prob, else TTS, with an instruction drawn from the templates.
    A bad record stops with its file and line and nothing is written (or is skipped with --skip-bad)."""

    help = "build ASR/TTS instruction data (stage 2) from units and transcripts"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--units", metavar="FILE", help="units file, one utterance per line (with --text)")
        p.add_argument("--text", metavar="FILE", help="transcripts, one per line, aligned with --units")
        p.add_argument("--manifest", metavar="FILE", help="TSV (header with units, text) or JSON lines instead")
        p.add_argument("--asr-prob", type=probability, default=0.5, help="probability that a pair becomes ASR (0.5)")
        p.add_argument("--asr-templates", metavar="FILE", help="ASR instructions, one per line (default: shipped)")
        p.add_argument("--tts-templates", metavar="FILE", help="TTS instructions, one per line (default: shipped)")
        add_common_arguments(p)

    @staticmethod
    def run(args) -> None:
        check_output_file(args.out)
        stats = build_cross_modal(
            args.out, units=args.units, text=args.text, manifest=args.manifest,
            asr_templates=load_templates(args.asr_templates) if args.asr_templates else None,
            tts_templates=load_templates(args.tts_templates) if args.tts_templates else None,
            skip_bad=args.skip_bad, show_progress=not args.no_progress, asr_prob=args.asr_prob, seed=args.seed,
            dedup=args.dedup, prefix=args.prefix, num_units=args.num_units)
        print(summary(args.out, stats, "pairs", {"asr": "ASR", "tts": "TTS"}))


class BuildTextInstructions:
    """Build text-only instruction data, which stage 2 mixes with the ASR/TTS examples as SpeechGPT mixed text
    instructions in: JSON lines with `instruction`, `output` and an optional `input` (Alpaca's fields) become
    `[Human]: INSTRUCTION<eoh> [SpeechGPT]: OUTPUT<eoa>` (with ` This is input: INPUT` after the instruction when
    there is one). A bad record stops with its file and line and nothing is written (or is skipped with
    --skip-bad)."""

    help = "build text-only instruction data (mixed into stage 2)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", metavar="FILE", required=True,
                       help="JSON lines with instruction, output and optionally input")
        add_common_arguments(p, units=False)

    @staticmethod
    def run(args) -> None:
        check_output_file(args.out)
        stats = build_text_instructions(args.manifest, args.out, skip_bad=args.skip_bad,
                                        show_progress=not args.no_progress, prefix=args.prefix)
        print(summary(args.out, stats, "records", {"text": "text"}))


class BuildCoM:
    """Build stage-3 chain-of-modality data from JSON lines with `text_i`, `text_r` and, where available,
    `units_i`, `units_r` (unit strings, k-means labels or lists of ints), or with the units in files whose
    line N belongs to manifest line N (--units-i, --units-r). Each record gets one of the formats s2s, s2t, t2s,
    t2t (SpeechGPT's) or t2t_restated (the typed question restated, then answered: text in the chain's shape),
    drawn with the --mix weights among those its fields allow; records that allow none are counted. A bad
    record stops with its file and line and nothing is written (or is skipped with --skip-bad)."""

    help = "build chain-of-modality instruction data (stage 3)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", metavar="FILE", required=True,
                       help="JSON lines with text_i, text_r, units_i, units_r")
        p.add_argument("--units-i", metavar="FILE",
                       help="units of the spoken questions, line N for manifest line N (e.g. speech2unit's output)")
        p.add_argument("--units-r", metavar="FILE", help="units of the spoken answers, aligned likewise")
        p.add_argument("--mix", default=DEFAULT_MIX,
                       help=f"format weights, normalised; unnamed formats weigh 0 (default {DEFAULT_MIX})")
        add_common_arguments(p)

    @staticmethod
    def run(args) -> None:
        check_output_file(args.out)
        stats = build_com(args.manifest, args.out, mix=args.mix, skip_bad=args.skip_bad,
                          show_progress=not args.no_progress, seed=args.seed, dedup=args.dedup, prefix=args.prefix,
                          num_units=args.num_units, units_i=args.units_i, units_r=args.units_r)
        print(summary(args.out, stats, "records", {f: f for f in COM_FORMATS}))
