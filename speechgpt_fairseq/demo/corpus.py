"""The demo's spoken corpus: sentences and questions about the demo's world (world.py) spoken by espeak-ng, the
world's knowledge as text instructions, and a tokenizer; the units come later, from speech2unit.

    OUT/wav/00042.wav, 00042_a.wav   sentence 42 in a voice and rate drawn for it, and in the assistant's voice
    OUT/{train,valid,test}.tsv       fairseq audio manifests of the sentences in drawn voices (ASR inputs, stage 1)
    OUT/{split}_assistant.tsv        the same sentences in the assistant's voice (TTS targets)
    OUT/{split}.wrd                  their transcripts, line-aligned with both manifests
    OUT/say_{split}.jsonl            {"text_i": "say SENTENCE", "text_r": SENTENCE}, line-aligned likewise: text
                                     instructions answered in speech (the assistant's rendition), for stage 3
    OUT/shapes.tsv, shapes_assistant.tsv   the answer shapes' lines of train.tsv and train_assistant.tsv
    OUT/echo.jsonl                   {"text_i": SHAPE, "text_r": SHAPE}, line-aligned with them: an answer's shape
                                     heard (drawn voice), written down and said back (the assistant's), for stage 3
    OUT/qa/test_q0007.wav            a spoken question of a split (a drawn voice and rate)
    OUT/qa/a0012.wav                 a spoken answer (the assistant's voice), one per distinct question
    OUT/qa_{split}.jsonl             {"text_i": question, "text_r": answer, "person", "relation"}, one per spoken
                                     question: every question of the split, spoken several times
    OUT/qa_{split}_questions.tsv     manifests of the spoken questions and answers, line-aligned with the .jsonl
    OUT/qa_{split}_answers.tsv       (speech2unit's output on them fills build-com's --units-i/-r)
    OUT/qa_train_swapped.tsv         line-aligned with qa_train.jsonl: another training question's speech, of the same
                                     relation and another person (a transcript given with speech that does not say it)
    OUT/knowledge.jsonl              {"instruction", "output"}: the text instructions that teach the world
    OUT/knowledge_com.jsonl          {"text_i", "text_r"}: the same, for stage 3's chain-shaped text (build-com's
                                     t2t_restated: the question restated as a transcript, then answered)
    OUT/tokenizer.model              a LLaMA-style sentencepiece model of all the text and prompt markup

Sentences are split into train / valid / test before synthesis, so a held-out sentence is never heard in
training; the training sentences also hold every answer's shape with every person and value (world.py's
answer_shapes: they state nothing). Questions are split as world.py says. Everything is seeded.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechgpt_fairseq.atomic_files import atomic_dir, check_output_dir
from speechgpt_fairseq.demo.tokenizer import tokenizer_text, train_tokenizer
from speechgpt_fairseq.demo.world import (ASSISTANT_RATE, ASSISTANT_VOICE, RATES, SAY, SPLITS, VOICES, answer_shapes,
                                          make_world, sample_sentences)


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


# what make_corpus writes into its directory: --overwrite replaces one holding nothing else
CORPUS_FILES = re.compile(r"wav|qa|tokenizer\.model|knowledge\.jsonl|\w+\.(tsv|wrd|jsonl)")


def is_corpus_file(name: str) -> bool:
    return CORPUS_FILES.fullmatch(name) is not None


def make_corpus(out: str | Path, sentences: tuple[int, int, int] = (4000, 200, 100),
                renditions: tuple[int, int, int] = (10, 2, 3), seed: int = 1, vocab_size: int = 1000,
                workers: int = 2, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Write the corpus to `out` (whole or not at all): `sentences` per split (and the answer shapes in training),
    and every question of a split spoken `renditions` times in drawn voices and rates. Returns the counts per
    split."""
    out = Path(out).absolute()
    check_output_dir(out, overwrite, ours=is_corpus_file)
    rng = random.Random(seed)
    qa_rng = random.Random(f"qa-{seed}")  # a stream of its own: the sentences do not depend on the world
    world = make_world(qa_rng)
    questions = {split: world.questions(split) for split in SPLITS}
    # the answers' shapes with every person and value join the training sentences: without them the ASR read the
    # right answer's speech wrong in 58% of its words ("ben likes green" -> "ben likes grace") and the model said
    # "ben likes ben" for it; with them, 0%
    shapes = answer_shapes()
    sampled = sample_sentences(sum(sentences), rng)
    texts = sampled[:sentences[0]] + shapes + sampled[sentences[0]:]
    per_split = (sentences[0] + len(shapes), *sentences[1:])  # sentences written per split
    drawn = [Utterance(f"wav/{i:05d}.wav", t, rng.choice(VOICES), rng.choice(RATES)) for i, t in enumerate(texts)]
    assistant = [Utterance(f"wav/{i:05d}_a.wav", t, ASSISTANT_VOICE, ASSISTANT_RATE) for i, t in enumerate(texts)]
    answers = {q: Utterance(f"qa/a{k:04d}.wav", q.answer, ASSISTANT_VOICE, ASSISTANT_RATE)
               for k, q in enumerate(world.questions())}
    spoken = {split: [] for split in SPLITS}  # (question, its spoken rendition) in order
    for split, n in zip(SPLITS, renditions):
        for _ in range(n):
            for q in questions[split]:
                spoken[split].append((q, Utterance(f"qa/{split}_q{len(spoken[split]):04d}.wav", q.text,
                                                   qa_rng.choice(VOICES), qa_rng.choice(RATES))))
    knowledge = world.knowledge()

    with atomic_dir(out, overwrite=overwrite, ours=is_corpus_file) as tmp:
        (tmp / "wav").mkdir()
        (tmp / "qa").mkdir()
        jobs = [*drawn, *assistant, *answers.values(), *(u for split in SPLITS for _, u in spoken[split])]
        with ThreadPoolExecutor(workers) as pool:
            samples = list(tqdm(pool.map(lambda u: speak(u, tmp), jobs), total=len(jobs), desc="espeak-ng",
                                unit=" utt", disable=not show_progress))
        count = dict(zip((u.path for u in jobs), samples))

        def manifest(name: str, utterances: list[Utterance]) -> None:
            lines = [str(out)] + [f"{u.path}\t{count[u.path]}" for u in utterances]
            (tmp / name).write_text("\n".join(lines) + "\n")

        for split, (a, b) in zip(SPLITS, _bounds(per_split)):
            manifest(f"{split}.tsv", drawn[a:b])
            manifest(f"{split}_assistant.tsv", assistant[a:b])
            (tmp / f"{split}.wrd").write_text("".join(u.text + "\n" for u in drawn[a:b]))
            (tmp / f"say_{split}.jsonl").write_text("".join(
                json.dumps({"text_i": SAY.format(sentence=u.text), "text_r": u.text}) + "\n" for u in drawn[a:b]))
        first_shape = sentences[0]  # the shapes follow the sampled training sentences
        manifest("shapes.tsv", drawn[first_shape:first_shape + len(shapes)])
        manifest("shapes_assistant.tsv", assistant[first_shape:first_shape + len(shapes)])
        (tmp / "echo.jsonl").write_text("".join(json.dumps({"text_i": t, "text_r": t}) + "\n" for t in shapes))
        manifest("qa_train_swapped.tsv", swapped_speech(spoken["train"], random.Random(f"swap-{seed}")))
        for split in SPLITS:
            manifest(f"qa_{split}_questions.tsv", [u for _, u in spoken[split]])
            manifest(f"qa_{split}_answers.tsv", [answers[q] for q, _ in spoken[split]])
            (tmp / f"qa_{split}.jsonl").write_text("".join(
                json.dumps({"text_i": q.text, "text_r": q.answer, "person": q.person, "relation": q.relation}) + "\n"
                for q, _ in spoken[split]))
        (tmp / "knowledge.jsonl").write_text(
            "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in knowledge))
        (tmp / "knowledge_com.jsonl").write_text(
            "".join(json.dumps({"text_i": q, "text_r": a}) + "\n" for q, a in knowledge))
        pairs = [(q.text, q.answer) for q in world.questions()] + knowledge + [(SAY.format(sentence=t), t) for t in texts]
        (tmp / "tokenizer.model").write_bytes(train_tokenizer(tokenizer_text(texts, pairs), vocab_size, seed))
    return {"sentences": dict(zip(SPLITS, per_split)),
            "questions": {split: len(questions[split]) for split in SPLITS},
            "spoken questions": {split: len(spoken[split]) for split in SPLITS},
            "knowledge": len(knowledge),
            "seconds": sum(samples) / sf.info(out / drawn[0].path).samplerate}


def swapped_speech(spoken: list[tuple], rng: random.Random) -> list[Utterance]:
    """For each (question, utterance), the utterance of a drawn other question of the same relation about another
    person."""
    def others(q):
        return [u for other, u in spoken if other.relation == q.relation and other.person != q.person]
    return [rng.choice(others(q)) for q, _ in spoken]


def _bounds(counts: tuple[int, int, int]) -> list[tuple[int, int]]:
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    return list(zip([0] + ends[:-1], ends))
