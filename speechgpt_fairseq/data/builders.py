"""Instruction data for stages 2 and 3, written as SpeechInstruct JSON lines `{"prefix": ..., "plain_text": ...}`.

Cross-modal (stage 2): each (units, transcript) pair becomes an ASR example (instruction from `asr.txt`, input
the unit string, output the transcript) with probability `asr_prob`, else a TTS example (instruction from
`tts.txt`, input the transcript, output the unit string). Text instructions (stage 2's text part): each
(instruction, optional input, output) record becomes one example without speech. Chain-of-modality (stage 3):
each record of (text_i, text_r, units_i, units_r) becomes one of the chain-of-modality formats
(prompts.COM_FORMATS), drawn with the weights of a mix among the formats its fields allow. Both are seeded: the
same input and seed give the same file.

Inputs are read streaming. A bad record stops the build with its file and line, and nothing is written; with
`skip_bad` it is skipped and counted by reason instead. Empty lines are always skipped and counted.
"""
from __future__ import annotations

import json
import logging
import os
import random
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterable, Iterator

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.text_files import not_utf8, open_text
from speechgpt_fairseq.data.prompts import COM_FORMATS, Example, chain_of_modality, cross_modal, text_instruction
from speechgpt_fairseq.speech.units import (UnitFormatError, dedup_units, detect_unit_format, format_kmeans_labels,
                                            format_unit_string, parse_kmeans_labels, parse_unit_string)

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).with_name("templates")
FORBIDDEN_IN_TEMPLATES = "<>[]"  # they would read as prompt markup (units, [Human], <eoh>)
DEFAULT_MIX = "s2s=0.4,s2t=0.2,t2s=0.2,t2t=0.2"

# A record as read: field name -> (where it is, e.g. "data.jsonl:3: field 'units'", its raw value).
Record = dict[str, tuple[str, Any]]


class BuildError(InputError):
    """Input that cannot be turned into instruction data; names the file and line."""


class BadRecord(Exception):
    """A bad record: `reason` is what the summary counts it under, the message what the error says."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(message)
        self.where, self.reason = where, reason


@dataclass
class BuildStats:
    """What a build read, wrote (per kind: asr/tts or the CoM formats) and skipped (per reason)."""

    skip_bad: bool = False
    read: int = 0
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def reject(self, bad: BadRecord) -> None:
        """Raise a BuildError naming where the bad record is, or with `skip_bad` count it under its reason."""
        if not self.skip_bad:
            raise BuildError(f"{bad.where}: {bad}") from None
        self.skip(bad.reason)

    def wrote(self, kind: str) -> None:
        self.written[kind] = self.written.get(kind, 0) + 1


# ---- templates -------------------------------------------------------------------------------------------------

def load_templates(path: str | os.PathLike) -> list[str]:
    """Instructions, one per line; blank lines and `#` comments are ignored. Duplicates, prompt markup
    (`<`, `>`, `[`, `]`) and an empty file are refused with the file and line."""
    templates: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if any(c in text for c in FORBIDDEN_IN_TEMPLATES):
                raise BuildError(f"{path}:{lineno}: a template must not contain any of {FORBIDDEN_IN_TEMPLATES!r}, "
                                 f"found {text!r}")
            if text in templates:
                raise BuildError(f"{path}:{lineno}: duplicate template (first at line {templates[text]}): {text!r}")
            templates[text] = lineno
    if not templates:
        raise BuildError(f"{path}: no templates (expected one instruction per line)")
    return list(templates)


def shipped_templates(task: str) -> list[str]:
    """The instructions shipped with the package for `task` ("asr" or "tts")."""
    return load_templates(TEMPLATES_DIR / f"{task}.txt")


# ---- reading ---------------------------------------------------------------------------------------------------

def _check_file(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_file():
        raise BuildError(f"{path}: no such file ({what})")


def read_aligned(units_path: str | os.PathLike, text_path: str | os.PathLike, stats: BuildStats,
                 ) -> Iterator[Record]:
    """(units, text) records from a units file and a transcript file, line by line."""
    _check_file(units_path, "units")
    _check_file(text_path, "transcripts")
    with open_text(units_path, "utf-8-sig") as fu, open_text(text_path, "utf-8-sig") as ft:
        for lineno, (units, text) in enumerate(zip_longest(fu, ft, fillvalue=""), 1):
            if not units.strip() and not text.strip():
                stats.skip("empty line")
                continue
            stats.read += 1
            bad = [(path, why) for path, line in ((units_path, units), (text_path, text)) if (why := not_utf8(line))]
            if bad:
                stats.reject(BadRecord(f"{bad[0][0]}:{lineno}", "not UTF-8", bad[0][1]))
            elif not units or not text:
                ended, other = (units_path, text_path) if not units else (text_path, units_path)
                stats.reject(BadRecord(f"{other}:{lineno}", "unpaired line", f"{ended} ends at line {lineno - 1}: the "
                                  f"units and text files must have one line per utterance, in the same order"))
            elif not units.strip():
                stats.reject(BadRecord(f"{units_path}:{lineno}", "empty units", f"empty line, but {text_path}:{lineno} "
                                  f"has a transcript (the files must be line-aligned)"))
            else:
                yield {"units": (f"{units_path}:{lineno}", units), "text": (f"{text_path}:{lineno}", text)}


def _manifest_kind(path: str | os.PathLike) -> str:
    """"jsonl" when the first non-blank line is a JSON object, else "tsv"."""
    with open_text(path, "utf-8-sig") as f:
        for line in f:
            if line.strip():
                return "jsonl" if line.lstrip().startswith("{") else "tsv"
    return "jsonl"


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...],
               stats: BuildStats, aligned: dict[str, str | os.PathLike] | None = None) -> Iterator[Record]:
    """Records from JSON lines; `optional` fields that are absent or null are left out of the record.

    `aligned` maps a field to a file whose line N holds that field for line N of `path` (e.g. units from
    speech2unit, one utterance per line): it fills the field, replacing a value in the JSON. The files must
    have as many lines as `path`."""
    _check_file(path, "manifest")
    aligned = aligned or {}
    for file in aligned.values():
        _check_file(file, "units file")
    with ExitStack() as stack:
        f = stack.enter_context(open_text(path, "utf-8-sig"))
        columns = {k: stack.enter_context(open_text(file)) for k, file in aligned.items()}
        for lineno, line in enumerate(f, 1):
            values = {k: (f"{aligned[k]}:{lineno}", _aligned_line(c, aligned[k], path, lineno))
                      for k, c in columns.items()}
            if not line.strip():
                stats.skip("empty line")
                continue
            stats.read += 1
            where = f"{path}:{lineno}"
            try:
                bad = [(w, why) for w, text in [(where, line), *values.values()] if (why := not_utf8(text))]
                if bad:
                    raise BadRecord(bad[0][0], "not UTF-8", bad[0][1])
                obj = _json_object(line, where, tuple(k for k in required if k not in aligned))
            except BadRecord as bad:
                stats.reject(bad)
                continue
            yield {**{k: (f"{where}: field {k!r}", obj[k]) for k in required + optional if obj.get(k) is not None},
                   **values}
        for k, c in columns.items():
            if c.readline():
                raise BuildError(f"{aligned[k]}: has more lines than {path} ({lineno}); line N of the units file "
                                 f"belongs to line N of the manifest")


def _aligned_line(f, path, manifest, lineno: int) -> str:
    line = f.readline()
    if not line:
        raise BuildError(f"{path}: has {lineno - 1} lines, {manifest} has more; line N of the units file "
                         f"belongs to line N of the manifest")
    return line.rstrip("\n")


def _json_object(line: str, where: str, required: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(where, "malformed JSON", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadRecord(where, "malformed JSON", f"expected a JSON object, found {type(obj).__name__}")
    missing = [k for k in required if obj.get(k) is None]
    if missing:
        raise BadRecord(where, "missing field", f"no field {missing[0]!r} (expected {', '.join(required)}, not null)")
    return obj


def read_tsv(path: str | os.PathLike, required: tuple[str, ...], stats: BuildStats) -> Iterator[Record]:
    """Records from a tab-separated file whose first non-blank line is a header naming the columns."""
    _check_file(path, "manifest")
    header: list[str] | None = None
    with open_text(path, "utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                stats.skip("empty line")
                continue
            if (bad := not_utf8(line)) and header is not None:
                stats.read += 1
                stats.reject(BadRecord(f"{path}:{lineno}", "not UTF-8", bad))
                continue
            if bad:
                raise BuildError(f"{path}:{lineno}: {bad} (the header)")
            cells = line.rstrip("\r\n").split("\t")
            if header is None:
                header = [c.strip() for c in cells]
                missing = [k for k in required if k not in header]
                if missing:
                    raise BuildError(f"{path}:{lineno}: the header has no column {missing[0]!r} (expected a "
                                     f"tab-separated header with columns {', '.join(required)}; found {header})")
                columns = {k: header.index(k) for k in required}
                continue
            stats.read += 1
            if len(cells) != len(header):
                stats.reject(BadRecord(f"{path}:{lineno}", "wrong number of columns",
                                  f"{len(cells)} columns, the header has {len(header)}"))
                continue
            yield {k: (f"{path}:{lineno}: column {k!r}", cells[i]) for k, i in columns.items()}


def read_manifest(path: str | os.PathLike, required: tuple[str, ...], stats: BuildStats) -> Iterator[Record]:
    """Records from a TSV with a header or from JSON lines, told apart by the first non-blank line."""
    _check_file(path, "manifest")
    if _manifest_kind(path) == "jsonl":
        return read_jsonl(path, required, (), stats)
    return read_tsv(path, required, stats)


# ---- fields ----------------------------------------------------------------------------------------------------

class UnitParser:
    """Unit ids from one source: a JSON list of ints, or a string whose format (k-means labels or SpeechGPT unit
    string) is detected from the first one seen, as prepare-units does."""

    def __init__(self, num_units: int, dedup: bool):
        self.num_units, self.dedup = num_units, dedup
        self.fmt: str | None = None

    def __call__(self, where: str, value: Any) -> list[int]:
        try:
            units = self._parse(value)
        except UnitFormatError as e:
            reason = "unit out of range" if "out of range" in str(e) else "bad units"
            raise BadRecord(where, reason, str(e)) from None
        if not units:
            raise BadRecord(where, "empty units", "no units (expected at least one)")
        return dedup_units(units) if self.dedup else units

    def _parse(self, value: Any) -> list[int]:
        if isinstance(value, list):
            if not all(type(u) is int and u >= 0 for u in value):
                raise UnitFormatError(f"expected a list of unit ids (non-negative ints), found {str(value)[:40]}")
            return parse_kmeans_labels(format_kmeans_labels(value), self.num_units)  # checks the range
        if not isinstance(value, str):
            raise UnitFormatError(f"expected units as a string or a list of ints, found {type(value).__name__}")
        self.fmt = self.fmt or detect_unit_format(value)
        if detect_unit_format(value) != self.fmt:
            kinds = {"kmeans": "k-means labels", "speechgpt": "SpeechGPT unit strings"}
            raise UnitFormatError(f"expected {kinds[self.fmt]} as in the first record, found {value[:20]!r}")
        if self.fmt == "kmeans":
            return parse_kmeans_labels(value, self.num_units)
        return parse_unit_string(value, self.num_units)[0]


def _text(where: str, value: Any, empty_reason: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(where, "bad text", f"expected a string, found {type(value).__name__}")
    if not value.strip():
        raise BadRecord(where, empty_reason, f"{empty_reason} (expected some text)")
    return value.strip()


# ---- building --------------------------------------------------------------------------------------------------

def cross_modal_examples(records: Iterable[Record], asr_templates: list[str], tts_templates: list[str],
                         stats: BuildStats, asr_prob: float = 0.5, seed: int = 0, dedup: bool = True,
                         prefix: str = "", num_units: int = 1000) -> Iterator[Example]:
    """An ASR example (probability `asr_prob`) or a TTS example for every good (units, text) record."""
    if not 0.0 <= asr_prob <= 1.0:
        raise BuildError(f"the ASR probability must lie in [0, 1], got {asr_prob}")
    rng = random.Random(seed)
    parse_units = UnitParser(num_units, dedup)
    for record in records:
        try:
            units = format_unit_string(parse_units(*record["units"]))
            text = _text(*record["text"], empty_reason="empty transcript")
        except BadRecord as bad:
            stats.reject(bad)
            continue
        if rng.random() < asr_prob:
            stats.wrote("asr")
            yield Example(prefix, cross_modal(rng.choice(asr_templates), units, text))
        else:
            stats.wrote("tts")
            yield Example(prefix, cross_modal(rng.choice(tts_templates), text, units))


def text_instruction_examples(records: Iterable[Record], stats: BuildStats, prefix: str = "") -> Iterator[Example]:
    """A text-only instruction example for every good (instruction, optional input, output) record."""
    for record in records:
        try:
            instruction = _text(*record["instruction"], empty_reason="empty instruction")
            output = _text(*record["output"], empty_reason="empty output")
            given = record.get("input")  # Alpaca-style data writes "" for no input
            input = _text(*given, empty_reason="empty input") if given and given[1] != "" else ""
        except BadRecord as bad:
            stats.reject(bad)
            continue
        stats.wrote("text")
        yield Example(prefix, text_instruction(instruction, output, input))


def parse_mix(spec: str) -> dict[str, float]:
    """`s2s=0.4,t2t=0.6` -> weights for the four CoM formats (unnamed ones weigh 0), normalised to sum 1."""
    weights = dict.fromkeys(COM_FORMATS, 0.0)
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in COM_FORMATS:
            raise BuildError(f"--mix: {item.strip()!r}: expected FORMAT=WEIGHT with FORMAT one of "
                             f"{', '.join(COM_FORMATS)}, e.g. {DEFAULT_MIX}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise BuildError(f"--mix: {item.strip()!r}: the weight is not a number") from None
        if not weights[name] >= 0:
            raise BuildError(f"--mix: {item.strip()!r}: weights must be non-negative")
    total = sum(weights.values())
    if total <= 0:
        raise BuildError(f"--mix: {spec!r}: at least one format needs a positive weight")
    return {name: w / total for name, w in weights.items()}


def com_examples(records: Iterable[Record], mix: dict[str, float], stats: BuildStats, seed: int = 0,
                 dedup: bool = True, prefix: str = "", num_units: int = 1000) -> Iterator[Example]:
    """One chain-of-modality example per good record, in a format drawn from `mix` among those its fields
    allow (s2* needs units_i, *2s needs units_r); records that allow none are counted and left out."""
    rng = random.Random(seed)
    selected = [f for f, w in mix.items() if w > 0]
    # units are read (and checked) only where a selected format uses them
    used = {"units_i": any(f[0] == "s" for f in selected), "units_r": any(f[2] == "s" for f in selected)}
    parsers = {k: UnitParser(num_units, dedup) for k in used}
    for record in records:
        try:
            text_i = _text(*record["text_i"], empty_reason="empty text")
            text_r = _text(*record["text_r"], empty_reason="empty text")
            speech = {k: parsers[k](*record[k]) for k in used if used[k] and k in record}
        except BadRecord as bad:
            stats.reject(bad)
            continue
        allowed = [f for f in selected
                   if (f[0] == "t" or "units_i" in speech) and (f[2] == "t" or "units_r" in speech)]
        if not allowed:
            stats.skip("no selected format fits its fields")
            continue
        fmt = rng.choices(allowed, weights=[mix[f] for f in allowed])[0]
        stats.wrote(fmt)
        yield Example(prefix, chain_of_modality(fmt, text_i, text_r, speech.get("units_i"), speech.get("units_r")))


def write_examples(examples: Iterable[Example], out: str | os.PathLike, stats: BuildStats,
                   source: str | os.PathLike = "the input") -> None:
    """Write JSON lines to `out` whole or not at all; a build that writes no example (read from `source`) is an
    error: an empty output is never written."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
        if not sum(stats.written.values()):
            skipped = ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.items()) or "nothing skipped"
            raise BuildError(f"{out}: no examples to write ({stats.read} records read from {source}; {skipped})")
    logger.debug("wrote %s: %s", out, stats.written)


def _progress(records: Iterable[Record], desc: str, show: bool) -> Iterable[Record]:
    from tqdm import tqdm

    return tqdm(records, desc=desc, unit=" records", disable=not show)


def build_cross_modal(out: str | os.PathLike, *, units: str | os.PathLike | None = None,
                      text: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
                      asr_templates: list[str] | None = None, tts_templates: list[str] | None = None,
                      skip_bad: bool = False, show_progress: bool = True, **options) -> BuildStats:
    """Build stage-2 data from line-aligned `units` + `text` files or a `manifest` (TSV or JSON lines with
    `units` and `text`); `options` go to `cross_modal_examples`. Shipped templates unless given."""
    if manifest is None and (units is None or text is None) or manifest is not None and (units or text):
        raise BuildError("give a units file and a text file (--units, --text) or a manifest (--manifest), "
                         "not both")
    stats = BuildStats(skip_bad=skip_bad)
    if manifest is not None:
        records, source = read_manifest(manifest, ("units", "text"), stats), manifest
    else:
        records, source = read_aligned(units, text, stats), units
    examples = cross_modal_examples(_progress(records, Path(source).name, show_progress),
                                    asr_templates or shipped_templates("asr"),
                                    tts_templates or shipped_templates("tts"), stats, **options)
    write_examples(examples, out, stats, source)
    return stats


def build_text_instructions(manifest: str | os.PathLike, out: str | os.PathLike, skip_bad: bool = False,
                            show_progress: bool = True, prefix: str = "") -> BuildStats:
    """Build text-only instruction data (stage 2's text part) from JSON lines with `instruction`, `output` and an
    optional `input`, as Alpaca-style data sets have them."""
    stats = BuildStats(skip_bad=skip_bad)
    records = read_jsonl(manifest, ("instruction", "output"), ("input",), stats)
    write_examples(text_instruction_examples(_progress(records, Path(manifest).name, show_progress), stats, prefix),
                   out, stats, manifest)
    return stats


def build_com(manifest: str | os.PathLike, out: str | os.PathLike, mix: dict[str, float] | str = DEFAULT_MIX,
              skip_bad: bool = False, show_progress: bool = True, units_i: str | os.PathLike | None = None,
              units_r: str | os.PathLike | None = None, **options) -> BuildStats:
    """Build stage-3 data from JSON lines with text_i, text_r and optional units_i, units_r, or with those units
    in files line-aligned with the manifest (`units_i`, `units_r`); `options` go to `com_examples`."""
    mix = parse_mix(mix) if isinstance(mix, str) else mix
    stats = BuildStats(skip_bad=skip_bad)
    aligned = {k: v for k, v in (("units_i", units_i), ("units_r", units_r)) if v is not None}
    records = read_jsonl(manifest, ("text_i", "text_r"), ("units_i", "units_r"), stats, aligned)
    write_examples(com_examples(_progress(records, Path(manifest).name, show_progress), mix, stats, **options),
                   out, stats, manifest)
    return stats
