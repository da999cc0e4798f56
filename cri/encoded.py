"""List answers assembled from per-object encodings, so a relist costs a lookup per object, not a conversion.

kubelet's PLEG lists every pod and every container once a second. What a list entry
says about an object changes only with its state (everything else in a `PodSandbox`
or a `Container` is fixed when the object is made), so each entry is encoded once per
state and kept in the record's memo, and an answer is its entries' bytes joined: in
the protobuf wire format a repeated field is the concatenation of its elements, so
`Answer(items=[a]) + Answer(items=[b])` is exactly `Answer(items=[a, b])`.

The gRPC server has to send such an answer as it is: `add_servicer` registers a
servicer with response serializers that pass an `Encoded` answer through.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import grpc


class Encoded:
    """A response message already in wire format: the server sends its bytes as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Memoized(Protocol):
    @property
    def memo(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Memoized)


class EntryCache(Generic[R]):
    """The encoded list entry of each record, made again only when the record's `key` changes.

    `encode(record)` must give a whole one-entry answer (`Answer(items=[entry])` serialized), and must
    depend on nothing of the record but what `key(record)` returns and what never changes.
    """

    def __init__(self, name: str, key: Callable[[R], Hashable], encode: Callable[[R], bytes]) -> None:
        self._name = name
        self._key = key
        self._encode = encode

    def entry(self, record: R) -> bytes:
        key = self._key(record)
        cached = record.memo.get(self._name)
        if cached is not None and cached[0] == key:
            return cached[1]
        encoded = self._encode(record)
        record.memo[self._name] = (key, encoded)
        return encoded

    def answer(self, records: Iterable[R]) -> Encoded:
        """The list answer holding every record's entry, in order."""
        return Encoded(b"".join(map(self.entry, records)))


def _passing_encoded(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message.data if isinstance(message, Encoded) else serializer(message)

    return serialize


class _EncodedAware:
    """Stands in for the server while a generated `add_*_to_server` registers its handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Registered again, wrapped, from `add_registered_method_handlers` (which takes precedence)."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {
            name: handler._replace(response_serializer=_passing_encoded(handler.response_serializer))
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)


def add_servicer(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """`add(servicer, server)` (a generated `add_*Servicer_to_server`), its answers allowed to be `Encoded`."""
    add(servicer, _EncodedAware(server))
