"""Trust dispatch: which backend runs a pod. Decided once, at RunPodSandbox, and never changed.

The rules (design §2), in order:
1. A non-empty RuntimeClass handler names a `[runtimes.<handler>]` entry; unknown handlers are refused.
2. With no handler, annotations decide: CRI-O's `io.kubernetes.cri-o.TrustedSandbox: "false"`,
   containerd's `io.kubernetes.cri.untrusted-workload: "true"`, or Tandem's own `tandem.dev/trust`
   ("trusted" or "untrusted"). When annotations disagree, untrusted wins.
3. Otherwise `default_workload_trust`.
4. A pod that wants the host (privileged, or the host's network, PID or IPC namespace) is trusted
   when trust came from the default; when it asked for a VM explicitly it is refused, never
   silently weakened. `privileged` alone in an explicitly untrusted pod means privileged inside the guest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.settings import RuntimeHandler
from protos import cri_pb2 as pb

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


def _annotated_trust(annotations: Mapping[str, str]) -> tuple[str, str] | None:
    """The trust the annotations ask for and which annotation said so, or None when they are silent."""
    votes: list[tuple[str, str]] = []
    explicit = annotations.get(TANDEM_TRUST)
    if explicit is not None:
        if explicit not in ("trusted", "untrusted"):
            raise InvalidArgument(f'annotation {TANDEM_TRUST} must be "trusted" or "untrusted", got {explicit!r}')
        votes.append((explicit, TANDEM_TRUST))
    if annotations.get(CRIO_TRUSTED, "").lower() == "false":
        votes.append(("untrusted", CRIO_TRUSTED))
    if annotations.get(CONTAINERD_UNTRUSTED, "").lower() == "true":
        votes.append(("untrusted", CONTAINERD_UNTRUSTED))
    if not votes:
        return None
    return next((v for v in votes if v[0] == "untrusted"), votes[0])


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


def decide(
    config: pb.PodSandboxConfig,
    runtime_handler: str,
    runtimes: Mapping[str, RuntimeHandler],
    default_trust: str,
) -> Decision:
    """Pick the backend for a new pod, or refuse it with a reason."""
    wants_host = host_access(config)
    if runtime_handler:
        handler = runtimes.get(runtime_handler)
        if handler is None:
            known = ", ".join(sorted(runtimes)) or "none"
            raise NotFound(f"runtime handler {runtime_handler!r} is not configured (known: {known})")
        explicit = f"runtime handler {runtime_handler!r}"
    else:
        annotated = _annotated_trust(config.annotations)
        if annotated is None:
            if wants_host:
                return Decision(_handler_for("runc", runtimes), f"default trust; pod wants {', '.join(wants_host)}")
            backend = "vm" if default_trust == "untrusted" else "runc"
            return Decision(_handler_for(backend, runtimes), f"default_workload_trust = {default_trust!r}")
        trust, annotation = annotated
        handler = _handler_for("vm" if trust == "untrusted" else "runc", runtimes)
        explicit = f"annotation {annotation}"
    if handler.backend == "vm":
        host_namespaces = [w for w in wants_host if w != "privileged"]
        if host_namespaces:
            raise InvalidArgument(
                f"pod asks for a VM ({explicit}) and for the {', '.join(host_namespaces)} namespace; "
                "refusing rather than weakening its isolation"
            )
    return Decision(handler, explicit)
