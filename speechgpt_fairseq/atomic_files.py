"""Outputs written whole or not at all: everything goes under a temporary name beside its destination and is
renamed into place only when complete, so a failure or a kill never leaves a half-written file behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


class OutputExistsError(ValueError):
    """An output that would replace existing work without being asked to."""


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _scratch_dir(parent: Path, prefix: str) -> Path:
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stay on the output
    return scratch


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, an output directory whose replacement would lose something: a non-empty one
    without `overwrite`; with or without it, one that is, holds or lies inside an input, or that is the working
    directory or one above it."""
    out = Path(out)
    where, cwd = out.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise OutputExistsError(f"{out}: is the working directory or holds it; write to a directory of its own")
    for source in map(Path, inputs):
        held = source.resolve()
        if where == held or where in held.parents or held in where.parents:
            raise OutputExistsError(f"{out}: is, holds or lies inside the input {source}; write somewhere else")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` when the block succeeds; `out` is checked first
    (`check_output_dir`) and replaced only at the end."""
    out = Path(out)
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_dir(out.parent, f".{out.name}.incomplete-")
    try:
        yield scratch
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def atomic_files_into(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory inside `out`; when the block succeeds its files replace those of the same
    name in `out` (other files of `out` are kept), otherwise none of them lands."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_dir(out, ".incomplete-")
    try:
        yield scratch
        for item in sorted(scratch.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
