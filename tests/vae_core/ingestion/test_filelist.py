"""File lists (CSV, TXT, Parquet) and folders with bad files: every entry accounted for, duplicates across
labels, and the same version and byte-identical shards whatever order the list comes in."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vae_core.data.shards.manifest
import vae_core.ingestion.publish
import vae_core.ingestion.work
from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.data.sources import listing
from vae_core.data.sources.base import SourceError
from vae_core.ingestion.ingest import Published, run_ingest
from vae_core.ingestion.publish import manifest_entries
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(23)
REPEAT = "repeats an earlier item's id"


def _png(path: Path, arr: np.ndarray | None = None) -> bytes:
    """Write a PNG (random 5x6 grey pixels unless given) to `path`; -> its bytes."""
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (5, 6), np.uint8) if arr is None else arr).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _ingest(source: Path | str, root: Path, **kw) -> Published:
    kw.setdefault("max_quarantine_fraction", 0.5)
    return run_ingest(IngestRequest(name="list", source=str(source), data_root=str(root), **kw))


def _rows(r: Published) -> dict[str, tuple[np.ndarray, int]]:
    """id -> (pixels, label) over every split of the published version."""
    info = open_dataset(r.url.rsplit("/", 2)[0], "list", r.version)
    out = {}
    for split in ("train", "val", "test"):
        x, y, ids = read_split_u8(info, split)
        out.update({i: (x[k], int(y[k])) for k, i in enumerate(ids)})
    return out


def _accounted(r: Published) -> None:
    """seen = ok + duplicates + quarantined, and every list holds what its count says."""
    m = r.manifest
    assert m.items.seen == m.items.ok + m.items.duplicates + m.items.quarantined
    assert sum(m.counts.values()) == m.items.ok
    assert len(manifest_entries(r.url, m, "quarantine")) == m.items.quarantined
    assert len(manifest_entries(r.url, m, "duplicates")) == m.items.duplicates


# ------------------------------------------------------------------------ lists and their labels

def test_a_csv_list_with_text_labels(tmp_path):
    pixels = {f"img/{i}.png": _png(tmp_path / f"img/{i}.png") for i in range(8)}
    absolute = str(tmp_path / "img/7.png")  # named by its absolute path, not relative to the list
    lines = [f"img/{i}.png,{'dog' if i % 2 else 'cat'}" for i in range(7)]
    lines += [f"{absolute},bird", "img/missing.png,cat", "img/3.png,dog"]  # a missing file, a repeated entry
    (tmp_path / "list.csv").write_text("url,label\n" + "\n".join(lines) + "\n")
    r = _ingest(tmp_path / "list.csv", tmp_path / "ds")
    m = r.manifest
    _accounted(r)
    assert (m.items.seen, m.items.ok, m.items.duplicates, m.items.quarantined) == (10, 8, 0, 2)
    assert m.label_names == ["bird", "cat", "dog"] and m.source.kind == "filelist"
    reasons = {q.id: (q.source, q.reason) for q in m.quarantine}
    assert reasons["img/missing.png"][0] == str(tmp_path / "img/missing.png")
    assert reasons["img/missing.png"][1].startswith("cannot read") and "No such file" in reasons["img/missing.png"][1]
    assert reasons["img/3.png"][1] == f"id 'img/3.png' {REPEAT}"
    rows = _rows(r)
    assert set(rows) == {f"img/{i}.png" for i in range(7)} | {absolute}
    assert rows[absolute][1] == 0 and rows["img/2.png"][1] == 1 and rows["img/3.png"][1] == 2
    decoded = np.asarray(Image.open(io.BytesIO(pixels["img/5.png"])))
    np.testing.assert_array_equal(rows["img/5.png"][0][:, :, 0], decoded)


def test_a_text_list_has_no_labels(tmp_path):
    for i in range(5):
        _png(tmp_path / f"a/{i}.png")
    (tmp_path / "files.txt").write_text("".join(f"a/{i}.png\n" for i in range(5)))
    r = _ingest(tmp_path / "files.txt", tmp_path / "ds")
    assert r.manifest.items.ok == 5 and r.manifest.label_names is None
    assert {label for _, label in _rows(r).values()} == {-1}


def test_a_parquet_list_with_integer_labels(tmp_path):
    paths = [str(tmp_path / f"p/{i}.png") for i in range(6)]
    for p in paths:
        _png(Path(p))
    pq.write_table(pa.table({"path": paths, "target": pa.array([0, 1, 2, 0, 1, 2], pa.int64())}),
                   tmp_path / "list.parquet")
    r = _ingest(tmp_path / "list.parquet", tmp_path / "ds", format="filelist")
    m = r.manifest
    assert m.items.ok == 6 and m.label_names == ["0", "1", "2"]
    assert {i: label for i, (_, label) in _rows(r).items()} == {p: k % 3 for k, p in enumerate(paths)}


def test_a_list_without_a_column_of_files_names_its_columns(tmp_path):
    (tmp_path / "list.csv").write_text("name,label\na.png,cat\n")
    with pytest.raises(SourceError, match=r"list\.csv: no column of files .*columns: name, label"):
        _ingest(tmp_path / "list.csv", tmp_path / "ds")
    with pytest.raises(SourceError, match=r"no column 'image' for the files \(columns: name, label\)"):
        _ingest(tmp_path / "list.csv", tmp_path / "ds", image_column="image")


def test_an_unchanged_list_finds_its_version_without_reading_the_files(tmp_path):
    """The list is the input: its files are not read again while it is unchanged (a changed list is new input)."""
    for i in range(4):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png\n" for i in range(3)))
    first = _ingest(tmp_path / "list.txt", tmp_path / "ds")
    (tmp_path / "0.png").unlink()  # a read would quarantine it
    again = _ingest(tmp_path / "list.txt", tmp_path / "ds")
    assert (again.created, again.version, again.manifest.items.ok) == (False, first.version, 3)
    with (tmp_path / "list.txt").open("a") as f:
        f.write("3.png\n")
    changed = _ingest(tmp_path / "list.txt", tmp_path / "ds")
    assert changed.created and (changed.manifest.items.ok, changed.manifest.items.quarantined) == (3, 1)


# ------------------------------------------------------------------------ bad files, in a folder and a list

def _bad_files(root: Path) -> list[str]:
    """Good, corrupt, empty, oversized and duplicated files under cat/ and dog/; -> their relative paths.

    dog/a.png has cat/z.png's bytes: a duplicate with another label; cat/z.png's source is the smaller one."""
    for i in range(6):
        _png(root / ("cat", "dog")[i % 2] / f"{i}.png")
    (root / "dog/a.png").write_bytes(_png(root / "cat/z.png"))
    _png(root / "cat/big.png", RNG.integers(0, 256, (40, 40), np.uint8))  # above max_file_mb
    png = _png(root / "cat/truncated.png", RNG.integers(0, 256, (20, 20), np.uint8))
    (root / "cat/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "dog/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(200))
    (root / "dog/empty.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not an image\n")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _check_bad_files(r: Published, prefix: str) -> None:
    m = r.manifest
    _accounted(r)
    assert (m.items.seen, m.items.ok, m.items.duplicates, m.items.quarantined) == (13, 7, 1, 5)
    reasons = {q.id: q.reason for q in m.quarantine}
    assert set(reasons) == {f"{prefix}{n}" for n in ("cat/big.png", "cat/truncated.png", "dog/corrupt.png",
                                                     "dog/empty.png", "dog/notes.txt")}
    assert reasons[f"{prefix}dog/empty.png"] == "empty file (0 bytes)"
    assert reasons[f"{prefix}dog/notes.txt"].startswith("not an image")
    assert reasons[f"{prefix}cat/truncated.png"].startswith("corrupt image")
    assert reasons[f"{prefix}dog/corrupt.png"].startswith(("corrupt image", "not an image"))
    assert "is above max_file_mb=" in reasons[f"{prefix}cat/big.png"]
    [dup] = m.duplicates
    assert (dup.id, dup.duplicate_of, dup.label, dup.kept_label) == (f"{prefix}dog/a.png", f"{prefix}cat/z.png", 1, 0)
    assert m.label_conflicts == 1


def test_bad_files_in_a_folder_are_accounted_for(tmp_path):
    _bad_files(tmp_path / "src")
    _check_bad_files(_ingest(tmp_path / "src", tmp_path / "ds", max_file_mb=0.0008), "")


def test_bad_files_in_a_list_are_accounted_for(tmp_path):
    names = _bad_files(tmp_path / "src")
    random.Random(3).shuffle(names)  # the duplicate's kept copy does not depend on the list's order
    (tmp_path / "src/list.csv").write_text("file,class\n" + "".join(f"{n},{n[:3]}\n" for n in names))
    _check_bad_files(_ingest(tmp_path / "src/list.csv", tmp_path / "ds", max_file_mb=0.0008), "")


def test_the_kept_copy_has_the_smallest_source_not_the_smallest_id(tmp_path):
    """An absolute entry sorts before a relative one as an id; the relative one's source is smaller."""
    data = _png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(data)
    for i in range(3):
        _png(tmp_path / f"c{i}.png")
    entries = [str(tmp_path / "b.png"), "a.png", "c0.png", "c1.png", "c2.png"]
    (tmp_path / "list.txt").write_text("\n".join(entries) + "\n")
    [dup] = _ingest(tmp_path / "list.txt", tmp_path / "ds").manifest.duplicates
    assert (dup.id, dup.duplicate_of) == (str(tmp_path / "b.png"), "a.png")


# ------------------------------------------------------------------------ order, parts, buckets, side files

@pytest.fixture
def small_parts(monkeypatch) -> None:
    """Parts of 7 files and buckets of 20 rows, so that a list of ~100 entries spans many of each."""
    monkeypatch.setattr(listing, "PART_ROWS", 7)
    monkeypatch.setattr(vae_core.ingestion.work, "BUCKET_ROWS", 20)


def _shard_files(r: Published) -> dict[str, str]:
    """The version's shard files (split/name) -> SHA-256 of their bytes, checked against the manifest."""
    vdir = Path(r.url)
    files = {str(p.relative_to(vdir)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in vdir.rglob("*.parquet") if p.parent != vdir}
    listed = {sh.path: sh.sha256 for info in r.manifest.splits.values() for sh in info.shards}
    assert files == listed
    return files


def _long_list(root: Path) -> list[str]:
    """~100 entries: images in 3 classes, 12 copies of one image (8 with another label), 15 missing files and
    an entry listed again with another label."""
    lines = []
    for i in range(80):
        _png(root / f"img/{i:03d}.png")
        lines.append(f"img/{i:03d}.png,{'abc'[i % 3]}")
    (root / "copy").mkdir()
    for i in range(12):
        shutil.copy(root / "img/000.png", root / f"copy/{i:02d}.png")
        lines.append(f"copy/{i:02d}.png,{'abc'[i % 3]}")
    lines += [f"gone/{i:02d}.png,a" for i in range(15)]
    return lines + ["img/005.png,a"]


def test_a_shuffled_list_gives_the_same_version_and_shards(tmp_path, small_parts):
    lines = _long_list(tmp_path / "src")
    (tmp_path / "src/sorted.csv").write_text("url,label\n" + "\n".join(lines) + "\n")
    *rest, again = lines
    random.Random(5).shuffle(rest)  # and the entry listed again comes first, before its other label
    (tmp_path / "src/shuffled.csv").write_text("url,label\n" + "\n".join([again, *rest]) + "\n")
    a = _ingest(tmp_path / "src/sorted.csv", tmp_path / "a", max_quarantine_fraction=0.2)
    b = _ingest(tmp_path / "src/shuffled.csv", tmp_path / "b", max_quarantine_fraction=0.2)
    assert len(a.manifest.splits["train"].shards) > 1  # rows_per_shard is big: many shards come from many buckets
    assert (a.manifest.items.ok, a.manifest.items.duplicates, a.manifest.items.quarantined) == (80, 12, 16)
    assert a.version == b.version
    assert _shard_files(a) == _shard_files(b)
    for kind in ("quarantine", "duplicates"):
        assert (sorted(manifest_entries(a.url, a.manifest, kind), key=lambda e: e["id"])
                == sorted(manifest_entries(b.url, b.manifest, kind), key=lambda e: e["id"]))


def test_long_lists_go_to_side_files_that_read_back_equal(tmp_path, small_parts, monkeypatch):
    lines = _long_list(tmp_path / "src")
    (tmp_path / "src/list.csv").write_text("url,label\n" + "\n".join(lines) + "\n")
    inline = _ingest(tmp_path / "src/list.csv", tmp_path / "inline", max_quarantine_fraction=0.2)
    for module in (vae_core.ingestion.publish, vae_core.data.shards.manifest):
        monkeypatch.setattr(module, "LIST_BOUND", 10)
    side = _ingest(tmp_path / "src/list.csv", tmp_path / "side", max_quarantine_fraction=0.2)
    m = side.manifest
    assert (m.quarantine_file, m.duplicates_file) == ("quarantine.parquet", "duplicates.parquet")
    assert m.quarantine == [] and m.duplicates == [] and (Path(side.url) / "quarantine.parquet").is_file()
    assert side.version == inline.version  # the lists are outside the version
    _accounted(side)
    for kind in ("quarantine", "duplicates"):
        got = sorted(manifest_entries(side.url, m, kind), key=lambda e: e["id"])
        assert got == manifest_entries(inline.url, inline.manifest, kind)  # inline lists are sorted by id
    conflicts = [d for d in manifest_entries(side.url, m, "duplicates") if "label" in d]
    assert len(conflicts) == m.label_conflicts == 8 and all(d["label"] != d["kept_label"] for d in conflicts)
