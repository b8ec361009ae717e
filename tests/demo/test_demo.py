"""The demo end to end in its quick form (tiny corpus, a few updates, no bar applied): every command runs and
is printed, the report holds the scores fairseq-generate and speechgpt score produced, and a second run
redoes nothing. And the spoken corpus it starts from."""
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import soundfile as sf

from speechgpt_fairseq.demo.corpus import is_corpus_file, make_corpus
from speechgpt_fairseq.demo.report import MEASURES, find_log, validation_curve
from speechgpt_fairseq.demo.world import answer_shapes

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def demo(cli, tmp_path_factory, espeak_ng):
    out = tmp_path_factory.mktemp("demo") / "run"
    run = cli("speechgpt", "demo", "--out", out, "--quick", cwd=out.parent)
    return out, run.stdout


def test_every_command_is_printed_and_ran(demo):
    out, stdout = demo
    commands = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == len(list((out / "logs").glob("*.done"))) == len(list((out / "logs").glob("*.log")))
    for program in ("speechgpt make-corpus", "speechgpt learn-kmeans", "speechgpt speech2unit",
                    "speechgpt prepare-units", "speechgpt build-cross-modal", "speechgpt build-text-instructions",
                    "speechgpt build-com", "speechgpt prepare-sft", "fairseq-hydra-train", "fairseq-generate",
                    "speechgpt score", "speechgpt round-trip", "speechgpt fit-exemplar-vocoder", "speechgpt chat"):
        assert any(c.startswith(program + " ") for c in commands), program
    for stage in ("stage1", "stage2", "stage3"):
        assert (out / stage / "checkpoints" / "checkpoint_best.pt").is_file()


def test_training_lowered_every_stages_validation_loss(demo):
    out, _ = demo
    for stage in ("stage1", "stage2", "stage3"):
        trained = validation_curve(find_log(out, f"train-{stage}"))
        untrained = validation_curve(find_log(out, f"untrained-{stage}"))
        assert untrained and trained and min(v for _, v in trained) < untrained[-1][1], stage


def test_report_holds_every_measure_trained_and_untrained(demo):
    out, stdout = demo
    report = (out / "report" / "report.md").read_text()
    assert (out / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for m in MEASURES:
        row = re.search(rf"\| {re.escape(m.label)} \| (\d+) \| ([0-9.]+|n/a)%? \| ([0-9.]+|n/a)%? \|", report)
        assert row, m.label
        for column, root in ((2, out), (3, out / "untrained")):
            if m.trained_only and column == 3:  # the ceiling: the trained ASR on the references, no untrained one
                assert row.group(3) == "n/a"
                continue
            summary = json.loads((root / m.file).read_text())[m.summary_key]
            assert float(row.group(column)) == pytest.approx(summary[m.field], abs=0.05), (m.label, column)
        assert int(row.group(1)) == json.loads((out / m.file).read_text())[m.summary_key]["n"] > 0
    assert len(MEASURES) >= 10 and "roundtrip_ceiling_wer" in {m.key for m in MEASURES} and {m.key for m in MEASURES if m.bar} == {
        "asr_wer", "tts_uer", "spoken_right", "answer_uer", "roundtrip_wer"}
    turn = json.loads(find_log(out, "chat").read_text().splitlines()[-1])
    assert turn["question"].endswith("test_q0000.wav") and turn["prompt"].startswith("[Human]: <sosp><")
    assert f"Question (audio): `{turn['question']}`" in report
    assert "quick run" in report and f"report: {out / 'report' / 'report.md'}" in stdout
    assert stdout.rstrip().splitlines()[-1] == "demo: bars not applied (quick run)"


def test_a_second_run_redoes_nothing(cli, demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in (out / "stage3" / "checkpoints").iterdir()}
    run = cli("speechgpt", "demo", "--out", out, "--quick")
    lines = [line for line in run.stdout.splitlines() if line.startswith(("+ ", "= "))]
    assert lines and all(line.startswith("= ") for line in lines)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "stage3" / "checkpoints").iterdir()}


def test_make_corpus_splits_and_manifests(tmp_path, espeak_ng):
    out = tmp_path / "corpus"
    stats = make_corpus(out, sentences=(12, 4, 4), renditions=(2, 1, 1), vocab_size=400, show_progress=False)
    shapes = answer_shapes()
    assert stats["sentences"] == {"train": 12 + len(shapes), "valid": 4, "test": 4}
    texts = {s: (out / f"{s}.wrd").read_text().splitlines() for s in ("train", "valid", "test")}
    assert not set(texts["train"]) & (set(texts["valid"]) | set(texts["test"]))  # held out before synthesis
    assert set(shapes) <= set(texts["train"])  # the answers' shapes are heard in training only
    for name in ("train", "valid", "test", "test_assistant", "qa_test_questions", "qa_test_answers"):
        root, *lines = (out / f"{name}.tsv").read_text().splitlines()
        assert Path(root) == out.absolute()
        for line in lines:
            path, samples = line.split("\t")
            assert sf.info(out / path).frames == int(samples) > 0
    # the same sentences, in a drawn voice and in the assistant's: line-aligned, different audio
    drawn, assistant = ((out / f"test{kind}.tsv").read_text().splitlines()[1:] for kind in ("", "_assistant"))
    assert len(drawn) == len(assistant) == 4 and all(a != b for a, b in zip(drawn, assistant))
    # the answer shapes said back (stage 3's echo): their lines of the training manifests, their text twice
    echo = [json.loads(line) for line in (out / "echo.jsonl").read_text().splitlines()]
    assert [(r["text_i"], r["text_r"]) for r in echo] == [(t, t) for t in shapes]
    for kind in ("", "_assistant"):
        train = (out / f"train{kind}.tsv").read_text().splitlines()[1:]
        assert (out / f"shapes{kind}.tsv").read_text().splitlines()[1:] == [
            line for line, text in zip(train, texts["train"]) if text in shapes]
    qa = {s: [json.loads(line) for line in (out / f"qa_{s}.jsonl").read_text().splitlines()] for s in SPLITS}
    assert len(qa["train"]) == 2 * stats["questions"]["train"] and len(qa["test"]) == stats["questions"]["test"]
    asked = {s: {(r["person"], r["relation"]) for r in qa[s]} for s in SPLITS}
    assert asked["train"].isdisjoint(asked["test"] | asked["valid"])
    assert len(qa["test"]) == len((out / "qa_test_questions.tsv").read_text().splitlines()) - 1
    # each training question beside another one's speech: same relation, another person
    spoken = (out / "qa_train_questions.tsv").read_text().splitlines()[1:]
    swapped = (out / "qa_train_swapped.tsv").read_text().splitlines()[1:]
    assert len(swapped) == len(qa["train"]) and set(swapped) <= set(spoken)
    for record, line in zip(qa["train"], swapped):
        other = qa["train"][spoken.index(line)]
        assert other["relation"] == record["relation"] and other["person"] != record["person"]
    knowledge = [json.loads(line) for line in (out / "knowledge.jsonl").read_text().splitlines()]
    assert len(knowledge) == stats["knowledge"] and {"instruction", "output"} == set(knowledge[0])
    # the same instructions for stage 3's known (build-com reads text_i, text_r): every fact, held-out ones too
    restated = [json.loads(line) for line in (out / "knowledge_com.jsonl").read_text().splitlines()]
    assert [(r["text_i"], r["text_r"]) for r in restated] == [(r["instruction"], r["output"]) for r in knowledge]
    assert {(q["text_i"], q["text_r"]) for q in qa["test"]} <= {(r["text_i"], r["text_r"]) for r in restated}
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 400
    with pytest.raises(ValueError, match="exists and is not empty"):
        make_corpus(out, sentences=(2, 1, 1), renditions=(1, 1, 1), show_progress=False)
    assert len((out / "train.wrd").read_text().splitlines()) == 12 + len(shapes)  # the existing corpus is untouched
    assert all(is_corpus_file(p.name) for p in out.iterdir())  # so that --overwrite replaces a corpus
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt', which this command does not write"):
        make_corpus(out, sentences=(2, 1, 1), renditions=(1, 1, 1), overwrite=True, show_progress=False)
    assert (out / "train.wrd").read_text() == "".join(t + "\n" for t in texts["train"])
    assert (out / "notes.txt").read_text() == "mine"
