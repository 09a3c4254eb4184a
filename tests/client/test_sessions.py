"""Session semantics, run on both transports (LocalSession and RemoteSession over gRPC): the
same inputs give the same results and the same error codes."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from louver_client import AttendItem, Dense, Fixed, IndexConfig, LouverError, Relative, TopK
from louver_kernels import reference as ref
from tests.client.conftest import GEOMETRY, SessionFactory, random_kv

_, HQ, HKV, D, DV = GEOMETRY
SCALE = 1.0 / math.sqrt(D)


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention over every key: output [Hq, Dv], lse [Hq]."""
    attend = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
    return ref.masked_attention(q, k, v, attend, SCALE)


def expect_code(code: grpc.StatusCode, fn, *args, **kwargs) -> LouverError:  # type: ignore[no-untyped-def]
    with pytest.raises(LouverError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code, info.value
    return info.value


def test_dense_attention_matches_reference(make_session: SessionFactory) -> None:
    s = make_session()
    k, v = random_kv(300)
    s.prefill(0, k, v)
    q = torch.randn(HQ, D)
    out = s.attend(0, q, policy=Dense())
    want, lse = dense_reference(q, k, v)
    torch.testing.assert_close(out.output.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lse.cpu(), lse, rtol=1e-5, atol=1e-5)
    assert out.output.dtype == torch.float32 and out.output.shape == (HQ, DV)
    assert out.num_attended.tolist() == [300] * HQ
    assert out.num_candidates.dtype == torch.int64
    assert float(out.dropped_mass_bound.max()) == 0.0


def test_decode_appends_then_attends(make_session: SessionFactory) -> None:
    s = make_session()
    k, v = random_kv(40)
    s.prefill(1, k[:, :30], v[:, :30])
    with s.decoder() as dec:
        for t in range(30, 40):
            q = torch.randn(HQ, D)
            out = dec.step(1, q, k[:, t:t + 1], v[:, t:t + 1], Dense())
            want, _ = dense_reference(q, k[:, :t + 1], v[:, :t + 1])
            torch.testing.assert_close(out.output.cpu(), want, rtol=1e-5, atol=1e-5)
    assert s.layer_tokens(1) == 40
    assert s.info().layer_tokens == (0, 40)


def test_relative_policy_attends_every_key_above_its_threshold(
        make_session: SessionFactory) -> None:
    s = make_session(default_policy=Relative(1e-2))
    k, v = random_kv(500)
    s.prefill(0, k, v)
    q = torch.randn(HQ, D) * 3
    out = s.attend(0, q)  # the session default
    scores = ref.scores(q, k)
    tau = out.tau.cpu()
    # every key whose weight is >= eps * the largest weight is attended
    keep = scores >= scores.amax(dim=1, keepdim=True) - math.log(1 / 1e-2) / SCALE
    assert bool((out.num_attended.cpu() >= keep.sum(dim=1)).all())
    assert bool((tau <= scores.amax(dim=1)).all())
    assert bool((out.dropped_mass_bound >= 0).all()) and bool((out.dropped_mass_bound < 1).all())


def test_chunked_prefill_equals_one_shot_and_retry_is_skipped(
        make_session: SessionFactory) -> None:
    k, v = random_kv(257)
    a, b = make_session(), make_session()
    r1 = a.prefill(0, k, v, chunk_tokens=10)
    assert r1.chunks_applied == 26 and r1.chunks_skipped == 0
    assert r1.layer_tokens == (257, 0)
    b.prefill(0, k, v)
    q = torch.randn(HQ, D)
    torch.testing.assert_close(a.attend(0, q, policy=Dense()).output,
                               b.attend(0, q, policy=Dense()).output)
    # replaying the same stream (a retry) changes nothing
    r2 = a.prefill(0, k, v, chunk_tokens=10)
    assert (r2.chunks_applied, r2.chunks_skipped) == (0, 26)
    assert a.info().layer_tokens == (257, 0)


def test_prefill_layers_one_stream(make_session: SessionFactory) -> None:
    s = make_session()
    kv = [random_kv(20), random_kv(7)]
    r = s.prefill_layers(kv, chunk_tokens=8)
    assert r.layer_tokens == (20, 7)
    assert r.chunks_applied == 3 + 1
    r = s.prefill_layers({1: random_kv(5)}, start=7)
    assert r.layer_tokens == (20, 12)


def test_keys_are_stored_in_the_session_dtype(make_session: SessionFactory) -> None:
    s = make_session(dtype=torch.float16)
    k, v = random_kv(50)  # float32 in, float16 stored
    s.prefill(0, k, v)
    q = torch.randn(HQ, D)
    out = s.attend(0, q, policy=Dense())
    want, _ = dense_reference(q, k.half(), v.half())
    torch.testing.assert_close(out.output.cpu(), want, rtol=1e-4, atol=1e-4)
    # a retry of the same float32 data is recognised after rounding
    assert s.prefill(0, k, v).chunks_skipped == 1


def test_append_positions(make_session: SessionFactory) -> None:
    s = make_session()
    k, v = random_kv(12)
    s.append(0, k[:, :4], v[:, :4])
    s.append(0, k[:, 4:8], v[:, 4:8])
    assert s.layer_tokens(0) == 8
    assert s.append(0, k[:, 4:8], v[:, 4:8], start=4).chunks_skipped == 1
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, s.append, 0, k[:, 8:], v[:, 8:], start=9)
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, s.append, 0, k[:, :4] + 1, v[:, :4],
                      start=0)
    assert "differ" in err.details
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, s.append, 0, k[:, 6:10], v[:, 6:10], start=6)
    assert s.layer_tokens(0) == 8


def test_search_is_a_superset(make_session: SessionFactory) -> None:
    s = make_session()
    k, v = random_kv(400)
    s.prefill(0, k, v)
    q = torch.randn(HQ, D)
    scores = ref.scores(q, k)
    tau = scores.quantile(0.9, dim=1)
    cands = s.search(0, q, tau)
    assert len(cands) == HQ
    for h in range(HQ):
        got = set(cands[h].tolist())
        need = set(torch.nonzero(scores[h] >= tau[h]).reshape(-1).tolist())
        assert need <= got
        assert cands[h].dtype == torch.int64
        assert cands[h].tolist() == sorted(got)
    assert [c.numel() for c in s.search(1, q, 0.0)] == [0] * HQ  # an empty layer


def test_policies(make_session: SessionFactory) -> None:
    s = make_session()
    k, v = random_kv(300)
    s.prefill(0, k, v)
    q = torch.randn(HQ, D)
    fixed = s.attend(0, q, policy=Fixed(0.5))
    assert torch.allclose(fixed.tau.cpu(), torch.full((HQ,), 0.5))
    # the 5 best indexed keys plus the recent buffer (whose size is the index's business)
    top = s.attend(0, q, policy=TopK(5))
    assert bool((top.num_attended >= 5).all()) and bool((top.num_attended < 300).all())
    assert s.attend(0, q, policy=TopK(1000)).num_attended.tolist() == [300] * HQ


def test_batch_of_items(make_session: SessionFactory) -> None:
    a, b = make_session(), make_session()
    ka, va = random_kv(30)
    kb, vb = random_kv(10)
    a.prefill(0, ka, va)
    b.prefill(1, kb, vb)
    qa, qb = torch.randn(HQ, D), torch.randn(HQ, D)
    with a.decoder() as dec:
        out = dec.step([AttendItem(a, 0, qa, policy=Dense()),
                        AttendItem(b, 1, qb, *random_kv(1), policy=Dense())])
    assert len(out) == 2
    torch.testing.assert_close(out[0].output.cpu(), dense_reference(qa, ka, va)[0])
    assert b.layer_tokens(1) == 11


@pytest.mark.parametrize("bad", ["layer", "q_shape", "q_dtype", "kv_shape", "kv_pair",
                                 "policy", "fixed_len", "nan"])
def test_invalid_arguments(make_session: SessionFactory, bad: str) -> None:
    s = make_session()
    k, v = random_kv(10)
    s.prefill(0, k, v)
    q = torch.randn(HQ, D)
    calls = {
        "layer": lambda: s.attend(2, q),
        "q_shape": lambda: s.attend(0, torch.randn(HQ, D + 1)),
        "q_dtype": lambda: s.attend(0, q.to(torch.int64)),
        "kv_shape": lambda: s.prefill(1, torch.randn(HKV + 1, 3, D), torch.randn(HKV + 1, 3, DV)),
        "kv_pair": lambda: s.attend(0, q, new_keys=k[:, :1]),
        "policy": lambda: s.attend(0, q, policy="dense"),  # type: ignore[arg-type]
        "fixed_len": lambda: s.attend(0, q, policy=Fixed([1.0, 2.0])),
        "nan": lambda: s.attend(0, q, *random_kv(1)) if False else s.prefill(
            1, torch.full((HKV, 2, D), float("nan")), torch.zeros(HKV, 2, DV)),
    }
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, calls[bad])
    assert s.info().layer_tokens == (10, 0)  # nothing changed


def test_attend_on_empty_layer_is_failed_precondition(make_session: SessionFactory) -> None:
    s = make_session()
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, s.attend, 1, torch.randn(HQ, D))
    # with the token's own key it is fine
    out = s.attend(1, torch.randn(HQ, D), *random_kv(1))
    assert out.num_attended.tolist() == [1] * HQ


def test_info_and_delete(make_session: SessionFactory) -> None:
    s = make_session(index=IndexConfig(cluster_size=8, buffer_size=64))
    s.prefill(0, *random_kv(100))
    info = s.info()
    assert info.session_id == s.session_id
    assert info.geometry.num_q_heads == HQ and info.geometry.dv == DV
    assert info.index.cluster_size == 8 and info.index.buffer_size == 64
    assert info.kv_bytes >= 100 * HKV * (D + DV) * 4 and info.index_bytes > 0
    assert info.created_unix_s <= info.last_used_unix_s
    assert s.delete() > 0
    assert s.delete() == 0
    expect_code(grpc.StatusCode.NOT_FOUND, s.attend, 0, torch.randn(HQ, D))


def test_appender_streams_layers(make_session: SessionFactory) -> None:
    s = make_session()
    kv = [random_kv(70), random_kv(70)]
    with s.appender(chunk_tokens=16) as ap:
        for layer in (0, 1):
            ap.add(layer, kv[layer][0][:, :40], kv[layer][1][:, :40])
        for layer in (0, 1):
            ap.add(layer, kv[layer][0][:, 40:], kv[layer][1][:, 40:])
    assert ap.result is not None and ap.result.layer_tokens == (70, 70)
    q = torch.randn(HQ, D)
    torch.testing.assert_close(s.attend(1, q, policy=Dense()).output.cpu(),
                               dense_reference(q, *kv[1])[0])


def test_context_manager_deletes(make_session: SessionFactory) -> None:
    s = make_session()
    with s:
        s.prefill(0, *random_kv(3))
    expect_code(grpc.StatusCode.NOT_FOUND, s.attend, 0, torch.randn(HQ, D))
