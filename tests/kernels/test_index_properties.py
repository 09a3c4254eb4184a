"""The zero-false-negative contract and the attention/certificate semantics, as properties.

For every index kind, dtype, GQA ratio and key family: search(q, tau) must return a superset of
{n : fl32(q_h.k_n) >= tau_h}, every head, every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from louver_kernels import (
    Dense,
    Fixed,
    IndexConfig,
    IndexKind,
    LouverIndex,
    Mass,
    Relative,
    TopK,
)
from louver_kernels import reference as ref
from tests.kernels.keygen import KINDS, make_keys, tau_on_a_key

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PROFILE = settings(max_examples=25, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


def configs() -> st.SearchStrategy[IndexConfig]:
    balls = st.builds(IndexConfig, kind=st.just(IndexKind.BALLS),
                      num_subspaces=st.sampled_from([1, 2, 4, 8]),
                      cluster_size=st.sampled_from([1, 2, 4, 16]),
                      buffer_size=st.sampled_from([1, 7, 64]))
    quant = st.builds(IndexConfig, kind=st.just(IndexKind.QUANT),
                      quant_bits=st.sampled_from([4, 8]), quant_group=st.sampled_from([8, 16]),
                      buffer_size=st.sampled_from([1, 7, 64]))
    return st.one_of(balls, quant)


def all_scores(index: LouverIndex, q: torch.Tensor) -> torch.Tensor:
    keys, _ = index.keys_range(0, index.num_keys)
    return ref.scores(q, keys)


def assert_superset(index: LouverIndex, q: torch.Tensor, tau: torch.Tensor) -> None:
    s = all_scores(index, q)
    found = index.search(q, tau).mask
    missed = (s >= tau[:, None]) & ~found
    assert not bool(missed.any()), f"false negatives at {missed.nonzero().tolist()[:5]}"


@PROFILE
@given(config=configs(), kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES),
       group=st.sampled_from([1, 3, 4]), n=st.integers(1, 400), seed=st.integers(0, 2**31))
def test_search_has_no_false_negatives(config: IndexConfig, kind: str, dtype: torch.dtype,
                                       group: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 32
    keys = make_keys(kind, hkv, n, d, dtype, gen)
    values = torch.randn(hkv, keys.shape[1], d, generator=gen).to(dtype)
    index = LouverIndex.build(keys, values, config)
    for _ in range(3):
        q = make_keys(kind if kind != "single" else "random", hkv * group, 1, d, dtype,
                      gen).reshape(hkv * group, d)
        s = all_scores(index, q)
        assert_superset(index, q, tau_on_a_key(s, gen))
        assert_superset(index, q, s.amax(dim=1))
        assert_superset(index, q, torch.quantile(s.float(), 0.9, dim=1))


@PROFILE
@given(config=configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       steps=st.integers(1, 300), prefill=st.sampled_from([0, 1, 50]))
def test_appends_keep_the_contract(config: IndexConfig, dtype: torch.dtype, seed: int,
                                   steps: int, prefill: int) -> None:
    """Empty or tiny prefill, then many appends crossing flushes and storage growth."""
    gen = torch.Generator().manual_seed(seed)
    hkv, d, hq = 1, 16, 2
    keys = torch.randn(hkv, prefill, d, generator=gen).to(dtype)
    index = LouverIndex.build(keys, keys.clone(), config)
    appended = [keys]
    for step in range(steps):
        t = 1 if step % 5 else 3
        k = (torch.randn(hkv, t, d, generator=gen) * (1 + step % 7)).to(dtype)
        index.append(k, k)
        appended.append(k)
        if step % 37 == 0 or step == steps - 1:
            q = torch.randn(hq, d, generator=gen).to(dtype)
            s = all_scores(index, q)
            assert_superset(index, q, tau_on_a_key(s, gen))
    stored, _ = index.keys_range(0, index.num_keys)
    assert torch.equal(stored, torch.cat(appended, dim=1))
    # a full buffer is flushed after the next step (or at the next append); its keys count as
    # indexed from the operation after that step on
    assert index.num_buffered < config.buffer_size + 3
    q = torch.randn(hq, d, generator=gen).to(dtype)
    index.attend(q, Relative(1e-3))
    index.bounds(q)
    assert index.num_buffered < config.buffer_size


def test_thousands_of_appends_growth() -> None:
    gen = torch.Generator().manual_seed(1)
    for kind in IndexKind:
        index = LouverIndex.build(torch.randn(3, 100, 64, generator=gen).half(),
                                  torch.randn(3, 100, 64, generator=gen).half(),
                                  IndexConfig(kind=kind, buffer_size=256))
        chunks = []
        for _ in range(3000):
            k = torch.randn(3, 1, 64, generator=gen).half()
            index.append(k, -k)
            chunks.append(k)
        assert index.num_keys == 3100
        stored_k, stored_v = index.keys_range(100, 3100)
        assert torch.equal(stored_k, torch.cat(chunks, dim=1))
        assert torch.equal(stored_v, -torch.cat(chunks, dim=1))
        q = torch.randn(9, 64, generator=gen).half()
        s = all_scores(index, q)
        assert_superset(index, q, tau_on_a_key(s, gen))
        assert_superset(index, q, s.topk(20, dim=1).values[:, -1])


def dense_reference(index: LouverIndex, q: torch.Tensor, tau: torch.Tensor):
    """(out, lse, true dropped mass) of the attention semantics: buffer + {s >= tau}."""
    keys, values = index.keys_range(0, index.num_keys)
    s = ref.scores(q, keys)
    attend = s >= tau[:, None]
    attend[:, index.num_indexed:] = True
    out, lse = ref.masked_attention(q, keys, values, attend, index.scale)
    p = torch.softmax(s.double() * index.scale, dim=1)
    dropped = (p * (~attend)).sum(dim=1)
    return out, lse, dropped, attend, s


POLICIES = (Relative(1e-2), Relative(1e-4), TopK(1), TopK(7), Mass(1e-2), Mass(1e-3), Dense())


@PROFILE
@given(config=configs(), kind=st.sampled_from(KINDS[:-1]), dtype=st.sampled_from(DTYPES),
       group=st.sampled_from([1, 3]), n=st.integers(1, 300), extra=st.integers(0, 40),
       policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**31))
def test_attend_matches_dense_softmax_over_attended_set(config, kind, dtype, group, n, extra,
                                                        policy, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 32
    if kind in ("huge", "fp16_extreme"):
        kind = "clustered"  # softmax of huge scores is one-hot; covered by the search tests
    keys = make_keys(kind, hkv, n, d, dtype, gen)
    index = LouverIndex.build(keys, torch.randn(hkv, n, d, generator=gen).to(dtype), config)
    if extra:
        index.append(make_keys(kind, hkv, extra, d, dtype, gen),
                     torch.randn(hkv, extra, d, generator=gen).to(dtype))
    q = (torch.randn(hkv * group, d, generator=gen) * 2).to(dtype)
    res = index.attend(q, policy)
    out, lse, dropped, attend, s = dense_reference(index, q, res.tau)
    torch.testing.assert_close(res.output, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.lse, lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.num_attended, attend.sum(dim=1))
    # the certificate bounds the true dropped mass (in a dense softmax over every key)
    assert bool((res.dropped_mass_bound.double() + 1e-6 >= dropped).all()), (
        res.dropped_mass_bound, dropped)
    idx_scores = s[:, : index.num_indexed]
    if isinstance(policy, Relative):
        # every key whose weight is >= eps times the largest weight is attended
        need = s >= s.amax(dim=1, keepdim=True) - math.log(1 / policy.eps) / index.scale
        assert not bool((need & ~attend).any())
    if isinstance(policy, TopK) and index.num_indexed > policy.k:
        kth = idx_scores.topk(policy.k, dim=1).values[:, -1]
        assert torch.equal(res.tau, kth)
        assert bool((attend[:, : index.num_indexed].sum(1) >= policy.k).all())
    if isinstance(policy, Mass):
        assert bool((res.dropped_mass_bound <= policy.delta).all())
        assert bool((dropped <= policy.delta + 1e-9).all())
    if isinstance(policy, Dense):
        assert bool(attend.all())
    assert bool((res.num_candidates >= res.num_attended).all())


def test_fixed_policy_and_empty_attention() -> None:
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 48, 16, generator=gen)
    index = LouverIndex.build(keys, keys.clone(), IndexConfig(buffer_size=8))
    assert index.num_buffered == 0  # a build indexes the whole prefill
    q = torch.randn(2, 16, generator=gen)
    res = index.attend(q, Fixed(1.0e9))  # nothing indexed reaches tau; buffer is empty
    assert torch.equal(res.output, torch.zeros(2, 16))
    assert bool(torch.isneginf(res.lse).all())
    assert torch.equal(res.num_attended, torch.zeros(2, dtype=torch.long))
    assert bool((res.dropped_mass_bound == 1.0).all())
    res = index.attend(q, Fixed([-1.0e9, 1.0e9]))
    assert res.num_attended.tolist() == [48, 0]
    index.append(torch.randn(1, 3, 16, generator=gen), torch.randn(1, 3, 16, generator=gen))
    assert (index.num_indexed, index.num_buffered) == (48, 3)
    assert index.attend(q, Fixed(1.0e9)).num_attended.tolist() == [3, 3]
    index.append(torch.randn(1, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen))
    # the buffer is full: its keys are indexed after the next step, which attends them exactly
    assert (index.num_indexed, index.num_buffered) == (48, 8)
    assert index.attend(q, Fixed(1.0e9)).num_attended.tolist() == [8, 8]
    assert (index.num_indexed, index.num_buffered) == (48, 8)   # what that step saw
    assert index.attend(q, Fixed(1.0e9)).num_attended.tolist() == [0, 0]
    assert (index.num_indexed, index.num_buffered) == (56, 0)


def test_long_append_flushes_at_once_a_full_buffer_after_the_step() -> None:
    """An append that leaves two full buffers or more is indexed at once; one that fills the
    buffer leaves it for the next step (the flush runs after it), or for the next append."""
    index = LouverIndex.build(torch.randn(2, 10, 16), torch.randn(2, 10, 16),
                              IndexConfig(kind=IndexKind.QUANT, buffer_size=8))
    index.append(torch.randn(2, 20, 16), torch.randn(2, 20, 16))
    assert (index.num_indexed, index.num_buffered) == (30, 0)
    index.append(torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    assert (index.num_indexed, index.num_buffered) == (30, 8)
    index.append(torch.randn(2, 1, 16), torch.randn(2, 1, 16))    # flushes the 8 first
    assert (index.num_indexed, index.num_buffered) == (38, 1)


def test_failed_append_changes_nothing_with_a_flush_due() -> None:
    """An append that fails validation leaves a due flush due (the state is as before)."""
    keys = torch.randn(1, 40, 16)
    index = LouverIndex.build(keys[:, :4], keys[:, :4], IndexConfig(buffer_size=8))
    index.append(keys[:, 4:12], keys[:, 4:12])                   # 8 buffered: flush due
    before = (index.num_keys, index.num_indexed, index.num_flushes)
    bad = keys[:, 12:13].clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError):
        index.append(bad, bad)
    assert (index.num_keys, index.num_indexed, index.num_flushes) == before


def test_empty_index_attends_buffer_only() -> None:
    index = LouverIndex.build(torch.empty(2, 0, 16), torch.empty(2, 0, 8),
                              IndexConfig(kind=IndexKind.QUANT, buffer_size=4))
    res = index.attend(torch.randn(4, 16), Relative(1e-3))
    assert res.num_attended.tolist() == [0, 0, 0, 0]
    index.append(torch.randn(2, 3, 16), torch.randn(2, 3, 8))
    res = index.attend(torch.randn(4, 16), Relative(1e-3))
    assert res.num_attended.tolist() == [3, 3, 3, 3]
    assert res.output.shape == (4, 8)


@pytest.mark.parametrize("bad", [
    lambda i: i.append(torch.randn(2, 1, 16), torch.randn(2, 2, 16)),
    lambda i: i.append(torch.randn(3, 1, 16), torch.randn(3, 1, 16)),
    lambda i: i.append(torch.full((2, 1, 16), math.nan), torch.randn(2, 1, 16)),
    lambda i: i.append(torch.randint(0, 3, (2, 1, 16)), torch.randn(2, 1, 16)),
    # validate=False skips only the value checks: shapes and dtypes still fail
    lambda i: i.append(torch.randn(2, 1, 16), torch.randn(2, 2, 16), validate=False),
    lambda i: i.append(torch.randint(0, 3, (2, 1, 16)), torch.randn(2, 1, 16), validate=False),
    lambda i: i.attend(torch.randn(3, 16), Relative(1e-3)),
    lambda i: i.attend(torch.randn(4, 15), Relative(1e-3)),
    lambda i: i.attend(torch.full((4, 16), math.inf), Relative(1e-3)),
    lambda i: i.search(torch.randn(4, 16), [0.0, 1.0]),
    lambda i: i.search(torch.randn(4, 16), math.nan),
    lambda i: i.attend(torch.randn(4, 16), Fixed([1.0, 2.0])),
    lambda i: i.keys_range(0, 99),
])
def test_bad_input_raises_value_error(bad) -> None:
    index = LouverIndex.build(torch.randn(2, 10, 16), torch.randn(2, 10, 16))
    with pytest.raises(ValueError):
        bad(index)
    assert index.num_keys == 10  # nothing half-applied


@pytest.mark.parametrize("config", [IndexConfig(kind=IndexKind.BALLS),
                                    IndexConfig(kind=IndexKind.QUANT, backend="torch"),
                                    IndexConfig(kind=IndexKind.QUANT, backend="triton")])
@pytest.mark.parametrize(("where", "value"), [("keys", math.nan), ("values", math.inf),
                                              ("keys", -2.0 ** 70)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter encodes them first
def test_build_rejects_bad_values(config: IndexConfig, where: str, value: float) -> None:
    """Non-finite keys or values, or keys above MAX_KEY_ABS, fail a build with ValueError
    whatever the kind and backend (the check is read after the build's work is queued)."""
    keys, values = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    (keys if where == "keys" else values)[1, 33, 5] = value
    device = "cuda" if config.backend == "triton" and torch.cuda.is_available() else "cpu"
    with pytest.raises(ValueError, match=where):
        LouverIndex.build(keys.to(device), values.to(device), config)


def test_append_without_value_checks_stores_the_same() -> None:
    """append(validate=False) (the service, which checks K/V while decoding the request) stores
    and answers exactly like a checked append."""
    keys, values = torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    cfg = IndexConfig(kind=IndexKind.QUANT, buffer_size=8)
    a, b = LouverIndex.build(keys, values, cfg), LouverIndex.build(keys, values, cfg)
    new_k, new_v = torch.randn(2, 11, 16), torch.randn(2, 11, 16)   # crosses a flush
    a.append(new_k, new_v)
    b.append(new_k, new_v, validate=False)
    q = torch.randn(4, 16)
    want, got = a.attend(q, Relative(1e-3)), b.attend(q, Relative(1e-3))
    assert (a.num_keys, a.num_indexed) == (b.num_keys, b.num_indexed)
    assert torch.equal(want.output, got.output) and torch.equal(want.tau, got.tau)
    # and the value checks are really skipped: the caller vouches for the values
    bad = torch.full((2, 1, 16), math.nan)
    with pytest.raises(ValueError):
        a.append(bad, torch.randn(2, 1, 16))
    b.append(bad, torch.randn(2, 1, 16), validate=False)
    assert b.num_keys == a.num_keys + 1


@pytest.mark.parametrize("kwargs", [dict(kind="nope"), dict(num_subspaces=0),
                                    dict(quant_bits=9), dict(quant_bits=4, quant_coarse_bits=5),
                                    dict(buffer_size=0),
                                    dict(softmax_scale=-1.0)])
def test_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        IndexConfig(**kwargs)


def test_config_must_divide_head_dim() -> None:
    with pytest.raises(ValueError):
        LouverIndex.build(torch.randn(1, 4, 10), torch.randn(1, 4, 10),
                          IndexConfig(num_subspaces=4))


@PROFILE
@given(bits=st.integers(2, 8), kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES),
       n=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_coarse_quant_bounds_are_sound_and_ordered(bits, kind, dtype, n, seed) -> None:
    """The kernels' first pass reads only the top bits: its bound must be sound too, and
    never below the full bound (so skipping on it never drops a candidate)."""
    gen = torch.Generator().manual_seed(seed)
    keys = make_keys(kind, 2, n, 32, dtype, gen)
    index = LouverIndex.build(keys, keys.clone(),
                              IndexConfig(kind=IndexKind.QUANT, quant_bits=bits, quant_group=8,
                                          buffer_size=8))
    q = make_keys("random", 6, 1, 32, dtype, gen).reshape(6, 32)
    s = all_scores(index, q)[:, : index.num_indexed]
    full = index.bounds(q)
    assert bool((full >= s).all())
    for top in range(1, bits + 1):
        coarse = index.bounds(q, top=top)
        assert bool((coarse >= s).all()), top
        assert bool((coarse >= full - 1e-3 * full.abs().clamp_min(1)).all()), top


def test_gpu_code_layout_roundtrip() -> None:
    gen = torch.Generator().manual_seed(3)
    for bits in range(2, 8):
        for coarse in (1, 2, 4):
            if bits - coarse not in (0, 1, 2, 4):
                with pytest.raises(ValueError, match="GPU code layout"):
                    ref.code_fields(bits, coarse)
                continue
            codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen).to(torch.uint8)
            packed = ref.pack_codes(codes, bits, coarse)
            assert packed.shape == (3, 5, 8 * bits)
            assert torch.equal(ref.unpack_codes(packed, bits, coarse), codes.int())
            assert torch.equal(ref.unpack_codes(packed, bits, coarse, top=coarse),
                               codes.int() >> (bits - coarse))


@pytest.mark.parametrize("kind", list(IndexKind))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_head_dims_64_and_128(kind: IndexKind, dtype: torch.dtype, d: int) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    keys = make_keys("outlier_channel", 2, 300, d, dtype, gen)
    index = LouverIndex.build(keys, torch.randn(2, 300, d, generator=gen).to(dtype),
                              IndexConfig(kind=kind, buffer_size=64))
    index.append(make_keys("clustered", 2, 70, d, dtype, gen),
                 torch.randn(2, 70, d, generator=gen).to(dtype))
    q = torch.randn(8, d, generator=gen).to(dtype)
    s = all_scores(index, q)
    assert_superset(index, q, tau_on_a_key(s, gen))
    res = index.attend(q, Relative(1e-3))
    out, lse, dropped, _, _ = dense_reference(index, q, res.tau)
    torch.testing.assert_close(res.output, out, rtol=1e-4, atol=1e-5)
    assert bool((res.dropped_mass_bound.double() + 1e-6 >= dropped).all())


@pytest.mark.parametrize("buffer_size", [7, 100, 255, 257])
def test_capacity_holds_a_partial_last_segment(buffer_size: int) -> None:
    """Found by the property test: 253 keys in segments of 7 end past a capacity of 256."""
    gen = torch.Generator().manual_seed(buffer_size)
    for n in (253, 256, 300, 513):
        keys = torch.randn(2, n, 32, generator=gen).half()
        index = LouverIndex.build(keys, keys.clone(), IndexConfig(kind=IndexKind.QUANT,
                                                                  buffer_size=buffer_size))
        q = torch.randn(2, 32, generator=gen).half()
        s = all_scores(index, q)
        assert_superset(index, q, tau_on_a_key(s, gen))
        index.append(keys[:, :buffer_size], keys[:, :buffer_size])
        assert_superset(index, q, s.amax(dim=1))
