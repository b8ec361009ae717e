"""The demo's spoken corpus: grammar sentences and question/answer pairs spoken by espeak-ng, as audio files
with fairseq manifests, transcripts and a tokenizer; the units come later, from speech2unit.

    OUT/wav/00042.wav                  a sentence (espeak-ng's 22050 Hz; speech2unit resamples)
    OUT/{train,valid,test}.tsv         fairseq audio manifests of the sentences (root, then path<TAB>samples)
    OUT/{train,valid,test}.wrd         their transcripts, line-aligned with the manifests
    OUT/qa/00007_q.wav, 00007_a.wav    a spoken question and its spoken answer
    OUT/qa_{split}.jsonl               {"text_i": question, "text_r": answer}, one per pair
    OUT/qa_{split}_questions.tsv       manifests of the spoken questions and answers, line-aligned with the
    OUT/qa_{split}_answers.tsv         .jsonl (speech2unit's output on them fills build-com's --units-i/-r)
    OUT/tokenizer.model                a LLaMA-style sentencepiece model of all the text and prompt markup

Sentences are split into train / valid / test before synthesis, so a held-out sentence never occurs in train;
no question is in two splits. Everything is seeded.
"""
from __future__ import annotations

import json
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechgpt_fairseq.atomic_files import atomic_dir
from speechgpt_fairseq.demo.grammar import RATES, VOICES, make_world, qa_stream, sample_qa, sample_sentences
from speechgpt_fairseq.demo.tokenizer import tokenizer_text, train_tokenizer

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Utterance:
    path: str  # relative to the corpus directory
    text: str
    voice: str
    rate: int


def speak(utterance: Utterance, root: Path) -> int:
    """Synthesize one utterance with espeak-ng; returns its number of samples."""
    path = root / utterance.path
    proc = subprocess.run(["espeak-ng", "-w", str(path), "-v", utterance.voice, "-s", str(utterance.rate),
                           utterance.text], capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"espeak-ng failed on {utterance.text!r} (voice {utterance.voice}): {proc.stderr.strip()}")
    return sf.info(path).frames


def make_corpus(out: str | Path, sentences: tuple[int, int, int] = (2000, 200, 100),
                pairs: tuple[int, int, int] = (1500, 150, 100), seed: int = 1, vocab_size: int = 1000,
                workers: int = 2, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Write the corpus to `out` (whole or not at all); returns the counts per split."""
    out = Path(out).absolute()
    rng = random.Random(seed)
    texts = sample_sentences(sum(sentences), rng)
    spoken = [Utterance(f"wav/{i:05d}.wav", t, rng.choice(VOICES), rng.choice(RATES)) for i, t in enumerate(texts)]
    qa_rng = qa_stream(seed)  # a stream of its own: the sentences do not depend on the pairs
    qa = sample_qa(sum(pairs), make_world(qa_rng), qa_rng)
    questions = [Utterance(f"qa/{k:05d}_q.wav", q, qa_rng.choice(VOICES), qa_rng.choice(RATES))
                 for k, (q, _) in enumerate(qa)]
    answers = [Utterance(f"qa/{k:05d}_a.wav", a, qa_rng.choice(VOICES), qa_rng.choice(RATES))
               for k, (_, a) in enumerate(qa)]

    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "wav").mkdir()
        (tmp / "qa").mkdir()
        jobs = spoken + questions + answers
        with ThreadPoolExecutor(workers) as pool:
            samples = list(tqdm(pool.map(lambda u: speak(u, tmp), jobs), total=len(jobs), desc="espeak-ng",
                                unit=" utt", disable=not show_progress))
        count = dict(zip((u.path for u in jobs), samples))

        def manifest(name: str, utterances: list[Utterance]) -> None:
            lines = [str(out)] + [f"{u.path}\t{count[u.path]}" for u in utterances]
            (tmp / name).write_text("\n".join(lines) + "\n")

        for split, (a, b) in zip(SPLITS, _bounds(sentences)):
            manifest(f"{split}.tsv", spoken[a:b])
            (tmp / f"{split}.wrd").write_text("".join(u.text + "\n" for u in spoken[a:b]))
        for split, (a, b) in zip(SPLITS, _bounds(pairs)):
            manifest(f"qa_{split}_questions.tsv", questions[a:b])
            manifest(f"qa_{split}_answers.tsv", answers[a:b])
            (tmp / f"qa_{split}.jsonl").write_text(
                "".join(json.dumps({"text_i": q, "text_r": r}) + "\n" for q, r in qa[a:b]))
        (tmp / "tokenizer.model").write_bytes(train_tokenizer(tokenizer_text(texts, qa), vocab_size, seed))
    return {"sentences": dict(zip(SPLITS, sentences)), "pairs": dict(zip(SPLITS, pairs)),
            "seconds": sum(samples) / sf.info(out / spoken[0].path).samplerate}


def _bounds(counts: tuple[int, int, int]) -> list[tuple[int, int]]:
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    return list(zip([0] + ends[:-1], ends))
