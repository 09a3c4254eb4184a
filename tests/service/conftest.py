"""Fixtures of the service tests: one shared in-process server per module, a factory for
servers with custom settings, and a control session whose results must never change."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from louver_proto import pb, pb_grpc
from tests.service.helpers import DENSE, ServerThread, create, item, output, prefill, query


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    srv = ServerThread()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> pb_grpc.LouverStub:
    return server.stub


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """Start servers with setting overrides; all are stopped at teardown."""
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        srv = ServerThread(**overrides)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.close()


@dataclass
class Control:
    """A prefilled session and the dense attention it answered before the test."""

    stub: pb_grpc.LouverStub
    session_id: str
    q: torch.Tensor
    out: torch.Tensor
    layer_tokens: list[int]

    def attend(self) -> torch.Tensor:
        resp = self.stub.Attend(pb.AttendRequest(items=[item(self.session_id, 1, self.q,
                                                              policy=DENSE)]))
        return output(resp.results[0])

    def assert_unchanged(self) -> None:
        """The session still answers exactly as before and holds the same tokens."""
        info = self.stub.GetSession(pb.GetSessionRequest(session_id=self.session_id)).session
        assert list(info.layer_tokens) == self.layer_tokens
        assert torch.equal(self.attend(), self.out)


@pytest.fixture(scope="module")
def control(stub: pb_grpc.LouverStub) -> Control:
    sid = create(stub)
    prefill(stub, sid, 96)
    c = Control(stub, sid, query(), torch.empty(0), [96, 96])
    c.out = c.attend()
    return c
