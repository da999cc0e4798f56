"""The one exception agent code raises to answer a request with an error."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protos import agent_pb2


class Fail(Exception):
    """A request failed in a way the host should see: `code` is the Response's ErrorCode."""

    def __init__(self, code: agent_pb2.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
