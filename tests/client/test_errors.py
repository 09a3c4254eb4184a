"""The one exception type: conversion from gRPC errors and local exceptions, and the status
codes (with details) the real server sends."""

from __future__ import annotations

import pickle

import grpc
import pytest
import torch

from louver_client import LocalSession, LouverClient, LouverError
from louver_client.errors import error_from_exception, translate_errors
from louver_client.loopback import start_in_thread
from tests.client.conftest import GEOMETRY, random_kv

L, HQ, HKV, D, DV = GEOMETRY


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing


def test_from_rpc_error() -> None:
    err = LouverError.from_rpc_error(FakeRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget",
        (("louver-requested-bytes", "100"), ("bin-bin", b"\x00"))))
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details == "over budget"
    assert err.metadata == {"louver-requested-bytes": "100"}
    assert str(err) == "RESOURCE_EXHAUSTED: over budget"
    assert not err.retryable
    assert LouverError.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "")).retryable
    bare = LouverError.from_rpc_error(grpc.RpcError())
    assert bare.code is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(("exc", "code"), [
    (ValueError("bad shape"), grpc.StatusCode.INVALID_ARGUMENT),
    (TypeError("bad type"), grpc.StatusCode.INVALID_ARGUMENT),
    (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    (FakeRpcError(grpc.StatusCode.NOT_FOUND, "nope"), grpc.StatusCode.NOT_FOUND),
])
def test_error_from_exception(exc: BaseException, code: grpc.StatusCode) -> None:
    assert error_from_exception(exc).code is code
    with pytest.raises(LouverError) as info, translate_errors():
        raise exc
    assert info.value.code is code and info.value.__cause__ is exc


def test_pickle_round_trip() -> None:
    err = LouverError(grpc.StatusCode.NOT_FOUND, "gone", {"k": "v"})
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.details, back.metadata) == (err.code, err.details, err.metadata)


def test_local_session_raises_louver_error_for_kernel_errors() -> None:
    with pytest.raises(LouverError) as info:
        LocalSession(L, HQ, HKV, 18)  # 4 subspaces do not divide head_dim 18
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    s = LocalSession(L, HQ, HKV, D, DV, torch.float16)
    with pytest.raises(LouverError) as info:  # float32 -> float16 overflows to inf
        s.prefill(0, torch.full((HKV, 2, D), 1e6), torch.zeros(HKV, 2, DV))
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_memory_budget_is_resource_exhausted_with_details() -> None:
    with start_in_thread(memory_budget_bytes=256 << 10) as srv, LouverClient(srv.target) as c:
        with pytest.raises(LouverError) as info:
            c.create_session(L, HQ, HKV, D, DV, expected_tokens=1 << 20)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        s = c.create_session(L, HQ, HKV, D, DV)
        with pytest.raises(LouverError) as info:
            s.prefill(0, *random_kv(20_000))
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(info.value.metadata["louver-budget-bytes"]) == 256 << 10


def test_message_over_the_server_limit_is_resource_exhausted() -> None:
    with start_in_thread(max_message_bytes=64 << 10) as srv, \
            LouverClient(srv.target, max_message_bytes=16 << 20) as c:
        s = c.create_session(L, HQ, HKV, D, DV, torch.float32)
        with pytest.raises(LouverError) as info:
            s.prefill(0, *random_kv(2000), chunk_tokens=2000)  # one 192 KiB message
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        s.prefill(0, *random_kv(2000), chunk_tokens=100)  # chunked under the limit
