"""prepare-sft, score and round-trip: instruction data in, generated responses scored."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechgpt_fairseq.atomic_files import atomic_file, check_output_file
from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.cli.units import add_data_dir_arguments, check_data_dir, load_vocabulary
from speechgpt_fairseq.data.instructions import prepare_instructions
from speechgpt_fairseq.data.vocabulary import VOCAB_FILE
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.evaluation import read_generate_output, round_trip, score_records


class PrepareSFT:
    """Binarize SpeechInstruct-style JSON lines ({"prefix": ..., "plain_text": ...}) for cross_modal_sft and
    com_sft: OUT/NAME.bin/.idx (tokens), OUT/NAME.seg.bin/.idx (which tokens are system prefix, prompt and
    response, so that the task can choose where the loss goes) and OUT/vocab.json. Files are read line by
    line, so a 13 GB file needs no more memory than a small one. A malformed line stops with its file and line
    number and nothing is written, unless --skip-bad skips and counts it. OUT is written whole: an existing one is
    replaced, every split of it, only with --overwrite and only when the run succeeds."""

    help = "binarize instruction JSON lines for cross_modal_sft / com_sft"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("splits", nargs="+", metavar="NAME=FILE",
                       help="e.g. train=cm_train.jsonl valid=cm_dev.jsonl alpaca=alpaca.jsonl (mix sources with "
                            "task.mix); a split named twice concatenates its files in order")
        add_data_dir_arguments(p)
        p.add_argument("--vocab", required=True,
                       help="vocab.json or a directory holding one (convert-hf's output, a stage-1 data directory), "
                            "or a tokenizer (tokenizer.model, tokenizer.json, Hugging Face directory)")
        p.add_argument("--num-units", type=positive_int, default=None, help="K (default: the vocabulary's)")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip malformed lines and count them by reason, instead of stopping")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> None:
        splits = check_data_dir(args)
        vocab = load_vocabulary(args.vocab, args.num_units)
        if vocab.tokenizer_kind is None:
            raise InputError(f"{args.vocab}: a units-only vocabulary cannot encode instructions; give the base "
                             f"LLM's vocabulary (e.g. convert-hf's output)")
        for stats in prepare_instructions(splits, args.out, vocab, skip_bad=args.skip_bad,
                                          show_progress=not args.no_progress, overwrite=args.overwrite,
                                          inputs=[args.vocab]):
            skipped = ", ".join(f"skipped {n}: {reason}" for reason, n in stats.skipped.items()) or "nothing skipped"
            print(f"{stats.path}: {stats.records} examples, {stats.tokens} tokens, {stats.lengths()} ({skipped})")
        print(f"wrote {args.out} ({len(vocab)} tokens in {Path(args.out) / VOCAB_FILE})")


def check_score_outputs(args) -> None:
    for path in (args.out, args.summary):
        if path:
            check_output_file(path)


def write_scores(rows: list[dict], summary: dict, out: str | None, summary_path: str | None) -> None:
    """Print the JSON summary; write every row as JSON lines to `out` and the summary to `summary_path`."""
    if out:
        with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    text = json.dumps(summary, indent=2)
    if summary_path:
        with atomic_file(summary_path) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    print(text)


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("generate_output", help="what fairseq-generate printed (its stdout, or --results-path file)")
    p.add_argument("--out", default=None, help="JSON lines of every example's parts and error rates")
    p.add_argument("--summary", default=None, help="also write the printed JSON summary to this file")
    p.add_argument("--keep-case", action="store_true", help="WER: do not lowercase")
    p.add_argument("--keep-punct", action="store_true", help="WER: do not remove punctuation")


class Score:
    """Score fairseq-generate's output on a cross_modal_sft / com_sft split: word error rate of text responses
    (ASR), unit error rate of speech responses (TTS: edit distance over units with repeats merged), and for
    chain-of-modality answers the transcribed question, the text answer (WER and exact match) and the spoken
    answer separately. Prints a JSON summary; --out writes every example's parsed parts and rates as JSON lines."""

    help = "score generated responses: WER for text, unit error rate for speech"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_scoring_arguments(p)

    @staticmethod
    def run(args) -> None:
        check_score_outputs(args)
        rows, scores = score_records(read_generate_output(args.generate_output), lowercase=not args.keep_case,
                                     remove_punct=not args.keep_punct)
        write_scores(rows, {"examples": len(rows), **scores.summary()}, args.out, args.summary)


class RoundTrip:
    """How intelligible a chain-of-modality model's spoken answers are, whatever voice it imitates: the spoken
    answers of fairseq-generate's output on a com_sft split are transcribed by a model's ASR (an ASR instruction
    with the answer's units as input, greedy; a stage-2 checkpoint, or any of ours that follows ASR instructions)
    and scored against the text answer of the same response (roundtrip_wer; the reference answer where the
    response has no text answer) and against the reference answer
    (roundtrip_reference_wer). A response without a spoken answer counts as an empty transcript. Prints a JSON
    summary; --out writes every example."""

    help = "transcribe generated spoken answers with a model's ASR and score them (round-trip WER)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_scoring_arguments(p)
        p.add_argument("--model", required=True, help="checkpoint of ours whose ASR transcribes (e.g. stage 2's)")
        p.add_argument("--instruction", default=None,
                       help="the ASR instruction (default: the first of the shipped ASR templates)")
        p.add_argument("--of", choices=("hypothesis", "reference"), default="hypothesis",
                       help="whose spoken answers to transcribe: the generated ones (default), or the references' "
                            "(the ceiling: how well the ASR reads the right answer as the model was taught to say it)")
        p.add_argument("--batch-size", type=positive_int, default=32, help="answers transcribed together (default 32)")
        p.add_argument("--max-new-tokens", type=positive_int, default=64,
                       help="longest transcript in tokens (default 64)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> None:
        from tqdm import tqdm

        from speechgpt_fairseq.data.builders import shipped_templates
        from speechgpt_fairseq.data.prompts import instruction_prompt, strip_answer_end
        from speechgpt_fairseq.inference import SpeechGPTGenerator
        from speechgpt_fairseq.speech.units import format_unit_string

        check_score_outputs(args)
        records = read_generate_output(args.generate_output)
        model = SpeechGPTGenerator.from_checkpoint(args.model, device=args.device)
        instruction = args.instruction or shipped_templates("asr")[0]

        def transcribe(answers: list[list[int]]) -> list[str]:
            prompts = [instruction_prompt(instruction, format_unit_string(units)) for units in answers]
            texts = []
            for start in tqdm(range(0, len(prompts), args.batch_size), desc="transcribing", unit=" batch",
                              disable=args.no_progress):
                texts += [strip_answer_end(t) for t in model.generate(prompts[start:start + args.batch_size],
                                                                      max_new_tokens=args.max_new_tokens)]
            return texts

        rows, scores = round_trip(records, transcribe, lowercase=not args.keep_case, remove_punct=not args.keep_punct,
                                  of=args.of)
        write_scores(rows, {"examples": len(rows), **scores.summary()}, args.out, args.summary)
