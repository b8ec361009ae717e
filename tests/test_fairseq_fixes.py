"""Each fairseq fix: the fixed behaviour, and (where cheap to show) fairseq failing without it."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import speechgpt_fairseq

speechgpt_fairseq.register()


def test_token_block_dataset_eos_mode_under_numpy2():
    from fairseq.data import TokenBlockDataset

    docs = [torch.tensor([5, 6, 2]), torch.tensor([7, 2]), torch.tensor([8, 9, 10, 2])]
    ds = TokenBlockDataset(docs, [len(d) for d in docs], block_size=None, pad=1, eos=2, break_mode="eos")
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in docs]


@pytest.mark.skipif(hasattr(np, "compat"), reason="NumPy 1 still has np.compat")
def test_plain_fairseq_breaks_on_numpy2():
    code = ("from fairseq.data import TokenBlockDataset; import torch;"
            "TokenBlockDataset([torch.tensor([5, 2])], [2], block_size=None, pad=1, eos=2, break_mode='eos')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "compat" in proc.stderr


def test_last_batch_is_kept_when_the_multiple_does_not_divide():
    from fairseq.data import data_utils

    sizes = np.full(13, 10, dtype=np.int64)
    batches = data_utils.batch_by_size(np.arange(13), lambda i: 10, num_tokens_vec=sizes, max_sentences=4,
                                       required_batch_size_multiple=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(13))
    assert [len(b) for b in batches] == [4, 4, 4, 1]


def test_task_iterator_yields_every_example():
    """Through fairseq's own batching path (task.get_batch_iterator), with fairseq's default multiple of 8."""
    from fairseq.data import FairseqDataset
    from fairseq.tasks import FairseqTask

    class TwentyOne(FairseqDataset):
        sizes = np.full(21, 5)

        def __getitem__(self, i):
            return i

        def __len__(self):
            return 21

        def num_tokens(self, i):
            return 5

        def size(self, i):
            return 5

        def collater(self, samples):
            return samples

    ds = TwentyOne()
    task = FairseqTask(OmegaConf.create({}))
    itr = task.get_batch_iterator(ds, max_sentences=8, required_batch_size_multiple=8).next_epoch_itr(shuffle=False)
    seen = [x for batch in itr for x in batch]
    assert sorted(seen) == list(range(21))


class NotAllowed:
    """A class no allow-list names: loading a pickle of it must still be refused."""


def _tiny_hubert_checkpoint(tmp_path):
    """A HuBERT checkpoint as fairseq's trainer saves them: cfg as a dict, Dictionary objects in task_state,
    a NumPy scalar in the scheduler state."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.hubert.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask

    (tmp_path / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(10)))
    task_cfg = HubertPretrainingConfig(data=str(tmp_path), labels=["km"], label_rate=50.0)
    task = HubertPretrainingTask.setup_task(task_cfg)
    model_cfg = HubertConfig(conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16, 2, 2)] * 2",
                             encoder_layers=1, encoder_embed_dim=16, encoder_ffn_embed_dim=32,
                             encoder_attention_heads=2, final_dim=8, label_rate=50.0)
    model = HubertModel.build_model(model_cfg, task)
    cfg = OmegaConf.structured(FairseqConfig())
    cfg.model, cfg.task = OmegaConf.structured(model_cfg), OmegaConf.structured(task_cfg)
    cfg.model._name, cfg.task._name = "hubert", "hubert_pretraining"
    state = {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "model": model.state_dict(),
             "task_state": task.state_dict(), "args": None,
             "extra_state": {"epoch": 3}, "optimizer_history": [
                 {"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam", "num_updates": 100,
                  "lr_scheduler_state": {"best": np.float64(1.5)}}]}
    path = tmp_path / "hubert.pt"
    torch.save(state, path)
    return path, model


def test_hubert_checkpoint_loads_under_weights_only(tmp_path):
    from fairseq import checkpoint_utils

    path, model = _tiny_hubert_checkpoint(tmp_path)
    (tmp_path / "dict.km.txt").unlink()  # the dictionary must come from the checkpoint itself
    (loaded,), cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    assert task.dictionaries[0].symbols[4:] == [str(i) for i in range(10)]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_plain_fairseq_refuses_hubert_checkpoints(tmp_path):
    path, _ = _tiny_hubert_checkpoint(tmp_path)
    code = f"from fairseq import checkpoint_utils; checkpoint_utils.load_checkpoint_to_cpu({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "weights_only" in proc.stderr


def test_pre_hydra_namespace_args_load(tmp_path):
    """Checkpoints from before fairseq's hydra configs keep their config as an argparse Namespace."""
    torch.save({"args": argparse.Namespace(arch="hubert", label_rate=50), "model": {}}, tmp_path / "old.pt")
    assert torch.load(tmp_path / "old.pt")["args"].label_rate == 50


def test_allow_list_is_not_everything(tmp_path):
    torch.save({"x": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only"):
        torch.load(tmp_path / "evil.pt")


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    """A copy that dies midway (a kill while checkpoint_last.pt is written) leaves the old file intact."""
    import shutil

    from fairseq.file_io import PathManager

    src, dst = tmp_path / "checkpoint_7_400.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old checkpoint")

    def dies_midway(a, b):
        with open(b, "wb") as f:
            f.write(b"ne")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_7_400.pt", "checkpoint_last.pt"]
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True) and dst.read_bytes() == src.read_bytes()


# ---- multi-process training without GPUs (the training runs themselves: tests/test_distributed.py) -----
TORCHRUN_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fix is for machines without GPUs")
def test_torchrun_ranks_on_a_machine_without_gpus(monkeypatch):
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.distributed import utils as distributed_utils

    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = OmegaConf.structured(FairseqConfig()).distributed_training
    cfg.distributed_world_size = 2
    distributed_utils.infer_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank, cfg.device_id,
            cfg.distributed_no_spawn) == ("env://", 2, 1, 0, True)


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_pytorch_ddp_wraps_a_cpu_model(one_process_group):
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models import DistributedFairseqModel

    cfg = OmegaConf.structured(FairseqConfig()).distributed_training
    assert cfg.ddp_backend == "pytorch_ddp"  # fairseq's default
    wrapped = DistributedFairseqModel(cfg, torch.nn.Linear(3, 2), one_process_group, torch.device("cpu"))
    assert isinstance(wrapped.module, torch.nn.parallel.DistributedDataParallel) and wrapped.device_ids is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failures are those of machines without GPUs")
def test_plain_fairseq_fails_under_torchrun_and_pytorch_ddp_without_gpus():
    code = f"""
import os, torch, torch.distributed as dist
from omegaconf import OmegaConf
from fairseq.dataclass.configs import FairseqConfig
from fairseq.distributed import utils
from fairseq.models import DistributedFairseqModel
os.environ.update({TORCHRUN_ENV!r})
cfg = OmegaConf.structured(FairseqConfig()).distributed_training
cfg.distributed_world_size = 2
try:
    utils.infer_init_method(cfg)
except ZeroDivisionError as e:
    print("torchrun:", e)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    DistributedFairseqModel(cfg, torch.nn.Linear(3, 2), dist.group.WORLD, torch.device("cpu"))
except ValueError as e:
    print("pytorch_ddp:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "torchrun: integer modulo by zero" in out
    assert "pytorch_ddp: DistributedDataParallel device_ids and output_device arguments only work" in out
