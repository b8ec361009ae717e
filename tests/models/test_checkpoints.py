"""Checkpoint files that cannot be read are refused with our reason, naming the file."""
import pytest
import torch

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.models.checkpoints import CheckpointFileError, load_for_inference, read_checkpoint


def test_a_file_that_is_not_a_checkpoint_is_named_without_torchs_advice(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 not a checkpoint \xff" * 10)
    with pytest.raises(CheckpointFileError, match=r"junk.pt: not a readable PyTorch checkpoint: damaged, cut "
                                                  r"short, or another kind of file") as e:
        load_for_inference(tmp_path / "junk.pt")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_cut_short_is_named(tmp_path):
    torch.save({"model": {"w": torch.zeros(1000)}, "cfg": None}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointFileError, match=r"cut.pt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")


def test_a_torch_file_that_is_no_fairseq_checkpoint_is_named(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointFileError, match=r"plain.pt: a PyTorch file, but not a fairseq "
                                                  r"checkpoint \(no .best_loss.\)"):
        load_for_inference(tmp_path / "plain.pt")
