"""A manifest is checked against the rules and against its shards when a dataset is opened: edited paths
never make a reader leave the version folder, an edited image shape or a missing or resized shard fails
at open with the shard and the dataset named, and every reader says the same for a shard gone since."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vae_core.data.shards import MANIFEST, ShardInfo, open_dataset, read_shard_table, read_split_u8
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest


@pytest.fixture
def dataset(tmp_path) -> tuple[str, Path]:
    """(data root, version folder) of `toy`: 60 labelled 4x4 images, a shard in each split."""
    np.savez(tmp_path / "src.npz", images=np.random.default_rng(3).integers(0, 256, (60, 4, 4), np.uint8),
             labels=np.arange(60) % 3)
    root = str(tmp_path / "ds")
    result = run_ingest(IngestRequest(name="toy", source=str(tmp_path / "src.npz"), data_root=root, workers=1))
    vdir = Path(result.url)
    # Shards are named by their checksum; here each split's one shard gets a fixed name the tests can spell.
    def rename(body: dict) -> None:
        for split, info in body["splits"].items():
            (shard,) = info["shards"]
            (vdir / shard["path"]).rename(vdir / split / "part-00000.parquet")
            shard["path"] = f"{split}/part-00000.parquet"

    _edit(vdir, rename)
    return root, vdir


def _edit(vdir: Path, change) -> None:
    """Rewrite manifest.json after `change(body)` has edited its JSON body in place."""
    body = json.loads((vdir / MANIFEST).read_text())
    change(body)
    (vdir / MANIFEST).write_text(json.dumps(body))


def _first_shard(body: dict, split: str = "train") -> dict:
    return body["splits"][split]["shards"][0]


def _escaping_paths(vdir: Path) -> list[str]:
    """Paths that name a real copy of the train shard (same bytes and checksum) outside the train folder."""
    outside = vdir.parents[2] / "outside.parquet"  # beside the data root
    shutil.copy(vdir / "train" / "part-00000.parquet", outside)
    (vdir / "train" / "deeper").mkdir()
    shutil.copy(vdir / "train" / "part-00000.parquet", vdir / "train" / "deeper" / "part-00000.parquet")
    return [str(outside), "../../../outside.parquet", "train/../../../../outside.parquet",
            "train/deeper/part-00000.parquet", "./train/part-00000.parquet", "train/part-00000.parquet/"]


def test_a_shard_path_that_leaves_its_split_folder_is_refused_on_load(dataset):
    root, vdir = dataset
    for path in _escaping_paths(vdir):
        _edit(vdir, lambda body: _first_shard(body).update(path=path))
        with pytest.raises(ValueError, match=r"shard path .* is not SPLIT/FILE\.parquet.*damaged; remove"):
            read_split_u8(open_dataset(root, "toy"), "train")


def test_shards_must_lie_in_their_own_split_folder_once_each(dataset):
    root, vdir = dataset
    _edit(vdir, lambda body: _first_shard(body, "val").update(path="train/part-00000.parquet"))
    with pytest.raises(ValueError, match=r"split 'val' lists shards outside its folder"):
        open_dataset(root, "toy")
    with pytest.raises(ValueError, match="shard path 'x.parquet'"):
        ShardInfo(path="x.parquet", rows=1, bytes=1, sha256="0" * 64)
    with pytest.raises(ValueError, match="shard sha256 '../x' is not a lowercase hex SHA-256"):
        ShardInfo(path="train/x.parquet", rows=1, bytes=1, sha256="../x")


def test_name_and_version_must_be_the_folder_s_and_follow_the_rule(dataset):
    root, vdir = dataset
    version = vdir.name
    _edit(vdir, lambda body: body.update(version="../../elsewhere"))  # encode files its outputs under it
    with pytest.raises(ValueError, match=r"version: .*'\.\./\.\./elsewhere' must use only"):
        open_dataset(root, "toy", version)
    _edit(vdir, lambda body: body.update(version="0123456789abcdef"))
    with pytest.raises(ValueError, match=rf"names toy@0123456789abcdef, not the folder's toy@{version}"):
        open_dataset(root, "toy", version)


@pytest.mark.parametrize("edit", [{"height": 5, "width": 5}, {"height": 2, "width": 4}, {"channels": 3}])
def test_an_edited_image_shape_is_caught_at_open_from_the_shard_footer(dataset, edit):
    root, vdir = dataset

    def change(body):
        body.update(edit)
        c = body["channels"]
        body.update(channel_mean=body["channel_mean"][:1] * c, channel_std=body["channel_std"][:1] * c)

    _edit(vdir, change)
    h, w, c = edit.get("height", 4), edit.get("width", 4), edit.get("channels", 1)
    with pytest.raises(ValueError, match=rf"shard train/part-00000\.parquet has images of fixed_size_binary\[16\], "
                                         rf"the manifest's {h}x{w}x{c} needs fixed_size_binary\[{h * w * c}\]"):
        open_dataset(root, "toy")


def test_a_missing_shard_names_itself_and_its_dataset_in_every_reader(dataset):
    root, vdir = dataset
    info = open_dataset(root, "toy")
    shard = info.manifest.splits["val"].shards[0]
    (vdir / shard.path).unlink()
    said = (rf"dataset toy@{info.version}: shard val/part-00000\.parquet is missing \(.*\); the dataset version is "
            rf"damaged; remove {re.escape(str(vdir))} and ingest its source again")
    with pytest.raises(FileNotFoundError, match=said):
        open_dataset(root, "toy")
    with pytest.raises(FileNotFoundError, match=said):  # opened before the shard went
        read_shard_table(info, shard)
    with pytest.raises(FileNotFoundError, match=said):
        read_split_u8(info, "val")


def test_a_shard_of_another_size_or_other_bytes_is_named(dataset):
    root, vdir = dataset
    info = open_dataset(root, "toy")
    path = vdir / "test" / "part-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match=rf"toy@{info.version}: shard test/part-00000\.parquet holds {len(data) + 1} "
                                         rf"bytes, the manifest {len(data)}"):
        open_dataset(root, "toy")
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit off
    with pytest.raises(ValueError, match=r"shard test/part-00000\.parquet does not match the manifest's checksum"):
        read_split_u8(open_dataset(root, "toy"), "test")
    first = vdir / "train" / "part-00000.parquet"  # the shard whose footer open_dataset reads
    first.write_bytes(bytes(first.stat().st_size))  # same size, not Parquet
    with pytest.raises(ValueError, match=r"shard train/part-00000\.parquet is not a Parquet file"):
        open_dataset(root, "toy")


def test_an_unreadable_manifest_is_one_line_naming_it_and_what_to_do(dataset):
    root, vdir = dataset
    text = (vdir / MANIFEST).read_text()
    for broken in (text[: len(text) // 2], text.replace('"rows"', '"row_count"', 1)):
        (vdir / MANIFEST).write_text(broken)
        with pytest.raises(ValueError) as caught:
            open_dataset(root, "toy", vdir.name)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{vdir / MANIFEST} is not a valid manifest (")
        assert message.endswith(f"the dataset version is damaged; remove {vdir} and ingest its source again")
