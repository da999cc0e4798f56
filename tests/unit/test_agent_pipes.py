"""The agent's pipes: its own end non-blocking (asyncio), the child's end blocking.

O_NONBLOCK belongs to the open file, not the descriptor, so a child given a
non-blocking end gets EAGAIN from a full pipe: `cat` of 100 KiB through `crictl
exec -i` failed with "write error: Resource temporarily unavailable" under crun
(runc's Go runtime happened to reset the flag).
"""

from __future__ import annotations

import os

from vm_backend.agent.procs import input_pipe, output_pipe


def test_output_pipe_reads_without_blocking_and_writes_blocking() -> None:
    ours, theirs = output_pipe()
    try:
        assert not os.get_blocking(ours)
        assert os.get_blocking(theirs)
    finally:
        os.close(ours)
        os.close(theirs)


def test_input_pipe_writes_without_blocking_and_reads_blocking() -> None:
    theirs, ours = input_pipe()
    try:
        assert not os.get_blocking(ours)
        assert os.get_blocking(theirs)
    finally:
        os.close(ours)
        os.close(theirs)
