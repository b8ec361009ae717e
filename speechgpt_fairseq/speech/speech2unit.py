"""Speech to units: features (a fairseq HuBERT layer, or MFCC + deltas) labelled with a k-means model.

The labels are those of fairseq's `examples/hubert/simple_kmeans` recipe (dump_hubert_feature or dump_mfcc_feature,
then dump_km_label): one label per feature frame (50 per second with HuBERT, 100 with MFCC), repeats kept.

Many files go through HuBERT together. They are read in windows of consecutive files; within a window the
pieces of audio (HubertFeatureReader.segments) are sorted by length and cut into padded batches of at most
`max_batch_samples` samples and MAX_PADDING padding. Only one window of audio and one batch of features are held
at a time, and the results of a window come back in input order.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.audio import AudioEntry, AudioError, read_audio
from speechgpt_fairseq.speech.hubert import MAX_CHUNK, HubertFeatureReader
from speechgpt_fairseq.speech.kmeans import KmeansLabeler
from speechgpt_fairseq.speech.mfcc import mfcc_features

logger = logging.getLogger(__name__)

MIN_SAMPLES = 400  # one 25 ms frame at 16 kHz: HuBERT's receptive field and Kaldi's MFCC window
MFCC_DIM = 39
MAX_BATCH_SAMPLES = 1_600_000  # padded samples in one forward pass (100 s at 16 kHz)
MAX_PADDING = 0.2  # share of a batch that may be padding
WINDOW_BATCHES = 8  # a window of files holds about this many full batches of audio


def length_batches(lengths: list[int], max_samples: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of `lengths` in batches of similar length, longest first: a batch's padded size (count x longest)
    stays within `max_samples` and its padding within `max_padding` of that size; a piece longer than
    `max_samples` is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0  # samples in the last batch
    for i in order:
        if batches:
            padded = (len(batches[-1]) + 1) * lengths[batches[-1][0]]
            if padded <= max_samples and real + lengths[i] >= (1 - max_padding) * padded:
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def check_length(wav: np.ndarray, name: str) -> None:
    if len(wav) < MIN_SAMPLES:
        raise AudioError(f"{name}: too short: {len(wav)} samples at 16 kHz give no feature frame "
                         f"(at least {MIN_SAMPLES}, 25 ms)", "too short")


def read_entry(entry: AudioEntry) -> np.ndarray:
    """The 16 kHz mono waveform of one listed file; every fault (a missing file too) is an AudioError."""
    try:
        wav = read_audio(entry.path, expected_samples=entry.num_samples)
    except FileNotFoundError as e:
        raise AudioError(str(e), "missing") from None
    check_length(wav, str(entry.path))
    return wav


def read_windows(entries: list[AudioEntry], window_samples: int, skip_bad: bool = False
                 ) -> Iterator[list[tuple[AudioEntry, np.ndarray | AudioError]]]:
    """Consecutive files in windows of about `window_samples` samples, in input order. A bad file raises its
    AudioError, or with `skip_bad` is logged and comes back as that error in place of its waveform."""
    window: list[tuple[AudioEntry, np.ndarray | AudioError]] = []
    size = 0
    for entry in entries:
        try:
            wav = read_entry(entry)
            size += len(wav)
        except AudioError as e:
            if not skip_bad:
                raise
            logger.warning("skipped %s", e)
            wav = e
        window.append((entry, wav))
        if size >= window_samples:
            yield window
            window, size = [], 0
    if window:
        yield window


class SpeechFeatures:
    """Features to cluster: HuBERT layer `layer` of a fairseq checkpoint (`hubert`), or MFCC + deltas without
    one (averaged over `mfcc_average` frames: mfcc.average_frames); many waveforms at a time, batched by length."""

    def __init__(self, hubert: str | Path | None = None, layer: int = 11, device: str = "cpu", bf16: bool = False,
                 max_chunk: int = MAX_CHUNK, mfcc_average: int = 1):
        if hubert is not None and mfcc_average != 1:
            raise InputError(f"averaging frames ({mfcc_average}) applies to MFCC features, not to HuBERT's")
        if mfcc_average < 1 or mfcc_average % 2 == 0:
            raise InputError(f"MFCC frames are averaged over an odd number of frames, not {mfcc_average}")
        self.reader = None if hubert is None else HubertFeatureReader(hubert, layer, device, bf16, max_chunk)
        if hubert is None and bf16:
            logger.warning("bf16 applies to HuBERT; MFCC features are computed in float32")
        self.mfcc_average = mfcc_average
        self.dim = MFCC_DIM if self.reader is None else self.reader.dim
        self.name = (f"{hubert} layer {layer}" if hubert is not None else "MFCC + deltas" +
                     (f", averaged over {mfcc_average} frames" if mfcc_average > 1 else ""))

    def __call__(self, wavs: list[np.ndarray], max_batch_samples: int = MAX_BATCH_SAMPLES) -> list[np.ndarray]:
        """(frames, dim) float32 features of each 16 kHz waveform."""
        return [np.concatenate(p) for p in self.map_pieces(wavs, max_batch_samples, lambda feats: feats)]

    def map_pieces(self, wavs: list[np.ndarray], max_batch_samples: int, fn) -> list[list[np.ndarray]]:
        """`fn(features)` of every piece (HuBERT chunk; MFCC: the whole waveform) of every waveform, in order:
        what fn keeps is all that stays in memory."""
        for i, wav in enumerate(wavs):
            check_length(wav, f"waveform {i}")
        if self.reader is None:
            return [[fn(mfcc_features(wav, average=self.mfcc_average))] for wav in wavs]
        pieces = [(i, seg) for i, wav in enumerate(wavs) for seg in self.reader.segments(wav)]
        results: list = [None] * len(pieces)
        for batch in length_batches([len(seg) for _, seg in pieces], max_batch_samples):
            for k, feats in zip(batch, self.reader.features([pieces[k][1] for k in batch])):
                results[k] = fn(feats.cpu().numpy())
        per_wav: list[list[np.ndarray]] = [[] for _ in wavs]
        for (i, _), result in zip(pieces, results):
            per_wav[i].append(result)
        return per_wav


class SpeechToUnits:
    """k-means labels of speech: HuBERT layer `layer` of a fairseq checkpoint (`hubert`), or MFCC + deltas
    without one. `kmeans` is a joblib k-means file (ours, fairseq's, SpeechGPT's km1000.bin) or a fitted model."""

    def __init__(self, kmeans: str | Path | MiniBatchKMeans, hubert: str | Path | None = None, layer: int = 11,
                 device: str = "cpu", bf16: bool = False, max_chunk: int = MAX_CHUNK):
        self.labeler = KmeansLabeler(kmeans)
        self.features = SpeechFeatures(hubert, layer, device, bf16, max_chunk, self.labeler.mfcc_average)
        if self.labeler.dim != self.features.dim:
            kmeans_name = kmeans if isinstance(kmeans, (str, Path)) else "the k-means model"
            raise InputError(f"{kmeans_name}: clusters {self.labeler.dim}-dimensional features, but "
                             f"{self.features.name} gives {self.features.dim}-dimensional ones (use the k-means "
                             f"model fitted on these features)")
        logger.info("speech2unit: %s -> %d clusters", self.features.name, self.num_units)

    @property
    def num_units(self) -> int:
        return self.labeler.n_clusters

    def __call__(self, audio: str | Path | np.ndarray) -> list[int]:
        """Raw k-means labels (repeats kept) of one audio file, or of a 16 kHz mono float32 waveform."""
        if isinstance(audio, (str, Path)):
            wav, name = read_audio(audio), str(audio)
        else:
            wav, name = np.asarray(audio, dtype=np.float32), "the waveform"
            if wav.ndim != 1:
                raise ValueError(f"expected a 16 kHz mono waveform of shape (samples,), got shape {wav.shape}")
        check_length(wav, name)
        return self.labels([wav])[0]

    def labels(self, wavs: list[np.ndarray], max_batch_samples: int = MAX_BATCH_SAMPLES) -> list[list[int]]:
        """Raw k-means labels of each 16 kHz waveform, batched by length; features are dropped batch by batch."""
        pieces = self.features.map_pieces(wavs, max_batch_samples, self.labeler)
        return [np.concatenate(p).tolist() for p in pieces]


def shard_range(total: int, nshard: int, rank: int) -> tuple[int, int]:
    """[start, end) of shard `rank` of `nshard` over `total` items, split as fairseq's simple_kmeans splits
    manifests (feature_utils.get_shard_range), so shard files line up with fairseq's."""
    if not 0 <= rank < nshard:
        raise InputError(f"shard {rank} does not exist: shards are 0..{nshard - 1}")
    start, end = round(total / nshard * rank), round(total / nshard * (rank + 1))
    if start >= end:
        raise InputError(f"shard {rank} of {nshard} is empty: only {total} files")
    return start, end
