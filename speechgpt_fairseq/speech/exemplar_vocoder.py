"""A concatenative unit vocoder fitted in seconds: each unit is spoken as its most typical 25 ms frame of real
speech, repeated for the unit's average duration and overlap-added.

It needs no training and no download, so the offline demo can say its spoken answers aloud; the sound is
robotic, and only as intelligible as the units are phonetic (MFCC units carry the speaker too). For real use
take a unit HiFi-GAN (`speech.vocoder.UnitVocoder`, fairseq's CodeHiFiGAN), as SpeechGPT does.

Fitting reads audio with its per-frame k-means labels at the feature frame rate (100 Hz for MFCC: 400-sample
windows every 160 samples, HuBERT's 50 Hz: 400 every 320); for each unit it keeps the frame whose features
lie nearest the unit's centroid, and the unit's mean run length.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import dedup_units

WINDOW = 400  # samples of a frame: 25 ms at 16 kHz


class ExemplarVocoder:
    """`vocoder(units) -> waveform` (float32, mono, `sample_rate` Hz); `num_units` units."""

    def __init__(self, frames: np.ndarray, durations: np.ndarray, hop: int, sample_rate: int = 16000):
        self.frames = np.asarray(frames, dtype=np.float32)  # (K, WINDOW), zeros for a unit never seen
        self.durations = np.asarray(durations, dtype=np.float32)  # (K,) mean run length in frames
        self.hop, self.sample_rate = int(hop), int(sample_rate)
        self.num_units = len(self.frames)

    @classmethod
    def fit(cls, utterances, num_units: int, hop: int, sample_rate: int = 16000) -> ExemplarVocoder:
        """`utterances` yields (waveform, labels, distances): the 16 kHz waveform, the k-means label of each
        feature frame and each frame's distance to its centroid."""
        frames = np.zeros((num_units, WINDOW), dtype=np.float32)
        best = np.full(num_units, np.inf)
        run_frames, runs = np.zeros(num_units), np.zeros(num_units)
        window = np.hanning(WINDOW).astype(np.float32)
        for wav, labels, distances in utterances:
            labels = np.asarray(labels)
            whole = np.arange(len(labels)) * hop + WINDOW <= len(wav)  # frames that lie inside the audio
            for unit in np.unique(labels):
                candidates = np.flatnonzero((labels == unit) & whole)
                if len(candidates):
                    i = candidates[np.argmin(distances[candidates])]  # the first of equally near frames
                    if distances[i] < best[unit]:
                        frames[unit], best[unit] = wav[i * hop:i * hop + WINDOW] * window, distances[i]
            edges = np.flatnonzero(np.diff(labels)) + 1
            for unit, length in zip(labels[np.r_[0, edges]], np.diff(np.r_[0, edges, len(labels)])):
                run_frames[unit] += length
                runs[unit] += 1
        durations = np.where(runs > 0, run_frames / np.maximum(runs, 1), 1.0)
        return cls(frames, durations, hop, sample_rate)

    def __call__(self, units: list[int]) -> np.ndarray:
        units = dedup_units(list(units))
        if not units:
            raise InputError("no units to speak (empty unit sequence)")
        bad = next((u for u in units if not 0 <= u < self.num_units), None)
        if bad is not None:
            raise InputError(f"unit {bad} is out of range: this vocoder has {self.num_units} units")
        sequence = np.repeat(units, np.maximum(1, np.rint(self.durations[units])).astype(int))
        out = np.zeros((len(sequence) - 1) * self.hop + WINDOW, dtype=np.float32)
        weight = np.zeros_like(out)
        window = np.hanning(WINDOW).astype(np.float32)
        for i, unit in enumerate(sequence):
            out[i * self.hop:i * self.hop + WINDOW] += self.frames[unit]
            weight[i * self.hop:i * self.hop + WINDOW] += window
        out /= np.maximum(weight, 1e-3)  # undo the overlap of the windows
        return np.clip(out, -1.0, 1.0)

    def save(self, path: str | Path) -> None:
        """An .npz file, written whole or not at all."""
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, frames=self.frames, durations=self.durations, hop=self.hop, sample_rate=self.sample_rate)

    @classmethod
    def load(cls, path: str | Path) -> ExemplarVocoder:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such exemplar vocoder")
        try:
            with np.load(path) as z:
                return cls(z["frames"], z["durations"], int(z["hop"]), int(z["sample_rate"]))
        except (ValueError, KeyError, OSError) as e:
            raise InputError(f"{path}: not an exemplar vocoder (.npz with frames, durations, hop, sample_rate): "
                             f"{e}") from None


def fit_exemplar_vocoder(entries, kmeans, hubert: str | Path | None = None, layer: int = 11,
                         show_progress: bool = True) -> ExemplarVocoder:
    """Fit on the audio files `entries` (speech.audio.AudioEntry) with the features and k-means of speech2unit."""
    from tqdm import tqdm

    from speechgpt_fairseq.speech.audio import read_audio
    from speechgpt_fairseq.speech.kmeans import KmeansLabeler
    from speechgpt_fairseq.speech.speech2unit import SpeechFeatures

    labeler = KmeansLabeler(kmeans)
    features = SpeechFeatures(hubert, layer, mfcc_average=labeler.mfcc_average)
    centers = labeler.centers_t.T  # (K, dim)

    def utterances():
        for entry in tqdm(entries, desc="exemplar vocoder", unit=" file", disable=not show_progress):
            wav = read_audio(entry.path, expected_samples=entry.num_samples)
            feats = features([wav])[0]
            labels = labeler(feats)
            yield wav, labels, ((feats - centers[labels]) ** 2).sum(1)

    hop = 160 if hubert is None else 320  # MFCC: 100 frames/s; HuBERT: 50
    return ExemplarVocoder.fit(utterances(), labeler.n_clusters, hop)
