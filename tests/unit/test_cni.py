import json
import logging
from pathlib import Path

from sandbox import cni
from sandbox.default_network import PLUGINS, default_network, write_default_network


def write(path, doc):
    path.write_text(json.dumps(doc))


def pods_network(conf: Path) -> None:
    conf.mkdir(exist_ok=True)
    write(
        conf / "10-pods.conflist",
        {"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}, {"type": "portmap"}]},
    )


def test_no_config_and_no_default_is_not_ready(tmp_path):
    choice = cni.choose_network(tmp_path / "net.d", None)
    r = cni.readiness(choice, (tmp_path,))
    assert choice.network is None
    assert not r.ready and r.reason == "NetworkPluginNotReady" and "net.d" in r.message


def test_first_valid_config_wins_and_plugins_must_exist(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    (conf / "00-broken.conflist").write_text("{")
    pods_network(conf)
    write(conf / "20-other.conf", {"cniVersion": "1.0.0", "name": "other", "type": "macvlan"})
    choice = cni.choose_network(
        conf, default_network(tmp_path / "run", bridge="b", subnet="10.9.0.0/24", masquerade=False)
    )
    assert (choice.network.name, choice.is_default) == ("pods", False)
    r = cni.readiness(choice, (bins,))
    assert not r.ready and "bridge, portmap" in r.message
    (bins / "bridge").write_text("")
    (bins / "portmap").write_text("")
    assert cni.readiness(choice, (tmp_path / "nowhere", bins)).ready


def test_an_ipam_plugin_is_a_plugin_the_network_needs(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    write(conf / "10.conf", {"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {"type": "host-local"}})
    (bins / "bridge").write_text("")
    r = cni.readiness(cni.choose_network(conf, None), (bins,))
    assert not r.ready and "host-local" in r.message


def test_an_empty_conf_dir_means_the_default_network(tmp_path):
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "README").write_text("not a network")
    default = default_network(tmp_path / "run", bridge="tandem0", subnet="10.157.0.0/24", masquerade=True)
    choice = cni.choose_network(conf, default)
    assert choice.network is default and choice.is_default
    assert choice.describe() == {
        "network": "tandem-default",
        "source": str(tmp_path / "run" / "tandem-default.conflist"),
        "default": True,
        "why": f"{conf} holds no valid network config",
    }


def test_the_default_network_is_debians_bridge_host_local_portmap_and_loopback(tmp_path):
    run = tmp_path / "run" / "cni"
    network = write_default_network(run, bridge="tdt9", subnet="10.199.9.0/24", masquerade=False)
    on_disk = json.loads(network.source.read_text())
    assert on_disk == network.conflist() and network.source.parent == run
    types = [p["type"] for p in on_disk["plugins"]]
    assert types == ["loopback", "bridge", "portmap"]
    (bridge,) = [p for p in on_disk["plugins"] if p["type"] == "bridge"]
    assert (bridge["bridge"], bridge["ipMasq"], bridge["isGateway"]) == ("tdt9", False, True)
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.199.9.0/24"}]]
    assert bridge["ipam"]["dataDir"] == str(run / "ipam")
    assert on_disk["plugins"][-1]["capabilities"] == {"portMappings": True}
    assert set(PLUGINS) == set(types) | {"host-local"}


def test_a_network_installed_in_the_conf_dir_takes_over_without_a_restart(tmp_path, caplog):
    conf = tmp_path / "net.d"
    conf.mkdir()
    default = default_network(tmp_path / "run", bridge="tandem0", subnet="10.157.0.0/24", masquerade=True)
    plugins = cni.CniPlugins(conf, (tmp_path,), default=default)
    caplog.set_level(logging.INFO, logger="tandem.cni")
    assert plugins.current().is_default
    assert plugins.current().is_default
    pods_network(conf)
    assert plugins.network_for_new_pod().name == "pods"
    (conf / "10-pods.conflist").unlink()
    assert plugins.current().is_default
    logged = [(r.getMessage(), r.network) for r in caplog.records]
    assert logged == [("pod network", "tandem-default"), ("pod network", "pods"), ("pod network", "tandem-default")]


def test_a_network_rewritten_in_place_is_read_again(tmp_path):
    conf = tmp_path / "net.d"
    pods_network(conf)
    plugins = cni.CniPlugins(conf, (tmp_path,))
    assert plugins.current().network.name == "pods"
    write(conf / "10-pods.conflist", {"cniVersion": "1.0.0", "name": "renamed-pods", "plugins": [{"type": "ptp"}]})
    assert plugins.current().network.name == "renamed-pods"
