"""39-dimensional MFCC features, the input of HuBERT's first k-means iteration.

Same recipe as fairseq's `examples/hubert/simple_kmeans/dump_mfcc_feature.py`: 13 Kaldi MFCCs
(`use_energy=False`, 16 kHz, torchaudio's defaults otherwise, which are Kaldi's except `dither=0`)
followed by their delta and delta-delta (window 2, edge frames replicated) -> (frames, 39).

Scale: the waveform is float in [-1, 1], as fairseq feeds it to `torchaudio.compliance.kaldi.mfcc`,
which does not rescale. kaldi-native-fbank expects the same range (its dither default 3e-5 is Kaldi's
1.0 on the int16 scale). A waveform on the int16 scale would only add a constant to c0.
"""
from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np
from scipy.ndimage import uniform_filter1d

SAMPLE_RATE = 16000
NUM_CEPS = 13


def mfcc_options(sample_rate: int = SAMPLE_RATE) -> knf.MfccOptions:
    """Kaldi MFCC options as fairseq's HuBERT MFCC reader sets them (via torchaudio's defaults)."""
    opts = knf.MfccOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0  # torchaudio's default; keeps features deterministic
    opts.num_ceps = NUM_CEPS
    opts.use_energy = False
    return opts


def compute_mfcc(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Static MFCCs of a mono float waveform in [-1, 1]: (frames, 13), 100 frames/s (25 ms / 10 ms)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (samples,), got shape {wav.shape}")
    extractor = knf.OnlineMfcc(mfcc_options(sample_rate))
    extractor.accept_waveform(sample_rate, wav)
    extractor.input_finished()
    num_frames = extractor.num_frames_ready  # snip_edges: 1 + (samples - 400) // 160, 0 when shorter
    if num_frames == 0:
        return np.zeros((0, NUM_CEPS), dtype=np.float32)
    return np.stack([extractor.get_frame(i) for i in range(num_frames)])


def delta(feats: np.ndarray, window: int = 2) -> np.ndarray:
    """Regression delta over 2*window+1 frames with edge frames replicated (torchaudio `compute_deltas`, win_length=5)."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if len(feats) == 0:
        return feats.copy()
    # knf returns [x, delta]; order=1 applied twice matches torchaudio's delta-of-delta exactly (Kaldi's
    # order=2 convolves the windows over the clamped input instead, which differs in the edge frames).
    return knf.compute_deltas(knf.DeltaOptions(order=1, window=window), feats)[:, feats.shape[1]:]


def mfcc_features(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, average: int = 1) -> np.ndarray:
    """MFCC + delta + delta-delta of a waveform: (frames, 39) float32, as fairseq's MfccFeatureReader; with
    `average` > 1 (odd), each frame then replaced by the mean of the `average` frames centred on it (edge frames
    replicated), see average_frames."""
    mfccs = compute_mfcc(wav, sample_rate)
    deltas = delta(mfccs)
    return average_frames(np.concatenate([mfccs, deltas, delta(deltas)], axis=1), average)


def average_frames(feats: np.ndarray, average: int) -> np.ndarray:
    """Each frame of (frames, dim) `feats` replaced by the mean of the `average` (odd) frames centred on it, edge
    frames replicated. Labels of averaged MFCCs depend less on where the 10 ms frames fall on the sound: the same
    espeak-ng utterance shifted by 2-8 ms changes 15.4% of its deduplicated labels (100 clusters), 6.9% when
    averaged over 5 frames and 5.0% over 9 (benchmarks/mfcc_label_shift.py), so that a word's units depend less on
    what came before it."""
    if average < 1 or average % 2 == 0:
        raise ValueError(f"frames are averaged over an odd number of frames centred on each, not {average}")
    if average == 1 or len(feats) == 0:
        return feats
    return uniform_filter1d(feats, average, axis=0, mode="nearest")
