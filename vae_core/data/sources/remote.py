"""Which URLs a run may read: allowed protocols, refused addresses, and storage errors as SourceErrors.

A request's URLs and fsspec options are chosen by whoever starts a run (a deployment parameter, say),
while the machine that reads them may reach what its caller cannot: cloud metadata services, private
networks. So, before anything is opened:

- every protocol of the URL (each link of a chained URL ``simplecache::s3://...``) must be allowed by
  `settings.allowed_protocols` (``VAE_ALLOWED_PROTOCOLS``; by default local files, s3, gs, az, memory);
- no host named by the URL or by its options (an ``endpoint_url``) may resolve to a link-local or cloud
  metadata address, whatever the setting. HTTP filesystems check every request again as it is sent,
  redirects included.

Loopback and private addresses are not refused: S3-compatible stores run there (MinIO, moto). The check
resolves names when it runs, and the client resolves them again to connect: a name whose records change
in between (DNS rebinding) is not caught. For HTTP the gap is narrowed to the moment before each request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol

from vae_core import settings
from vae_core.data.sources.base import SourceError
from vae_core.storage import resolve

LOCAL = ("file", "local")
HTTP = ("http", "https")
# Protocols whose URL's first part names a bucket or container, not a host.
_BUCKETS = (*LOCAL, "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
# Metadata services outside 169.254.0.0/16 and fe80::/10 (AWS over IPv6, Alibaba, Oracle).
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")))
_WORD = re.compile(r"[a-z][a-z0-9_]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s;,'\"]+")  # a URL, also inside a connection string
REFUSED = "is a link-local or cloud metadata address, which sources may never reach"


def protocols(url: str, options: dict[str, Any] | None = None) -> list[str]:
    """Each link's protocol, outermost first, as fsspec reads them: 'simplecache::s3://b/k' ->
    ['simplecache', 's3']; a plain path -> ['file']. Protocols the options name (`protocol`,
    `target_protocol`, which fsspec's wrapping filesystems follow) are added."""
    chained = "::" in url
    found = []
    for link in url.split("::"):
        bare = chained and "://" not in link and _WORD.fullmatch(link) is not None  # 'simplecache' in a chain
        found.append((link if bare else split_protocol(link)[0] or "file").lower())
    return found + [str(p).lower() for p in _option_values(options or {}, ("protocol", "target_protocol"))]


def check_url(url: str, options: dict[str, Any] | None = None) -> None:
    """SourceError unless every protocol of `url` is allowed and no host it or `options` names is refused."""
    allowed = settings.allowed_protocols()
    for protocol in protocols(url, options):
        if protocol not in allowed:
            raise SourceError(
                f"{url}: protocol '{protocol}' is not allowed (allowed: {', '.join(allowed)}); to allow it, set "
                f"{settings.PROTOCOLS_ENV}={','.join((*allowed, protocol))} where ingestion runs")
    for host in _hosts(url, options or {}):
        if (reason := refused(host)) is not None:
            raise SourceError(f"{url}: {reason}")


def open_fs(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`storage.resolve` for a source: `check_url` first, and HTTP requests checked as they are sent."""
    check_url(url, options)
    return resolve(url, _guard_http(url, dict(options or {})))


def refused(host: str) -> str | None:
    """Why `host` (a name or an address) may not be reached, or None. A name is resolved: every address
    it has must pass. A name that does not resolve passes (nothing can connect to it)."""
    name = host.strip("[]").rstrip(".").lower()
    if name in METADATA_NAMES:
        return f"{host} {REFUSED}"
    try:
        addresses = {ipaddress.ip_address(name.split("%")[0])}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(a[4][0].split("%")[0]) for a in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError):
            return None
    for a in addresses:
        a = a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a
        if a.is_link_local or a in METADATA_ADDRESSES:
            return f"{host} ({a}) {REFUSED}" if str(a) != name else f"{host} {REFUSED}"
    return None


def _hosts(url: str, options: dict[str, Any]) -> Iterator[str]:
    """Hosts a URL names (not buckets), read both from the whole URL and from each link of a chain (an
    IPv6 address holds '::' too), and those the options name: URLs anywhere in them (an endpoint_url), and
    values of keys that name a host or endpoint."""
    for text in {url, *url.split("::")}:
        for m in _URL.finditer(text):
            protocol = m.group(0).split("://", 1)[0].lower()
            if protocol not in _BUCKETS and (host := _host_of(m.group(0))):
                yield host
    yield from _option_hosts(options)


def _option_hosts(value: Any, key: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _option_hosts(v, str(k).lower())
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _option_hosts(v, key)
    elif isinstance(value, str):
        hosts = [h for m in _URL.finditer(value) if (h := _host_of(m.group(0)))]
        yield from hosts
        if not hosts and ("host" in key or "endpoint" in key):
            yield value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _option_values(value: Any, keys: tuple[str, ...]) -> Iterator[Any]:
    """Every value of `keys` in nested options."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in keys and isinstance(v, str):
                yield v
            yield from _option_values(v, keys)


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # a malformed netloc ('[x'): take what sits between // and the next /
        return url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1] or None


def _guard_http(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options with an HTTP client that checks every request it sends, for each HTTP link of `url`."""
    for i, protocol in enumerate(protocols(url)):  # the URL's links only: options name no extra link
        if protocol in HTTP:
            target = options if i == 0 else options.setdefault(protocol, {})
            target["get_client"] = guarded_client
    return options


async def guarded_client(**kwargs: Any) -> Any:
    """fsspec's HTTP `get_client`: an aiohttp session whose every request, redirects included, is refused
    when its host is (`refused`)."""
    import aiohttp

    return aiohttp.ClientSession(middlewares=(_check_request,), **kwargs)


async def _check_request(request: Any, handler: Any) -> Any:
    host = request.url.host or ""
    reason = await asyncio.get_running_loop().run_in_executor(None, refused, host)
    if reason is not None:
        raise PermissionError(f"{request.url}: {reason}")
    return await handler(request)


def storage_errors() -> tuple[type[BaseException], ...]:
    """Errors storage clients raise that are not OSErrors (missing credentials, unreachable endpoints)."""
    found: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from google.auth.exceptions import GoogleAuthError

        found.append(GoogleAuthError)
    except ImportError:
        pass
    return tuple(found)


def storage_hint(error: BaseException) -> str:
    """What to do about a storage error, for the one-line message."""
    text = f"{type(error).__name__} {error}".lower()
    if "credential" in text or "token" in text or isinstance(error, PermissionError) or "denied" in text:
        return ("give the storage credentials (for s3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE; or key/secret in source_options) and check they may read it")
    return "check the URL, the network and the storage options"
