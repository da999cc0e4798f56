import itertools

import pytest

from core.errors import InvalidArgument, NotFound, PermissionDenied
from core.settings import Config, RuntimeHandler
from protos import cri_pb2 as pb
from sandbox.trust import decide

RUNTIMES = {**Config().runtimes, "kata-fast": RuntimeHandler("kata-fast", "vm", {"memory_mib": 128})}

CRIO = "io.kubernetes.cri-o.TrustedSandbox"
CONTAINERD = "io.kubernetes.cri.untrusted-workload"
TANDEM = "tandem.dev/trust"


def pod(annotations=None, privileged=False, network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD):
    config = pb.PodSandboxConfig(annotations=annotations or {})
    context = config.linux.security_context
    context.privileged = privileged
    context.namespace_options.network = network
    context.namespace_options.pid = pid
    context.namespace_options.ipc = ipc
    return config


def backend(config, handler="", default="trusted", host_pods="refuse"):
    return decide(config, handler, RUNTIMES, default, host_pods)


# ---- the whole table, generated -----------------------------------------------------------------
#
# The expectation is computed from these small tables, written from design §2 and the README, not
# from sandbox/trust.py. Each dimension lists (label, value) pairs.

DEFAULTS = ("trusted", "untrusted")
HANDLERS = {"": None, "runc": "runc", "vm": "vm", "kata-fast": "vm", "gvisor": "unknown"}
CRIO_VALUES = {"absent": None, "lowering": "false", "no vote": "true"}
CONTAINERD_VALUES = {"absent": None, "lowering": "true", "no vote": "false"}
TANDEM_VALUES = {"absent": None, "trusted": "trusted", "untrusted": "untrusted", "garbage": "sure"}
HOST_ACCESS = {
    "none": {},
    "privileged": {"privileged": True},
    "host network": {"network": pb.NODE},
    "host PID": {"pid": pb.NODE},
    "host IPC": {"ipc": pb.NODE},
    "privileged + host network": {"privileged": True, "network": pb.NODE},
}
HOST_POD_POLICIES = ("runc", "refuse")

# Which annotation values lower trust; nothing else is a vote ("trusted" only ever matches the default).
LOWERING = {CRIO: {"false"}, CONTAINERD: {"true"}, TANDEM: {"untrusted"}}
# The outcome when a handler names the backend, by (handler backend, annotations lowered trust).
WITH_HANDLER = {("runc", False): "runc", ("runc", True): "INVALID_ARGUMENT", ("vm", False): "vm", ("vm", True): "vm"}
# The outcome with no handler and no lowering annotation, by (default trust, host access wanted, policy).
BY_DEFAULT = {
    ("trusted", False, "runc"): "runc",
    ("trusted", False, "refuse"): "runc",
    ("trusted", True, "runc"): "runc",
    ("trusted", True, "refuse"): "runc",
    ("untrusted", False, "runc"): "vm",
    ("untrusted", False, "refuse"): "vm",
    ("untrusted", True, "runc"): "runc",
    ("untrusted", True, "refuse"): "PERMISSION_DENIED",
}


def expected_outcome(default, handler, annotations, host, policy):
    """The backend ("runc", "vm") or the error code the table above says this pod gets."""
    if annotations.get(TANDEM, "trusted") not in ("trusted", "untrusted"):
        return "INVALID_ARGUMENT"
    lowered = any(annotations.get(key) in values for key, values in LOWERING.items())
    host_namespace = any(k in host for k in ("network", "pid", "ipc"))
    if handler:
        if HANDLERS[handler] == "unknown":
            return "NOT_FOUND"
        outcome = WITH_HANDLER[(HANDLERS[handler], lowered)]
        explicit_vm = outcome == "vm"
    elif lowered:
        outcome, explicit_vm = "vm", True
    else:
        return BY_DEFAULT[(default, bool(host), policy)]
    if explicit_vm and host_namespace:
        return "INVALID_ARGUMENT"
    return outcome


ERRORS = {InvalidArgument: "INVALID_ARGUMENT", NotFound: "NOT_FOUND", PermissionDenied: "PERMISSION_DENIED"}


def actual_outcome(default, handler, annotations, host, policy):
    try:
        return backend(pod(annotations, **host), handler, default, policy).backend
    except tuple(ERRORS) as e:
        return ERRORS[type(e)]


def _cases():
    for default, handler, crio, containerd, tandem, host, policy in itertools.product(
        DEFAULTS, HANDLERS, CRIO_VALUES, CONTAINERD_VALUES, TANDEM_VALUES, HOST_ACCESS, HOST_POD_POLICIES
    ):
        values = {CRIO: CRIO_VALUES[crio], CONTAINERD: CONTAINERD_VALUES[containerd], TANDEM: TANDEM_VALUES[tandem]}
        annotations = {k: v for k, v in values.items() if v is not None}
        labels = f"crio={crio}|containerd={containerd}|tandem={tandem}"
        case_id = f"{default}|handler={handler or '-'}|{labels}|{host}|{policy}"
        yield pytest.param(default, handler, annotations, HOST_ACCESS[host], policy, id=case_id)


@pytest.mark.parametrize(("default", "handler", "annotations", "host", "policy"), list(_cases()))
def test_trust_table(default, handler, annotations, host, policy):
    assert actual_outcome(default, handler, annotations, host, policy) == expected_outcome(
        default, handler, annotations, host, policy
    )


def test_the_table_covers_every_outcome():
    outcomes = {expected_outcome(*case.values) for case in _cases()}
    assert outcomes == {"runc", "vm", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"}


# ---- what the table does not show: reasons and messages -------------------------------------------


def test_the_handler_entry_and_reason_are_reported():
    decision = backend(pod(), "kata-fast")
    assert decision.handler.name == "kata-fast" and decision.handler.options == {"memory_mib": 128}
    assert "kata-fast" in decision.reason
    assert "default_workload_trust" in backend(pod(), "", "untrusted").reason


def test_an_annotation_asking_for_trust_is_ignored_and_the_reason_says_so():
    decision = backend(pod({TANDEM: "trusted"}), "", "untrusted")
    assert decision.backend == "vm"
    assert "default_workload_trust" in decision.reason
    assert f"{TANDEM}=trusted ignored" in decision.reason and "only lower trust" in decision.reason
    assert "ignored" not in backend(pod({TANDEM: "trusted"}), "", "trusted").reason


def test_unknown_handler_is_refused_by_name():
    with pytest.raises(NotFound, match="'gvisor' is not configured"):
        backend(pod(), "gvisor")


def test_explicit_vm_with_host_namespaces_is_refused_with_the_reason():
    with pytest.raises(InvalidArgument, match="refusing rather than weakening"):
        backend(pod({CONTAINERD: "true"}, ipc=pb.NODE))


def test_a_runc_handler_with_a_lowering_annotation_is_refused():
    with pytest.raises(InvalidArgument, match=f"{CRIO}.*runtime handler 'runc'"):
        backend(pod({CRIO: "false"}), "runc")


def test_host_pods_on_an_untrusted_node_are_refused_with_the_setting_and_the_way_out():
    with pytest.raises(PermissionDenied) as err:
        backend(pod(network=pb.NODE), "", "untrusted", "refuse")
    assert "host_pods_on_untrusted_node" in str(err.value) and "runtimeClassName" in str(err.value)
    decision = backend(pod(privileged=True), "", "untrusted", "runc")
    assert decision.backend == "runc" and "host_pods_on_untrusted_node" in decision.reason


def test_bad_tandem_annotation_is_invalid():
    with pytest.raises(InvalidArgument, match=r"tandem\.dev/trust"):
        backend(pod({TANDEM: "sure"}))
