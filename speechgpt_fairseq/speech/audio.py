"""Reading audio files as 16 kHz mono float32, the input every feature reader here expects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and what is wrong with it."""


def read_audio(path: str | Path, target_sr: int = 16000) -> np.ndarray:
    """Read `path` as a mono float32 waveform in [-1, 1] at `target_sr` Hz.

    Channels are averaged; other sample rates are resampled with soxr (e.g. espeak-ng's 22050 Hz).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: the audio has NaN or infinite samples")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != target_sr:
        wav = soxr.resample(wav, sr, target_sr)
    return np.ascontiguousarray(wav, dtype=np.float32)
