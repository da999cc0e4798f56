from pathlib import Path

import pytest

from cri.config import Config, ConfigError, load_config, parse_config


def test_embedded_defaults_work_on_a_fresh_host():
    config = Config()
    assert config.default_workload_trust == "trusted"
    assert config.socket == Path("/run/tandem/tandem.sock")
    assert config.state_dir == Path("/var/lib/tandem")
    assert {n: h.backend for n, h in config.runtimes.items()} == {"runc": "runc", "vm": "vm"}
    assert config.registry.mirrors == {}


def test_contract_names_from_the_design_parse():
    config = parse_config(
        {
            "default_workload_trust": "untrusted",
            "runtimes": {"kata": {"backend": "vm", "memory_mib": 256}, "runc": {"backend": "runc"}},
            "registry": {"insecure": ["localhost:5000"], "mirrors": {"registry.k8s.io": ["localhost:5000"]}},
        }
    )
    assert config.default_workload_trust == "untrusted"
    assert config.runtimes["kata"].backend == "vm"
    assert config.runtimes["kata"].options == {"memory_mib": 256}
    assert config.runtimes["vm"].backend == "vm"  # defaults stay unless overridden
    assert config.registry.insecure == ["localhost:5000"]
    assert config.registry.mirrors == {"registry.k8s.io": ["localhost:5000"]}


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"default_workload_trust": "maybe"}, "default_workload_trust", "must be one of trusted, untrusted"),
        ({"runtimes": {"x": {"backend": "docker"}}}, "runtimes.x.backend", "must be one of runc, vm"),
        ({"runtimes": {"x": {}}}, "runtimes.x.backend", "must be one of"),
        ({"registry": {"insecure": "localhost"}}, "registry.insecure", "must be a list"),
        ({"registry": {"mirrors": {"docker.io": [""]}}}, "registry.mirrors.docker.io", "non-empty strings"),
        ({"registry": {"mirror": {}}}, "registry.mirror", "unknown key"),
        ({"state_dir": "relative/dir"}, "state_dir", "absolute path"),
        ({"images": {"max_layers": 0}}, "images.max_layers", "must be positive"),
        ({"images": {"max_layers": True}}, "images.max_layers", "must be a int"),
        ({"sockett": "/x"}, "sockett", "unknown key"),
    ],
)
def test_bad_keys_are_named_with_a_reason(data, key, reason):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.toml")
    assert f"key '{key}'" in str(err.value)
    assert reason in str(err.value)
    assert "test.toml" in str(err.value)


def test_load_config_reports_toml_syntax_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("default_workload_trust = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "tandem.toml"
    path.write_text('[registry.mirrors]\n"registry.k8s.io" = ["localhost:5000"]\n')
    config = load_config(path)
    assert config.registry.mirrors == {"registry.k8s.io": ["localhost:5000"]}
    assert config.source == str(path)
