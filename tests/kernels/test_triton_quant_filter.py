"""quant_filter (Triton) against quant_filter_reference / LouverIndex.bounds.

Without CUDA the kernel runs under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on tiny shapes. With CUDA the same tests run on the GPU, plus
larger shapes and repeated launches (the self-resetting counters).

Every test draws fresh random data (the seed is in the failure message) and poisons the
preallocated outputs first (cand_pos -7, cand_count -5, pruned_lse NaN).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

from louver_kernels import IndexConfig, IndexKind, LouverIndex
from louver_kernels import reference as ref
from louver_kernels.triton.quant_filter import (
    _MERGE_CHUNK,
    _expand,
    quant_filter,
    quant_filter_reference,
)
from tests.kernels.keygen import gen_seed, make_keys

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
POISON_POS = -7
POISON_CNT = -5


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Case:
    """A QUANT index over a key family plus queries, with every tensor quant_filter needs."""

    def __init__(self, *, kind: str, hkv: int, g: int, n: int, d: int, bits: int, coarse: int,
                 group: int, seg: int, dtype: torch.dtype, gen: torch.Generator,
                 keys: torch.Tensor | None = None, q: torch.Tensor | None = None) -> None:
        if keys is None:
            keys = make_keys(kind, hkv, n, d, dtype, gen)
        values = torch.randn(hkv, keys.shape[1], 8, generator=gen).to(dtype)
        cfg = IndexConfig(kind=IndexKind.QUANT, quant_bits=bits, quant_coarse_bits=coarse,
                          quant_group=group, buffer_size=seg)
        self.index = LouverIndex.build(keys.to(DEVICE), values.to(DEVICE), cfg)
        idx = self.index
        self.hkv, self.g, self.hq, self.d = hkv, g, hkv * g, d
        self.bits, self.coarse, self.group, self.seg = bits, coarse, group, seg
        self.n = idx.num_indexed
        codes = idx._codes
        self.records = codes if idx.uses_triton else ref.pack_codes(codes, bits, coarse)
        self.err, self.lo, self.step = idx._err, idx._lo, idx._step
        qkind = "random" if kind in ("single", "duplicates", "boundary") else kind
        if q is None:
            q = make_keys(qkind, self.hq, 1, d, dtype, gen).reshape(self.hq, d)
        self.q = q.to(DEVICE)
        self.slack = ref.quant_slack(self.q, idx._kmax, idx._rmax, idx._lmax, d // group)
        k, _ = idx.keys_range(0, self.n)
        self.scores = ref.scores(self.q, k)                              # [Hq, n] exact fp32
        self.full = idx.bounds(self.q)                                   # [Hq, n]
        self.coarse_b = idx.bounds(self.q, top=coarse)

    def run(self, tau: torch.Tensor, *, num_indexed: int | torch.Tensor | None = None,
            poison: bool = True, **kw: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cap = self.records.shape[1]
        cand_pos = torch.full((self.hkv, cap), POISON_POS, dtype=torch.int32, device=DEVICE)
        cand_count = torch.full((self.hkv,), POISON_CNT, dtype=torch.int32, device=DEVICE)
        pruned = torch.full((self.hq,), math.nan, dtype=torch.float32, device=DEVICE)
        args = dict(num_indexed=self.n if num_indexed is None else num_indexed, bits=self.bits,
                    coarse_bits=self.coarse, group=self.group, scale=self.index.scale,
                    segment_size=self.seg)
        args.update(kw)
        if poison:
            args.update(cand_pos=cand_pos, cand_count=cand_count, pruned_lse=pruned)
        return quant_filter(self.q, self.records, self.err, self.lo, self.step, self.slack,
                            tau.to(DEVICE), **args)  # type: ignore[arg-type]

    def reference(self, tau: torch.Tensor, n: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quant_filter_reference(self.q, self.records, self.err, self.lo, self.step,
                                      self.slack, tau.to(DEVICE),
                                      num_indexed=self.n if n is None else n, bits=self.bits,
                                      coarse_bits=self.coarse, scale=self.index.scale,
                                      segment_size=self.seg)


def _lists(cand_pos: torch.Tensor, cand_count: torch.Tensor, n: int, msg: str
           ) -> list[torch.Tensor]:
    """Per KV head the candidate positions, checking count range, validity and uniqueness."""
    out = []
    counts = cand_count.cpu()
    pos = cand_pos.cpu()
    for h in range(pos.shape[0]):
        c = int(counts[h])
        assert 0 <= c <= n, f"{msg}: cand_count[{h}]={c} outside [0, {n}]"
        p = pos[h, :c].long()
        assert bool(((p >= 0) & (p < n)).all()), f"{msg}: invalid positions in head {h}"
        assert p.unique().numel() == c, f"{msg}: duplicate positions in head {h}"
        assert bool((pos[h, c:] == POISON_POS).all()), f"{msg}: wrote beyond cand_count"
        out.append(p)
    return out


def _as_mask(lists: list[torch.Tensor], n: int) -> torch.Tensor:
    m = torch.zeros(len(lists), n, dtype=torch.bool)
    for h, p in enumerate(lists):
        m[h, p] = True
    return m


def _check_no_false_negatives(case: Case, tau: torch.Tensor, lists: list[torch.Tensor],
                              msg: str) -> None:
    found = ref.expand_heads(_as_mask(lists, case.n), case.hq)
    need = case.scores.cpu() >= tau.cpu()[:, None]
    missed = need & ~found
    assert not bool(missed.any()), f"{msg}: false negatives at {missed.nonzero().tolist()[:5]}"


def _near(bounds: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """bool [H, n]: bounds within rounding of tau."""
    t = tau.cpu()[:, None]
    b = bounds.cpu()
    tol = 1e-5 * (b.abs() + t.abs().nan_to_num(0.0, 0.0, 0.0)) + 1e-30
    return ((b - t).abs() <= tol) & torch.isfinite(t)


def _check_exact(case: Case, tau: torch.Tensor, lists: list[torch.Tensor],
                 pruned: torch.Tensor, msg: str) -> None:
    """Candidates equal the reference's except keys whose bound is within rounding of tau;
    pruned_lse matches the reference when no such key exists, and otherwise lies between the
    logsumexps of the bounds the kernel may have used for the keys it pruned."""
    cand, surv, lse = case.reference(tau)
    got = _as_mask(lists, case.n)
    close = _near(torch.cat([case.full, case.coarse_b], dim=0), torch.cat([tau, tau]))
    close = close.reshape(2, case.hkv, case.g, case.n).any(dim=2).any(dim=0)
    diff = (got != cand.cpu()) & ~close
    assert not bool(diff.any()), f"{msg}: candidate set differs at {diff.nonzero().tolist()[:5]}"
    # the reference itself against the index's bounds (the ground truth of the contract)
    idx_cand = (case.full.cpu() >= tau.cpu()[:, None]).reshape(case.hkv, case.g, case.n)
    idx_cand = idx_cand.any(dim=1)
    diff = (idx_cand != cand.cpu()) & ~close
    assert not bool(diff.any()), f"{msg}: reference differs from LouverIndex.bounds"
    assert not bool(torch.isnan(pruned).any()), f"{msg}: pruned_lse not written"
    # the kernel sums the bound's terms in another order than torch: each bound may differ by
    # up to the slack (which covers twice the float32 rounding of either order)
    slack = case.index.scale * case.slack.cpu()
    pruned = pruned.cpu()
    if not bool(close.any()):
        lse = lse.cpu()
        tol = 1e-4 + 1e-4 * lse.abs() + slack
        ok = ((pruned - lse).abs() <= tol) | (torch.isneginf(pruned) & torch.isneginf(lse))
        assert bool(ok.all()), f"{msg}: pruned_lse {pruned.tolist()} != {lse.tolist()}"
        return
    # keys near tau: the kernel pruned exactly the keys it did not list; such a key may have
    # survived the coarse stage or not, so its bound is the full or the coarse one
    full, coarse = case.full.cpu(), case.coarse_b.cpu()
    close_h = ref.expand_heads(close, case.hq)
    bound = torch.where(ref.expand_heads(surv.cpu(), case.hq), full, coarse)
    lo = torch.where(close_h, torch.minimum(full, coarse), bound)
    hi = torch.where(close_h, torch.maximum(full, coarse), bound)
    kept = ref.expand_heads(got, case.hq)
    lse_lo, lse_hi = (torch.logsumexp((b.double() * case.index.scale).masked_fill(kept, -math.inf),
                                      dim=1).float() for b in (lo, hi))
    above = pruned >= lse_lo - (1e-4 + 1e-4 * lse_lo.abs() + slack)
    below = pruned <= lse_hi + (1e-4 + 1e-4 * lse_hi.abs() + slack)
    ok = (above & below) | (torch.isneginf(pruned) & torch.isneginf(lse_hi))
    assert bool(ok.all()), f"{msg}: pruned_lse {pruned.tolist()} outside [{lse_lo.tolist()}, " \
        f"{lse_hi.tolist()}]"


def _tau_in_gap(bounds: torch.Tensor, frac: float) -> torch.Tensor:
    """tau [Hq] halfway between two sorted full bounds near the ``frac`` quantile (far from
    every bound, so no key sits within rounding of tau)."""
    b = torch.sort(bounds.double().cpu(), dim=1).values
    hq, n = b.shape
    i = min(max(int(frac * (n - 1)), 0), n - 2) if n >= 2 else 0
    if n < 2:
        return (b[:, 0] + 1.0).float() if n else torch.zeros(hq)
    gaps = b[:, 1:] - b[:, :-1]
    # the widest gap within +-8 positions of the target
    lo_i, hi_i = max(i - 8, 0), min(i + 8, n - 2)
    j = gaps[:, lo_i: hi_i + 1].argmax(dim=1) + lo_i
    return ((b.gather(1, j[:, None]) + b.gather(1, j[:, None] + 1)) / 2).squeeze(1).float()


# ----------------------------------------------------------------------------------------------
# the bit extraction
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expand_kernel(b_ptr, out_ptr, W: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    rows = tl.arange(0, BN)
    b = tl.load(b_ptr + rows[:, None] * NB + tl.arange(0, NB)[None, :])
    v = _expand(b, W, BN, NB).to(tl.int32)
    per: tl.constexpr = 8 // W
    tl.store(out_ptr + rows[:, None] * (NB * per) + tl.arange(0, NB * per)[None, :], v)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_expand_is_the_inverse_of_pack(width: int) -> None:
    """Every byte value at every byte position: the kernel's field expansion returns the values
    reference._pack_field packed, in channel order."""
    nb = 16
    b = torch.arange(256, dtype=torch.int32).reshape(16, 16)
    b = torch.stack([b.roll(i, dims=1) for i in range(2)]).reshape(32, nb).to(torch.uint8)
    out = torch.full((32, nb * 8 // width), -1, dtype=torch.int32, device=DEVICE)
    _expand_kernel[(1,)](b.to(DEVICE), out, W=width, BN=32, NB=nb)
    want = ref._unpack_field(b, width)
    assert torch.equal(out.cpu(), want)
    assert torch.equal(ref._pack_field(want, width), b)


@pytest.mark.parametrize("bits,coarse", [(6, 4), (4, 4), (3, 1), (6, 2), (5, 4)])
def test_pack_codes_round_trip(bits: int, coarse: int) -> None:
    gen, seed = gen_seed()
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen).to(torch.uint8)
    packed = ref.pack_codes(codes, bits, coarse)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(ref.unpack_codes(packed, bits, coarse), codes.int()), seed
    assert torch.equal(ref.unpack_codes(packed, bits, coarse, top=coarse),
                       codes.int() >> (bits - coarse)), seed


def test_integer_query_rounds_up() -> None:
    """sigma qi >= qstep exactly, |qi| <= 2^14, sigma a power of two; also for zeros, tiny and
    huge values, and a value whose scaled image is subnormal."""
    gen, seed = gen_seed()
    msg = f"seed={seed}"
    rows = [torch.randn(64, generator=gen) * 10.0 ** e for e in (-30, -3, 0, 3, 30)]
    rows.append(torch.zeros(64))
    odd = torch.zeros(64)
    odd[0], odd[1], odd[2] = 3e30, 1e-40, -1e-40          # 1e-40 * 2^-? is subnormal
    rows.append(odd)
    qstep = torch.stack(rows).float()
    qi, sigma = ref.quant_query_int(qstep)
    assert bool((qi.abs() <= 1 << 14).all()), msg
    mant, _ = torch.frexp(sigma)
    assert bool((mant == 0.5).all()), msg
    exact = qi.double() * sigma.double()[:, None]
    assert bool((exact >= qstep.double()).all()), msg
    # and tight: less than one grid step above (the subnormal case: one step at most)
    assert bool((exact - qstep.double() <= sigma.double()[:, None]).all()), msg


# ----------------------------------------------------------------------------------------------
# the contract: zero false negatives, exact candidate set, certificate
# ----------------------------------------------------------------------------------------------

# (kind, Hkv, G, n, D, bits, coarse, group, segment, dtype): covers bits {4, 5, 6, 3}, coarse
# {1, 2, 4, bits}, D {64, 128}, G {1, 3, 4}, every dtype and the adversarial key families.
CASES = [
    ("random", 2, 3, 200, 64, 6, 4, 16, 64, torch.float16),
    ("clustered", 1, 4, 256, 128, 6, 2, 16, 128, torch.bfloat16),
    ("duplicates", 2, 1, 130, 64, 4, 4, 8, 64, torch.float32),
    ("huge", 1, 3, 100, 128, 5, 1, 32, 50, torch.float16),
    ("tiny", 2, 4, 96, 64, 4, 4, 16, 32, torch.float32),
    ("fp16_extreme", 1, 3, 128, 64, 6, 4, 64, 64, torch.float16),
    ("outlier_channel", 1, 1, 300, 128, 5, 4, 16, 100, torch.bfloat16),
    ("boundary", 2, 3, 64, 64, 4, 2, 16, 16, torch.float16),
    ("clustered", 1, 1, 190, 64, 3, 1, 8, 190, torch.float32),
]


def _case_id(c: tuple) -> str:
    return f"{c[0]}-hkv{c[1]}-g{c[2]}-n{c[3]}-d{c[4]}-b{c[5]}p{c[6]}-gr{c[7]}-seg{c[8]}-" \
           f"{str(c[9]).split('.')[-1]}"


@pytest.mark.parametrize("spec", CASES, ids=[_case_id(c) for c in CASES])
def test_candidates_and_certificate(spec: tuple) -> None:
    kind, hkv, g, n, d, bits, coarse, group, seg, dtype = spec
    gen, seed = gen_seed()
    case = Case(kind=kind, hkv=hkv, g=g, n=n, d=d, bits=bits, coarse=coarse, group=group,
                seg=seg, dtype=dtype, gen=gen)
    assert case.n > 0
    s = case.scores.cpu()
    taus = {
        "on_a_key": s.gather(1, torch.randint(0, case.n, (case.hq, 1), generator=gen))[:, 0],
        "at_max": s.amax(dim=1),
        "quantile": torch.quantile(s, 0.75, dim=1),
        "mixed": torch.where(torch.arange(case.hq) % 2 == 0, s.amax(dim=1),
                             torch.quantile(s, 0.2, dim=1)),
    }
    for name, tau in taus.items():
        msg = f"seed={seed} {spec} tau={name}"
        cp, cc, pl = case.run(tau.float())
        lists = _lists(cp, cc, case.n, msg)
        _check_no_false_negatives(case, tau, lists, msg)
        assert not bool(torch.isnan(pl).any()), f"{msg}: pruned_lse not written"
    # exact comparison with tau far from every bound
    for frac in (0.5, 0.95):
        tau = _tau_in_gap(case.full, frac)
        msg = f"seed={seed} {spec} gap tau {frac}"
        cp, cc, pl = case.run(tau)
        lists = _lists(cp, cc, case.n, msg)
        _check_no_false_negatives(case, tau, lists, msg)
        _check_exact(case, tau, lists, pl, msg)


def test_infinite_thresholds_and_partial_segment() -> None:
    gen, seed = gen_seed()
    case = Case(kind="random", hkv=2, g=3, n=128, d=64, bits=6, coarse=4, group=16, seg=64,
                dtype=torch.float16, gen=gen)
    msg = f"seed={seed}"
    hq = case.hq
    # tau = +inf: nothing is a candidate, every key is pruned with its coarse bound
    cp, cc, pl = case.run(torch.full((hq,), math.inf))
    assert _lists(cp, cc, case.n, msg) and bool((cc == 0).all())
    want = torch.logsumexp(case.coarse_b.double() * case.index.scale, dim=1).float()
    assert torch.allclose(pl.cpu(), want.cpu(), rtol=1e-4, atol=1e-4), msg
    # tau = -inf: every key is a candidate, nothing is pruned
    cp, cc, pl = case.run(torch.full((hq,), -math.inf))
    lists = _lists(cp, cc, case.n, msg)
    assert all(p.numel() == case.n for p in lists), msg
    assert bool(torch.isneginf(pl).all()), msg
    # a partial last segment (num_indexed not a multiple of the segment)
    n2 = case.n - 37
    tau = _tau_in_gap(case.full[:, :n2], 0.6)
    cp, cc, pl = case.run(tau, num_indexed=n2)
    lists = _lists(cp, cc, n2, msg)
    cand, _, lse = case.reference(tau, n2)
    assert torch.equal(_as_mask(lists, n2), cand.cpu()), msg
    assert torch.allclose(pl.cpu(), lse.cpu(), rtol=1e-4, atol=1e-4), msg


def test_more_programs_than_one_merge_load() -> None:
    """More active programs than the last arrival's merge reads per load (SPLIT_CHUNK): its
    online max across loads, with the largest pruned bound in the last load (a key near the
    end aligned with both queries; tau = +inf prunes every key with its coarse bound)."""
    gen, seed = gen_seed()
    splits = _MERGE_CHUNK + 64
    n = 16 * 2 * splits        # two 16-key blocks per program, whole segments of 256 keys
    keys = make_keys("random", 1, n, 32, torch.float16, gen)
    q = make_keys("random", 2, 1, 32, torch.float16, gen).reshape(2, 32)
    keys[0, n - 3] = (3.0 * (q[0].float() + q[1].float())).half()   # the largest for both heads
    case = Case(kind="random", hkv=1, g=2, n=n, d=32, bits=6, coarse=4, group=16, seg=256,
                dtype=torch.float16, gen=gen, keys=keys, q=q)
    msg = f"seed={seed}"
    cp, cc, pl = case.run(torch.full((case.hq,), math.inf), num_splits=splits, block_n=16)
    assert _lists(cp, cc, case.n, msg) and bool((cc == 0).all()), msg
    want = torch.logsumexp(case.coarse_b.double() * case.index.scale, dim=1).float()
    assert torch.allclose(pl.cpu(), want.cpu(), rtol=1e-5, atol=1e-5), msg
    assert bool((case.coarse_b.argmax(dim=1) >= n - 16 * 2 * 64).all()), msg  # in the last load


def test_empty_index_and_device_count() -> None:
    gen, seed = gen_seed()
    case = Case(kind="clustered", hkv=2, g=4, n=96, d=64, bits=6, coarse=4, group=16, seg=32,
                dtype=torch.bfloat16, gen=gen)
    msg = f"seed={seed}"
    tau = _tau_in_gap(case.full, 0.7)
    cp, cc, pl = case.run(tau, num_indexed=0)
    assert bool((cc == 0).all()) and bool(torch.isneginf(pl).all()), msg
    assert bool((cp == POISON_POS).all()), msg
    # num_indexed read from a device tensor: the same result as the Python int
    cp1, cc1, pl1 = case.run(tau)
    n_dev = torch.tensor([case.n], dtype=torch.int32, device=DEVICE)
    cp2, cc2, pl2 = case.run(tau, num_indexed=n_dev)
    # the grid then covers the capacity: another split of the work, so the logsumexp merge
    # order (not the set of keys) may differ
    assert torch.equal(cc1, cc2), msg
    assert torch.allclose(pl1, pl2, rtol=1e-5, atol=1e-5), msg
    m1 = _as_mask(_lists(cp1, cc1, case.n, msg), case.n)
    m2 = _as_mask(_lists(cp2, cc2, case.n, msg), case.n)
    assert torch.equal(m1, m2), msg
    # a grid far larger than the work: the idle programs exit, the merge reads the others
    cp4, cc4, pl4 = case.run(tau, num_indexed=n_dev, num_splits=64)
    assert torch.equal(cc1, cc4), msg
    assert torch.allclose(pl1, pl4, rtol=1e-5, atol=1e-5), msg
    assert torch.equal(m1, _as_mask(_lists(cp4, cc4, case.n, msg), case.n)), msg
    # an int64 count beyond the int32 range saturates (then clamped to the capacity); it must
    # not wrap around (2^32 + 5 would read as 5)
    cap = torch.tensor([case.records.shape[1]], dtype=torch.int64, device=DEVICE)
    _, cc5, pl5 = case.run(tau, num_indexed=cap)
    _, cc6, pl6 = case.run(tau, num_indexed=torch.tensor([2**32 + 5], dtype=torch.int64,
                                                         device=DEVICE))
    assert torch.equal(cc5, cc6) and torch.allclose(pl5, pl6, rtol=1e-5, atol=1e-5), msg
    # an empty capacity
    zero = torch.tensor([0], dtype=torch.int64, device=DEVICE)
    cp3, cc3, pl3 = case.run(tau, num_indexed=zero)
    assert bool((cc3 == 0).all()) and bool(torch.isneginf(pl3).all()), msg


def test_single_range_layout() -> None:
    """2-D lo/step (one range over all keys) agrees with one segment of all keys."""
    gen, seed = gen_seed()
    n = 160
    case = Case(kind="outlier_channel", hkv=1, g=3, n=n, d=128, bits=6, coarse=4, group=16,
                seg=n, dtype=torch.float16, gen=gen)
    msg = f"seed={seed}"
    tau = _tau_in_gap(case.full, 0.8)
    cp0, cc0, pl0 = case.run(tau)
    m0 = _as_mask(_lists(cp0, cc0, case.n, msg), case.n)
    lo2 = case.lo[:, 0].contiguous()
    step2 = case.step[:, 0].contiguous()
    out = quant_filter(case.q, case.records, case.err, lo2, step2, case.slack, tau.to(DEVICE),
                       num_indexed=case.n, bits=case.bits, coarse_bits=case.coarse,
                       group=case.group, scale=case.index.scale)
    assert torch.equal(_as_mask(_lists_unpoisoned(out[0], out[1], case.n), case.n), m0), msg
    assert torch.equal(out[2], pl0), msg


def test_allocates_outputs_and_repeats() -> None:
    """Outputs allocated by the launcher; repeated launches (self-resetting counters) agree."""
    gen, seed = gen_seed()
    n = 4096 if CUDA else 160
    case = Case(kind="clustered", hkv=2, g=3, n=n, d=64, bits=6, coarse=4, group=16,
                seg=64, dtype=torch.float16, gen=gen)
    msg = f"seed={seed}"
    tau = _tau_in_gap(case.full, 0.9)
    results = [case.run(tau, poison=False) for _ in range(3 if CUDA else 2)]
    cp0, cc0, pl0 = results[0]
    m0 = _as_mask(_lists_unpoisoned(cp0, cc0, case.n), case.n)
    for cp, cc, pl in results[1:]:
        assert torch.equal(cc, cc0) and torch.equal(pl, pl0), msg
        assert torch.equal(_as_mask(_lists_unpoisoned(cp, cc, case.n), case.n), m0), msg
    _check_exact(case, tau, _lists_unpoisoned(cp0, cc0, case.n), pl0, msg)


def _lists_unpoisoned(cp: torch.Tensor, cc: torch.Tensor, n: int) -> list[torch.Tensor]:
    out = []
    for h in range(cp.shape[0]):
        p = cp[h, : int(cc[h])].long().cpu()
        assert p.unique().numel() == p.numel() and bool(((p >= 0) & (p < n)).all())
        out.append(p)
    return out


@pytest.mark.skipif(not CUDA, reason="large shapes need a GPU")
@pytest.mark.parametrize("hkv,g,d", [(3, 3, 64), (8, 4, 128)])
def test_large_on_gpu(hkv: int, g: int, d: int) -> None:
    gen, seed = gen_seed()
    case = Case(kind="clustered", hkv=hkv, g=g, n=65536 + 256 * 7, d=d, bits=6, coarse=4,
                group=16, seg=256, dtype=torch.float16, gen=gen)
    for frac in (0.8, 0.99):
        tau = _tau_in_gap(case.full, frac)
        msg = f"seed={seed} frac={frac}"
        cp, cc, pl = case.run(tau)
        lists = _lists(cp, cc, case.n, msg)
        _check_no_false_negatives(case, tau, lists, msg)
        _check_exact(case, tau, lists, pl, msg)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    gen, _ = gen_seed()
    case = Case(kind="random", hkv=2, g=2, n=64, d=64, bits=6, coarse=4, group=16, seg=32,
                dtype=torch.float16, gen=gen)
    tau = torch.zeros(case.hq, device=DEVICE)
    base = dict(num_indexed=case.n, bits=6, coarse_bits=4, group=16, scale=0.125,
                segment_size=32)
    good = (case.q, case.records, case.err, case.lo, case.step, case.slack, tau)

    def call(*args: tuple[int, Any], **kw: Any) -> None:
        a: list[Any] = list(good)
        for i, v in args:
            a[i] = v
        k = dict(base)
        k.update(kw)
        quant_filter(*a, **k)  # type: ignore[arg-type]

    call()  # the good call works
    bad: list[tuple[dict[str, Any], str]] = [
        ({"args": [(0, case.q.int())]}, "float16"),
        ({"args": [(0, case.q[:, :48])]}, "head dim"),
        ({"args": [(0, case.q[:3])]}, "multiple"),
        ({"args": [(1, case.records.int())]}, "uint8"),
        ({"args": [(1, case.records[:, :, :6])]}, "D\\*bits/8"),
        ({"args": [(2, case.err.float())]}, "err"),
        ({"args": [(2, case.err[:, :10])]}, "err"),
        ({"args": [(3, case.lo.double())]}, "lo"),
        ({"args": [(4, case.step[:, :1])]}, "same shape"),
        ({"args": [(5, case.slack[:1])]}, "slack"),
        ({"args": [(6, tau.double())]}, "tau"),
        ({"args": [(6, "x")]}, "Tensor"),
        ({"kw": {"bits": 9}}, "bits"),
        ({"kw": {"coarse_bits": 8}}, "coarse_bits"),
        ({"kw": {"coarse_bits": 3}}, "GPU code layout"),
        ({"kw": {"coarse_bits": 0}}, "coarse_bits"),
        ({"kw": {"group": 24}}, "group"),
        ({"kw": {"scale": math.inf}}, "scale"),
        ({"kw": {"scale": -1.0}}, "scale"),
        ({"kw": {"num_indexed": case.records.shape[1] + 1}}, "num_indexed"),
        ({"kw": {"num_indexed": -1}}, "num_indexed"),
        ({"kw": {"num_indexed": torch.tensor([1.0], device=DEVICE)}}, "num_indexed"),
        ({"kw": {"segment_size": None}}, "segment_size"),
        ({"kw": {"segment_size": 1}}, "segments"),
        ({"kw": {"cand_pos": torch.zeros(case.hkv, 3, dtype=torch.int32, device=DEVICE)}},
         "cand_pos"),
        ({"kw": {"cand_count": torch.zeros(case.hkv, dtype=torch.int64, device=DEVICE)}},
         "cand_count"),
        ({"kw": {"pruned_lse": torch.zeros(case.hq + 1, device=DEVICE)}}, "pruned_lse"),
        ({"kw": {"num_splits": 0}}, "num_splits"),
    ]
    for spec, needle in bad:
        with pytest.raises(ValueError, match=needle):
            call(*spec.get("args", []), **spec.get("kw", {}))
    if CUDA:
        with pytest.raises(ValueError, match="cpu"):
            call((6, tau.cpu()))
