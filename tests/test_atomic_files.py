"""Outputs land whole or not at all, and an existing output is not replaced unasked."""
import os
import stat

import pytest

from speechgpt_fairseq.atomic_files import OutputExistsError, atomic_dir, atomic_file, atomic_files_into


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "vocab.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["vocab.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["vocab.json"]


def test_atomic_dir_refuses_existing_work_and_gets_normal_permissions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as scratch:
            (scratch / "partial").write_text("y")
            raise RuntimeError("failed")
    assert os.listdir(out) == ["mine"] and os.listdir(tmp_path) == ["out"]
    with atomic_dir(out, overwrite=True) as scratch:
        (scratch / "result").write_text("z")
    assert os.listdir(out) == ["result"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_atomic_files_into_keeps_other_files(tmp_path):
    (tmp_path / "train.bin").write_text("old train")
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError):
        with atomic_files_into(tmp_path) as scratch:
            (scratch / "train.bin").write_text("half")
            raise RuntimeError
    assert (tmp_path / "train.bin").read_text() == "old train"
    with atomic_files_into(tmp_path) as scratch:
        (scratch / "train.bin").write_text("new train")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "train.bin"]
    assert (tmp_path / "train.bin").read_text() == "new train"
