import json

from sandbox import cni


def write(path, doc):
    path.write_text(json.dumps(doc))


def test_no_config_is_not_ready(tmp_path):
    r = cni.readiness(tmp_path / "net.d", (tmp_path,))
    assert not r.ready and r.reason == "NetworkPluginNotReady" and "net.d" in r.message


def test_first_valid_config_wins_and_plugins_must_exist(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    (conf / "00-broken.conflist").write_text("{")
    write(
        conf / "10-pods.conflist",
        {"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}, {"type": "portmap"}]},
    )
    write(conf / "20-other.conf", {"cniVersion": "1.0.0", "name": "other", "type": "macvlan"})
    assert cni.find_network(conf).name == "pods"
    r = cni.readiness(conf, (bins,))
    assert not r.ready and "bridge, portmap" in r.message
    (bins / "bridge").write_text("")
    (bins / "portmap").write_text("")
    assert cni.readiness(conf, (tmp_path / "nowhere", bins)).ready
