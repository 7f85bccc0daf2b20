"""Every reader refuses a shard whose bytes are not the manifest's: encode and streamed training (Ray Data's
read tasks, `flows.distributed.cluster.read_shards`), evaluate (in memory, `read_split_u8`).

The shards are tampered with as an attacker or a careless copy would: the same ids, the same row count and
the same file size, other pixels, a valid Parquet file. Only the checksum tells them apart.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

SMALL = {"model.hidden_channels": [16, 32], "model.hidden_dim": 64, "model.latent_dim": 8, "train.batch_size": 64}


def tamper(info, split: str, index: int = 0) -> str:
    """Rewrite shard `index` of `split` with two images' pixels swapped (ids, labels, row count and file size
    unchanged; a valid Parquet file) and return its path; the manifest is left as it was."""
    from vae_core.data.shards import build_table, images_u8, row_group_rows, writer_options

    shard = info.manifest.splits[split].shards[index]
    path = posixpath.join(info.path, shard.path)
    table = pq.read_table(path)
    images = np.array(images_u8(table, info.shape))
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int32)
    rng = np.random.default_rng(0)
    for _ in range(500):  # swaps change the compressed size by a few bytes; some change it by none
        i, j = rng.choice(len(images), 2, replace=False)
        if np.array_equal(images[i], images[j]):
            continue
        swapped = images.copy()
        swapped[[i, j]] = swapped[[j, i]]
        sink = pa.BufferOutputStream()
        pq.write_table(build_table(table.column("id").to_pylist(), swapped, labels, table.column("source").to_pylist()),
                       sink, row_group_size=row_group_rows(info.manifest.image_bytes), **writer_options())
        data = sink.getvalue().to_pybytes()
        if len(data) == shard.bytes:
            Path(path).write_bytes(data)
            return path
    raise AssertionError(f"no pixel swap of {path} kept its size")


def one_line_mismatch(path: str) -> str:
    """The whole of the error a reader raises for the tampered shard at `path`."""
    return f"^{re.escape(path)}: its SHA-256 does not match the manifest's .*ingest its source again$"


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist_home, register_model):
    """1,200 MNIST images in ~10 shards, a small untrained model registered on them, then the first train and
    test shards tampered with; one local Ray that every reader joins instead of starting its own (see
    tests/flows/test_train_flow.py's `home` for the health-check interval)."""
    from flows.distributed.cluster import ray_session

    with mnist_home(tmp_path_factory.mktemp("verified_home"), limit=1200, shard_mb=0.1) as root, \
            pytest.MonkeyPatch.context() as mp:
        from vae_core.data.shards import open_dataset
        from vae_core.settings import data_root

        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        mp.delenv("RAY_ADDRESS", raising=False)
        register_model(epochs=0)
        info = open_dataset(data_root(), "mnist")
        assert len(info.manifest.splits["train"].shards) > 1
        with ray_session():
            yield root, info, {split: tamper(info, split) for split in ("train", "test")}


def test_ray_data_reads_verify_every_shard(home):
    from flows.distributed.cluster import ShardMismatchError, ray_session, read_shards
    from vae_core.data.shards import shard_paths
    from vae_core.storage import arrow_filesystem

    _, info, tampered = home
    paths, shards = shard_paths(info, "train"), info.manifest.splits["train"].shards
    with ray_session():
        good = read_shards(paths[1:], shards[1:], arrow_filesystem(info.fs), ["id", "image"],
                           include_paths=True).take_all()
        mismatch = f"{re.escape(tampered['train'])}: its SHA-256 does not match the manifest's"
        with pytest.raises(Exception, match=mismatch) as caught:
            read_shards(paths, shards, arrow_filesystem(info.fs), ["id"]).materialize()
    expected = [pq.read_table(path, columns=["id"]).column("id").to_pylist() for path in paths[1:]]
    assert sorted(r["id"] for r in good) == sorted(i for ids in expected for i in ids)
    assert {r["path"] for r in good} == set(paths[1:])
    chain = [caught.value, getattr(caught.value, "cause", None), caught.value.__cause__]
    assert any(isinstance(e, ShardMismatchError) for e in chain), chain


def test_encode_refuses_a_tampered_shard_naming_it(home, tmp_path):
    from flows.encode import encode_dataset
    from vae_core.errors import EncodeError
    from vae_core.requests import EncodeRequest

    _, info, tampered = home
    mismatch = one_line_mismatch(tampered["train"])
    with pytest.raises(EncodeError, match=mismatch):
        encode_dataset(EncodeRequest(model="models:/vae-mnist/1", dataset="mnist", splits=["train"],
                                     out=str(tmp_path / "out")))
    shard = info.manifest.splits["train"].shards[0]
    assert not list((tmp_path / "out").rglob(f"{shard.sha256}-*.parquet"))  # nothing filed under its checksum
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_streamed_training_refuses_a_tampered_shard_naming_it(home):
    from flows.distributed.cluster import ShardMismatchError
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    _, _, tampered = home
    # The error itself, one line, as `vae train` prints it: not Ray's traceback around it.
    mismatch = one_line_mismatch(tampered["train"])
    with pytest.raises(ShardMismatchError, match=mismatch):
        train_vae(TrainRequest(dataset="mnist", overrides=SMALL, epochs=1, workers=1, max_failures=0,
                               memory_budget_mb=0.01))


def test_evaluate_refuses_a_tampered_shard_naming_it(home):
    from flows.evaluate import evaluate_vae
    from vae_core.requests import EvaluateRequest

    _, _, tampered = home
    with pytest.raises(ValueError, match="match the manifest") as caught:
        evaluate_vae(EvaluateRequest(model="models:/vae-mnist/1", dataset="mnist", iw_samples=1, promote=False))
    # The train split's seeded sample (the probes' reference) is read before the scored split streams.
    assert tampered["train"] in str(caught.value)
