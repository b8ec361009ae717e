"""Outputs land whole or not at all, and an existing output is not replaced unasked."""
import os
import stat
from pathlib import Path

import pytest

from speechgpt_fairseq.atomic_files import (OutputExistsError, atomic_dir, atomic_file, atomic_files_into,
                                             check_output_dir)


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


def test_outputs_that_would_lose_an_input_or_the_working_directory(tmp_path, monkeypatch):
    source = tmp_path / "work" / "model"
    source.mkdir(parents=True)
    (source / "weights").write_text("input")
    monkeypatch.chdir(tmp_path / "work")
    refused = {source: "is, holds or lies inside the input", source / "sub": "is, holds or lies inside the input",
               tmp_path / "work": "working directory", tmp_path: "working directory", Path("."): "working directory"}
    for out, reason in refused.items():
        with pytest.raises(OutputExistsError, match=reason):
            with atomic_dir(out, overwrite=True, inputs=[source]) as scratch:
                (scratch / "result").write_text("new")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["work", "work/model", "work/model/weights"]
    with atomic_dir(tmp_path / "elsewhere", inputs=[source]) as scratch:  # beside the input is fine
        (scratch / "result").write_text("new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_the_next_successful_write_removes_what_a_killed_one_left_and_nothing_else(tmp_path):
    """Scratch of a process that is gone (this host's) goes; scratch of a live process (a run going on at the same
    time), of another host, of another output, and the user's files stay."""
    from speechgpt_fairseq.atomic_files import _HOST

    dead, live = dead_pid(), os.getppid()  # the parent: a process running beside us
    strays = [f".out.incomplete-{_HOST}-{dead}-k1ll3d", f".out.replaced-{_HOST}-{dead}-k1ll3d",
              f".vocab.json.{_HOST}-{dead}.tmp"]
    kept = [f".out.incomplete-{_HOST}-{live}-running", f".out.incomplete-otherhost-{dead}-elsewhere",
            f".other.incomplete-{_HOST}-{dead}-k1ll3d", f".out.incomplete-{_HOST}-{dead}",
            f"out.incomplete-{_HOST}-{dead}-x",
            f".vocab.json.{_HOST}-{live}.tmp", ".vocab.json.tmp", "notes.txt"]
    for name in strays + kept:
        if name.endswith(".tmp") or name == "notes.txt":
            (tmp_path / name).write_text("x")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "train.bin").write_text("half")
    with pytest.raises(RuntimeError):  # a failed run removes nothing
        with atomic_dir(tmp_path / "out") as scratch:
            raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == sorted(strays + kept)
    with atomic_dir(tmp_path / "out") as scratch:
        (scratch / "train.bin").write_text("new")
    with atomic_file(tmp_path / "vocab.json") as tmp:
        tmp.write_text("{}")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out", "vocab.json"])


def test_one_sweep_for_a_directory_of_many_files(tmp_path):
    """unit2speech writes its wavs without a sweep each (a sweep lists the directory) and sweeps OUT once."""
    from speechgpt_fairseq.atomic_files import _HOST, remove_stray_files

    dead, live = dead_pid(), os.getppid()
    strays = [f".0.wav.{_HOST}-{dead}.tmp", f".8.wav.{_HOST}-{dead}.tmp"]
    kept = [f".9.wav.{_HOST}-{live}.tmp", f".9.wav.otherhost-{dead}.tmp", "7.wav", ".hidden.tmp"]
    for name in strays + kept:
        (tmp_path / name).write_text("x")
    with atomic_file(tmp_path / "0.wav", sweep=False) as tmp:
        tmp.write_text("wav")
    assert sorted(os.listdir(tmp_path)) == sorted(strays + kept + ["0.wav"])
    assert sorted(p.name for p in remove_stray_files(tmp_path)) == sorted(strays)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["0.wav"])
