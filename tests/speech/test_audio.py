"""read_audio: resampling, channel mixing, and the errors a bad file gets."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechgpt_fairseq.speech.audio import AudioEntry, AudioError, list_audio, read_audio, read_manifest


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


def test_espeak_speech_keeps_its_duration(tmp_path, espeak_ng):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-v", "en-us", "the red cup is on the table"], check=True)
    info = sf.info(path)
    assert info.samplerate == 22050
    wav = read_audio(path)
    assert len(wav) / 16000 == pytest.approx(info.duration, abs=1e-3)
    assert np.abs(wav).max() > 0.1


def test_each_fault_has_a_reason(tmp_path):
    """The reason word speech2unit --skip-bad reports skipped files by."""
    good = _tone(16000, 0.2)
    sf.write(tmp_path / "ok.wav", good, 16000, subtype="PCM_16")
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.wav").write_bytes(b"no audio here" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = good.copy()
    nan[5] = np.inf
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    cases = {"truncated.wav": (None, "truncated"), "garbage.wav": (None, "unreadable"), "empty.wav": (None, "empty"),
             "nan.wav": (None, "NaN or infinite"), "ok.wav": (len(good) + 1, "wrong sample count")}
    for name, (expected, reason) in cases.items():
        with pytest.raises(AudioError, match=name) as error:
            read_audio(tmp_path / name, expected_samples=expected)
        assert error.value.reason == reason
    assert len(read_audio(tmp_path / "ok.wav", expected_samples=len(good))) == len(good)


def test_manifest(tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text("/data/audio\nspk1/a.flac\t16000\n\nspk2/b.wav\t8000\n")
    root, entries = read_manifest(manifest)
    assert root == Path("/data/audio")
    assert entries == [AudioEntry(Path("/data/audio/spk1/a.flac"), "spk1/a.flac", 16000),
                       AudioEntry(Path("/data/audio/spk2/b.wav"), "spk2/b.wav", 8000)]
    manifest.write_text("/data/audio\nspk1/a.flac\t16000\nspk2/b.wav 8000\n")
    with pytest.raises(AudioError, match=rf"{manifest}:3: expected 'relative/path<TAB>num_samples', found 'spk2/b"):
        read_manifest(manifest)
    manifest.write_text("\na.wav\t10\n")
    with pytest.raises(AudioError, match=rf"{manifest}:1: expected the root directory"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError, match="nope.tsv: no such manifest"):
        read_manifest(tmp_path / "nope.tsv")


def test_list_audio_of_directories_and_files(tmp_path):
    corpus = tmp_path / "corpus"
    for name in ["b.wav", "a.flac", "sub/c.WAV", "sub/deeper/d.ogg", "notes.txt", "sub/e.npy", "z/f.wav"]:
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_bytes(b"")
    root, entries = list_audio([corpus])
    assert root == corpus
    assert [e.name for e in entries] == ["a.flac", "b.wav", "sub/c.WAV", "sub/deeper/d.ogg", "z/f.wav"]
    assert all(e.path == corpus / e.name and e.num_samples is None for e in entries)
    root, entries = list_audio([corpus / "z", corpus / "sub" / "c.WAV", str(corpus / "b.wav")])
    assert root == corpus  # the common parent: names stay distinct
    assert [e.name for e in entries] == ["z/f.wav", "sub/c.WAV", "b.wav"]  # in the order given


def test_list_audio_of_a_manifest_and_errors(tmp_path):
    manifest = tmp_path / "valid.tsv"
    manifest.write_text(f"{tmp_path}\nx.wav\t3\n")
    assert list_audio([manifest]) == (tmp_path, [AudioEntry(tmp_path / "x.wav", "x.wav", 3)])
    with pytest.raises(AudioError, match=r"valid\.tsv: a manifest is read alone; got 2 inputs"):
        list_audio([manifest, tmp_path])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioError, match=r"empty: no audio files \(.*\.wav"):
        list_audio([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="ghost: no such file or directory"):
        list_audio([tmp_path / "ghost"])
