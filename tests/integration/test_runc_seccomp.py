"""RuntimeDefault seccomp, measured: tiny static programs make one system call each in runc containers.

Each program exits with the call's errno, or 200 when it succeeded, so the filter runc actually
loads is what the assertions see. Besides x86_64 they include i386 programs, which an x86_64
kernel with IA32 emulation runs, and whose socket calls go through socketcall(2).
"""

from __future__ import annotations

import struct

import pytest

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.pods import container_config, pod_config, pod_leftovers
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration

AF_INET, AF_VSOCK, SOCK_STREAM = 2, 40, 1
OK, EPERM, SIGSYS_KILLED = 200, 1, 128 + 31


def _elf(machine: int, code: bytes) -> bytes:
    """A static ELF (i386 for machine 3, x86_64 for 62) of one loadable segment that starts at `code`."""
    wide = machine == 62
    base = 0x400000 if wide else 0x08048000
    ehdr, phdr = (64, 56) if wide else (52, 32)
    size = ehdr + phdr + len(code)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)
    layout = "<HHIQQQIHHHHHH" if wide else "<HHIIIIIHHHHHH"
    header = ident + struct.pack(layout, 2, machine, 1, base + ehdr + phdr, ehdr, 0, 0, ehdr, phdr, 1, 0, 0, 0)
    if wide:
        program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    else:
        program = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    return header + program + code


def x86_64_program(number: int, *args: int) -> bytes:
    """syscall(number, args...) with all 64 bits of each argument; exit(-rax), or exit(200) if rax >= 0."""
    code = b"\xb8" + struct.pack("<I", number)  # mov eax, number
    for opcode, arg in zip((b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba"), args, strict=False):
        code += opcode + struct.pack("<Q", arg)  # mov rdi / rsi / rdx / r10, arg
    code += b"\x0f\x05"  # syscall
    code += bytes.fromhex("4885c0 7807 bfc8000000 eb05 48f7d8 89c7 b83c000000 0f05")
    # test rax, rax; js +7; mov edi, 200; jmp +5; neg rax; mov edi, eax; mov eax, 60 (exit); syscall
    return _elf(62, code)


def i386_program(number: int, *args: int, memory_args: tuple[int, ...] = ()) -> bytes:
    """int 0x80 with eax = number, ebx/ecx/edx = args; `memory_args` are pushed and ecx points at them
    (socketcall's calling convention). Exits like x86_64_program."""
    code = b"".join(b"\x68" + struct.pack("<i", arg) for arg in reversed(memory_args))  # push arg
    if memory_args:
        code += b"\x89\xe1"  # mov ecx, esp
    code += b"\xb8" + struct.pack("<I", number)  # mov eax, number
    for opcode, arg in zip((b"\xbb", b"\xb9", b"\xba"), args, strict=False):
        code += opcode + struct.pack("<i", arg)  # mov ebx / ecx / edx, arg
    code += b"\xcd\x80"  # int 0x80
    code += bytes.fromhex("85c0 7807 bbc8000000 eb04 f7d8 89c3 b801000000 cd80")
    # test eax, eax; js +7; mov ebx, 200; jmp +4; neg eax; mov ebx, eax; mov eax, 1 (exit); int 0x80
    return _elf(3, code)


PROBES = {
    # name: (program, exit code under RuntimeDefault, exit code unconfined)
    "socket-inet": (x86_64_program(41, AF_INET, SOCK_STREAM, 0), OK, OK),
    "socket-vsock": (x86_64_program(41, AF_VSOCK, SOCK_STREAM, 0), EPERM, OK),
    # the kernel reads an int: this is AF_VSOCK, and a 64-bit "family >= 41" rule let it through
    "socket-vsock-high-bits": (x86_64_program(41, 1 << 32 | AF_VSOCK, SOCK_STREAM, 0), EPERM, OK),
    "socketpair-vsock": (x86_64_program(53, AF_VSOCK, SOCK_STREAM, 0, 0), EPERM, None),
    "i386-exit": (i386_program(1, 42), SIGSYS_KILLED, 42),
    # socketcall(SYS_SOCKET, [AF_VSOCK, SOCK_STREAM, 0]): the family sits in memory, out of seccomp's sight
    "i386-socketcall-vsock": (i386_program(102, 1, memory_args=(AF_VSOCK, SOCK_STREAM, 0)), SIGSYS_KILLED, OK),
}


@pytest.fixture(scope="module")
def probe_containers(tmp_path_factory):
    """Two running containers of an image holding the probes, one under RuntimeDefault, one unconfined."""
    tmp = tmp_path_factory.mktemp("seccomp")
    files = {f"probe/{name}": (program, 0o755) for name, (program, _, _) in PROBES.items()}
    with LocalRegistry() as registry:
        push(registry.host, "test/probes", "1", busybox_image(files))
        daemon = TandemDaemon.isolated(tmp).start()
        image = f"{registry.host}/test/probes:1"
        daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    pod = pod_config("seccomp", tmp / "logs")
    pod.linux.security_context.namespace_options.network = pb.NODE
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    containers = {}
    for profile in (pb.SecurityProfile.RuntimeDefault, pb.SecurityProfile.Unconfined):
        config = container_config(f"probes-{profile}", image, "sleep", "3600")
        config.linux.security_context.seccomp.profile_type = profile
        request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        containers[profile] = daemon.runtime.CreateContainer(request).container_id
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=containers[profile]))
    yield daemon, containers
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    leftovers = pod_leftovers(daemon, ("conmon",), (str(daemon.state_dir), str(daemon.socket.parent)))
    daemon.stop()
    daemon.unmount_workdir(tmp)
    assert leftovers == []


def _run(daemon, cid, name):
    result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=[f"/probe/{name}"], timeout=10))
    assert result.stderr == b""
    return result.exit_code


@pytest.mark.parametrize("name", sorted(PROBES))
def test_runtime_default(probe_containers, name):
    daemon, containers = probe_containers
    assert _run(daemon, containers[pb.SecurityProfile.RuntimeDefault], name) == PROBES[name][1]


@pytest.mark.parametrize("name", sorted(n for n, probe in PROBES.items() if probe[2] is not None))
def test_the_probes_do_what_they_say_without_a_filter(probe_containers, name):
    daemon, containers = probe_containers
    assert _run(daemon, containers[pb.SecurityProfile.Unconfined], name) == PROBES[name][2]
