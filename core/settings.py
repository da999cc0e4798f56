"""Tandem's configuration: one TOML file, every key with a default that works on a fresh Debian host.

The names under `default_workload_trust`, `[runtimes.*]` and `[registry]` are a
contract with scripts outside the project (see design §9). Unknown keys are
errors, so a typo stops the daemon instead of being silently ignored.

Every layer reads its settings from here, so this module imports nothing of
Tandem but `core`. Each part of the daemon gets only its own section (and the
directories it owns), handed to it by the composition root (`cri/server.py`).
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from core.errors import InvalidArgument

DEFAULT_CONFIG_PATH = Path("/etc/tandem/tandem.toml")
BACKENDS = ("runc", "vm")
TRUST_LEVELS = ("trusted", "untrusted")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCELS = ("auto", "kvm", "tcg")
HOST_POD_POLICIES = ("runc", "refuse")


class ConfigError(InvalidArgument):
    """A config file that cannot be used; the message names the file, the key and the reason."""


T = TypeVar("T")


def doc(text: str, key: str = "", unset: str = "") -> dict[str, str]:
    """A config key's documentation, which `tandem config default` prints beside its default.

    `key` is its name in the file when that differs from the field's; `unset` says what a key whose
    default is None means while unset.
    """
    return {"doc": text, "key": key, "unset": unset}


NOT_A_KEY = {"internal": "set by code, not by the config file"}


@dataclass
class RegistrySettings:
    """`[registry]` in the config: which hosts may be plain HTTP, and mirrors per registry domain."""

    insecure: list[str] = field(
        default_factory=list, metadata=doc("registries allowed over plain HTTP, as host:port (loopback always is)")
    )
    mirrors: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=doc('per registry domain, mirrors tried in order before it: "registry.k8s.io" = ["localhost:5000"]'),
    )
    timeout: float = field(default=60.0, metadata=doc("one registry request's deadline", key="timeout_seconds"))
    max_manifest_bytes: int = field(default=4 * 2**20, metadata=NOT_A_KEY)
    max_token_bytes: int = field(default=2**20, metadata=NOT_A_KEY)  # a token answer; real ones are a few KiB


@dataclass(frozen=True)
class RuntimeHandler:
    """One `[runtimes.<name>]` entry: a RuntimeClass handler and the backend that serves it."""

    name: str = field(metadata=NOT_A_KEY)  # the table's name
    backend: str = field(metadata=doc("runc or vm"))
    options: dict[str, Any] = field(default_factory=dict, metadata=NOT_A_KEY)  # the entry's other keys


@dataclass(frozen=True)
class ImageSettings:
    allow_device_nodes: bool = field(default=False, metadata=doc("create device nodes found in image layers"))
    max_layers: int = field(default=128, metadata=doc("layers per image"))
    max_layer_bytes: int = field(default=32 * 2**30, metadata=doc("a layer's uncompressed size"))
    max_layer_entries: int = field(default=500_000, metadata=doc("files, directories and links in one layer"))
    parallel_downloads: int = field(default=4, metadata=doc("layer downloads at once, across all pulls"))


@dataclass(frozen=True)
class DefaultNetworkSettings:
    """Tandem's own pod network, joined while `[cni] conf_dir` holds no valid network.

    10.157.0.0/24 is outside every default we know of: containerd's and CRI-O's examples and
    podman (10.88/16, 10.89.x/24), Kubernetes services (10.96/12), flannel and kind (10.244/16),
    k3s (10.42/16, 10.43/16), weave (10.32/12), microk8s (10.1/16, 10.152.183/24), OpenShift
    (10.128/14, 172.30/16), docker (172.17-31/16, 192.168/16) and calico (192.168/16). A /24 holds
    253 pods, more than kubelet's default max-pods (110), and claims little of the node's network.
    """

    enabled: bool = field(
        default=True, metadata=doc("false: no network until one is installed in conf_dir (containerd's behaviour)")
    )
    bridge: str = field(default="tandem0", metadata=doc("the bridge's interface name"))
    subnet: str = field(default="10.157.0.0/24", metadata=doc("IPv4, /29 or larger (README, Pod network, says why)"))
    masquerade: bool = field(default=True, metadata=doc("NAT pods' traffic out of the node; false where it is routed"))


@dataclass(frozen=True)
class CniSettings:
    conf_dir: Path = field(
        default=Path("/etc/cni/net.d"), metadata=doc("the first valid .conflist/.conf/.json here is the pod network")
    )
    bin_dirs: tuple[Path, ...] = field(
        default=(Path("/opt/cni/bin"), Path("/usr/lib/cni")), metadata=doc("where CNI plugins are looked for")
    )
    default: DefaultNetworkSettings = field(
        default_factory=DefaultNetworkSettings, metadata=doc("Tandem's own network, while conf_dir holds none")
    )


@dataclass(frozen=True)
class StreamingSettings:
    """Where the exec/attach/port-forward server listens; its one-time URLs are the only access control."""

    address: str = field(
        default="127.0.0.1", metadata=doc("an IP; loopback keeps it on the node (kubelet proxies to it)")
    )
    port: int = field(default=0, metadata=doc("0: any free port, named in each URL"))
    token_ttl_seconds: int = field(
        default=60, metadata=doc("an unused URL stops working after this; a used one at once")
    )


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: the Prometheus endpoint, off unless an address is set."""

    address: str = field(
        default="", metadata=doc('"IP:PORT" serves /metrics there (e.g. "127.0.0.1:9090"; port 0: any); "" is off')
    )


JAIL_UID_FIRST = 0x70000000  # 1879048192: above systemd's container range, below 2**31 (see README)
JAIL_UID_COUNT = 65536
MAX_WARM_POOL = 64  # each warm VM holds its guest's RAM: more is a typo, not a choice
# TCG's translation cache per VM, MiB (QEMU's tb-size): README, "Pod start or memory under TCG", says what it trades.
TCG_CACHE_MIB = 24
TCG_CACHE_RANGE_MIB = (16, 128)  # the sizes measured (README): 16 is slow but works; a boot fills less than 128


@dataclass(frozen=True)
class VmSettings:
    """The untrusted path's micro-VMs: accelerator choice, size and its caps, boot deadline, programs, the jail."""

    accel: str = field(
        default="auto", metadata=doc("auto: KVM if a probe guest boots on it (cached), else TCG; or kvm, tcg")
    )
    default_vcpus: int = field(default=1, metadata=doc("a VM's vCPUs besides its pod's CPU limit"))
    default_memory_mib: int = field(
        default=256,
        metadata=doc("a VM's RAM besides its pod's memory limit; at least 128 (the guest kernel keeps ~75 MiB)"),
    )
    memory_headroom_mib: int = field(
        default=0, metadata=doc("RAM a VM boots with beyond its pod's, held by the balloon: room to grow in place")
    )
    max_vcpus: int | None = field(default=None, metadata=doc("the most vCPUs a VM may have", unset="the node's CPUs"))
    max_memory_mib: int | None = field(
        default=None, metadata=doc("the most RAM a VM may have", unset="3/4 of the node's MemTotal")
    )
    jail: bool = field(
        default=True, metadata=doc("QEMU jailed; false only to measure the jail's cost (QEMU then runs as root)")
    )
    jail_uid_first: int = field(
        default=JAIL_UID_FIRST, metadata=doc("each VM's QEMU runs as its own uid (= gid) from this range")
    )
    jail_uid_count: int = field(default=JAIL_UID_COUNT, metadata=doc("so at most this many VM pods at once"))
    boot_timeout_seconds: float = field(default=30.0, metadata=doc("a boot that misses it is killed and retried once"))
    warm_pool: int = field(
        default=1,
        metadata=doc("VMs kept booted for pods of the default size (README, The warm pool: ~150 MiB each); 0 is off"),
    )
    tcg_cache_mib: int = field(
        default=TCG_CACHE_MIB,
        metadata=doc(
            "under TCG only: each VM's cache of translated code (QEMU's tb-size), all of it resident from its"
            " boot on; 64 starts pods from the warm pool twice as fast for ~48 MiB more per VM pod (README,"
            " Pod start or memory under TCG)"
        ),
    )
    qemu: Path = field(default=Path("/usr/bin/qemu-system-x86_64"), metadata=doc("QEMU's system emulator"))
    virtiofsd: Path = field(default=Path("/usr/lib/qemu/virtiofsd"), metadata=doc("the virtio-fs daemon"))


@dataclass(frozen=True)
class LogSettings:
    """`[logs]`: container log files, the same for both backends."""

    max_size_bytes: int = field(
        default=64 * 2**20,
        metadata=doc(
            "past it a container's log file starts over, empty (conmon's --log-size-max); kubelet rotates at"
            " 10 MiB by default, every 10 s: this bounds what a container (or a VM) writes between its looks"
        ),
    )


@dataclass(frozen=True)
class PolicySettings:
    """`[policy]`: what a pod that wants the host gets on a node whose default trust is untrusted."""

    host_pods_on_untrusted_node: str = field(
        default="refuse", metadata=doc("or runc: see README, Trust dispatch, rule 4, for the risk of each")
    )


@dataclass(frozen=True)
class Config:
    default_workload_trust: str = field(
        default="trusted", metadata=doc("or untrusted: where pods without a handler or lowering annotation go")
    )
    socket: Path = field(default=Path("/run/tandem/tandem.sock"), metadata=doc("the CRI socket (0600, root only)"))
    state_dir: Path = field(default=Path("/var/lib/tandem"), metadata=doc("records, images, layers, guest assets"))
    runtime_dir: Path = field(default=Path("/run/tandem"), metadata=doc("what lives as long as the boot: netns, VMs"))
    log_level: str = field(default="info", metadata=doc("debug, info, warning or error"))
    runtimes: dict[str, RuntimeHandler] = field(
        default_factory=lambda: {b: RuntimeHandler(name=b, backend=b) for b in BACKENDS},
        metadata=doc("RuntimeClass handler name -> backend; runc and vm always exist"),
    )
    registry: RegistrySettings = field(default_factory=RegistrySettings, metadata=doc("image registries"))
    images: ImageSettings = field(default_factory=ImageSettings, metadata=doc("limits on what a pull may unpack"))
    cni: CniSettings = field(default_factory=CniSettings, metadata=doc("the pod network"))
    vm: VmSettings = field(default_factory=VmSettings, metadata=doc("untrusted pods' micro-VMs"))
    streaming: StreamingSettings = field(
        default_factory=StreamingSettings, metadata=doc("where the URLs of Exec, Attach and PortForward lead")
    )
    policy: PolicySettings = field(default_factory=PolicySettings, metadata=doc("pods that want the host"))
    logs: LogSettings = field(default_factory=LogSettings, metadata=doc("containers' CRI log files"))
    metrics: MetricsSettings = field(default_factory=MetricsSettings, metadata=doc("the Prometheus endpoint"))
    source: str = field(default="embedded defaults", metadata=NOT_A_KEY)

    def trust(self) -> TrustSettings:
        return TrustSettings(
            default_workload_trust=self.default_workload_trust,
            runtimes=self.runtimes,
            host_pods_on_untrusted_node=self.policy.host_pods_on_untrusted_node,
        )

    def runc_backend(self) -> RuncBackendSettings:
        return RuncBackendSettings(
            run_dir=self.runtime_dir / "runc",
            state_dir=self.state_dir / "runc",
            attach_dir=self.runtime_dir / "a",
            log_size_max=self.logs.max_size_bytes,
            reserved_ids=(range(self.vm.jail_uid_first, self.vm.jail_uid_first + self.vm.jail_uid_count),),
        )

    def vm_backend(self) -> VmBackendSettings:
        return VmBackendSettings(
            vm=self.vm, run_dir=self.runtime_dir / "vm", state_dir=self.state_dir, log_size_max=self.logs.max_size_bytes
        )


@dataclass(frozen=True)
class TrustSettings:
    """What trust dispatch decides by: the default trust, the RuntimeClass handlers and `[policy]`."""

    default_workload_trust: str
    runtimes: dict[str, RuntimeHandler]
    host_pods_on_untrusted_node: str  # [policy]: "runc" or "refuse"


@dataclass(frozen=True)
class RuncBackendSettings:
    """What the runc backend owns: no config keys of its own, only its directories (and `[logs]`' cap)."""

    run_dir: Path  # runc's state, bundles, exit files, pod dirs (tmpfs: gone on reboot, as the containers are)
    state_dir: Path  # writable layers and the infra containers' root
    attach_dir: Path  # conmon's attach-socket links: short, as a unix socket path must be
    log_size_max: int  # [logs] max_size_bytes, passed to conmon
    # host IDs no pod's user namespace may map: the VM jail's uids (a pod's root there could signal a QEMU)
    reserved_ids: tuple[range, ...] = ()


@dataclass(frozen=True)
class VmBackendSettings:
    """What the VM backend owns: `[vm]`, the VMs' run dirs, and its part of the state dir."""

    vm: VmSettings
    run_dir: Path  # one run dir per pod VM
    state_dir: Path  # the daemon's state dir: guest assets, the accelerator choice and layers live under vm/
    log_size_max: int  # [logs] max_size_bytes: the container logs the host writes


class _Reader:
    """Walks one TOML table, typing each key and remembering which keys were used."""

    def __init__(self, source: str, prefix: str, table: dict[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"config {self.source}: key '{self.prefix}{key}': {reason}")

    def _value(self, key: str, kinds: tuple[type, ...]) -> object | None:
        """The key's value if it is set (None if not), refused unless it is one of `kinds` (a bool is no int)."""
        self.used.add(key)
        if key not in self.table:
            return None
        value = self.table[key]
        if (int in kinds and isinstance(value, bool)) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be a {names}, got {type(value).__name__}")
        return value

    def get(self, key: str, kind: type[T], default: T) -> T:
        value = self._value(key, (kind,))
        return default if value is None else cast(T, value)

    def number(self, key: str, default: float) -> float:
        value = self._value(key, (int, float))
        return default if value is None else float(cast(float, value))

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
        value: list[Any] = self.get(key, list, default)
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return [str(v) for v in value]

    def sub(self, key: str) -> _Reader:
        table: dict[str, Any] = self.get(key, dict, {})
        return _Reader(self.source, f"{self.prefix}{key}.", table)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _default_network(table: _Reader, defaults: DefaultNetworkSettings) -> DefaultNetworkSettings:
    """`[cni.default]`: on or off, a Linux interface name, an IPv4 subnet with room for pods, masquerade on or off."""
    bridge = table.get("bridge", str, defaults.bridge)
    if not 0 < len(bridge.encode()) < 16 or any(c in bridge for c in "/: \t\n") or bridge in (".", ".."):
        reason = f"must be a network interface name (1-15 bytes, no '/', ':' or spaces), got {bridge!r}"
        raise table.fail("bridge", reason)
    subnet = table.get("subnet", str, defaults.subnet)
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise table.fail("subnet", f"must be an IPv4 network like 10.157.0.0/24: {e}") from None
    if network.prefixlen > 29:
        raise table.fail("subnet", f"must be /29 or larger (room for a gateway and pods), got {subnet}")
    settings = DefaultNetworkSettings(
        enabled=table.get("enabled", bool, defaults.enabled),
        bridge=bridge,
        subnet=str(network),
        masquerade=table.get("masquerade", bool, defaults.masquerade),
    )
    table.done()
    return settings


def _listen_address(table: _Reader, key: str, default: str) -> str:
    """ "IP:PORT" (an IPv6 address in brackets; port 0 for any free one), or "" for nothing to listen on."""
    value = table.get(key, str, default)
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        valid = bool(sep) and port.isdigit() and int(port) <= 65535
    except ValueError:
        valid = False
    if not valid:
        raise table.fail(key, f'must be "IP:PORT" (like "127.0.0.1:9090") or "" for off, got {value!r}')
    return value


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
        timeout=reg.number("timeout_seconds", defaults.registry.timeout),
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
        default=_default_network(cni_table.sub("default"), defaults.cni.default),
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
        memory_headroom_mib=vm_table.get("memory_headroom_mib", int, defaults.vm.memory_headroom_mib),
        boot_timeout_seconds=vm_table.number("boot_timeout_seconds", defaults.vm.boot_timeout_seconds),
        warm_pool=vm_table.get("warm_pool", int, defaults.vm.warm_pool),
        tcg_cache_mib=vm_table.get("tcg_cache_mib", int, defaults.vm.tcg_cache_mib),
        qemu=vm_table.path("qemu", defaults.vm.qemu),
        virtiofsd=vm_table.path("virtiofsd", defaults.vm.virtiofsd),
        max_vcpus=vm_table.positive("max_vcpus", 1) if "max_vcpus" in vm_table.table else None,
        max_memory_mib=vm_table.positive("max_memory_mib", 1) if "max_memory_mib" in vm_table.table else None,
        jail=vm_table.get("jail", bool, defaults.vm.jail),
        jail_uid_first=vm_table.positive("jail_uid_first", defaults.vm.jail_uid_first),
        jail_uid_count=vm_table.positive("jail_uid_count", defaults.vm.jail_uid_count),
    )
    for key, cap, default in (
        ("max_vcpus", vm.max_vcpus, vm.default_vcpus),
        ("max_memory_mib", vm.max_memory_mib, vm.default_memory_mib),
    ):
        if cap is not None and cap < default:
            raise vm_table.fail(key, f"must be at least default_{key[4:]} ({default}), got {cap}")
    if vm.jail_uid_first + vm.jail_uid_count > 2**31:
        end = vm.jail_uid_first + vm.jail_uid_count
        raise vm_table.fail("jail_uid_count", f"the range must end at or below 2**31 (2147483648), it ends at {end}")
    if vm.default_memory_mib < 128:
        memory = vm.default_memory_mib
        raise vm_table.fail("default_memory_mib", f"must be at least 128 (the guest kernel's own share), got {memory}")
    if not 0 <= vm.warm_pool <= MAX_WARM_POOL:
        raise vm_table.fail("warm_pool", f"must be 0 (off) to {MAX_WARM_POOL}, got {vm.warm_pool}")
    low, high = TCG_CACHE_RANGE_MIB
    if not low <= vm.tcg_cache_mib <= high:
        raise vm_table.fail("tcg_cache_mib", f"must be {low} to {high}, got {vm.tcg_cache_mib}")
    if vm.memory_headroom_mib < 0:
        raise vm_table.fail("memory_headroom_mib", f"cannot be negative, got {vm.memory_headroom_mib}")
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

    logs_table = top.sub("logs")
    logs = LogSettings(max_size_bytes=logs_table.positive("max_size_bytes", defaults.logs.max_size_bytes))
    logs_table.done()
    metrics_table = top.sub("metrics")
    metrics = MetricsSettings(address=_listen_address(metrics_table, "address", defaults.metrics.address))
    metrics_table.done()
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
        logs=logs,
        metrics=metrics,
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
