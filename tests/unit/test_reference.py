from __future__ import annotations

import pytest

from core.errors import InvalidArgument
from images.reference import Reference, is_digest, is_registry_host, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None),
        ("127.0.0.1:5000/a", "127.0.0.1:5000", "a", "latest", None),
        ("[::1]:5000/a:x", "[::1]:5000", "a", "x", None),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None),
        ("Registry.Example.com/x", "Registry.Example.com", "x", "latest", None),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
        (f"quay.io/a/b:tag@{DIGEST}", "quay.io", "a/b", "tag", DIGEST),
        ("a/b__c/d-e.f_g--h:T_1.x-y", "docker.io", "a/b__c/d-e.f_g--h", "T_1.x-y", None),
    ],
)
def test_parse(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    assert parse_reference(text) == Reference(domain, path, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Busybox",
        "docker.io/Library/busybox",
        "busybox:",
        "busybox:-bad",
        "busybox:a/b",
        "busybox:" + "x" * 129,
        "busybox@sha256:abc",
        "busybox@sha256:" + "AB" * 32,
        "busybox@md5:" + "ab" * 16,
        "busybox@",
        "docker.io/",
        "a//b",
        "a/b/",
        "-a/b",
        "a_/b",
        "a...b",
        "exa_mple.com/a",
        "ab" * 32,
        "busybox latest",
        "example.com/" + "a" * 250,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("localhost:5000/a/b:t", "localhost:5000/a/b:t"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"busybox:1@{DIGEST}", f"docker.io/library/busybox:1@{DIGEST}"),
    ],
)
def test_str_is_canonical_and_round_trips(text: str, canonical: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert parse_reference(canonical) == ref


def test_name_target_and_helpers() -> None:
    ref = parse_reference(f"quay.io/a/b:tag@{DIGEST}")
    assert ref.name == "quay.io/a/b"
    assert ref.target == DIGEST
    assert str(ref.with_tag("v2")) == "quay.io/a/b:v2"
    assert ref.with_tag("v2").target == "v2"
    assert str(ref.with_digest("sha256:" + "cd" * 32)) == "quay.io/a/b@sha256:" + "cd" * 32
    with pytest.raises(InvalidArgument):
        ref.with_tag("bad/tag")
    with pytest.raises(InvalidArgument):
        ref.with_digest("sha256:nothex")


def test_is_digest() -> None:
    assert is_digest(DIGEST)
    assert not is_digest("sha256:" + "ab" * 31)
    assert not is_digest("sha512:" + "ab" * 64)
    assert not is_digest("latest")


@pytest.mark.parametrize(
    ("host", "valid"),
    [("quay.io", True), ("localhost:5000", True), ("[::1]:5000", True), ("a b", False), ("a/b", False), ("", False)],
)
def test_is_registry_host(host: str, valid: bool) -> None:
    assert is_registry_host(host) is valid
