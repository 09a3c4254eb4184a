"""Typed domain errors and the one place where any exception becomes a gRPC status."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import torch

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]


class LouverError(Exception):
    """Base of the service's domain errors; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def trailing_metadata(self) -> Metadata:
        """Extra trailing metadata sent with the status (machine-readable details)."""
        return ()


class InvalidArgument(LouverError):
    """A field of the request is malformed (shape, dtype, layer, position, policy...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LouverError):
    """The named session does not exist (never created, deleted or evicted)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LouverError):
    """A session with the requested id exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LouverError):
    """The request is valid but the state does not allow it (attention on an empty layer)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(LouverError):
    """The server is draining and accepts no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LouverError):
    """The call carries no valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(LouverError):
    """The call's deadline passed between two units of work."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LouverError):
    """The client cancelled the call."""

    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(LouverError):
    """Memory budget or a count limit would be exceeded; nothing was applied.

    Byte details (when known) are repeated in the message and in trailing metadata as
    ``louver-requested-bytes``, ``louver-available-bytes`` and ``louver-budget-bytes``.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, requested_bytes: int | None = None,
                 available_bytes: int | None = None, budget_bytes: int | None = None) -> None:
        self.requested_bytes = requested_bytes
        self.available_bytes = available_bytes
        self.budget_bytes = budget_bytes
        details = ", ".join(f"{k}={v}" for k, v in self._details())
        super().__init__(f"{message} ({details})" if details else message)

    def _details(self) -> list[tuple[str, int]]:
        pairs = [("requested_bytes", self.requested_bytes),
                 ("available_bytes", self.available_bytes),
                 ("budget_bytes", self.budget_bytes)]
        return [(k, v) for k, v in pairs if v is not None]

    def trailing_metadata(self) -> Metadata:
        return tuple((f"louver-{k.replace('_', '-')}", str(v)) for k, v in self._details())


@dataclass(frozen=True)
class Status:
    """A gRPC status to end a call with."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: Metadata = ()


def to_status(exc: BaseException, method: str = "") -> Status:
    """Map any exception to the status a call ends with.

    Domain errors keep their code; ValueError (including the codec's CodecError and the
    kernels' input errors) is INVALID_ARGUMENT; out-of-memory is RESOURCE_EXHAUSTED;
    cancellation is CANCELLED; anything else is INTERNAL, logged with its traceback, and its
    message is not sent to the client.
    """
    if isinstance(exc, LouverError):
        return Status(exc.code, exc.message, exc.trailing_metadata())
    if isinstance(exc, ValueError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        return Status(grpc.StatusCode.CANCELLED, "call cancelled")
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        logger.warning("%s: out of memory: %s", method, exc)
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}")
    logger.error("%s: unexpected error", method, exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
