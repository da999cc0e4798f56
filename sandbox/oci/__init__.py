"""The shared OCI layer: CRI requests become OCI runtime specs here, once, for both backends.

The spec is built by concern (process, users, mounts, devices, capabilities,
seccomp, resources, namespaces, annotations) and typed (`model`); a backend says
where a container will run (`platform`) and gets the finished spec to run.
Container root filesystems are mounted here too (`rootfs`), for both backends.
"""
