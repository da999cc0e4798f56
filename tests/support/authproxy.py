"""A recording reverse proxy in front of a LocalRegistry that adds auth, corruption or redirects.

docker-registry itself can only do htpasswd or certificate-based token auth; this
proxy gives tests Basic and Bearer (with a token endpoint) on plain loopback HTTP,
and can misbehave on purpose. Every request it sees is recorded.

Modes:
  none     forward everything (record only)
  basic    /v2/ needs Basic USERNAME:PASSWORD
  bearer   /v2/ needs a token from /token (Basic creds on GET, or refresh_token POST)
  corrupt  forward, but flip one byte of every blob body
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import httpx

Mode = Literal["none", "basic", "bearer", "corrupt"]

SERVICE = "tandem-test"
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:[a-f0-9]{64}$")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # with its query string
    headers: dict[str, str]  # lowercased names
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        """The body as a urlencoded form (token POSTs)."""
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}


class AuthProxy:
    """Listens on 127.0.0.1:<free port> and forwards to `upstream` (a host:port speaking HTTP)."""

    def __init__(
        self,
        upstream: str,
        mode: Mode = "none",
        *,
        username: str = "tandem",
        password: str = "pull-secret",
        refresh_token: str = "refresh-me",
        token_ttl: int = 300,
        chunked: bool = False,
        redirect_blobs_to: str | None = None,
        token_padding: int = 0,
    ) -> None:
        self.upstream = upstream
        self.mode = mode
        self.username = username
        self.password = password
        self.refresh_token = refresh_token
        self.token_ttl = token_ttl
        self.chunked = chunked  # send bodies chunked, without Content-Length
        self.redirect_blobs_to = redirect_blobs_to  # answer blob GETs with a 307 to this host:port
        self.token_padding = token_padding  # bytes of filler in every token answer (a hostile token service)
        self.requests: list[Recorded] = []
        self.tokens: set[str] = set()
        # path -> (status, headers, body), served after the auth check instead of forwarding
        self.canned: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self._http = httpx.Client(base_url=f"http://{upstream}", timeout=60.0)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.block_on_close = False
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"authproxy {self.host}", daemon=True
        )
        self._thread.start()

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(16)
        self.tokens.add(token)
        return token

    def registry_requests(self) -> list[Recorded]:
        """Requests to the registry API (not the token endpoint)."""
        return [r for r in self.requests if r.path.startswith("/v2/")]

    def token_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/token")]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> AuthProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _handler_for(proxy: AuthProxy) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"proxy": proxy})


class _Handler(BaseHTTPRequestHandler):
    proxy: AuthProxy
    protocol_version = "HTTP/1.1"
    timeout = 30

    def handle(self) -> None:
        # A TLS ClientHello (first byte 0x16) would block readline() forever; hang up so the
        # client sees a TLS failure and falls back to plain HTTP, as with a real HTTP registry.
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first and first != b"\x16":
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read `proxy.requests` instead."""

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.proxy.requests.append(Recorded(self.command, self.path, headers, body))
        path = urlsplit(self.path).path
        if path == "/token":
            self._token(headers, body)
            return
        if not self._authorized(headers.get("authorization", "")):
            self._challenge(path)
            return
        if path in self.proxy.canned:
            status, canned_headers, canned_body = self.proxy.canned[path]
            self._reply(status, canned_headers, canned_body)
            return
        if self.proxy.redirect_blobs_to and self.command == "GET" and _BLOB_PATH.match(path):
            self._reply(307, {"Location": f"http://{self.proxy.redirect_blobs_to}{self.path}"}, b"")
            return
        self._forward(headers, body, path)

    def _authorized(self, authorization: str) -> bool:
        proxy = self.proxy
        if proxy.mode == "basic":
            pair = f"{proxy.username}:{proxy.password}".encode()
            return authorization == f"Basic {base64.b64encode(pair).decode()}"
        if proxy.mode == "bearer":
            scheme, _, token = authorization.partition(" ")
            return scheme == "Bearer" and token in proxy.tokens
        return True

    def _challenge(self, path: str) -> None:
        if self.proxy.mode == "basic":
            challenge = f'Basic realm="{SERVICE}"'
        else:
            challenge = f'Bearer realm="{self.proxy.url}/token",service="{SERVICE}"'
            if m := _REPO_PATH.match(path):
                challenge += f',scope="repository:{m.group(1)}:pull"'
        body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        self._reply(401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, _json(body))

    def _token(self, headers: dict[str, str], body: bytes) -> None:
        """GET with Basic creds answers {"token"}; a refresh_token POST answers {"access_token"}."""
        proxy = self.proxy
        if self.command == "POST":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            ok = form.get("grant_type") == "refresh_token" and form.get("refresh_token") == proxy.refresh_token
            key = "access_token"
        else:
            pair = f"{proxy.username}:{proxy.password}".encode()
            ok = headers.get("authorization") == f"Basic {base64.b64encode(pair).decode()}"
            key = "token"
        if not ok:
            self._reply(401, {"Content-Type": "application/json"}, _json({"details": "bad credentials"}))
            return
        answer: dict[str, object] = {key: proxy.issue_token(), "expires_in": proxy.token_ttl}
        if proxy.token_padding:
            answer["padding"] = "x" * proxy.token_padding
        self._reply(200, {"Content-Type": "application/json"}, _json(answer))

    def _forward(self, headers: dict[str, str], body: bytes, path: str) -> None:
        # Keep Host so the registry's Location URLs point back here; ask for raw bytes.
        upstream_headers = {k: v for k, v in headers.items() if k not in ("authorization", "accept-encoding")}
        resp = self.proxy._http.request(self.command, self.path, headers=upstream_headers, content=body)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
        content = resp.content
        if self.proxy.mode == "corrupt" and self.command == "GET" and resp.status_code == 200:
            if _BLOB_PATH.match(path) and content:
                middle = len(content) // 2
                content = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]
        if self.command == "HEAD":
            out_headers["Content-Length"] = resp.headers.get("content-length", "0")
            self._reply(resp.status_code, out_headers, b"", head=True)
        else:
            self._reply(resp.status_code, out_headers, content)

    def _reply(self, status: int, headers: dict[str, str], body: bytes, head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if head:
            self.end_headers()
        elif self.proxy.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if body:
                self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()
