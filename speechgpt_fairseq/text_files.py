"""Text files read line by line, where a line that is not UTF-8 is a bad record naming its file and line.

Files are opened with `errors="surrogateescape"`: an undecodable byte becomes a lone surrogate instead of
stopping the whole read, so each reader checks its lines with `not_utf8` and reports (or, with --skip-bad,
skips and counts) just that line.
"""
from __future__ import annotations

import os
import re
from typing import IO

_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def open_text(path: str | os.PathLike, encoding: str = "utf-8") -> IO[str]:
    """Open `path` for reading; bytes that are not UTF-8 survive for `not_utf8` to find."""
    return open(path, encoding=encoding, errors="surrogateescape")


def not_utf8(line: str) -> str | None:
    """Why a line read with `open_text` is not UTF-8 text (its first bad byte and column), or None when it is."""
    if line.isascii():
        return None
    bad = _UNDECODED.search(line)
    if bad is None:
        return None
    return f"not UTF-8 text (byte {ord(bad.group()) - 0xdc00:#04x} at column {bad.start() + 1})"
