"""Fixtures of the SDK tests: a real Louver server in this process (port 0, metrics off), a
client, and a session factory parametrized over the two transports (LocalSession and a
RemoteSession over loopback gRPC), so that every semantic test runs on both."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from louver_client import LocalSession, LouverClient, Session
from louver_client.loopback import LoopbackServer, start_in_thread

#: the geometry of the small test sessions: layers, Hq, Hkv, D, Dv
GEOMETRY = (2, 4, 2, 16, 8)

SessionFactory = Callable[..., Session]


@pytest.fixture(scope="session")
def server() -> Iterator[LoopbackServer]:
    """A Louver server running in a background thread of the test process."""
    srv = start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[LouverClient]:
    """A blocking client of the in-process server."""
    with LouverClient(server.target, timeout=30.0) as c:
        yield c


@pytest.fixture(params=["local", "remote"])
def transport(request: pytest.FixtureRequest) -> str:
    """Which session implementation a test runs on."""
    return str(request.param)


@pytest.fixture
def make_session(transport: str, request: pytest.FixtureRequest) -> Iterator[SessionFactory]:
    """make_session(num_layers=2, num_q_heads=4, ..., **kwargs) -> Session on ``transport``;
    sessions are deleted after the test."""
    made: list[Session] = []
    c: LouverClient | None = request.getfixturevalue("client") if transport == "remote" \
        else None

    def make(num_layers: int = GEOMETRY[0], num_q_heads: int = GEOMETRY[1],
             num_kv_heads: int = GEOMETRY[2], head_dim: int = GEOMETRY[3],
             value_dim: int | None = GEOMETRY[4], dtype: torch.dtype = torch.float32,
             **kwargs: Any) -> Session:
        if c is None:
            s: Session = LocalSession(num_layers, num_q_heads, num_kv_heads, head_dim,
                                      value_dim, dtype, **kwargs)
        else:
            s = c.create_session(num_layers, num_q_heads, num_kv_heads, head_dim, value_dim,
                                 dtype, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.delete()


def random_kv(tokens: int, hkv: int = GEOMETRY[2], d: int = GEOMETRY[3], dv: int = GEOMETRY[4],
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh keys [Hkv, T, D] and values [Hkv, T, Dv]."""
    return torch.randn(hkv, tokens, d).to(dtype), torch.randn(hkv, tokens, dv).to(dtype)
