from pathlib import Path

import pytest

from core.settings import Config, ConfigError, StreamingSettings, load_config, parse_config


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
        ({"streaming": {"address": "localhost"}}, "streaming.address", "must be an IP address"),
        ({"streaming": {"port": 70000}}, "streaming.port", "0 (any free port) to 65535"),
        ({"streaming": {"port": "80"}}, "streaming.port", "must be a int"),
        ({"streaming": {"token_ttl_seconds": 0}}, "streaming.token_ttl_seconds", "must be positive"),
        ({"streaming": {"tls": True}}, "streaming.tls", "unknown key"),
        ({"cni": {"default": {"bridge": "a-very-long-bridge"}}}, "cni.default.bridge", "1-15 bytes"),
        ({"cni": {"default": {"bridge": "br/0"}}}, "cni.default.bridge", "interface name"),
        ({"cni": {"default": {"subnet": "10.157.0.1/24"}}}, "cni.default.subnet", "host bits set"),
        ({"cni": {"default": {"subnet": "fd00::/64"}}}, "cni.default.subnet", "IPv4 network"),
        ({"cni": {"default": {"subnet": "10.157.0.0/30"}}}, "cni.default.subnet", "/29 or larger"),
        ({"cni": {"default": {"masquerade": "no"}}}, "cni.default.masquerade", "must be a bool"),
        ({"cni": {"default": {"mtu": 1500}}}, "cni.default.mtu", "unknown key"),
        ({"policy": {"host_pods_on_untrusted_node": "vm"}}, "policy.host_pods_on_untrusted_node", "runc, refuse"),
        ({"policy": {"host_pods": "runc"}}, "policy.host_pods", "unknown key"),
        ({"logs": {"max_size_bytes": 0}}, "logs.max_size_bytes", "must be positive"),
        ({"logs": {"max_size_bytes": "1M"}}, "logs.max_size_bytes", "must be a int"),
        ({"logs": {"max_files": 5}}, "logs.max_files", "unknown key"),
    ],
)
def test_bad_keys_are_named_with_a_reason(data, key, reason):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.toml")
    assert f"key '{key}'" in str(err.value)
    assert reason in str(err.value)
    assert "test.toml" in str(err.value)


def test_host_pods_on_an_untrusted_node_are_refused_unless_configured():
    assert Config().policy.host_pods_on_untrusted_node == "refuse"
    config = parse_config({"policy": {"host_pods_on_untrusted_node": "runc"}})
    assert config.policy.host_pods_on_untrusted_node == "runc"


def test_streaming_defaults_to_loopback_on_any_free_port():
    assert Config().streaming == StreamingSettings(address="127.0.0.1", port=0, token_ttl_seconds=60)
    config = parse_config({"streaming": {"address": "::1", "port": 10010, "token_ttl_seconds": 30}})
    assert config.streaming == StreamingSettings(address="::1", port=10010, token_ttl_seconds=30)


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


def test_vm_section_defaults_and_overrides():
    assert Config().vm.accel == "auto"
    assert (Config().vm.default_vcpus, Config().vm.default_memory_mib) == (1, 256)
    vm = parse_config(
        {"vm": {"accel": "tcg", "default_vcpus": 2, "default_memory_mib": 512, "boot_timeout_seconds": 12.5}}
    ).vm
    assert (vm.accel, vm.default_vcpus, vm.default_memory_mib, vm.boot_timeout_seconds) == ("tcg", 2, 512, 12.5)
    assert vm.qemu == Path("/usr/bin/qemu-system-x86_64")


def test_the_tcg_cache_is_24_mib_unless_the_operator_trades_memory_for_start_time():
    assert Config().vm.tcg_cache_mib == 24
    assert parse_config({"vm": {"tcg_cache_mib": 64}}).vm.tcg_cache_mib == 64


def test_vm_caps_and_jail_defaults_and_overrides():
    vm = Config().vm
    assert (vm.max_vcpus, vm.max_memory_mib) == (None, None)  # derived from the node by the VM backend
    assert (vm.jail, vm.jail_uid_first, vm.jail_uid_count) == (True, 0x70000000, 65536)
    table = {"max_vcpus": 4, "max_memory_mib": 8192, "jail": False, "jail_uid_first": 200000, "jail_uid_count": 100}
    vm = parse_config({"vm": table}).vm
    assert (vm.max_vcpus, vm.max_memory_mib, vm.jail, vm.jail_uid_first, vm.jail_uid_count) == (
        4, 8192, False, 200000, 100
    )  # fmt: skip


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"accel": "hvf"}, "vm.accel", "must be one of auto, kvm, tcg"),
        ({"default_vcpus": 0}, "vm.default_vcpus", "must be positive"),
        ({"default_memory_mib": 64}, "vm.default_memory_mib", "at least 128"),
        ({"boot_timeout_seconds": 0}, "vm.boot_timeout_seconds", "must be positive"),
        ({"qemu": "qemu-system-x86_64"}, "vm.qemu", "absolute path"),
        ({"vcpus": 2}, "vm.vcpus", "unknown key"),
        ({"max_vcpus": 0}, "vm.max_vcpus", "must be positive"),
        ({"max_vcpus": 1, "default_vcpus": 2}, "vm.max_vcpus", "at least default_vcpus (2)"),
        ({"max_memory_mib": 200}, "vm.max_memory_mib", "at least default_memory_mib (256)"),
        ({"jail": "yes"}, "vm.jail", "must be a bool"),
        ({"jail_uid_first": 0}, "vm.jail_uid_first", "must be positive"),
        ({"jail_uid_first": 2**31 - 10}, "vm.jail_uid_count", "at or below 2**31"),
        ({"tcg_cache_mib": 8}, "vm.tcg_cache_mib", "must be 16 to 128, got 8"),
        ({"tcg_cache_mib": 256}, "vm.tcg_cache_mib", "must be 16 to 128, got 256"),
        ({"tcg_cache_mib": "64M"}, "vm.tcg_cache_mib", "must be a int"),
    ],
)
def test_bad_vm_keys_are_named(table, key, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({"vm": table}, "test.toml")
    assert f"key '{key}'" in str(err.value) and reason in str(err.value)


def test_the_default_network_is_settable_for_tests_and_nodes():
    defaults = Config().cni.default
    assert (defaults.bridge, defaults.subnet, defaults.masquerade) == ("tandem0", "10.157.0.0/24", True)
    config = parse_config({"cni": {"default": {"bridge": "tdt0", "subnet": "10.199.7.0/24", "masquerade": False}}})
    assert (config.cni.default.bridge, config.cni.default.subnet, config.cni.default.masquerade) == (
        "tdt0",
        "10.199.7.0/24",
        False,
    )
    assert config.cni.conf_dir == Config().cni.conf_dir


def test_one_log_cap_for_both_backends():
    assert Config().logs.max_size_bytes == 64 * 2**20  # above kubelet's 10 MiB rotation size
    config = parse_config({"logs": {"max_size_bytes": 2**20}})
    assert config.runc_backend().log_size_max == config.vm_backend().log_size_max == 2**20


def test_metrics_are_off_unless_an_address_is_set():
    assert Config().metrics.address == ""
    assert parse_config({"metrics": {"address": "127.0.0.1:9090"}}).metrics.address == "127.0.0.1:9090"
    assert parse_config({"metrics": {"address": "[::1]:0"}}).metrics.address == "[::1]:0"


@pytest.mark.parametrize("address", ["localhost:9090", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":9090"])
def test_a_bad_metrics_address_is_named(address):
    with pytest.raises(ConfigError, match=r"key 'metrics.address': must be \"IP:PORT\""):
        parse_config({"metrics": {"address": address}})


def test_vm_memory_headroom_is_off_by_default_and_never_negative():
    assert Config().vm.memory_headroom_mib == 0
    assert parse_config({"vm": {"memory_headroom_mib": 512}}).vm.memory_headroom_mib == 512
    with pytest.raises(ConfigError, match=r"key 'vm.memory_headroom_mib': cannot be negative"):
        parse_config({"vm": {"memory_headroom_mib": -1}})


def test_the_default_network_can_be_turned_off():
    assert parse_config({}).cni.default.enabled is True
    assert parse_config({"cni": {"default": {"enabled": False}}}).cni.default.enabled is False
    with pytest.raises(ConfigError, match=r"cni\.default\.enabled"):
        parse_config({"cni": {"default": {"enabled": "no"}}})
