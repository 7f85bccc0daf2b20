"""Fréchet distance on features of a small classifier: an offline stand-in for FID.

Inception weights cannot be downloaded here, so the features come from a small CNN trained once per
dataset version on its train split and cached at
`<feature_net_root>/<dataset>/<version>/feature_net.safetensors`, its accuracy recorded in the metadata.
Distances are only comparable between evaluations that use the same cached classifier.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save
from torch import nn

from vae_core.names import check_name
from vae_core.settings import feature_net_root
from vae_core.storage import atomic_write_bytes, resolve

FILE_NAME = "feature_net.safetensors"
# What a classifier is trained and measured on at most: a seeded sample of a larger split (60,000 is all of
# MNIST's train set) whose pixels stay under SAMPLE_BYTES.
TRAIN_ROWS, TEST_ROWS, SAMPLE_BYTES = 60_000, 10_000, 256 * 2**20
# How much of the way from chance (1/K) to perfect accuracy a classifier's held-out accuracy must go before
# Fréchet distances in its features are trusted: half (Cohen's kappa 0.5 on balanced classes). Features that
# cannot separate the classes measure noise, not what the images show; a threshold relative to chance holds
# for any K (10 classes: 0.55, 2: 0.75, where a fixed 0.5 or twice chance would pass guessing or nothing).
# The small CNN reaches ~0.98 on MNIST; a classifier that learned nothing sits at chance.
MIN_SKILL = 0.5


class FeatureNet(nn.Module):
    """Small CNN classifier whose penultimate activations serve as Fréchet features; any H, W >= 8."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32,
                 num_features: int = 64) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.num_features = int(num_features)
        c, h, w = self.input_shape
        # Full resolution in the first layer only pays off for tiny images; from 16 px on, halving there
        # makes training ~5x cheaper (MNIST's 60k: seconds per epoch on two CPU cores).
        first_stride = 2 if min(h, w) >= 16 else 1
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=first_stride, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            # A fixed 2x2 grid keeps the feature size independent of H, W and keeps some layout.
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] or uint8 -> (B, num_features) penultimate activations."""
        weight = self.head.weight
        x = x.to(weight.device)
        x = x.to(weight.dtype) / 255.0 if x.dtype == torch.uint8 else x.to(weight.dtype)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))


def _labelled(images_u8: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C), int (N,) -> the labelled rows as uint8 (M, C, H, W) and int64 (M,)."""
    if images_u8.ndim != 4 or images_u8.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images_u8.dtype} {images_u8.shape}")
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (len(images_u8),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(images_u8)} images")
    if (labels < -1).any():
        raise ValueError(f"labels must be >= 0 (or -1 for unlabelled), got {int(labels.min())}")
    keep = labels >= 0
    images = torch.from_numpy(np.ascontiguousarray(images_u8[keep])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels[keep])


def _devices_to_fork(device: str | torch.device) -> list[int]:
    """CUDA devices whose RNG `fork_rng` must save: none for CPU training (avoids initialising CUDA)."""
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def train_feature_net(images_u8: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 3,
                      batch_size: int = 128, seed: int = 0, device: str | torch.device = "cpu",
                      max_rows: int | None = None) -> FeatureNet:
    """Train a `FeatureNet` on uint8 (N, H, W, C) images and int (N,) labels (-1 rows skipped).

    Deterministic for a seed; the global RNG is left as it was. Returns the net in eval mode on `device`.
    """
    images, targets = _labelled(images_u8, labels)
    if len(targets) == 0:
        raise ValueError("no labelled rows to train the feature classifier on (every label is -1)")
    found = torch.unique(targets)
    if len(found) < 2:
        raise ValueError(f"need at least 2 classes among labelled rows, found {found.tolist()}")
    if int(found.max()) >= num_classes:
        raise ValueError(f"label {int(found.max())} is out of range for num_classes={num_classes}")
    if max_rows is not None and max_rows < len(targets):
        pick = np.sort(np.random.default_rng(seed).choice(len(targets), size=max_rows, replace=False))
        images, targets = images[pick], targets[pick]
    with torch.random.fork_rng(devices=_devices_to_fork(device)):
        torch.manual_seed(seed)
        net = FeatureNet(tuple(images.shape[1:]), num_classes).to(device)
        _fit(net, images, targets, epochs, batch_size, torch.Generator().manual_seed(seed))
    return net.eval()


def _fit(net: FeatureNet, images: torch.Tensor, targets: torch.Tensor, epochs: int, batch_size: int,
         generator: torch.Generator) -> None:
    """Adam on cross-entropy; images uint8 (N, C, H, W) stay on CPU, each batch moves on its own."""
    device = net.head.weight.device
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(targets), generator=generator).split(batch_size):
            logits = net(images[idx].to(device).float() / 255.0)
            loss = nn.functional.cross_entropy(logits, targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(net: FeatureNet, images_u8: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Fraction of labelled rows (uint8 (N, H, W, C), int (N,)) whose predicted class is the label."""
    images, targets = _labelled(images_u8, labels)
    if len(targets) == 0:
        raise ValueError("no labelled rows to measure accuracy on (every label is -1)")
    net.eval()
    correct = 0
    for batch, target in zip(images.split(batch_size), targets.split(batch_size)):
        correct += int((net(batch).argmax(dim=1).cpu() == target).sum())
    return correct / len(targets)


def min_accuracy(num_classes: int) -> float:
    """The held-out accuracy a classifier of `num_classes` classes needs for trusted Fréchet distances."""
    chance = 1.0 / num_classes
    return chance + MIN_SKILL * (1.0 - chance)


def unreliable_features(accuracy: float, num_classes: int) -> str | None:
    """Why Fréchet distances in a classifier's features are unreliable (one sentence), or None if they are not."""
    if accuracy >= min_accuracy(num_classes):
        return None
    return (f"the feature classifier's held-out accuracy is {accuracy:.3f}, below {min_accuracy(num_classes):.3f} "
            f"(chance is {1 / num_classes:.3f} for {num_classes} classes; trusted from halfway between chance and "
            "1.0): its features barely tell the classes apart, so the Fréchet distances say little about the images")


def _metadata(blob: bytes) -> dict[str, str]:
    """String metadata of a safetensors blob: 8 bytes of header length, then a JSON header."""
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}


def _load(blob: bytes, device: str | torch.device) -> tuple[FeatureNet, dict[str, str]]:
    meta = _metadata(blob)
    net = FeatureNet(tuple(json.loads(meta["input_shape"])), int(meta["classes"]),
                     width=int(meta["width"]), num_features=int(meta["num_features"]))
    net.load_state_dict(st_load(blob))
    return net.to(device).eval(), meta


def feature_net_url(dataset: str, version: str, root: str | None = None) -> str:
    """Where the cached classifier of a dataset version lives (default root: `settings.feature_net_root()`).

    Raises ValueError for a dataset name or version that is unsafe as a path component.
    """
    check_name(dataset, "dataset name")  # the one naming rule: no '/', '..', or trailing newline
    check_name(version, "dataset version")
    return f"{(root or feature_net_root()).rstrip('/')}/{dataset}/{version}/{FILE_NAME}"


def load_feature_net(url: str, device: str | torch.device = "cpu") -> tuple[FeatureNet, dict[str, str]]:
    """A saved classifier (a local path or any fsspec URL) in eval mode on `device`, and its string metadata.

    Raises FileNotFoundError naming `url` when there is no file there, ValueError when the file is not
    one `save_feature_net` wrote.
    """
    fs, path = resolve(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no feature classifier at {url}")
    blob = fs.cat_file(path)
    try:
        return _load(blob, device)
    except (KeyError, ValueError) as err:  # no or malformed metadata: some other safetensors file
        raise ValueError(f"{url} is not a feature classifier file (saved by save_feature_net): {err}") from err


def save_feature_net(net: FeatureNet, url: str, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write `net` as safetensors to a local path or fsspec URL, atomically; returns the metadata written.

    The metadata holds what `load_feature_net` needs to rebuild the net (classes, input_shape, width,
    num_features) followed by `metadata` (string values only: safetensors stores nothing else).
    """
    meta = {"classes": str(net.num_classes), "input_shape": json.dumps(list(net.input_shape)),
            "width": str(net.width), "num_features": str(net.num_features)}
    extra = dict(metadata or {})
    bad = sorted(str(k) for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str) or k in meta)
    if bad:
        raise ValueError(f"feature classifier metadata must map strings to strings and leave {sorted(meta)} "
                         f"to save_feature_net; not so for {bad}")
    meta.update(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    fs, path = resolve(url)
    atomic_write_bytes(fs, path, st_save(state, metadata=meta))
    return meta


def _info(meta: dict[str, str], cached: bool, url: str) -> dict[str, Any]:
    return {"test_accuracy": float(meta["test_accuracy"]), "accuracy_split": meta["accuracy_split"],
            "num_classes": int(meta["classes"]), "train_rows": int(meta["train_rows"]),
            "cached": cached, "path": url}


Split = tuple[np.ndarray, np.ndarray]


def sample_rows(image_bytes: int) -> tuple[int, int]:
    """How many train and test rows a classifier is trained and measured on: `TRAIN_ROWS` and `TEST_ROWS`,
    fewer where they would pass `SAMPLE_BYTES` of pixels, so a split of any size trains it in bounded memory."""
    cap = max(1, SAMPLE_BYTES // max(1, image_bytes))
    return min(TRAIN_ROWS, cap), min(TEST_ROWS, cap)


def load_or_train_feature_net(
    dataset: str, version: str, train: Split | Callable[[], Split],
    test: Split | Callable[[], Split | None] | None,
    root: str | None = None, epochs: int = 3, seed: int = 0,
    device: str | torch.device = "cpu", progress: Callable[[str], None] | None = None,
    shape: tuple[int, int, int] | None = None,
) -> tuple[FeatureNet, dict[str, Any]]:
    """The cached classifier for a dataset version, or train, measure and cache one.

    `train`/`test` are (uint8 (N, H, W, C), int (N,)) with -1 for unlabelled rows, or functions that read
    them, called only when a classifier is trained (a cached one needs no images); a function for `train`
    needs the images' `shape` (H, W, C). A cached file is used when its input shape matches; otherwise it is
    replaced.
    """
    url = feature_net_url(dataset, version, root)
    fs, path = resolve(url)
    if shape is None:
        if callable(train):
            raise ValueError("load_or_train_feature_net needs the images' shape when train is read later")
        shape = tuple(train[0].shape[1:]) if train[0].ndim == 4 else None
    input_shape = [int(shape[2]), int(shape[0]), int(shape[1])] if shape else None
    if fs.exists(path):
        blob = fs.cat_file(path)
        if json.loads(_metadata(blob).get("input_shape", "null")) == input_shape:
            net, meta = _load(blob, device)
            return net, _info(meta, True, url)
    train = train() if callable(train) else train
    images, labels = train
    labelled = np.asarray(labels) >= 0
    if not labelled.any():
        raise ValueError(f"no labelled rows in the train split of {dataset}@{version} (every label is -1)")
    if progress is not None:
        progress(f"training the feature classifier for {dataset}@{version} on {int(labelled.sum()):,} "
                 "images (cached for later evaluations)")
    num_classes = int(np.asarray(labels)[labelled].max()) + 1
    net = train_feature_net(images, labels, num_classes, epochs=epochs, seed=seed, device=device)
    test = test() if callable(test) else test
    # An unlabelled test split cannot measure anything: fall back to the train split and say so.
    use_test = test is not None and bool((np.asarray(test[1]) >= 0).any())
    split, (eval_images, eval_labels) = ("test", test) if use_test else ("train", train)
    meta = save_feature_net(net, url, {
        "test_accuracy": repr(accuracy(net, eval_images, eval_labels)), "accuracy_split": split,
        "dataset": dataset, "version": version, "train_rows": str(int(labelled.sum())),
        "epochs": str(epochs), "seed": str(seed)})
    return net, _info(meta, False, url)


class _Extractor(nn.Module):
    """What torchmetrics calls: images -> float64 features, so its result keeps float64 precision."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] or uint8 -> (B, num_features) float64."""
        return self.net.features(x).double()


class FrechetScorer:
    """Fréchet distance between one real image set (features computed once) and any number of fake sets."""

    def __init__(self, net: FeatureNet, device: str | torch.device = "cpu", accuracy: float | None = None) -> None:
        """`accuracy`: the classifier's held-out accuracy, when known (`unreliable_features`)."""
        from vae_core.model.tv import import_torchmetrics

        import_torchmetrics()  # torchvision needs its shim before torchmetrics imports it
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.accuracy = accuracy
        self.metric = FrechetInceptionDistance(
            feature=_Extractor(self.net), reset_real_features=False).to(self.device)

    @torch.no_grad()
    def add_real(self, images: torch.Tensor) -> None:
        """Add real images: floats in [0, 1] or uint8, (B, C, H, W)."""
        self.net.eval()
        self.metric.update(images.to(self.device), real=True)

    def reset_fake(self) -> None:
        """Forget the fake images (the real side stays)."""
        self.metric.reset()  # keeps the real side (reset_real_features=False)

    @torch.no_grad()
    def add_fake(self, images: torch.Tensor) -> None:
        """Add fake images, (B, C, H, W): their features join running sums, so a stream of any length fits."""
        self.net.eval()
        self.metric.update(images.to(self.device), real=False)

    def fake_sums(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The fake side's running sums (features (F,), feature outer products (F, F), images), on the CPU:
        what a scorer elsewhere adds with `add_fake_sums`, as if it had seen these images itself."""
        m = self.metric
        return m.fake_features_sum.cpu(), m.fake_features_cov_sum.cpu(), int(m.fake_features_num_samples)

    def add_fake_sums(self, sums: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        total, outer, n = sums
        self.metric.fake_features_sum += total.to(self.device)
        self.metric.fake_features_cov_sum += outer.to(self.device)
        self.metric.fake_features_num_samples += n

    def compute(self) -> float:
        """Fréchet distance between the real images and the fake ones added since `reset_fake`."""
        real = int(self.metric.real_features_num_samples)
        fake = int(self.metric.fake_features_num_samples)
        if real < 2 or fake < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 real and 2 fake images, "
                             f"got {real} real and {fake} fake")
        return float(self.metric.compute())

    def distance(self, fake_batches: Iterable[torch.Tensor]) -> float:
        """Fréchet distance between the real images and the fake batches (each (B, C, H, W))."""
        self.reset_fake()
        for batch in fake_batches:
            self.add_fake(batch)
        return self.compute()
