import pytest

from core.errors import InvalidArgument, NotFound
from core.settings import Config, RuntimeHandler
from protos import cri_pb2 as pb
from sandbox.trust import decide

RUNTIMES = {**Config().runtimes, "kata-fast": RuntimeHandler("kata-fast", "vm", {"memory_mib": 128})}


def pod(annotations=None, privileged=False, network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD):
    config = pb.PodSandboxConfig(annotations=annotations or {})
    context = config.linux.security_context
    context.privileged = privileged
    context.namespace_options.network = network
    context.namespace_options.pid = pid
    context.namespace_options.ipc = ipc
    return config


def backend(config, handler="", default="trusted"):
    return decide(config, handler, RUNTIMES, default)


@pytest.mark.parametrize(
    ("config", "handler", "default", "expected"),
    [
        (pod(), "", "trusted", "runc"),
        (pod(), "", "untrusted", "vm"),
        (pod(), "runc", "untrusted", "runc"),
        (pod(), "vm", "trusted", "vm"),
        (pod(), "kata-fast", "trusted", "vm"),
        (pod({"io.kubernetes.cri-o.TrustedSandbox": "false"}), "", "trusted", "vm"),
        (pod({"io.kubernetes.cri-o.TrustedSandbox": "true"}), "", "untrusted", "vm"),  # "true" is no vote
        (pod({"io.kubernetes.cri.untrusted-workload": "true"}), "", "trusted", "vm"),
        (pod({"tandem.dev/trust": "untrusted"}), "", "trusted", "vm"),
        (pod({"tandem.dev/trust": "trusted"}), "", "untrusted", "runc"),
        # disagreement: untrusted wins
        (pod({"tandem.dev/trust": "trusted", "io.kubernetes.cri.untrusted-workload": "true"}), "", "trusted", "vm"),
        # host access with trust from the default: trusted by definition
        (pod(privileged=True), "", "untrusted", "runc"),
        (pod(network=pb.NODE), "", "untrusted", "runc"),
        (pod(pid=pb.NODE), "", "untrusted", "runc"),
        (pod(ipc=pb.NODE), "", "untrusted", "runc"),
        # privileged alone in an explicitly untrusted pod: privileged inside the guest
        (pod(privileged=True), "vm", "trusted", "vm"),
        (pod({"tandem.dev/trust": "untrusted"}, privileged=True), "", "trusted", "vm"),
        # host namespaces with an explicit runc handler are fine
        (pod(network=pb.NODE), "runc", "untrusted", "runc"),
    ],
)
def test_dispatch_rules(config, handler, default, expected):
    assert backend(config, handler, default).backend == expected


def test_the_handler_entry_and_reason_are_reported():
    decision = backend(pod(), "kata-fast")
    assert decision.handler.name == "kata-fast" and decision.handler.options == {"memory_mib": 128}
    assert "kata-fast" in decision.reason
    assert "default_workload_trust" in backend(pod(), "", "untrusted").reason


def test_unknown_handler_is_refused_by_name():
    with pytest.raises(NotFound, match="'gvisor' is not configured"):
        backend(pod(), "gvisor")


@pytest.mark.parametrize(
    ("config", "handler"),
    [
        (pod(network=pb.NODE), "vm"),
        (pod(pid=pb.NODE), "kata-fast"),
        (pod({"io.kubernetes.cri.untrusted-workload": "true"}, ipc=pb.NODE), ""),
        (pod({"tandem.dev/trust": "untrusted"}, network=pb.NODE, privileged=True), ""),
    ],
)
def test_explicit_vm_with_host_namespaces_is_refused(config, handler):
    with pytest.raises(InvalidArgument, match="refusing rather than weakening"):
        backend(config, handler)


def test_bad_tandem_annotation_is_invalid():
    with pytest.raises(InvalidArgument, match=r"tandem\.dev/trust"):
        backend(pod({"tandem.dev/trust": "sure"}))
