"""read_audio: resampling, channel mixing, and the errors a bad file gets."""
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from speechgpt_fairseq.speech.audio import AudioError, read_audio


def _tone(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    return np.fft.rfftfreq(len(wav), 1 / sr)[np.abs(np.fft.rfft(wav)).argmax()]


def test_resamples_22050_to_16000_keeping_duration_and_pitch(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, _tone(22050, 1.5), 22050, subtype="PCM_16")
    wav = read_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 24000) <= 1
    assert abs(_peak_hz(wav, 16000) - 440.0) < 1.0
    assert np.abs(wav[2000:-2000]).max() == pytest.approx(0.5, abs=0.01)


def test_other_target_rate(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, _tone(16000, 1.0), 16000)
    assert abs(len(read_audio(path, target_sr=8000)) - 8000) <= 1


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = _tone(16000, 0.5, 300), _tone(16000, 0.5, 700)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(read_audio(path), (left + right) / 2, atol=1e-7)


def test_int16_is_scaled_to_unit_range(tmp_path):
    path = tmp_path / "int16.wav"
    sf.write(path, np.array([0, 16384, -32768, 32767], dtype=np.int16).repeat(100), 16000)
    wav = read_audio(path)
    assert wav.min() == -1.0 and wav.max() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("content", [b"this is not audio at all" * 10, b"RIFF\x24\x00\x00\x00WAVEfmt "])
def test_garbage_or_truncated_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken_clip.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="broken_clip.wav"):
        read_audio(path)


def test_header_without_samples_is_an_error(tmp_path):
    path = tmp_path / "empty_clip.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty_clip\.wav.*no audio samples"):
        read_audio(path)


def test_nan_samples_are_an_error(tmp_path):
    wav = _tone(16000, 0.1)
    wav[10] = np.nan
    path = tmp_path / "nan_clip.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan_clip\.wav.*NaN"):
        read_audio(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        read_audio(tmp_path / "nowhere.wav")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH (Debian package espeak-ng)")
def test_espeak_speech_keeps_its_duration(tmp_path):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-v", "en-us", "the red cup is on the table"], check=True)
    info = sf.info(path)
    assert info.samplerate == 22050
    wav = read_audio(path)
    assert len(wav) / 16000 == pytest.approx(info.duration, abs=1e-3)
    assert np.abs(wav).max() > 0.1
