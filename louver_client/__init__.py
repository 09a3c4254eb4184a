"""louver_client: the Python SDK of the Louver KV-cache service.

- :class:`LouverClient` / :class:`AsyncLouverClient`: gRPC clients (sessions, batched attention,
  the bidirectional Decode stream), with deadlines, message-size limits and retries of
  idempotent calls.
- :class:`LocalSession`: the same session interface running ``louver_kernels`` in-process.
- :mod:`louver_client.hf`: decode-time attention of a transformers model served by a session.

Every error is a :class:`LouverError` carrying a ``grpc.StatusCode``.
"""

from louver_client.client import (
    AsyncAppender,
    AsyncDecoder,
    AsyncLouverClient,
    AsyncRemoteSession,
    LouverClient,
    RemoteSession,
    RetryPolicy,
)
from louver_client.errors import LouverError
from louver_client.local import LocalSession
from louver_client.session import Appender, Decoder, Session
from louver_client.types import AppendResult, AttendItem, AttendOutput, Geometry, SessionInfo
from louver_kernels import Dense, Fixed, IndexConfig, IndexKind, Mass, Policy, Relative, TopK

__all__ = [
    "Appender",
    "AppendResult",
    "AsyncAppender",
    "AsyncDecoder",
    "AsyncLouverClient",
    "AsyncRemoteSession",
    "AttendItem",
    "AttendOutput",
    "Decoder",
    "Dense",
    "Fixed",
    "Geometry",
    "IndexConfig",
    "IndexKind",
    "LocalSession",
    "LouverClient",
    "LouverError",
    "Mass",
    "Policy",
    "Relative",
    "RemoteSession",
    "RetryPolicy",
    "Session",
    "SessionInfo",
    "TopK",
]
