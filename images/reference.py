"""Image references, parsed and normalized the way Docker and containerd do it.

Kubelet hands us whatever the pod spec says (`busybox`, `registry.k8s.io/pause:3.9`,
`name@sha256:...`); the runtime must agree with every other runtime on what that
names, or image IDs, repo tags and pull decisions drift apart between nodes.
The grammar follows github.com/distribution/reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from core.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_MAX_NAME = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_ANONYMOUS_ID_RE = re.compile(r"[a-f0-9]{64}")


def is_digest(s: str) -> bool:
    """True for `sha256:<64 lowercase hex>`, the only digest form Tandem can verify."""
    return _DIGEST_RE.fullmatch(s) is not None


def is_tag(s: str) -> bool:
    return _TAG_RE.fullmatch(s) is not None


def is_registry_host(s: str) -> bool:
    """`host`, `host:port` or `[v6]:port`, as the first component of a reference may be."""
    return _DOMAIN_RE.fullmatch(s) is not None


@dataclass(frozen=True)
class Reference:
    """A normalized reference; `digest`, when set, is what gets pulled."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`domain/path`: the repository, as used for repo tags and repo digests."""
        return f"{self.domain}/{self.path}"

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        """`name:tag` (no digest), e.g. for a repo tag."""
        if not is_tag(tag):
            raise InvalidArgument(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        """`name@digest` (no tag), e.g. for a repo digest."""
        if not is_digest(digest):
            raise InvalidArgument(f"invalid digest {digest!r}")
        return replace(self, tag=None, digest=digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def parse_reference(s: str) -> Reference:
    """Parse and normalize `s`; a bare name gets `docker.io/library/` and `:latest`."""
    if not s:
        raise InvalidArgument("image reference is empty")
    if _ANONYMOUS_ID_RE.fullmatch(s):
        raise InvalidArgument(f"invalid reference {s!r}: a 64-hex image ID is not a repository name")
    rest, at, digest = s.partition("@")
    if at and not is_digest(digest):
        raise InvalidArgument(f"invalid reference {s!r}: digest must be sha256:<64 lowercase hex>")
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):  # a colon before the last slash is a port, not a tag
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not is_tag(tag):
            raise InvalidArgument(f"invalid reference {s!r}: bad tag {tag!r}")
    domain, path = _split_domain(rest)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"invalid reference {s!r}: bad registry host {domain!r}")
    if path.lower() != path:
        raise InvalidArgument(f"invalid reference {s!r}: repository name must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise InvalidArgument(f"invalid reference {s!r}: bad repository name {path!r}")
    if len(domain) + 1 + len(path) > _MAX_NAME:
        raise InvalidArgument(f"invalid reference {s!r}: name longer than {_MAX_NAME} characters")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest if at else None)


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a host only if it looks like one."""
    first, slash, remainder = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, remainder
    if domain == _LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return domain, path


# ---- registry hosts ---------------------------------------------------------------------------

DOCKER_HUB_ALIASES = frozenset({DEFAULT_DOMAIN, _LEGACY_DOMAIN, "registry-1.docker.io"})


def host_of(address: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`: the host of a server address, URL or not."""
    return address.partition("://")[2].split("/")[0] if "://" in address else address.split("/")[0]


def hostname(host: str) -> str:
    """`host:port` -> `host`; `[::1]:5000` -> `::1` (lowercased)."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def canonical_host(address: str) -> str:
    """The registry a server address names, with Docker Hub's aliases folded into `docker.io`."""
    host = host_of(address).lower()
    return DEFAULT_DOMAIN if host in DOCKER_HUB_ALIASES else host
