"""The shard format and its reader API, independent of any source."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vae_core.requests import IngestRequest, parse_dataset_ref
from vae_core.ingest import run_ingest
from vae_core.shards import (
    DatasetInfo,
    ItemCounts,
    Manifest,
    atomic_write_bytes,
    build_table,
    list_versions,
    open_dataset,
    read_split_u8,
    resolve,
    shard_paths,
    shard_schema,
    table_to_u8,
)


def _npz(path, images, labels=None):
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return str(path)


def test_schema_matches_the_design_table():
    s = shard_schema(28 * 28)
    assert s.names == ["id", "image", "label", "source"]
    assert s.field("id").type == pa.string() and not s.field("id").nullable
    assert s.field("image").type == pa.binary(784) and not s.field("image").nullable
    assert s.field("label").type == pa.int32() and s.field("label").nullable
    assert s.field("source").type == pa.string()


def test_build_table_round_trips_pixels_and_null_labels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 5, 3, 3), dtype=np.uint8)
    y = np.array([0, 1, -1, 2, -1, 3, 4], np.int32)
    t = build_table([f"i{i}" for i in range(7)], x, y, ["s"] * 7)
    assert t.column("label").null_count == 2
    x2, y2, ids = table_to_u8(t, (5, 3, 3))
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    assert ids == [f"i{i}" for i in range(7)]


def test_build_table_refuses_wrong_dtype_and_lengths():
    with pytest.raises(ValueError, match="uint8"):
        build_table(["a"], np.zeros((1, 2, 2, 1), np.float32), np.zeros(1, np.int32), ["s"])
    with pytest.raises(ValueError, match="labels"):
        build_table(["a", "b"], np.zeros((2, 2, 2, 1), np.uint8), np.zeros(1, np.int32), ["s", "s"])


def test_item_counts_must_add_up():
    ItemCounts(seen=10, ok=7, duplicates=1, quarantined=2)
    with pytest.raises(ValueError, match="do not add up"):
        ItemCounts(seen=10, ok=7, duplicates=1, quarantined=1)


def test_atomic_write_leaves_only_the_final_file():
    fs, root = resolve("memory://atomic-test")
    atomic_write_bytes(fs, f"{root}/a/b.bin", b"payload")
    assert fs.cat_file(f"{root}/a/b.bin") == b"payload"
    assert fs.ls(f"{root}/a", detail=False) == [f"{root}/a/b.bin"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_interrupted_mid_write_leaves_nothing(where, tmp_path, monkeypatch):
    fs, root = resolve(str(tmp_path) if where == "local" else f"memory://atomic-{uuid.uuid4().hex}")
    real = type(fs).pipe_file

    def half_then_interrupt(self, path, data, *args, **kw):  # as Ctrl-C halfway through an upload
        real(self, path, data[: len(data) // 2], *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(fs), "pipe_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(fs, f"{root}/a/b.bin", b"payload")
    assert fs.ls(f"{root}/a", detail=False) == []


@pytest.fixture
def two_versions(tmp_path):
    rng = np.random.default_rng(1)
    root = str(tmp_path / "ds")
    first = run_ingest(IngestRequest(name="toy", source=_npz(tmp_path / "a.npz", rng.integers(0, 256, (50, 4, 4), np.uint8),
                                                               np.arange(50) % 3), data_root=root, workers=1))
    second = run_ingest(IngestRequest(name="toy", source=_npz(tmp_path / "b.npz", rng.integers(0, 256, (60, 4, 4), np.uint8)),
                                     data_root=root, workers=1))
    return root, first, second


def test_open_dataset_resolves_latest_and_named_versions(two_versions):
    root, first, second = two_versions
    assert first.version != second.version
    assert list_versions(root, "toy") == [first.version, second.version]
    latest = open_dataset(root, "toy")
    assert isinstance(latest, DatasetInfo) and latest.version == second.version
    older = open_dataset(root, "toy", first.version)
    assert older.counts == first.manifest.counts and sum(older.counts.values()) == 50
    assert older.shape == (4, 4, 1) and older.manifest.label_names == ["0", "1", "2"]


def test_open_dataset_errors_name_what_is_missing(two_versions, tmp_path):
    root, first, _ = two_versions
    with pytest.raises(FileNotFoundError, match="no dataset 'nope'"):
        open_dataset(root, "nope")
    with pytest.raises(FileNotFoundError, match=f"no version 'deadbeef'.*{first.version}"):
        open_dataset(root, "toy", "deadbeef")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        read_split_u8(open_dataset(root, "toy"), "dev")


def test_names_and_versions_never_leave_the_data_root(two_versions):
    root, first, _ = two_versions
    inner = f"{root}/inner"  # its parent holds the real dataset 'toy', which the escaping paths below reach
    (Path(inner) / "x").mkdir(parents=True)
    cases = [("..", None, ".."), ("../toy", None, "../toy"), ("../../x", None, "../../x"), ("/etc", None, "/etc"),
             ("a/b", None, "a/b"), (f"{root}/toy", None, f"{root}/toy"), ("toy", "../..", "../.."),
             ("x", f"../../toy/{first.version}", f"../../toy/{first.version}"),
             ("..", f"toy/{first.version}", "..")]
    for name, version, bad in cases:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            open_dataset(inner, name, version)
        if version is None:
            with pytest.raises(ValueError, match=re.escape(repr(bad))):
                list_versions(inner, name)
    with pytest.raises(ValueError, match=re.escape("dataset version '../..'")):
        parse_dataset_ref("toy@../..")
    name, _, version = "toy@../..".partition("@")  # the same reference, split by a caller that skips the check
    with pytest.raises(ValueError, match=re.escape("'../..'")):
        open_dataset(root, name, version)


def test_read_split_checks_checksums(two_versions):
    root, first, _ = two_versions
    info = open_dataset(root, "toy", first.version)
    shard = shard_paths(info, "train", urls=True)[0]
    images, labels, ids = read_split_u8(info, "train")
    assert images.dtype == np.uint8 and images.shape == (len(ids), 4, 4, 1) and labels.dtype == np.int32
    # Replace the shard with a valid Parquet file holding different pixels: only the checksum notices.
    table = pq.read_table(shard)
    flipped = build_table(ids, 255 - images, labels, table.column("source").to_pylist())
    pq.write_table(flipped, shard, compression="zstd")
    with pytest.raises(ValueError, match="checksum"):
        read_split_u8(info, "train")
    x, _, _ = read_split_u8(info, "train", verify=False)
    np.testing.assert_array_equal(x, 255 - images)


def test_unfinished_version_without_manifest_is_ignored(two_versions):
    root, first, second = two_versions
    fs, path = resolve(root)
    fs.makedirs(f"{path}/toy/0000unfinished/train", exist_ok=True)
    fs.pipe_file(f"{path}/toy/0000unfinished/train/part-00000.parquet", b"partial")
    assert "0000unfinished" not in list_versions(root, "toy")
    assert open_dataset(root, "toy").version == second.version


def test_manifest_rejects_inconsistent_counts(two_versions):
    root, first, _ = two_versions
    body = first.manifest.model_dump()
    body["items"]["ok"] += 1
    body["items"]["seen"] += 1
    with pytest.raises(ValueError, match="splits hold"):
        Manifest.model_validate(body)
