"""k-means: fitting, the joblib file round trip, and KmeansLabeler against scikit-learn."""
import ast
from pathlib import Path

import joblib
import numpy as np
import pytest

from speechgpt_fairseq.speech.kmeans import KmeansLabeler, fit_kmeans, load_kmeans, save_kmeans


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).normal(size=(6000, 39)).astype(np.float32)


@pytest.fixture(scope="module")
def model(features):
    return fit_kmeans(features, n_clusters=32, seed=0, n_init=3, max_iter=5)


def test_separates_well_separated_blobs():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=20.0, size=(5, 8))
    truth = np.repeat(np.arange(5), 300)
    x = (centres[truth] + rng.normal(size=(len(truth), 8))).astype(np.float32)
    labels = KmeansLabeler(fit_kmeans(x, n_clusters=5, seed=0))(x)
    # One label per blob and one blob per label: the clustering equals the truth up to renaming.
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 5 and len({t for t, _ in pairs}) == 5 and len({k for _, k in pairs}) == 5


def test_same_seed_same_model(features, model):
    again = fit_kmeans(features, n_clusters=32, seed=0, n_init=3, max_iter=5)
    np.testing.assert_array_equal(again.cluster_centers_, model.cluster_centers_)


def fairseq_recipe_defaults(learn_kmeans) -> dict:
    """The option defaults of fairseq's learn_kmeans.py command line (`parser.add_argument("--x", default=...)`),
    read from the recipe's source: they live under its `if __name__ == "__main__":`."""
    tree = ast.parse(Path(learn_kmeans.__file__).read_text())
    defaults = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            name = node.args[0].value
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if name.startswith("--") and default is not None:
                defaults[name[2:]] = ast.literal_eval(default)
    return defaults


def test_fairseq_settings_and_overrides(features, fairseq_recipe):
    """Our MiniBatchKMeans has the parameters of the one fairseq's recipe builds from its defaults (its
    `get_km_model`), except the seed (the recipe seeds numpy globally) and verbosity; options override them."""
    learn = fairseq_recipe("learn_kmeans")
    defaults = fairseq_recipe_defaults(learn)
    theirs = learn.get_km_model(n_clusters=4, **{k: v for k, v in defaults.items() if k not in ("seed", "percent")})
    ours = fit_kmeans(features[:500], n_clusters=4, seed=0)
    ignored = {"random_state", "verbose"}
    assert {k: v for k, v in ours.get_params().items() if k not in ignored} == \
        {k: v for k, v in theirs.get_params().items() if k not in ignored}
    assert {"max_iter", "batch_size", "n_init", "tol", "max_no_improvement", "reassignment_ratio"} <= set(defaults)
    km = fit_kmeans(features[:500], n_clusters=4, seed=0, max_iter=2)
    assert km.max_iter == 2 and km.n_init == defaults["n_init"]


def test_labeler_equals_sklearn_predict(features, model):
    x = np.random.default_rng(2).normal(size=(5000, 39)).astype(np.float32)
    labels = KmeansLabeler(model, batch_size=777)(x)  # several batches, the last one partial
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, model.predict(x))
    np.testing.assert_array_equal(KmeansLabeler(model)(features), model.predict(features))


def test_save_load_roundtrip_gives_identical_labels(tmp_path, features, model):
    path = tmp_path / "sub" / "km100.bin"
    save_kmeans(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["km100.bin"]  # no temp file left behind
    loaded = load_kmeans(path)
    np.testing.assert_array_equal(loaded.cluster_centers_, model.cluster_centers_)
    np.testing.assert_array_equal(KmeansLabeler(path)(features), KmeansLabeler(model)(features))
    assert KmeansLabeler(path).n_clusters == 32


def test_plain_joblib_file_loads(tmp_path, model):
    """Files written by fairseq's learn_kmeans.py are a bare joblib.dump."""
    joblib.dump(model, tmp_path / "fairseq_km.bin")
    np.testing.assert_array_equal(load_kmeans(tmp_path / "fairseq_km.bin").cluster_centers_, model.cluster_centers_)


def test_errors(tmp_path, model):
    joblib.dump({"not": "a model"}, tmp_path / "dict.bin")
    with pytest.raises(ValueError, match=r"dict\.bin.*k-means"):
        load_kmeans(tmp_path / "dict.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_kmeans(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"\(frames, 39\)"):
        KmeansLabeler(model)(np.zeros((3, 13), dtype=np.float32))
    with pytest.raises(ValueError, match="at least as many frames"):
        fit_kmeans(np.zeros((10, 2), dtype=np.float32), n_clusters=20)


@pytest.mark.parametrize("content", [b"\x00\x01 not a pickle \xff" * 8, b""], ids=["garbage", "empty"])
def test_a_file_that_is_not_a_kmeans_model_is_named(tmp_path, content):
    """Our message, not the unpickler's KeyError or EOFError."""
    (tmp_path / "km.bin").write_bytes(content)
    with pytest.raises(ValueError, match=r"km.bin: not a k-means file \(expected a joblib-pickled scikit-learn "):
        load_kmeans(tmp_path / "km.bin")
    joblib.dump({"cluster_centers": 1}, tmp_path / "dict.bin")
    with pytest.raises(ValueError, match=r"dict.bin: expected a fitted scikit-learn k-means model, found dict"):
        load_kmeans(tmp_path / "dict.bin")
