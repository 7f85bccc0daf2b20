"""Ray for the stages that use it (train-vae, encode-dataset): join a cluster, or start a local one."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.shards import ShardInfo, sha256_hex
from vae_core.errors import VAEError

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


# Not Ray resources: each alive node's CPUs, as `node_CPU:<i>` keys that `ray_session` adds to what it yields.
# One worker runs on one node, so a reservation no node can hold is never placed: Ray waits for it, a hang.
NODE_CPUS = "node_CPU:"


def with_node_cpus(resources: dict[str, float], nodes: list[dict[str, Any]]) -> dict[str, float]:
    """`resources` (`ray.cluster_resources()`) plus each alive node's CPUs from `nodes` (`ray.nodes()`)."""
    cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("Alive")]
    return {**resources, **{f"{NODE_CPUS}{i}": c for i, c in enumerate(cpus)}}


def _placeable(nodes: list[float], cpus: float) -> int:
    """How many workers of `cpus` CPUs the nodes hold."""
    return sum(int(n / cpus + 1e-9) for n in nodes)


def _fitting(nodes: list[float], workers: int, cpus: float) -> float:
    """The largest reservation up to `cpus` of which the nodes hold `workers` (0.0 if none)."""
    shares = {n / k for n in nodes for k in range(1, workers + 1)} | {cpus}
    return max((c for c in shares if c <= cpus and _placeable(nodes, c) >= workers), default=0.0)


class WorkerRequest(Protocol):
    """What a stage's request says about its Ray workers (TrainRequest's ranks, EncodeRequest's actors)."""

    workers: int
    cpus_per_worker: float | None
    gpus_per_worker: float


def reserve(resources: dict[str, float], req: WorkerRequest, error: type[VAEError], *, spare: float | None,
            min_cpus: float, data_cpu: str | None = None, threads: float | None = None) -> tuple[float, int]:
    """CPUs Ray reserves per worker, and torch threads per worker: the one place for CPU/GPU reservation.

    `resources` is `ray.cluster_resources()`. Workers get fractional CPUs by default (at least `min_cpus`)
    and leave `spare` CPUs unreserved (None: 10% of the cluster), so that Ray's own tasks and Ray Data's
    reads run beside them: reserving every CPU starves those, a hang rather than an error. `data_cpu`, when
    given, says why a whole CPU must stay free whatever the request asks (Ray Data streams beside the
    workers and only gets whole CPUs they leave) and what to do about it. Threads follow `threads` CPUs,
    default the worker's share of the machine, not its reservation (which leaves room for Ray).

    Raises `error` naming the numbers when the request asks for more than the cluster has.
    """
    total = resources.get("CPU", os.cpu_count() or 1)
    nodes = [v for k, v in resources.items() if k.startswith(NODE_CPUS)] or [total]
    left = 0.1 * total if spare is None else spare
    # A worker's share of the cluster, cut to what the nodes hold `workers` of (never below `min_cpus`).
    fitting = _fitting(nodes, req.workers, (total - left) / req.workers)
    cpus = req.cpus_per_worker or max(min_cpus, math.floor(fitting * 100 + 1e-6) / 100)  # down: still fits
    if data_cpu is not None and cpus * req.workers > total - 1:
        raise error(f"{req.workers} workers x {cpus} CPUs leave less than one CPU of the cluster's {total:g} for "
                    f"Ray Data, {data_cpu}")
    if cpus * req.workers > total:
        raise error(f"{req.workers} workers x {cpus} CPUs exceed the cluster's {total:g} CPUs")
    if _placeable(nodes, cpus) < req.workers:
        raise error(f"{req.workers} workers x {cpus:g} CPUs: the cluster's nodes ({', '.join(f'{n:g}' for n in nodes)} "
                    f"CPUs) hold {_placeable(nodes, cpus)} of them, and one worker runs on one node")
    if req.gpus_per_worker * req.workers > resources.get("GPU", 0):
        raise error(f"{req.workers} workers x {req.gpus_per_worker} GPUs exceed the cluster's "
                    f"{resources.get('GPU', 0):g} GPUs")
    return cpus, max(1, round(threads or total / req.workers))


#: Ray's logger of the "Token authentication is enabled for this Ray cluster" notice
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet(name: str, on: bool = True) -> Iterator[None]:
    """Logger `name` passes errors only while the block runs, when `on`; its level as it was after."""
    logger = logging.getLogger(name)
    level = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class RayUnreachableError(ConnectionError):
    """RAY_ADDRESS names a cluster where nothing answers; the message names the address and what to do."""


@contextlib.contextmanager
def ray_session() -> Iterator[dict[str, float]]:
    """Join $RAY_ADDRESS (or an already initialised Ray), else start a new local Ray and shut it down after.

    Yields `ray.cluster_resources()`. Without RAY_ADDRESS the local Ray is a new one, whatever address an
    earlier `ray start` left in Ray's temp folder (a plain `ray.init()` would join it, and retry a dead one
    for minutes). The caller's SIGTERM handler stays in force, and what it raises reaches the caller even
    from inside Ray's blocking calls (`_SigtermBridge`).

    Raises:
        RayUnreachableError: within seconds, when nothing answers at RAY_ADDRESS.
    """
    import ray

    started, bridge = False, None
    env_before, env_by_ray = dict(os.environ), {}
    sigterm_before = signal.getsignal(signal.SIGTERM)
    if not ray.is_initialized():
        try:
            if address := os.environ.get("RAY_ADDRESS"):
                _check_answers(address)
                ray.init(address=address, log_to_driver=False, runtime_env=job_runtime_env())
            else:
                # A local Ray listens on loopback only; a cluster is joined through RAY_ADDRESS instead. Its
                # notice that it turned token authentication on (a line amid the progress of every command)
                # is about a cluster others could reach, which this one is not.
                with quiet(TOKEN_NOTICE_LOGGER):
                    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                             _node_ip_address="127.0.0.1", runtime_env=job_runtime_env())
        finally:
            bridge = _SigtermBridge.install(sigterm_before)
            env_by_ray = _changed(env_before)
        started = True
    try:
        yield with_node_cpus(ray.cluster_resources(), ray.nodes())
    except KeyboardInterrupt:
        if bridge is not None and bridge.raised is not None:
            raise bridge.raised from None  # what the caller's handler raised, now that Ray let it through
        raise
    finally:
        if started:
            ray.shutdown()
            # ray.init writes to os.environ (RAY_AUTH_MODE=token for a local head, ...); left behind, it
            # breaks a later job of this process, or a child process, that joins a cluster without tokens.
            # Only Ray's is put back (what ray.init wrote and nobody changed since, and any RAY_* variable Ray
            # set later): what the block set stays.
            for key, value in _changed(env_before).items():
                if key.startswith("RAY_") or env_by_ray.get(key, object()) == value:
                    _put_env(key, env_before.get(key))
            if sigterm_before is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm_before)  # the bridge, or Ray's handler, goes with Ray


def _changed(before: dict[str, str]) -> dict[str, str | None]:
    """The variables of os.environ that differ from `before`, with their values now (None: removed)."""
    keys = set(before) | set(os.environ)
    return {k: os.environ.get(k) for k in keys if os.environ.get(k) != before.get(k)}


def _put_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


class _SigtermBridge:
    """The caller's SIGTERM handler (the `vae` command's, Prefect's flow engine's), in force again after
    `ray.init`, its exception carried through Ray's blocking calls.

    `ray.init` installs Ray's own handler, which kills the local Ray's processes under the running job and
    exits 1; the driver's core worker then aborts on its vanished raylet (exit 134, a stack dump). And while
    `ray.get` waits, an exception raised by a signal handler is dropped unless it is KeyboardInterrupt
    (Prefect's TerminationSignal came out as a SystemError once the call returned, minutes later). So the
    caller's handler is called from here, what it raises travels through Ray as KeyboardInterrupt, and
    `ray_session` raises the original again once it is out of Ray.
    """

    def __init__(self, handler: Any) -> None:
        self.handler, self.raised = handler, None

    @classmethod
    def install(cls, handler: Any) -> _SigtermBridge | None:
        """Install a bridge to `handler` when it is a Python handler (else Ray's stays: a process without a
        cleanup of its own still has Ray's); signal handlers belong to the main thread only."""
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            return None
        bridge = cls(handler)
        signal.signal(signal.SIGTERM, bridge)
        return bridge

    def __call__(self, signum: int, frame: Any) -> None:
        try:
            self.handler(signum, frame)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            self.raised = e
            raise KeyboardInterrupt from e


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """Connect to RAY_ADDRESS's host:port (`host:port` or `ray://host:port`) within `timeout` s, or raise
    RayUnreachableError: Ray itself retries an absent GCS for minutes. Other forms go to Ray as they are."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnreachableError(
            f"RAY_ADDRESS={address}: nothing answers there ({e.strerror or e}); start the cluster (`vae stack up` "
            "prints its exports) or unset RAY_ADDRESS to run on a new local Ray") from None


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


class ShardMismatchError(VAEError, ValueError):
    """A shard's bytes are not the ones its dataset manifest lists: replaced, truncated or corrupt."""

    def __str__(self) -> str:
        # Only the first line: Ray Data appends advice on retrying to a read task's error, and no retry
        # changes a file's bytes.
        return str(self.args[0]).split("\n", 1)[0] if self.args else ""


_WHAT_TO_DO = "restore the file, or remove the dataset version and ingest its source again"


def read_shards(paths: list[str], shards: list[ShardInfo], filesystem: Any, columns: list[str],
                include_paths: bool = False):
    """A Ray Dataset of the Parquet shards at `paths` (`columns`, plus `path` with `include_paths`), each
    verified against its manifest entry in `shards` before any of its rows are read.

    One read task per shard reads the file's bytes once, checks their size and SHA-256 against the
    manifest (`ShardMismatchError` naming the file otherwise), then parses the Parquet from those bytes
    and yields it row group by row group. The row counts come from the manifest, so neither the driver
    nor a pool of actors reads a footer first (Ray 2.60's second Parquet reader read them again every
    time a dataset ran: once per epoch for a streamed training split).
    """
    import ray.data

    if len(paths) != len(shards):
        raise ValueError(f"{len(paths)} shard paths but {len(shards)} manifest entries")
    return ray.data.read_datasource(_verified_shards_class()(paths, shards, filesystem, columns, include_paths))


def _read_verified(path: str, shard: ShardInfo, filesystem: Any, columns: list[str],
                   include_paths: bool) -> Iterator[pa.Table]:
    """The rows of one shard, row group by row group, after its bytes matched the manifest's size and
    SHA-256 (runs inside a Ray read task)."""
    with filesystem.open_input_file(path) as f:
        data = f.read_buffer()
    if data.size != shard.bytes:
        raise ShardMismatchError(f"{path}: {data.size:,} bytes do not match the manifest's {shard.bytes:,} "
                                 f"(a replaced or truncated shard): {_WHAT_TO_DO}")
    if sha256_hex(memoryview(data)) != shard.sha256:
        raise ShardMismatchError(f"{path}: its SHA-256 does not match the manifest's (a replaced or corrupt "
                                 f"shard): {_WHAT_TO_DO}")
    parquet = pq.ParquetFile(pa.BufferReader(data))
    for i in range(parquet.num_row_groups):
        table = parquet.read_row_group(i, columns=columns)
        if include_paths:
            table = table.append_column("path", pa.repeat(pa.scalar(path, pa.string()), table.num_rows))
        yield table


@functools.cache
def _verified_shards_class() -> type:
    """The Ray Data datasource of `read_shards` (made on first use: importing Ray Data takes seconds)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class VerifiedShards(Datasource):
        def __init__(self, paths: list[str], shards: list[ShardInfo], filesystem: Any, columns: list[str],
                     include_paths: bool) -> None:
            super().__init__()
            self.parts = list(zip(paths, shards))
            self.filesystem, self.columns, self.include_paths = filesystem, columns, include_paths

        def estimate_inmemory_data_size(self) -> int:
            return sum(shard.bytes for _, shard in self.parts)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            # One task per shard whatever `parallelism` says: a shard is the unit that is verified.
            return [ReadTask(functools.partial(_read_verified, path, shard, self.filesystem, self.columns,
                                               self.include_paths),
                             BlockMetadata(num_rows=shard.rows, size_bytes=shard.bytes, input_files=[path],
                                           exec_stats=None),
                             per_task_row_limit=per_task_row_limit)
                    for path, shard in self.parts]

    return VerifiedShards
