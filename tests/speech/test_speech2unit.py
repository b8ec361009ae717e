"""speech2unit: units of real speech (espeak-ng) against fairseq's simple_kmeans recipe, the outputs of the
`speechgpt speech2unit` command, sharding, resuming after a kill, and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechgpt_fairseq.cli.main import main
from speechgpt_fairseq.speech.audio import AudioEntry, AudioError, read_audio
from speechgpt_fairseq.speech.kmeans import KmeansLabeler, fit_kmeans, load_kmeans, save_kmeans
from speechgpt_fairseq.speech.mfcc import mfcc_features
from speechgpt_fairseq.speech.speech2unit import (SpeechFeatures, SpeechToUnits, length_batches, read_windows,
                                                  shard_range)
from speechgpt_fairseq.speech.units import dedup_units, format_unit_string, unit_durations

DIR_NAMES = ["a_hello.wav", "b_stereo.wav", "c_44k.flac", "sub/d_16k.wav"]


@pytest.fixture(scope="module")
def hubert_kmeans(tiny_hubert, speech_dir, tmp_path_factory) -> Path:
    """A 12-cluster k-means fitted on layer-2 features of the tiny HuBERT."""
    wavs = [read_audio(speech_dir / name) for name in DIR_NAMES]
    feats = np.concatenate(SpeechFeatures(tiny_hubert, layer=2)(wavs))
    path = tmp_path_factory.mktemp("km") / "km12.bin"
    save_kmeans(fit_kmeans(feats, 12, seed=0, n_init=2, max_iter=30), path)
    return path


@pytest.fixture(scope="module")
def mfcc_kmeans(speech_dir, tmp_path_factory) -> Path:
    feats = np.concatenate([mfcc_features(read_audio(speech_dir / name)) for name in DIR_NAMES])
    path = tmp_path_factory.mktemp("km") / "mfcc_km10.bin"
    save_kmeans(fit_kmeans(feats, 10, seed=0, n_init=2, max_iter=30), path)
    return path


@pytest.fixture(scope="module")
def corpus(speech_dir, tmp_path_factory) -> Path:
    """Nine 16 kHz mono files (cuts of the spoken ones, as fairseq's recipe reads them) and train.tsv."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [str(root)]
    for i, (name, cut) in enumerate((n, c) for c in (1.0, 0.6, 0.35) for n in DIR_NAMES[:3]):
        wav = read_audio(speech_dir / name)
        wav = wav[:int(len(wav) * cut)]
        if len(wav) % 16000 < 400:  # fairseq's reader fails on a last 1 s chunk too short for a frame (see below)
            wav = wav[:len(wav) - len(wav) % 16000]
        sf.write(root / f"utt{i}.wav", wav, 16000, subtype="PCM_16")
        lines.append(f"utt{i}.wav\t{len(wav)}")
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    return root


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ------------------------------------------------------------------------------------------------- library

def test_file_and_waveform_give_the_same_raw_labels(tiny_hubert, hubert_kmeans, speech_dir):
    s2u = SpeechToUnits(hubert_kmeans, hubert=tiny_hubert, layer=2)
    path = speech_dir / "b_stereo.wav"
    units = s2u(path)
    wav = read_audio(path)
    assert units == s2u(wav) == s2u(str(path))
    assert len(units) == s2u.features.reader.num_frames(len(wav))  # one label per 20 ms frame, repeats kept
    assert dedup_units(units) != units and set(units) <= set(range(12)) and s2u.num_units == 12


def test_batched_labels_equal_one_by_one(tiny_hubert, hubert_kmeans, speech_dir):
    s2u = SpeechToUnits(hubert_kmeans, hubert=tiny_hubert, layer=2, max_chunk=16000)
    wavs = [read_audio(speech_dir / name) for name in DIR_NAMES]
    assert s2u.labels(wavs, max_batch_samples=40000) == [s2u(w) for w in wavs]


def test_mfcc_units(mfcc_kmeans, speech_dir):
    s2u = SpeechToUnits(mfcc_kmeans)
    wav = read_audio(speech_dir / "a_hello.wav")
    assert s2u(wav) == KmeansLabeler(mfcc_kmeans)(mfcc_features(wav)).tolist()
    assert len(s2u(wav)) == 1 + (len(wav) - 400) // 160  # 100 frames per second


def test_mfcc_features_equal_fairseqs_reader(fairseq_recipe, corpus):
    """fairseq's dump_mfcc_feature.py computes them with torchaudio: compared where torchaudio is installed (the
    MFCC tests compare with a numpy Kaldi reference and torchaudio's delta formula everywhere)."""
    pytest.importorskip("torchaudio")
    reader = fairseq_recipe("dump_mfcc_feature").MfccFeatureReader(16000)
    for i in range(3):
        path = corpus / f"utt{i}.wav"
        theirs = reader.get_feats(str(path)).numpy()
        np.testing.assert_allclose(SpeechFeatures()([read_audio(path)])[0], theirs, rtol=1e-3, atol=5e-3)


def test_kmeans_must_fit_the_features(tiny_hubert, hubert_kmeans, mfcc_kmeans):
    with pytest.raises(ValueError, match=rf"{mfcc_kmeans}: clusters 39-dimensional features, but {tiny_hubert} "
                                         r"layer 2 gives 32-dimensional ones"):
        SpeechToUnits(mfcc_kmeans, hubert=tiny_hubert, layer=2)
    with pytest.raises(ValueError, match=rf"{hubert_kmeans}: clusters 32-dimensional features, but MFCC"):
        SpeechToUnits(hubert_kmeans)


def test_too_short_or_bad_waveforms(mfcc_kmeans):
    s2u = SpeechToUnits(mfcc_kmeans)
    with pytest.raises(AudioError, match=r"the waveform: too short: 399 samples"):
        s2u(np.zeros(399, dtype=np.float32))
    assert len(s2u(np.zeros(400, dtype=np.float32))) == 1
    with pytest.raises(ValueError, match="mono waveform"):
        s2u(np.zeros((2, 16000), dtype=np.float32))


def test_length_batches():
    lengths = [5, 100, 40, 60, 100, 7, 300, 41, 90, 85, 39]
    batches = length_batches(lengths, max_samples=200, max_padding=0.2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert len(batch) == 1 or padded <= 200 and sum(lengths[i] for i in batch) >= 0.8 * padded
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert batches[0] == [6]  # longer than the budget: alone
    assert [lengths[i] for i in batches[1]] == [100, 100]  # a third would pass 200 samples
    assert [lengths[i] for i in batches[4]] == [40, 39]  # 7 would fit in 200 samples, but pad 28 % of them
    assert [lengths[i] for b in length_batches(lengths, 1000, max_padding=1.0) for i in b][:3] == [300, 100, 100]
    assert length_batches([], 10) == []


def test_shards_are_fairseqs(fairseq_recipe):
    feature_utils = fairseq_recipe("feature_utils")
    for total, nshard in [(9, 3), (10, 3), (7, 4), (1000, 7), (5, 5)]:
        ranges = [shard_range(total, nshard, r) for r in range(nshard)]
        assert ranges == [feature_utils.get_shard_range(total, nshard, r) for r in range(nshard)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="shard 3 does not exist"):
        shard_range(9, 3, 3)
    with pytest.raises(ValueError, match="empty"):
        shard_range(2, 3, 1)


def test_read_windows_keep_order_and_bound_the_audio(corpus):
    entries = [AudioEntry(corpus / f"utt{i}.wav", f"utt{i}.wav") for i in range(9)]
    windows = list(read_windows(entries, window_samples=30000))
    assert [e for w in windows for e, _ in w] == entries
    assert len(windows) > 2
    for window in windows[:-1]:  # a window closes as soon as it holds the budget
        sizes = [len(wav) for _, wav in window]
        assert sum(sizes) >= 30000 > sum(sizes[:-1])


# ---------------------------------------------------------------------------------------- against fairseq

def test_command_gives_fairseqs_recipe_labels(cli, fairseq_recipe, tiny_hubert, hubert_kmeans, corpus, tmp_path):
    """dump_hubert_feature + dump_km_label on the manifest give exactly our train.km."""
    dump_hubert, dump_km = fairseq_recipe("dump_hubert_feature"), fairseq_recipe("dump_km_label")
    reader = dump_hubert.HubertFeatureReader(str(tiny_hubert), 2, max_chunk=16000)
    feature_utils = fairseq_recipe("feature_utils")
    iterate, _ = feature_utils.get_path_iterator(str(corpus / "train.tsv"), 1, 0)
    feats = [reader.get_feats(path, n).numpy() for path, n in iterate()]
    (tmp_path / "feat").mkdir()
    np.save(tmp_path / "feat" / "train_0_1.npy", np.concatenate(feats))  # dump_feature's files
    (tmp_path / "feat" / "train_0_1.len").write_text("".join(f"{len(f)}\n" for f in feats))
    dump_km.dump_label(str(tmp_path / "feat"), "train", str(hubert_kmeans), 1, 0, str(tmp_path / "lab"))

    out = tmp_path / "ours"
    run = cli("speechgpt", "speech2unit", corpus / "train.tsv", "--hubert", tiny_hubert, "--layer", 2, "--kmeans",
              hubert_kmeans, "--out", out, "--max-chunk", 16000, "--max-batch-samples", 50000, "--no-progress")
    assert read_lines(out / "train.km") == read_lines(tmp_path / "lab" / "train_0_1.km")
    assert read_lines(out / "train.names") == [f"utt{i}.wav" for i in range(9)]
    km = [list(map(int, line.split())) for line in read_lines(out / "train.km")]
    assert read_lines(out / "train.units") == [format_unit_string(dedup_units(u)) for u in km]
    assert sorted(p.name for p in out.iterdir()) == ["train.km", "train.names", "train.units"]
    assert f"{out / 'train.km'}" in run.stdout and "9 utterances" in run.stdout and "skipped 0" in run.stdout


# ------------------------------------------------------------------------------------------ the command

def test_directory_of_any_audio(cli, tiny_hubert, hubert_kmeans, speech_dir, tmp_path):
    """Stereo, 44.1 kHz FLAC, a subdirectory: names relative to the directory, labels as SpeechToUnits gives."""
    out = tmp_path / "out"
    cli("speechgpt", "speech2unit", speech_dir, "--hubert", tiny_hubert, "--layer", "2", "--kmeans", hubert_kmeans,
        "--out", out, "--no-dedup", "--no-progress")
    assert read_lines(out / "all.names") == DIR_NAMES
    s2u = SpeechToUnits(hubert_kmeans, hubert=tiny_hubert, layer=2)
    expected = [s2u(speech_dir / name) for name in DIR_NAMES]
    assert read_lines(out / "all.km") == [" ".join(map(str, u)) for u in expected]
    assert read_lines(out / "all.units") == [format_unit_string(u) for u in expected]  # --no-dedup: every frame

    cli("speechgpt", "speech2unit", speech_dir / "b_stereo.wav", speech_dir / "sub", "--kmeans", hubert_kmeans,
        "--hubert", tiny_hubert, "--layer", "2", "--out", out, "--split", "mine", "--durations", "--no-progress")
    assert read_lines(out / "mine.names") == ["b_stereo.wav", "sub/d_16k.wav"]
    units = [u for u in read_lines(out / "mine.units")]
    durations = [list(map(int, line.split())) for line in read_lines(out / "mine.dur")]
    for raw, line, dur in zip([expected[1], expected[3]], units, durations):
        assert line == format_unit_string(dedup_units(raw))
        assert dur == unit_durations(raw) and sum(dur) == len(raw)


def test_mfcc_command(cli, mfcc_kmeans, corpus, tmp_path):
    cli("speechgpt", "speech2unit", corpus / "train.tsv", "--kmeans", mfcc_kmeans, "--out", tmp_path, "--no-progress")
    s2u = SpeechToUnits(mfcc_kmeans)
    assert read_lines(tmp_path / "train.km") == [" ".join(map(str, s2u(corpus / f"utt{i}.wav"))) for i in range(9)]


def test_each_input_gets_its_own_outputs(cli, mfcc_kmeans, corpus, tmp_path):
    """--each: one run labels several manifests as separate runs would, each into OUT/<its name>.*"""
    root, *lines = read_lines(corpus / "train.tsv")
    for name, part in (("first", lines[:4]), ("second", lines[4:])):
        (tmp_path / f"{name}.tsv").write_text("\n".join([root, *part]) + "\n")
        cli("speechgpt", "speech2unit", tmp_path / f"{name}.tsv", "--kmeans", mfcc_kmeans, "--out", tmp_path / "one",
            "--no-progress")
    run = cli("speechgpt", "speech2unit", tmp_path / "first.tsv", tmp_path / "second.tsv", "--each", "--kmeans",
              mfcc_kmeans, "--out", tmp_path / "each", "--no-progress")
    for name, count in (("first", 4), ("second", 5)):
        for suffix in ("km", "units", "names"):
            assert read_lines(tmp_path / "each" / f"{name}.{suffix}") == read_lines(tmp_path / "one" / f"{name}.{suffix}")
        assert f"{name}.units" in run.stdout and len(read_lines(tmp_path / "each" / f"{name}.km")) == count
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "first.tsv").write_text((tmp_path / "first.tsv").read_text())
    run = cli("speechgpt", "speech2unit", tmp_path / "first.tsv", tmp_path / "other" / "first.tsv", "--each",
              "--kmeans", mfcc_kmeans, "--out", tmp_path / "x", check=False)
    assert run.returncode == 1 and "two inputs have the same name" in run.stderr and not (tmp_path / "x").exists()


def test_shards_partition_and_concatenate_to_the_whole(cli, tiny_hubert, hubert_kmeans, corpus, tmp_path):
    common = ["--hubert", tiny_hubert, "--layer", "2", "--kmeans", hubert_kmeans, "--out", tmp_path, "--no-progress"]
    cli("speechgpt", "speech2unit", corpus / "train.tsv", *common)
    for rank in range(2):
        cli("speechgpt", "speech2unit", corpus / "train.tsv", "--shard", rank, "--nshard", 2, *common)
    for suffix in ("km", "units", "names"):
        shards = [read_lines(tmp_path / f"train_{rank}_2.{suffix}") for rank in range(2)]
        assert [len(s) for s in shards] == [4, 5]  # fairseq's split of 9 files: round(4.5) = 4
        assert sum(shards, []) == read_lines(tmp_path / f"train.{suffix}")


def test_outputs_are_not_replaced_unasked(tiny_hubert, hubert_kmeans, corpus, tmp_path, capsys):
    args = ["speech2unit", str(corpus / "train.tsv"), "--kmeans", str(hubert_kmeans), "--hubert", str(tiny_hubert),
            "--layer", "2", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    (tmp_path / "train.km").write_text("old\n")
    assert main(args) == 1
    assert f"{tmp_path / 'train.km'}: exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert read_lines(tmp_path / "train.km")[0] != "old"
    assert main(args + ["--no-dedup", "--durations"]) == 1
    assert "--durations gives the run lengths of deduplicated units" in capsys.readouterr().err


def test_a_kill_while_outputs_land_never_leaves_new_beside_old(mfcc_kmeans, corpus, tmp_path, monkeypatch, capsys):
    """--overwrite over an earlier run, killed after the first output file landed: no file of the earlier run is
    left beside one of the new run; the same command then finishes the outputs."""
    out = tmp_path / "out"
    args = ["speech2unit", str(corpus / "train.tsv"), "--kmeans", str(mfcc_kmeans), "--out", str(out), "--no-progress",
            "--overwrite"]
    assert main(args) == 0
    new = {path.name: path.read_text() for path in out.iterdir()}
    for name in new:
        (out / name).write_text("earlier run\n")

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == out:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_then_die)
        with pytest.raises(Killed):
            main(args)
    landed = {path.name: path.read_text() for path in out.iterdir() if path.is_file()}
    assert "earlier run\n" not in landed.values() and landed and all(new[n] == text for n, text in landed.items())
    assert main(args[:-1]) == 0  # the same command, without --overwrite: it finishes what was killed
    assert {path.name: path.read_text() for path in out.iterdir()} == new


# ---------------------------------------------------------------------------------------------- resume

def test_resume_after_kill_gives_the_uninterrupted_output(cli, tiny_hubert, hubert_kmeans, speech_dir, tmp_path):
    """SIGKILL in the middle, then the same command: the same files as a run that was never stopped."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(30):  # one-file windows: plenty of moments to be killed in
        os.link(speech_dir / DIR_NAMES[i % 3], root / f"{i:02d}_{DIR_NAMES[i % 3]}")
    command = ["speechgpt", "speech2unit", root, "--hubert", tiny_hubert, "--layer", "2", "--kmeans", hubert_kmeans,
               "--max-batch-samples", "2000", "--durations", "--no-progress"]
    cli(*command, "--out", tmp_path / "whole")

    out = tmp_path / "killed"
    state = out / ".all.partial" / "state.json"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "speechgpt"), *map(str, command[1:]), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and 0 < json.loads(state.read_text() or '{"done": 0}')["done"]:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    done = json.loads(state.read_text())["done"]
    assert 0 < done < 30
    assert not list(out.glob("all.*"))  # no output file exists before it is complete
    for suffix in ("km", "units", "names", "dur"):  # as if killed while appending a window
        with open(out / ".all.partial" / suffix, "a") as f:
            f.write("half a line")

    run = cli(*command, "--out", out)
    assert f"resuming {out / '.all.partial'}: {done} input files done" in run.stderr
    for suffix in ("km", "units", "names", "dur"):
        assert (out / f"all.{suffix}").read_text() == (tmp_path / "whole" / f"all.{suffix}").read_text()
    assert not (out / ".all.partial").exists()
    assert "30 utterances" in run.stdout


def test_resume_refuses_other_settings(tiny_hubert, hubert_kmeans, corpus, tmp_path, monkeypatch, capsys):
    """An interrupted run (simulated: stopped after its first window) continues only with its own settings and
    models: a k-means refitted at the same path is refused."""
    kmeans = tmp_path / "kmeans" / "km.bin"
    kmeans.parent.mkdir()
    shutil.copy(hubert_kmeans, kmeans)
    out = tmp_path / "out"
    args = ["speech2unit", str(corpus / "train.tsv"), "--kmeans", str(kmeans), "--hubert", str(tiny_hubert),
            "--layer", "2", "--out", str(out), "--max-batch-samples", "3000", "--no-progress"]
    original, calls = SpeechToUnits.labels, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)
    monkeypatch.setattr(SpeechToUnits, "labels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(SpeechToUnits, "labels", original)
    assert 0 < json.loads((out / ".train.partial" / "state.json").read_text())["done"] < 9
    assert main(args[:-3] + ["--layer", "1", "--no-progress"]) == 1
    assert "holds an interrupted run with other settings (layer: 2 then, 1 now)" in capsys.readouterr().err
    save_kmeans(fit_kmeans(load_kmeans(hubert_kmeans).cluster_centers_, 4, seed=0), kmeans)  # refitted in place
    assert main(args) == 1
    assert "with other settings (kmeans_sha256:" in capsys.readouterr().err
    shutil.copy(hubert_kmeans, kmeans)
    assert main(args) == 0
    assert len(read_lines(out / "train.km")) == 9


# ------------------------------------------------------------------------------------------- bad input

def _bad_files(root: Path, good: np.ndarray) -> dict[str, tuple[str, str]]:
    """name -> (manifest line, the reason and message an error gives) for each kind of bad file."""
    sf.write(root / "nan.wav", np.where(np.arange(len(good)) == 100, np.nan, good), 16000, subtype="FLOAT")
    sf.write(root / "empty.wav", np.zeros(0), 16000)
    sf.write(root / "short.wav", good[:300], 16000)
    (root / "garbage.wav").write_bytes(b"this is not audio" * 20)
    sf.write(root / "full.wav", good, 16000, subtype="PCM_16")
    data = (root / "full.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[:len(data) // 2])
    sf.write(root / "count.wav", good, 16000, subtype="PCM_16")
    return {
        "nan.wav": (f"nan.wav\t{len(good)}", "NaN or infinite", "NaN or infinite samples"),
        "empty.wav": ("empty.wav\t0", "empty", "no audio samples"),
        "short.wav": ("short.wav\t300", "too short", "too short: 300 samples"),
        "garbage.wav": ("garbage.wav\t340", "unreadable", "not a readable audio file"),
        "truncated.wav": (f"truncated.wav\t{len(good)}", "truncated", "truncated file"),
        "count.wav": (f"count.wav\t{len(good) + 5}", "wrong sample count",
                      f"the manifest says {len(good) + 5} samples, the file has {len(good)}"),
        "missing.wav": (f"missing.wav\t{len(good)}", "missing", "no such audio file"),
    }


@pytest.fixture(scope="module")
def bad_corpus(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = read_audio(corpus / "utt0.wav")
    sf.write(root / "good1.wav", good, 16000, subtype="PCM_16")
    sf.write(root / "good2.wav", good[:8000], 16000, subtype="PCM_16")
    return root, _bad_files(root, good), len(good)


BAD = ["nan.wav", "empty.wav", "short.wav", "garbage.wav", "truncated.wav", "count.wav", "missing.wav"]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_file_stops_the_run_naming_it(bad, bad_corpus, mfcc_kmeans, tmp_path, capsys):
    root, cases, n = bad_corpus
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{root}\ngood1.wav\t{n}\n{cases[bad][0]}\ngood2.wav\t8000\n")
    out = tmp_path / "out"
    assert main(["speech2unit", str(manifest), "--kmeans", str(mfcc_kmeans), "--out", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"speechgpt speech2unit: error: {root / bad}: " in err and cases[bad][2] in err
    assert not list(out.glob("train.*"))


def test_a_run_that_fails_before_any_file_is_done_leaves_nothing(bad_corpus, mfcc_kmeans, tmp_path):
    """Nothing to resume, so nothing left: no state, and the directories the run made for OUT are gone; a
    directory that was there before stays."""
    root, cases, n = bad_corpus
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{root}\n{cases['garbage.wav'][0]}\ngood1.wav\t{n}\n")
    args = ["speech2unit", str(manifest), "--kmeans", str(mfcc_kmeans), "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "made" / "out")]) == 1
    assert not (tmp_path / "made").exists()
    (tmp_path / "mine").mkdir()
    assert main([*args, str(tmp_path / "mine")]) == 1
    assert list((tmp_path / "mine").iterdir()) == []


def test_skip_bad_leaves_them_out_and_reports_them(cli, bad_corpus, mfcc_kmeans, tmp_path):
    root, cases, n = bad_corpus
    manifest = tmp_path / "train.tsv"
    manifest.write_text("\n".join([str(root), f"good1.wav\t{n}"] + [cases[b][0] for b in BAD] + ["good2.wav\t8000"]))
    out = tmp_path / "out"
    run = cli("speechgpt", "speech2unit", manifest, "--kmeans", mfcc_kmeans, "--out", out, "--skip-bad",
              "--no-progress")
    assert read_lines(out / "train.names") == ["good1.wav", "good2.wav"]
    s2u = SpeechToUnits(mfcc_kmeans)
    assert read_lines(out / "train.km") == [" ".join(map(str, s2u(root / g))) for g in ("good1.wav", "good2.wav")]
    assert "2 utterances" in run.stdout and f"skipped {len(BAD)} (" in run.stdout
    for bad in BAD:
        reason, message = cases[bad][1], cases[bad][2]
        assert f"{reason}: 1" in run.stdout
        assert any(line.strip().startswith(f"{reason}: {root / bad}: ") and message in line
                   for line in run.stdout.splitlines()), (bad, run.stdout)
