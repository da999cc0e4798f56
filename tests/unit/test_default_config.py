"""`tandem config default`: every key at its default, read back equal to the embedded defaults."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from core import default_config
from core.settings import Config, VmSettings, doc, parse_config
from cri.cli import main

SETTING = re.compile(r"^#(?=[^\s#])")  # "#key = ..." and "#[table]"; "# text" is documentation


def uncommented(text: str) -> str:
    return "\n".join(SETTING.sub("", line) for line in text.splitlines())


def test_every_key_uncommented_reads_back_as_the_defaults() -> None:
    text = default_config.default_config_text()
    parsed = parse_config(tomllib.loads(uncommented(text)), "printed")
    assert dataclasses.replace(parsed, source=Config().source) == Config()


def test_the_file_as_printed_is_all_comments_and_means_the_defaults() -> None:
    text = default_config.default_config_text()
    assert all(not line or line.startswith("#") for line in text.splitlines())
    assert tomllib.loads(text) == {}


def test_every_section_and_key_is_there() -> None:
    text = uncommented(default_config.default_config_text())
    data = tomllib.loads(text)
    assert set(data) >= {"runtimes", "registry", "images", "cni", "vm", "streaming", "policy", "metrics"}
    assert data["runtimes"] == {"runc": {"backend": "runc"}, "vm": {"backend": "vm"}}
    assert data["registry"]["timeout_seconds"] == 60
    assert data["cni"]["default"]["subnet"] == "10.157.0.0/24"
    assert data["metrics"] == {"address": ""}


def test_keys_whose_default_is_unset_are_described_not_set() -> None:
    text = default_config.default_config_text()
    assert "# max_vcpus: the most vCPUs a VM may have; unset: the node's CPUs" in text
    assert "max_vcpus" not in tomllib.loads(uncommented(text))["vm"]
    assert VmSettings().max_vcpus is None


def test_a_field_without_documentation_stops_the_rendering() -> None:
    @dataclasses.dataclass
    class Section:
        documented: int = dataclasses.field(default=1, metadata=doc("a key"))
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Section.forgotten has no documentation"):
        default_config._table([], "section", Section(), "")


def test_the_cli_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "default"]) == 0
    assert capsys.readouterr().out == default_config.default_config_text()
