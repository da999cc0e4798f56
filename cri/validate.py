"""CRI requests checked before anything runs, with Kubernetes' own validation as the reference.

Whatever reaches a servicer becomes argv, environment, paths, CNI arguments, resolv.conf lines
and records; a bad value must end here, as INVALID_ARGUMENT naming the field ("config.metadata.name:
..."), not as INTERNAL from a tool further down. Pure functions over the protobuf messages.

The rules are apimachinery's (IsDNS1123Label, IsDNS1123Subdomain, IsQualifiedName, IsValidLabelValue,
IsValidSysctlName, TotalAnnotationSizeLimitB) and the core API's (MaxDNSNameservers, MaxDNSSearchPaths,
MaxDNSSearchListChars, user and group IDs, ports), plus the kernel's (PATH_MAX, MAX_ARG_STRLEN, the
hostname length). Where kubelet or critest legitimately send more than the API allows, the bound
follows them and says why. Only structure is checked here: whether a path exists, an image can be
pulled or a capability is known stays with the code that uses it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping

from core.errors import InvalidArgument
from protos import cri_pb2 as pb

PATH_MAX = 4096
MAX_ARG_STRLEN = 131072  # one argv or environment string, with its NUL: execve fails with E2BIG beyond
MAX_EXEC_BYTES = 2 * 2**20  # argv + environment with pointers: execve's limit under the default 8 MiB stack
MAX_HOSTNAME = 64  # the kernel's; kubelet refuses longer FQDN hostnames too
MAX_NAME = 253  # DNS-1123 subdomain
MAX_LABEL = 63  # DNS-1123 label
# Kubernetes' container names are DNS-1123 labels (63), but critest's run to 85 characters
# ("container-with-RunAsGroup-without-RunAsUser-test-<uuid>"): the bound is the subdomain's.
MAX_CONTAINER_NAME = 253
# Label values are at most 63 in the API, but kubelet puts the pod's name (a subdomain, up to 253)
# in the io.kubernetes.pod.name label.
MAX_LABEL_VALUE = 253
# TotalAnnotationSizeLimitB is 256 KiB for a pod's annotations; kubelet adds its own on top (config
# source and hash on the sandbox, ports and preStop hooks as JSON on containers): twice that.
MAX_ANNOTATIONS_BYTES = 2 * 256 * 1024
MAX_UID = 128  # a pod UID: a UUID from the API server, an MD5 hex digest for static pods
MAX_ID = 2**31 - 1  # IsValidUserID / IsValidGroupID
MAX_DNS_SERVERS = 3
MAX_DNS_SEARCHES = 32
MAX_DNS_SEARCH_CHARS = 2048
MAX_DNS_OPTION = 256
MAX_IMAGE_REF = 4096
MAX_SECRET = 64 * 1024  # a password, token or auth field; real ones are a few KiB
MAX_TEXT = 4096  # any other string

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAME_LABEL = re.compile(_LABEL, re.IGNORECASE)
_NAME_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*", re.IGNORECASE)
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SYSCTL_SEGMENT = r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?"
_SYSCTL = re.compile(rf"({_SYSCTL_SEGMENT}[./])*{_SYSCTL_SEGMENT}")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_DNS_SEARCH_LABEL = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?")  # host resolv.conf names too
_DNS_OPTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
_CPUSET = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
_HUGEPAGE_SIZE = re.compile(r"[0-9]+[KMGT]?B")
_CGROUP_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CAPABILITY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VISIBLE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]*")


def _show(value: str) -> str:
    return repr(value) if len(value) <= 64 else f"{value[:64]!r}... ({len(value)} characters)"


def _fail(field: str, reason: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {reason}")


# ---- strings -------------------------------------------------------------------------------------


def _text(value: str, field: str, limit: int = MAX_TEXT, *, control: bool = False) -> None:
    """No NUL byte (nor other control characters unless `control`), at most `limit` bytes."""
    if "\0" in value:
        raise _fail(field, "contains a NUL byte")
    if not control and any(c < " " or c == "\x7f" for c in value):
        raise _fail(field, f"contains a control character: {_show(value)}")
    size = len(value.encode(errors="surrogatepass"))
    if size > limit:
        raise _fail(field, f"is {size} bytes, over the {limit}-byte limit")


def _matching(value: str, field: str, pattern: re.Pattern[str], limit: int, what: str) -> None:
    """Non-empty, at most `limit` characters, all of it matching `pattern`."""
    if not value:
        raise _fail(field, "is required")
    if len(value) > limit:
        raise _fail(field, f"is {len(value)} characters, over the {limit}-character limit of {what}")
    if not pattern.fullmatch(value):
        raise _fail(field, f"{_show(value)} is not {what}")


def _name(value: str, field: str, limit: int, subdomain: bool) -> None:
    """A DNS-1123 label or subdomain, as Kubernetes names objects; upper case is accepted (critest uses it)."""
    if subdomain:
        what = "a DNS-1123 subdomain (letters, digits, '-' and '.', starting and ending alphanumeric)"
        _matching(value, field, _NAME_SUBDOMAIN, limit, what)
    else:
        _matching(value, field, _NAME_LABEL, limit, "a DNS-1123 label (letters, digits and '-', alphanumeric ends)")


def _qualified_name(key: str, field: str) -> None:
    """IsQualifiedName: an optional DNS-1123 subdomain prefix and '/', then a name of at most 63."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        _matching(prefix, field, _SUBDOMAIN, MAX_NAME, "a lowercase DNS-1123 subdomain prefix")
    what = "a qualified name (letters, digits, '-', '_', '.', alphanumeric ends; an optional 'prefix/')"
    _matching(name, field, _QUALIFIED_NAME, MAX_LABEL, what)


def _labels(labels: Mapping[str, str], field: str) -> None:
    for key, value in labels.items():
        where = f"{field}[{_show(key)}]"
        _qualified_name(key, where)
        if len(value) > MAX_LABEL_VALUE:
            raise _fail(where, f"value is {len(value)} characters, over the {MAX_LABEL_VALUE}-character limit")
        if not _LABEL_VALUE.fullmatch(value):
            raise _fail(where, f"value {_show(value)} is not a label value (letters, digits, '-', '_', '.')")


def _annotations(annotations: Mapping[str, str], field: str) -> None:
    total = 0
    for key, value in annotations.items():
        _qualified_name(key.lower(), f"{field}[{_show(key)}]")
        total += len(key) + len(value)
    if total > MAX_ANNOTATIONS_BYTES:
        raise _fail(field, f"total size {total} is over the {MAX_ANNOTATIONS_BYTES}-byte limit")


# ---- paths ---------------------------------------------------------------------------------------


def _absolute(value: str, field: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise _fail(field, "is required")
        return
    _text(value, field, PATH_MAX)
    if not value.startswith("/"):
        raise _fail(field, f"{_show(value)} must be an absolute path")


def _normal_absolute(value: str, field: str) -> None:
    """Absolute and normalized: no '.', '..' or empty components (one trailing '/' is fine)."""
    _absolute(value, field)
    trimmed = value.rstrip("/") or "/"
    if os.path.normpath(trimmed) != trimmed:
        raise _fail(field, f"{_show(value)} must be a normalized path (no '.', '..' or '//')")


def _relative(value: str, field: str) -> None:
    """Relative, normalized, and never climbing out of where it is joined."""
    _text(value, field, PATH_MAX)
    if value.startswith("/"):
        raise _fail(field, f"{_show(value)} must be a relative path")
    if os.path.normpath(value) != value or value == ".." or value.startswith("../"):
        raise _fail(field, f"{_show(value)} must be a normalized relative path that stays below its directory")


# ---- pods ----------------------------------------------------------------------------------------


def run_pod_sandbox(request: pb.RunPodSandboxRequest) -> None:
    if request.runtime_handler:
        _name(request.runtime_handler, "runtime_handler", MAX_LABEL, subdomain=False)
    pod_sandbox_config(request.config, "config")


def pod_sandbox_config(config: pb.PodSandboxConfig, field: str) -> None:
    metadata = config.metadata
    _name(metadata.name, f"{field}.metadata.name", MAX_NAME, subdomain=True)
    _name(metadata.namespace, f"{field}.metadata.namespace", MAX_LABEL, subdomain=False)
    uid = "letters, digits, '.', '_', ':' or '-' (a UUID, or a static pod's hash)"
    _matching(metadata.uid, f"{field}.metadata.uid", _UID, MAX_UID, uid)
    if config.hostname:
        _name(config.hostname, f"{field}.hostname", MAX_HOSTNAME, subdomain=True)
    if config.log_directory:
        _normal_absolute(config.log_directory, f"{field}.log_directory")
    _dns(config.dns_config, f"{field}.dns_config")
    for i, port in enumerate(config.port_mappings):
        _port_mapping(port, f"{field}.port_mappings[{i}]")
    _labels(config.labels, f"{field}.labels")
    _annotations(config.annotations, f"{field}.annotations")
    linux = config.linux
    if linux.cgroup_parent:
        _cgroup_parent(linux.cgroup_parent, f"{field}.linux.cgroup_parent")
    for name, value in linux.sysctls.items():
        where = f"{field}.linux.sysctls[{_show(name)}]"
        _matching(name, where, _SYSCTL, MAX_NAME, "a sysctl name (lowercase segments joined by '.' or '/')")
        _text(value, where)
    _security_context(linux.security_context, f"{field}.linux.security_context")
    _resources(linux.overhead, f"{field}.linux.overhead")
    _resources(linux.resources, f"{field}.linux.resources")


def _ip(value: str, field: str) -> None:
    if not _VISIBLE.fullmatch(value):
        raise _fail(field, f"{_show(value)} is not an IP address")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _fail(field, f"{_show(value)} is not an IP address") from None


def _dns(dns: pb.DNSConfig, field: str) -> None:
    """What ends up in resolv.conf: kubelet's limits (it truncates to them), one entry per token."""
    if len(dns.servers) > MAX_DNS_SERVERS:
        raise _fail(f"{field}.servers", f"{len(dns.servers)} servers, at most {MAX_DNS_SERVERS}")
    for i, server in enumerate(dns.servers):
        _ip(server, f"{field}.servers[{i}]")
    if len(dns.searches) > MAX_DNS_SEARCHES:
        raise _fail(f"{field}.searches", f"{len(dns.searches)} search domains, at most {MAX_DNS_SEARCHES}")
    if len(" ".join(dns.searches)) > MAX_DNS_SEARCH_CHARS:
        raise _fail(f"{field}.searches", f"over {MAX_DNS_SEARCH_CHARS} characters together")
    for i, search in enumerate(dns.searches):
        name = search[:-1] if search.endswith(".") and search != "." else search
        where = f"{field}.searches[{i}]"
        if len(name) > MAX_NAME:
            raise _fail(where, f"is {len(name)} characters, over the {MAX_NAME}-character limit of a domain")
        if name != "." and not all(_DNS_SEARCH_LABEL.fullmatch(part) and len(part) <= 63 for part in name.split(".")):
            raise _fail(where, f"{_show(search)} is not a domain name")
    for i, option in enumerate(dns.options):
        _matching(option, f"{field}.options[{i}]", _DNS_OPTION, MAX_DNS_OPTION, "a resolver option such as 'ndots:5'")


def _port_mapping(port: pb.PortMapping, field: str) -> None:
    if port.protocol not in pb.Protocol.values():
        raise _fail(f"{field}.protocol", f"{port.protocol} is not TCP, UDP or SCTP")
    if not 0 < port.container_port < 65536:
        raise _fail(f"{field}.container_port", f"{port.container_port} is not a port (1-65535)")
    if not 0 <= port.host_port < 65536:
        raise _fail(f"{field}.host_port", f"{port.host_port} is not a port (1-65535, or 0 for none)")
    if port.host_ip:
        _ip(port.host_ip, f"{field}.host_ip")


def _cgroup_parent(value: str, field: str) -> None:
    _text(value, field, PATH_MAX)
    parts = value.strip("/").split("/")
    if value.strip("/") and any(part in ("", ".", "..") for part in parts):
        raise _fail(field, f"{_show(value)} is not a clean cgroup path (no '.', '..' or '//')")


# ---- security contexts ---------------------------------------------------------------------------


def _ids(values: Iterable[int], field: str) -> None:
    for i, value in enumerate(values):
        if not 0 <= value <= MAX_ID:
            raise _fail(f"{field}[{i}]", f"{value} is not a group ID (0-{MAX_ID})")


def _id(holder: pb.LinuxSandboxSecurityContext | pb.LinuxContainerSecurityContext, name: str, field: str) -> None:
    if holder.HasField(name):
        value = getattr(holder, name).value
        if not 0 <= value <= MAX_ID:
            raise _fail(f"{field}.{name}", f"{value} is not a user or group ID (0-{MAX_ID})")


def _enum(value: int, enum: object, field: str) -> None:
    if value not in enum.values():  # type: ignore[attr-defined]
        raise _fail(field, f"{value} is not one of {', '.join(enum.keys())}")  # type: ignore[attr-defined]


def _seccomp_path(value: str, field: str) -> None:
    """A Localhost seccomp profile: kubelet sends an absolute, clean path (the API refuses '..')."""
    _normal_absolute(value.removeprefix("localhost/"), field)


def _profiles(context: pb.LinuxSandboxSecurityContext | pb.LinuxContainerSecurityContext, field: str) -> None:
    for name in ("seccomp", "apparmor"):
        profile = getattr(context, name)
        where = f"{field}.{name}"
        _enum(profile.profile_type, pb.SecurityProfile.ProfileType, f"{where}.profile_type")
        if profile.profile_type == pb.SecurityProfile.Localhost:
            if not profile.localhost_ref:
                raise _fail(f"{where}.localhost_ref", "is required for a Localhost profile")
            if name == "seccomp":
                _seccomp_path(profile.localhost_ref, f"{where}.localhost_ref")
        _text(profile.localhost_ref, f"{where}.localhost_ref", PATH_MAX)
    if context.seccomp_profile_path.startswith("localhost/"):
        _seccomp_path(context.seccomp_profile_path, f"{field}.seccomp_profile_path")
    _text(context.seccomp_profile_path, f"{field}.seccomp_profile_path", PATH_MAX)


def _security_context(context: pb.LinuxSandboxSecurityContext | pb.LinuxContainerSecurityContext, field: str) -> None:
    """What pod and container security contexts share."""
    _id(context, "run_as_user", field)
    _id(context, "run_as_group", field)
    _ids(context.supplemental_groups, f"{field}.supplemental_groups")
    _enum(context.supplemental_groups_policy, pb.SupplementalGroupsPolicy, f"{field}.supplemental_groups_policy")
    options = context.namespace_options
    for name in ("network", "pid", "ipc"):
        _enum(getattr(options, name), pb.NamespaceMode, f"{field}.namespace_options.{name}")
    _enum(options.userns_options.mode, pb.NamespaceMode, f"{field}.namespace_options.userns_options.mode")
    _text(options.target_id, f"{field}.namespace_options.target_id", 256)
    for name in ("user", "role", "type", "level"):
        _text(getattr(context.selinux_options, name), f"{field}.selinux_options.{name}")
    _profiles(context, field)


def _container_security_context(context: pb.LinuxContainerSecurityContext, field: str) -> None:
    _security_context(context, field)
    _text(context.run_as_username, f"{field}.run_as_username", 256)
    _text(context.apparmor_profile, f"{field}.apparmor_profile", PATH_MAX)
    capabilities = context.capabilities
    for name in ("add_capabilities", "drop_capabilities", "add_ambient_capabilities"):
        for i, capability in enumerate(getattr(capabilities, name)):
            where = f"{field}.capabilities.{name}[{i}]"
            _matching(capability, where, _CAPABILITY, 64, "a capability name such as NET_ADMIN")
    for name in ("masked_paths", "readonly_paths"):
        for i, path in enumerate(getattr(context, name)):
            _absolute(path, f"{field}.{name}[{i}]")


def _resources(resources: pb.LinuxContainerResources, field: str) -> None:
    if not -1000 <= resources.oom_score_adj <= 1000:
        raise _fail(f"{field}.oom_score_adj", f"{resources.oom_score_adj} is outside -1000..1000")
    for name in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(resources, name)
        if value:
            _matching(value, f"{field}.{name}", _CPUSET, MAX_TEXT, "a CPU or node list such as '0-3,6'")
    for i, limit in enumerate(resources.hugepage_limits):
        size = "a huge page size such as '2MB'"
        _matching(limit.page_size, f"{field}.hugepage_limits[{i}].page_size", _HUGEPAGE_SIZE, 16, size)
    for key, value in resources.unified.items():
        where = f"{field}.unified[{_show(key)}]"
        _matching(key, where, _CGROUP_FILE, 255, "a cgroup interface file name such as 'memory.high'")
        _text(value, where)


# ---- containers ----------------------------------------------------------------------------------


def create_container(request: pb.CreateContainerRequest) -> None:
    """The container's config; `sandbox_config` is not used (the pod's own record is), so not checked:
    a pod created before a rule existed must still get containers."""
    container_config(request.config, "config")


def _image(spec: pb.ImageSpec, field: str) -> None:
    _matching(spec.image, f"{field}.image", _VISIBLE, MAX_IMAGE_REF, "an image reference or ID")


def _exec_strings(values: Iterable[str], field: str) -> int:
    """Each string of an argv or environment, checked; returns their cost against MAX_EXEC_BYTES."""
    total = 0
    for i, value in enumerate(values):
        where = f"{field}[{i}]"
        _text(value, where, MAX_ARG_STRLEN - 1, control=True)
        total += len(value.encode(errors="surrogatepass")) + 1 + 8
    return total


def _argv(cmd: Iterable[str], field: str) -> None:
    cmd = list(cmd)
    if not cmd:
        raise _fail(field, "is required")
    total = _exec_strings(cmd, field)
    if total > MAX_EXEC_BYTES:
        raise _fail(field, f"is {total} bytes, over execve's {MAX_EXEC_BYTES}-byte limit")


def container_config(config: pb.ContainerConfig, field: str) -> None:
    _name(config.metadata.name, f"{field}.metadata.name", MAX_CONTAINER_NAME, subdomain=False)
    _image(config.image, f"{field}.image")
    total = _exec_strings(config.command, f"{field}.command") + _exec_strings(config.args, f"{field}.args")
    for i, env in enumerate(config.envs):
        where = f"{field}.envs[{i}]"
        if not env.key:
            raise _fail(f"{where}.key", "is required")
        if "=" in env.key or any(not " " <= c <= "~" for c in env.key):
            raise _fail(f"{where}.key", f"{_show(env.key)} must be printable ASCII without '='")
        if "\0" in env.value:
            raise _fail(f"{where}.value", "contains a NUL byte")
        size = len(f"{env.key}={env.value}".encode(errors="surrogatepass"))
        if size >= MAX_ARG_STRLEN:
            raise _fail(where, f"is {size} bytes, over the kernel's {MAX_ARG_STRLEN - 1}-byte limit")
        total += size + 1 + 8
    if total > MAX_EXEC_BYTES:
        raise _fail(field, f"command, args and envs are {total} bytes, over execve's {MAX_EXEC_BYTES}-byte limit")
    if config.working_dir:
        _absolute(config.working_dir, f"{field}.working_dir")
    for i, mount in enumerate(config.mounts):
        where = f"{field}.mounts[{i}]"
        _absolute(mount.container_path, f"{where}.container_path")
        _absolute(mount.host_path, f"{where}.host_path", required=not mount.image.image)
        if mount.image.image:
            _image(mount.image, f"{where}.image")
        if mount.image_sub_path:
            _relative(mount.image_sub_path, f"{where}.image_sub_path")
        _enum(mount.propagation, pb.MountPropagation, f"{where}.propagation")
    for i, device in enumerate(config.devices):
        where = f"{field}.devices[{i}]"
        _absolute(device.container_path, f"{where}.container_path")
        _absolute(device.host_path, f"{where}.host_path")
        if not set(device.permissions) <= set("rwm") or len(device.permissions) > 3:
            raise _fail(f"{where}.permissions", f"{_show(device.permissions)} must combine r, w and m")
    for i, cdi in enumerate(config.CDI_devices):
        _text(cdi.name, f"{field}.CDI_devices[{i}].name")
    _labels(config.labels, f"{field}.labels")
    _annotations(config.annotations, f"{field}.annotations")
    if config.log_path:
        _relative(config.log_path, f"{field}.log_path")
    _resources(config.linux.resources, f"{field}.linux.resources")
    _container_security_context(config.linux.security_context, f"{field}.linux.security_context")
    _enum(config.stop_signal, pb.Signal, f"{field}.stop_signal")


def update_container_resources(request: pb.UpdateContainerResourcesRequest) -> None:
    _resources(request.linux, "linux")


def update_pod_sandbox_resources(request: pb.UpdatePodSandboxResourcesRequest) -> None:
    if not request.pod_sandbox_id:
        raise _fail("pod_sandbox_id", "must be set")
    _resources(request.resources, "resources")
    _resources(request.overhead, "overhead")


def exec_sync(request: pb.ExecSyncRequest) -> None:
    _argv(request.cmd, "cmd")


def exec_request(request: pb.ExecRequest) -> None:
    _argv(request.cmd, "cmd")


# ---- images --------------------------------------------------------------------------------------


def image_spec(spec: pb.ImageSpec, field: str) -> None:
    _image(spec, field)


def pull_image(request: pb.PullImageRequest) -> None:
    _image(request.image, "image")
    auth = request.auth
    _text(auth.username, "auth.username", MAX_TEXT)
    if ":" in auth.username:
        raise _fail("auth.username", "cannot contain ':' (Basic authentication separates it from the password)")
    _text(auth.password, "auth.password", MAX_SECRET, control=True)  # a JSON key file is a password too
    if auth.auth:
        _secret(auth.auth, "auth.auth", _BASE64, "base64 of 'user:password'")
    for name in ("identity_token", "registry_token"):
        if value := getattr(auth, name):
            _secret(value, f"auth.{name}", _VISIBLE, "a token (printable ASCII, no spaces)")
    if auth.server_address:
        _matching(auth.server_address, "auth.server_address", _VISIBLE, MAX_TEXT, "a registry address")


def _secret(value: str, field: str, pattern: re.Pattern[str], what: str) -> None:
    """Like _matching, but the message never shows the value: it is a credential."""
    if len(value) > MAX_SECRET:
        raise _fail(field, f"is {len(value)} characters, over the {MAX_SECRET}-character limit")
    if not pattern.fullmatch(value):
        raise _fail(field, f"is not {what}")
