import json

import pytest

from core.errors import InvalidArgument, ResourceExhausted
from images.manifest import OCI_MANIFEST, parse_config, parse_manifest, user_of

D = "sha256:" + "a" * 64
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": 10}
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 100}


def manifest(**over):
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CONFIG, "layers": [LAYER]}
    doc.update(over)
    return json.dumps(doc).encode()


def test_a_good_manifest_parses():
    m = parse_manifest(manifest(), max_layers=10)
    assert m.config.digest == D and [layer.size for layer in m.layers] == [10]


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        manifest(schemaVersion=1),
        manifest(layers="nope"),
        manifest(config={"mediaType": "application/x", "digest": D, "size": 1}),
        manifest(layers=[{**LAYER, "digest": "md5:abc"}]),
        manifest(layers=[{**LAYER, "size": -1}]),
        manifest(layers=[{**LAYER, "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}]),
    ],
)
def test_bad_manifests_are_refused(doc):
    with pytest.raises(InvalidArgument):
        parse_manifest(doc, max_layers=10)


def test_layer_count_and_config_size_are_limited():
    with pytest.raises(ResourceExhausted):
        parse_manifest(manifest(layers=[LAYER] * 11), max_layers=10)
    with pytest.raises(ResourceExhausted):
        parse_manifest(manifest(config={**CONFIG, "size": 2**30}), max_layers=10)


def test_config_diff_ids_must_match_layers():
    good = json.dumps({"rootfs": {"type": "layers", "diff_ids": [D]}, "config": {"User": "1000:1000"}}).encode()
    config = parse_config(good, 1)
    assert config.diff_ids == [D] and config.user == "1000:1000"
    with pytest.raises(InvalidArgument, match="1 diff_ids for 2 layers"):
        parse_config(good, 2)
    with pytest.raises(InvalidArgument):
        parse_config(json.dumps({"rootfs": {"diff_ids": ["sha256:short"]}}).encode(), 1)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (None, "")),
        ("1000", (1000, "")),
        ("1000:50", (1000, "")),
        ("nobody", (None, "nobody")),
        ("www:www", (None, "www")),
        ("0", (0, "")),
    ],
)
def test_user_of_matches_containerd(user, expected):
    assert user_of(user) == expected
