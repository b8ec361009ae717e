"""MFCC features against an independent numpy Kaldi MFCC and torchaudio's delta formula."""
import subprocess

import numpy as np
import pytest

from speechgpt_fairseq.speech.audio import read_audio
from speechgpt_fairseq.speech.mfcc import compute_mfcc, delta, mfcc_features


def kaldi_mfcc_reference(wav: np.ndarray, sr: int = 16000, num_bins: int = 23, num_ceps: int = 13,
                         lifter: float = 22.0, low_freq: float = 20.0) -> np.ndarray:
    """Kaldi's MFCC (feature-mfcc.cc, feature-window.cc, mel-computations.cc) with torchaudio's defaults."""
    wav = wav.astype(np.float64)
    length, shift, nfft = 400, 160, 512
    num_frames = 1 + (len(wav) - length) // shift  # snip_edges
    frames = np.stack([wav[i * shift:i * shift + length] for i in range(num_frames)])
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85  # povey
    power = np.abs(np.fft.rfft(frames, n=nfft)) ** 2  # (T, 257)

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    fft_mel = mel(np.arange(nfft // 2) * sr / nfft)  # the Nyquist bin is not used
    lo, hi = mel(low_freq), mel(sr / 2)
    step = (hi - lo) / (num_bins + 1)
    banks = np.zeros((num_bins, nfft // 2))
    for b in range(num_bins):
        left, centre, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        up, down = (fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)
        banks[b] = np.where((fft_mel > left) & (fft_mel < right), np.where(fft_mel <= centre, up, down), 0.0)
    log_mel = np.log(np.maximum(power[:, :nfft // 2] @ banks.T, np.finfo(np.float32).eps))  # (T, 23)

    n = np.arange(num_bins)
    dct = np.sqrt(2.0 / num_bins) * np.cos(np.pi / num_bins * (n[None, :] + 0.5) * np.arange(num_ceps)[:, None])
    dct[0] = np.sqrt(1.0 / num_bins)
    return (log_mel @ dct.T) * (1.0 + 0.5 * lifter * np.sin(np.pi * np.arange(num_ceps) / lifter))


def torchaudio_deltas(x: np.ndarray, win_length: int = 5) -> np.ndarray:
    """torchaudio.functional.compute_deltas along time: replicate-padded regression."""
    n = (win_length - 1) // 2
    padded = np.concatenate([x[:1].repeat(n, 0), x, x[-1:].repeat(n, 0)])
    num = sum(k * (padded[n + k:n + k + len(x)] - padded[n - k:n - k + len(x)]) for k in range(1, n + 1))
    return num / (2 * sum(k * k for k in range(1, n + 1)))


@pytest.fixture(scope="module")
def noisy_tone() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wav = 0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.05 * rng.normal(size=len(t))
    return wav.astype(np.float32)


def test_shape_is_100_frames_per_second_by_39(noisy_tone):
    feats = mfcc_features(noisy_tone)
    assert feats.shape == (1 + (16000 - 400) // 160, 39) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[:, :13], compute_mfcc(noisy_tone))


def test_static_part_matches_numpy_kaldi_reference(noisy_tone):
    ours, ref = compute_mfcc(noisy_tone), kaldi_mfcc_reference(noisy_tone)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=2e-3)


def test_deltas_match_torchaudio_formula(noisy_tone):
    feats = mfcc_features(noisy_tone)
    static = feats[:, :13].astype(np.float64)
    d = torchaudio_deltas(static)
    np.testing.assert_allclose(feats[:, 13:26], d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[:, 26:], torchaudio_deltas(d), rtol=1e-4, atol=1e-4)  # edges included


def test_delta_of_a_linear_ramp_is_its_slope():
    ramp = (np.arange(50, dtype=np.float32)[:, None] * np.array([[0.5, -2.0, 0.0]], dtype=np.float32))
    d = delta(ramp)
    np.testing.assert_allclose(d[2:-2], np.broadcast_to([0.5, -2.0, 0.0], (46, 3)), atol=1e-5)
    np.testing.assert_allclose(delta(d)[4:-4], 0.0, atol=1e-5)
    # Edge frames are replicated, not zero-padded: at t=0, (1*(x1-x0) + 2*(x2-x0)) / 10 = 0.5 * 5 / 10.
    assert d[0, 0] == pytest.approx(0.25)


def test_input_scale_only_shifts_c0(noisy_tone):
    """[-1, 1] floats (fairseq's torchaudio input) vs the int16 scale: only c0 moves, by a constant."""
    unit, int16 = mfcc_features(noisy_tone), mfcc_features(noisy_tone * 32768)
    np.testing.assert_allclose(int16[:, 1:13], unit[:, 1:13], atol=2e-3)
    np.testing.assert_allclose(int16[:, 13:], unit[:, 13:], atol=2e-3)
    np.testing.assert_allclose(int16[:, 0] - unit[:, 0], np.sqrt(23) * 2 * np.log(32768), rtol=1e-4)


def test_short_or_bad_input():
    assert mfcc_features(np.zeros(399, dtype=np.float32)).shape == (0, 39)
    assert mfcc_features(np.zeros(400, dtype=np.float32)).shape == (1, 39)
    with pytest.raises(ValueError, match="mono"):
        compute_mfcc(np.zeros((2, 16000), dtype=np.float32))


def test_real_speech(tmp_path, espeak_ng):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-v", "en+f3", "seven plus two is nine"], check=True)
    wav = read_audio(path)
    feats = mfcc_features(wav)
    assert feats.shape == (1 + (len(wav) - 400) // 160, 39)
    assert abs(len(feats) - 100 * len(wav) / 16000) < 3
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(feats[:, :13], kaldi_mfcc_reference(wav), rtol=1e-3, atol=5e-3)
