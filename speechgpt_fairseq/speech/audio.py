"""Audio in: 16 kHz mono float32 waveforms, and the lists of audio files speech2unit reads (fairseq manifests,
directories, file lists)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechgpt_fairseq.errors import InputError

SAMPLE_RATE = 16000
# Extensions a directory scan picks up: the containers libsndfile reads (MP3 only where it was built with it).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".opus", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"}
    | ({".mp3"} if "MP3" in sf.available_formats() else set()))
# libsndfile's log of a WAV whose data chunk is shorter than its header says: "data : 74320 (should be 37138)"
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZE = 0x7FFF0000  # streaming writers put a huge placeholder size in the header: not a truncation


class AudioError(InputError):
    """An audio file that cannot be used; the message names the file and what is wrong with it, `reason` says
    what kind of fault it is in a word or two (for reports of skipped files)."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def to_mono(wav: np.ndarray, sample_rate: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """A (samples,) or (samples, channels) waveform as mono float32 at `target_sr` (channels averaged, soxr)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    elif wav.ndim != 1:
        raise ValueError(f"expected a waveform of shape (samples,) or (samples, channels), got shape {wav.shape}")
    if sample_rate != target_sr:
        wav = soxr.resample(wav, sample_rate, target_sr)
    return np.ascontiguousarray(wav, dtype=np.float32)


def read_audio(path: str | Path, target_sr: int = SAMPLE_RATE, expected_samples: int | None = None) -> np.ndarray:
    """Read `path` as a mono float32 waveform in [-1, 1] at `target_sr` Hz.

    Channels are averaged; other sample rates are resampled with soxr (e.g. espeak-ng's 22050 Hz).
    `expected_samples` (a manifest's count, at the file's own rate) must match the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        with sf.SoundFile(path) as f:
            sr = f.samplerate
            if f.format in ("WAV", "WAVEX", "RF64") and (m := _SHORT_DATA.search(f.extra_info)):
                declared, present = map(int, m.groups())
                if present < declared < _STREAMING_SIZE:
                    raise AudioError(f"{path}: truncated file: its header announces {declared} bytes of audio, "
                                     f"the file holds {present}", "truncated")
            wav = f.read(dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples", "empty")
    if expected_samples is not None and wav.shape[0] != expected_samples:
        raise AudioError(f"{path}: the manifest says {expected_samples} samples, the file has {wav.shape[0]}",
                         "wrong sample count")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: the audio has NaN or infinite samples", "NaN or infinite")
    return to_mono(wav, sr, target_sr)


@dataclass(frozen=True)
class AudioEntry:
    """One input file: its path, its name relative to the listing's root, and a manifest's sample count."""

    path: Path
    name: str
    num_samples: int | None = None


def read_manifest(path: str | Path) -> tuple[Path, list[AudioEntry]]:
    """A fairseq audio manifest: the root directory on the first line, then `relative/path<TAB>num_samples`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    with open(path, encoding="utf-8") as f:
        root_line = f.readline().rstrip("\n")
        if not root_line.strip():
            raise AudioError(f"{path}:1: expected the root directory of the audio files, found an empty line")
        root = Path(root_line)
        entries = []
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            name, sep, count = line.partition("\t")
            if not sep or not count.isdigit():
                raise AudioError(f"{path}:{lineno}: expected 'relative/path<TAB>num_samples', found {line[:80]!r}")
            entries.append(AudioEntry(root / name, name, int(count)))
    return root, entries


def _scan(directory: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        found += [Path(parent) / n for n in sorted(files) if Path(n).suffix.lower() in AUDIO_EXTENSIONS]
    return found


def list_audio(inputs: list[str | Path]) -> tuple[Path, list[AudioEntry]]:
    """The audio files of `inputs` in a fixed order, with a root they are named relative to.

    An input is a fairseq manifest (`*.tsv`), a directory (searched recursively for audio files, in sorted
    order) or an audio file. A manifest keeps its root and names; it cannot be mixed with other inputs.
    """
    inputs = [Path(i) for i in inputs]
    manifests = [i for i in inputs if i.suffix == ".tsv"]
    if manifests:
        if len(inputs) > 1:
            raise AudioError(f"{manifests[0]}: a manifest is read alone; got {len(inputs)} inputs")
        return read_manifest(manifests[0])
    paths: list[Path] = []
    for i in inputs:
        if i.is_dir():
            if not (found := _scan(i)):
                raise AudioError(f"{i}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this directory")
            paths += found
        elif i.exists():
            paths.append(i)
        else:
            raise FileNotFoundError(f"{i}: no such file or directory")
    paths = [p.absolute() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return root, [AudioEntry(p, p.relative_to(root).as_posix()) for p in paths]
