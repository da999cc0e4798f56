"""`tandem config runtimeclasses`: one RuntimeClass per handler, VM ones with the VM's cost as podFixed."""

from __future__ import annotations

import json

from core.settings import parse_config
from cri.runtimeclass import runtime_classes
from vm_backend import accel


def documents(text: str) -> list[str]:
    return [d for d in text.split("---\n")[1:]]


def test_a_vm_handler_carries_guest_ram_and_the_vmms_overhead() -> None:
    config = parse_config({"vm": {"accel": "tcg"}, "runtimes": {"kata": {"backend": "vm"}}})
    docs = {d.split("name: ")[1].split("\n")[0]: d for d in documents(runtime_classes(config))}
    assert set(docs) == {"kata", "runc", "vm"}
    for name in ("kata", "vm"):
        assert f"handler: {name}\n" in docs[name]
        assert 'overhead:\n  podFixed:\n    cpu: "100m"\n    memory: "426Mi"\n' in docs[name]  # 256 + 146 + 24 (TCG)
    assert "overhead" not in docs["runc"]


def test_the_overhead_follows_the_guest_size_and_the_accelerator() -> None:
    config = parse_config({"vm": {"accel": "kvm", "default_memory_mib": 512}})
    text = runtime_classes(config)
    assert 'memory: "650Mi"' in text  # 512 + 138 (KVM)
    assert "accelerator kvm" in text


def test_a_bigger_tcg_cache_is_counted_under_tcg_only() -> None:
    text = runtime_classes(parse_config({"vm": {"accel": "tcg", "tcg_cache_mib": 64}}))
    assert 'memory: "474Mi"' in text  # 256 + 146 + 64 + 8 (QEMU's records of the cache beyond 24)
    assert "with [vm] tcg_cache_mib = 64" in text
    assert 'memory: "394Mi"' in runtime_classes(parse_config({"vm": {"accel": "kvm", "tcg_cache_mib": 64}}))


def test_auto_uses_the_cached_probe_and_tcg_without_one(tmp_path) -> None:
    config = parse_config({"state_dir": str(tmp_path)})
    assert 'memory: "426Mi"' in runtime_classes(config)
    accel.cache_path(tmp_path).parent.mkdir(parents=True)
    accel.cache_path(tmp_path).write_text(json.dumps({"key": {}, "accel": "kvm", "reason": "probe booted"}))
    assert 'memory: "394Mi"' in runtime_classes(config)
