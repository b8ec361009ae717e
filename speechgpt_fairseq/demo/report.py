"""The demo's report: held-out scores of the trained models against the untrained ones, the validation curves
of the three stages (a PNG), and the spoken chat turn."""
from __future__ import annotations

import json
import re
from pathlib import Path

from speechgpt_fairseq.atomic_files import atomic_file

_VALID = re.compile(r"valid on 'valid' subset \| loss ([0-9.]+) .*\| num_updates (\d+)")
STAGES = {"stage1": "stage 1: unit LM", "stage2": "stage 2: ASR / TTS instructions",
          "stage3": "stage 3: chain of modality"}
ASR_WER_LIMIT = 20.0  # percent: the demo's bar for "speech recognised"


def validation_curve(log: Path) -> list[tuple[int, float]]:
    """(update, validation loss in bits per token) from a fairseq-hydra-train log."""
    points = [(int(m.group(2)), float(m.group(1))) for m in map(_VALID.search, log.read_text().splitlines()) if m]
    return sorted(dict(points).items())


def find_log(out: Path, step: str) -> Path:
    found = sorted((out / "logs").glob(f"*-{step}.log"))
    if not found:
        raise FileNotFoundError(f"{out / 'logs'}: no log of step {step}; has the demo run?")
    return found[-1]


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, (stage, points) in zip(axes, curves.items()):
        ax.plot([u for u, _ in points], [v for _, v in points], marker="o", markersize=3)
        ax.set_title(STAGES[stage], fontsize=10)
        ax.set_xlabel("updates")
        ax.set_ylabel("validation loss (bits/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_summary(path: Path) -> dict:
    return json.loads(path.read_text())


def metric(summary: dict, key: str, field: str = "rate") -> float | None:
    return summary.get(key, {}).get(field)


def scores(out: Path) -> dict[str, dict[str, float | None]]:
    """The held-out numbers, trained and untrained."""
    table = {}
    for label, root in (("trained", out), ("untrained", out / "untrained")):
        s2, s3 = read_summary(root / "stage2" / "summary.json"), read_summary(root / "stage3" / "summary.json")
        table[label] = {"asr_wer": metric(s2, "text_wer"), "tts_uer": metric(s2, "units_uer"),
                        "com_transcript_wer": metric(s3, "text_i_wer"),
                        "com_answer_right": metric(s3, "text_r_exact", "share"),
                        "com_answer_wer": metric(s3, "text_r_wer"), "com_speech_uer": metric(s3, "units_r_uer"),
                        "asr_n": metric(s2, "text_wer", "n"), "tts_n": metric(s2, "units_uer", "n"),
                        "com_n": metric(s3, "text_r_exact", "n")}
    return table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def write_report(out: str | Path, times: dict[str, float], wall_seconds: float, quick: bool) -> dict:
    """Write OUT/report/report.md and curves.png; returns the scores (and whether the ASR bar was met)."""
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    curves = {stage: validation_curve(find_log(out, f"train-{stage}")) for stage in STAGES}
    plot_curves(curves, report / "curves.png")
    table = scores(out)
    turn = next(json.loads(line) for line in find_log(out, "chat").read_text().splitlines() if line.startswith("{"))
    t, u = table["trained"], table["untrained"]
    passed = t["asr_wer"] is not None and t["asr_wer"] <= ASR_WER_LIMIT
    bar = ("not applied (quick run)" if quick else
           f"{'met' if passed else 'NOT met'}: ASR word error rate {_fmt(t['asr_wer'])}, the bar is "
           f"{ASR_WER_LIMIT:.0f}%")
    rows = [("ASR: word error rate of the transcripts (lower is better)", "asr_wer", "asr_n"),
            ("TTS: unit error rate against espeak-ng's own speech (lower is better)", "tts_uer", "tts_n"),
            ("Chain of modality: text answer right (higher is better)", "com_answer_right", "com_n"),
            ("Chain of modality: word error rate of the transcribed question", "com_transcript_wer", "com_n"),
            ("Chain of modality: word error rate of the text answer", "com_answer_wer", "com_n"),
            ("Chain of modality: unit error rate of the spoken answer", "com_speech_uer", "com_n")]
    lines = [f"| {name} | {t[n] or 0} | {_fmt(t[key])} | {_fmt(u[key])} |" for name, key, n in rows]
    steps = "\n".join(f"| {name} | {seconds:.0f} s |" for name, seconds in times.items())
    spoken = (f"The spoken answer is `{Path(turn['wav']).name}` ({turn['seconds']:.1f} s)." if turn.get("wav") else
              f"No vocoder was given, so the spoken answer stays units: `{len(turn['units'])}` units.")
    text = f"""# SpeechGPT demo report

{'A quick run (tiny corpus, a few updates): the numbers show the pipeline runs, not that it learns.' if quick else
 'The full demo: a spoken corpus made with espeak-ng, units, three training stages, evaluation, a chat turn.'}
Wall time: {wall_seconds / 60:.1f} minutes. ASR bar: {bar}.

## Held-out test set, trained against untrained

The untrained model has the same architecture, data and vocabulary, and no update (learning rate 0).
Held-out sentences and questions never occur in training.

| metric | examples | trained | untrained |
|---|---|---|---|
{chr(10).join(lines)}

## Validation curves

![validation loss of the three stages](curves.png)

{chr(10).join(f"- {STAGES[s]}: {p[0][1]:.2f} -> {p[-1][1]:.2f} bits/token over {p[-1][0]} updates"
              for s, p in curves.items() if p)}

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
    return {**table, "passed": passed}
