"""Folders of image files: every format, bad files, duplicates, shapes, splits, versions, parallel decode."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vae_core.ingestion.mapper
from vae_core.data.shards import list_versions, open_dataset, read_split_u8
from vae_core.data.sources.base import SourceError
from vae_core.data.splits import id_hash_unit
from vae_core.ingestion.ingest import IngestError, run_ingest
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(7)


def _save(path: Path, arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _rgb(h: int = 12, w: int = 12) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def messy(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """cat/ and dog/ with every supported format plus corrupt, truncated, empty, non-image and duplicate files."""
    root = tmp_path / "messy"
    exact: dict[str, np.ndarray] = {}  # lossless files: id -> pixels
    for i in range(6):
        exact[f"cat/c{i}.png"] = a = _rgb()
        _save(root / f"cat/c{i}.png", a, "PNG")
    exact["dog/d.bmp"] = a = _rgb()
    _save(root / "dog/d.bmp", a, "BMP")
    exact["dog/d.ppm"] = a = _rgb()
    _save(root / "dog/d.ppm", a, "PPM")
    exact["dog/d.tiff"] = a = _rgb()
    _save(root / "dog/d.tiff", a, "TIFF")
    grey = RNG.integers(0, 256, (12, 12), dtype=np.uint8)
    _save(root / "dog/d.pgm", grey, "PPM")  # greyscale -> PGM
    exact["dog/d.pgm"] = np.repeat(grey[..., None], 3, axis=2)
    _save(root / "dog/d.jpg", _rgb(), "JPEG")
    png = _save(root / "dog/e0.png", _rgb(), "PNG")
    (root / "cat/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "cat/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(300))
    (root / "dog/empty.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not an image\n")
    shutil.copy(root / "cat/c3.png", root / "dog/same-as-c3.png")  # exact duplicate
    exact["loose.png"] = a = _rgb()
    _save(root / "loose.png", a, "PNG")
    return root, exact


def test_every_file_is_accounted_for(messy, tmp_path):
    root, exact = messy
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    r = run_ingest(IngestRequest(name="messy", source=str(root), data_root=str(tmp_path / "ds"), channels=3,
                                max_quarantine_fraction=0.5, workers=1))
    m = r.manifest
    assert m.items.seen == n_files == 18
    assert (m.items.ok, m.items.duplicates, m.items.quarantined) == (13, 1, 4)
    reasons = {q.id: q.reason for q in m.quarantine}
    assert set(reasons) == {"cat/truncated.png", "cat/corrupt.png", "dog/empty.png", "dog/notes.txt"}
    assert "truncated" in reasons["cat/truncated.png"]
    assert "empty file" in reasons["dog/empty.png"]
    assert "not an image" in reasons["dog/notes.txt"]
    assert reasons["cat/corrupt.png"]  # a reason, whatever PIL's wording
    assert [(d.id, d.duplicate_of) for d in m.duplicates] == [("dog/same-as-c3.png", "cat/c3.png")]
    assert m.label_names == ["cat", "dog"] and (m.height, m.width, m.channels) == (12, 12, 3)
    assert m.quarantine[0].source.startswith(str(root))

    info = open_dataset(str(tmp_path / "ds"), "messy")
    rows = {}
    for s in ("train", "val", "test"):
        x, y, ids = read_split_u8(info, s)
        rows.update({i: (x[k], y[k]) for k, i in enumerate(ids)})
    assert len(rows) == m.items.ok == 13
    for i, arr in exact.items():  # lossless formats arrive bit-exact, labelled by their folder
        np.testing.assert_array_equal(rows[i][0], arr)
        assert rows[i][1] == {"cat": 0, "dog": 1}.get(i.split("/")[0], -1)  # loose.png: outside any class folder


def test_too_much_quarantine_fails_and_writes_nothing(messy, tmp_path):
    root, _ = messy
    ds = tmp_path / "ds"
    with pytest.raises(IngestError, match=r"4 of 18 items .* quarantined.*max_quarantine_fraction"):
        run_ingest(IngestRequest(name="messy", source=str(root), data_root=str(ds), channels=3, workers=1))
    assert not ds.exists() or not any(ds.rglob("*.parquet"))
    run_ingest(IngestRequest(name="messy", source=str(root), data_root=str(ds), channels=3, workers=1,
                             max_quarantine_fraction=0.5))
    with pytest.raises(IngestError, match="max_quarantine_fraction"):  # unchanged input, but a stricter limit
        run_ingest(IngestRequest(name="messy", source=str(root), data_root=str(ds), channels=3, workers=1))


def test_mixed_shapes_fail_with_both_files_named(tmp_path):
    _save(tmp_path / "src/a/one.png", _rgb(12, 12), "PNG")
    _save(tmp_path / "src/a/two.png", _rgb(10, 14), "PNG")
    with pytest.raises(IngestError, match=r"two.png is 10x14x3 but .*one.png is 12x12x3.*--image-size"):
        run_ingest(IngestRequest(name="x", source=str(tmp_path / "src"), data_root=str(tmp_path / "ds"), workers=1))
    _save(tmp_path / "src/a/two.png", RNG.integers(0, 256, (12, 12), dtype=np.uint8), "PNG")
    with pytest.raises(IngestError, match=r"--channels"):
        run_ingest(IngestRequest(name="x", source=str(tmp_path / "src"), data_root=str(tmp_path / "ds"), workers=1))


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_image_size_with_crop_or_pad(tmp_path, fit):
    wide = np.full((10, 20, 3), 200, np.uint8)  # uniform grey, twice as wide as high
    _save(tmp_path / "src/a/wide.png", wide, "PNG")
    _save(tmp_path / "src/a/square.png", np.full((16, 16, 3), 100, np.uint8), "PNG")
    r = run_ingest(IngestRequest(name="sized", source=str(tmp_path / "src"), data_root=str(tmp_path / "ds"),
                                image_size=(8, 8), channels=1, fit=fit, val_fraction=0, test_fraction=0, workers=1))
    assert (r.manifest.height, r.manifest.width, r.manifest.channels) == (8, 8, 1)
    x, _, ids = read_split_u8(open_dataset(str(tmp_path / "ds"), "sized"), "train")
    img = x[ids.index("a/wide.png"), :, :, 0]
    if fit == "crop":
        assert (img == 200).all()  # the centre of a uniform image: no bars
    else:
        assert (img[:2] == 0).all() and (img[-2:] == 0).all() and (img[3:5] == 200).all()  # black bars top/bottom


def test_versions_follow_content(tmp_path):
    src = tmp_path / "src"
    for i in range(8):
        _save(src / f"k{i % 2}/{i}.png", _rgb(), "PNG")
    cfg = IngestRequest(name="v", source=str(src), data_root=str(tmp_path / "ds"), workers=1)
    first = run_ingest(cfg)
    assert run_ingest(cfg).version == first.version
    _save(src / "k0/0.png", _rgb(), "PNG")  # same file name, new pixels
    changed = run_ingest(cfg)
    assert changed.created and changed.version != first.version
    assert run_ingest(cfg.model_copy(update={"val_fraction": 0.3})).version not in (first.version, changed.version)
    assert len(list_versions(str(tmp_path / "ds"), "v")) == 3


def test_parallel_decode_gives_the_same_dataset(tmp_path):
    src = tmp_path / "src"
    for i in range(300):
        _save(src / f"c{i % 3}/{i:03d}.png", _rgb(8, 8), "PNG")
    (src / "c0/bad.png").write_bytes(b"junk")
    one = run_ingest(IngestRequest(name="p", source=str(src), data_root=str(tmp_path / "one"), workers=1))
    two = run_ingest(IngestRequest(name="p", source=str(src), data_root=str(tmp_path / "two"), workers=2))
    assert one.version == two.version and one.manifest.counts == two.manifest.counts
    assert [q.id for q in two.manifest.quarantine] == ["c0/bad.png"]


def test_split_folders_are_the_source_splits(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 20), ("test", 5)):
        for i in range(n):
            _save(src / f"{split}/{'ab'[i % 2]}/{i}.png", _rgb(6, 6), "PNG")
    r = run_ingest(IngestRequest(name="s", source=str(src), data_root=str(tmp_path / "ds"), val_fraction=0.25, workers=1))
    m = r.manifest
    assert m.label_names == ["a", "b"]
    assert m.counts["test"] == 5 and m.counts["train"] + m.counts["val"] == 20 and m.counts["val"] > 0
    _, y, ids = read_split_u8(open_dataset(str(tmp_path / "ds"), "s"), "test")
    assert all(i.startswith("test/") for i in ids) and set(y.tolist()) == {0, 1}


def test_empty_and_missing_folders_fail_fast(tmp_path):
    (tmp_path / "empty/sub").mkdir(parents=True)
    with pytest.raises(SourceError, match="empty source"):
        run_ingest(IngestRequest(name="e", source=str(tmp_path / "empty"), data_root=str(tmp_path / "ds")))
    with pytest.raises(SourceError, match="not found"):
        run_ingest(IngestRequest(name="e", source=str(tmp_path / "missing"), data_root=str(tmp_path / "ds")))


def test_unreadable_file_is_quarantined_not_fatal(tmp_path):
    src = tmp_path / "src"
    for i in range(9):
        _save(src / f"k/{i}.png", _rgb(6, 6), "PNG")
    (src / "k" / "gone.png").symlink_to(tmp_path / "does-not-exist.png")
    r = run_ingest(IngestRequest(name="u", source=str(src), data_root=str(tmp_path / "ds"), workers=2,
                                max_quarantine_fraction=0.2))
    assert [(q.id, q.reason.split(":")[0]) for q in r.manifest.quarantine] == [("k/gone.png", "cannot read")]
    assert r.manifest.items.ok == 9


def _split_of(root: Path, name: str, version: str) -> dict[str, str]:
    info = open_dataset(str(root), name, version)
    return {i: s for s in ("train", "val", "test") for i in read_split_u8(info, s)[2]}


def test_id_hash_does_not_depend_on_the_other_ids():
    alone = id_hash_unit(["img1.png"])[0]
    assert id_hash_unit(["img1.png", "a_much_longer_name.png"])[0] == alone
    assert id_hash_unit(["a_much_longer_name.png", "img1.png"])[1] == alone


def test_adding_items_with_longer_names_moves_no_existing_item(tmp_path):
    src, ds = tmp_path / "src", tmp_path / "ds"
    for i in range(40):
        _save(src / f"k{i % 2}/img{i}.png", _rgb(6, 6), "PNG")
    cfg = IngestRequest(name="grow", source=str(src), data_root=str(ds), workers=1)
    first = run_ingest(cfg)
    for i in range(5):
        _save(src / f"k0/a_much_longer_name_{i}.png", _rgb(6, 6), "PNG")
    grown = run_ingest(cfg)
    assert grown.created and grown.version != first.version
    before, after = _split_of(ds, "grow", first.version), _split_of(ds, "grow", grown.version)
    assert len(before) == 40 and {i: after[i] for i in before} == before


def _count_decoding(monkeypatch) -> list[int]:
    """Counts the items `run_ingest` decodes, batch by batch."""
    calls: list[int] = []
    real = vae_core.ingestion.mapper.decode

    def counting(batch, *args, **kw):
        calls.append(len(batch))
        return real(batch, *args, **kw)

    monkeypatch.setattr(vae_core.ingestion.mapper, "decode", counting)
    return calls


def test_unchanged_input_is_recognised_without_decoding(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(8):
        _save(src / f"k{i % 2}/{i}.png", _rgb(), "PNG")
    cfg = IngestRequest(name="same", source=str(src), data_root=str(tmp_path / "ds"), workers=1)
    first = run_ingest(cfg)
    assert first.manifest.source.details["fingerprint"]
    decoded = _count_decoding(monkeypatch)
    again = run_ingest(cfg)
    assert (again.created, again.version, decoded) == (False, first.version, [])
    # One file rewritten with other pixels (and a later mtime): the fingerprint differs, everything is decoded.
    path = src / "k0/0.png"
    _save(path, _rgb(), "PNG")
    later = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))
    changed = run_ingest(cfg)
    assert changed.created and changed.version != first.version and sum(decoded) == 8
    assert changed.manifest.source.details["fingerprint"] != first.manifest.source.details["fingerprint"]


def test_a_file_name_that_is_not_utf8_is_kept_under_a_lossless_id(tmp_path):
    src = tmp_path / "src"
    for i in range(9):
        _save(src / f"k/{i}.png", _rgb(6, 6), "PNG")
    odd = _rgb(6, 6)
    raw = os.fsencode(src / "k") + b"/bad\xff.png"  # Latin-1 'ÿ', not UTF-8
    with open(raw, "wb") as f:
        f.write(_save(tmp_path / "odd.png", odd, "PNG"))
    r = run_ingest(IngestRequest(name="u", source=str(src), data_root=str(tmp_path / "ds"), workers=2))
    assert (r.manifest.items.ok, r.manifest.items.quarantined) == (10, 0)
    info = open_dataset(str(tmp_path / "ds"), "u", r.version)
    rows = {i: x for s in ("train", "val", "test") for x, _, ids in [read_split_u8(info, s)] for i, x in zip(ids, x)}
    np.testing.assert_array_equal(rows["k/bad%FF.png"], odd)  # the undecodable byte, percent-encoded


def test_a_literal_percent_name_and_an_escaped_one_do_not_collide(tmp_path):
    src = tmp_path / "src"
    for i in range(8):
        _save(src / f"k/{i}.png", _rgb(6, 6), "PNG")
    _save(src / "k/bad%FF.png", _rgb(6, 6), "PNG")
    with open(os.fsencode(src / "k") + b"/bad\xff.png", "wb") as f:
        f.write(_save(tmp_path / "odd.png", _rgb(6, 6), "PNG"))
    r = run_ingest(IngestRequest(name="u", source=str(src), data_root=str(tmp_path / "ds"), workers=1,
                                max_quarantine_fraction=0.2))
    m = r.manifest
    assert m.items.ok + m.items.quarantined == 10 and m.items.quarantined <= 1
    assert all("repeats" in q.reason for q in m.quarantine)
