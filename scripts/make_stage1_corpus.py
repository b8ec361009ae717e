#!/usr/bin/env python
"""Make the small stage-1 unit corpus that ships in examples/stage1/corpus/.

English sentences from a small grammar are spoken by espeak-ng (several voices and rates), turned into
39-dim MFCC features (HuBERT's first k-means iteration), clustered with k-means, labelled, and the
consecutive repeats merged, as SpeechGPT does. Sentences are split into train / valid / test before
synthesis, so held-out sentences never occur in train. Everything is seeded:

    python scripts/make_stage1_corpus.py --out examples/stage1/corpus

Writes train.km, valid.km (fairseq k-means label lines), test.txt (prompts: `<sosp>` + the first 30% of
each held-out utterance's units, no `<eosp>`), README.md, and kmeans.bin with --save-kmeans.
"""
from __future__ import annotations

import argparse
import logging
import random
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from itertools import product
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechgpt_fairseq.speech.audio import read_audio
from speechgpt_fairseq.speech.kmeans import KmeansLabeler, fit_kmeans, save_kmeans
from speechgpt_fairseq.speech.mfcc import mfcc_features
from speechgpt_fairseq.speech.units import dedup_units, format_kmeans_labels, format_unit_string

logger = logging.getLogger("make_stage1_corpus")

VOICES = ["en", "en-us", "en+f3", "en+m3"]
RATES = [130, 155, 180, 205]  # words per minute; espeak-ng's default is 175
PROMPT_FRACTION = 0.3

# ---------------------------------------------------------------------------------------------- grammar

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..100 in words: 42 -> "forty two"."""
    if n < 20:
        return _ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])


COLOURS = "red blue green yellow black white orange purple brown grey".split()
OBJECTS = "cup book ball box pen lamp chair hat key bag phone plate".split()
PLURAL = {o: o + ("es" if o.endswith("x") else "s") for o in OBJECTS}
PLACES = "table desk bed shelf door window sofa floor chair box".split()
RELATIONS = ["on", "under", "next to", "behind", "in front of", "near"]
CONTAINERS = "box bag basket drawer room".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = ("january february march april may june july august september october november "
          "december").split()
ABILITIES = {  # true facts only
    "fish": ["swim"], "birds": ["fly", "sing"], "dogs": ["run", "swim", "bark"], "cats": ["climb", "run"],
    "frogs": ["jump", "swim"], "horses": ["run", "jump"], "ducks": ["fly", "swim", "walk"],
    "snakes": ["swim", "climb"], "bees": ["fly"], "people": ["talk", "read", "walk", "sing"],
}
PROPERTIES = ["the sun is hot", "snow is cold", "ice is cold", "fire is hot", "the sky is blue",
              "grass is green", "milk is white", "coal is black", "lemons are sour", "honey is sweet",
              "the sea is salty", "rocks are hard", "pillows are soft", "the night is dark",
              "a week has seven days", "a year has twelve months", "a day has twenty four hours",
              "an hour has sixty minutes", "water is wet", "feathers are light"]


def _place_sentences() -> list[str]:
    return [f"the {c} {o} is {r} the {p}" for c, o, r, p in product(COLOURS, OBJECTS, RELATIONS, PLACES) if o != p]


def _count_sentences() -> list[str]:
    return [f"there are {number_words(n)} {c} {PLURAL[o]} in the {b}"
            for n, c, o, b in product(range(2, 13), COLOURS, OBJECTS, CONTAINERS) if o != b]


def _arithmetic_sentences() -> list[str]:
    out = []
    for a, b in product(range(11), repeat=2):
        out.append(f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}")
        out.append(f"{number_words(a)} times {number_words(b)} is {number_words(a * b)}")
        if a >= b:
            out.append(f"{number_words(a)} minus {number_words(b)} is {number_words(a - b)}")
    return out


def _comparison_sentences() -> list[str]:
    return [f"{number_words(a)} is {'more' if a > b else 'less'} than {number_words(b)}"
            for a, b in product(range(21), repeat=2) if a != b]


def _calendar_and_time_sentences() -> list[str]:
    out = [f"the day after {d} is {DAYS[(i + 1) % 7]}" for i, d in enumerate(DAYS)]
    out += [f"the day before {d} is {DAYS[i - 1]}" for i, d in enumerate(DAYS)]
    out += [f"the month after {m} is {MONTHS[(i + 1) % 12]}" for i, m in enumerate(MONTHS)]
    out += [f"it is {number_words(h)} o'clock in the {part}" for h in range(1, 13)
            for part in ("morning", "afternoon", "evening")]
    out += [f"the train leaves at {number_words(h)} {number_words(m)} on {d}" for h in range(1, 13)
            for m in (15, 30, 45) for d in DAYS]
    return out


def _fact_sentences() -> list[str]:
    return [f"{animal} can {verb}" for animal, verbs in ABILITIES.items() for verb in verbs] + PROPERTIES


TEMPLATES = {
    "places": _place_sentences,
    "counting": _count_sentences,
    "arithmetic": _arithmetic_sentences,
    "comparisons": _comparison_sentences,
    "calendar and time": _calendar_and_time_sentences,
    "facts": _fact_sentences,
}


def sample_sentences(n: int, rng: random.Random) -> list[str]:
    """`n` distinct sentences: each draw picks a sentence family uniformly, then an unused sentence of it."""
    pools = {name: sorted(set(make())) for name, make in TEMPLATES.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    total = sum(map(len, pools.values()))
    if n > total:
        raise SystemExit(f"asked for {n} sentences but the grammar has only {total}")
    out = []
    while len(out) < n:
        name = rng.choice([k for k, pool in pools.items() if pool])
        out.append(pools[name].pop())
    return out


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


def featurize_all(jobs: list[tuple[int, str, str, int]], num_workers: int) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="stage1_corpus_") as tmp, ThreadPoolExecutor(num_workers) as pool:
        results = pool.map(lambda job: speak_and_featurize(job, Path(tmp)), jobs)
        return list(tqdm(results, total=len(jobs), desc="espeak-ng + MFCC", unit="utt"))


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-utterances", type=int, nargs=3, default=[2000, 200, 50], metavar=("TRAIN", "VALID", "TEST"),
                   help="utterances per split (distinct sentences)")
    p.add_argument("--num-units", type=int, default=100, help="k-means clusters K")
    p.add_argument("--seed", type=int, default=1, help="seed for sentences, voices, frame sampling and k-means")
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

    feats = featurize_all(jobs, args.workers)
    train_frames = np.concatenate([feats[i] for i in splits["train"]])
    sample = np.random.default_rng(args.seed).permutation(len(train_frames))[:args.kmeans_frames]
    logger.info("fitting k-means (K=%d) on %d of %d train frames", args.num_units, len(sample), len(train_frames))
    model = fit_kmeans(train_frames[sample], args.num_units, seed=args.seed)
    labeler = KmeansLabeler(model)
    units = [dedup_units(labeler(f).tolist()) for f in feats]

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        (args.out / f"{name}.km").write_text("".join(format_kmeans_labels(units[i]) + "\n" for i in splits[name]))
        (args.out / f"{name}.wrd").write_text("".join(sentences[i] + "\n" for i in splits[name]))
    prompts = [units[i][:max(1, round(PROMPT_FRACTION * len(units[i])))] for i in splits["test"]]
    (args.out / "test.txt").write_text("".join(format_unit_string(p, closed=False) + "\n" for p in prompts))
    if args.save_kmeans:
        save_kmeans(model, args.out / "kmeans.bin")

    stats = {
        "frames": sum(len(feats[i]) for i in splits["train"]),
        "seconds": sum(len(feats[i]) for i in splits["train"]) / 100,
        "units": {name: np.mean([len(units[i]) for i in splits[name]]) for name in counts},
        "prompt_units": np.mean([len(p) for p in prompts]),
        "grammar": {name: len(set(make())) for name, make in TEMPLATES.items()},
    }
    (args.out / "README.md").write_text(readme(args, argv, counts, stats))
    logger.info("wrote %s: average units per utterance after dedup %s", args.out,
                {k: round(float(v), 1) for k, v in stats["units"].items()})


def readme(args: argparse.Namespace, argv: list[str] | None, counts: dict[str, int], stats: dict) -> str:
    command = " ".join(["python scripts/make_stage1_corpus.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    grammar = ", ".join(f"{name} {n}" for name, n in stats["grammar"].items())
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split("Data")[0].strip()
    versions = f"{espeak}; kaldi-native-fbank {version('kaldi-native-fbank')}, " \
               f"scikit-learn {version('scikit-learn')}, numpy {version('numpy')}, soxr {version('soxr')}"
    units = stats["units"]
    kmeans_file = ("`kmeans.bin`: the k-means model (joblib, scikit-learn), to label new audio the same way."
                   if args.save_kmeans else
                   "The k-means model is not shipped: rerun the command with `--save-kmeans` to get `kmeans.bin`.")
    return f"""# Stage-1 unit corpus (synthetic speech, MFCC k-means units)

A small, real corpus of discrete speech units for stage 1 (`unit_lm`), made on CPU in about a minute
(two cores) by `scripts/make_stage1_corpus.py`, from the repository root:

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

Tools: {versions}.

## Files

- `train.km`, `valid.km`, `test.km`: fairseq k-means label format, one utterance per line, space-separated
  unit ids in [0, {args.num_units}); {counts['train']}, {counts['valid']} and {counts['test']} lines.
- `train.wrd`, `valid.wrd`, `test.wrd`: the sentence each utterance speaks, line-aligned with the `.km` files
  ((speech, transcript) pairs for stage 2).
- `test.txt`: {counts['test']} prompts for generation, SpeechGPT unit strings without the closing
  `<eosp>`: `<sosp>` followed by the first {PROMPT_FRACTION:.0%} of a held-out utterance's units
  ({stats['prompt_units']:.1f} units on average), e.g. `<sosp><12><7><31>`.

{kmeans_file}
MFCC units carry speaker and channel as much as phonetic content: this corpus exercises the pipeline;
it will not make a speech model worth listening to.
"""


if __name__ == "__main__":
    main()
