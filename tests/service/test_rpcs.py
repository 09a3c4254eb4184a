"""Happy paths of every RPC, Append retries, the Decode stream, health and reflection."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from louver_kernels import reference as ref
from louver_proto import SERVICE_NAME, codec, pb, pb_grpc
from louver_service import wire
from louver_service.errors import DeadlineExceeded
from tests.service.helpers import (
    DENSE,
    HKV,
    HQ,
    NUM_LAYERS,
    ServerThread,
    chunk,
    create,
    dense_reference,
    item,
    kv,
    new_id,
    output,
    prefill,
    prefill_requests,
    query,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_session_lifecycle(stub: pb_grpc.LouverStub) -> None:
    sid = new_id()
    req = pb.CreateSessionRequest(
        session_id=sid, expected_tokens=128,
        geometry=pb.ModelGeometry(num_layers=NUM_LAYERS, num_q_heads=HQ, num_kv_heads=HKV,
                                  head_dim=32, dtype=pb.DTYPE_BFLOAT16),
        index=pb.IndexParams(cluster_size=8),
        default_policy=pb.ThresholdPolicy(topk=pb.TopKPolicy(k=5)))
    info = stub.CreateSession(req).session
    assert info.session_id == sid
    assert info.geometry.value_dim == 32  # 0 resolved to head_dim
    assert info.index.cluster_size == 8 and info.index.num_subspaces == 4  # defaults filled
    assert info.index.kind == pb.INDEX_KIND_QUANT and info.index.quant_bits == 6
    assert info.default_policy.topk.k == 5
    assert list(info.layer_tokens) == [0, 0]
    assert info.created_unix_s > 0

    got = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert got.session_id == sid and got.geometry == info.geometry
    assert sid in [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions]

    generated = stub.CreateSession(pb.CreateSessionRequest(geometry=info.geometry)).session
    assert generated.session_id and generated.default_policy.relative.eps == pytest.approx(1e-4)

    for s in (sid, generated.session_id):
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=s))
    listed = [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions]
    assert sid not in listed and generated.session_id not in listed


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_then_dense_attend_matches_reference(stub: pb_grpc.LouverStub,
                                                    dtype: torch.dtype) -> None:
    sid = create(stub, dtype=dtype)
    data = prefill(stub, sid, 200, dtype)
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [200, 200]
    assert info.kv_bytes > 0 and info.index_bytes > 0  # the index was built at stream end

    q = query(dtype)
    resp = stub.Attend(pb.AttendRequest(items=[item(sid, layer, q, policy=DENSE)
                                               for layer in range(NUM_LAYERS)]))
    for layer, result in enumerate(resp.results):
        want_out, want_lse = dense_reference(q, *data[layer])
        torch.testing.assert_close(output(result), want_out, atol=1e-4, rtol=1e-4)
        lse = codec.tensor_from_proto(result.lse, "lse")
        torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
        assert result.output.dtype == pb.DTYPE_FLOAT32
        assert list(result.stats.num_attended) == [200] * HQ
        assert result.stats.num_keys == 200
        assert list(result.stats.dropped_mass_bound) == [0.0] * HQ


def test_attend_default_policy_and_stats(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    data = prefill(stub, sid, 300)
    q = query()
    result = stub.Attend(pb.AttendRequest(items=[item(sid, 0, q)])).results[0]
    stats = result.stats
    assert len(stats.tau) == len(stats.num_candidates) == len(stats.num_attended) == HQ
    assert all(0 < a <= c <= 300 for a, c in zip(stats.num_attended, stats.num_candidates,
                                                 strict=True))
    assert all(0.0 <= m <= 1.0 for m in stats.dropped_mass_bound)
    # relative(1e-3): every key whose weight is >= 1e-3 of the largest is attended
    scores = ref.scores(q, data[0][0])
    attended_at_least = ((scores >= scores.amax(1, keepdim=True)
                          - torch.log(torch.tensor(1e3)) * 32 ** 0.5).sum(1))
    assert all(a >= int(w) for a, w in zip(stats.num_attended, attended_at_least, strict=True))
    dense, _ = dense_reference(q, *data[0])
    torch.testing.assert_close(output(result), dense, atol=0.05, rtol=0.05)


def test_attend_appends_new_tokens(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    data = prefill(stub, sid, 64)
    k1, v1 = kv(1)
    k2, v2 = kv(3)
    q1, q2 = query(), query()
    # two items on the same layer in one call: the second sees the first one's token
    resp = stub.Attend(pb.AttendRequest(items=[
        item(sid, 0, q1, (k1, v1), DENSE, start=64),
        item(sid, 1, q1, (k1, v1), DENSE),
        item(sid, 0, q2, (k2, v2), DENSE, start=65),
    ]))
    keys0 = torch.cat([data[0][0], k1, k2], dim=1)
    values0 = torch.cat([data[0][1], v1, v2], dim=1)
    torch.testing.assert_close(output(resp.results[0]),
                               dense_reference(q1, keys0[:, :65], values0[:, :65])[0],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output(resp.results[2]), dense_reference(q2, keys0, values0)[0],
                               atol=1e-4, rtol=1e-4)
    assert [r.stats.num_keys for r in resp.results] == [65, 65, 68]
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [68, 65]


def test_attend_batches_several_sessions(stub: pb_grpc.LouverStub) -> None:
    sessions = [create(stub, dtype=dt) for dt in DTYPES]
    data = [prefill(stub, sid, 50, dt) for sid, dt in zip(sessions, DTYPES, strict=True)]
    q = query()
    resp = stub.Attend(pb.AttendRequest(items=[item(sid, 1, q, policy=DENSE)
                                               for sid in sessions]))
    for result, d in zip(resp.results, data, strict=True):
        torch.testing.assert_close(output(result), dense_reference(q, *d[1])[0],
                                   atol=1e-4, rtol=1e-4)


def test_append_idempotent_retry(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    data = [kv(150) for _ in range(NUM_LAYERS)]
    reqs = prefill_requests(sid, data, chunk_tokens=50)
    first = stub.Append(iter(reqs[:4]))  # layer 0 complete, layer 1 first chunk
    assert first.chunks_applied == 4 and list(first.layer_tokens) == [150, 50]
    again = stub.Append(iter(reqs))  # the whole stream retried
    assert again.chunks_skipped == 4 and again.chunks_applied == 2
    assert list(again.layer_tokens) == [150, 150]
    third = stub.Append(iter(reqs[1:3]))
    assert third.chunks_skipped == 2 and third.chunks_applied == 0
    q = query()
    result = stub.Attend(pb.AttendRequest(items=[item(sid, 1, q, policy=DENSE)])).results[0]
    torch.testing.assert_close(output(result), dense_reference(q, *data[1])[0], atol=1e-4,
                               rtol=1e-4)


def test_append_after_decode_extends_index(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    data = prefill(stub, sid, 40)
    k, v = kv(30)
    stub.Append(iter([chunk(sid, 0, 40, k, v)]))
    q = query()
    result = stub.Attend(pb.AttendRequest(items=[item(sid, 0, q, policy=DENSE)])).results[0]
    want = dense_reference(q, torch.cat([data[0][0], k], 1), torch.cat([data[0][1], v], 1))[0]
    torch.testing.assert_close(output(result), want, atol=1e-4, rtol=1e-4)


def test_search_returns_superset(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub, dtype=torch.float32)
    data = prefill(stub, sid, 300, torch.float32)
    q = query()
    scores = ref.scores(q, data[0][0])
    tau = scores.quantile(0.9, dim=1)
    resp = stub.Search(pb.SearchRequest(session_id=sid, layer=0, q=codec.tensor_to_proto(q),
                                        tau=tau.tolist()))
    positions = codec.tensor_from_proto(resp.positions, "positions", dtypes=[torch.int64])
    assert len(resp.offsets) == HQ + 1 and resp.offsets[-1] == positions.numel()
    for h in range(HQ):
        got = positions[resp.offsets[h]: resp.offsets[h + 1]]
        assert torch.equal(got, got.sort().values)
        must = set(torch.nonzero(scores[h] >= tau[h]).reshape(-1).tolist())
        assert must <= set(got.tolist())


def test_search_on_empty_layer(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    resp = stub.Search(pb.SearchRequest(session_id=sid, layer=1,
                                        q=codec.tensor_to_proto(query()), tau=[0.0]))
    assert list(resp.offsets) == [0] * (HQ + 1)


def test_decode_stream(stub: pb_grpc.LouverStub) -> None:
    sid = create(stub)
    data = prefill(stub, sid, 32)
    keys = [d[0] for d in data]
    values = [d[1] for d in data]
    requests: queue.Queue[pb.DecodeRequest | None] = queue.Queue()
    responses = stub.Decode(iter(requests.get, None))
    for step in range(3):
        for layer in range(NUM_LAYERS):
            k, v = kv(1)
            keys[layer] = torch.cat([keys[layer], k], 1)
            values[layer] = torch.cat([values[layer], v], 1)
            q = query()
            step_id = 100 * step + layer
            requests.put(pb.DecodeRequest(step_id=step_id, step=pb.AttendRequest(
                items=[item(sid, layer, q, (k, v), DENSE, start=32 + step)])))
            resp = next(responses)
            assert resp.step_id == step_id
            torch.testing.assert_close(output(resp.step.results[0]),
                                       dense_reference(q, keys[layer], values[layer])[0],
                                       atol=1e-4, rtol=1e-4)
    requests.put(None)
    assert list(responses) == []
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [35, 35]


def test_health_and_reflection(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answer = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_compute_in_worker_threads(make_server: Callable[..., ServerThread]) -> None:
    """inline_max_keys=0 sends every attention and search to the worker threads."""
    srv = make_server(inline_max_keys=0, metrics_port=-1)
    sid = create(srv.stub)
    data = prefill(srv.stub, sid, 80)
    q = query()
    resp = srv.stub.Attend(pb.AttendRequest(items=[item(sid, 0, q, policy=DENSE),
                                                   item(sid, 1, q, kv(1), start=80)]))
    torch.testing.assert_close(output(resp.results[0]), dense_reference(q, *data[0])[0],
                               atol=1e-4, rtol=1e-4)
    assert resp.results[1].stats.num_keys == 81
    search = srv.stub.Search(pb.SearchRequest(session_id=sid, layer=1,
                                              q=codec.tensor_to_proto(q), tau=[-1e9]))
    assert list(search.offsets) == [0, 81, 162, 243, 324]


def test_deadline_checked_between_batches(server: ServerThread) -> None:
    sid = create(server.stub)
    prefill(server.stub, sid, 8)
    request = pb.AttendRequest(items=[item(sid, 0, query(), kv(1), start=8)])
    jobs = wire.attend_jobs_from_proto(request, server.server.store)
    with pytest.raises(DeadlineExceeded):
        server.run(server.server.engine.attend(jobs, deadline=time.monotonic() - 1.0))
    info = server.stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [8, 8]
