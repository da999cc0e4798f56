from __future__ import annotations

import base64

import pytest

from core.errors import InvalidArgument
from images.auth import Challenge, Credentials, parse_www_authenticate


def test_bearer_challenge_with_quoted_commas() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert parse_www_authenticate(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull,push",
            },
        )
    ]


def test_basic_challenge_and_case_insensitive_names() -> None:
    assert parse_www_authenticate('BASIC Realm="Registry Realm"') == [Challenge("basic", {"realm": "Registry Realm"})]


def test_several_challenges_in_one_header_and_across_headers() -> None:
    challenges = parse_www_authenticate(['Bearer realm="http://a/token", service=reg , Basic realm="x,y"', "Negotiate"])
    assert challenges == [
        Challenge("bearer", {"realm": "http://a/token", "service": "reg"}),
        Challenge("basic", {"realm": "x,y"}),
        Challenge("negotiate", {}),
    ]


def test_escapes_token68_and_garbage() -> None:
    assert parse_www_authenticate(r'Bearer realm="a\"b\\c"') == [Challenge("bearer", {"realm": 'a"b\\c'})]
    assert parse_www_authenticate("Basic dXNlcjpwYXNz==, Bearer realm=r") == [
        Challenge("basic", {}),
        Challenge("bearer", {"realm": "r"}),
    ]
    assert parse_www_authenticate("") == []
    assert parse_www_authenticate('"unterminated') == []


def test_from_cri_decodes_auth() -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    creds = Credentials.from_cri(auth_b64=auth, server_address="quay.io")
    assert (creds.username, creds.password, creds.server_address) == ("alice", "pa:ss", "quay.io")
    unpadded = base64.b64encode(b"bob:pw").decode().rstrip("=")
    assert Credentials.from_cri(auth_b64=unpadded).username == "bob"


def test_from_cri_prefers_explicit_username() -> None:
    auth = base64.b64encode(b"alice:secret").decode()
    creds = Credentials.from_cri(username="bob", password="pw", auth_b64=auth)
    assert (creds.username, creds.password) == ("bob", "pw")


def test_from_cri_keeps_tokens() -> None:
    creds = Credentials.from_cri(identity_token="id-tok", registry_token="reg-tok")
    assert (creds.identity_token, creds.registry_token) == ("id-tok", "reg-tok")


@pytest.mark.parametrize("auth", ["%%%notbase64", base64.b64encode(b"no-colon").decode(), "//79"])
def test_from_cri_rejects_bad_auth(auth: str) -> None:
    with pytest.raises(InvalidArgument):
        Credentials.from_cri(auth_b64=auth)


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Credentials("alice", "hunter2", "id-tok", "reg-tok", "quay.io"))
    assert "alice" in text
    assert "hunter2" not in text and "id-tok" not in text and "reg-tok" not in text


@pytest.mark.parametrize(
    ("server_address", "host", "applies"),
    [
        ("", "anything.example:5000", True),
        ("quay.io", "quay.io", True),
        ("https://quay.io/v2/", "quay.io", True),
        ("Quay.IO", "quay.io", True),
        ("quay.io", "evil.example", False),
        ("quay.io", "quay.io.evil.example", False),
        ("localhost:5000", "localhost:5000", True),
        ("localhost:5000", "localhost:5001", False),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", True),
        ("https://index.docker.io/v1/", "registry-1.docker.io", True),
        ("docker.io", "registry-1.docker.io", True),
        ("docker.io", "mirror.example", False),
    ],
)
def test_credentials_apply_only_to_their_host(server_address: str, host: str, applies: bool) -> None:
    assert Credentials("u", "p", server_address=server_address).applies_to(host) is applies


def test_fingerprint_tells_credential_sets_apart() -> None:
    assert Credentials("u", "p").fingerprint() == Credentials("u", "p", server_address="x").fingerprint()
    assert Credentials("u", "p").fingerprint() != Credentials("u", "q").fingerprint()
    assert Credentials("u", "p").fingerprint() != Credentials(registry_token="p").fingerprint()
