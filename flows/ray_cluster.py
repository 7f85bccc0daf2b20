"""Ray for the stages that use it (train-vae, encode-dataset): join a cluster, or start a local one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


# Ray starts its workers at niceness 15, below every ordinary process: a training or encoding worker
# then yields its cores to the driver, Ray's own daemons and anything else on the machine, and trains at
# about half the bare loop's speed on a busy 2-core machine. This job's workers (the Ray Train group, Ray
# Data tasks and actors) run at the ordinary priority, as `ray job submit` runs its drivers.
#
# glibc's malloc, left to adapt its thresholds, hands the activations a Ray Train worker's training thread
# frees every step back to the kernel, and the next step faults them in again page by page: 2.3 million
# page faults over 3 epochs of 15,000 MNIST images and 0.69 of the bare loop's speed, against 42,000 and
# 0.98 with fixed thresholds (allocations under 32 MiB from the heap, which keeps up to 256 MiB free).
# glibc reads these when a worker process starts; a value the driver's environment sets wins.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def job_runtime_env() -> dict[str, dict[str, str]]:
    """The runtime environment of this job's Ray workers (see above)."""
    return {"env_vars": {"RAY_worker_niceness": "0", **{k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}}}


@contextlib.contextmanager
def ray_session() -> Iterator[dict[str, float]]:
    """Join $RAY_ADDRESS (or an already initialised Ray), else start a local Ray and shut it down after."""
    import ray

    started = False
    env_before = dict(os.environ)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=job_runtime_env())
        else:
            # A local Ray listens on loopback only; a cluster is joined through RAY_ADDRESS instead.
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _node_ip_address="127.0.0.1", runtime_env=job_runtime_env())
        started = True
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
            # ray.init writes to os.environ (RAY_AUTH_MODE=token for a local head, ...); left behind, it
            # breaks a later job of this process, or a child process, that joins a cluster without tokens.
            for key in set(os.environ) - set(env_before):
                del os.environ[key]
            os.environ.update(env_before)


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[None]:
    """Ray Data's process-wide DataContext with `settings` while the block runs, as it was after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(ctx, k, v)


def read_shards(paths: list[str], filesystem: Any, columns: list[str], **options: Any):
    """A Ray Dataset of Parquet shards (`ray.data.read_parquet` with `options`) through Ray Data's first
    Parquet reader, whose footers the driver reads once when the dataset is made.

    The second reader (Ray 2.60's default) reads them again every time the dataset runs, on a pool of up to
    32 new actor processes: once per epoch for a streamed training split. On a 2-core machine that left the
    training worker one core of two (streamed pipeline/bare 0.56, against 0.81 through this reader).
    """
    import ray.data

    with data_context(use_datasource_v2=False):
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, **options)
