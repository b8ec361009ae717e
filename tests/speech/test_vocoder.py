"""Unit vocoder: fairseq's CodeHiFiGAN loaded from a released-format checkpoint, and `speechgpt unit2speech`."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.cli.main import main
from speechgpt_fairseq.speech.vocoder import UnitVocoder, VocoderError

HOP = 320  # samples per unit at 16 kHz (50 Hz units)
UNITS = [3, 1, 4, 15, 9, 26, 5, 35]  # no repeated neighbours


@pytest.fixture(scope="module")
def vocoder(tiny_vocoder) -> UnitVocoder:
    return UnitVocoder.from_files(*tiny_vocoder)


@pytest.fixture(scope="module")
def single_speaker(make_tiny_vocoder, tmp_path_factory):
    return make_tiny_vocoder(tmp_path_factory.mktemp("voc1"), num_units=50, num_speakers=None)


@pytest.fixture(scope="module")
def random_durations(make_tiny_vocoder, tmp_path_factory):
    """A vocoder whose duration predictor is fairseq's own with random weights: durations differ per unit."""
    return make_tiny_vocoder(tmp_path_factory.mktemp("voc-durations"), frames_per_unit=None)


def test_same_waveform_as_fairseqs_own_vocoder(random_durations):
    """Raw units (with repeats) through our path: with duration prediction, fairseq's CodeHiFiGANVocoder's waveform
    for the units with repeats merged (its predictor was trained on merged units); without, its waveform for the
    raw units, one frame each."""
    from fairseq.models.text_to_speech.vocoder import CodeHiFiGANVocoder

    checkpoint, config = random_durations
    theirs = CodeHiFiGANVocoder(str(checkpoint), json.loads(config.read_text()))  # as generate_waveform_from_code.py
    ours = UnitVocoder.from_files(checkpoint, config)
    raw = [3, 3, 1, 4, 4, 4, 15, 9, 9, 26, 5, 35, 35]
    merged = [3, 1, 4, 15, 9, 26, 5, 35]

    def fairseq(units, dur_prediction):
        x = {"code": torch.LongTensor(units).view(1, -1), "spkr": torch.LongTensor([2]).view(1, 1)}
        return theirs(x, dur_prediction).numpy()

    expected = fairseq(merged, True)
    with torch.no_grad():  # the frames fairseq's predictor gives each merged unit: not one length for all
        frames = theirs.model.dur_predictor(theirs.model.dict(torch.LongTensor([merged]))).exp().sub(1).round()
    assert len(set(frames.clamp(min=1).view(-1).tolist())) > 1 and len(expected) == frames.clamp(min=1).sum() * HOP
    np.testing.assert_array_equal(ours(raw, speaker=2), expected)
    np.testing.assert_array_equal(ours(raw, speaker=2, dur_prediction=False), fairseq(raw, False))


def test_config_facts(vocoder):
    assert (vocoder.sample_rate, vocoder.hop_length, vocoder.num_units, vocoder.num_speakers) == (16000, HOP, 100, 4)
    assert vocoder.has_duration_predictor


def test_length_follows_durations(vocoder):
    wav = vocoder(UNITS, speaker=0, dur_prediction=False)
    assert wav.dtype == np.float32 and wav.ndim == 1 and len(wav) == len(UNITS) * HOP
    assert len(vocoder(UNITS, speaker=0)) == 2 * len(UNITS) * HOP  # the fixture's predictor: 2 frames per unit
    # raw (repeated) units: one frame each without prediction; merged first with it
    raw = [7, 7, 7, 2, 2, 9]
    assert len(vocoder(raw, speaker=0, dur_prediction=False)) == 6 * HOP
    assert np.array_equal(vocoder(raw, speaker=0), vocoder([7, 2, 9], speaker=0))


def test_speaker_changes_the_voice(vocoder):
    a, b = vocoder(UNITS, speaker=0), vocoder(UNITS, speaker=1)
    assert a.shape == b.shape and not np.allclose(a, b)
    assert np.array_equal(a, vocoder(UNITS, speaker=0))


def test_single_speaker_vocoder(single_speaker):
    vocoder = UnitVocoder.from_files(*single_speaker)
    assert vocoder.num_speakers is None and len(vocoder([1, 2, 3], dur_prediction=False)) == 3 * HOP
    with pytest.raises(VocoderError, match="speaker 1 given, but this vocoder has a single speaker"):
        vocoder([1, 2, 3], speaker=1)


@pytest.mark.parametrize("units,speaker,message", [
    ([1, 100], 0, r"unit 100 is out of range: this vocoder has 100 units \(0..99, its num_embeddings\)"),
    ([1, -1], 0, "unit -1 is out of range"),
    ([1, 2], None, r"this vocoder has 4 speakers: choose one \(0..3\)"),
    ([1, 2], 4, r"speaker 4 is out of range: this vocoder has 4 speakers"),
    ([], 0, r"no units to speak \(empty unit sequence\)"),
])
def test_bad_inputs(vocoder, units, speaker, message):
    with pytest.raises(VocoderError, match=message):
        vocoder(units, speaker=speaker)


def test_bad_files(tiny_vocoder, single_speaker, tmp_path):
    checkpoint, config = tiny_vocoder
    cfg = json.loads(config.read_text())
    with pytest.raises(FileNotFoundError, match="no such vocoder checkpoint"):
        UnitVocoder.from_files(tmp_path / "missing.pt", config)
    (tmp_path / "c1.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_embeddings"}))
    with pytest.raises(VocoderError, match="c1.json: not a unit HiFi-GAN config, missing num_embeddings"):
        UnitVocoder.from_files(checkpoint, tmp_path / "c1.json")
    (tmp_path / "c2.json").write_text(json.dumps({**cfg, "f0": True}))
    with pytest.raises(VocoderError, match="F0-conditioned vocoders are not supported"):
        UnitVocoder.from_files(checkpoint, tmp_path / "c2.json")
    torch.save({"model": {}}, tmp_path / "nogen.pt")
    with pytest.raises(VocoderError, match="nogen.pt: expected a dict with the generator's weights under 'generator'"):
        UnitVocoder.from_files(tmp_path / "nogen.pt", config)
    with pytest.raises(VocoderError, match=r"vocoder.pt: does not match .*config.json: Error\(s\) in loading"):
        UnitVocoder.from_files(single_speaker[0], config)  # K=50, one speaker, against a K=100 multi-speaker config
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VocoderError, match="junk.pt: not a loadable vocoder checkpoint"):
        UnitVocoder.from_files(tmp_path / "junk.pt", config)


def read_wav(path):
    wav, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and wav.ndim == 1
    return wav


def test_unit2speech_end_to_end(cli, tiny_vocoder, vocoder, tmp_path):
    checkpoint, config = tiny_vocoder
    lines = [[5, 5, 7, 30, 30, 30, 2], [99, 0, 12]]
    (tmp_path / "a.km").write_text("".join(" ".join(map(str, u)) + "\n" for u in lines))
    (tmp_path / "a.ids").write_text("first\nsecond.wav\n")
    run = cli("speechgpt", "unit2speech", tmp_path / "a.km", "--vocoder", checkpoint, "--vocoder-config", config,
              "--speaker", 3, "--ids", tmp_path / "a.ids", "--out", tmp_path / "out", "--no-progress")
    assert "2 wavs" in run.stdout and "skipped 0" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.wav", "second.wav"]
    for name, units in zip(["first.wav", "second.wav"], lines):
        wav = read_wav(tmp_path / "out" / name)
        np.testing.assert_allclose(wav, vocoder(units, speaker=3), atol=1 / 32768)  # 16-bit PCM
    # SpeechGPT unit strings, one utterance on the command line, one frame per unit
    cli("speechgpt", "unit2speech", "--units", "<sosp><5><7><30><eosp>", "--no-dur-prediction", "--speaker", 0,
        "--vocoder", checkpoint, "--vocoder-config", config, "--out", tmp_path / "one")
    assert len(read_wav(tmp_path / "one" / "0.wav")) == 3 * HOP


def unit2speech(tiny_vocoder, *args):
    checkpoint, config = tiny_vocoder
    return main(["unit2speech", *map(str, args), "--vocoder", str(checkpoint), "--vocoder-config", str(config),
                 "--no-progress"])


def test_unit2speech_bad_lines(tiny_vocoder, tmp_path, capsys):
    units = tmp_path / "u.txt"
    units.write_text("<sosp><1><2><eosp>\n<sosp><1><200><eosp>\n\n<sosp><eosp>\n<sosp><3><eosp>\n")
    assert unit2speech(tiny_vocoder, units, "--speaker", 0, "--out", tmp_path / "out") == 1
    assert (f"speechgpt unit2speech: error: {units}:2: unit 200 is out of range: the vocabulary has 100 units "
            f"(0..99) (this input holds SpeechGPT unit strings" in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # stopped before any wav
    assert unit2speech(tiny_vocoder, units, "--speaker", 0, "--out", tmp_path / "out", "--skip-bad") == 0
    assert "2 wavs" in (out := capsys.readouterr().out) and "skipped 3 (empty: 1, malformed: 1, out of range: 1)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.wav", "4.wav"]  # named by line index
    assert unit2speech(tiny_vocoder, units, "--out", tmp_path / "o2", "--skip-bad") == 1
    assert "this vocoder has 4 speakers: choose one" in capsys.readouterr().err
    (tmp_path / "ids").write_text("a\nb\n")
    assert unit2speech(tiny_vocoder, units, "--speaker", 0, "--ids", tmp_path / "ids", "--out", tmp_path / "o3",
                       "--skip-bad") == 1
    assert f"{tmp_path / 'ids'}: has 2 lines, the units have 5" in capsys.readouterr().err
    assert unit2speech(tiny_vocoder, units, "--units", "1 2", "--speaker", 0, "--out", tmp_path / "o4") == 1
    assert "give a units file or --units, not both or neither" in capsys.readouterr().err


def test_unit2speech_refuses_an_empty_input(tiny_vocoder, tmp_path, capsys):
    """An empty units file would 'succeed' with no wav: an error naming it, and no output directory."""
    (tmp_path / "empty.units").write_text("\n \n")
    assert unit2speech(tiny_vocoder, tmp_path / "empty.units", "--speaker", 0, "--out", tmp_path / "out") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"speechgpt unit2speech: error: {tmp_path / 'empty.units'}: "
                                                        f"no units to speak (an empty input; nothing written)")
    assert not (tmp_path / "out").exists()


def test_unit2speech_failure_midway_leaves_no_partial_wav(tiny_vocoder, tmp_path, monkeypatch):
    from speechgpt_fairseq.speech import vocoder as vocoder_module

    write, calls = sf.write, []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"RIFF\0\0")  # a half-written wav, then the failure
            raise OSError("disk full")
        write(path, *args, **kwargs)

    monkeypatch.setattr(vocoder_module.sf, "write", write_then_fail)
    (tmp_path / "u.km").write_text("1 2 3\n4 5 6\n7 8 9\n")
    with pytest.raises(OSError, match="disk full"):
        unit2speech(tiny_vocoder, tmp_path / "u.km", "--speaker", 0, "--out", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0.wav"]  # no 1.wav, no temporary file
    read_wav(tmp_path / "out" / "0.wav")
