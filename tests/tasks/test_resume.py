"""Kill and resume in any epoch: an epoch's order, packing and mix are drawn from (seed, epoch) alone, so a run
killed mid-update and started again with the same command ends with the very weights of an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.tasks.instruction import CrossModalSFTConfig, CrossModalSFTTask
from speechgpt_fairseq.tasks.unit_lm import UnitLMConfig, UnitLMTask

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# ---- the epoch's batches, as fairseq's training loop draws them -----------------------------------------------

# name: (task, training split); unmixed runs read the valid split, for speed
TASKS = {
    "stage1": (lambda: UnitLMTask.setup_task(UnitLMConfig(data=str(EXAMPLES / "stage1" / "data-bin"),
                                                          tokens_per_sample=64, seed=1)), "valid"),
    "stage2 bucketed": (lambda: sft_task(), "valid"),
    "stage2 bucketed, mix": (lambda: sft_task(mix="train:0.05,valid:0.3"), "train"),
    "stage2 bucketed, one source resampled": (lambda: sft_task(mix="train:0.05"), "train"),
    "stage2 packed, mix": (lambda: sft_task(mix="train:0.05,valid:0.3", pack=True, tokens_per_sample=512), "train"),
}


def sft_task(**cfg):
    return CrossModalSFTTask.setup_task(CrossModalSFTConfig(data=str(EXAMPLES / "stage2" / "data-bin"), seed=1,
                                                            **cfg))


def batches(name: str, epoch: int, loaded_at: int) -> list[list[list[int]]]:
    """The batches (token lists) of `epoch` in a run that loaded its training data in epoch `loaded_at` (1: an
    uninterrupted run; `epoch`: a run resumed there), stepping through epochs as fairseq_cli.train does: one task
    and dataset, `task.get_batch_iterator` once per epoch, each epoch read to its end."""
    make_task, split = TASKS[name]
    task = make_task()
    task.load_dataset(split, epoch=loaded_at)
    for e in range(loaded_at, epoch + 1):
        itr = task.get_batch_iterator(task.dataset(split), max_tokens=2048, seed=1, epoch=e)
        drawn = [b["net_input"]["src_tokens"].tolist() for b in itr.next_epoch_itr(shuffle=True)]
    return drawn


@pytest.mark.parametrize("name", TASKS)
def test_an_epoch_is_the_same_loaded_at_epoch_1_or_at_that_epoch(name):
    uninterrupted = batches(name, 3, loaded_at=1)
    assert batches(name, 3, loaded_at=3) == uninterrupted
    # and the next epoch draws other batches, not only the same ones in another order
    assert sorted(map(str, batches(name, 4, loaded_at=1))) != sorted(map(str, uninterrupted))


def test_mix_resamples_every_epoch():
    def examples(epoch):
        return sorted(str(row) for b in batches("stage2 bucketed, mix", epoch, loaded_at=1) for row in b)
    assert examples(2) != examples(3)


# ---- kill mid-update in epoch 2 or later, run the same command again --------------------------------------------

RUN = ["common.log_interval=1", "checkpoint.save_dir=ckpt", "dataset.max_tokens=1024", "lr_scheduler.warmup_updates=2",
       "optimization.max_update=18", "checkpoint.save_interval_updates=4", "checkpoint.keep_interval_updates=1",
       "dataset.disable_validation=true"]  # epochs of about 8 updates


def command(stage: str, config: str, *overrides: str) -> list[str]:
    trainer = str(Path(sys.executable).parent / "fairseq-hydra-train")
    return [trainer, "--config-dir", str(EXAMPLES / stage), "--config-name", config, *RUN, *overrides]


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-5000:]
    return log


def kill_mid_epoch(proc: subprocess.Popen) -> int:
    """SIGKILL once the log shows the second update after a checkpoint saved in epoch 2 or later: the process is
    then inside the third update past that save. Returns the saved update, the one to resume from."""
    seen, saved = [], None
    for line in proc.stdout:
        seen.append(line)
        if found := re.search(r"Saved checkpoint \S+ \(epoch (\d+) @ (\d+) updates", line):
            if int(found.group(1)) >= 2:
                saved = int(found.group(2))
        elif (found := re.search(r"num_updates=(\d+),", line)) and saved and int(found.group(1)) == saved + 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    return saved


def resumed_equals_uninterrupted(cmd: list[str], tmp_path: Path) -> None:
    straight = start(cmd, tmp_path / "straight")  # the two runs share the two cores
    try:
        saved = kill_mid_epoch(start(cmd, tmp_path / "killed"))
        ckpt = torch.load(tmp_path / "killed" / "ckpt" / "checkpoint_last.pt", weights_only=True)
        assert ckpt["optimizer_history"][-1]["num_updates"] == saved
        assert ckpt["extra_state"]["train_iterator"]["epoch"] >= 2
        log = finish(start(cmd, tmp_path / "killed"))
        assert re.search(rf"Loaded checkpoint ckpt/checkpoint_last.pt \(epoch \d+ @ {saved} updates\)", log)
        finish(straight)
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()

    a, b = (torch.load(d / "ckpt" / "checkpoint_last.pt", weights_only=True)
            for d in (tmp_path / "straight", tmp_path / "killed"))
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 18
    assert a["model"].keys() == b["model"].keys()
    assert [n for n in a["model"] if not torch.equal(a["model"][n], b["model"][n])] == []


@pytest.mark.parametrize("pack", ["false", "true"])
def test_stage2_with_mix_resumes_bit_exact(pack, tmp_path):
    mix = "task.mix='train:0.02,valid:0.1'"
    resumed_equals_uninterrupted(command("stage2", "tiny", mix, f"task.pack={pack}"), tmp_path)


def test_stage3_lora_resumes_bit_exact(tmp_path):
    resumed_equals_uninterrupted(command("stage3", "tiny_lora", f"model.lora_base={frozen_base(tmp_path)}",
                                         "dataset.train_subset=test"), tmp_path)


def frozen_base(tmp_path: Path) -> Path:
    """A random model of the tiny preset over the stage-3 vocabulary, saved as a plain fairseq checkpoint."""
    from omegaconf import OmegaConf

    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel
    from speechgpt_fairseq.tasks.base import load_data_vocabulary

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "speechgpt_fairseq" / "presets" / "model" / "tiny.yaml"))
    preset.pop("_name")
    torch.manual_seed(0)
    model = SpeechGPTLlamaModel.from_config(SpeechGPTLlamaConfig(**preset),
                                            load_data_vocabulary(str(EXAMPLES / "stage3" / "data-bin")).to_dictionary())
    torch.save({"model": model.state_dict()}, tmp_path / "base.pt")
    return tmp_path / "base.pt"
