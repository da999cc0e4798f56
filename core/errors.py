"""Domain errors.

Code anywhere in Tandem raises these; exactly one place (the gRPC boundary in
`cri/errors.py`) turns them into status codes, so no module below `cri/` ever
imports grpc to report a failure.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error Tandem reports to a CRI client."""


class NotFound(TandemError):
    """The named object does not exist."""


class AlreadyExists(TandemError):
    """An object with that name or ID exists already."""


class InvalidArgument(TandemError):
    """The request itself is malformed or refers to something unusable."""


class FailedPrecondition(TandemError):
    """The request is well formed but the system is not in a state to honour it."""


class Unimplemented(TandemError):
    """The operation is understood but not supported by this build or backend."""


class Unavailable(TandemError):
    """A dependency (registry, program, VM) could not be reached; retrying may help."""


class PermissionDenied(TandemError):
    """A registry refused the credentials that were offered, or node policy forbids what was asked."""


class DataCorruption(TandemError):
    """Content did not match its digest or size: never used, never kept."""


class DeadlineExceeded(TandemError):
    """An operation ran past its deadline."""


class ResourceExhausted(TandemError):
    """A configured limit (size, count) was reached."""


class Internal(TandemError):
    """Something below Tandem (a guest agent, say) failed in a way the caller cannot fix."""


class CommandFailed(TandemError):
    """An external program exited non-zero; carries its stderr for the operator."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        detail = "; ".join(tail) if tail else "no output"
        super().__init__(f"{argv[0]} exited with {returncode}: {detail}")
