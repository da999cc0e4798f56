"""RegistryClient against a real docker-registry, with auth/corruption proxies in front where needed."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from core.errors import DataCorruption, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from core.settings import RegistrySettings
from images.auth import Credentials
from images.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor, select_platform
from images.reference import parse_reference
from images.registry import RegistryClient
from tests.support.authproxy import SERVICE, AuthProxy
from tests.support.images import (
    Image,
    busybox_image,
    dummy_image,
    layered_image,
    push,
    push_index,
    sha256_digest,
)
from tests.support.registry import LocalRegistry, free_port

pytestmark = pytest.mark.integration

AuthProxyFactory = Callable[..., AuthProxy]


@pytest.fixture(scope="module")
def pushed(registry: LocalRegistry) -> dict[str, Image]:
    """The images these tests pull, pushed once."""
    images = {
        "test/client-oci:v1": busybox_image(user="1000"),
        "test/client-docker:v1": busybox_image(media="docker"),
        "test/client-layered:v1": layered_image(3),
    }
    for name, image in images.items():
        repo, _, tag = name.partition(":")
        push(registry.host, repo, tag, image)
    push_index(registry.host, "test/client-multi", "oci")
    push_index(
        registry.host,
        "test/client-multi",
        "docker",
        {"linux/amd64": images["test/client-docker:v1"], "linux/arm64/v8": dummy_image(media="docker")},
    )
    return images


@pytest.fixture
def empty_mirror(authproxy: AuthProxyFactory) -> AuthProxy:
    """A mirror that has none of the images: it answers manifest requests as an empty registry does."""
    mirror = authproxy("none")
    unknown = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"Tag": "v1"}}]}
    answer = (404, {"Content-Type": "application/json"}, json.dumps(unknown).encode())
    mirror.canned["/v2/test/client-oci/manifests/v1"] = answer
    return mirror


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient(RegistrySettings(timeout=10.0)) as c:
        yield c


def layer(image: Image) -> Descriptor:
    blob = image.layers[0]
    return Descriptor(blob.media_type, blob.digest, len(blob.data))


# ---- manifests --------------------------------------------------------------------------------


async def test_manifest_by_tag_and_by_digest(client, registry, pushed) -> None:
    image = pushed["test/client-oci:v1"]
    repo = client.repository(parse_reference(f"{registry.host}/test/client-oci:v1"))
    desc, body = await repo.get_manifest("v1")
    assert body == image.manifest
    assert desc == Descriptor(OCI_MANIFEST, image.digest, len(image.manifest))
    assert await repo.get_manifest(image.digest) == (desc, body)
    assert repo.served_by == registry.host


async def test_docker_schema2_manifest(client, registry, pushed) -> None:
    repo = client.repository(parse_reference(f"{registry.host}/test/client-docker:v1"))
    desc, body = await repo.get_manifest("v1")
    assert desc.media_type == DOCKER_MANIFEST
    assert body == pushed["test/client-docker:v1"].manifest


@pytest.mark.parametrize(
    ("tag", "index_type", "amd64"),
    [("oci", OCI_INDEX, busybox_image()), ("docker", DOCKER_LIST, busybox_image(media="docker"))],
)
async def test_index_resolves_to_linux_amd64(client, registry, pushed, tag, index_type, amd64) -> None:
    repo = client.repository(parse_reference(f"{registry.host}/test/client-multi:{tag}"))
    desc, index = await repo.get_manifest(tag)
    assert desc.media_type == index_type
    chosen = select_platform(index)
    assert chosen.platform == {"os": "linux", "architecture": "amd64"}
    assert await repo.get_manifest(chosen.digest) == (
        Descriptor(amd64.manifest_type, amd64.digest, len(amd64.manifest)),
        amd64.manifest,
    )

    arm = select_platform(json.loads(index), arch="arm64", variant="v8")
    assert arm.platform == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert select_platform(index, arch="arm64") == arm  # no variant-less arm64 entry: any variant will do
    offers = r"\(it offers linux/amd64, linux/arm64/v8\)"
    with pytest.raises(NotFound, match=rf"no linux/s390x image in index {desc.digest} {offers}"):
        select_platform(index, arch="s390x")


def test_select_platform_skips_attestations_and_prefers_the_exact_variant() -> None:
    def entry(n: str, platform: dict[str, str], **annotations: str) -> dict[str, object]:
        desc = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + n * 64, "size": 1, "platform": platform}
        return desc | ({"annotations": annotations} if annotations else {})

    attestation = {"vnd.docker.reference.type": "attestation-manifest"}
    index = {
        "manifests": [
            entry("a", {"os": "linux", "architecture": "amd64"}, **attestation),
            entry("b", {"os": "linux", "architecture": "arm", "variant": "v6"}),
            entry("c", {"os": "linux", "architecture": "arm", "variant": "v7"}),
            entry("d", {"os": "linux", "architecture": "amd64"}),
        ]
    }
    assert select_platform(index).digest == "sha256:" + "d" * 64
    assert select_platform(index, arch="arm", variant="v7").digest == "sha256:" + "c" * 64
    with pytest.raises(InvalidArgument):
        select_platform(b"[]")
    with pytest.raises(InvalidArgument):
        select_platform({"manifests": [{"digest": "sha256:zz"}]})


async def test_missing_tag_and_repository_are_not_found(client, registry, pushed) -> None:
    repo = client.repository(parse_reference(f"{registry.host}/test/client-oci:nope"))
    expected = rf"{registry.host}/test/client-oci:nope: manifest nope: {registry.host}: .*MANIFEST_UNKNOWN"
    with pytest.raises(NotFound, match=expected):
        await repo.get_manifest("nope")
    repo = client.repository(parse_reference(f"{registry.host}/test/no-such-repo:v1"))
    with pytest.raises(NotFound, match=r"test/no-such-repo:v1: manifest v1: .* not found"):
        await repo.get_manifest("v1")
    with pytest.raises(InvalidArgument):
        await repo.get_manifest("../v1")


async def test_manifest_size_limit(registry, pushed, authproxy) -> None:
    ref = parse_reference(f"{registry.host}/test/client-oci:v1")
    async with RegistryClient(RegistrySettings(max_manifest_bytes=100)) as small:
        with pytest.raises(ResourceExhausted, match=r"is \d+ bytes, over the 100-byte limit"):
            await small.repository(ref).get_manifest("v1")
        # chunked: no Content-Length to go by, so the limit applies while reading
        chunked = authproxy("none", chunked=True)
        with pytest.raises(ResourceExhausted, match="is over the 100-byte limit"):
            await small.repository(parse_reference(f"{chunked.host}/test/client-oci:v1")).get_manifest("v1")


async def test_manifest_content_is_verified(client, authproxy, pushed) -> None:
    image = pushed["test/client-oci:v1"]
    proxy = authproxy("none")
    repo = client.repository(parse_reference(f"{proxy.host}/test/client-oci:v1"))
    tampered = image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')

    proxy.canned["/v2/test/client-oci/manifests/v1"] = (200, {"Content-Type": OCI_MANIFEST}, tampered)
    assert (await repo.get_manifest("v1"))[0].digest == sha256_digest(tampered)

    header = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.digest}
    proxy.canned["/v2/test/client-oci/manifests/v1"] = (200, header, tampered)
    with pytest.raises(DataCorruption, match="but the registry says"):
        await repo.get_manifest("v1")

    by_digest = f"/v2/test/client-oci/manifests/{image.digest}"
    proxy.canned[by_digest] = (200, {"Content-Type": OCI_MANIFEST}, tampered)
    with pytest.raises(DataCorruption, match=f"manifest {image.digest} has digest"):
        await repo.get_manifest(image.digest)


async def test_schema1_is_refused(client, authproxy) -> None:
    proxy = authproxy("none")
    schema1 = json.dumps({"schemaVersion": 1, "name": "test/old", "tag": "v1", "fsLayers": []}).encode()
    media = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    proxy.canned["/v2/test/old/manifests/v1"] = (200, {"Content-Type": media}, schema1)
    with pytest.raises(InvalidArgument, match="schema1 is not supported"):
        await client.repository(parse_reference(f"{proxy.host}/test/old:v1")).get_manifest("v1")


# ---- blobs --------------------------------------------------------------------------------------


async def test_blob_fetch_is_verified(client, registry, pushed, tmp_path: Path) -> None:
    image = pushed["test/client-layered:v1"]
    repo = client.repository(parse_reference(f"{registry.host}/test/client-layered:v1"))
    await repo.get_manifest("v1")
    dest = tmp_path / "blob"
    dest.write_bytes(b"x" * 10_000_000)  # stale content must be truncated away
    for blob in image.blobs:
        await repo.fetch_blob(Descriptor(blob.media_type, blob.digest, len(blob.data)), dest)
        assert dest.read_bytes() == blob.data

    wrong_size = Descriptor(OCI_MANIFEST, image.layers[0].digest, len(image.layers[0].data) - 1)
    with pytest.raises(DataCorruption, match="longer than the expected"):
        await repo.fetch_blob(wrong_size, dest)
    assert not dest.exists()
    missing = Descriptor(OCI_MANIFEST, "sha256:" + "0" * 64, 1)
    with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
        await repo.fetch_blob(missing, dest)
    assert not dest.exists()


async def test_corrupt_blob_leaves_no_file(client, authproxy, pushed, tmp_path: Path) -> None:
    image = pushed["test/client-oci:v1"]
    proxy = authproxy("corrupt")
    repo = client.repository(parse_reference(f"{proxy.host}/test/client-oci:v1"))
    await repo.get_manifest("v1")
    dest = tmp_path / "layer"
    with pytest.raises(DataCorruption, match=rf"{proxy.host}/test/client-oci:v1: blob .* has digest sha256:"):
        await repo.fetch_blob(layer(image), dest)
    assert not dest.exists()


async def test_blob_redirect_to_another_origin_drops_authorization(authproxy, pushed, tmp_path: Path) -> None:
    image = pushed["test/client-oci:v1"]
    cdn = authproxy("none")
    front = authproxy("basic", redirect_blobs_to=cdn.host)
    creds = Credentials(front.username, front.password)
    async with RegistryClient() as client:
        repo = client.repository(parse_reference(f"{front.host}/test/client-oci:v1"), creds)
        await repo.get_manifest("v1")
        await repo.fetch_blob(layer(image), tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == image.layers[0].data
    (redirected,) = cdn.requests
    assert redirected.path == f"/v2/test/client-oci/blobs/{image.layers[0].digest}"
    assert "authorization" not in redirected.headers
    assert front.requests[-1].headers["authorization"].startswith("Basic ")


# ---- endpoints ----------------------------------------------------------------------------------


async def test_mirrors_in_order_then_blobs_from_the_one_that_served(
    registry, empty_mirror, pushed, authproxy, tmp_path: Path
) -> None:
    image = pushed["test/client-oci:v1"]
    dead = f"127.0.0.1:{free_port()}"
    serving = authproxy("none")
    upstream = authproxy("none")
    settings = RegistrySettings(mirrors={upstream.host: [dead, empty_mirror.host, serving.host]})
    async with RegistryClient(settings) as client:
        repo = client.repository(parse_reference(f"{upstream.host}/test/client-oci:v1"))
        desc, _ = await repo.get_manifest("v1")
        assert desc.digest == image.digest
        assert repo.served_by == serving.host
        await repo.fetch_blob(layer(image), tmp_path / "layer")
    assert [r.path for r in serving.requests] == [
        "/v2/test/client-oci/manifests/v1",
        f"/v2/test/client-oci/blobs/{image.layers[0].digest}",
    ]
    assert upstream.requests == []
    assert [(r.method, r.path) for r in empty_mirror.requests] == [("GET", "/v2/test/client-oci/manifests/v1")]


async def test_the_most_specific_error_wins(registry, empty_mirror, pushed) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = RegistrySettings(mirrors={"example.test": [dead, empty_mirror.host]}, timeout=5.0)
    async with RegistryClient(settings) as client:
        # the upstream, example.test, does not resolve either: one 404 beats two unreachables
        repo = client.repository(parse_reference("example.test/test/client-oci:v1"))
        with pytest.raises(NotFound) as caught:
            await repo.get_manifest("v1")
        message = str(caught.value)
        assert message.startswith("example.test/test/client-oci:v1: manifest v1: ")
        assert f"{dead}: unreachable over https/http" in message
        assert f"{empty_mirror.host}: manifest v1 not found" in message
        assert "example.test: unreachable over https:" in message

        repo = client.repository(parse_reference(f"{dead}/test/client-oci:v1"))
        with pytest.raises(Unavailable, match=f"{dead}: unreachable over https/http"):
            await repo.get_manifest("v1")


@pytest.mark.parametrize("entry", ["ftp://mirror.test", "mirror.test/prefix", "mirror test", ""])
def test_bad_mirror_entries_fail_at_construction(entry: str) -> None:
    with pytest.raises(InvalidArgument, match="registry endpoint"):
        RegistryClient(RegistrySettings(mirrors={"docker.io": [entry]}))


class _Resolver(httpx.AsyncBaseTransport):
    """Sends every name to 127.0.0.1 (there is no DNS here) and records the schemes used."""

    def __init__(self) -> None:
        self.schemes: list[str] = []
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.schemes.append(request.url.scheme)
        request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("insecure", ["registry.test", "registry.test:{port}"])
async def test_insecure_host_falls_back_to_http_and_remembers(registry, pushed, insecure) -> None:
    host = f"registry.test:{registry.port}"
    ref = parse_reference(f"{host}/test/client-oci:v1")

    resolver = _Resolver()
    async with RegistryClient(RegistrySettings(timeout=5.0), transport=resolver) as client:
        with pytest.raises(Unavailable, match=f"{host}: unreachable over https: ConnectError"):
            await client.repository(ref).get_manifest("v1")
    assert resolver.schemes == ["https"]

    resolver = _Resolver()
    settings = RegistrySettings(insecure=[insecure.format(port=registry.port)], timeout=5.0)
    async with RegistryClient(settings, transport=resolver) as client:
        await client.repository(ref).get_manifest("v1")
        await client.repository(ref).get_manifest("v1")
    assert resolver.schemes == ["https", "http", "http"]


async def test_loopback_is_plain_http_without_configuration(client, registry, pushed) -> None:
    for host in (registry.host, f"localhost:{registry.port}"):
        desc, _ = await client.repository(parse_reference(f"{host}/test/client-oci:v1")).get_manifest("v1")
        assert desc.digest == pushed["test/client-oci:v1"].digest


# ---- auth ----------------------------------------------------------------------------------------


async def test_basic_auth(client, authproxy, pushed, tmp_path: Path) -> None:
    image = pushed["test/client-oci:v1"]
    proxy = authproxy("basic")
    ref = parse_reference(f"{proxy.host}/test/client-oci:v1")
    repo = client.repository(ref, Credentials(proxy.username, proxy.password, server_address=proxy.host))
    await repo.get_manifest("v1")
    await repo.fetch_blob(layer(image), tmp_path / "layer")
    statuses = [r.headers.get("authorization", "-")[:5] for r in proxy.requests]
    assert statuses == ["-", "Basic", "Basic"]  # one challenge, then the header is sent up front

    wrong = client.repository(ref, Credentials(proxy.username, "wrong-password"))
    expected = rf"{proxy.host}/test/client-oci:v1: manifest v1: {proxy.host}: .*access denied to the given credentials"
    with pytest.raises(PermissionDenied, match=expected) as caught:
        await wrong.get_manifest("v1")
    assert "wrong-password" not in str(caught.value)

    elsewhere = client.repository(ref, Credentials(proxy.username, proxy.password, server_address="other.test"))
    with pytest.raises(PermissionDenied, match="requires credentials and none apply"):
        await elsewhere.get_manifest("v1")
    with pytest.raises(PermissionDenied):
        await client.repository(ref).get_manifest("v1")


async def test_bearer_with_basic_credentials(client, authproxy, pushed, tmp_path: Path) -> None:
    image = pushed["test/client-oci:v1"]
    proxy = authproxy("bearer")
    ref = parse_reference(f"{proxy.host}/test/client-oci:v1")
    repo = client.repository(ref, Credentials(proxy.username, proxy.password))
    await repo.get_manifest("v1")
    await repo.fetch_blob(layer(image), tmp_path / "layer")
    await client.repository(ref, Credentials(proxy.username, proxy.password)).get_manifest("v1")

    (token_request,) = proxy.token_requests()  # the token is cached and reused
    assert token_request.method == "GET"
    assert token_request.query == {"service": SERVICE, "scope": "repository:test/client-oci:pull"}
    pair = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
    assert token_request.headers["authorization"] == f"Basic {pair}"
    assert all(r.headers.get("authorization", "").startswith("Bearer ") for r in proxy.registry_requests()[1:])

    # a different credential set never reuses that token, and anonymous pulls are refused
    with pytest.raises(PermissionDenied, match=f"token service {proxy.host} refused the credentials"):
        await client.repository(ref).get_manifest("v1")


async def test_bearer_with_identity_token(client, authproxy, pushed) -> None:
    proxy = authproxy("bearer")
    ref = parse_reference(f"{proxy.host}/test/client-oci:v1")
    creds = Credentials.from_cri(identity_token=proxy.refresh_token, server_address=f"http://{proxy.host}/")
    desc, _ = await client.repository(ref, creds).get_manifest("v1")
    assert desc.digest == pushed["test/client-oci:v1"].digest
    (token_request,) = proxy.token_requests()
    assert token_request.method == "POST"
    assert token_request.form == {
        "grant_type": "refresh_token",
        "refresh_token": proxy.refresh_token,
        "service": SERVICE,
        "scope": "repository:test/client-oci:pull",
        "client_id": "tandem",
    }

    bad = Credentials.from_cri(identity_token="stale")
    with pytest.raises(PermissionDenied) as caught:
        await client.repository(ref, bad).get_manifest("v1")
    assert "stale" not in str(caught.value)


async def test_registry_token_is_used_as_the_bearer_token(client, authproxy, pushed) -> None:
    proxy = authproxy("bearer")
    token = proxy.issue_token()
    ref = parse_reference(f"{proxy.host}/test/client-oci:v1")
    await client.repository(ref, Credentials.from_cri(registry_token=token)).get_manifest("v1")
    assert proxy.token_requests() == []
    assert proxy.registry_requests()[-1].headers["authorization"] == f"Bearer {token}"

    with pytest.raises(PermissionDenied):
        await client.repository(ref, Credentials.from_cri(registry_token="forged")).get_manifest("v1")


@pytest.mark.parametrize("chunked", [False, True])
async def test_token_answers_are_size_limited(client, authproxy, pushed, chunked) -> None:
    limit = RegistrySettings().max_token_bytes
    proxy = authproxy("bearer", token_padding=limit, chunked=chunked)
    repo = client.repository(parse_reference(f"{proxy.host}/test/client-oci:v1"), Credentials("tandem", "pull-secret"))
    with pytest.raises(ResourceExhausted, match=f"token service {proxy.host}: answer is .*over the {limit}-byte limit"):
        await repo.get_manifest("v1")
    proxy.token_padding = limit // 2  # a large answer within the limit still works
    await repo.get_manifest("v1")


async def test_credentials_never_go_to_a_plain_http_realm(client, authproxy) -> None:
    proxy = authproxy("none")
    challenge = {"WWW-Authenticate": 'Bearer realm="http://auth.example.test/token",service="x"'}
    proxy.canned["/v2/test/client-oci/manifests/v1"] = (401, challenge, b"")
    repo = client.repository(parse_reference(f"{proxy.host}/test/client-oci:v1"), Credentials("u", "p"))
    with pytest.raises(PermissionDenied, match=r"over plain HTTP to auth\.example\.test"):
        await repo.get_manifest("v1")


async def test_expired_token_is_renewed_once(client, authproxy, pushed) -> None:
    proxy = authproxy("bearer")
    ref = parse_reference(f"{proxy.host}/test/client-oci:v1")
    creds = Credentials(proxy.username, proxy.password)
    await client.repository(ref, creds).get_manifest("v1")
    proxy.tokens.clear()  # the registry forgets every token it issued
    await client.repository(ref, creds).get_manifest("v1")
    assert len(proxy.token_requests()) == 2
