"""Registry authentication: pull credentials, WWW-Authenticate challenges, and answering them.

Credentials come from a CRI request and are secrets: they stay out of repr(),
are offered only to the registry they name, and never cross plain HTTP to a
token service that is not allowed plain HTTP. Answers (bearer tokens, basic
auth) are cached per host, scope and credential set until they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from core.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from images.reference import canonical_host, host_of

_DEFAULT_TOKEN_TTL = 60.0


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
        return not self.server_address or canonical_host(self.server_address) == canonical_host(host)

    def fingerprint(self) -> str:
        """Tells credential sets apart in caches, so one pull never reuses another's token."""
        joined = "\0".join([self.username, self.password, self.identity_token, self.registry_token])
        return hashlib.sha256(joined.encode()).hexdigest()


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


def describe_error(error: Exception) -> str:
    """An exception for a message: its type, and its text when it has one (httpx's often have none)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def read_capped(resp: httpx.Response, limit: int, what: str) -> bytes:
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


class Authorizer:
    """Answers a registry's challenges with an Authorization value, remembered until it expires."""

    def __init__(
        self, http: httpx.AsyncClient, plain_http_allowed: Callable[[str], bool], max_token_bytes: int
    ) -> None:
        self._http = http
        self._plain_http_allowed = plain_http_allowed
        self._max_token_bytes = max_token_bytes
        self._answers: dict[tuple[str, str, str], tuple[str, float]] = {}

    @staticmethod
    def _key(host: str, scope: str, creds: Credentials | None) -> tuple[str, str, str]:
        return host, scope, creds.fingerprint() if creds else ""

    def cached(self, host: str, scope: str, creds: Credentials | None) -> str | None:
        """The Authorization value that worked for this host, scope and credentials, if still good."""
        answer = self._answers.get(self._key(host, scope, creds))
        return answer[0] if answer and answer[1] > time.monotonic() else None

    def forget(self, host: str, scope: str, creds: Credentials | None) -> None:
        """The registry refused the cached answer: the next request starts over."""
        self._answers.pop(self._key(host, scope, creds), None)

    async def answer(self, host: str, challenges: list[Challenge], scope: str, creds: Credentials | None) -> str:
        """Answer a 401's challenges (fetching a token if need be) and remember the answer."""
        key = self._key(host, scope, creds)
        self._answers.pop(key, None)
        authorization, ttl = await self._authorize(host, challenges, scope, creds)
        now = time.monotonic()
        self._answers = {k: v for k, v in self._answers.items() if v[1] > now}
        self._answers[key] = (authorization, now + ttl)
        return authorization

    async def _authorize(
        self, host: str, challenges: list[Challenge], scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        """The Authorization value to send and how long it stays good."""
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
        realm_host = host_of(realm)
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
            raise Unavailable(f"{host}: token service {realm_host} unreachable: {describe_error(e)}") from None
        try:
            if resp.status_code in (401, 403):
                raise PermissionDenied(
                    f"{host}: token service {realm_host} refused the credentials (HTTP {resp.status_code})"
                )
            if resp.status_code != 200:
                raise Unavailable(f"{host}: token service {realm_host} answered HTTP {resp.status_code}")
            body = await read_capped(resp, self._max_token_bytes, f"token service {realm_host}: answer")
        except httpx.RequestError as e:
            raise Unavailable(f"{host}: token service {realm_host} failed: {describe_error(e)}") from None
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
