"""The SDK's one exception type, :class:`LouverError`, and conversion from everything else.

Every failure a caller can see from ``louver_client`` is a LouverError whose ``code`` is a
``grpc.StatusCode``: errors of remote calls keep the server's status, and the in-process
:class:`~louver_client.local.LocalSession` raises the code the server would use for the same
mistake (INVALID_ARGUMENT for bad shapes, dtypes, layers, positions and policies,
FAILED_PRECONDITION for attention on a layer that holds no keys, and so on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
import torch

__all__ = ["LouverError", "error_from_exception", "translate_errors"]


class LouverError(Exception):
    """A failed Louver operation, remote or local.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        details: the human-readable message (the server's status details for remote calls).
        metadata: trailing metadata of the failed call (lower-case keys), e.g. the byte counts
            ``louver-requested-bytes`` / ``louver-available-bytes`` / ``louver-budget-bytes`` of
            a RESOURCE_EXHAUSTED; empty for local errors.
    """

    def __init__(self, code: grpc.StatusCode, details: str,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.metadata: dict[str, str] = dict(metadata or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.details, self.metadata))

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (the server was unavailable)."""
        return self.code is grpc.StatusCode.UNAVAILABLE

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> LouverError:
        """Convert a ``grpc.RpcError`` (sync call, stream or ``grpc.aio.AioRpcError``)."""
        code_fn = getattr(exc, "code", None)
        details_fn = getattr(exc, "details", None)
        code = code_fn() if callable(code_fn) else None
        details = details_fn() if callable(details_fn) else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        metadata: dict[str, str] = {}
        trailing_fn = getattr(exc, "trailing_metadata", None)
        trailing = trailing_fn() if callable(trailing_fn) else None
        for key, value in trailing or ():
            if isinstance(value, bytes):
                continue
            metadata[str(key).lower()] = str(value)
        return cls(code, details or str(exc) or code.name, metadata)


def error_from_exception(exc: BaseException) -> LouverError:
    """The LouverError equivalent of any exception, using the server's mapping.

    LouverError is returned as is; ``grpc.RpcError`` keeps its status; ValueError (the kernels'
    and the codec's input errors) is INVALID_ARGUMENT; TypeError (a wrong argument type) is
    INVALID_ARGUMENT; out-of-memory is RESOURCE_EXHAUSTED; TimeoutError is DEADLINE_EXCEEDED;
    cancellation is CANCELLED; anything else is INTERNAL.
    """
    if isinstance(exc, LouverError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return LouverError.from_rpc_error(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return LouverError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return LouverError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}")
    if isinstance(exc, TimeoutError):
        return LouverError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded")
    if isinstance(exc, asyncio.CancelledError):
        return LouverError(grpc.StatusCode.CANCELLED, "cancelled")
    return LouverError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise any exception from the block as the equivalent LouverError (chained).

    KeyboardInterrupt, SystemExit and GeneratorExit pass through untouched.
    """
    try:
        yield
    except LouverError:
        raise
    except Exception as exc:  # noqa: BLE001 - converted, not swallowed
        raise error_from_exception(exc) from exc


def invalid_argument(details: str) -> LouverError:
    """A LouverError with INVALID_ARGUMENT."""
    return LouverError(grpc.StatusCode.INVALID_ARGUMENT, details)


def failed_precondition(details: str) -> LouverError:
    """A LouverError with FAILED_PRECONDITION."""
    return LouverError(grpc.StatusCode.FAILED_PRECONDITION, details)


def not_found(details: str) -> LouverError:
    """A LouverError with NOT_FOUND."""
    return LouverError(grpc.StatusCode.NOT_FOUND, details)
