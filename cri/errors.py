"""The one place where domain errors become gRPC status codes.

Servicers raise `core.errors` exceptions like any other code; the interceptor
here turns them into statuses, logs unexpected failures with a traceback, and
times every call.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

from core import errors

log = logging.getLogger("tandem.cri")

# A status message travels in a trailer (gRPC's default metadata limit is 8 KiB): a longer one, say
# echoing a hostile 1 MiB name, would reach the client as RESOURCE_EXHAUSTED instead of its code.
MAX_STATUS_MESSAGE = 2048

STATUS_CODES: dict[type[errors.TandemError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DataCorruption: grpc.StatusCode.DATA_LOSS,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CommandFailed: grpc.StatusCode.INTERNAL,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_code(error: errors.TandemError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.UNKNOWN


def status_message(text: str) -> str:
    """`text` cut to MAX_STATUS_MESSAGE characters, saying so."""
    if len(text) <= MAX_STATUS_MESSAGE:
        return text
    return f"{text[: MAX_STATUS_MESSAGE - 40]}... (cut; {len(text)} characters in all)"


async def _abort(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, errors.TandemError):
        code = status_code(error)
        message = status_message(str(error))
        log.info("rpc failed", extra={"method": method, "code": code.name, "error": message})
        await context.abort(code, message)
    log.exception("rpc crashed", extra={"method": method}, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, status_message(f"internal error: {type(error).__name__}: {error}"))


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler, once per method (the wrapper is kept: kubelet calls the list methods
    every second). grpc's type stubs describe handlers of the sync server; the aio server takes
    coroutines and async generators in the same places, hence the casts below."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}  # method -> (its handler, the wrapper)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Handler, method: str) -> Handler:
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    return await cast(Any, inner)(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, method, e)
                finally:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("rpc", extra={"method": method, "ms": round((time.monotonic() - started) * 1000, 2)})

            return grpc.unary_unary_rpc_method_handler(
                cast(Any, unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    responses: Any = cast(Any, inner_stream)(request, context)
                    if inspect.isawaitable(responses):
                        await responses
                        return
                    async for response in responses:
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, method, e)

            return grpc.unary_stream_rpc_method_handler(
                cast(Any, stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def answer_unimplemented(servicer: type, generated_base: type, service: str) -> None:
    """Give every RPC `servicer` does not define an UNIMPLEMENTED answer that names it.

    The generated base answers with a bare "Method not implemented!"; an
    operator deserves to know which call this Tandem does not serve.
    """
    for name, member in vars(generated_base).items():
        if name.startswith("_") or not callable(member) or name in vars(servicer):
            continue

        def make(rpc: str) -> Callable[..., Awaitable[None]]:
            async def unimplemented(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
                raise errors.Unimplemented(f"{service}/{rpc} is not implemented by this version of Tandem")

            unimplemented.__name__ = rpc
            return unimplemented

        setattr(servicer, name, make(name))
