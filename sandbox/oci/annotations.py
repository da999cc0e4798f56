"""The annotations containerd puts on specs, so tools that read them (and the guest agent) know what a spec is."""

from __future__ import annotations

from protos import cri_pb2 as pb

ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_SANDBOX_LOG_DIRECTORY = "io.kubernetes.cri.sandbox-log-directory"
ANNOTATION_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANNOTATION_IMAGE_NAME = "io.kubernetes.cri.image-name"


def sandbox_annotations(sandbox: pb.PodSandboxConfig, sandbox_id: str) -> dict[str, str]:
    return {
        ANNOTATION_SANDBOX_ID: sandbox_id,
        ANNOTATION_SANDBOX_NAME: sandbox.metadata.name,
        ANNOTATION_SANDBOX_NAMESPACE: sandbox.metadata.namespace,
        ANNOTATION_SANDBOX_UID: sandbox.metadata.uid,
    }
