"""The exemplar vocoder: the frame nearest each centroid, mean run lengths, overlap-add, its file."""
import numpy as np
import pytest

from speechgpt_fairseq.speech.exemplar_vocoder import WINDOW, ExemplarVocoder

HOP = 160


def test_fit_keeps_the_nearest_frame_and_the_mean_run_length():
    rng = np.random.default_rng(0)
    wav = rng.uniform(-0.5, 0.5, 20 * HOP + WINDOW).astype(np.float32)
    labels = np.array([0] * 4 + [1] * 2 + [0] * 2 + [1] * 6 + [0] * 6)  # unit 0: runs 4, 2, 6; unit 1: 2, 6
    distances = np.ones(len(labels))
    distances[5], distances[9] = 0.5, 0.1  # unit 1's nearest frame is frame 9
    vocoder = ExemplarVocoder.fit([(wav, labels, distances)], num_units=3, hop=HOP)
    window = np.hanning(WINDOW).astype(np.float32)
    np.testing.assert_array_equal(vocoder.frames[1], wav[9 * HOP:9 * HOP + WINDOW] * window)
    np.testing.assert_array_equal(vocoder.frames[0], wav[:WINDOW] * window)  # ties: the first frame stays
    assert not vocoder.frames[2].any()  # never seen: silence
    np.testing.assert_allclose(vocoder.durations, [4.0, 4.0, 1.0])


def test_speaking_repeats_each_unit_for_its_duration(tmp_path):
    frames = np.stack([np.full(WINDOW, v, dtype=np.float32) * np.hanning(WINDOW) for v in (0.1, -0.2, 0.3)])
    vocoder = ExemplarVocoder(frames, np.array([2.0, 3.4, 1.0]), HOP)
    wav = vocoder([0, 0, 1, 2])  # repeats merged first: 0 for 2 frames, 1 for 3, 2 for 1
    assert wav.dtype == np.float32 and len(wav) == (6 - 1) * HOP + WINDOW
    middle_of = lambda frame: wav[frame * HOP + WINDOW // 2]  # noqa: E731
    assert middle_of(0) == pytest.approx(0.1, abs=1e-6) and middle_of(3) == pytest.approx(-0.2, abs=1e-6)
    vocoder.save(tmp_path / "v.npz")
    np.testing.assert_array_equal(ExemplarVocoder.load(tmp_path / "v.npz")([0, 1, 2]), vocoder([0, 1, 2]))
    with pytest.raises(ValueError, match="unit 3 is out of range: this vocoder has 3 units"):
        vocoder([0, 3])
    with pytest.raises(ValueError, match="empty unit sequence"):
        vocoder([])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not an exemplar vocoder"):
        ExemplarVocoder.load(tmp_path / "bad.npz")
