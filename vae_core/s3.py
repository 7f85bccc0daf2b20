"""S3 as the stages use it (`vae_core.storage.resolve` of an s3:// URL): s3fs with its retries configured, and
one clear error naming the object when an object store stays unreachable through them.

What the layers do on a dropped connection, unconfigured (measured against moto behind a proxy that accepts
and closes, or resets, every connection): botocore's legacy retry mode makes 5 attempts with random
exponential backoff and raises `EndpointConnectionError` or `ConnectionClosedError`; s3fs tries a request
5 times more on `ConnectionClosedError` (and on a response body cut off mid-read, which botocore never sees),
so a read took 41 s and 25 requests and a write 7.5 s before a botocore traceback naming an http:// URL.

Configured here: botocore's standard retry mode (connection errors, 5xx, throttling; backoff of a random
share of 1, 2, 4 ... s, at most 20 s) with `$VAE_S3_MAX_ATTEMPTS` attempts, and 2 tries in s3fs (one more for
a cut-off body) so that the two layers do not multiply into minutes. Storage options a caller passes win.
"""

from __future__ import annotations

import os
import time
from typing import Any

import s3fs
from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
from s3fs.core import S3_RETRYABLE_ERRORS

from vae_core.errors import StorageUnavailableError

ATTEMPTS_ENV = "VAE_S3_MAX_ATTEMPTS"
ATTEMPTS_DEFAULT = 8  # about 30 s of backoff on average, at most about 70 s
S3FS_TRIES = 2
# What an unreachable or failing store raises once the retries are spent; anything else (a missing key, a
# denied request) is about the object, and is raised as s3fs translates it.
_UNAVAILABLE = (BotoConnectionError, HTTPClientError, *S3_RETRYABLE_ERRORS)


def max_attempts() -> int:
    """`$VAE_S3_MAX_ATTEMPTS` (botocore's attempts of one request, the first included), else ATTEMPTS_DEFAULT."""
    value = int(os.environ.get(ATTEMPTS_ENV, ATTEMPTS_DEFAULT))
    if value < 1:
        raise ValueError(f"{ATTEMPTS_ENV} must be at least 1, got {value}")
    return value


def options(storage_options: dict[str, Any]) -> dict[str, Any]:
    """`storage_options` with botocore's retry settings above filled in where they do not set them."""
    config = {"retries": {"mode": "standard", "total_max_attempts": max_attempts()},
              **storage_options.get("config_kwargs", {})}
    return {**storage_options, "config_kwargs": config}


def _object(kwargs: dict[str, Any]) -> str:
    """`s3://bucket/key` of a request's arguments (the prefix of a listing, the bucket alone otherwise)."""
    key = kwargs.get("Key", kwargs.get("Prefix", ""))
    return f"s3://{kwargs.get('Bucket', '')}/{key}".rstrip("/")


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs's filesystem whose requests end, once retried, in one `StorageUnavailableError` naming the object
    when the store stays unreachable. Every S3 request of s3fs goes through `_call_s3`."""

    retries = S3FS_TRIES  # s3fs's tries of a request: a class attribute, not an option

    async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super()._call_s3(method, *akwarglist, **kwargs)
        except _UNAVAILABLE as e:
            attempts = self.config_kwargs.get("retries", {}).get("total_max_attempts", "?")
            message = str(e).strip().split("\n")[0]
            raise StorageUnavailableError(
                f"{_object(kwargs)}: the object store did not answer {method} in {time.monotonic() - started:.1f} s "
                f"({attempts} attempts, {ATTEMPTS_ENV}): {type(e).__name__}: {message}"
            ) from e
