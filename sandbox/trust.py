"""Trust dispatch: which backend runs a pod. Decided once, at RunPodSandbox, and never changed.

The rules (design §2), in order:
1. A non-empty RuntimeClass handler names a `[runtimes.<handler>]` entry; unknown handlers are refused.
   A handler is written by cluster admins, so it is the only thing that can place a pod above the
   node's default trust.
2. Annotations can only lower trust: CRI-O's `io.kubernetes.cri-o.TrustedSandbox: "false"`,
   containerd's `io.kubernetes.cri.untrusted-workload: "true"` or Tandem's `tandem.dev/trust:
   "untrusted"` ask for a VM. Whoever writes a pod writes its annotations and admission does not
   police them, so `tandem.dev/trust: "trusted"` is ignored (and the reason says so) where the default
   is untrusted. A lowering annotation beside a runc handler contradicts it and is refused.
3. Otherwise `default_workload_trust`.
4. A pod that wants the host (privileged, or the host's network, PID or IPC namespace) is trusted when
   the default is; on an untrusted-by-default node `[policy] host_pods_on_untrusted_node` decides
   (runc, or refuse). A pod that asked for a VM explicitly and for a host namespace is refused, never
   silently weakened; `privileged` alone in such a pod means privileged inside the guest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from core.settings import RuntimeHandler
from protos import cri_pb2 as pb

log = logging.getLogger("tandem.trust")

TANDEM_TRUST = "tandem.dev/trust"
CRIO_TRUSTED = "io.kubernetes.cri-o.TrustedSandbox"
CONTAINERD_UNTRUSTED = "io.kubernetes.cri.untrusted-workload"


@dataclass(frozen=True)
class Decision:
    handler: RuntimeHandler
    reason: str

    @property
    def backend(self) -> str:
        return self.handler.backend


def _lowering_annotation(annotations: Mapping[str, str]) -> str | None:
    """The first annotation that asks for a VM, or None; a malformed Tandem annotation is refused."""
    explicit = annotations.get(TANDEM_TRUST)
    if explicit is not None and explicit not in ("trusted", "untrusted"):
        raise InvalidArgument(f'annotation {TANDEM_TRUST} must be "trusted" or "untrusted", got {explicit!r}')
    if explicit == "untrusted":
        return TANDEM_TRUST
    if annotations.get(CRIO_TRUSTED, "").lower() == "false":
        return CRIO_TRUSTED
    if annotations.get(CONTAINERD_UNTRUSTED, "").lower() == "true":
        return CONTAINERD_UNTRUSTED
    return None


def host_access(config: pb.PodSandboxConfig) -> list[str]:
    """What of the host this pod asks for; empty when it asks for nothing."""
    context = config.linux.security_context
    options = context.namespace_options
    wants = []
    if context.privileged:
        wants.append("privileged")
    if options.network == pb.NODE:
        wants.append("host network")
    if options.pid == pb.NODE:
        wants.append("host PID")
    if options.ipc == pb.NODE:
        wants.append("host IPC")
    return wants


def _handler_for(backend: str, runtimes: Mapping[str, RuntimeHandler]) -> RuntimeHandler:
    """The handler serving pods routed by trust rather than by name: the one named like its backend."""
    if backend in runtimes and runtimes[backend].backend == backend:
        return runtimes[backend]
    for handler in runtimes.values():
        if handler.backend == backend:
            return handler
    raise FailedPrecondition(f"no [runtimes.*] entry has backend = {backend!r}")


def default_backend(default_trust: str) -> str:
    """The backend of pods that name no handler and carry no lowering annotation (the default handler's)."""
    return "runc" if default_trust == "trusted" else "vm"


def _by_default(
    wants_host: list[str],
    runtimes: Mapping[str, RuntimeHandler],
    default_trust: str,
    host_pods_on_untrusted_node: str,
    ignored: str,
) -> Decision:
    """No handler and no lowering annotation: the node's default, and the host-access rule."""
    reason = f"default_workload_trust = {default_trust!r}{ignored}"
    if default_backend(default_trust) == "runc":
        return Decision(_handler_for("runc", runtimes), reason)
    if not wants_host:
        return Decision(_handler_for("vm", runtimes), reason)
    wants = ", ".join(wants_host)
    if host_pods_on_untrusted_node == "runc":
        setting = 'host_pods_on_untrusted_node = "runc"'
        return Decision(_handler_for("runc", runtimes), f"{reason}; pod wants {wants}; {setting}")
    raise PermissionDenied(
        f"pod wants {wants} on a node whose default_workload_trust is 'untrusted', and "
        '[policy] host_pods_on_untrusted_node = "refuse": give it a runtimeClassName whose handler '
        "is a runc one (an admin's RuntimeClass) if it must reach the host"
    )


def decide(
    config: pb.PodSandboxConfig,
    runtime_handler: str,
    runtimes: Mapping[str, RuntimeHandler],
    default_trust: str,
    host_pods_on_untrusted_node: str,
) -> Decision:
    """Pick the backend for a new pod, or refuse it with a reason."""
    wants_host = host_access(config)
    lowering = _lowering_annotation(config.annotations)
    if runtime_handler:
        handler = runtimes.get(runtime_handler)
        if handler is None:
            known = ", ".join(sorted(runtimes)) or "none"
            raise NotFound(f"runtime handler {runtime_handler!r} is not configured (known: {known})")
        explicit = f"runtime handler {runtime_handler!r}"
        if lowering is not None and handler.backend != "vm":
            raise InvalidArgument(
                f"annotation {lowering} asks for a VM but {explicit} runs pods on the {handler.backend} "
                "backend; refusing rather than picking one"
            )
    elif lowering is not None:
        handler = _handler_for("vm", runtimes)
        explicit = f"annotation {lowering}"
    else:
        ignored = ""
        if config.annotations.get(TANDEM_TRUST) == "trusted" and default_trust != "trusted":
            ignored = f"; annotation {TANDEM_TRUST}=trusted ignored: annotations can only lower trust"
            log.warning("annotation cannot raise trust; ignored", extra={"annotation": TANDEM_TRUST})
        return _by_default(wants_host, runtimes, default_trust, host_pods_on_untrusted_node, ignored)
    if handler.backend == "vm":
        host_namespaces = [w for w in wants_host if w != "privileged"]
        if host_namespaces:
            raise InvalidArgument(
                f"pod asks for a VM ({explicit}) and for the {', '.join(host_namespaces)} namespace; "
                "refusing rather than weakening its isolation"
            )
    return Decision(handler, explicit)
