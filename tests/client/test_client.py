"""The gRPC clients against a real in-process server: session management, status codes, chunk
sizing under the message limit, the Decode stream, batching, authentication, deadlines and the
async client."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import grpc
import pytest
import torch

from louver_client import (
    AsyncLouverClient,
    AttendItem,
    Dense,
    LouverClient,
    LouverError,
    Relative,
    _wire,
)
from louver_client.loopback import LoopbackServer, start_in_thread, start_subprocess
from louver_client.session import chunk_tokens_for
from louver_kernels import reference as ref
from tests.client.conftest import GEOMETRY, random_kv

L, HQ, HKV, D, DV = GEOMETRY


def new_session(client: LouverClient, **kwargs):  # type: ignore[no-untyped-def]
    return client.create_session(L, HQ, HKV, D, DV, torch.float32, **kwargs)


def test_session_lifecycle(client: LouverClient) -> None:
    sid = f"t-{uuid.uuid4().hex[:8]}"
    s = new_session(client, session_id=sid, default_policy=Relative(0.01), expected_tokens=64)
    assert s.session_id == sid
    info = client.get_session(sid)
    assert info.layer_tokens == (0, 0) and info.default_policy == Relative(0.01)
    assert info.geometry == s.geometry
    assert sid in {i.session_id for i in client.list_sessions()}
    with pytest.raises(LouverError) as exc:
        new_session(client, session_id=sid)
    assert exc.value.code is grpc.StatusCode.ALREADY_EXISTS
    other = client.session(sid)  # a second handle on the same session
    other.prefill(0, *random_kv(5))
    assert s.info().layer_tokens == (5, 0) and s.layer_tokens(0) == 5
    assert client.delete_session(sid) > 0
    with pytest.raises(LouverError) as exc:
        client.get_session(sid)
    assert exc.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(LouverError) as exc:
        client.delete_session(sid)
    assert exc.value.code is grpc.StatusCode.NOT_FOUND


def test_server_generates_ids_and_validates_geometry(client: LouverClient) -> None:
    s = new_session(client)
    assert s.session_id
    s.delete()
    with pytest.raises(LouverError) as exc:
        client.create_session(2, 5, 2, 16)  # Hq not a multiple of Hkv (checked client-side)
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(LouverError) as exc:
        new_session(client, session_id="bad id with spaces")
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_chunks_fit_the_message_limit(server: LoopbackServer) -> None:
    limit = 64 << 10
    with LouverClient(server.target, max_message_bytes=limit) as small:
        s = new_session(small)
        per_chunk = chunk_tokens_for(s.geometry, limit)
        assert per_chunk * s.geometry.token_bytes() < limit
        k, v = random_kv(3 * per_chunk + 5)
        r = s.prefill(0, k, v)
        assert r.chunks_applied == 4 and r.layer_tokens == (k.shape[1], 0)
        # an explicit chunk size above the limit is capped, not sent
        assert s.prefill(0, k, v, chunk_tokens=10**9).chunks_skipped == 4
        q = torch.randn(HQ, D)
        want, _ = ref.masked_attention(q, k, v, torch.ones(HQ, k.shape[1], dtype=torch.bool),
                                       1 / math.sqrt(D))
        torch.testing.assert_close(s.attend(0, q, policy=Dense()).output, want)
        s.delete()


def test_attend_batch_by_object_and_by_id(client: LouverClient) -> None:
    a, b = new_session(client), new_session(client)
    a.prefill(0, *random_kv(16))
    b.prefill(0, *random_kv(16))
    q = torch.randn(HQ, D)
    outs = client.attend_batch([AttendItem(a, 0, q, *random_kv(1)),
                                AttendItem(b.session_id, 0, q, policy=Dense())])
    assert [o.output.shape for o in outs] == [(HQ, DV), (HQ, DV)]
    assert a.layer_tokens(0) == 17  # tracked from the response
    # an error in one item fails the call and leaves the sessions as they were
    with pytest.raises(LouverError) as exc:
        client.attend_batch([AttendItem(a, 0, q, *random_kv(1)),
                             AttendItem(b.session_id, 1, q)])
    assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert a.info().layer_tokens == (17, 0)
    a.delete()
    b.delete()


def test_decode_stream_error_ends_the_stream(client: LouverClient) -> None:
    s = new_session(client)
    s.prefill(0, *random_kv(8))
    dec = s.decoder()
    q = torch.randn(HQ, D)
    assert dec.step(0, q).output.shape == (HQ, DV)
    with pytest.raises(LouverError) as exc:
        dec.step(1, q)  # empty layer
    assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(LouverError):  # the stream is over
        dec.step(0, q)
    dec.close()
    dec.close()
    with s.decoder() as dec2:  # a new stream works
        assert dec2.step(0, q).num_attended.tolist() == [8] * HQ
    s.delete()


def test_stale_tracked_length_is_refused_not_duplicated(client: LouverClient) -> None:
    s = new_session(client)
    s.prefill(0, *random_kv(4))
    other = client.session(s.session_id)
    other.attend(0, torch.randn(HQ, D), *random_kv(1))  # the layer grows behind s's back
    with pytest.raises(LouverError) as exc:
        s.attend(0, torch.randn(HQ, D), *random_kv(1))
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT
    s.info()  # refresh
    s.attend(0, torch.randn(HQ, D), *random_kv(1))
    assert s.layer_tokens(0) == 6
    s.delete()


def test_deadlines(client: LouverClient) -> None:
    s = new_session(client)
    s.prefill(0, *random_kv(3))
    dec = s.decoder(timeout=0.05)  # the whole stream's deadline
    time.sleep(0.3)
    with pytest.raises(LouverError) as exc:
        dec.step(0, torch.randn(HQ, D))
    assert exc.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    dec.close()
    with pytest.raises(LouverError) as exc:  # a call whose deadline passed is not sent
        _wire.remaining(time.monotonic() - 1.0, time.monotonic())
    assert exc.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    s.delete()


def test_unreachable_server_is_unavailable() -> None:
    with LouverClient("127.0.0.1:1", timeout=5.0, retries=1) as nobody:
        with pytest.raises(LouverError) as exc:
            nobody.list_sessions()
    assert exc.value.code is grpc.StatusCode.UNAVAILABLE


def test_bearer_token() -> None:
    with start_in_thread(auth_tokens="s3cret") as srv:
        with LouverClient(srv.target) as anonymous:
            with pytest.raises(LouverError) as exc:
                anonymous.list_sessions()
            assert exc.value.code is grpc.StatusCode.UNAUTHENTICATED
        with LouverClient(srv.target, token="s3cret") as authed:
            s = new_session(authed)
            s.prefill(0, *random_kv(3))
            with s.decoder() as dec:
                dec.step(0, torch.randn(HQ, D))
            s.delete()


def test_async_client(server: LoopbackServer) -> None:
    async def main() -> None:
        async with AsyncLouverClient(server.target) as c:
            s = await c.create_session(L, HQ, HKV, D, DV, torch.float32,
                                       session_id=f"a-{uuid.uuid4().hex[:8]}")
            async with s:
                k, v = random_kv(40)
                r = await s.prefill_layers([(k[:, :30], v[:, :30])], chunk_tokens=7)
                assert r.chunks_applied == 5 and r.layer_tokens == (30, 0)
                q = torch.randn(HQ, D)
                async with s.decoder() as dec:
                    for t in range(30, 40):
                        out = await dec.step(0, q, k[:, t:t + 1], v[:, t:t + 1], Dense())
                want, _ = ref.masked_attention(q, k, v, torch.ones(HQ, 40, dtype=torch.bool),
                                               1 / math.sqrt(D))
                torch.testing.assert_close(out.output, want)
                assert (await s.info()).layer_tokens == (40, 0)
                cands = await s.search(0, q, -1e9)
                assert [c.numel() for c in cands] == [40] * HQ
                with pytest.raises(LouverError) as exc:
                    await s.attend(1, q)
                assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
                async with s.appender(chunk_tokens=3) as ap:
                    await ap.add(1, k[:, :5], v[:, :5])
                    await ap.add(1, k[:, 5:9], v[:, 5:9])
                assert ap.result is not None and ap.result.chunks_applied == 4
                assert ap.result.layer_tokens == (40, 9) and s.layer_tokens(1) == 9
                outs = await c.attend_batch([AttendItem(s, 0, q), AttendItem(s, 0, q)])
                assert len(outs) == 2
                with pytest.raises(LouverError) as exc:
                    await c.get_session("missing")
                assert exc.value.code is grpc.StatusCode.NOT_FOUND
            with pytest.raises(LouverError) as exc:
                await c.get_session(s.session_id)
            assert exc.value.code is grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_async_decode_stream_error(server: LoopbackServer) -> None:
    async def main() -> None:
        async with AsyncLouverClient(server.target) as c:
            s = await c.create_session(L, HQ, HKV, D, DV, torch.float32)
            await s.append(0, *random_kv(4))
            dec = s.decoder()
            with pytest.raises(LouverError) as exc:
                await dec.step(1, torch.randn(HQ, D))
            assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(LouverError):
                await dec.step(0, torch.randn(HQ, D))
            await dec.close()
            await s.delete()

    asyncio.run(main())


def test_server_subprocess() -> None:
    """The demo's other loopback mode: ``python -m louver_service --port 0``."""
    with start_subprocess() as srv, LouverClient(srv.target) as c:
        assert "listening on" in srv.description
        s = new_session(c)
        s.prefill(0, *random_kv(5))
        assert s.attend(0, torch.randn(HQ, D)).num_attended.tolist() == [5] * HQ
