"""An OCI distribution (v2) pull client: manifests and blobs, verified, from mirrors or upstream.

Everything a registry sends is untrusted: manifests are size-limited and hashed,
blobs are hashed while they stream and deleted on any mismatch. Every failure
leaves here as a `core.errors` exception naming the reference and the host.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

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
from images.manifest import DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from images.reference import Reference, is_digest, is_registry_host, is_tag

log = logging.getLogger("tandem.registry")

_T = TypeVar("_T")

_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
_DEFAULT_TOKEN_TTL = 60.0
_CHUNK = 1 << 20
_ERROR_BODY_LIMIT = 4096


@dataclass
class RegistrySettings:
    """`[registry]` in the config: which hosts may be plain HTTP, and mirrors per registry domain."""

    insecure: list[str] = field(default_factory=list)
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    timeout: float = 60.0
    max_manifest_bytes: int = 4 * 2**20
    max_token_bytes: int = 2**20  # a token answer; real ones are a few KiB


@dataclass
class Credentials:
    """Pull credentials as CRI's AuthConfig carries them; secrets stay out of repr()."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    server_address: str = ""

    @classmethod
    def from_cri(
        cls,
        username: str = "",
        password: str = "",
        auth_b64: str = "",
        server_address: str = "",
        identity_token: str = "",
        registry_token: str = "",
    ) -> Credentials:
        """Build from AuthConfig fields; `auth` (base64 "user:pass") fills in a missing username."""
        if auth_b64 and not username:
            try:
                padded = auth_b64 + "=" * (-len(auth_b64) % 4)
                decoded = base64.b64decode(padded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument("auth is not valid base64") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument("auth must encode user:password")
        return cls(username, password, identity_token, registry_token, server_address)

    def applies_to(self, host: str) -> bool:
        """Credentials for one registry must never be offered to another."""
        return not self.server_address or _canonical_host(self.server_address) == _canonical_host(host)

    def fingerprint(self) -> str:
        """Tells credential sets apart in caches, so one pull never reuses another's token."""
        joined = "\0".join([self.username, self.password, self.identity_token, self.registry_token])
        return hashlib.sha256(joined.encode()).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    """What a manifest or index says about another object: type, digest and exact size."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = field(default=None, hash=False)
    annotations: dict[str, str] | None = field(default=None, hash=False)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Validate an untrusted descriptor object from a manifest or index."""
        if not isinstance(obj, dict):
            raise InvalidArgument("descriptor is not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        platform, annotations = obj.get("platform"), obj.get("annotations")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument("descriptor has no mediaType")
        if not isinstance(digest, str) or not is_digest(digest):
            raise InvalidArgument(f"descriptor has a bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"descriptor {digest} has a bad size {size!r}")
        if platform is not None and not isinstance(platform, dict):
            raise InvalidArgument(f"descriptor {digest} has a bad platform")
        if annotations is not None and not isinstance(annotations, dict):
            raise InvalidArgument(f"descriptor {digest} has bad annotations")
        return cls(media_type, digest, size, platform, annotations)


@dataclass(frozen=True)
class Challenge:
    """One challenge from a WWW-Authenticate header; `scheme` is lowercased, as are param names."""

    scheme: str
    params: dict[str, str] = field(hash=False)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))')
_TOKEN68_RE = re.compile(r"\s+[A-Za-z0-9\-._~+/]+=*\s*(?=,|$)")
_ESCAPE_RE = re.compile(r"\\(.)")


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Parse RFC 7235 challenges; quoted values may hold commas, one header may hold several."""
    challenges: list[Challenge] = []
    for header in [headers] if isinstance(headers, str) else headers:
        pos = 0
        while m := _SCHEME_RE.match(header, pos):
            pos = m.end()
            params: dict[str, str] = {}
            if t := _TOKEN68_RE.match(header, pos):
                pos = t.end()
            while p := _PARAM_RE.match(header, pos):
                quoted, bare = p.group(2), p.group(3)
                params[p.group(1).lower()] = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else bare
                pos = p.end()
            challenges.append(Challenge(m.group(1).lower(), params))
    return challenges


def select_platform(
    index_json: bytes | dict[str, Any], os: str = "linux", arch: str = "amd64", variant: str | None = None
) -> Descriptor:
    """Pick the manifest for one platform out of an OCI index or Docker manifest list.

    Attestation manifests (BuildKit's `vnd.docker.reference.type`) are never
    images. An entry whose variant equals `variant` (absent when None) wins over
    other variants of the same os/arch.
    """
    where = f" {_sha256(index_json)}" if isinstance(index_json, bytes) else ""
    if isinstance(index_json, bytes):
        try:
            index_json = json.loads(index_json)
        except ValueError:
            raise InvalidArgument(f"index{where} is not valid JSON") from None
    manifests = index_json.get("manifests") if isinstance(index_json, dict) else None
    if not isinstance(manifests, list):
        raise InvalidArgument(f"index{where} has no manifests list")
    matches: list[Descriptor] = []
    offered: list[str] = []
    for entry in manifests:
        desc = Descriptor.from_json(entry)
        if _ATTESTATION_ANNOTATION in (desc.annotations or {}):
            continue
        platform = desc.platform or {}
        offered.append("/".join(str(platform.get(k)) for k in ("os", "architecture", "variant") if k in platform))
        if platform.get("os") == os and platform.get("architecture") == arch:
            matches.append(desc)
    if not matches:
        raise NotFound(f"no {os}/{arch} image in index{where} (it offers {', '.join(offered) or 'nothing'})")
    exact = [d for d in matches if (d.platform or {}).get("variant") == variant]
    return (exact or matches)[0]


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
        self._insecure = {_strip_url(h).lower() for h in self.settings.insecure}
        # built now so that a bad mirror entry fails at startup, not at the first pull
        self._mirrors = {
            domain: [self._endpoint(entry) for entry in entries] for domain, entries in self.settings.mirrors.items()
        }
        self._scheme_of: dict[str, str] = {}
        self._auth: dict[tuple[str, str, str], tuple[str, float]] = {}

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
        upstream = _DOCKER_HUB_ENDPOINT if domain in _DOCKER_HUB_ALIASES else domain
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
        hostname = _hostname(host)
        if host.lower() in self._insecure or hostname in self._insecure or hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(hostname).is_loopback
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
        key = (ep.host, scope, offered.fingerprint() if offered else "")
        cached = self._auth.get(key)
        authorization = cached[0] if cached and cached[1] > time.monotonic() else None
        resp = await self._send(ep, path, headers, authorization)
        if resp.status_code == 401 and not resp.history:
            challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
            await resp.aclose()
            self._auth.pop(key, None)
            authorization, ttl = await self._authorize(ep.host, challenges, scope, offered)
            now = time.monotonic()
            self._auth = {k: v for k, v in self._auth.items() if v[1] > now}
            self._auth[key] = (authorization, now + ttl)
            resp = await self._send(ep, path, headers, authorization)
        if resp.status_code == 200:
            return resp
        detail = await _error_detail(resp)
        status = resp.status_code
        if status in (401, 403):
            self._auth.pop(key, None)
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
        raise Unavailable(f"{ep.host}: unreachable over {'/'.join(schemes)}: {_describe(failures[-1])}")

    async def _authorize(
        self, host: str, challenges: list[Challenge], scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        """Answer a challenge: the Authorization value to send and how long it stays good."""
        by_scheme = {c.scheme: c for c in challenges}
        if bearer := by_scheme.get("bearer"):
            if creds is not None and creds.registry_token:
                return f"Bearer {creds.registry_token}", float("inf")
            token, ttl = await self._fetch_token(host, bearer, scope, creds)
            return f"Bearer {token}", ttl
        if "basic" in by_scheme:
            if creds is None or not creds.username:
                raise PermissionDenied(f"{host}: registry requires credentials and none apply to it")
            pair = f"{creds.username}:{creds.password}".encode()
            return f"Basic {base64.b64encode(pair).decode()}", float("inf")
        raise PermissionDenied(f"{host}: HTTP 401 without a supported WWW-Authenticate challenge")

    async def _fetch_token(
        self, host: str, challenge: Challenge, scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise PermissionDenied(f"{host}: bearer challenge has no usable realm {realm!r}")
        service = challenge.params.get("service")
        fields = {"scope": scope} | ({"service": service} if service else {})
        realm_host = _strip_url(realm)
        sends_secret = creds is not None and bool(creds.identity_token or creds.username)
        if sends_secret and realm.startswith("http://") and not self._plain_http_allowed(realm_host):
            raise PermissionDenied(f"{host}: refusing to send credentials over plain HTTP to {realm_host}")
        try:
            if creds is not None and creds.identity_token:
                form = fields | {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "tandem",
                }
                request = self._http.build_request("POST", realm, data=form)
                basic = None
            else:
                request = self._http.build_request("GET", realm, params=fields)
                basic = (creds.username, creds.password) if creds is not None and creds.username else None
            resp = await self._http.send(request, stream=True, auth=basic)
        except httpx.RequestError as e:
            raise Unavailable(f"{host}: token service {realm_host} unreachable: {_describe(e)}") from None
        try:
            if resp.status_code in (401, 403):
                raise PermissionDenied(
                    f"{host}: token service {realm_host} refused the credentials (HTTP {resp.status_code})"
                )
            if resp.status_code != 200:
                raise Unavailable(f"{host}: token service {realm_host} answered HTTP {resp.status_code}")
            body = await _read_capped(resp, self.settings.max_token_bytes, f"token service {realm_host}: answer")
        except httpx.RequestError as e:
            raise Unavailable(f"{host}: token service {realm_host} failed: {_describe(e)}") from None
        finally:
            await resp.aclose()
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            ttl = float(answer.get("expires_in") or _DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unavailable(f"{host}: token service {realm_host} returned no token")
        return token, ttl


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
                errors.append(Unavailable(f"{ep.host}: connection failed: {_describe(e)}"))
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
            data = await _read_capped(resp, limit, f"{ep.host}: {what}")
        finally:
            await resp.aclose()
        digest = _sha256(data)
        if is_digest(tag_or_digest) and digest != tag_or_digest:
            raise DataCorruption(f"{ep.host}: {what} has digest {digest}")
        header = resp.headers.get("docker-content-digest")
        if header and header != digest:
            raise DataCorruption(f"{ep.host}: {what} has digest {digest} but the registry says {header}")
        media_type = _manifest_media_type(resp.headers.get("content-type", ""), data, ep.host, what)
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


def _hash_and_write(hasher: Any, out: IO[bytes], chunk: bytes) -> None:
    """Off the event loop: hashing and writing a megabyte both release the GIL."""
    hasher.update(chunk)
    out.write(chunk)


def _manifest_media_type(content_type: str, data: bytes, host: str, what: str) -> str:
    """The manifest's type from Content-Type, else its own mediaType field, else its shape."""
    header = content_type.split(";")[0].strip().lower()
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidArgument(f"{host}: {what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{host}: {what} is not a JSON object")
    if header in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise InvalidArgument(f"{host}: {what}: schema1 is not supported; push it again with a current tool")
    supported = INDEX_TYPES | MANIFEST_TYPES
    declared = doc.get("mediaType")
    if header in supported:
        media_type = header
    elif declared in supported:
        media_type = declared
    elif "manifests" in doc:
        media_type = OCI_INDEX
    elif "config" in doc and "layers" in doc:
        media_type = OCI_MANIFEST
    else:
        raise InvalidArgument(f"{host}: {what} has unsupported media type {header or declared!r}")
    if declared is not None and declared != media_type:
        raise InvalidArgument(f"{host}: {what} was served as {media_type} but declares {declared!r}")
    return media_type


async def _read_capped(resp: httpx.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, refused as soon as it is known to pass `limit` bytes."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ResourceExhausted(f"{what} is {length} bytes, over the {limit}-byte limit")
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ResourceExhausted(f"{what} is over the {limit}-byte limit")
    return bytes(body)


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


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _strip_url(address: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`."""
    return address.partition("://")[2].split("/")[0] if "://" in address else address.split("/")[0]


def _hostname(host: str) -> str:
    """`host:port` -> `host`; `[::1]:5000` -> `::1`."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def _canonical_host(address: str) -> str:
    host = _strip_url(address).lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host
