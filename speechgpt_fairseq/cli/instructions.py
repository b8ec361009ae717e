"""prepare-sft and score: instruction data in, generated responses scored."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.cli.units import load_vocabulary, parse_splits
from speechgpt_fairseq.data.instructions import prepare_instructions
from speechgpt_fairseq.data.vocabulary import VOCAB_FILE
from speechgpt_fairseq.evaluation import read_generate_output, score_records


class PrepareSFT:
    """Binarize SpeechInstruct-style JSON lines ({"prefix": ..., "plain_text": ...}) for cross_modal_sft and
    com_sft: OUT/NAME.bin/.idx (tokens), OUT/NAME.seg.bin/.idx (which tokens are system prefix, prompt and
    response, so that the task can choose where the loss goes) and OUT/vocab.json. Files are read line by
    line, so a 13 GB file needs no more memory than a small one. A malformed line stops with its file and line
    number and nothing is written, unless --skip-bad skips and counts it."""

    help = "binarize instruction JSON lines for cross_modal_sft / com_sft"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("splits", nargs="+", metavar="NAME=FILE",
                       help="e.g. train=cm_train.jsonl valid=cm_dev.jsonl alpaca=alpaca.jsonl (mix sources with "
                            "task.mix)")
        p.add_argument("--out", required=True, help="data directory to write (task.data)")
        p.add_argument("--vocab", required=True,
                       help="vocab.json or a directory holding one (convert-hf's output, a stage-1 data directory), "
                            "or a tokenizer (tokenizer.model, tokenizer.json, Hugging Face directory)")
        p.add_argument("--num-units", type=int, default=None, help="K (default: the vocabulary's)")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip malformed lines and count them by reason, instead of stopping")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> None:
        vocab = load_vocabulary(args.vocab, args.num_units)
        if vocab.tokenizer_kind is None:
            raise ValueError(f"{args.vocab}: a units-only vocabulary cannot encode instructions; give the base "
                             f"LLM's vocabulary (e.g. convert-hf's output)")
        for stats in prepare_instructions(parse_splits(args.splits), args.out, vocab, skip_bad=args.skip_bad,
                                          show_progress=not args.no_progress):
            skipped = ", ".join(f"skipped {n}: {reason}" for reason, n in stats.skipped.items()) or "nothing skipped"
            print(f"{stats.path}: {stats.records} examples, {stats.tokens} tokens ({skipped})")
        print(f"wrote {args.out} ({len(vocab)} tokens in {Path(args.out) / VOCAB_FILE})")


class Score:
    """Score fairseq-generate's output on a cross_modal_sft / com_sft split: word error rate of text responses
    (ASR), unit error rate of speech responses (TTS: edit distance over units with repeats merged), and for
    chain-of-modality answers the transcribed question, the text answer (WER and exact match) and the spoken
    answer separately. Prints a JSON summary; --out writes every example's parsed parts and rates as JSON lines."""

    help = "score generated responses: WER for text, unit error rate for speech"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("generate_output", help="what fairseq-generate printed (its stdout, or --results-path file)")
        p.add_argument("--out", default=None, help="JSON lines of every example's parts and error rates")
        p.add_argument("--summary", default=None, help="also write the printed JSON summary to this file")
        p.add_argument("--keep-case", action="store_true", help="WER: do not lowercase")
        p.add_argument("--keep-punct", action="store_true", help="WER: do not remove punctuation")

    @staticmethod
    def run(args) -> None:
        rows, scores = score_records(read_generate_output(args.generate_output), lowercase=not args.keep_case,
                                     remove_punct=not args.keep_punct)
        if args.out:
            with atomic_file(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = json.dumps({"examples": len(rows), **scores.summary()}, indent=2)
        if args.summary:
            with atomic_file(args.summary) as tmp:
                tmp.write_text(summary + "\n", encoding="utf-8")
        print(summary)
