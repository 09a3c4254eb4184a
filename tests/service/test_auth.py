"""Bearer-token authentication."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from louver_proto import pb
from tests.service.helpers import ServerThread, geometry, status_of


def test_auth_tokens(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(auth_tokens="s3cret, other", metrics_port=-1)
    req = pb.CreateSessionRequest(geometry=geometry())
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),),
                     (("authorization", "Basic s3cret"),)):
        err = status_of(srv.stub.CreateSession, req, metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = status_of(srv.stub.ListSessions, pb.ListSessionsRequest(), metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in ("s3cret", "other"):
        info = srv.stub.CreateSession(req, metadata=(("authorization", f"Bearer {token}"),))
        assert info.session.session_id
    listed = srv.stub.ListSessions(pb.ListSessionsRequest(),
                                   metadata=(("authorization", "Bearer other"),))
    assert len(listed.sessions) == 2
    # probes need no token
    health = health_pb2_grpc.HealthStub(srv.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
