#!/usr/bin/env python
"""Make the small unit corpus that ships in examples/corpus/ (stages 1, 2 and 3 of the tiny pipeline).

English sentences from a small grammar are spoken by espeak-ng (several voices and rates), turned into
39-dim MFCC features (HuBERT's first k-means iteration), clustered with k-means, labelled, and the
consecutive repeats merged, as SpeechGPT does. Sentences are split into train / valid / test before
synthesis, so held-out sentences never occur in train. Question/answer pairs from a second grammar (answers
are sentences of the same kinds) are spoken and labelled with the same k-means model, for chain-of-modality
data; a small LLaMA-style sentencepiece tokenizer is trained on all the text. Everything is seeded:

    python scripts/make_corpus.py --out examples/corpus

Writes train.km, valid.km, test.km (fairseq k-means label lines), train.wrd, valid.wrd, test.wrd
(transcripts), test.txt (prompts: `<sosp>` + the first 30% of each held-out utterance's units, no `<eosp>`),
qa_train.jsonl, qa_valid.jsonl, qa_test.jsonl (`speechgpt build-com` manifests), tokenizer.model,
README.md, and kmeans.bin with --save-kmeans.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from speechgpt_fairseq.data.builders import shipped_templates
from speechgpt_fairseq.demo.grammar import (PROMPT_FRACTION, RATES, TEMPLATES, VOICES, World, _place_qa, make_world,
                                             qa_grammar, qa_stream, sample_qa, sample_sentences)
from speechgpt_fairseq.demo.tokenizer import tokenizer_text, train_tokenizer
from speechgpt_fairseq.speech.audio import read_audio
from speechgpt_fairseq.speech.kmeans import KmeansLabeler, fit_kmeans, save_kmeans
from speechgpt_fairseq.speech.mfcc import mfcc_features
from speechgpt_fairseq.speech.units import dedup_units, format_kmeans_labels, format_unit_string

logger = logging.getLogger("make_corpus")

# ----------------------------------------------------------------------------------- speech to features

def speak_and_featurize(job: tuple[int, str, str, int], workdir: Path) -> np.ndarray:
    """espeak-ng -> wav (22050 Hz) -> 16 kHz waveform -> (frames, 39) MFCC features."""
    index, text, voice, rate = job
    wav_path = workdir / f"{index}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav_path), "-v", voice, "-s", str(rate), text],
                   check=True, capture_output=True)
    feats = mfcc_features(read_audio(wav_path))
    wav_path.unlink()
    return feats


def featurize_all(jobs: list[tuple[int, str, str, int]], num_workers: int,
                  desc: str = "espeak-ng + MFCC") -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="stage1_corpus_") as tmp, ThreadPoolExecutor(num_workers) as pool:
        results = pool.map(lambda job: speak_and_featurize(job, Path(tmp)), jobs)
        return list(tqdm(results, total=len(jobs), desc=desc, unit="utt"))


# ------------------------------------------------------------------------------------------- tokenizer

# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-utterances", type=int, nargs=3, default=[2000, 200, 50], metavar=("TRAIN", "VALID", "TEST"),
                   help="utterances per split (distinct sentences)")
    p.add_argument("--qa", type=int, nargs=3, default=[1500, 150, 50], metavar=("TRAIN", "VALID", "TEST"),
                   help="spoken question/answer pairs per split (distinct questions)")
    p.add_argument("--num-units", type=int, default=100, help="k-means clusters K")
    p.add_argument("--vocab-size", type=int, default=1000, help="pieces of tokenizer.model (LLaMA's has 32000)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed for sentences, voices, frame sampling and k-means; the question/answer world, pairs "
                        "and voices use a stream of their own")
    p.add_argument("--kmeans-frames", type=int, default=200_000,
                   help="at most this many train frames, sampled uniformly, to fit k-means")
    p.add_argument("--save-kmeans", action="store_true", help="also write the k-means model as kmeans.bin")
    p.add_argument("--workers", type=int, default=2, help="espeak-ng processes run in parallel")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    args = parse_args(argv)
    rng = random.Random(args.seed)
    counts = dict(zip(["train", "valid", "test"], args.num_utterances))

    sentences = sample_sentences(sum(counts.values()), rng)
    jobs = [(i, text, rng.choice(VOICES), rng.choice(RATES)) for i, text in enumerate(sentences)]
    bounds = np.cumsum([0, *counts.values()])
    splits = {name: range(bounds[k], bounds[k + 1]) for k, name in enumerate(counts)}

    # Question/answer pairs draw from their own stream, so the sentences, their voices and the k-means fit do
    # not depend on them.
    qa_rng = qa_stream(args.seed)
    qa_counts = dict(zip(["train", "valid", "test"], args.qa))
    world = make_world(qa_rng)
    pairs = sample_qa(sum(qa_counts.values()), world, qa_rng)
    qa_jobs = [(i, text, qa_rng.choice(VOICES), qa_rng.choice(RATES))
               for i, text in enumerate(text for pair in pairs for text in pair)]  # question 2k, answer 2k+1
    qa_bounds = np.cumsum([0, *qa_counts.values()])
    qa_splits = {name: range(qa_bounds[k], qa_bounds[k + 1]) for k, name in enumerate(qa_counts)}

    feats = featurize_all(jobs, args.workers)
    train_frames = np.concatenate([feats[i] for i in splits["train"]])
    sample = np.random.default_rng(args.seed).permutation(len(train_frames))[:args.kmeans_frames]
    logger.info("fitting k-means (K=%d) on %d of %d train frames", args.num_units, len(sample), len(train_frames))
    model = fit_kmeans(train_frames[sample], args.num_units, seed=args.seed)
    labeler = KmeansLabeler(model)
    units = [dedup_units(labeler(f).tolist()) for f in feats]
    qa_feats = featurize_all(qa_jobs, args.workers, desc="espeak-ng + MFCC, questions and answers")
    qa_units = [dedup_units(labeler(f).tolist()) for f in qa_feats]

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        (args.out / f"{name}.km").write_text("".join(format_kmeans_labels(units[i]) + "\n" for i in splits[name]))
        (args.out / f"{name}.wrd").write_text("".join(sentences[i] + "\n" for i in splits[name]))
        (args.out / f"qa_{name}.jsonl").write_text("".join(
            json.dumps({"text_i": pairs[k][0], "text_r": pairs[k][1],
                        "units_i": qa_units[2 * k], "units_r": qa_units[2 * k + 1]}) + "\n"
            for k in qa_splits[name]))
    prompts = [units[i][:max(1, round(PROMPT_FRACTION * len(units[i])))] for i in splits["test"]]
    (args.out / "test.txt").write_text("".join(format_unit_string(p, closed=False) + "\n" for p in prompts))
    if args.save_kmeans:
        save_kmeans(model, args.out / "kmeans.bin")
    tokenizer = train_tokenizer(tokenizer_text(sentences, pairs), args.vocab_size, args.seed)
    (args.out / "tokenizer.model").write_bytes(tokenizer)

    stats = {
        "frames": sum(len(feats[i]) for i in splits["train"]),
        "seconds": sum(len(feats[i]) for i in splits["train"]) / 100,
        "units": {name: np.mean([len(units[i]) for i in splits[name]]) for name in counts},
        "prompt_units": np.mean([len(p) for p in prompts]),
        "grammar": {name: len(set(make())) for name, make in TEMPLATES.items()},
        "qa": qa_stats(world, pairs, qa_splits, qa_units),
        "tokenizer": tokenizer_stats(tokenizer, sentences, pairs),
    }
    (args.out / "README.md").write_text(readme(args, argv, counts, qa_counts, stats))
    logger.info("wrote %s: average units per utterance after dedup %s", args.out,
                {k: round(float(v), 1) for k, v in stats["units"].items()})


def _statement(answer: str) -> str:
    """What an answer states: "no, the red cup is on the table" -> "the red cup is on the table"."""
    return answer.removeprefix("yes, ").removeprefix("no, ")


def qa_stats(world: World, pairs: list[tuple[str, str]], splits: dict[str, range], units: list[list[int]]) -> dict:
    """Per family: pairs in the grammar and per split, and held-out pairs whose answer states what a train
    answer states (the only way to know a hidden-world answer)."""
    grammar = qa_grammar(world)
    family = {pair: name for name, family_pairs in grammar.items() for pair in family_pairs}
    known = {_statement(pairs[k][1]) for k in splits["train"]}
    table = {name: {"grammar": len(family_pairs), **dict.fromkeys(splits, 0), "stated": 0}
             for name, family_pairs in grammar.items()}
    for split, ks in splits.items():
        for k in ks:
            row = table[family[pairs[k]]]
            row[split] += 1
            row["stated"] += split != "train" and _statement(pairs[k][1]) in known
    return {"families": table, "places": _place_qa(world)[:3],  # where / yes / no about the first object
            "question_units": np.mean([len(units[2 * k]) for k in range(len(pairs))]),
            "answer_units": np.mean([len(units[2 * k + 1]) for k in range(len(pairs))])}


def tokenizer_stats(model: bytes, sentences: list[str], pairs: list[tuple[str, str]]) -> dict:
    """Tokens per word of the corpus text and of the shipped instruction templates, and an example."""
    sp = spm.SentencePieceProcessor(model_proto=model)

    def per_word(texts: list[str]) -> float:
        return sum(len(sp.encode(t)) for t in texts) / sum(len(t.split()) for t in texts)

    templates = shipped_templates("asr") + shipped_templates("tts")
    return {"pieces": sp.get_piece_size(), "sentences": per_word(sentences),
            "qa": per_word([t for pair in pairs for t in pair]), "templates": per_word(templates),
            "example": (templates[0], sp.encode(templates[0], out_type=str))}


def readme(args: argparse.Namespace, argv: list[str] | None, counts: dict[str, int], qa_counts: dict[str, int],
           stats: dict) -> str:
    command = " ".join(["python scripts/make_corpus.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    grammar = ", ".join(f"{name} {n}" for name, n in stats["grammar"].items())
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split("Data")[0].strip()
    versions = f"{espeak}; kaldi-native-fbank {version('kaldi-native-fbank')}, " \
               f"scikit-learn {version('scikit-learn')}, numpy {version('numpy')}, soxr {version('soxr')}, " \
               f"sentencepiece {version('sentencepiece')}"
    units, qa, tok = stats["units"], stats["qa"], stats["tokenizer"]
    families = qa["families"]
    qa_table = "\n".join(f"   | {name} | {row['grammar']} | {row['train']} | {row['valid']} | {row['test']} | "
                         f"{row['stated']} |" for name, row in families.items())
    held_out = sum(row["valid"] + row["test"] for row in families.values())
    stated = sum(row["stated"] for row in families.values())
    kmeans_file = ("`kmeans.bin`: the k-means model (joblib, scikit-learn), to label new audio the same way."
                   if args.save_kmeans else
                   "The k-means model is not shipped: rerun the command with `--save-kmeans` to get `kmeans.bin`.")
    example, pieces = tok["example"]
    where, _, no = qa["places"]
    return f"""# Stage-1 unit corpus (synthetic speech, MFCC k-means units), spoken questions and answers, a tokenizer

A small, real corpus of discrete speech units for the tiny pipeline: unit sequences for stage 1
(`unit_lm`), (speech, transcript) pairs for stage 2, spoken question/answer pairs for stage 3
(chain-of-modality), and a small LLaMA-style text tokenizer. Made on CPU in two to three minutes (two cores)
by `scripts/make_corpus.py`, from the repository root:

    {command}

## How it was made

1. **Text.** {sum(counts.values())} distinct English sentences drawn (seed {args.seed}) from the script's grammar
   of {sum(stats['grammar'].values())} sentences in six families:
   {grammar}.
   Examples: "the red cup is on the table", "seven plus two is nine",
   "there are five blue pens in the box", "the day after monday is tuesday", "birds can fly".
   Each draw picks a family uniformly, then an unused sentence of it.
   The sentences are split before synthesis into {counts['train']} train, {counts['valid']} valid and
   {counts['test']} test sentences, pairwise disjoint: no held-out sentence occurs in train.
2. **Speech.** `espeak-ng -w out.wav -v VOICE -s RATE "text"`, the voice drawn per utterance from
   {', '.join(VOICES)} and the rate from {', '.join(map(str, RATES))} words per minute. espeak-ng writes
   22050 Hz; the audio is resampled to 16 kHz with soxr (`speechgpt_fairseq/speech/audio.py`).
3. **Features.** 13 Kaldi MFCCs (use_energy=False, no dither) + delta + delta-delta = 39 dims at 100
   frames/s, the recipe of fairseq's `examples/hubert/simple_kmeans/dump_mfcc_feature.py` (HuBERT's
   first iteration), computed with kaldi-native-fbank (`speechgpt_fairseq/speech/mfcc.py`).
   Train audio: {stats['frames']} frames ({stats['seconds'] / 60:.1f} minutes).
4. **Units.** MiniBatchKMeans with the settings of fairseq's `learn_kmeans.py`, K = {args.num_units},
   fitted on {min(args.kmeans_frames, stats['frames'])} train frames sampled uniformly (seed {args.seed})
   (`speechgpt_fairseq/speech/kmeans.py`). Every frame is labelled with its nearest centroid and
   consecutive repeats are merged (SpeechGPT's deduplicated units). Average units per utterance after
   dedup: train {units['train']:.1f}, valid {units['valid']:.1f}, test {units['test']:.1f}.
5. **Questions and answers.** {sum(qa_counts.values())} distinct pairs drawn from a second grammar whose answers are
   sentences of the kinds above, with a random stream of their own (seeded from seed {args.seed}), so that
   steps 1-4 do not depend on them. Every question has exactly one answer: computed where it can be
   (arithmetic, comparisons, days and months, facts), otherwise read from a hidden world drawn once per
   seed (where each coloured object is, how many of each are in each container, when the train leaves each
   day). Yes/no questions are answered "yes, STATEMENT" or "no, STATEMENT"; a "no" question asks about a
   decoy drawn with the world. Examples: "what is seven plus two" -> "seven plus two is nine",
   "can snakes walk" -> "no, snakes cannot walk", "{where[0]}" -> "{where[1]}",
   "{no[0]}" -> "{no[1]}".
   Pairs are drawn as the sentences are, then shuffled (small families run out first) and split into
   {qa_counts['train']} train, {qa_counts['valid']} valid and {qa_counts['test']} test pairs: no question is in two splits.

   | family | grammar | train | valid | test | held out, statement in a train answer |
   |---|---|---|---|---|---|
{qa_table}

   {stated} of the {held_out} held-out answers state what some train answer states (as "{no[0]}" tells
   where the {where[0].removeprefix("where is the ")} is); for the hidden world that is the only way to know it.
   Question and answer are each spoken as in step 2 (voice and rate drawn per utterance from the QA stream)
   and labelled with the k-means model of step 4, which never saw them; repeats merged. Average units:
   question {qa['question_units']:.1f}, answer {qa['answer_units']:.1f}.
6. **Tokenizer.** sentencepiece BPE with LLaMA's settings (byte fallback, identity normalization, dummy
   prefix, extra whitespace kept, digits split, whitespace-only pieces; unk=0, bos=1, eos=2, no pad),
   {tok['pieces']} pieces, character coverage 1.0, trained with one thread and no input sampling (the same
   file from run to run) on every sentence, question and answer, and on the text of the stage-2 and stage-3
   prompts made from them: each sentence as ASR and TTS (`speechgpt_fairseq/data/templates/asr.txt`,
   `tts.txt`, in turn), each pair in the four chain-of-modality formats. The prompts are split at the tokens
   the vocabulary adds (units, `<sosp>`, `<eosp>`, `[Human]`, `[SpeechGPT]`, `<eoh>`, `<eos>`), which the text
   encoder never hands to sentencepiece, so the tokenizer is trained on the rest of the markup as the encoder
   meets it: `: `, ` This is input: `, `<eoa>`, `; [ta] `, `; [ua] `, ` Answer in text.`, ` Answer in speech.`.
   Tokens per word: sentences {tok['sentences']:.2f}, questions and answers {tok['qa']:.2f}, the instruction
   templates {tok['templates']:.2f} (e.g. "{example}" -> {' '.join(f'`{p}`' for p in pieces)}).

Tools: {versions}.

## Files

- `train.km`, `valid.km`, `test.km`: fairseq k-means label format, one utterance per line, space-separated
  unit ids in [0, {args.num_units}); {counts['train']}, {counts['valid']} and {counts['test']} lines.
- `train.wrd`, `valid.wrd`, `test.wrd`: the sentence each utterance speaks, line-aligned with the `.km` files
  ((speech, transcript) pairs for stage 2).
- `test.txt`: {counts['test']} prompts for generation, SpeechGPT unit strings without the closing
  `<eosp>`: `<sosp>` followed by the first {PROMPT_FRACTION:.0%} of a held-out utterance's units
  ({stats['prompt_units']:.1f} units on average), e.g. `<sosp><12><7><31>`.
- `qa_train.jsonl`, `qa_valid.jsonl`, `qa_test.jsonl`: {qa_counts['train']}, {qa_counts['valid']} and {qa_counts['test']} lines
  `{{"text_i": QUESTION, "text_r": ANSWER, "units_i": [...], "units_r": [...]}}`, the spoken question and answer
  as lists of unit ids in [0, {args.num_units}), repeats merged: the manifest of `speechgpt build-com`, e.g.

      speechgpt build-com --manifest examples/corpus/qa_train.jsonl --num-units {args.num_units} --out com_train.jsonl

- `tokenizer.model`: the sentencepiece model; as `--vocab examples/corpus/tokenizer.model --num-units
  {args.num_units}` it gives a vocabulary of {tok['pieces']} + {args.num_units} units + 6 SpeechGPT tokens =
  {tok['pieces'] + args.num_units + 6} tokens.

{kmeans_file}
MFCC units carry speaker and channel as much as phonetic content: this corpus exercises the pipeline;
it will not make a speech model worth listening to.
"""


if __name__ == "__main__":
    main()
