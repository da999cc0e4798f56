"""images.store without a registry: finding images by tag, digest and ID, from the records a pull left."""

import json

import pytest

from core.errors import InvalidArgument
from core.records import RecordStore
from images.blobs import BlobStore, sha256_digest
from images.registry import RegistryClient
from images.store import ImageRecord, ImageStore
from images.unpack import UnpackLimits


def image(config: bytes, tag: str, layers: list[str]) -> ImageRecord:
    image_id = sha256_digest(config)
    return ImageRecord(
        image_id=image_id,
        repo_tags=[tag],
        repo_digests=[f"{tag.rsplit(':', 1)[0]}@sha256:{'d' * 64}"],
        manifest_digest="sha256:" + "d" * 64,
        layers=layers,
        blobs=[image_id],
        size=len(config),
        user="",
    )


@pytest.fixture
async def store(tmp_path):
    configs = [json.dumps({"config": {"Cmd": [name]}}).encode() for name in ("one", "two")]
    blobs = BlobStore(tmp_path / "images" / "blobs")
    for config in configs:
        blobs.put(config, sha256_digest(config))
    records = RecordStore(tmp_path / "images" / "records", ImageRecord)
    first = image(configs[0], "registry.test/one:1", ["sha256:" + "1" * 64])
    second = image(configs[1], "registry.test/two:latest", [])
    records.put(first)
    records.put(second)
    client = RegistryClient()
    store = ImageStore(tmp_path / "images", client, limits=UnpackLimits())
    store.load()
    yield store, first, second
    await client.close()


def test_images_are_found_by_tag_digest_and_id(store):
    images, first, second = store
    assert images.resolve("registry.test/one:1") == first
    assert images.resolve("registry.test/two") == second  # :latest is implied
    assert images.resolve(first.repo_digests[0]) == first
    assert images.resolve(first.image_id) == first
    assert images.resolve(first.image_id.removeprefix("sha256:")[:12]) == first
    assert images.resolve("registry.test/three:1") is None
    assert images.list() == [first, second]  # in the order they were pulled


def test_what_a_container_is_made_of(store, tmp_path):
    images, first, _ = store
    assert images.config_of(first) == {"config": {"Cmd": ["one"]}}
    assert images.layer_dirs(first) == [tmp_path / "images" / "layers" / "sha256" / ("1" * 64)]


def test_bad_lookups_are_refused(store):
    images, _, _ = store
    with pytest.raises(InvalidArgument, match="empty"):
        images.resolve("")
    with pytest.raises(InvalidArgument):
        images.resolve("UPPER/case:tag!")
