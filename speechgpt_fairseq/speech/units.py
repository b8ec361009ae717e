"""Discrete speech units as text: fairseq k-means label lines and SpeechGPT unit strings.

k-means labels (fairseq's examples/hubert/simple_kmeans): `12 12 7 301 …`, one utterance per line.
SpeechGPT unit strings: `<sosp><12><7><301>…<eosp>`; consecutive repeats are usually merged ("deduplicated").
"""
from __future__ import annotations

import re
from itertools import groupby

from speechgpt_fairseq.errors import InputError

SOSP, EOSP = "<sosp>", "<eosp>"
_TOKEN = re.compile(r"\s*(<[^<>]*>)")


class UnitFormatError(InputError):
    """A line that is not a unit sequence; the message says what was found and what was expected."""


def dedup_units(units: list[int]) -> list[int]:
    """Merge runs of a repeated unit into one (SpeechGPT's "reduced" units)."""
    return [u for u, _ in groupby(units)]


def unit_durations(units: list[int]) -> list[int]:
    """Run lengths of `units`, aligned with `dedup_units(units)`."""
    return [len(list(run)) for _, run in groupby(units)]


def format_unit_string(units: list[int], closed: bool = True) -> str:
    return SOSP + "".join(f"<{u}>" for u in units) + (EOSP if closed else "")


def format_kmeans_labels(units: list[int]) -> str:
    return " ".join(map(str, units))


def _check_range(units: list[int], num_units: int) -> None:
    for u in units:
        if u >= num_units:
            raise UnitFormatError(f"unit {u} is out of range: the vocabulary has {num_units} units (0..{num_units - 1})")


def parse_kmeans_labels(line: str, num_units: int) -> list[int]:
    """`12 12 7` -> [12, 12, 7]."""
    units = []
    for field in line.split():
        if not field.isdigit():
            raise UnitFormatError(f"expected space-separated unit ids (k-means labels), found {field[:20]!r}")
        units.append(int(field))
    _check_range(units, num_units)
    return units


def parse_unit_string(line: str, num_units: int) -> tuple[list[int], bool]:
    """`<sosp><12><7><eosp>` -> ([12, 7], True); without the closing `<eosp>` (a prompt) -> (…, False)."""
    text = line.strip()
    pos, tokens = 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise UnitFormatError(f"expected a unit token like <12>, found {text[pos:pos + 20]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or tokens[0] != SOSP:
        raise UnitFormatError(f"a unit string starts with {SOSP}, found {text[:20]!r}")
    closed = tokens[-1] == EOSP
    units = []
    for token in tokens[1:len(tokens) - closed]:
        body = token[1:-1]
        if not body.isdigit():
            raise UnitFormatError(f"unknown token {token!r} in a unit string (expected <N> units between "
                                  f"{SOSP} and {EOSP})")
        units.append(int(body))
    _check_range(units, num_units)
    return units, closed


def detect_unit_format(line: str) -> str:
    """"speechgpt" for unit strings, "kmeans" for label lines."""
    return "speechgpt" if line.lstrip().startswith("<") else "kmeans"
