"""Text-to-unit data: (text, units) pairs in fairseq's raw translation format, and the units a text-to-unit model
predicted, read back from fairseq-generate's output.

A split NAME is written as `NAME.txt` (the source: characters separated by spaces, `|` between words,
`Hi you` -> `h i | y o u`) and, when it has units, `NAME.unit` (the target: unit ids separated by spaces), one
utterance per line: what `fairseq-preprocess --source-lang txt --target-lang unit` reads. Characters need no
tokenizer model and give a small closed vocabulary, the usual input of a small text-to-unit transformer.
A split without units is source only: texts to speak, decoded from a source-only binarization.

Inputs are read as build-cross-modal reads them (data/builders.py): the same unit formats, deduplication and
errors. A bad line stops the export with its file and line and nothing is written; with `skip_bad` it is skipped
and counted by reason instead.
"""
from __future__ import annotations

import os
import re
import unicodedata
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from speechgpt_fairseq.atomic_files import atomic_file, atomic_files_into
from speechgpt_fairseq.data.builders import BuildError, BuildStats, UnitParser, BadRecord, read_aligned
from speechgpt_fairseq.speech.units import format_kmeans_labels, format_unit_string
from speechgpt_fairseq.text_files import not_utf8, open_text

SOURCE_LANG, TARGET_LANG = "txt", "unit"  # the file suffixes, and fairseq's --source-lang / --target-lang
WORD_BOUNDARY = "|"
UNIT_FORMATS = ("kmeans", "speechgpt")
_SPLIT_NAME = re.compile(r"\w[\w.-]*")


class TextToUnitError(BuildError):
    """Input that cannot be exported or imported; names the file and line. A BuildError, as the errors of the
    readers shared with the builders are."""


@dataclass(frozen=True)
class Split:
    """One split to export: its texts, and their units when it has targets (training, references)."""

    name: str
    text: Path
    units: Path | None = None


def characters(text: str, lowercase: bool = True) -> str:
    """`Hello,  World` -> `h e l l o , | w o r l d`: NFC characters separated by spaces, `|` between words.
    Whitespace runs are one boundary; punctuation is kept as characters."""
    text = unicodedata.normalize("NFC", text)  # so "é" is one symbol whether it came composed or not
    if lowercase:
        text = text.lower()
    return f" {WORD_BOUNDARY} ".join(" ".join(word) for word in text.split())


def _source(where: str, text: str, lowercase: bool) -> str:
    if WORD_BOUNDARY in text:
        raise BadRecord(where, "bad text", f"the text contains {WORD_BOUNDARY!r}, the word-boundary symbol of the "
                                      f"source: {text.strip()[:40]!r}")
    source = characters(text, lowercase)
    if not source:
        raise BadRecord(where, "empty text", "empty text (expected a sentence: each line of text is one utterance)")
    return source


# ---- export ----------------------------------------------------------------------------------------------------

def _pairs(split: Split, stats: BuildStats, dedup: bool, lowercase: bool, num_units: int,
           ) -> Iterator[tuple[str, list[int] | None]]:
    """(source, units) for every good line of a split; units is None for a split without units."""
    if split.units is None:
        if not split.text.is_file():
            raise TextToUnitError(f"{split.text}: no such file (texts of split {split.name!r})")
        with open_text(split.text, "utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                stats.read += 1
                try:
                    if bad := not_utf8(line):
                        raise BadRecord(f"{split.text}:{lineno}", "not UTF-8", bad)
                    yield _source(f"{split.text}:{lineno}", line, lowercase), None
                except BadRecord as bad:
                    stats.reject(bad)
        return
    parse_units = UnitParser(num_units, dedup)
    for record in read_aligned(split.units, split.text, stats):
        try:
            yield _source(*record["text"], lowercase), parse_units(*record["units"])
        except BadRecord as bad:
            stats.reject(bad)


def _writer(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8", newline="\n")


def export_splits(splits: list[Split], out: str | os.PathLike, *, dedup: bool = True, lowercase: bool = True,
                  num_units: int = 1000, skip_bad: bool = False, show_progress: bool = True,
                  ) -> dict[str, BuildStats]:
    """Write every split into `out` (other files there are kept) all at once, or nothing when one fails.
    Returns each split's stats; `stats.written["pairs"]` / `["texts"]` counts its lines."""
    out = Path(out)
    _check_splits(splits, out)
    all_stats = {}
    # a source-only split must not sit beside the targets of an earlier export
    stale_targets = [f"{split.name}.{TARGET_LANG}" for split in splits if split.units is None]
    with atomic_files_into(out, replaces=stale_targets) as scratch:
        for split in splits:
            stats = all_stats[split.name] = BuildStats(skip_bad=skip_bad)
            kind = "pairs" if split.units else "texts"
            with ExitStack() as files:
                src = files.enter_context(_writer(scratch / f"{split.name}.{SOURCE_LANG}"))
                tgt = files.enter_context(_writer(scratch / f"{split.name}.{TARGET_LANG}")) if split.units else None
                pairs = _pairs(split, stats, dedup, lowercase, num_units)
                for source, units in tqdm(pairs, desc=split.name, unit=" lines", disable=not show_progress):
                    src.write(source + "\n")
                    if tgt is not None:
                        tgt.write(format_kmeans_labels(units) + "\n")
                    stats.wrote(kind)
            if not stats.written:
                skipped = ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.items()) or "nothing skipped"
                raise TextToUnitError(f"{split.text}: no {kind} to write for split {split.name!r} "
                                      f"({stats.read} lines read; {skipped})")
    return all_stats


def _check_splits(splits: list[Split], out: Path) -> None:
    if not splits:
        raise TextToUnitError("no splits to export (expected texts, with or without units)")
    names = [s.name for s in splits]
    for split in splits:
        if not _SPLIT_NAME.fullmatch(split.name):
            raise TextToUnitError(f"{split.name!r}: a split name is letters, digits, '_', '-' and '.', not starting "
                                  f"with '.' or '-' (it names the files and fairseq's --trainpref etc.)")
        if names.count(split.name) > 1:
            raise TextToUnitError(f"split {split.name!r} is given twice")
    inputs = {Path(p).resolve() for s in splits for p in (s.text, s.units) if p is not None}
    for split in splits:
        for suffix in (SOURCE_LANG, TARGET_LANG):
            if (out / f"{split.name}.{suffix}").resolve() in inputs:
                raise TextToUnitError(f"{out / f'{split.name}.{suffix}'}: the export would overwrite its own input "
                                      f"(choose another output directory or split name)")


# ---- import ----------------------------------------------------------------------------------------------------

def read_hypotheses(path: str | os.PathLike, expected: int | None = None) -> list[list[int]]:
    """Each sample's best hypothesis (its first `H-` line), in sample-id order, from fairseq-generate (or
    fairseq-interactive) output. Ids must run 0..N-1 without a gap, N = `expected` when given."""
    hypotheses: dict[int, list[int]] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.startswith("H-"):
                continue  # S-, T-, D-, P- lines and fairseq's log lines
            where = f"{path}:{lineno}"
            if bad := not_utf8(line):
                raise TextToUnitError(f"{where}: {bad}")
            fields = line.rstrip("\r\n").split("\t")
            sample = fields[0][2:]
            if len(fields) != 3 or not sample.isdigit():
                raise TextToUnitError(f"{where}: expected 'H-<sample id><TAB><score><TAB><units>', found "
                                      f"{line.strip()[:60]!r}")
            for symbol in fields[2].split():
                if not symbol.isdigit():
                    raise TextToUnitError(f"{where}: sample {sample}: {symbol[:20]!r} is not a unit id (expected "
                                          f"integers: the output of a model trained on t2u-export data)")
            hypotheses.setdefault(int(sample), [int(u) for u in fields[2].split()])  # nbest: the first is best
    if not hypotheses:
        raise TextToUnitError(f"{path}: no H- lines (expected the output of fairseq-generate)")
    count = max(hypotheses) + 1 if expected is None else expected
    missing = [i for i in range(count) if i not in hypotheses]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TextToUnitError(f"{path}: no hypothesis for sample {missing[0]} (source line {missing[0] + 1}){more}; "
                              f"expected samples 0..{count - 1}: was every input decoded? (fairseq-generate drops "
                              f"inputs longer than the model's positions with --skip-invalid-size-inputs-valid-test)")
    extra = sorted(i for i in hypotheses if i >= count)
    if extra:
        raise TextToUnitError(f"{path}: hypotheses for {len(extra)} samples beyond the {count} source lines (sample "
                              f"{extra[0]}): is this the output for that source?")
    return [hypotheses[i] for i in range(count)]


def write_units(units: list[list[int]], out: str | os.PathLike, fmt: str = "kmeans") -> None:
    """One utterance per line, as k-means labels (`12 7 301`) or SpeechGPT unit strings (`<sosp><12>…<eosp>`)."""
    if fmt not in UNIT_FORMATS:
        raise TextToUnitError(f"unknown unit format {fmt!r} (expected one of {', '.join(UNIT_FORMATS)})")
    line = format_kmeans_labels if fmt == "kmeans" else format_unit_string
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line(u) + "\n" for u in units)
