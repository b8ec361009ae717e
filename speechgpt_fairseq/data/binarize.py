"""Binarization into fairseq memory-mapped datasets (`split.bin` + `split.idx`), streaming and all-or-nothing.

The writer keeps nothing per record in memory: token ids go straight to the `.bin` file and sizes to a
scratch file, so memory stays flat however large the corpus. A data directory is one unit: it is built whole
in a scratch directory beside it and swapped in only when every split succeeded, so no split of an earlier run
(binarized with another vocabulary, perhaps) survives beside the new ones.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from speechgpt_fairseq.atomic_files import atomic_dir
from speechgpt_fairseq.data.vocabulary import VOCAB_FILE, Vocabulary
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.text_files import not_utf8, open_text
from speechgpt_fairseq.speech.units import (EOSP, SOSP, UnitFormatError, dedup_units, detect_unit_format,
                                            parse_kmeans_labels, parse_unit_string)

_CHUNK = 4096  # records buffered before a write
# lengths binarization counts the records above: the default task.tokens_per_sample of the instruction tasks
# (cross_modal_sft 512, com_sft 1024), which refuse longer examples when they load a split
LENGTH_MARKS = (512, 1024)


# read(split name, input path, stats) -> records of parallel token lists; channels(dir, name) -> [(prefix, vocab size)]
ReadSplit = Callable[[str, str, "SplitStats"], Iterable[tuple[list[int], ...]]]
ChannelsOf = Callable[[Path, str], list[tuple[Path, int]]]


class BinarizeError(InputError):
    """Input that cannot be binarized; names the file and line."""


# what prepare-units / prepare-sft write into a data directory (and the scratch an earlier version kept inside it)
_DATA_FILE = re.compile(r"vocab\.json|[\w.-]+\.(?:bin|idx)|\.incomplete-\w+")


def is_data_file(name: str) -> bool:
    """Whether a file name in a data directory is one of ours, which --overwrite may replace."""
    return _DATA_FILE.fullmatch(name) is not None


class IndexedDatasetWriter:
    """Streams token-id records into fairseq's MMapIndexedDataset format (readable by fairseq as is)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        from fairseq.data.indexed_dataset import best_fitting_int_dtype  # fairseq only where data is written

        self.prefix = str(prefix)
        self.dtype = np.dtype(np.uint8 if vocab_size <= 256 else best_fitting_int_dtype(vocab_size))
        self._bin = open(self.prefix + ".bin", "wb")
        self._sizes = tempfile.TemporaryFile(dir=os.path.dirname(self.prefix) or ".")
        self._pending: list[np.ndarray] = []
        self.num_records = 0
        self.num_tokens = 0
        self.longest = 0
        self.longer = dict.fromkeys(LENGTH_MARKS, 0)  # records longer than each mark

    def add(self, ids: list[int]) -> None:
        self._pending.append(np.asarray(ids, dtype=self.dtype))
        if len(self._pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._bin.write(np.concatenate(self._pending).tobytes())
        sizes = np.fromiter((len(a) for a in self._pending), dtype=np.int32, count=len(self._pending))
        self._sizes.write(sizes.tobytes())
        self.num_records += len(sizes)
        self.num_tokens += int(sizes.sum())
        self.longest = max(self.longest, int(sizes.max()))
        for mark in LENGTH_MARKS:
            self.longer[mark] += int((sizes > mark).sum())
        self._pending.clear()

    def close(self) -> None:
        """Finish `.bin` and write the `.idx`: header, sizes (int32), then byte offsets (int64)."""
        from fairseq.data.indexed_dataset import MMapIndexedDataset, _dtype_header_code

        self._flush()
        self._bin.close()
        with open(self.prefix + ".idx", "wb") as idx:
            idx.write(MMapIndexedDataset.Index._HDR_MAGIC)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", _dtype_header_code(self.dtype.type)))
            idx.write(struct.pack("<Q", self.num_records))
            self._sizes.seek(0)
            shutil.copyfileobj(self._sizes, idx)
            self._sizes.seek(0)
            offset = 0
            while chunk := self._sizes.read(4 * _CHUNK):
                sizes = np.frombuffer(chunk, dtype=np.int32).astype(np.int64)
                ends = np.cumsum(sizes) * self.dtype.itemsize + offset
                idx.write((ends - sizes * self.dtype.itemsize).tobytes())
                offset = int(ends[-1])
        self._sizes.close()

    def abort(self) -> None:
        for f in (self._bin, self._sizes):
            f.close()


@dataclass
class SplitStats:
    """What the input files of one split gave: records written and lines skipped, by reason."""

    path: str
    records: int = 0
    tokens: int = 0
    longest: int = 0
    longer: dict[int, int] = field(default_factory=dict)  # records longer than each of LENGTH_MARKS
    skipped: dict[str, int] = field(default_factory=dict)

    def lengths(self) -> str:
        """`longest 812 tokens; 3 longer than 512, none longer than 1024`: what a task's tokens_per_sample
        must allow."""
        over = ", ".join(f"{n or 'none'} longer than {mark}" for mark, n in self.longer.items())
        return f"longest {self.longest} tokens" + (f"; {over}" if over else "")

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_unit_lines(path: str | os.PathLike, vocab: Vocabulary, stats: SplitStats, open_ended: bool = False,
                    dedup: bool = True) -> Iterator[list[int]]:
    """Token ids for each utterance of a units file (k-means labels or SpeechGPT unit strings, detected
    from the first line that is not empty), after the tokenizer's bos when it adds one.

    k-means lines (one label per frame) have their runs of a repeated unit merged unless `dedup` is off, and
    become `<sosp> units <eosp>` (`<sosp> units` when `open_ended`, for prompts); unit strings are kept as they
    are written, markers included, and must end with `<eosp>` unless `open_ended`. Empty lines are skipped and
    counted; anything else malformed raises BinarizeError naming the file and line.
    """
    sosp, eosp = vocab.index[SOSP], vocab.index[EOSP]
    fmt = None
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                stats.skip("empty line")
                continue
            if bad := not_utf8(line):
                raise BinarizeError(f"{path}:{lineno}: {bad}")
            fmt = fmt or detect_unit_format(line)
            try:
                if fmt == "kmeans":
                    units, closed = parse_kmeans_labels(line, vocab.num_units), not open_ended
                else:
                    units, closed = parse_unit_string(line, vocab.num_units)
                    if not closed and not open_ended:
                        raise UnitFormatError(f"a unit string without the closing {EOSP} (an utterance of a "
                                              f"training split ends with it; name a split of prompts in --open)")
            except UnitFormatError as e:
                kind = "k-means labels" if fmt == "kmeans" else "SpeechGPT unit strings"
                raise BinarizeError(f"{path}:{lineno}: {e} (this file holds {kind}, detected from its first line)") \
                    from None
            if fmt == "kmeans" and dedup:
                units = dedup_units(units)
            yield [*vocab.bos_ids, sosp, *(vocab.unit_offset + u for u in units), *([eosp] if closed else [])]


def write_split(records: Iterable[tuple[list[int], ...]], channels: list[tuple[str | os.PathLike, int]],
                stats: SplitStats, progress=None) -> None:
    """Write records of parallel token lists, channel i of each record to `channels[i] = (prefix, vocab size)`
    as `prefix.bin/.idx`, updating `stats` with the first channel's counts."""
    writers = [IndexedDatasetWriter(prefix, size) for prefix, size in channels]
    try:
        for record in records:
            for writer, ids in zip(writers, record):
                writer.add(ids)
            if progress is not None:
                progress.update(1)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    first = writers[0]
    stats.records, stats.tokens, stats.longest, stats.longer = (first.num_records, first.num_tokens, first.longest,
                                                                 dict(first.longer))


def binarize_splits(splits: dict[str, str | list[str]], out: str | os.PathLike, vocab: Vocabulary, read: ReadSplit,
                    channels: ChannelsOf, what: str = "records", show_progress: bool = True,
                    overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> list[SplitStats]:
    """Binarize the input file (or files, in order) of each split with `read(name, path, stats)` into the channels
    `channels(scratch, name)` names, then `vocab.json`; the directory `out` becomes exactly that, all at once, or
    stays as it was. An `out` that holds anything is replaced only with `overwrite`, and only when all it holds is
    ours (`is_data_file`); `out` may not be, hold or lie in one of `inputs` (the split files are always inputs)."""
    from tqdm import tqdm

    results = []
    paths_of = {name: [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
                for name, paths in splits.items()}
    inputs = [*inputs, *(path for paths in paths_of.values() for path in paths)]
    with atomic_dir(out, overwrite, inputs, ours=is_data_file) as scratch:
        vocab.save(scratch / VOCAB_FILE)
        for name, paths in paths_of.items():
            for path in paths:
                if not Path(path).is_file():
                    raise BinarizeError(f"{path}: no such file (split {name!r})")
            stats = SplitStats(", ".join(map(str, paths)))
            records = (record for path in paths for record in read(name, path, stats))
            with tqdm(desc=f"{name} ({', '.join(Path(p).name for p in paths)})", unit=f" {what}",
                      disable=not show_progress) as bar:
                write_split(records, channels(scratch, name), stats, progress=bar)
            if stats.records == 0:
                raise BinarizeError(f"{stats.path}: no {what} (split {name!r})")
            results.append(stats)
    return results


def prepare_units(splits: dict[str, str | list[str]], out: str | os.PathLike, vocab: Vocabulary,
                  open_splits: Iterable[str] = (), show_progress: bool = True, dedup: bool = True,
                  overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> list[SplitStats]:
    """Binarize units files into the data directory `out` (one `name.bin/.idx` per split) with `vocab.json` beside
    them; k-means labels have their repeats merged unless `dedup` is off. `out` is written as `binarize_splits`
    says (`overwrite` to replace an earlier one)."""
    open_splits = set(open_splits)
    unknown = open_splits - set(splits)
    if unknown:
        raise BinarizeError(f"--open names splits that are not given: {sorted(unknown)}")
    return binarize_splits(
        splits, out, vocab,
        read=lambda name, path, stats: ((ids,) for ids in read_unit_lines(path, vocab, stats, name in open_splits,
                                                                          dedup)),
        channels=lambda scratch, name: [(scratch / name, len(vocab))], what="utterances",
        show_progress=show_progress, overwrite=overwrite, inputs=inputs)
