"""The images a training run's reconstruction previews show: every class of a split stored one class after
another, the same images in every run."""

from __future__ import annotations

import numpy as np
import torch

from flows.distributed.train_worker import PREVIEW, SplitSource
from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest


def test_a_held_split_previews_every_class_of_a_class_ordered_dataset(tmp_path, digits_u8):
    from vae_core.data.sources.digits import load_digits_u8

    _, labels = load_digits_u8()
    order = np.argsort(labels, kind="stable")[:600]  # classes 0..3 stored one after another
    np.savez(tmp_path / "sorted.npz", images=digits_u8[order, 0].numpy(), labels=labels[order])
    root = str(tmp_path / "datasets")
    run_ingest(IngestRequest(source=str(tmp_path / "sorted.npz"), name="sorted", data_root=root, workers=1))
    info = open_dataset(root, "sorted")
    first = SplitSource.open(info, "train", "memory", torch.device("cpu"))
    shown = first.preview
    assert shown.shape == (PREVIEW, 8, 8, 1) and shown.dtype == torch.uint8
    images, split_labels, _ = read_split_u8(info, "train")
    assert set(split_labels[:PREVIEW]) == {0}  # stored class by class: its first rows are all one class
    label_of = {img.tobytes(): int(y) for img, y in zip(images, split_labels)}
    assert {label_of[img.numpy().tobytes()] for img in shown} == {0, 1, 2, 3}
    again = SplitSource.open(info, "train", "memory", torch.device("cpu")).preview
    assert torch.equal(again, shown)
