"""Each source kind: what it reads, and the clear errors it gives for bad input."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.data.sources.base import SourceError
from vae_core.data.sources.decode import ShapeSpec, conform_pixels, decode_image, to_grey
from vae_core.data.sources.detect import detect_format, open_source
from vae_core.data.sources.formats import BY_NAME, REGISTRY
from vae_core.ingestion.ingest import IngestError, run_ingest
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(3)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _ingest(tmp_path: Path, source: str, **kw) -> tuple:
    r = run_ingest(IngestRequest(name="t", source=source, data_root=str(tmp_path / "ds"), workers=1, **kw))
    info = open_dataset(str(tmp_path / "ds"), "t", r.version)
    return r, {s: read_split_u8(info, s) for s in ("train", "val", "test")}


def _all_rows(splits: dict) -> dict[str, tuple[np.ndarray, int]]:
    return {i: (x[k], int(y[k])) for x, y, ids in splits.values() for k, i in enumerate(ids)}


# ------------------------------------------------------------------------------------------------ IDX


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True, magic: bytes | None = None) -> None:
    header = (magic or bytes([0, 0, 8, arr.ndim])) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gzipped_or_not(tmp_path, gz):
    ext = ".gz" if gz else ""
    x_train, x_test = RNG.integers(0, 256, (30, 5, 4), np.uint8), RNG.integers(0, 256, (10, 5, 4), np.uint8)
    src = tmp_path / "idx"
    src.mkdir()
    _write_idx(src / f"train-images-idx3-ubyte{ext}", x_train, gz)
    _write_idx(src / f"train-labels-idx1-ubyte{ext}", np.arange(30) % 4, gz)
    _write_idx(src / f"t10k-images-idx3-ubyte{ext}", x_test, gz)
    _write_idx(src / f"t10k-labels-idx1-ubyte{ext}", np.arange(10) % 4, gz)
    assert detect_format(str(src)) == "idx"
    r, splits = _ingest(tmp_path, str(src))
    assert r.manifest.counts["test"] == 10 and r.manifest.counts["train"] + r.manifest.counts["val"] == 30
    rows = _all_rows(splits)
    for i in range(30):
        np.testing.assert_array_equal(rows[f"train/{i}"][0][:, :, 0], x_train[i])
        assert rows[f"train/{i}"][1] == i % 4


def test_idx_wrong_magic_names_the_file(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 2, 2)), magic=bytes([0, 0, 0x0D, 3]))
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: wrong IDX magic 0x00000d03"):
        open_source(str(tmp_path))


def test_idx_count_mismatch_names_both_files(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 2, 2)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte.gz: 4 labels for 3 images in .*train-images"):
        open_source(str(tmp_path))


def test_idx_truncated_files_fail_before_decoding(tmp_path):
    data = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (100, 28, 28)) + bytes(100 * 784)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-500])
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte: header declares shape \(100, 28, 28\).*truncated"):
        open_source(str(tmp_path))
    gz = gzip.compress(data)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) - 40])
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: .*(truncated|corrupt)"):
        run_ingest(IngestRequest(name="t", source=str(tmp_path), data_root=str(tmp_path / "ds")))
    assert not (tmp_path / "ds").exists()


def test_idx_corrupt_gzip_body_is_a_source_error(tmp_path):
    data = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2000, 8, 8)) + RNG.bytes(2000 * 64)
    gz = bytearray(gzip.compress(data))
    gz[len(gz) // 2 : len(gz) // 2 + 64] = bytes(64)  # damage the deflate stream, keep the trailer
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(bytes(gz))
    with pytest.raises(SourceError, match=r"x-images-idx3-ubyte.gz: corrupt gzip data|x-images-idx3-ubyte.gz"):
        run_ingest(IngestRequest(name="t", source=str(tmp_path), data_root=str(tmp_path / "ds")))


# ------------------------------------------------------------------------------------------------ npz


def test_npz_with_labels_and_channels(tmp_path):
    x = RNG.integers(0, 256, (40, 6, 6, 3), np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(40) % 5)
    r, splits = _ingest(tmp_path, str(tmp_path / "a.npz"), channels=1)
    assert (r.manifest.channels, r.manifest.label_names) == (1, ["0", "1", "2", "3", "4"])
    rows = _all_rows(splits)
    np.testing.assert_array_equal(rows["7"][0], to_grey(x[7]))
    # The luma conversion is PIL's, bit for bit.
    np.testing.assert_array_equal(to_grey(x[7])[:, :, 0], np.asarray(Image.fromarray(x[7]).convert("L")))


def test_npz_without_labels_has_null_labels(tmp_path):
    np.savez(tmp_path / "a.npz", images=RNG.integers(0, 256, (20, 4, 4), np.uint8))
    r, splits = _ingest(tmp_path, str(tmp_path / "a.npz"))
    assert r.manifest.label_names is None
    assert all(y == -1 for _, y in _all_rows(splits).values())


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((5, 4, 4), np.uint8), "labels": np.zeros(4, np.int64)}, "4 labels for 5 images"),
        ({"images": np.zeros((5, 4, 4), np.float32)}, "dtype float32"),
        ({"images": np.full((5, 4, 4), 300, np.int32)}, "outside 0..255"),
        ({"images": np.zeros((5, 4), np.uint8)}, r"\(N,H,W\)"),
        ({"pixels": np.zeros((5, 4, 4), np.uint8)}, "no 'images' array"),
        ({"images": np.zeros((0, 4, 4), np.uint8)}, "empty source"),
    ],
)
def test_npz_bad_input_is_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SourceError, match=f"bad.npz.*{message}"):
        open_source(str(tmp_path / "bad.npz"))


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="junk.npz: not a readable .npz"):
        open_source(str(tmp_path / "junk.npz"))


# -------------------------------------------------------------------------------------------- Parquet


def _hf_table(n: int, split_col: bool = False) -> tuple[pa.Table, list[np.ndarray]]:
    imgs = [RNG.integers(0, 256, (8, 8), np.uint8) for _ in range(n)]
    structs = [{"bytes": _png(a), "path": f"img{i}.png"} for i, a in enumerate(imgs)]
    cols = {"image": pa.array(structs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": pa.array(np.arange(n) % 2, pa.int64())}
    if split_col:
        cols["split"] = pa.array(["train" if i % 4 else "test" for i in range(n)])
    meta = {"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["even", "odd"]}}}})}
    return pa.table(cols).replace_schema_metadata(meta), imgs


def test_parquet_hf_layout_with_class_names_and_file_splits(tmp_path):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    train, train_imgs = _hf_table(24)
    test, _ = _hf_table(6)
    pq.write_table(train, data / "train-00000-of-00001.parquet")
    pq.write_table(test, data / "test-00000-of-00001.parquet")
    (tmp_path / "hub" / "README.md").write_text("# a dataset card\n")
    assert detect_format(str(tmp_path / "hub")) == "parquet"
    r, splits = _ingest(tmp_path, str(tmp_path / "hub"))
    m = r.manifest
    assert m.label_names == ["even", "odd"] and m.counts["test"] == 6 and (m.height, m.width, m.channels) == (8, 8, 1)
    rows = _all_rows(splits)
    key = "data/train-00000-of-00001.parquet#5"
    np.testing.assert_array_equal(rows[key][0][:, :, 0], train_imgs[5])
    assert rows[key][1] == 1


def test_parquet_binary_column_string_labels_and_bad_rows(tmp_path):
    imgs = [RNG.integers(0, 256, (5, 5, 3), np.uint8) for _ in range(12)]
    blobs = [_png(a) for a in imgs]
    blobs[3] = b"garbage"
    blobs[4] = None
    t = pa.table({"id": [f"row-{i}" for i in range(12)], "png": pa.array(blobs, pa.binary()),
                  "class": ["zebra" if i % 3 else "ant" for i in range(12)], "split": ["train"] * 8 + ["test"] * 4})
    pq.write_table(t, tmp_path / "export.parquet")
    r, splits = _ingest(tmp_path, str(tmp_path / "export.parquet"), max_quarantine_fraction=0.5)
    m = r.manifest
    assert m.label_names == ["ant", "zebra"] and m.counts["test"] == 4
    assert {q.id: q.reason.split(" (")[0] for q in m.quarantine} == {"row-3": "not an image", "row-4": "no image bytes in the row"}
    assert m.items.ok + m.items.quarantined + m.items.duplicates == 12
    rows = _all_rows(splits)
    np.testing.assert_array_equal(rows["row-6"][0], imgs[6])
    assert rows["row-6"][1] == 0 and rows["row-7"][1] == 1


def test_parquet_without_an_image_column(tmp_path):
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="t.parquet: no image-bytes column"):
        open_source(str(tmp_path / "t.parquet"))


def test_corrupt_parquet_file_is_named(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + RNG.bytes(100))
    with pytest.raises(SourceError, match="broken.parquet: not a readable Parquet file"):
        open_source(str(tmp_path / "broken.parquet"))


# ---------------------------------------------------------------------------------- builtin, detection


def test_builtin_digits(tmp_path):
    r, splits = _ingest(tmp_path, "builtin:digits")
    m = r.manifest
    assert m.items.seen == 1797 and (m.height, m.width, m.channels) == (8, 8, 1)
    assert sum(m.counts.values()) + m.items.duplicates == 1797
    assert all(v > 0 for v in m.counts.values())  # hashed train/val/test
    with pytest.raises(SourceError, match="unknown built-in source 'builtin:nope'"):
        open_source("builtin:nope")


def test_unknown_file_kind_and_missing_source(tmp_path):
    (tmp_path / "data.json").write_text("{}\n")
    with pytest.raises(SourceError, match=re.escape("data.json: cannot tell the format of this file (expected .npz, "
                                                    ".parquet, .csv or an IDX file; a folder of images is given as the "
                                                    "folder)")):
        open_source(str(tmp_path / "data.json"))
    with pytest.raises(SourceError, match=re.escape("unknown format 'json'; formats are auto, folder, idx, npz, "
                                                    "parquet, filelist, builtin")):
        open_source(str(tmp_path / "data.json"), "json")
    with pytest.raises(SourceError, match="source not found"):
        open_source(str(tmp_path / "nothing-here"))
    (tmp_path / "data.csv").write_text("a,b\n")  # a CSV is a file list: one without a column of files is named
    with pytest.raises(SourceError, match=re.escape("data.csv: no column of files (expected one of url, path")):
        open_source(str(tmp_path / "data.csv"))


def test_every_registered_format_is_a_request_choice_detected_and_opened_from_its_declaration(tmp_path):
    """The registry is the one list of formats: the request's choices, detection and opening follow it."""
    assert get_args(IngestRequest.model_fields["format"].annotation) == ("auto", *(f.name for f in REGISTRY))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png(RNG.integers(0, 256, (4, 4), np.uint8)))
    _write_idx(tmp_path / "train-images-idx3-ubyte", RNG.integers(0, 256, (3, 4, 4), np.uint8), gz=False)
    np.savez(tmp_path / "x.npz", images=RNG.integers(0, 256, (3, 4, 4), np.uint8))
    pq.write_table(_hf_table(3)[0], tmp_path / "t.PQ")  # a suffix is matched whatever its case
    (tmp_path / "list.csv").write_text("url\npics/a.png\n")
    samples = {"folder": tmp_path / "pics", "idx": tmp_path / "train-images-idx3-ubyte", "npz": tmp_path / "x.npz",
               "parquet": tmp_path / "t.PQ", "filelist": tmp_path / "list.csv", "builtin": "builtin:digits"}
    assert set(samples) == set(BY_NAME)
    for name, url in samples.items():
        assert detect_format(str(url)) == name
        assert open_source(str(url)).kind == name == open_source(str(url), name).kind


def test_all_items_bad_fails_with_examples(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(IngestError, match=r"no usable images among 3 items.*0.png: not an image"):
        run_ingest(IngestRequest(name="t", source=str(tmp_path / "src"), data_root=str(tmp_path / "ds"), workers=1))


# ------------------------------------------------------------------------------------------- decoding


def test_decode_modes_16bit_and_palette():
    x16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    out = decode_image(_png(x16), ShapeSpec())
    np.testing.assert_array_equal(out[:, :, 0], np.round(x16 / 257).astype(np.uint8))
    grey_palette = Image.fromarray(RNG.integers(0, 256, (6, 6), np.uint8)).convert("P")
    buf = io.BytesIO()
    grey_palette.save(buf, "PNG")
    assert decode_image(buf.getvalue(), ShapeSpec()).shape == (6, 6, 1)
    rgba = RNG.integers(0, 256, (4, 4, 4), np.uint8)
    np.testing.assert_array_equal(decode_image(_png(rgba), ShapeSpec()), rgba[:, :, :3])


def test_arrays_and_files_resize_the_same_way():
    x = RNG.integers(0, 256, (10, 20, 3), np.uint8)
    spec = ShapeSpec((8, 8), None, "pad")
    np.testing.assert_array_equal(conform_pixels(x[None], spec)[0], decode_image(_png(x), spec))


def test_parquet_repeated_ids_are_quarantined(tmp_path):
    imgs = [RNG.integers(0, 256, (4, 4), np.uint8) for _ in range(6)]
    t = pa.table({"id": ["a", "b", "c", "a", "d", "e"], "image": pa.array([_png(a) for a in imgs], pa.binary())})
    pq.write_table(t, tmp_path / "ids.parquet")
    r, splits = _ingest(tmp_path, str(tmp_path / "ids.parquet"), max_quarantine_fraction=0.2)
    assert [(q.id, q.reason) for q in r.manifest.quarantine] == [("a", "id 'a' repeats an earlier item's id")]
    rows = _all_rows(splits)
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(rows["a"][0][:, :, 0], imgs[0])  # the first "a" is the one kept


def _parquet_with_a_corrupt_row_group(path: Path, column: str, bad: int = 1) -> list[np.ndarray]:
    """30 PNGs in three snappy row groups of 10 (with an id column when that is the one to damage), with the
    middle of `column`'s data page in row group `bad` damaged: the footer stays valid, reading that row
    group fails (for the image column: 'Corrupt snappy compressed data.')."""
    rng = np.random.default_rng(11)
    imgs = [rng.integers(0, 256, (8, 8), np.uint8) for _ in range(30)]
    t = pa.table({"image": pa.array([_png(a) for a in imgs], pa.binary()),
                  "label": [("ant", "bee", "cat")[i % 3] for i in range(30)]})
    if column == "id":
        t = t.append_column("id", pa.array([f"row-{i}" for i in range(30)]))
    pq.write_table(t, path, compression="snappy", row_group_size=10)
    chunk = pq.ParquetFile(path).metadata.row_group(bad).column(t.schema.get_field_index(column))
    start = chunk.data_page_offset
    mid = (start + (chunk.dictionary_page_offset or start) + chunk.total_compressed_size) // 2
    data = bytearray(path.read_bytes())
    data[mid - 8 : mid + 8] = bytes(b ^ 0xFF for b in data[mid - 8 : mid + 8])
    path.write_bytes(bytes(data))
    pf = pq.ParquetFile(path)
    with pytest.raises((OSError, pa.ArrowException)):  # the damage is where it was meant to be, and only there
        pf.read_row_group(bad)
    assert all(pf.read_row_group(k).num_rows == 10 for k in range(3) if k != bad)
    return imgs


@pytest.mark.parametrize("column", ["image", "label", "id"])
def test_parquet_corrupt_row_group_is_quarantined_with_file_and_row_group_named(tmp_path, column):
    imgs = _parquet_with_a_corrupt_row_group(tmp_path / "damaged.parquet", column)
    r, splits = _ingest(tmp_path, str(tmp_path / "damaged.parquet"), max_quarantine_fraction=0.5)
    m = r.manifest
    # Row ids are `<file>#<row>` without an id column; with one that cannot be read either, `<file>#rg<k>:<row>`.
    row_id = "row-{}".format if column == "id" else "damaged.parquet#{}".format
    lost = [f"damaged.parquet#rg1:{j}" for j in range(10)] if column == "id" else [row_id(i) for i in range(10, 20)]
    assert sorted(q.id for q in m.quarantine) == sorted(lost)
    assert all(re.search(r"damaged\.parquet: row group 1 cannot be read \(.+\)", q.reason) for q in m.quarantine)
    if column == "image":
        assert m.quarantine[0].reason.endswith("(Corrupt snappy compressed data.)")
    rows = _all_rows(splits)
    assert sorted(rows) == sorted(row_id(i) for i in (*range(10), *range(20, 30)))
    assert m.label_names == ["ant", "bee", "cat"] and rows[row_id(25)][1] == 25 % 3
    np.testing.assert_array_equal(rows[row_id(25)][0][:, :, 0], imgs[25])
    with pytest.raises(IngestError, match=r"damaged\.parquet: 10 of 30 items .* row group 1 cannot be read"):
        run_ingest(IngestRequest(name="t", source=str(tmp_path / "damaged.parquet"), data_root=str(tmp_path / "ds2"),
                                 workers=1, max_quarantine_fraction=0.2))


def test_parquet_label_at_the_int32_limit_is_kept(tmp_path):
    imgs = [_png(RNG.integers(0, 256, (4, 4), np.uint8)) for _ in range(6)]
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "label": pa.array([2**31 - 1, None, -5, 3, 1, 0], pa.int64())}), tmp_path / "t.parquet")
    source = open_source(str(tmp_path / "t.parquet"))
    labels = np.concatenate([b.labels for b in source.batches()])
    assert labels.tolist() == [2**31 - 1, -1, -1, 3, 1, 0]


def test_parquet_files_whose_label_types_differ_are_named(tmp_path):
    img = pa.array([_png(RNG.integers(0, 256, (4, 4), np.uint8))] * 2, pa.binary())
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"image": img, "label": pa.array([0, 1], pa.int64())}), tmp_path / "d/a.parquet")
    pq.write_table(pa.table({"image": img, "label": pa.array(["cat", "dog"])}), tmp_path / "d/b.parquet")
    with pytest.raises(SourceError, match=r"b.parquet: column 'label' is string but .*a.parquet.* int64"):
        open_source(str(tmp_path / "d"))


def test_npz_images_of_zero_size_are_named(tmp_path):
    np.savez(tmp_path / "flat.npz", images=np.zeros((5, 0, 8), np.uint8))
    with pytest.raises(SourceError, match=r"flat.npz: 'images' .*zero .*\(5, 0, 8\)"):
        open_source(str(tmp_path / "flat.npz"))


def test_idx_images_of_zero_size_are_named(tmp_path):
    (tmp_path / "x-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 4, 0)))
    with pytest.raises(SourceError, match=r"x-images-idx3-ubyte: .*zero"):
        open_source(str(tmp_path))


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["dig\n", "dig\r\n", "\ndig", "dig ", "a/b", ".x", ""])
def test_names_must_match_the_rule_in_full(name):
    from vae_core.names import check_name, parse_dataset_ref

    with pytest.raises(ValueError, match="must use only"):
        check_name(name, "dataset name")
    with pytest.raises(ValueError):
        parse_dataset_ref(f"{name}@v1")
    with pytest.raises(ValueError):
        IngestRequest(name=name, source="builtin:digits")


@pytest.mark.parametrize("uri", ["models:/vae-x/1\n", "models:/vae-x@champion\n", "models:/vae\n/1",
                                 "models:/vae-x@champ\nion", " models:/vae-x/1"])
def test_model_uris_must_match_in_full(uri):
    from vae_core.names import parse_model_uri
    from vae_core.requests import EvaluateRequest

    with pytest.raises(ValueError):
        parse_model_uri(uri)
    with pytest.raises(ValueError):
        EvaluateRequest(model=uri)


def test_idx_names_must_match_in_full(tmp_path):
    from vae_core.data.sources.idx import is_idx_name

    assert is_idx_name("train-images-idx3-ubyte.gz")
    assert not is_idx_name("train-images-idx3-ubyte\n")
    assert not is_idx_name("train-images-idx3-ubyte.gz\n")


def test_parquet_and_idx_file_names_that_are_not_utf8_are_kept_as_percent_escapes(tmp_path):
    import os

    img = pa.array([_png(RNG.integers(0, 256, (4, 4), np.uint8)) for _ in range(10)], pa.binary())
    (tmp_path / "pq").mkdir()
    with open(os.fsencode(tmp_path / "pq") + b"/caf\xe9.parquet", "wb") as f:
        pq.write_table(pa.table({"image": img}), f)
    r, splits = _ingest(tmp_path, str(tmp_path / "pq"))
    assert sorted(_all_rows(splits)) == [f"caf%E9.parquet#{i}" for i in range(10)]

    (tmp_path / "idx").mkdir()
    _write_idx(Path(os.fsdecode(os.fsencode(tmp_path / "idx") + b"/caf\xe9-images-idx3-ubyte")),
               RNG.integers(0, 256, (10, 3, 3), np.uint8), gz=False)
    r = run_ingest(IngestRequest(name="i", source=str(tmp_path / "idx"), data_root=str(tmp_path / "ds"), workers=1))
    assert r.manifest.items.ok == 10
