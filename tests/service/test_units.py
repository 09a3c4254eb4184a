"""Unit tests of the pieces with no server: error mapping, geometry rules and batch planning."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import torch

from louver_kernels import IndexConfig, Relative
from louver_proto.codec import CodecError, geometry_problem
from louver_service.engine import AttendJob, plan_batches
from louver_service.errors import InvalidArgument, ResourceExhausted, Unavailable, to_status
from louver_service.metrics import Metrics
from louver_service.sessions import Geometry, Session, SessionSpec


def test_to_status() -> None:
    st = to_status(ResourceExhausted("too big", requested_bytes=10, available_bytes=3,
                                     budget_bytes=100))
    assert st.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requested_bytes=10" in st.message and "budget_bytes=100" in st.message
    assert dict(st.trailing_metadata) == {"louver-requested-bytes": "10",
                                          "louver-available-bytes": "3",
                                          "louver-budget-bytes": "100"}
    assert to_status(Unavailable("draining")).code == grpc.StatusCode.UNAVAILABLE
    assert to_status(CodecError("q: bad")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(ValueError("kernel says no")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(asyncio.CancelledError()).code == grpc.StatusCode.CANCELLED
    internal = to_status(RuntimeError("secret detail"), "Attend")
    assert internal.code == grpc.StatusCode.INTERNAL and "secret" not in internal.message


def _session(name: str, dtype: torch.dtype = torch.float16) -> Session:
    g = Geometry(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, value_dim=16,
                 dtype=dtype)
    return Session(name, SessionSpec(g, IndexConfig(), Relative(1e-3)), torch.device("cpu"))


def test_geometry_rules_are_shared_by_sdk_and_server() -> None:
    from louver_client.errors import LouverError as ClientError
    from louver_client.types import Geometry as ClientGeometry

    ok: dict[str, Any] = {"num_layers": 2, "num_q_heads": 9, "num_kv_heads": 3,
                          "head_dim": 64, "value_dim": 64}
    assert geometry_problem(ok, torch.float16) is None
    cases: list[tuple[dict[str, Any], torch.dtype, str]] = [
        ({"num_q_heads": 8}, torch.float16, "multiple of num_kv_heads"),
        ({"head_dim": 0}, torch.float16, "geometry.head_dim must be an integer >= 1"),
        ({"num_layers": True}, torch.float16, "geometry.num_layers"),
        ({}, torch.int8, "geometry.dtype")]
    for change, dtype, words in cases:
        sizes = {**ok, **change}
        problem = geometry_problem(sizes, dtype)
        assert problem is not None and words in problem
        for make, error in ((ClientGeometry, ClientError), (Geometry, InvalidArgument)):
            try:
                make(**sizes, dtype=dtype)
            except error as exc:
                assert problem in str(exc)
            else:
                raise AssertionError(f"{make.__module__}.Geometry accepted {sizes} {dtype}")
    limited = geometry_problem({**ok, "head_dim": 8192}, torch.float16, {**ok, "head_dim": 4096})
    assert limited == "geometry.head_dim must be in [1, 4096], got 8192"


def test_plan_batches_groups_and_keeps_order() -> None:
    a, b, c = _session("a"), _session("b"), _session("c", torch.float32)
    q = torch.zeros(4, 16)
    jobs = [AttendJob(a, 0, q), AttendJob(b, 0, q), AttendJob(c, 0, q), AttendJob(a, 1, q),
            AttendJob(a, 0, q), AttendJob(b, 1, q)]
    batches = plan_batches(jobs)
    # wave 1: a0, b0, c0, a1 (a0 repeats at index 4 -> wave 2: a0, b1)
    assert batches == [[0, 1, 3], [2], [4, 5]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(jobs)))


def test_metrics_registries_are_separate() -> None:
    m1, m2 = Metrics(), Metrics()
    m1.tokens_appended.inc(3)
    assert m1.registry.get_sample_value("louver_tokens_appended_total") == 3
    assert m2.registry.get_sample_value("louver_tokens_appended_total") == 0
