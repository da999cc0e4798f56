"""Tandem's configuration: one TOML file, every key with a default that works on a fresh Debian host.

The names under `default_workload_trust`, `[runtimes.*]` and `[registry]` are a
contract with scripts outside the project (see design §9). Unknown keys are
errors, so a typo stops the daemon instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidArgument
from images.registry import RegistrySettings

DEFAULT_CONFIG_PATH = Path("/etc/tandem/tandem.toml")
BACKENDS = ("runc", "vm")
TRUST_LEVELS = ("trusted", "untrusted")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCELS = ("auto", "kvm", "tcg")
HOST_POD_POLICIES = ("runc", "refuse")


class ConfigError(InvalidArgument):
    """A config file that cannot be used; the message names the file, the key and the reason."""


@dataclass(frozen=True)
class RuntimeHandler:
    """One `[runtimes.<name>]` entry: a RuntimeClass handler and the backend that serves it."""

    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSettings:
    allow_device_nodes: bool = False
    max_layers: int = 128
    max_layer_bytes: int = 32 * 2**30
    max_layer_entries: int = 500_000
    parallel_downloads: int = 4


@dataclass(frozen=True)
class CniSettings:
    conf_dir: Path = Path("/etc/cni/net.d")
    bin_dirs: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))


@dataclass(frozen=True)
class StreamingSettings:
    """Where the exec/attach/port-forward server listens; its one-time URLs are the only access control."""

    address: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the URLs name the one chosen)
    token_ttl_seconds: int = 60


@dataclass(frozen=True)
class VmSettings:
    """The untrusted path's micro-VMs: accelerator choice, default size, boot deadline, programs."""

    accel: str = "auto"  # auto: KVM if a probe guest boots on it, else TCG (with a warning)
    default_vcpus: int = 1
    default_memory_mib: int = 256
    boot_timeout_seconds: float = 30.0  # TCG boots take ~2-3 s; a hung boot is killed and retried once
    qemu: Path = Path("/usr/bin/qemu-system-x86_64")
    virtiofsd: Path = Path("/usr/lib/qemu/virtiofsd")


@dataclass(frozen=True)
class PolicySettings:
    """`[policy]`: what a pod that wants the host gets on a node whose default trust is untrusted."""

    host_pods_on_untrusted_node: str = "refuse"  # or "runc"; see README, Trust dispatch


@dataclass(frozen=True)
class Config:
    default_workload_trust: str = "trusted"
    socket: Path = Path("/run/tandem/tandem.sock")
    state_dir: Path = Path("/var/lib/tandem")
    runtime_dir: Path = Path("/run/tandem")
    log_level: str = "info"
    runtimes: dict[str, RuntimeHandler] = field(
        default_factory=lambda: {b: RuntimeHandler(name=b, backend=b) for b in BACKENDS}
    )
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    cni: CniSettings = field(default_factory=CniSettings)
    vm: VmSettings = field(default_factory=VmSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    source: str = "embedded defaults"


class _Reader:
    """Walks one TOML table, typing each key and remembering which keys were used."""

    def __init__(self, source: str, prefix: str, table: dict[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"config {self.source}: key '{self.prefix}{key}': {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be a {names}, got {type(value).__name__}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def positive(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.fail(key, f"must be positive, got {value}")
        return value

    def path(self, key: str, default: Path) -> Path:
        value = Path(self.get(key, str, str(default)))
        if not value.is_absolute():
            raise self.fail(key, f"must be an absolute path, got {str(value)!r}")
        return value

    def strings(self, key: str, default: list[str]) -> list[str]:
        value = self.get(key, list, default)
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return list(value)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.source, f"{self.prefix}{key}.", self.get(key, dict, {}))

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def parse_config(data: dict[str, Any], source: str = "<string>") -> Config:
    """Build a Config from parsed TOML, failing on the first bad key with its name and the reason."""
    defaults = Config()
    top = _Reader(source, "", data)
    trust = top.choice("default_workload_trust", TRUST_LEVELS, defaults.default_workload_trust)
    socket = top.path("socket", defaults.socket)
    state_dir = top.path("state_dir", defaults.state_dir)
    runtime_dir = top.path("runtime_dir", defaults.runtime_dir)
    log_level = top.choice("log_level", LOG_LEVELS, defaults.log_level)

    runtimes = dict(defaults.runtimes)
    runtimes_table = top.sub("runtimes")
    for name in list(runtimes_table.table):
        entry = runtimes_table.sub(name)
        backend = entry.choice("backend", BACKENDS, "")
        options = {k: v for k, v in entry.table.items() if k != "backend"}
        runtimes[name] = RuntimeHandler(name=name, backend=backend, options=options)
    runtimes_table.done()

    reg = top.sub("registry")
    mirrors_table = reg.sub("mirrors")
    mirrors = {host: mirrors_table.strings(host, []) for host in list(mirrors_table.table)}
    mirrors_table.done()
    registry = RegistrySettings(
        insecure=reg.strings("insecure", []),
        mirrors=mirrors,
        timeout=float(reg.get("timeout_seconds", (int, float), defaults.registry.timeout)),
    )
    reg.done()

    img = top.sub("images")
    images = ImageSettings(
        allow_device_nodes=img.get("allow_device_nodes", bool, defaults.images.allow_device_nodes),
        max_layers=img.positive("max_layers", defaults.images.max_layers),
        max_layer_bytes=img.positive("max_layer_bytes", defaults.images.max_layer_bytes),
        max_layer_entries=img.positive("max_layer_entries", defaults.images.max_layer_entries),
        parallel_downloads=img.positive("parallel_downloads", defaults.images.parallel_downloads),
    )
    img.done()

    cni_table = top.sub("cni")
    cni = CniSettings(
        conf_dir=cni_table.path("conf_dir", defaults.cni.conf_dir),
        bin_dirs=tuple(Path(p) for p in cni_table.strings("bin_dirs", [str(p) for p in defaults.cni.bin_dirs])),
    )
    cni_table.done()

    stream_table = top.sub("streaming")
    address = stream_table.get("address", str, defaults.streaming.address)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise stream_table.fail("address", f"must be an IP address, got {address!r}") from None
    port = stream_table.get("port", int, defaults.streaming.port)
    if not 0 <= port <= 65535:
        raise stream_table.fail("port", f"must be 0 (any free port) to 65535, got {port}")
    streaming = StreamingSettings(
        address=address,
        port=port,
        token_ttl_seconds=stream_table.positive("token_ttl_seconds", defaults.streaming.token_ttl_seconds),
    )
    stream_table.done()

    vm_table = top.sub("vm")
    vm = VmSettings(
        accel=vm_table.choice("accel", ACCELS, defaults.vm.accel),
        default_vcpus=vm_table.positive("default_vcpus", defaults.vm.default_vcpus),
        default_memory_mib=vm_table.positive("default_memory_mib", defaults.vm.default_memory_mib),
        boot_timeout_seconds=float(
            vm_table.get("boot_timeout_seconds", (int, float), defaults.vm.boot_timeout_seconds)
        ),
        qemu=vm_table.path("qemu", defaults.vm.qemu),
        virtiofsd=vm_table.path("virtiofsd", defaults.vm.virtiofsd),
    )
    if vm.default_memory_mib < 128:
        memory = vm.default_memory_mib
        raise vm_table.fail("default_memory_mib", f"must be at least 128 (the initramfs lives in RAM), got {memory}")
    if vm.boot_timeout_seconds <= 0:
        raise vm_table.fail("boot_timeout_seconds", f"must be positive, got {vm.boot_timeout_seconds:g}")
    vm_table.done()

    policy_table = top.sub("policy")
    policy = PolicySettings(
        host_pods_on_untrusted_node=policy_table.choice(
            "host_pods_on_untrusted_node", HOST_POD_POLICIES, defaults.policy.host_pods_on_untrusted_node
        )
    )
    policy_table.done()
    top.done()
    return Config(
        default_workload_trust=trust,
        socket=socket,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        log_level=log_level,
        runtimes=runtimes,
        registry=registry,
        images=images,
        cni=cni,
        vm=vm,
        streaming=streaming,
        policy=policy,
        source=source,
    )


def load_config(path: Path | None) -> Config:
    """Read the config file; with no path, the default file if it exists, else the embedded defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    return parse_config(data, str(path))
