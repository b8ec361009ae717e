"""The demo's report: each held-out measure of the trained models beside the untrained ones and its bar, the
answers by relation, the validation curves of the three stages (a PNG), and the spoken chat turn."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.demo.world import PEOPLE

# the cross-entropy without label smoothing (nll_loss): `loss` adds the smoothing term, where a stage sets one
_VALID = re.compile(r"valid on 'valid' subset \|.*\| nll_loss ([0-9.]+) .*\| num_updates (\d+)")
STAGES = {"stage1": "stage 1: unit LM", "stage2": "stage 2: ASR, TTS, text instructions",
          "stage3": "stage 3: chain of modality"}


@dataclass(frozen=True)
class Measure:
    """One line of the report: where its number is (a summary file, a key, a field) and its bar."""

    key: str
    label: str
    file: str  # relative to the stage directory of the trained or the untrained models
    summary_key: str
    field: str = "rate"
    bar: tuple[str, float] | None = None  # ("<=", 3.0): the number must be at most 3.0 (percent)
    trained_only: bool = False  # a measure of the trained model's ASR on references: no untrained figure

    def met(self, value: float | None) -> bool | None:
        if self.bar is None:
            return None
        if value is None:
            return False
        op, limit = self.bar
        return value <= limit if op == "<=" else value >= limit


MEASURES = [
    Measure("asr_wer", "ASR: word error rate on held-out sentences (voices and rates drawn)",
            "stage2/summary-test.json", "text_wer", bar=("<=", 3.0)),
    Measure("tts_uer", "TTS: unit error rate on held-out sentences, against espeak-ng's rendition in the "
            "assistant's voice", "stage2/summary-test.json", "units_uer", bar=("<=", 25.0)),
    Measure("question_exact", "spoken questions: transcript exactly right",
            "stage3/summary-test.json", "text_i_exact", "share"),
    Measure("question_wer", "spoken questions: word error rate of the transcript",
            "stage3/summary-test.json", "text_i_wer"),
    Measure("spoken_right", "spoken questions: text answer right", "stage3/summary-test.json", "text_r_exact",
            "share", bar=(">=", 90.0)),
    Measure("typed_right", "the same questions typed (text in, text out): answer right, the knowledge ceiling",
            "stage3/summary-test_typed.json", "text_r_exact", "share"),
    Measure("answer_uer", "spoken answers: unit error rate against espeak-ng's rendition of the right answer in the "
            "assistant's voice", "stage3/summary-test.json", "units_r_uer", bar=("<=", 30.0)),
    Measure("roundtrip_wer", "spoken answers transcribed by the model's own ASR: word error rate against its text "
            "answer (round trip)", "stage3/roundtrip-test.json", "roundtrip_wer", bar=("<=", 10.0)),
    Measure("roundtrip_reference_wer", "the same transcripts against the right answer",
            "stage3/roundtrip-test.json", "roundtrip_reference_wer"),
    Measure("roundtrip_ceiling_wer", "espeak-ng's rendition of the right answers transcribed by the same ASR: the "
            "round trip's ceiling", "stage3/roundtrip-reference-test.json", "roundtrip_wer", trained_only=True),
]


def validation_curve(log: Path) -> list[tuple[int, float]]:
    """(update, validation cross-entropy in bits per token, without label smoothing) from a fairseq-hydra-train
    log."""
    points = [(int(m.group(2)), float(m.group(1))) for m in map(_VALID.search, log.read_text().splitlines()) if m]
    return sorted(dict(points).items())


def find_log(out: Path, step: str) -> Path:
    found = sorted((out / "logs").glob(f"*-{step}.log"))
    if not found:
        raise FileNotFoundError(f"{out / 'logs'}: no log of step {step}; has the demo run?")
    return found[-1]


def plot_curves(curves: dict[str, list[tuple[int, float]]], untrained: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, (stage, points) in zip(axes, curves.items()):
        ax.plot([u for u, _ in points], [v for _, v in points], marker="o", markersize=3, label="trained")
        ax.axhline(untrained[stage], color="grey", linestyle="--", label="untrained")
        ax.set_title(STAGES[stage], fontsize=10)
        ax.set_xlabel("updates")
        ax.set_ylabel("validation loss (bits/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def scores(out: Path) -> dict[str, dict[str, float | None]]:
    """Every measure, trained and untrained, and the number of examples behind it."""
    table = {}
    for label, root in (("trained", out), ("untrained", out / "untrained")):
        row = {}
        for m in MEASURES:
            if m.trained_only and label == "untrained":
                row[m.key], row[m.key + "_n"] = None, 0
                continue
            summary = json.loads((root / m.file).read_text())
            row[m.key] = summary.get(m.summary_key, {}).get(m.field)
            row[m.key + "_n"] = summary.get(m.summary_key, {}).get("n", 0)
        table[label] = row
    return table


def by_relation(out: Path) -> dict[str, dict[str, list[bool]]]:
    """relation -> {"spoken": [right?], "typed": [right?]} over the held-out questions (fairseq-generate's ids are
    the lines of the stage-3 test files, which follow the corpus's qa_test.jsonl)."""
    relations = [json.loads(line)["relation"] for line in (out / "corpus" / "qa_test.jsonl").read_text().splitlines()]
    table: dict[str, dict[str, list[bool]]] = {}
    for kind, subset in (("spoken", "test"), ("typed", "test_typed")):
        for line in (out / "stage3" / f"scores-{subset}.jsonl").read_text().splitlines():
            row = json.loads(line)
            right = row.get("text_r_wer") == 0.0
            table.setdefault(relations[row["id"]], {"spoken": [], "typed": []})[kind].append(right)
    return table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _bar(m: Measure) -> str:
    return "" if m.bar is None else f"{'≤' if m.bar[0] == '<=' else '≥'} {m.bar[1]:g}%"


def write_report(out: str | Path, times: dict[str, float], wall_seconds: float, quick: bool) -> dict:
    """Write OUT/report/report.md and curves.png; returns the scores, the validation losses and the bars met."""
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    curves = {stage: validation_curve(find_log(out, f"train-{stage}")) for stage in STAGES}
    untrained = {stage: validation_curve(find_log(out, f"untrained-{stage}"))[-1][1] for stage in STAGES}
    plot_curves(curves, untrained, report / "curves.png")
    table = scores(out)
    t, u = table["trained"], table["untrained"]
    met = {m.key: m.met(t[m.key]) for m in MEASURES if m.bar}
    turn = next(json.loads(line) for line in find_log(out, "chat").read_text().splitlines() if line.startswith("{"))
    relations = by_relation(out)

    def share(values: list[bool]) -> str:
        return f"{sum(values)}/{len(values)}"

    rows = "\n".join(f"| {m.label} | {t[m.key + '_n']} | {_fmt(t[m.key])} | {_fmt(u[m.key])} | {_bar(m)} | "
                     f"{'' if m.key not in met else 'met' if met[m.key] else '**not met**'} |" for m in MEASURES)
    relation_rows = "\n".join(f"| {name} | {share(r['spoken'])} | {share(r['typed'])} |"
                              for name, r in sorted(relations.items()))
    loss_rows = "\n".join(f"| {STAGES[s]} | {untrained[s]:.2f} | {p[0][1]:.2f} (update {p[0][0]}) | "
                          f"{min(v for _, v in p):.2f} | {p[-1][1]:.2f} (update {p[-1][0]}) |"
                          for s, p in curves.items() if p)
    steps = "\n".join(f"| {name} | {seconds:.0f} s |" for name, seconds in times.items())
    spoken = (f"The spoken answer is `{Path(turn['wav']).name}` ({turn['seconds']:.1f} s)." if turn.get("wav") else
              f"No vocoder was given, so the spoken answer stays units: `{len(turn['units'])}` units.")
    verdict = ("bars not applied (quick run)" if quick else
               f"{sum(map(bool, met.values()))} of {len(met)} bars met" +
               ("" if all(met.values()) else ": not met: " + ", ".join(k for k, v in met.items() if not v)))
    text = f"""# SpeechGPT demo report

{'A quick run (tiny corpus, a few updates): the numbers show the pipeline runs, not that it learns.' if quick else
 'The full demo: a spoken corpus made with espeak-ng, units, three training stages, evaluation, a chat turn.'}
Wall time: {wall_seconds / 60:.1f} minutes; {verdict}.

## The task

{len(PEOPLE)} people, and for each where they live, their pet, job, favourite colour and instrument. The
knowledge is taught in text only: stage 2 mixes text instructions that ask about every fact (in several
phrasings) into its ASR and TTS examples, whose sentences use the same words but never state a fact (the answers'
shapes are spoken with every person and every value alike). Stage 3 teaches the chain of modality on spoken
questions about some (person, relation) pairs; the held-out spoken questions ask about the others, so each is a
combination never heard, whose answer was only read. Answers name what the question does not (the city, the
pet, ...), so they cannot be copied from it. Held-out questions are spoken in voices and rates drawn for them;
the model answers in the assistant's voice, the one all its speech targets are in.

## Held-out test set, trained against untrained

The untrained models have the same architecture, data and vocabulary, and no update (learning rate 0).

| measure | examples | trained | untrained | bar | |
|---|---|---|---|---|---|
{rows}

Held-out questions answered right, by relation (trained):

| relation | spoken | typed |
|---|---|---|
{relation_rows}

## Validation loss (cross-entropy in bits per token, without label smoothing)

| stage | untrained | first validation | best | last |
|---|---|---|---|---|
{loss_rows}

![validation loss of the three stages](curves.png)

## One spoken chat turn

Question (audio): `{turn['question']}`

- heard (the model's transcript): {turn.get('transcript')!r}
- answer: {turn.get('text')!r}
- {spoken}

## Steps

| step | wall time |
|---|---|
{steps}
"""
    with atomic_file(report / "report.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return {**table, "validation": {s: {"untrained": untrained[s], "trained": min(v for _, v in p)}
                                    for s, p in curves.items()},
            "met": met, "verdict": verdict}
