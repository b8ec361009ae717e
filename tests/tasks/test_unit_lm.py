"""Stage 1 with fairseq's own trainer: the bundled config trains and learns, runs from any directory, starts
from a converted checkpoint, refuses another vocabulary, and resumes after SIGKILL to identical weights."""
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "examples" / "stage1"

# a few updates of the tiny config: small blocks and batches so that a run takes seconds
QUICK = ["task.tokens_per_sample=64", "dataset.batch_size=4", "common.log_interval=1", "common.seed=3"]


def train(cli, cwd, *overrides, check=True):
    return cli("fairseq-hydra-train", "--config-dir", STAGE1, "--config-name", "tiny", *QUICK, *overrides,
               cwd=cwd, check=check)


def valid_losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)]


def test_tiny_config_learns_from_any_directory(cli, tmp_path):
    """Validation loss falls well below the uniform guess over the vocabulary (log2 V bits), and improves."""
    run = train(cli, tmp_path, "optimization.max_update=60", "dataset.validate_interval_updates=20",
                "checkpoint.save_interval_updates=60")
    log = run.stdout + run.stderr
    losses = valid_losses(log)
    vocab_size = len(__import__("json").loads((STAGE1 / "data-bin" / "vocab.json").read_text())["tokens"])
    assert len(losses) >= 3
    assert losses[-1] < losses[0] < math.log2(vocab_size)
    assert losses[-1] < 0.8 * math.log2(vocab_size)
    assert (tmp_path / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt").exists()


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_after_sigkill_gives_identical_weights(cli, tmp_path):
    args = ["optimization.max_update=12", "checkpoint.save_interval_updates=4", "dataset.disable_validation=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    train(cli, straight, *args)

    cmd = [shutil.which("fairseq-hydra-train"), "--config-dir", str(STAGE1), "--config-name", "tiny", *QUICK, *args]
    proc = subprocess.Popen(cmd, cwd=killed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"Saved checkpoint .*@ 8 updates", line):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    ckpt = killed / "checkpoints" / "stage1-tiny"
    assert torch.load(ckpt / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1]["num_updates"] == 8

    resumed = train(cli, killed, *args)
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr
    a = _params(straight / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt")
    b = _params(ckpt / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def converted_k100(make_hf_llama, sentencepiece_model, tmp_path_factory):
    from speechgpt_fairseq.models.hf import convert_hf

    root = tmp_path_factory.mktemp("from_hf")
    return convert_hf(make_hf_llama(root / "hf", sentencepiece_model, kv_heads=2), root / "fs", num_units=100)


MATCHING_MODEL = ["model.decoder_layers=2", "model.decoder_embed_dim=64", "model.decoder_ffn_embed_dim=160",
                  "model.decoder_attention_heads=4", "model.decoder_kv_heads=2", "model.max_target_positions=256"]


def test_training_starts_from_a_converted_checkpoint(cli, converted_k100, tmp_path):
    data = tmp_path / "data"
    cli("speechgpt", "prepare-units", f"train={REPO / 'examples' / 'corpus' / 'train.km'}",
        f"valid={REPO / 'examples' / 'corpus' / 'valid.km'}", "--vocab", converted_k100, "--out", data, "--no-progress")
    run = train(cli, tmp_path, f"task.data={data}", *MATCHING_MODEL, "optimization.max_update=4",
                f"checkpoint.finetune_from_model={converted_k100 / 'checkpoint.pt'}",
                "dataset.validate_interval_updates=4")
    log = run.stdout + run.stderr
    assert "Loaded checkpoint" in log and len(valid_losses(log)) == 1


def test_checkpoint_with_another_vocabulary_is_refused_before_training(cli, converted_k100, tmp_path):
    """Of the same size, two tokens swapped: the error fairseq's trainer ends with is ours, and says which."""
    import json
    data = tmp_path / "data"
    cli("speechgpt", "prepare-units", f"train={REPO / 'examples' / 'corpus' / 'valid.km'}",
        f"valid={REPO / 'examples' / 'corpus' / 'valid.km'}", "--vocab", converted_k100, "--out", data, "--no-progress")
    vocab = json.loads((data / "vocab.json").read_text())
    tokens = vocab["tokens"]
    tokens[-3], tokens[-4] = tokens[-4], tokens[-3]  # [Human] and [SpeechGPT]
    (data / "vocab.json").write_text(json.dumps(vocab))
    checkpoint = converted_k100 / "checkpoint.pt"
    run = train(cli, tmp_path, f"task.data={data}", *MATCHING_MODEL, "optimization.max_update=4",
                f"checkpoint.finetune_from_model={checkpoint}", check=False)
    assert run.returncode != 0
    last_error = [line for line in run.stderr.splitlines() if re.match(r"^[\w.]+Error: ", line)][-1]
    n = len(tokens)
    assert last_error == (f"speechgpt_fairseq.models.checkpoints.VocabularyMismatchError: {checkpoint}: its vocabulary "
                          f"differs from {data}'s vocab.json (2 ids hold other tokens, the first id {n - 4}: "
                          f"'[Human]' against '[SpeechGPT]'); binarize the data with the checkpoint's vocab.json "
                          f"(speechgpt prepare-units / prepare-sft --vocab ...)")
    assert "num_updates" not in run.stdout + run.stderr.split("differs")[0]


def test_missing_data_directory_is_named(cli, tmp_path):
    run = train(cli, tmp_path, f"task.data={tmp_path / 'nowhere'}", check=False)
    assert run.returncode != 0 and f"{tmp_path / 'nowhere'}: no such data directory" in run.stderr


def test_data_of_an_earlier_format_is_refused(tmp_path):
    """Data binarized before records held the tokenizer's bos (vocab.json format /1) would train without it."""
    import json

    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.tasks.base import TaskDataError, load_data_vocabulary

    old = {k: v for k, v in Vocabulary.units_only(10).to_dict().items() if k not in ("add_bos", "eos_ids",
                                                                                      "text_encoding")}
    old["format"] = "speechgpt-fairseq-vocab/1"
    (tmp_path / "vocab.json").write_text(json.dumps(old))
    with pytest.raises(TaskDataError, match="vocab.json: written by an earlier .* binarize the data again"):
        load_data_vocabulary(str(tmp_path))
    assert Vocabulary.from_dict(old) == Vocabulary.units_only(10)  # a checkpoint's vocabulary of format /1 loads


def test_generation_needs_whole_utterances(cli, tmp_path):
    train(cli, tmp_path, "optimization.max_update=2", "dataset.disable_validation=true")
    ckpt = tmp_path / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt"
    common = [STAGE1 / "data-bin", "--user-dir", REPO / "user_dir", "--task", "unit_lm", "--path", ckpt,
              "--gen-subset", "test", "--beam", "1", "--max-len-a", "1", "--max-len-b", "10", "--batch-size", "8"]
    bad = cli("fairseq-generate", *common, cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--sample-break-mode eos" in bad.stderr
    good = cli("fairseq-generate", *common, "--sample-break-mode", "eos", cwd=tmp_path).stdout
    assert len([line for line in good.splitlines() if line.startswith("H-")]) == 50


def test_bf16_training_and_export(cli, tmp_path):
    """common.bf16=true trains the model in bf16 (fairseq keeps fp32 master weights and saves the bf16 model's
    values as fp32); export-hf's directory loads as a bf16 Hugging Face model with the same values."""
    from transformers import LlamaForCausalLM

    run = train(cli, tmp_path, "common.bf16=true", "optimization.max_update=6", "dataset.validate_interval_updates=6")
    assert len(valid_losses(run.stdout + run.stderr)) == 1
    ckpt = tmp_path / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt"
    weight = _params(ckpt)["decoder.embed_tokens.weight"]
    assert torch.equal(weight, weight.bfloat16().float())  # the values of a bf16 model
    cli("speechgpt", "export-hf", ckpt, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert torch.equal(hf.model.embed_tokens.weight.float(), weight)
