"""Bad input: every error has its status code, and the server keeps serving another session
with unchanged results afterwards."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import grpc
import pytest
import torch

from louver_proto import codec, pb, pb_grpc
from tests.service.conftest import Control
from tests.service.helpers import (
    DENSE,
    HKV,
    HQ,
    ServerThread,
    chunk,
    create,
    dense_reference,
    geometry,
    item,
    kv,
    output,
    prefill,
    query,
    status_of,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def sid(stub: pb_grpc.LouverStub) -> str:
    """A prefilled (64 tokens per layer, float16) session the bad requests aim at."""
    s = create(stub)
    prefill(stub, s, 64)
    return s


def _tensor(t: torch.Tensor, **changes: object) -> pb.Tensor:
    msg = codec.tensor_to_proto(t)
    for name, value in changes.items():
        if name == "shape":
            del msg.shape[:]
            msg.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    return msg


def _attend(stub: pb_grpc.LouverStub, *items: pb.AttendItem) -> pb.AttendResponse:
    return stub.Attend(pb.AttendRequest(items=list(items)))


def _with_q(sid: str, q: pb.Tensor) -> pb.AttendItem:
    msg = item(sid, 0, query())
    msg.q.CopyFrom(q)
    return msg


def _with_kv(sid: str, keys: pb.Tensor, values: pb.Tensor, layer: int = 0) -> pb.AttendItem:
    msg = item(sid, layer, query())
    msg.new_keys.CopyFrom(keys)
    msg.new_values.CopyFrom(values)
    return msg


def _policy(**kw: object) -> pb.ThresholdPolicy:
    return pb.ThresholdPolicy(**kw)  # type: ignore[arg-type]


k16, v16 = kv(1)
NAN_Q = query()
NAN_Q[1, 3] = float("nan")
INF_K = k16.clone()
INF_K[0, 0, 0] = float("inf")

# (name, call(stub, sid), expected code): each call must fail with the code
BAD_CALLS: list[tuple[str, Callable[[pb_grpc.LouverStub, str], object], grpc.StatusCode]] = [
    ("q wrong dtype int32", lambda s, i: _attend(s, _with_q(i, _tensor(
        torch.zeros(HQ, 32, dtype=torch.int32)))), INVALID),
    ("q wrong shape", lambda s, i: _attend(s, _with_q(i, _tensor(torch.randn(HQ, 16)))),
     INVALID),
    ("q 1-D", lambda s, i: _attend(s, _with_q(i, _tensor(torch.randn(HQ * 32)))), INVALID),
    ("q byte length", lambda s, i: _attend(s, _with_q(i, _tensor(
        torch.randn(HQ, 32), data=b"\0" * 12))), INVALID),
    ("q unspecified dtype", lambda s, i: _attend(s, _with_q(i, _tensor(
        torch.randn(HQ, 32), dtype=pb.DTYPE_UNSPECIFIED))), INVALID),
    ("q NaN", lambda s, i: _attend(s, _with_q(i, _tensor(NAN_Q))), INVALID),
    ("q huge with new keys", lambda s, i: _attend(s, item(i, 0, torch.full((HQ, 32), 1e20),
                                                          (k16, v16))), INVALID),
    ("new keys Inf", lambda s, i: _attend(s, _with_kv(i, _tensor(INF_K), _tensor(v16))),
     INVALID),
    ("new keys wrong dtype", lambda s, i: _attend(s, _with_kv(
        i, _tensor(k16.float()), _tensor(v16.float()))), INVALID),
    ("new keys wrong heads", lambda s, i: _attend(s, _with_kv(
        i, _tensor(torch.randn(HKV + 1, 1, 32).half()), _tensor(v16))), INVALID),
    ("new values token mismatch", lambda s, i: _attend(s, _with_kv(
        i, _tensor(k16), _tensor(kv(2)[1]))), INVALID),
    ("new keys without values", lambda s, i: _attend(s, pb.AttendItem(
        session_id=i, layer=0, q=_tensor(query()), new_keys=_tensor(k16))), INVALID),
    ("unknown session", lambda s, i: _attend(s, item("no-such-session", 0, query())),
     grpc.StatusCode.NOT_FOUND),
    ("unknown layer", lambda s, i: _attend(s, item(i, 7, query())), INVALID),
    ("start not at the end", lambda s, i: _attend(s, item(i, 0, query(), (k16, v16),
                                                          start=63)), INVALID),
    ("start past the end", lambda s, i: _attend(s, item(i, 0, query(), (k16, v16),
                                                        start=65)), INVALID),
    ("relative eps=0", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        relative=pb.RelativePolicy(eps=0.0)))), INVALID),
    ("relative eps=1", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        relative=pb.RelativePolicy(eps=1.0)))), INVALID),
    ("topk k=0", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        topk=pb.TopKPolicy(k=0)))), INVALID),
    ("mass delta=0", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        mass=pb.MassPolicy(delta=0.0)))), INVALID),
    ("fixed tau wrong length", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        fixed=pb.FixedPolicy(tau=[0.0] * (HQ + 1))))), INVALID),
    ("fixed tau NaN", lambda s, i: _attend(s, item(i, 0, query(), policy=_policy(
        fixed=pb.FixedPolicy(tau=[float("nan")] * HQ)))), INVALID),
    ("append gap", lambda s, i: s.Append(iter([chunk(i, 0, 70, *kv(4))])), INVALID),
    ("append partial overlap", lambda s, i: s.Append(iter([chunk(i, 0, 62, *kv(4))])),
     INVALID),
    ("append differing retry", lambda s, i: s.Append(iter([chunk(i, 0, 0, *kv(4))])), INVALID),
    ("append unknown layer", lambda s, i: s.Append(iter([chunk(i, 2, 64, *kv(4))])), INVALID),
    ("append wrong dtype", lambda s, i: s.Append(iter([chunk(
        i, 0, 64, *kv(4, torch.bfloat16))])), INVALID),
    ("append unknown session", lambda s, i: s.Append(iter([chunk("nope", 0, 0, *kv(4))])),
     grpc.StatusCode.NOT_FOUND),
    ("search tau wrong length", lambda s, i: s.Search(pb.SearchRequest(
        session_id=i, layer=0, q=_tensor(query()), tau=[0.0] * 3)), INVALID),
    ("search unknown layer", lambda s, i: s.Search(pb.SearchRequest(
        session_id=i, layer=9, q=_tensor(query()), tau=[0.0])), INVALID),
    ("get unknown session", lambda s, i: s.GetSession(pb.GetSessionRequest(session_id="x")),
     grpc.StatusCode.NOT_FOUND),
    ("delete unknown session", lambda s, i: s.DeleteSession(pb.DeleteSessionRequest(
        session_id="x")), grpc.StatusCode.NOT_FOUND),
    ("duplicate session id", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        session_id=i, geometry=geometry())), grpc.StatusCode.ALREADY_EXISTS),
    ("bad session id", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        session_id="a b/c", geometry=geometry())), INVALID),
    ("Hq not a multiple of Hkv", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(num_q_heads=3))), INVALID),
    ("zero layers", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(num_layers=0))), INVALID),
    ("zero head dim", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(head_dim=0))), INVALID),
    ("zero kv heads", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(num_kv_heads=0))), INVALID),
    ("int32 storage dtype", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(torch.int32))), INVALID),
    ("unspecified dtype", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=pb.ModelGeometry(num_layers=1, num_q_heads=2, num_kv_heads=1,
                                  head_dim=8))), INVALID),
    ("subspaces not dividing D", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(), index=pb.IndexParams(kind=pb.INDEX_KIND_BALLS, num_subspaces=5))),
     INVALID),
    ("quant group not dividing D", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(), index=pb.IndexParams(kind=pb.INDEX_KIND_QUANT, quant_group=5))),
     INVALID),
    ("bad default policy", lambda s, i: s.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(), default_policy=_policy(topk=pb.TopKPolicy(k=0)))), INVALID),
]


@pytest.mark.parametrize("name,call,code", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_request(stub: pb_grpc.LouverStub, sid: str, control: Control, name: str,
                     call: Callable[[pb_grpc.LouverStub, str], object],
                     code: grpc.StatusCode) -> None:
    before = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.layer_tokens
    err = status_of(call, stub, sid)
    assert err.code() == code, err.details()
    assert err.details()
    after = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.layer_tokens
    assert list(after) == list(before)
    control.assert_unchanged()


def test_attend_before_prefill(stub: pb_grpc.LouverStub, control: Control) -> None:
    fresh = create(stub)
    err = status_of(_attend, stub, item(fresh, 0, query()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # new keys make the layer non-empty: this works
    _attend(stub, item(fresh, 0, query(), kv(2), start=0))
    control.assert_unchanged()


def test_failed_item_leaves_earlier_items_unapplied(stub: pb_grpc.LouverStub,
                                                    control: Control) -> None:
    a, b = create(stub), create(stub)
    prefill(stub, a, 16)
    prefill(stub, b, 16)
    err = status_of(_attend, stub, item(a, 0, query(), kv(1), start=16),
                    item(b, 0, query(), kv(1), start=15))
    assert err.code() == INVALID and "items[1]" in err.details()
    for s in (a, b):
        info = stub.GetSession(pb.GetSessionRequest(session_id=s)).session
        assert list(info.layer_tokens) == [16, 16]
    control.assert_unchanged()


def test_huge_keys_rejected_before_storing(stub: pb_grpc.LouverStub, control: Control) -> None:
    sid = create(stub, dtype=torch.bfloat16)
    keys, values = kv(8, torch.bfloat16)
    keys[1, 2, 3] = 1e30  # finite in bfloat16, but float32 scores could overflow
    for call in (lambda: stub.Append(iter([chunk(sid, 0, 0, keys, values)])),
                 lambda: _attend(stub, item(sid, 1, query(), (keys, values)))):
        assert status_of(call).code() == INVALID
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [0, 0]
    control.assert_unchanged()


def test_failed_stream_keeps_earlier_chunks_and_can_be_retried(stub: pb_grpc.LouverStub,
                                                               control: Control) -> None:
    sid = create(stub)
    data = [kv(40) for _ in range(2)]
    good = [chunk(sid, layer, 0, *data[layer]) for layer in range(2)]
    err = status_of(stub.Append, iter([good[0], chunk(sid, 1, 5, *data[1])]))
    assert err.code() == INVALID and "chunks[1]" in err.details()
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert list(info.layer_tokens) == [40, 0]
    resp = stub.Append(iter(good))
    assert (resp.chunks_skipped, resp.chunks_applied) == (1, 1)
    q = query()
    out = output(_attend(stub, item(sid, 0, q, policy=DENSE)).results[0])
    torch.testing.assert_close(out, dense_reference(q, *data[0])[0], atol=1e-4, rtol=1e-4)
    control.assert_unchanged()


def test_oversize_message(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_message_bytes=64 << 10, metrics_port=-1)
    s = create(srv.stub)
    prefill(srv.stub, s, 32)
    big = item(s, 0, query(), kv(600))  # ~150 KiB
    err = status_of(srv.stub.Attend, pb.AttendRequest(items=[big]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # still serving, and the session is untouched
    result = _attend(srv.stub, item(s, 0, query(), kv(1), DENSE, start=32)).results[0]
    assert result.stats.num_keys == 33


def test_decode_stream_error_ends_stream(stub: pb_grpc.LouverStub, control: Control) -> None:
    sid = create(stub)
    prefill(stub, sid, 8)
    good = pb.DecodeRequest(step_id=1, step=pb.AttendRequest(items=[item(sid, 0, query())]))
    bad = pb.DecodeRequest(step_id=2, step=pb.AttendRequest(items=[item(sid, 5, query())]))
    responses = stub.Decode(iter([good, bad, good]))
    assert next(responses).step_id == 1
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == INVALID
    control.assert_unchanged()


def test_delete_session_mid_stream(stub: pb_grpc.LouverStub, control: Control) -> None:
    sid = create(stub)
    prefill(stub, sid, 8)
    requests: queue.Queue[pb.DecodeRequest | None] = queue.Queue()
    responses = stub.Decode(iter(requests.get, None))
    step = pb.DecodeRequest(step_id=1, step=pb.AttendRequest(items=[item(sid, 0, query())]))
    requests.put(step)
    assert next(responses).step_id == 1
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    requests.put(step)
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    requests.put(None)
    control.assert_unchanged()


def test_client_disconnect_mid_stream(server: ServerThread, control: Control) -> None:
    stub = server.stub
    sid = create(stub)
    prefill(stub, sid, 8)
    requests: queue.Queue[pb.DecodeRequest | None] = queue.Queue()
    call = stub.Decode(iter(requests.get, None))
    requests.put(pb.DecodeRequest(step_id=7, step=pb.AttendRequest(
        items=[item(sid, 0, query(), kv(1), start=8)])))
    assert next(call).step_id == 7
    call.cancel()  # the client goes away with the stream open
    requests.put(None)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # the server keeps working, on that session too
    result = _attend(stub, item(sid, 0, query(), kv(1), start=9)).results[0]
    assert result.stats.num_keys == 10
    control.assert_unchanged()


def test_concurrent_sessions_do_not_interfere(server: ServerThread, control: Control) -> None:
    """Several threads decode on their own sessions while others send bad requests."""
    stub = server.stub
    errors: list[BaseException] = []

    def good() -> None:
        try:
            s = create(stub)
            prefill(stub, s, 16)
            for t in range(10):
                r = _attend(stub, item(s, t % 2, query(), kv(1), start=16 + t // 2)).results[0]
                assert r.stats.num_keys == 17 + t // 2
        except BaseException as exc:  # reported below
            errors.append(exc)

    def bad() -> None:
        for _ in range(10):
            err = status_of(_attend, stub, _with_q(control.session_id, _tensor(NAN_Q)))
            if err.code() != INVALID:
                errors.append(AssertionError(err.code()))

    threads = [threading.Thread(target=f) for f in (good, good, bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    control.assert_unchanged()



def test_unexpected_error_is_internal(make_server: Callable[..., ServerThread],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(metrics_port=-1)
    sid = create(srv.stub)
    prefill(srv.stub, sid, 8)

    def explode(jobs: object) -> None:
        raise RuntimeError("secret internals")

    with monkeypatch.context() as patch:
        patch.setattr(srv.server.engine, "_attend_batch", explode)
        err = status_of(_attend, srv.stub, item(sid, 0, query()))
    assert err.code() == grpc.StatusCode.INTERNAL and "secret" not in err.details()
    assert _attend(srv.stub, item(sid, 0, query())).results[0].stats.num_keys == 8
