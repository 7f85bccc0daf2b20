"""bench/stack_load.py's serving part: `mlflow models serve` of a registered model against the stack's tracking
server, and a bounded load on its `/invocations` from an asyncio client.

The request is the pyfunc's input (flows/tracking/pyfunc.py, docs/models.md): uint8 images (N, H, W, C) sent as
`{"inputs": [...nested lists...], "params": {"batch_size": N}}`; the answer is `{"predictions": {"mean": ...,
"logvar": ...}}`. Images are MNIST test digits, the dataset's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from bench.stack_load_checks import quantile

MNIST_TEST = Path("/work/shared/data/mnist/t10k-images-idx3-ubyte.gz")
READY_TIMEOUT_S = 180


def mnist_images(n: int, path: Path = MNIST_TEST) -> np.ndarray:
    """The first `n` images of an IDX image file (gzipped), uint8 (n, H, W, 1)."""
    raw = gzip.decompress(path.read_bytes())
    count, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, count=min(n, count) * h * w, offset=16).reshape(-1, h, w, 1)


def payload(images: np.ndarray) -> bytes:
    """The JSON body of one request: the images as nested lists, a forward pass over the whole batch."""
    return json.dumps({"inputs": images.tolist(), "params": {"batch_size": len(images)}}).encode()


@contextlib.contextmanager
def served(model_uri: str, port: int, env: dict[str, str], log: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on 127.0.0.1:`port` until the block ends (then stopped, its whole
    session); yields its base URL once `/ping` answers. Raises RuntimeError with its log's tail if it exits
    or does not answer within READY_TIMEOUT_S."""
    bin_dir = str(Path(sys.executable).parent)
    # It execs `uvicorn` by name: the environment's bin folder must be on PATH, as in an activated virtualenv.
    env = env | {"PATH": os.pathsep.join([bin_dir, env.get("PATH", "")])}
    argv = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited ({proc.returncode}): {_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"mlflow models serve did not answer /ping within {READY_TIMEOUT_S} s: {_tail(log)}")


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-4:])


async def _worker(client: httpx.AsyncClient, url: str, body: bytes, until: float,
                  latencies: list[float], errors: list[str]) -> None:
    """Send `body` again and again until `until` (monotonic), one request at a time."""
    while time.monotonic() < until:
        t = time.perf_counter()
        try:
            r = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            ok = r.status_code == 200 and "predictions" in r.json()
            detail = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        if ok:
            latencies.append(time.perf_counter() - t)
        else:
            errors.append(detail)


async def _load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], list[str], float]:
    """`concurrency` clients on `url` for `seconds`: (latencies of the answered requests, errors, wall)."""
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        start = time.monotonic()
        await asyncio.gather(*(_worker(client, url, body, start + seconds, latencies, errors)
                               for _ in range(concurrency)))
        return latencies, errors, time.monotonic() - start


def load_figures(url: str, images: np.ndarray, concurrency: int, seconds: float, warmup_s: float) -> dict:
    """A warm-up of `warmup_s`, then `concurrency` clients posting `images` for `seconds`: requests/s, images/s,
    p50/p99 latency in ms and errors (the first few kept)."""
    body = payload(images)
    endpoint = f"{url}/invocations"
    asyncio.run(_load(endpoint, body, concurrency, warmup_s))
    latencies, errors, wall = asyncio.run(_load(endpoint, body, concurrency, seconds))
    done = len(latencies)
    ms = [s * 1000 for s in latencies]
    return {"batch": len(images), "concurrency": concurrency, "seconds": round(wall, 2), "requests": done,
            "requests_per_s": round(done / wall, 2), "images_per_s": round(done * len(images) / wall, 1),
            "p50_ms": _round(quantile(ms, 0.5)), "p99_ms": _round(quantile(ms, 0.99)), "errors": len(errors),
            "error_examples": errors[:3], "request_kib": round(len(body) / 1024, 1)}


def in_process_ms(model_uri: str, tracking_uri: str, batches: list[np.ndarray], repeats: int = 3) -> list[dict]:
    """Where a request's time goes without HTTP, the model loaded in this process, median milliseconds after one
    warm-up call, per batch: `predict` (the bare baseline), and turning the request's JSON into the input array
    (`json.loads`, then the parser the scoring server uses, with the model's input schema)."""
    import mlflow
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    schema = model.metadata.get_input_schema()

    def parse(body: bytes) -> None:
        data = json.loads(body)
        data.pop("params")  # the server takes them apart before parsing the inputs
        infer_and_parse_data(data, schema)

    return [{"predict_ms": _median_ms(lambda: model.predict(x, params={"batch_size": len(x)}), repeats),
             "parse_ms": _median_ms(lambda: parse(body), repeats)} for x, body in zip(batches, map(payload, batches))]


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return round(quantile(times[1:], 0.5), 1)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
