"""What the latent space of a trained VAE holds: active units, and how well labels can be read off it.

- `active_units`: how many latent dimensions the encoder actually uses (Burda et al. 2015). A dimension
  whose posterior mean does not move across the data carries no information about x (posterior collapse).
- `knn_accuracy` and `linear_probe_accuracy`: classify held-out latents from labelled training latents; a
  high score means the classes are separated in z, with no label ever seen in training.
- `latent_probes`: both probes over partly labelled data (label -1 = no label), with notes saying what
  was skipped or left out, for reports.

Latents are numpy arrays (N, L), usually posterior means; labels are int arrays (N,).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

UNLABELLED = -1
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015


class RunningVariance:
    """Per-dimension mean and population variance of rows (B, L) added in batches, in float64.

    Chan et al.'s pairwise update: as exact as one pass over all rows at once, in memory for one batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None  # (L,)
        self.m2: np.ndarray | None = None  # (L,) sum of squared deviations from the mean

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64)
        if len(x):
            self._combine(len(x), x.mean(0), ((x - x.mean(0)) ** 2).sum(0))

    def merge(self, other: RunningVariance) -> None:
        """Add the rows another `RunningVariance` saw (another part of the split)."""
        if other.count and other.mean is not None and other.m2 is not None:
            self._combine(other.count, other.mean, other.m2)

    def _combine(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """(L,) population variance (ddof=0) of the rows added."""
        if self.count < 2 or self.m2 is None:
            raise ValueError(f"active units need at least 2 posterior means, got N={self.count}")
        return self.m2 / self.count


def count_active(variances: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> int:
    """How many dimensions vary across the data by more than `threshold` (`active_units`)."""
    return int((np.asarray(variances) > threshold).sum())


def active_units(means: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, np.ndarray]:
    """Count the latent dimensions the encoder uses.

    Burda et al. 2015: dimension u is active when A_u = Cov_x(E_q(z|x)[z_u]) > threshold (0.01 in the
    paper). The variance across the data set is the population variance (ddof=0), as a covariance
    over the data distribution is.

    Args:
        means: posterior means (N, L) over a data set, N >= 2.
        threshold: a dimension counts as active when its variance exceeds this.

    Returns:
        (number of active dimensions, per-dimension variances (L,) float64).
    """
    means = np.asarray(means)
    if means.ndim != 2:
        raise ValueError(f"means must be 2-D (N, L), got shape {means.shape}")
    if means.shape[0] < 2:
        raise ValueError(f"active units need at least 2 posterior means, got N={means.shape[0]}")
    variances = means.astype(np.float64).var(axis=0, ddof=0)
    return count_active(variances, threshold), variances


def _check_split(z: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Latents (N, L) and labels (N,) as arrays, or ValueError naming the split and the bad shape."""
    z, y = np.asarray(z), np.asarray(y)
    if z.ndim != 2:
        raise ValueError(f"{name} latents must be 2-D (N, L), got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"{name} labels must have shape ({z.shape[0]},), got {y.shape}")
    return z, y


def knn_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                 k: int = 5) -> float:
    """Accuracy on test latents (M, L) of a k-nearest-neighbour majority vote (Euclidean) over the
    train latents (N, L) and their labels (N,); ties go to the smallest label."""
    train_z, train_y = _check_split(train_z, train_y, "train")
    test_z, test_y = _check_split(test_z, test_y, "test")
    if not 1 <= k <= len(train_z):
        raise ValueError(f"k must be between 1 and the number of train rows ({len(train_z)}), got {k}")
    clf = KNeighborsClassifier(n_neighbors=k, metric="euclidean")
    clf.fit(train_z, train_y)
    return float(clf.score(test_z, test_y))


def linear_probe_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                          seed: int = 0) -> float:
    """Accuracy on test latents (M, L) of a logistic regression fitted on train latents (N, L).

    Latents are standardised first: posterior means of different dimensions live on very different
    scales, and an unscaled L2-penalised fit would favour the wide ones.
    """
    train_z, train_y = _check_split(train_z, train_y, "train")
    test_z, test_y = _check_split(test_z, test_y, "test")
    probe = Pipeline([
        ("scale", StandardScaler()),
        ("logreg", LogisticRegression(max_iter=1000, random_state=seed)),
    ])
    probe.fit(train_z, train_y)
    return float(probe.score(test_z, test_y))


def _skip_reason(n_train: int, n_test: int, n_classes: int) -> str | None:
    """Why the probes cannot run on this many labelled rows and train classes, or None if they can."""
    if n_train == 0 and n_test == 0:
        return "neither split has labels"
    if n_train == 0:
        return "the train split has no labels"
    if n_test == 0:
        return "the test split has no labels"
    if n_train < 2:
        return f"the train split has only {n_train} labelled row"
    if n_test < 2:
        return f"the test split has only {n_test} labelled row"
    if n_classes < 2:
        return f"the train split's labels hold only {n_classes} class"
    return None


def latent_probes(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                  k: int = 5, seed: int = 0) -> tuple[dict[str, float], list[str]]:
    """k-NN and linear-probe accuracy over the labelled rows of partly labelled splits.

    Args:
        train_z, test_z: latents (N, L) and (M, L).
        train_y, test_y: int labels (N,) and (M,); -1 means "no label" and the row is left out.
        k: neighbours for k-NN, capped at the number of labelled train rows.
        seed: random state of the linear probe.

    Returns:
        ({"knn_accuracy", "linear_probe_accuracy"} or {} when the probes cannot run, notes for a report).
    """
    train_z, train_y = _check_split(train_z, train_y, "train")
    test_z, test_y = _check_split(test_z, test_y, "test")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    train_keep, test_keep = train_y != UNLABELLED, test_y != UNLABELLED
    n_train, n_test = int(train_keep.sum()), int(test_keep.sum())
    n_classes = len(np.unique(train_y[train_keep]))
    reason = _skip_reason(n_train, n_test, n_classes)
    if reason is not None:
        return {}, [f"k-NN and linear probe skipped: {reason}"]

    notes = []
    left_out = {"train": len(train_y) - n_train, "test": len(test_y) - n_test}
    for split, n in left_out.items():
        if n:
            notes.append(f"k-NN and linear probe left out {n} unlabelled {split} row{'s' if n != 1 else ''}")
    if k > n_train:
        notes.append(f"k-NN uses k={n_train} (the number of labelled train rows) instead of k={k}")
        k = n_train
    tz, ty = train_z[train_keep], train_y[train_keep]
    ez, ey = test_z[test_keep], test_y[test_keep]
    metrics = {
        "knn_accuracy": knn_accuracy(tz, ty, ez, ey, k=k),
        "linear_probe_accuracy": linear_probe_accuracy(tz, ty, ez, ey, seed=seed),
    }
    return metrics, notes
