"""sparse_attention (Triton, split-K) against reference.masked_attention.

Without CUDA the kernel runs under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on tiny shapes. With CUDA the same tests run on the GPU, plus
larger shapes and a repeated-launch check of the cross-program combine.

Every test draws fresh random data (the seed is in the failure message), poisons the
preallocated outputs with NaN / garbage first, and fills storage beyond buffer_end and
cand_pos beyond cand_count with garbage the kernel must never use. The optional below_lse output
(logsumexp of scale * s over the candidates with s < tau) is checked against plain torch in the
same cases.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import pytest
import torch

from louver_kernels import reference as ref
from louver_kernels.triton._launch import FLOAT_DTYPES, CounterPool, graph_counters
from louver_kernels.triton.attention import sparse_attention
from tests.kernels.attention_checks import (
    CUDA,
    DEVICE,
    check,
    make_q,
    poisoned,
    storage,
)
from tests.kernels.keygen import gen_seed

DTYPES = FLOAT_DTYPES   # the kernels' float dtypes
DIMS = ((64, 64), (128, 128))
GROUPS = (1, 3, 4)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _candidates(hkv: int, below: int, counts: list[int], max_c: int, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Sorted random candidate positions < below per KV head, padded with garbage."""
    pos = torch.randint(-(10**9), 10**9, (hkv, max_c), generator=gen, dtype=torch.int64)
    lists = []
    for h, c in enumerate(counts):
        chosen = torch.sort(torch.randperm(below, generator=gen)[:c]).values
        pos[h, :c] = chosen
        lists.append(chosen)
    return (pos.to(torch.int32).to(DEVICE),
            torch.tensor(counts, dtype=torch.int32).to(DEVICE), lists)


def _tau_in_gap(s: torch.Tensor, frac: float) -> float:
    """A threshold between two sorted scores near the ``frac`` quantile, far from both.

    Keys whose score is within rounding of tau could be classified differently by two fp32
    summation orders; a gap of >= 1e-3 (relative to the score scale) avoids that.
    """
    if s.numel() == 0:
        return 0.0
    v = torch.sort(s.double()).values
    scale_ = float(v.abs().max()) + 1e-30
    target = int(frac * (v.numel() - 1))
    order = sorted(range(v.numel() - 1), key=lambda i: abs(i - target))
    for i in order:
        if float(v[i + 1] - v[i]) > 1e-3 * scale_:
            return float((v[i] + v[i + 1]) / 2)
    return float(v[0]) - scale_  # below everything: attend all candidates


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: torch.Tensor,
               scale: float, cand: list[torch.Tensor],
               buffer_start: int, buffer_end: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attend mask from the rule, then reference.masked_attention (float32, CPU)."""
    hq = q.shape[0]
    hkv = keys.shape[0]
    g = hq // hkv
    qc, kc, vc = q.cpu(), keys[:, :buffer_end].cpu(), values[:, :buffer_end].cpu()
    s = ref.scores(qc, kc)                                     # fp32 [Hq, buffer_end]
    attend = torch.zeros(hq, buffer_end, dtype=torch.bool)
    for h in range(hq):
        c = cand[h // g].long()
        if c.numel():
            attend[h, c] = s[h, c] >= float(tau[h])
        attend[h, buffer_start:buffer_end] = True
    out, lse = ref.masked_attention(qc, kc, vc, attend, scale)
    return out, lse, attend.sum(dim=1)


def _poisoned_below(hq: int) -> torch.Tensor:
    return torch.full((hq,), float("nan"), device=DEVICE)


def _reference_below(q: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor, scale: float,
                     cand: list[torch.Tensor]) -> torch.Tensor:
    """float32 [Hq]: logsumexp(scale * s) over the candidates with fp32 score s < tau (plain
    torch; -inf where there is none). Buffer keys never count."""
    hq = q.shape[0]
    g = hq // keys.shape[0]
    end = max([0] + [int(c.max()) + 1 for c in cand if c.numel()])
    s = ref.scores(q.cpu(), keys[:, :end].cpu())               # fp32 [Hq, end]
    below = torch.zeros(hq, end, dtype=torch.bool)
    for h in range(hq):
        c = cand[h // g].long()
        if c.numel():
            below[h, c] = s[h, c] < float(tau[h])
    x = (scale * s).masked_fill(~below, -math.inf)
    return torch.logsumexp(x, dim=1)


def _check_below(got: torch.Tensor, want: torch.Tensor, seed: int) -> None:
    got = got.cpu()
    msg = f"seed={seed}: below_lse {got} vs {want}"
    assert not torch.isnan(got).any(), msg
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), msg
    assert (got[~finite] == -math.inf).all(), msg
    tol = 1e-4 + 1e-6 * want[finite].abs()
    assert ((got[finite] - want[finite]).abs() <= tol).all(), msg


# ----------------------------------------------------------------------------------------------
# sparse mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("dims", DIMS, ids=lambda x: f"d{x[0]}v{x[1]}")
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
def test_sparse_matches_reference(dtype: torch.dtype, dims: tuple[int, int], group: int) -> None:
    gen, seed = gen_seed()
    d, dv = dims
    hkv = 2
    hq = hkv * group
    n_idx = 160 if not CUDA else 3000
    buf = 37 if not CUDA else 256
    bs, be = n_idx, n_idx + buf
    cap = be + 11
    keys = storage(hkv, cap, be, d, dtype, gen)
    values = storage(hkv, cap, be, dv, dtype, gen)
    q = make_q(hq, d, dtype, gen)
    counts = [int(torch.randint(1, n_idx, (1,), generator=gen)) for _ in range(hkv)]
    max_c = max(counts) + 5
    cand_pos, cand_count, cand = _candidates(hkv, bs, counts, max_c, gen)
    s = ref.scores(q.cpu(), keys[:, :be].cpu())
    g = group
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.3 + 0.4 * (h % 2))
                        for h in range(hq)], dtype=torch.float32)
    scale = 1.0 / math.sqrt(d)
    out, lse, cnt = poisoned(hq, dv)
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=scale, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           out=out, lse=lse, num_attended=cnt, below_lse=below)
    assert got[0] is out and got[1] is lse and got[2] is cnt
    check(got, _reference(q, keys, values, tau, scale, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, scale, cand), seed)


def _sparse_inputs(gen: torch.Generator, hkv: int, g: int, n_idx: int, n_buf: int,
                   counts: list[int], d: int = 64, dtype: torch.dtype = torch.float16
                   ) -> tuple[Any, ...]:
    """Keys/values (D = Dv = d) of n_idx indexed positions and an n_buf-key buffer,
    queries, candidate lists of ``counts`` entries per KV head and a tau per query head in a
    score gap near the median of its candidates: (q, keys, values, cand_pos, cand_count,
    cand, tau, buffer_start, buffer_end)."""
    bs, be = n_idx, n_idx + n_buf
    keys = storage(hkv, be, be, d, dtype, gen)
    values = storage(hkv, be, be, d, dtype, gen)
    q = make_q(hkv * g, d, dtype, gen)
    cand_pos, cand_count, cand = _candidates(hkv, bs, counts, n_idx, gen)
    s = ref.scores(q.cpu(), keys.cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.5) for h in range(hkv * g)])
    return q, keys, values, cand_pos, cand_count, cand, tau, bs, be


@pytest.mark.parametrize("num_splits,min_blocks", [(1, 4), (2, 1), (3, 2), (64, 1), (64, 4)])
def test_many_blocks_and_splits(num_splits: int, min_blocks: int) -> None:
    """Candidates spanning many blocks; splits from one per head to more than there are blocks
    (with min_blocks, most of the grid exits at once and fewer partials are merged)."""
    gen, seed = gen_seed()
    hkv, g = 2, 4
    hq = hkv * g
    n_idx = 280 if not CUDA else 20000
    q, keys, values, cand_pos, cand_count, cand, tau, bs, be = _sparse_inputs(
        gen, hkv, g, n_idx, 20, [n_idx, n_idx * 2 // 3])
    tau[1], tau[6] = -math.inf, math.inf
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           num_splits=num_splits, min_blocks=min_blocks, below_lse=below)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    want = _reference_below(q, keys, tau, 0.125, cand)
    assert want[1] == -math.inf and torch.isfinite(want[6])
    _check_below(below, want, seed)


@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16)],
                         ids=["d64-float16", "d128-bfloat16"])
@pytest.mark.parametrize("num_warps,grid_per_sm", [(1, 3), (2, 1), (4, 2)])
def test_launch_shapes(num_warps: int, grid_per_sm: int, d: int, dtype: torch.dtype) -> None:
    """The same outputs from programs of 1, 2 and 4 warps (blocks of 2 rows per row lane),
    many blocks per program and merges over many partials, at both head dims."""
    gen, seed = gen_seed()
    hkv, g = 2, 4
    hq = hkv * g
    n_idx = 200 if not CUDA else 20000
    q, keys, values, cand_pos, cand_count, cand, tau, bs, be = _sparse_inputs(
        gen, hkv, g, n_idx, 40, [n_idx // 2, n_idx // 5], d, dtype)
    tau[2] = -math.inf
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           num_warps=num_warps, grid_per_sm=grid_per_sm, below_lse=below)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, 0.125, cand), seed)


@pytest.mark.parametrize("hkv,num_splits,min_blocks,merge_group",
                         [(4, 1, 4, None), (4, 4, 4, None), (4, 4, 1, None), (3, 4, 1, None),
                          (4, 4, 1, 2), (3, 4, 1, 3)])
def test_unbalanced_heads(hkv: int, num_splits: int, min_blocks: int,
                          merge_group: int | None) -> None:
    """KV heads with very different candidate counts (one heavy, one empty, one or two light)
    and the buffer: every head against the reference (the heads share the grid in proportion
    to their blocks: with min_blocks 1 the heavy head gets most of it, the empty one a single
    split; three heads leave a padded lane in the kernel's per-head vectors)."""
    gen, seed = gen_seed()
    g = 2
    n_idx = 300 if not CUDA else 30000
    counts = [3, n_idx, 0, n_idx // 10][:hkv]
    q, keys, values, cand_pos, cand_count, cand, tau, bs, be = _sparse_inputs(
        gen, hkv, g, n_idx, 5, counts)
    below = _poisoned_below(hkv * g)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           num_splits=num_splits, min_blocks=min_blocks, below_lse=below,
                           merge_group=merge_group)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, 0.125, cand), seed)


@pytest.mark.parametrize("merge_group", [None, 1, 2, 3])
def test_merge_over_split_chunks(merge_group: int | None) -> None:
    """G * Dv large enough that the last program merges the partials in several chunks of
    splits; key norms grow with the position, so later chunks tend to hold the maxima. With
    merge_group, the two-level merge: groups of that many programs (the last one partial)
    merged first, then the group partials, one chunk or several."""
    gen, seed = gen_seed()
    hkv, g, d, dv = 1, 8, 64, 256     # 8192 // (G * Dv) = 4 splits per merge chunk
    hq = hkv * g
    n_idx = 180 if not CUDA else 6000
    bs, be = n_idx, n_idx + 9
    keys = torch.randn(hkv, be, d, generator=gen) * torch.linspace(0.5, 2.0, be)[None, :, None]
    keys = keys.to(DEVICE)
    values = storage(hkv, be, be, dv, torch.float32, gen)
    q = make_q(hq, d, torch.float32, gen)
    cand_pos, cand_count, cand = _candidates(hkv, bs, [n_idx - 3], n_idx, gen)
    s = ref.scores(q.cpu(), keys.cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[0].long()], 0.2 + 0.1 * h) for h in range(hq)])
    tau[3] = math.inf
    for splits in (6, 9):          # 6 blocks of 32 entries under the interpreter
        out, lse, cnt = poisoned(hq, dv)
        below = _poisoned_below(hq)
        got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                               cand_count=cand_count, buffer_start=bs, buffer_end=be,
                               out=out, lse=lse, num_attended=cnt, below_lse=below,
                               num_splits=splits if not CUDA else 8 * splits, min_blocks=1,
                               merge_group=merge_group)
        check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
        _check_below(below, _reference_below(q, keys, tau, 0.125, cand), seed)


@pytest.mark.parametrize("with_buffer", [True, False])
def test_empty_candidate_lists(with_buffer: bool) -> None:
    gen, seed = gen_seed()
    hkv, g, d = 2, 3, 64
    hq = hkv * g
    bs = 50
    be = bs + (13 if with_buffer else 0)
    keys = storage(hkv, 64, be, d, torch.float32, gen)
    values = storage(hkv, 64, be, d, torch.float32, gen)
    q = make_q(hq, d, torch.float32, gen)
    tau = torch.zeros(hq)
    for max_c in (0, 7):
        cand_pos, cand_count, cand = _candidates(hkv, bs, [0, 0], max_c, gen)
        out, lse, cnt = poisoned(hq, d, torch.int64)
        below = _poisoned_below(hq)
        got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                               cand_count=cand_count, buffer_start=bs, buffer_end=be,
                               out=out, lse=lse, num_attended=cnt, below_lse=below)
        check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
        assert (below.cpu() == -math.inf).all(), f"seed={seed}: {below}"


def test_empty_buffer_and_heads_attending_nothing() -> None:
    """No buffer; one head's tau above all its scores, one KV head with no candidates."""
    gen, seed = gen_seed()
    hkv, g, d = 3, 4, 128
    hq = hkv * g
    bs = be = 120
    keys = storage(hkv, 130, be, d, torch.bfloat16, gen)
    values = storage(hkv, 130, be, d, torch.bfloat16, gen)
    q = make_q(hq, d, torch.bfloat16, gen)
    cand_pos, cand_count, cand = _candidates(hkv, bs, [70, 0, 119], 119, gen)
    s = ref.scores(q.cpu(), keys[:, :be].cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.5) for h in range(hq)])
    tau[1] = math.inf
    tau[9] = float(s[9].max()) + 1.0
    out, lse, cnt = poisoned(hq, d)
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.09, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           out=out, lse=lse, num_attended=cnt, below_lse=below)
    want = _reference(q, keys, values, tau, 0.09, cand, bs, be)
    assert int(want[2][1]) == 0 and int(want[2][9]) == 0 and (want[2][4:8] == 0).all()
    check(got, want, seed)
    # heads 1 (tau = +inf) and 9 (tau above every score) drop all their candidates
    s_c = ref.scores(q.cpu(), keys[:, :bs].cpu())
    want_b = _reference_below(q, keys, tau, 0.09, cand)
    for h in (1, 9):
        c = cand[h // g].long()
        assert torch.allclose(want_b[h], torch.logsumexp(0.09 * s_c[h, c], dim=0))
    assert (want_b[4:8] == -math.inf).all()
    _check_below(below, want_b, seed)


def test_out_of_range_candidates_are_skipped() -> None:
    """A buggy caller's positions outside [0, buffer_start) are never read nor counted."""
    gen, seed = gen_seed()
    hkv, g, d = 1, 2, 64
    bs, be = 40, 48
    keys = storage(hkv, 64, be, d, torch.float16, gen)
    values = storage(hkv, 64, be, d, torch.float16, gen)
    q = make_q(hkv * g, d, torch.float16, gen)
    good = torch.tensor([1, 5, 9, 39])
    cand_pos = torch.tensor([[1, 5, -3, 9, 39, 40, 47, 63, 10**6]], dtype=torch.int32)
    cand_count = torch.tensor([9], dtype=torch.int32)
    for t in (-math.inf, math.inf):
        tau = torch.full((hkv * g,), t)
        below = _poisoned_below(hkv * g)
        got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125,
                               cand_pos=cand_pos.to(DEVICE), cand_count=cand_count.to(DEVICE),
                               buffer_start=bs, buffer_end=be, below_lse=below)
        check(got, _reference(q, keys, values, tau, 0.125, [good], bs, be), seed)
        # tau = +inf: exactly the four in-range candidates are below tau
        _check_below(below, _reference_below(q, keys, tau, 0.125, [good]), seed)


# ----------------------------------------------------------------------------------------------
# every key a candidate; device bounds
# ----------------------------------------------------------------------------------------------


def _all_candidates(hkv: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    pos = torch.arange(n, dtype=torch.int32).repeat(hkv, 1)
    return (pos.to(DEVICE), torch.full((hkv,), n, dtype=torch.int32, device=DEVICE),
            [torch.arange(n)] * hkv)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
def test_every_key_a_candidate(dtype: torch.dtype, group: int) -> None:
    """Every indexed key a candidate: tau = -inf is plain attention over [0, buffer_end); a
    finite tau drops the candidates below it."""
    gen, seed = gen_seed()
    hkv, d = 2, 64
    hq = hkv * group
    bs = 150 if not CUDA else 5000
    be = bs + 30
    keys = storage(hkv, be + 3, be, d, dtype, gen)
    values = storage(hkv, be + 3, be, d, dtype, gen)
    q = make_q(hq, d, dtype, gen)
    cand_pos, cand_count, cand = _all_candidates(hkv, bs)
    tau = torch.full((hq,), -math.inf)
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           below_lse=below)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    assert (below.cpu() == -math.inf).all(), f"seed={seed}: {below}"
    s = ref.scores(q.cpu(), keys[:, :be].cpu())
    tau = torch.tensor([_tau_in_gap(s[h, :bs], 0.8) for h in range(hq)])
    out, lse, cnt = poisoned(hq, d)
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be, out=out,
                           lse=lse, num_attended=cnt, below_lse=below)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, 0.125, cand), seed)


def test_device_bounds() -> None:
    """buffer_start and buffer_end given as device tensors (int32 and int64)."""
    gen, seed = gen_seed()
    hkv, g, d = 2, 3, 64
    hq = hkv * g
    bs, be = 120, 140
    keys = storage(hkv, 150, be, d, torch.float16, gen)
    values = storage(hkv, 150, be, d, torch.float16, gen)
    q = make_q(hq, d, torch.float16, gen)
    s = ref.scores(q.cpu(), keys[:, :be].cpu())
    cand_pos, cand_count, cand = _candidates(hkv, bs, [40, 100], 100, gen)
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.4) for h in range(hq)])
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.125, cand_pos=cand_pos,
                           cand_count=cand_count,
                           buffer_start=torch.tensor([bs], dtype=torch.int32, device=DEVICE),
                           buffer_end=torch.tensor(be, device=DEVICE), below_lse=below)
    check(got, _reference(q, keys, values, tau, 0.125, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, 0.125, cand), seed)


# ----------------------------------------------------------------------------------------------
# numerics, layouts, mixed dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["huge", "tiny"])
def test_fp16_extremes(kind: str) -> None:
    """Entries near the float16 maximum (huge, peaked scores) or tiny (subnormal-ish)."""
    gen, seed = gen_seed()
    hkv, g, d = 2, 4, 64
    hq = hkv * g
    bs, be = 100, 110
    mag = 6.0e4 if kind == "huge" else 1.0e-3
    keys = torch.randn(hkv, be, d, generator=gen).clamp(-1, 1) * mag
    if kind == "tiny":
        keys[:, :, ::3] *= 1e-4  # float16 subnormals
    keys = keys.to(torch.float16).to(DEVICE)
    values = (torch.randn(hkv, be, d, generator=gen).clamp(-3, 3)
              * (2.0e4 if kind == "huge" else 1e-3)).to(torch.float16).to(DEVICE)
    q = make_q(hq, d, torch.float16, gen, scale=1.0 if kind == "huge" else 1e3)
    cand_pos, cand_count, cand = _candidates(hkv, bs, [80, 99], 99, gen)
    s = ref.scores(q.cpu(), keys.cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.5) for h in range(hq)])
    scale = 1.0 / math.sqrt(d) if kind == "tiny" else 1e-4
    below = _poisoned_below(hq)
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=scale, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be,
                           below_lse=below)
    check(got, _reference(q, keys, values, tau, scale, cand, bs, be), seed)
    _check_below(below, _reference_below(q, keys, tau, scale, cand), seed)


def test_strided_storage_and_mixed_dtypes() -> None:
    """keys/values as views into wider storage (row stride != D); fp32 q with bf16 keys,
    float16 values, Dv != D."""
    gen, seed = gen_seed()
    hkv, g, d, dv = 2, 2, 64, 128
    hq = hkv * g
    bs, be = 70, 80
    kbig = storage(hkv, 90, be, 2 * d, torch.bfloat16, gen)
    vbig = storage(hkv + 1, 90, be, dv + 32, torch.float16, gen)
    keys, values = kbig[:, :, d:], vbig[1:, :, :dv]
    q = make_q(hq, d, torch.float32, gen)
    cand_pos, cand_count, cand = _candidates(hkv, bs, [33, 69], 69, gen)
    s = ref.scores(q.cpu(), keys.cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.5) for h in range(hq)])
    got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.1, cand_pos=cand_pos,
                           cand_count=cand_count, buffer_start=bs, buffer_end=be)
    check(got, _reference(q, keys, values, tau, 0.1, cand, bs, be), seed)


def test_repeated_launches_reuse_counters() -> None:
    """Consecutive launches with different split counts, with and without below_lse (the
    arrival counters must be left at zero); on CUDA, many back-to-back launches must give
    bit-identical results."""
    gen, seed = gen_seed()
    hkv, g, d = 2, 4, 128
    hq = hkv * g
    n_idx = 200 if not CUDA else 50000
    bs, be = n_idx, n_idx + 64
    keys = storage(hkv, be, be, d, torch.float16, gen)
    values = storage(hkv, be, be, d, torch.float16, gen)
    q = make_q(hq, d, torch.float16, gen)
    cand_pos, cand_count, cand = _candidates(hkv, bs, [n_idx // 2, n_idx // 3], n_idx // 2, gen)
    s = ref.scores(q.cpu(), keys.cpu())
    tau = torch.tensor([_tau_in_gap(s[h, cand[h // g].long()], 0.5) for h in range(hq)])
    tau[0] = -math.inf
    want = _reference(q, keys, values, tau, 0.08, cand, bs, be)
    want_b = _reference_below(q, keys, tau, 0.08, cand)
    # launches with and without below_lse (different workspace layouts) interleaved
    # (splits, below_lse, merge_group): the two-level merge's group tickets too
    plan = [(3, True, None), (1, False, None), (5, False, 2), (4, True, 1), (5, True, None),
            (None, False, None), (None, True, None)]
    checked = len(plan)
    if CUDA:
        plan += [(None, it % 2 == 0, None) for it in range(40)]
    first: dict[bool, list[torch.Tensor]] = {}
    for it, (splits, with_below, group) in enumerate(plan):
        below = _poisoned_below(hq) if with_below else None
        got = sparse_attention(q, keys, values, tau.to(DEVICE), scale=0.08, cand_pos=cand_pos,
                               cand_count=cand_count, buffer_start=bs, buffer_end=be,
                               num_splits=splits, below_lse=below, merge_group=group)
        if it < checked:
            check(got, want, seed)
            if below is not None:
                _check_below(below, want_b, seed)
        if splits is None:
            res = [t.clone() for t in got] + ([below.clone()] if below is not None else [])
            if with_below not in first:
                first[with_below] = res
            else:
                same = all(torch.equal(a, b) for a, b in zip(first[with_below], res, strict=True))
                assert same, f"seed={seed} it={it}"


def test_counter_pool_keeps_outgrown_buffers() -> None:
    """The attention's counters grow with its grid (a ticket per program for the two-level
    merge): an outgrown buffer is replaced by a zeroed larger one and kept alive, because a CUDA
    graph recorded with it still reads it."""
    pool = CounterPool()
    small = pool.get(DEVICE, 10)
    alive = weakref.ref(small)
    del small
    big = pool.get(DEVICE, 1000)
    assert big.numel() >= 1000 and int(big.abs().sum().item()) == 0
    assert alive() is not None
    assert pool.get(DEVICE, 5) is big


def test_counter_pool_gives_each_graph_its_own_counters() -> None:
    """Inside graph_counters (capture_graph's scope) a pool hands out buffers of that graph
    alone, grown like the others and all kept; outside, the stream's buffer as before. So
    graphs replayed at once on different streams never share a counter."""
    pool = CounterPool()
    eager = pool.get(DEVICE, 10)
    with graph_counters() as first:
        mine = pool.get(DEVICE, 10)
        assert mine is not eager and pool.get(DEVICE, 5) is mine
        bigger = pool.get(DEVICE, 1000)
        assert bigger.numel() >= 1000 and int(bigger.abs().sum().item()) == 0
    [held] = first.values()
    assert held[0] is mine and held[-1] is bigger
    with graph_counters() as second:
        other = pool.get(DEVICE, 10)
    assert other is not mine and other is not bigger and other is not eager
    assert [t is other for t in next(iter(second.values()))] == [True]
    assert pool.get(DEVICE, 10) is eager


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _valid_args() -> dict:
    q = torch.randn(4, 64, device=DEVICE)
    keys = torch.randn(2, 32, 64, device=DEVICE)
    values = torch.randn(2, 32, 64, device=DEVICE)
    tau = torch.zeros(4, device=DEVICE)
    return dict(q=q, keys=keys, values=values, tau=tau, scale=0.125, buffer_start=20,
                buffer_end=30, cand_pos=torch.zeros(2, 4, dtype=torch.int32, device=DEVICE),
                cand_count=torch.zeros(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.randn(4, 64, dtype=torch.float64)), "float16, bfloat16 or float32"),
    (dict(q=torch.randn(5, 64)), "multiple of Hkv"),
    (dict(q=torch.randn(4, 48)), "head dim"),
    (dict(tau=torch.zeros(4, dtype=torch.float64)), "tau"),
    (dict(tau=torch.zeros(3)), "tau"),
    (dict(keys=torch.randn(2, 64, 32).transpose(1, 2)), "contiguous"),
    (dict(buffer_end=40), "exceeds the storage"),
    (dict(buffer_start=31), "buffer_start <= buffer_end"),
    (dict(buffer_start=2.0), "int"),
    (dict(scale=float("nan")), "scale"),
    (dict(cand_pos=None), "cand_pos and cand_count must be tensors"),
    (dict(cand_count=torch.zeros(2, dtype=torch.int64)), "cand_count must be"),
    (dict(cand_pos=torch.zeros(2, 4, dtype=torch.int64),
          cand_count=torch.zeros(2, dtype=torch.int32)), "cand_pos must be int32"),
    (dict(cand_pos=torch.zeros(3, 4, dtype=torch.int32),
          cand_count=torch.zeros(3, dtype=torch.int32)), "cand_pos must be int32"),
    (dict(out=torch.zeros(4, 64, dtype=torch.float16)), "out must be"),
    (dict(lse=torch.zeros(5)), "lse must be"),
    (dict(num_attended=torch.zeros(4, dtype=torch.float32)), "num_attended must be"),
    (dict(below_lse=torch.zeros(4, dtype=torch.float64)), "below_lse must be"),
    (dict(below_lse=torch.zeros(8)[::2]), "below_lse must be contiguous"),
    (dict(num_splits=0), "num_splits"),
    (dict(min_blocks=0), "min_blocks"),
    (dict(merge_group=0), "merge_group"),
    (dict(grid_per_sm=True), "grid_per_sm"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_warps=True), "num_warps"),
    (dict(buffer_end=torch.zeros(2, dtype=torch.int32)), "one int32/int64 element"),
])
def test_validation(change: dict, match: str) -> None:
    args = _valid_args()
    for k, v in change.items():
        if isinstance(v, torch.Tensor):   # keep the strides (.to() on CUDA would compact them)
            v = torch.empty_strided(v.size(), v.stride(), dtype=v.dtype,
                                    device=DEVICE).copy_(v)
        args[k] = v
    with pytest.raises(ValueError, match=match):
        sparse_attention(**args)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (a CPU tensor next to CUDA tensors)")
def test_validation_device_mismatch() -> None:
    args = _valid_args()
    args["tau"] = args["tau"].cpu()
    with pytest.raises(ValueError, match="is on"):
        sparse_attention(**args)
