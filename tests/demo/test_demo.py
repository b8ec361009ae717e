"""The demo end to end in its quick form (tiny corpus, a few updates, no bar applied): every command runs and
is printed, the report holds the scores fairseq-generate and speechgpt score produced, and a second run
redoes nothing. And the spoken corpus it starts from."""
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import soundfile as sf

from speechgpt_fairseq.demo.corpus import make_corpus


@pytest.fixture(scope="module")
def demo(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    run = cli("speechgpt", "demo", "--out", out, "--quick", cwd=out.parent)
    return out, run.stdout


def test_every_command_is_printed_and_ran(demo):
    out, stdout = demo
    commands = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == len(list((out / "logs").glob("*.done"))) == len(list((out / "logs").glob("*.log")))
    for program in ("speechgpt make-corpus", "speechgpt learn-kmeans", "speechgpt speech2unit",
                    "speechgpt prepare-units", "speechgpt build-cross-modal", "speechgpt build-com",
                    "speechgpt prepare-sft", "fairseq-hydra-train", "fairseq-generate", "speechgpt score",
                    "speechgpt fit-exemplar-vocoder", "speechgpt chat"):
        assert any(c.startswith(program + " ") for c in commands), program
    for stage in ("stage1", "stage2", "stage3"):
        assert (out / stage / "checkpoints" / "checkpoint_best.pt").is_file()


def test_report_holds_the_measured_scores(demo):
    out, stdout = demo
    report = (out / "report" / "report.md").read_text()
    assert (out / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label, root in (("trained", out), ("untrained", out / "untrained")):
        summary = json.loads((root / "stage2" / "summary.json").read_text())
        row = re.search(r"\| ASR: word error rate[^|]*\| (\d+) \| ([0-9.]+)% \| ([0-9.]+)% \|", report)
        assert int(row.group(1)) == summary["text_wer"]["n"]
        assert float(row.group(2 if label == "trained" else 3)) == pytest.approx(summary["text_wer"]["rate"], abs=0.05)
    turn = json.loads((out / "logs").joinpath(next(p.name for p in (out / "logs").glob("*-chat.log"))).read_text()
                      .splitlines()[-1])
    assert turn["question"].endswith("_q.wav") and turn["prompt"].startswith("[Human]: <sosp><")
    assert f"Question (audio): `{turn['question']}`" in report
    assert "quick run" in report and f"report: {out / 'report' / 'report.md'}" in stdout


def test_a_second_run_redoes_nothing(cli, demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in (out / "stage3" / "checkpoints").iterdir()}
    run = cli("speechgpt", "demo", "--out", out, "--quick")
    lines = [line for line in run.stdout.splitlines() if line.startswith(("+ ", "= "))]
    assert lines and all(line.startswith("= ") for line in lines)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "stage3" / "checkpoints").iterdir()}


def test_make_corpus_splits_and_manifests(tmp_path):
    out = tmp_path / "corpus"
    stats = make_corpus(out, sentences=(12, 4, 4), pairs=(6, 2, 2), vocab_size=400, show_progress=False)
    assert stats["sentences"] == {"train": 12, "valid": 4, "test": 4}
    texts = {s: (out / f"{s}.wrd").read_text().splitlines() for s in ("train", "valid", "test")}
    assert not set(texts["train"]) & (set(texts["valid"]) | set(texts["test"]))  # held out before synthesis
    for name in ("train", "valid", "test", "qa_test_questions", "qa_test_answers"):
        root, *lines = (out / f"{name}.tsv").read_text().splitlines()
        assert Path(root) == out.absolute()
        for line in lines:
            path, samples = line.split("\t")
            assert sf.info(out / path).frames == int(samples) > 0
    qa = [json.loads(line) for line in (out / "qa_test.jsonl").read_text().splitlines()]
    assert len(qa) == 2 == len((out / "qa_test_questions.tsv").read_text().splitlines()) - 1
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 400
    with pytest.raises(ValueError, match="exists and is not empty"):
        make_corpus(out, sentences=(2, 1, 1), pairs=(1, 1, 1), show_progress=False)
    assert len((out / "train.wrd").read_text().splitlines()) == 12  # the existing corpus is untouched
