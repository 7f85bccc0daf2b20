"""Evaluation's memory does not grow with the split: a subprocess evaluates the first 12,000 images of a split,
then all 36,000, and its peak resident memory barely moves where holding the 24,000 more images would take
18.8 MB (a guard on the streaming)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROWS, SIDE = 40_000, 28
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from vae_core import load_config
    from vae_core.data.shards import iter_split, open_dataset
    from vae_core.evaluation.evaluate import EvalData, evaluate_model
    from vae_core.model.vae import ConvVAE

    torch.set_num_threads(1)
    info = open_dataset(sys.argv[1], "noise")
    model = ConvVAE(load_config("mnist", {"model.hidden_channels": [8, 16], "model.hidden_dim": 32,
                                          "model.latent_dim": 4}).model).eval()

    def run(limit):
        data = EvalData(lambda b: iter_split(info, "test", b, limit))
        return evaluate_model(model, data, k=1, batch_size=500, sample_rows=1_000)

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Warm: the allocator settles over the first few shards (tens of MiB, then flat), torch's kernels load.
    run(12_000)
    warm = peak()
    images = run(None).images
    print(json.dumps({"images": images, "warm": warm, "peak": peak()}))
""")


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory):
    """A dataset of ROWS distinct noise images, 90% of them in its test split, in shards of 4 MB: a reader
    holds one shard at a time, so the shards must be small beside the split."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    root = tmp_path_factory.mktemp("noise")
    images = np.random.default_rng(0).integers(0, 256, (ROWS, SIDE, SIDE), dtype=np.uint8)
    np.savez(root / "noise.npz", images=images)
    run_ingest(IngestRequest(source=str(root / "noise.npz"), name="noise", data_root=str(root / "data"),
                             test_fraction=0.9, val_fraction=0.0, shard_mb=4))
    return root / "data"


@pytest.mark.slow
def test_evaluating_a_large_split_holds_none_of_it(noise_root):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(noise_root)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["images"] > 0.85 * ROWS
    grown = got["peak"] - got["warm"]
    # Holding the 24,000 more images' pixels alone would add 18.8 MB (their reconstructions as much again).
    assert grown < 8 * 2**20, f"peak memory grew by {grown / 2**20:.1f} MiB over {got['images']:,} images"
