"""Files on any fsspec filesystem: URLs to filesystems, and writes that readers see whole or not at all.

Every file a stage publishes (shards, manifests, embeddings) is first written under a hidden temporary
name beside its final one and then moved into place (`atomic_write_bytes`, `atomic_put_file`). The
temporary's name holds its writer's host and process (`temporary_name`), so that `remove_temporaries`
can remove what a killed writer left without touching what a live one is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import pyarrow.fs as pafs

from vae_core.errors import StorageUnavailableError

# The hidden names `_publish` writes to before the move: `.<final name>.tmp-<host key>-<pid>-<random>`.
# The writer's host and process are part of the name, so that a clean-up can tell a temporary whose
# writer is gone (removable) from one another process is still writing (never touched).
TEMPORARY = re.compile(r"\A\..+\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{32}\Z")
# A temporary written on another host is removed only once it is this old: its writer cannot be asked.
FOREIGN_TEMPORARY_AGE_S = 24 * 3600.0


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL (local path, file://, memory://, s3://, ...) -> (filesystem, path without protocol).

    An s3:// URL gets `vae_core.s3`'s filesystem: retries configured (`$VAE_S3_MAX_ATTEMPTS`), and one
    `StorageUnavailableError` naming the object when the store stays unreachable through them.
    """
    options = storage_options or {}
    if fsspec.core.split_protocol(url)[0] in ("s3", "s3a"):
        from vae_core import s3  # s3fs and botocore load only for S3

        fs = s3.S3FileSystem(**{**s3.S3FileSystem._get_kwargs_from_urls(url), **s3.options(options)})
        path = s3.S3FileSystem._strip_protocol(url)
    else:
        fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's view of an fsspec filesystem: its native one for local files (faster), a wrapper otherwise.

    The wrapper pickles with its fsspec filesystem, so credentials and endpoints reach remote readers.
    """
    return pafs.LocalFileSystem() if is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of `resolve`: a URL that names `path` on `fs` (local paths stay plain paths)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _host_key() -> str:
    """8 hex digits naming this host in temporary names (a host name may hold '.' or '-')."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_name(path: str) -> str:
    """The hidden name beside `path` that this process writes before publishing `path` (see TEMPORARY)."""
    parent, base = posixpath.split(path)
    return posixpath.join(parent, f".{base}.tmp-{_host_key()}-{os.getpid()}-{uuid.uuid4().hex}")


def is_temporary(name: str) -> bool:
    """Whether the file name `name` (no folder) is one of `_publish`'s temporaries."""
    return TEMPORARY.fullmatch(name) is not None


def _publish(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[str], None], replace: bool = True) -> bool:
    """Have `write` fill a hidden temporary name beside `path`, then publish it with one move; returns
    whether it was published (always, unless `replace` is False and `path` exists: see `_move`).

    A rename locally; on object stores a server-side copy, which also appears all at once. Readers see
    either nothing or the whole file.
    """
    tmp = temporary_name(path)
    try:  # the write too: an interrupt halfway through it must not leave the partial temporary behind
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write(tmp)
        return _move(fs, tmp, path, replace)
    except StorageUnavailableError as e:
        # It names the request that failed last: say which file that was for. The temporary stays (removing
        # it would wait out the retries again); `remove_temporaries` takes it once this process is gone.
        raise StorageUnavailableError(f"writing {to_url(fs, path)}: {e}") from e
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the original error is the one worth reporting
            fs.rm_file(tmp)
        raise


def _move(fs: fsspec.AbstractFileSystem, tmp: str, path: str, replace: bool) -> bool:
    """Move `tmp` to `path`; without `replace`, leave an existing `path` as it is (and return False).

    Locally a hard link never replaces and is atomic, so of two concurrent writers exactly one wins. Object
    stores have no such move in fsspec: the check before the copy leaves a window of one request.
    """
    if replace:
        fs.mv(tmp, path)
        return True
    if is_local(fs):
        try:
            os.link(tmp, path)
            published = True
        except FileExistsError:
            published = False
        fs.rm_file(tmp)
        return published
    fs.invalidate_cache(posixpath.dirname(path))
    if fs.exists(path):
        fs.rm_file(tmp)
        return False
    fs.mv(tmp, path)
    return True


def writer_gone(name: str, modified: float | None, now: float) -> bool:
    """Whether the process that wrote temporary `name` (see TEMPORARY) can no longer finish it.

    On this host: its pid is not alive (a pid reused since only keeps the file, the safe mistake). On
    another host: the file is older than FOREIGN_TEMPORARY_AGE_S (unknown age: never).
    """
    m = TEMPORARY.fullmatch(name)
    if m is None:
        return False
    if m["host"] != _host_key():
        return modified is not None and now - modified > FOREIGN_TEMPORARY_AGE_S
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive but not ours to signal / not a pid: leave it
    return False


def _modified(entry: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) of an `fs.ls(detail=True)` entry, where the store gives one."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return None


def remove_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Delete the temporaries in `folder` (not below it) whose writer is gone, and return their paths.

    `_publish` removes its own temporary when it fails, but a killed process (SIGKILL, power loss) cannot.
    Only names of `_publish`'s own scheme are candidates, only directly in a folder the caller writes,
    and never one a live process may still be writing (a concurrent run of the same stage): nothing a
    user or another run put there is touched.
    """
    fs.invalidate_cache(folder)  # object stores cache listings; another process may have written since
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    now = time.time()
    stale = [e["name"] for e in entries if e.get("type") == "file"
             and writer_gone(posixpath.basename(e["name"]), _modified(e), now)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):  # a concurrent cleanup got there first
            fs.rm_file(p)
    return stale


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, replace: bool = True) -> bool:
    """Write `data` to `path` atomically; with replace=False an existing `path` wins (returns False)."""
    return _publish(fs, path, lambda tmp: fs.pipe_file(tmp, data), replace)


def atomic_put_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Upload a local file to `path` atomically."""
    _publish(fs, path, lambda tmp: fs.put_file(local_path, tmp))
