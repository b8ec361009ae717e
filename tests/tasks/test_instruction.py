"""Stages 2/3 with fairseq's tools: training with per-modality metrics, mixing, packing, and evaluation with
fairseq-generate + speechgpt score."""
import json
import random
import re
from pathlib import Path

import pytest

from speechgpt_fairseq.data.prompts import Example, cross_modal
from speechgpt_fairseq.speech.units import format_unit_string

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "stage1" / "corpus"
QUICK = ["common.log_interval=1", "common.seed=3", "dataset.max_tokens=2048"]


def pairs_to_jsonl(split: str, out: Path, n: int) -> Path:
    units = (CORPUS / f"{split}.km").read_text().splitlines()[:n]
    words = (CORPUS / f"{split}.wrd").read_text().splitlines()[:n]
    rng = random.Random(0)
    with open(out, "w") as f:
        for u, w in zip(units, words):
            speech = format_unit_string([int(x) for x in u.split()])
            pt = cross_modal("Write down what is said.", speech, w) if rng.random() < 0.5 else \
                cross_modal("Read this aloud.", w, speech)
            f.write(json.dumps(Example("", pt).to_json()) + "\n")
    return out


@pytest.fixture(scope="module")
def sft_data(cli, sentencepiece_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    files = {name: pairs_to_jsonl(split, root / f"{name}.jsonl", n)
             for name, split, n in (("train", "train", 300), ("valid", "valid", 40), ("test", "test", 12),
                                    ("extra", "valid", 60))}
    cli("speechgpt", "prepare-sft", *[f"{k}={v}" for k, v in files.items()], "--vocab", sentencepiece_model,
        "--num-units", "100", "--out", root / "data", "--no-progress")
    return root / "data"


def train(cli, cwd, data, *overrides, check=True):
    return cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "stage2", "--config-name", "tiny",
               f"task.data={data}", *QUICK, *overrides, cwd=cwd, check=check)


def valid_line(log: str) -> str:
    return [line for line in log.splitlines() if "valid on 'valid' subset" in line][-1]


@pytest.fixture(scope="module")
def trained(cli, sft_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    run = train(cli, cwd, sft_data, "optimization.max_update=30", "dataset.validate_interval_updates=30")
    return cwd / "checkpoints" / "stage2-tiny" / "checkpoint_last.pt", run.stdout + run.stderr


def test_training_logs_text_and_unit_metrics(trained):
    _, log = trained
    line = valid_line(log)
    for metric in ("text_loss", "text_acc", "text_ppl", "unit_loss", "unit_acc", "unit_ppl", "nll_loss"):
        assert re.search(rf"\b{metric} [0-9.]+", line), metric


def test_loss_policy_sets_what_is_counted(cli, sft_data, tmp_path):
    wpb = {}
    for policy in ("response", "prefix", "all"):
        (tmp_path / policy).mkdir()
        run = train(cli, tmp_path / policy, sft_data, f"task.loss_policy={policy}", "optimization.max_update=1",
                    "dataset.validate_interval_updates=1", "checkpoint.no_save=true")
        wpb[policy] = float(re.search(r"\| wpb ([0-9.]+)", valid_line(run.stdout + run.stderr)).group(1))
    assert wpb["response"] < wpb["prefix"] <= wpb["all"]


def test_mix_and_pack_train(cli, sft_data, tmp_path):
    run = train(cli, tmp_path, sft_data, "task.mix='train:1.0,extra:2.0'", "task.pack=true",
                "optimization.max_update=3", "dataset.validate_interval_updates=3", "checkpoint.no_save=true")
    log = run.stdout + run.stderr
    assert "mix: extra x2.0 -> 120 examples per epoch" in log and "train: " in log
    assert valid_line(log)


def generate(cli, data, ckpt, cwd, batch_size):
    return cli("fairseq-generate", data, "--user-dir", REPO / "user_dir", "--task", "cross_modal_sft",
               "--path", ckpt, "--gen-subset", "test", "--beam", "1", "--max-len-a", "1", "--max-len-b", "60",
               "--batch-size", batch_size, cwd=cwd).stdout


def test_generate_batched_equals_one_by_one_and_scores(cli, sft_data, trained, tmp_path):
    ckpt, _ = trained
    batched = generate(cli, sft_data, ckpt, tmp_path, 8)
    single = generate(cli, sft_data, ckpt, tmp_path, 1)

    def hyps(out):  # ids and texts; scores differ in the last float digits between batch shapes
        return sorted((line.split("\t")[0], line.split("\t")[-1]) for line in out.splitlines()
                      if line.startswith(("H-", "T-", "S-")))

    assert hyps(batched) == hyps(single) and len([h for h, _ in hyps(batched) if h.startswith("H-")]) == 12
    prompts = [line.split("\t")[1] for line in batched.splitlines() if line.startswith("S-")]
    assert all(p.endswith("[SpeechGPT]:") for p in prompts)  # the prompt, cut at the assistant turn
    (tmp_path / "gen.txt").write_text(batched)
    summary = json.loads(cli("speechgpt", "score", tmp_path / "gen.txt", "--out", tmp_path / "parsed.jsonl").stdout)
    assert summary["examples"] == 12
    assert summary["text_wer"]["n"] + summary["units_uer"]["n"] == 12
    rows = [json.loads(line) for line in (tmp_path / "parsed.jsonl").read_text().splitlines()]
    assert all(("text_wer" in r) != ("units_uer" in r) for r in rows)


def test_python_api_generates_what_fairseq_generate_does(cli, sft_data, trained, tmp_path):
    from speechgpt_fairseq.data.prompts import split_turn
    from speechgpt_fairseq.inference import SPEECHGPT_SAMPLING, SpeechGPTModel

    ckpt, _ = trained
    out = generate(cli, sft_data, ckpt, tmp_path, 8)
    prompts = {int(line.split("\t")[0][2:]): line.split("\t")[1] for line in out.splitlines() if line.startswith("S-")}
    expected = {int(line.split("\t")[0][2:]): line.split("\t")[2] for line in out.splitlines() if line.startswith("D-")}
    model = SpeechGPTModel.from_checkpoint(ckpt)
    ids = sorted(prompts)[:5]
    # fairseq-generate's limit --max-len-a 1 --max-len-b 60 allows 61 tokens after the prompt, then </s>
    responses = model.generate([prompts[i] for i in ids], max_new_tokens=61)
    for i, response in zip(ids, responses):
        assert response.removesuffix("<eoa>").strip() == expected[i]
    a = model.generate([prompts[ids[0]]], max_new_tokens=20, sampling=SPEECHGPT_SAMPLING, seed=5)
    b = model.generate([prompts[ids[0]]], max_new_tokens=20, sampling=SPEECHGPT_SAMPLING, seed=5)
    assert a == b
    assert split_turn(prompts[ids[0]] + response)[0] == prompts[ids[0]]
