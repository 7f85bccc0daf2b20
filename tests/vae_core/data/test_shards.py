"""The shard format and its reader API, independent of any source."""

from __future__ import annotations

import io
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vae_core.data.shards import (MANIFEST, DatasetInfo, ItemCounts, Manifest, build_table, fit_model, list_versions,
                                  open_dataset, read_split_u8, shard_paths, shard_schema, table_to_u8)
from vae_core.ingestion.ingest import run_ingest
from vae_core.ingestion.report import summary_markdown
from vae_core.names import parse_dataset_ref
from vae_core.requests import IngestRequest
from vae_core.storage import atomic_write_bytes, resolve


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


def test_fit_model_reshapes_a_preset_and_holds_a_trained_model_to_its_shape(two_versions):
    from vae_core.errors import EncodeError, TrainError
    from vae_core.model.config import ModelConfig, VAEConfig

    root, first, _ = two_versions
    info = open_dataset(root, "toy", first.version)  # 4x4x1 images
    preset = VAEConfig(model=ModelConfig(image_size=(8, 8), channels=3, hidden_channels=[8, 8]))
    assert fit_model(info, preset, "small", TrainError).model.input_shape == (1, 4, 4)
    deep = VAEConfig(model=ModelConfig(image_size=(8, 8), hidden_channels=[8, 8, 8]))  # takes multiples of 8 only
    with pytest.raises(TrainError, match=rf"(?s)dataset toy@{first.version} has 4x4x1 images, which preset 'deep' cannot "
                                         r"take: .*not divisible by 8"):
        fit_model(info, deep, "deep", TrainError)
    trained = ModelConfig(image_size=(4, 4), hidden_channels=[8])
    assert fit_model(info, trained, "models:/m/1", EncodeError, "advice") is trained
    with pytest.raises(EncodeError, match=rf"^models:/m/1 takes 8x8x3 images but dataset toy@{first.version} has "
                                          r"4x4x1: use another dataset$"):
        fit_model(info, preset.model, "models:/m/1", EncodeError, "use another dataset")


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


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_duplicates_that_disagree_on_their_label_are_reported(tmp_path):
    """A folder whose class folders hold the same picture twice: the copy dropped under another class is
    label noise, listed with both labels in the manifest and counted in the summary and the report."""
    rng = np.random.default_rng(2)
    a, b, c = (_png(rng.integers(0, 256, (6, 6, 3), np.uint8)) for _ in range(3))
    files = {"cat/1.png": a, "cat/2.png": b, "cat/3.png": c, "dog/4.png": a, "dog/5.png": c,
             "cat/6.png": b}  # 4 and 5 disagree with the kept 1 and 3; 6 agrees with the kept 2
    for name, data in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    result = run_ingest(IngestRequest(name="pets", source=str(tmp_path / "src"), data_root=str(tmp_path / "ds"),
                                      workers=1))
    m = result.manifest
    assert m.label_names == ["cat", "dog"] and m.items.duplicates == 3 and m.label_conflicts == 2
    pairs = {d.id.rsplit("/", 1)[-1]: (d.duplicate_of.rsplit("/", 1)[-1], d.label, d.kept_label, d.label_conflict)
             for d in m.duplicates}
    assert pairs == {"4.png": ("1.png", 1, 0, True), "5.png": ("3.png", 1, 0, True), "6.png": ("2.png", 0, 0, False)}
    written = json.loads(Path(result.url, MANIFEST).read_text())["duplicates"]
    assert sorted(sorted(d) for d in written) == [["duplicate_of", "id", "kept_label", "label", "source"]] * 2 + [
        ["duplicate_of", "id", "source"]]  # an agreeing pair reads as before: versions stay as they were
    assert open_dataset(str(tmp_path / "ds"), "pets").manifest.label_conflicts == 2  # read back
    assert result.summary().label_conflicts == 2
    report = summary_markdown(result)
    assert "2 duplicates disagree with the kept copy on their label" in report
    assert re.search(r"\| `[^`]*dog/4\.png` \| 1 \(dog\) \| `[^`]*cat/1\.png` \| 0 \(cat\) \|", report)


def test_unlabelled_duplicates_record_no_labels(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (5, 4, 4), np.uint8)
    images[3] = images[0]
    result = run_ingest(IngestRequest(name="plain", source=_npz(tmp_path / "p.npz", images),
                                      data_root=str(tmp_path / "ds"), workers=1))
    [d] = result.manifest.duplicates
    assert (d.label, d.kept_label, result.manifest.label_conflicts) == (None, None, 0)
    assert "label" not in json.loads(result.manifest.to_json())["duplicates"][0]
