import grpc
import pytest

from core import errors
from cri.errors import MAX_STATUS_MESSAGE, answer_unimplemented, status_code, status_message


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.DataCorruption("x"), grpc.StatusCode.DATA_LOSS),
        (errors.CommandFailed(["runc", "start"], 1, "boom"), grpc.StatusCode.INTERNAL),
        (errors.Internal("agent crashed"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_domain_error_has_its_code(error, code):
    assert status_code(error) == code


def test_status_messages_fit_in_a_trailer():
    """A message echoing a 1 MiB name would arrive as RESOURCE_EXHAUSTED, not as its own code."""
    assert status_message("short") == "short"
    cut = status_message("x" * 2**20)
    assert len(cut) <= MAX_STATUS_MESSAGE and cut.endswith(f"(cut; {2**20} characters in all)")


def test_subclasses_inherit_their_parents_code():
    class BadConfig(errors.InvalidArgument):
        pass

    assert status_code(BadConfig("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_command_failed_carries_the_tail_of_stderr():
    e = errors.CommandFailed(["/usr/sbin/runc", "create"], 1, "line1\nline2\n")
    assert "runc" in str(e) and "line2" in str(e) and e.returncode == 1


async def test_unimplemented_rpcs_name_themselves():
    class Base:
        def Version(self, request, context):
            raise NotImplementedError

        def RunPodSandbox(self, request, context):
            raise NotImplementedError

    class Servicer(Base):
        async def Version(self, request, context):
            return "v"

    answer_unimplemented(Servicer, Base, "RuntimeService")
    assert await Servicer().Version(None, None) == "v"
    with pytest.raises(errors.Unimplemented, match="RuntimeService/RunPodSandbox is not implemented"):
        await Servicer().RunPodSandbox(None, None)
