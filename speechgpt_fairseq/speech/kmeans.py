"""k-means over speech features: fitting (fairseq HuBERT's settings), joblib files, and fast labelling.

The files are joblib-pickled scikit-learn models, the format of fairseq's `learn_kmeans.py` and of the
released SpeechGPT/mHuBERT `*_km1000.bin` files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.errors import InputError

logger = logging.getLogger(__name__)

MFCC_AVERAGE_ATTRIBUTE = "mfcc_average_frames"

# fairseq examples/hubert/simple_kmeans/learn_kmeans.py defaults (verbose off).
FAIRSEQ_KMEANS_OPTIONS = dict(
    init="k-means++",
    max_iter=100,
    batch_size=10000,
    tol=0.0,
    max_no_improvement=100,
    n_init=20,
    reassignment_ratio=0.0,
    compute_labels=False,
    verbose=0,
)


def fit_kmeans(features: np.ndarray, n_clusters: int, seed: int = 0, **opts) -> MiniBatchKMeans:
    """Fit MiniBatchKMeans on (frames, dim) features; `opts` override fairseq's learn_kmeans settings."""
    if features.ndim != 2:
        raise ValueError(f"expected features of shape (frames, dim), got shape {features.shape}")
    if len(features) < n_clusters:
        raise InputError(f"cannot fit {n_clusters} clusters on {len(features)} frames: need at least as many frames")
    model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, **{**FAIRSEQ_KMEANS_OPTIONS, **opts})
    model.fit(features)
    # compute_labels=False leaves inertia_ unset; fairseq logs the per-frame inertia the same way.
    logger.info("k-means: %d clusters on %d frames, inertia per frame %.4f",
                n_clusters, len(features), -model.score(features) / len(features))
    return model


def save_kmeans(model: MiniBatchKMeans, path: str | Path) -> None:
    """Write `model` with joblib, atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        joblib.dump(model, f)


def load_kmeans(path: str | Path) -> MiniBatchKMeans:
    """Load a joblib k-means file (ours, fairseq's, or a released `*_km1000.bin`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such k-means file")
    try:
        model = joblib.load(path)
    except Exception as e:  # unpickling a file that is not a pickle fails in many ways, all of them this one
        raise InputError(f"{path}: not a k-means file (expected a joblib-pickled scikit-learn k-means model; "
                         f"reading it failed with {type(e).__name__})") from None
    if not hasattr(model, "cluster_centers_"):
        raise InputError(f"{path}: expected a fitted scikit-learn k-means model, found {type(model).__name__}")
    return model


def mfcc_average_of(model: MiniBatchKMeans) -> int:
    """Over how many frames the MFCC features `model` was fitted on were averaged (mfcc.average_frames): learn-kmeans
    records it in the model (`mfcc_average_frames`), so that labelling computes the same features; 1 (fairseq's
    features) in any other k-means file."""
    return int(getattr(model, MFCC_AVERAGE_ATTRIBUTE, 1))


class KmeansLabeler:
    """Nearest-centroid labels with precomputed centroids (fairseq's ApplyKmeans, batched).

    The distances are computed with torch, not numpy: labelling runs between HuBERT forward passes, and
    numpy's BLAS threads spinning beside torch's slowed the passes down by 5-10% on a CPU."""

    def __init__(self, model: MiniBatchKMeans | str | Path, batch_size: int = 65536):
        if isinstance(model, (str, Path)):
            model = load_kmeans(model)
        self.centers_t = np.ascontiguousarray(model.cluster_centers_.T)  # (dim, K)
        self.mfcc_average = mfcc_average_of(model)
        self.centers_norm = (self.centers_t ** 2).sum(0, keepdims=True)  # (1, K)
        self._centers_t, self._centers_norm = torch.from_numpy(self.centers_t), torch.from_numpy(self.centers_norm)
        self.batch_size = batch_size

    @property
    def n_clusters(self) -> int:
        return self.centers_t.shape[1]

    @property
    def dim(self) -> int:
        """Dimension of the features the centroids live in."""
        return self.centers_t.shape[0]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Labels of (frames, dim) features: (frames,) int64 in [0, K)."""
        x = np.asarray(features, dtype=self.centers_t.dtype)
        if x.ndim != 2 or x.shape[1] != self.centers_t.shape[0]:
            raise ValueError(f"expected features of shape (frames, {self.centers_t.shape[0]}), got shape {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
        labels = np.empty(len(x), dtype=np.int64)
        for start in range(0, len(x), self.batch_size):
            batch = x[start:start + self.batch_size]
            # |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centre, so it does not change the argmin.
            dist = self._centers_norm - 2 * batch @ self._centers_t  # (B, K)
            labels[start:start + len(batch)] = dist.argmin(dim=1).numpy()
        return labels
