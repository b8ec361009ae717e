"""learn-kmeans: fairseq's learn_kmeans settings and file sampling, and k-means files that fairseq's recipe and
ours read alike, both ways."""
import math

import joblib
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from speechgpt_fairseq.cli.main import main
from speechgpt_fairseq.cli.speech import sample_files
from speechgpt_fairseq.speech.audio import AudioEntry, list_audio, read_audio
from speechgpt_fairseq.speech.kmeans import FAIRSEQ_KMEANS_OPTIONS, KmeansLabeler, load_kmeans
from speechgpt_fairseq.speech.speech2unit import SpeechFeatures, SpeechToUnits

NAMES = ["a_hello.wav", "b_stereo.wav", "c_44k.flac", "sub/d_16k.wav"]


@pytest.fixture(scope="module")
def features(tiny_hubert, speech_dir) -> list[np.ndarray]:
    """Layer-2 features of the tiny HuBERT, one array per file of speech_dir."""
    return SpeechFeatures(tiny_hubert, layer=2)([read_audio(speech_dir / n) for n in NAMES])


def test_command_fits_a_model_fairseqs_apply_kmeans_reads(cli, fairseq_recipe, tiny_hubert, speech_dir, features,
                                                           tmp_path):
    km = tmp_path / "km8.bin"
    run = cli("speechgpt", "learn-kmeans", speech_dir, "--hubert", tiny_hubert, "--layer", "2", "--n-clusters", "8",
              "--n-init", "2", "--max-iter", "20", "--batch-size", "256", "--out", km, "--no-progress")
    frames = np.concatenate(features)
    assert f"wrote {km}: 8 clusters of 32-dim features" in run.stdout and f"{len(frames)} frames of 4 files" in run.stdout
    model = load_kmeans(km)
    assert type(model) is MiniBatchKMeans and model.cluster_centers_.shape == (8, 32)
    assert (model.n_init, model.max_iter, model.batch_size, model.random_state) == (2, 20, 256, 0)
    assert (model.tol, model.max_no_improvement, model.reassignment_ratio, model.init) == (
        FAIRSEQ_KMEANS_OPTIONS["tol"], FAIRSEQ_KMEANS_OPTIONS["max_no_improvement"],
        FAIRSEQ_KMEANS_OPTIONS["reassignment_ratio"], FAIRSEQ_KMEANS_OPTIONS["init"])
    theirs = fairseq_recipe("dump_km_label").ApplyKmeans(str(km))(frames)
    assert len(set(theirs.tolist())) > 4  # a real clustering, not one cluster
    np.testing.assert_array_equal(theirs, KmeansLabeler(km)(frames))
    s2u = SpeechToUnits(km, hubert=tiny_hubert, layer=2)
    assert s2u(speech_dir / NAMES[0]) == theirs[:len(features[0])].tolist()


def test_fairseqs_learn_kmeans_file_works_in_ours(fairseq_recipe, tiny_hubert, speech_dir, features, tmp_path):
    """fairseq's learn_kmeans.py (a bare joblib.dump of MiniBatchKMeans, the format of SpeechGPT's km1000.bin) on
    its dumped features: speech2unit labels with it as fairseq's dump_km_label does."""
    learn = fairseq_recipe("learn_kmeans")
    feat_dir = tmp_path / "feat"
    feat_dir.mkdir()
    np.save(feat_dir / "train_0_1.npy", np.concatenate(features))
    (feat_dir / "train_0_1.len").write_text("".join(f"{len(f)}\n" for f in features))
    km = tmp_path / "fairseq_km.bin"
    learn.learn_kmeans(str(feat_dir), "train", 1, str(km), n_clusters=6, seed=0, percent=-1, init="k-means++",
                       max_iter=20, batch_size=1000, tol=0.0, n_init=2, reassignment_ratio=0.0, max_no_improvement=100)
    assert type(joblib.load(km)) is MiniBatchKMeans
    dump = fairseq_recipe("dump_km_label")
    dump.dump_label(str(feat_dir), "train", str(km), 1, 0, str(tmp_path / "lab"))
    theirs = (tmp_path / "lab" / "train_0_1.km").read_text().splitlines()
    s2u = SpeechToUnits(km, hubert=tiny_hubert, layer=2)
    assert [" ".join(map(str, s2u(speech_dir / n))) for n in NAMES] == theirs


def test_percent_draws_the_files_fairseq_draws(fairseq_recipe, tmp_path):
    """fairseq samples utterances of its dumped features with np.random.seed(seed); np.random.choice(...): the
    same files, in the same order, as we sample before extracting any feature."""
    learn = fairseq_recipe("learn_kmeans")
    n = 23
    np.save(tmp_path / "s_0_1.npy", np.arange(n, dtype=np.float32).repeat(3)[:, None])  # frames carry their file
    (tmp_path / "s_0_1.len").write_text("3\n" * n)
    entries = [AudioEntry(tmp_path / f"{i}.wav", f"{i}.wav") for i in range(n)]
    for seed, percent in [(0, 0.3), (5, 0.5), (1, 1.0), (2, 0.01)]:
        np.random.seed(seed)
        drawn = learn.load_feature_shard(str(tmp_path), "s", 1, 0, percent)[::3, 0].astype(int).tolist()
        ours = [int(e.name.split(".")[0]) for e in sample_files(entries, percent, seed)]
        assert ours == drawn and len(ours) == math.ceil(n * percent)
    assert sample_files(entries, -1, 0) == entries
    with pytest.raises(ValueError, match=r"--percent 1.5: expected a fraction in \(0, 1\]"):
        sample_files(entries, 1.5, 0)


def test_percent_and_mfcc_features(cli, speech_dir, tmp_path):
    km = tmp_path / "mfcc.bin"
    run = cli("speechgpt", "learn-kmeans", speech_dir, "--percent", "0.5", "--seed", "3", "--n-clusters", "5",
              "--n-init", "1", "--max-iter", "10", "--out", km, "--no-progress")
    _, entries = list_audio([speech_dir])
    chosen = sample_files(entries, 0.5, 3)
    frames = sum(len(SpeechFeatures()([read_audio(e.path)])[0]) for e in chosen)
    assert f"5 clusters of 39-dim features (MFCC + deltas), fitted on {frames} frames of 2 files" in run.stdout
    assert load_kmeans(km).cluster_centers_.shape == (5, 39)
    assert len(SpeechToUnits(km)(speech_dir / NAMES[0])) > 0


def test_mfcc_average_is_recorded_in_the_kmeans_file_and_labels_with_it(cli, speech_dir, tiny_hubert, tmp_path,
                                                                        capsys):
    """learn-kmeans --mfcc-average 5 fits on MFCC frames averaged over 5 and records it in the k-means file: labels
    (speech2unit, chat, the exemplar vocoder) come from the same averaged features, not from fairseq's."""
    from speechgpt_fairseq.speech.mfcc import average_frames, mfcc_features

    km = tmp_path / "avg.bin"
    run = cli("speechgpt", "learn-kmeans", speech_dir, "--mfcc-average", "5", "--n-clusters", "8", "--n-init", "1",
              "--max-iter", "10", "--out", km, "--no-progress")
    assert "(MFCC + deltas, averaged over 5 frames)" in run.stdout
    model = load_kmeans(km)
    assert type(model) is MiniBatchKMeans and model.mfcc_average_frames == 5
    wav = read_audio(speech_dir / NAMES[0])
    plain, averaged = mfcc_features(wav), average_frames(mfcc_features(wav), 5)
    labels = SpeechToUnits(km)(speech_dir / NAMES[0])
    assert labels == KmeansLabeler(model)(averaged).tolist() != KmeansLabeler(model)(plain).tolist()
    out = tmp_path / "units"
    cli("speechgpt", "speech2unit", speech_dir / NAMES[0], "--kmeans", km, "--out", out, "--split", "a",
        "--no-progress")
    assert (out / "a.km").read_text().split() == list(map(str, labels))
    assert main(["learn-kmeans", str(speech_dir), "--hubert", str(tiny_hubert), "--mfcc-average", "3", "--out",
                 str(tmp_path / "h.bin"), "--no-progress"]) == 1
    assert "averaging frames (3) applies to MFCC features, not to HuBERT's" in capsys.readouterr().err


def test_average_frames_is_the_centred_mean():
    from speechgpt_fairseq.speech.mfcc import average_frames

    feats = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    padded = np.concatenate([feats[:1], feats[:1], feats, feats[-1:], feats[-1:]])  # edge frames replicated
    expected = np.stack([padded[i:i + 5].mean(0) for i in range(9)])
    np.testing.assert_allclose(average_frames(feats, 5), expected, rtol=1e-6, atol=1e-6)
    assert average_frames(feats, 1) is feats
    with pytest.raises(ValueError, match="odd number"):
        average_frames(feats, 4)


def test_errors(speech_dir, tmp_path, capsys):
    out = tmp_path / "km.bin"
    assert main(["learn-kmeans", str(speech_dir / NAMES[0]), "--n-clusters", "100000", "--out", str(out),
                 "--no-progress"]) == 1
    assert "cannot fit 100000 clusters on" in capsys.readouterr().err and not out.exists()
    out.write_bytes(b"mine")
    assert main(["learn-kmeans", str(speech_dir), "--out", str(out), "--no-progress"]) == 1
    assert f"{out}: exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"not audio" * 10)
    assert main(["learn-kmeans", str(bad), "--n-clusters", "2", "--out", str(tmp_path / "k.bin"),
                 "--no-progress"]) == 1
    assert f"{bad / 'x.wav'}: not a readable audio file" in capsys.readouterr().err
    assert main(["learn-kmeans", str(bad), str(speech_dir / NAMES[0]), "--n-clusters", "2", "--n-init", "1",
                 "--out", str(tmp_path / "k.bin"), "--skip-bad", "--no-progress"]) == 0
    assert "skipped 1 (unreadable: 1)" in capsys.readouterr().out
    assert main(["learn-kmeans", str(speech_dir), "--mfcc-average", "4", "--out", str(tmp_path / "k4.bin"),
                 "--no-progress"]) == 1
    assert "averaged over an odd number of frames, not 4" in capsys.readouterr().err
