"""An OCI distribution (v2) pull client: manifests and blobs, verified, from mirrors or upstream.

This is the transport: which endpoints to try and over which scheme, and the
fetches themselves. Answering auth challenges is `images.auth`; what the
fetched JSON means is `images.manifest`. Everything a registry sends is
untrusted: manifests are size-limited and hashed, blobs are hashed while they
stream and deleted on any mismatch. Every failure leaves here as a
`core.errors` exception naming the reference and the host.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import httpx

from core.errors import (
    DataCorruption,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from core.settings import RegistrySettings
from images.auth import Authorizer, Credentials, describe_error, parse_www_authenticate, read_capped
from images.blobs import sha256_digest
from images.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor, manifest_media_type
from images.reference import DOCKER_HUB_ALIASES, Reference, host_of, hostname, is_digest, is_registry_host, is_tag

log = logging.getLogger("tandem.registry")

_T = TypeVar("_T")

_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
_DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_CHUNK = 1 << 20
_ERROR_BODY_LIMIT = 4096


class RegistryClient:
    """One per process: holds the HTTP connection pool, tokens, and what each host speaks."""

    def __init__(
        self, settings: RegistrySettings | None = None, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings or RegistrySettings()
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=self.settings.timeout,
            verify=ssl.create_default_context(),  # the system trust store, where operators add CAs
            headers={"User-Agent": "tandem"},
        )
        self._insecure = {host_of(h).lower() for h in self.settings.insecure}
        # built now so that a bad mirror entry fails at startup, not at the first pull
        self._mirrors = {
            domain: [self._endpoint(entry) for entry in entries] for domain, entries in self.settings.mirrors.items()
        }
        self._scheme_of: dict[str, str] = {}
        self._authorizer = Authorizer(self._http, self._plain_http_allowed, self.settings.max_token_bytes)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def repository(self, ref: Reference, creds: Credentials | None = None) -> Repository:
        return Repository(self, ref, creds)

    def _endpoints(self, domain: str) -> list[_Endpoint]:
        """Mirrors configured for `domain` in order, then the registry itself."""
        upstream = _DOCKER_HUB_ENDPOINT if domain in DOCKER_HUB_ALIASES else domain
        return [*self._mirrors.get(domain, []), self._endpoint(upstream)]

    def _endpoint(self, entry: str) -> _Endpoint:
        """`host[:port]` (HTTPS, or HTTP too where allowed) or `http(s)://host[:port]` (that scheme only)."""
        scheme, sep, rest = entry.partition("://")
        host = rest if sep else entry
        if not is_registry_host(host):
            raise InvalidArgument(f"registry endpoint {entry!r} is not [scheme://]host[:port]")
        if sep:
            if scheme not in ("http", "https"):
                raise InvalidArgument(f"registry endpoint {entry!r}: scheme must be http or https")
            return _Endpoint(host, (scheme,))
        return _Endpoint(host, ("https", "http") if self._plain_http_allowed(host) else ("https",))

    def _plain_http_allowed(self, host: str) -> bool:
        name = hostname(host)
        if host.lower() in self._insecure or name in self._insecure or name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    async def _open(
        self,
        ep: _Endpoint,
        path: str,
        what: str,
        scope: str,
        creds: Credentials | None,
        headers: dict[str, str],
    ) -> httpx.Response:
        """GET `path` from `ep`, answering one auth challenge; returns an open 200 response.

        The caller must close the response. Non-200 answers become domain errors
        whose message starts with the host.
        """
        offered = creds if creds is not None and creds.applies_to(ep.host) else None
        authorization = self._authorizer.cached(ep.host, scope, offered)
        resp = await self._send(ep, path, headers, authorization)
        if resp.status_code == 401 and not resp.history:
            challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
            await resp.aclose()
            authorization = await self._authorizer.answer(ep.host, challenges, scope, offered)
            resp = await self._send(ep, path, headers, authorization)
        if resp.status_code == 200:
            return resp
        detail = await _error_detail(resp)
        status = resp.status_code
        if status in (401, 403):
            self._authorizer.forget(ep.host, scope, offered)
            who = "the given credentials" if offered else "anonymous access"
            raise PermissionDenied(
                f"{ep.host}: {what}: access denied to {who} (HTTP {status}{detail}); "
                "the repository may not exist or may need other credentials"
            )
        if status == 404:
            raise NotFound(f"{ep.host}: {what} not found (HTTP 404{detail})")
        raise Unavailable(f"{ep.host}: {what}: HTTP {status}{detail}")

    async def _send(
        self, ep: _Endpoint, path: str, headers: dict[str, str], authorization: str | None
    ) -> httpx.Response:
        """Try the host's schemes, the one that worked last time first; follow redirects.

        httpx drops Authorization when a redirect leaves the origin, so blob
        redirects to a CDN never carry registry credentials.
        """
        request_headers = dict(headers)
        if authorization:
            request_headers["Authorization"] = authorization
        known = self._scheme_of.get(ep.host)
        schemes = sorted(ep.schemes, key=lambda s: s != known)
        failures: list[httpx.RequestError] = []
        for scheme in schemes:
            request = self._http.build_request("GET", f"{scheme}://{ep.host}{path}", headers=request_headers)
            try:
                resp = await self._http.send(request, stream=True, follow_redirects=True)
            except httpx.RequestError as e:
                log.debug("%s over %s failed: %s", ep.host, scheme, e)
                failures.append(e)
                continue
            self._scheme_of[ep.host] = scheme
            return resp
        raise Unavailable(f"{ep.host}: unreachable over {'/'.join(schemes)}: {describe_error(failures[-1])}")


@dataclass(frozen=True)
class _Endpoint:
    host: str
    schemes: tuple[str, ...]


class Repository:
    """One repository of one reference, with the endpoint that served its manifest remembered."""

    def __init__(self, client: RegistryClient, ref: Reference, creds: Credentials | None) -> None:
        self.ref = ref
        self._client = client
        self._creds = creds
        self._scope = f"repository:{ref.path}:pull"
        self._endpoints = client._endpoints(ref.domain)
        self._served_by: _Endpoint | None = None

    @property
    def served_by(self) -> str | None:
        """The host that served the last manifest; blobs are fetched from it first."""
        return self._served_by.host if self._served_by else None

    async def get_manifest(self, tag_or_digest: str) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index; its descriptor's digest is computed from the bytes received."""
        if not (is_digest(tag_or_digest) or is_tag(tag_or_digest)):
            raise InvalidArgument(f"{self.ref}: {tag_or_digest!r} is neither a tag nor a sha256 digest")
        what = f"manifest {tag_or_digest}"

        async def attempt(ep: _Endpoint) -> tuple[Descriptor, bytes]:
            desc, body = await self._fetch_manifest(ep, tag_or_digest, what)
            self._served_by = ep
            return desc, body

        return await self._first_success(self._endpoints, what, attempt)

    async def fetch_blob(self, desc: Descriptor, dest: Path) -> None:
        """Stream a blob into `dest` (created or truncated); nothing is left there unless it verified."""
        if not is_digest(desc.digest):
            raise InvalidArgument(f"{self.ref}: bad blob digest {desc.digest!r}")
        order = sorted(self._endpoints, key=lambda ep: ep != self._served_by)

        async def attempt(ep: _Endpoint) -> None:
            try:
                await self._download(ep, desc, dest)
            except BaseException:
                # one unlink is cheap, and it must run even when the pull is cancelled
                dest.unlink(missing_ok=True)
                raise

        try:
            await self._first_success(order, f"blob {desc.digest}", attempt)
        except OSError as e:  # a local write failed: no other endpoint can help
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"{self.ref}: no space left for blob {desc.digest} in {dest.parent}") from e
            raise

    async def _first_success(
        self, endpoints: list[_Endpoint], what: str, attempt: Callable[[_Endpoint], Awaitable[_T]]
    ) -> _T:
        """Try each endpoint in turn; if all fail, raise the most specific of their errors."""
        errors: list[TandemError] = []
        for ep in endpoints:
            try:
                return await attempt(ep)
            except TandemError as e:
                errors.append(e)
            except httpx.RequestError as e:
                errors.append(Unavailable(f"{ep.host}: connection failed: {describe_error(e)}"))
            # misses and dead mirrors are routine; refusals and bad content deserve the operator's eye
            level = logging.DEBUG if isinstance(errors[-1], Unavailable | NotFound) else logging.WARNING
            log.log(level, "%s: %s failed at %s: %s", self.ref, what, ep.host, errors[-1])
        best = max(reversed(errors), key=_specificity)
        raise type(best)(f"{self.ref}: {what}: " + "; ".join(str(e) for e in errors)) from best

    async def _fetch_manifest(self, ep: _Endpoint, tag_or_digest: str, what: str) -> tuple[Descriptor, bytes]:
        limit = self._client.settings.max_manifest_bytes
        resp = await self._client._open(
            ep,
            f"/v2/{self.ref.path}/manifests/{tag_or_digest}",
            what,
            self._scope,
            self._creds,
            {"Accept": _ACCEPT},
        )
        try:
            data = await read_capped(resp, limit, f"{ep.host}: {what}")
        finally:
            await resp.aclose()
        digest = sha256_digest(data)
        if is_digest(tag_or_digest) and digest != tag_or_digest:
            raise DataCorruption(f"{ep.host}: {what} has digest {digest}")
        header = resp.headers.get("docker-content-digest")
        if header and header != digest:
            raise DataCorruption(f"{ep.host}: {what} has digest {digest} but the registry says {header}")
        media_type = manifest_media_type(resp.headers.get("content-type", ""), data, f"{ep.host}: {what}")
        return Descriptor(media_type, digest, len(data)), data

    async def _download(self, ep: _Endpoint, desc: Descriptor, dest: Path) -> None:
        what = f"blob {desc.digest}"
        resp = await self._client._open(
            ep,
            f"/v2/{self.ref.path}/blobs/{desc.digest}",
            what,
            self._scope,
            self._creds,
            {"Accept-Encoding": "identity"},
        )
        hasher = hashlib.sha256()
        received = 0
        try:
            with dest.open("wb") as out:
                async for chunk in resp.aiter_bytes(_CHUNK):
                    received += len(chunk)
                    if received > desc.size:
                        raise DataCorruption(f"{ep.host}: {what} is longer than the expected {desc.size} bytes")
                    await asyncio.to_thread(_hash_and_write, hasher, out, chunk)
        finally:
            await resp.aclose()
        if received != desc.size:
            raise DataCorruption(f"{ep.host}: {what} is {received} bytes, expected {desc.size}")
        digest = f"sha256:{hasher.hexdigest()}"
        if digest != desc.digest:
            raise DataCorruption(f"{ep.host}: {what} has digest {digest}")


def _hash_and_write(hasher: hashlib._Hash, out: IO[bytes], chunk: bytes) -> None:
    """Off the event loop: hashing and writing a megabyte both release the GIL."""
    hasher.update(chunk)
    out.write(chunk)


async def _error_detail(resp: httpx.Response) -> str:
    """The registry's error codes (`MANIFEST_UNKNOWN`, ...), read from at most a few KiB of body."""
    body = b""
    try:
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT:
                break
    except httpx.RequestError:
        pass
    finally:
        await resp.aclose()
    try:
        errors = json.loads(body).get("errors") or []
        codes = [str(e.get("code")) for e in errors if isinstance(e, dict) and e.get("code")]
    except (ValueError, AttributeError, TypeError):
        return ""
    return f", {', '.join(codes)}" if codes else ""


_SPECIFICITY = (Unavailable, NotFound, PermissionDenied)


def _specificity(error: TandemError) -> int:
    """Unreachable < not there < refused < content that arrived but was wrong or too big."""
    for rank, cls in enumerate(_SPECIFICITY):
        if isinstance(error, cls):
            return rank
    return len(_SPECIFICITY)
