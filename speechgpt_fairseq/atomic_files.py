"""Outputs written whole or not at all: everything goes under a temporary name beside its destination and is
renamed into place only when complete, so a failure or a kill never leaves a half-written file behind.

Temporary names carry the host and process that made them (`.NAME.HOST-PID.tmp`, `.NAME.incomplete-HOST-PID-*`);
the next successful write of NAME removes those whose process is gone, and never one of another host or of a
process still running (two runs at once keep their own).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from speechgpt_fairseq.errors import InputError


class OutputExistsError(InputError):
    """An output that would replace existing work without being asked to."""


class OutputPathError(InputError):
    """An output path that cannot be written: under a regular file, or in a directory we may not write."""


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def _remove_strays(directory: Path, pattern: str) -> list[Path]:
    """Remove the entries of `directory` named by `pattern` (its one group holding a pid) whose process is gone."""
    removed = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = re.fullmatch(pattern, entry.name)
        if match and _process_gone(int(next(g for g in match.groups() if g))):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def remove_stray_files(directory: Path) -> list[Path]:
    """Remove the temporary files (`.NAME.HOST-PID.tmp`) that killed writes of any file left in `directory`: one
    sweep for a command that writes many files there with `atomic_file(..., sweep=False)`."""
    return _remove_strays(directory, rf"\..+\.{_HOST}-(\d+)\.tmp")


def remove_stray_scratch(path: Path) -> list[Path]:
    """Remove what a killed earlier write of `path` left beside it (our temporary names of this host whose process
    is gone); returns what was removed."""
    name = re.escape(path.name)
    return _remove_strays(path.parent, rf"\.{name}\.(?:{_HOST}-(\d+)\.tmp|(?:incomplete|replaced)-{_HOST}-(\d+)-\w+)")


@contextmanager
def atomic_file(path: str | os.PathLike, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` when the block succeeds, and then (with `sweep`) what
    killed writes of `path` left is removed."""
    path = Path(path)
    check_output_file(path)
    tmp = path.with_name(f".{path.name}.{_tag()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
        if sweep:
            remove_stray_scratch(path)
    finally:
        tmp.unlink(missing_ok=True)


def _scratch_dir(parent: Path, prefix: str) -> Path:
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stay on the output
    return scratch


def check_writable(out: str | os.PathLike, inside: bool = False) -> None:
    """Refuse, before any work, an output that cannot be created (or, `inside`, a directory that cannot be written
    in): one under a regular file, or whose nearest existing directory cannot be written in (tried, not guessed
    from permission bits: root ignores them)."""
    out = Path(out).absolute()
    if inside and out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    ancestor = out if inside else out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{out}: cannot be created, {ancestor} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=f".{out.name}.incomplete-{_tag()}-"))
    except OSError as e:
        raise OutputPathError(f"{out}: cannot be written, {ancestor}: {e.strerror}") from None


def check_output_file(out: str | os.PathLike) -> None:
    """Refuse, before any work, a file output that cannot be written: a directory, or a path `check_writable`
    refuses."""
    if Path(out).is_dir():
        raise OutputExistsError(f"{out}: is a directory (expected a file name)")
    check_writable(out)


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                     ours: Callable[[str], bool] | None = None) -> None:
    """Refuse, before any work, an output directory whose replacement would lose something: a non-empty one
    without `overwrite`; with or without it, one that is, holds or lies inside an input, that is the working
    directory or one above it, or (when `ours` says which file names the writer makes) that holds anything else.
    Also refuse one that cannot be written (`check_writable`)."""
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
    check_writable(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        foreign = sorted(entry.name for entry in out.iterdir() if ours is not None and not ours(entry.name))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputExistsError(f"{out}: holds {foreign[0]!r}{more}, which this command does not write; "
                                    f"--overwrite replaces only a directory of its own output (move that away, or "
                                    f"write elsewhere)")


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(scratch: Path, out: Path) -> None:
    """Make the complete `scratch` be `out`. An existing `out` is exchanged with it in one step where the system can
    (a reader sees the old directory or the new one, never neither); elsewhere it is first renamed aside."""
    if not out.exists():
        os.replace(scratch, out)
    elif _exchange(scratch, out):
        shutil.rmtree(scratch)  # now the old output
    else:
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-{_tag()}-"))
        os.replace(out, aside)
        os.replace(scratch, out)
        shutil.rmtree(aside)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
               ours: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` when the block succeeds; `out` is checked first
    (`check_output_dir`) and replaced, all of it at once, only at the end."""
    out = Path(out)
    check_output_dir(out, overwrite, inputs, ours)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_dir(out.parent, f".{out.name}.incomplete-{_tag()}-")
    try:
        yield scratch
        if out.exists() and any(out.iterdir()):
            check_output_dir(out, overwrite, inputs, ours)  # what appeared while we worked
        _swap_in(scratch, out)
        remove_stray_scratch(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def atomic_files_into(out: str | os.PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a scratch directory inside `out`; when the block succeeds its files replace those of the same name in
    `out` (and the files named in `replaces` go), other files of `out` are kept; otherwise none of them lands.

    The old files go before the first new one lands, so a kill during the renames leaves some outputs missing,
    never a new file beside an old one of the same output (a `NAME.txt` of this run with the `NAME.unit` of an
    earlier one)."""
    out = Path(out)
    check_writable(out, inside=True)
    out.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_dir(out, f".incomplete-{_tag()}-")
    try:
        yield scratch
        items = sorted(scratch.iterdir())
        for name in {item.name for item in items} | set(replaces):
            (out / name).unlink(missing_ok=True)
        for item in items:
            os.replace(item, out / item.name)
        _remove_strays(out, rf"\.incomplete-{_HOST}-(\d+)-\w+")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
