"""quant_encode_packed (Triton): the flush of a QUANT index against reference.py.

lo, step and the packed code records must be bit-exact with reference.quant_fit_range /
quant_encode / pack_codes evaluated on the CPU (IEEE float32). The norms (err, kmax, lmax,
rmax) must be the exact norms of the reference's float64 vectors rounded up (checked with
rational arithmetic): bit-exact with the reference wherever its float64 rounding gives that
value, which every case below asserts except the ones built to show where it does not (keys
near 2^64, where the float64 sum of squares rounds below the exact norm: the kernel is then
one float32 ulp higher, and sound).

Without CUDA the kernel runs under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on small shapes. With CUDA the same tests run on the GPU, against
the reference evaluated on the CPU (torch on CUDA divides by a scalar with a reciprocal
multiplication, see encode.py).
"""

from __future__ import annotations

import math
import weakref
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from louver_kernels import IndexConfig, IndexKind, LouverIndex
from louver_kernels import reference as ref
from louver_kernels.triton import encode
from louver_kernels.triton.encode import (
    _row_sum,
    _ru32_sqrt,
    _square,
    quant_encode_packed,
)
from tests.kernels.keygen import gen_seed, make_keys

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# the interpreter warns when float16 err overflows to +inf (huge residuals), as intended
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


# ----------------------------------------------------------------------------------------------
# exact rounded-up norms (rational arithmetic)
# ----------------------------------------------------------------------------------------------


def exact_ru32_norms(rows: torch.Tensor) -> torch.Tensor:
    """float32 [R]: the smallest float32 >= the exact Euclidean norm of each float64 row of
    ``rows`` [R, N] (+inf for a row with an infinite entry)."""
    out = []
    for row in rows.double().cpu().tolist():
        if any(math.isinf(x) for x in row):
            out.append(math.inf)
            continue
        s = sum((Fraction(x) ** 2 for x in row), Fraction(0))
        f = np.float32(math.sqrt(float(s)))
        while Fraction(float(f)) ** 2 < s:
            f = np.nextafter(f, np.float32(np.inf))
        while f > 0 and Fraction(float(np.nextafter(f, np.float32(0)))) ** 2 >= s:
            f = np.nextafter(f, np.float32(0))
        out.append(float(f))
    return torch.tensor(out, dtype=torch.float32)


def check_norms(name: str, got: torch.Tensor, exact: torch.Tensor, torch_ref: torch.Tensor,
                torch_exact: bool, msg: str) -> None:
    """got must be the exact rounded-up norms, bit for bit; so must the plain-torch reference
    where ``torch_exact`` (else it may be one ulp off the exact value where they differ)."""
    got, exact, torch_ref = got.cpu(), exact.cpu(), torch_ref.cpu()
    assert torch.equal(got, exact), f"{name}: kernel != exact rounded-up norm; {msg}"
    if torch_exact:
        assert torch.equal(got, torch_ref), f"{name}: kernel != reference; {msg}"
    else:   # one ulp apart at most (nonnegative floats: adjacent bit patterns)
        bits = torch.int16 if got.dtype == torch.float16 else torch.int32
        ulps = (got.view(bits).long() - torch_ref.view(bits).long()).abs()
        assert int(ulps.max()) <= 1, f"{name}: kernel and reference differ by {ulps.max()}"


# ----------------------------------------------------------------------------------------------
# the ground truth of one launch
# ----------------------------------------------------------------------------------------------


def reference_flush(keys: torch.Tensor, start: int, end: int, seg: int, bits: int,
                    coarse: int, group: int) -> dict[str, torch.Tensor]:
    """reference.py over positions [start, end) of keys [Hkv, cap, D] (CPU), segmented as
    LouverIndex._encode_quant: whole segments of ``seg`` keys from start, then a partial one.
    Returns lo, step [Hkv, S, D], codes (pack_codes) and err [Hkv, end-start, ...], plus the
    float64 residuals [Hkv, end-start, G, group] the err values are the norms of."""
    hkv, _, d = keys.shape
    whole = start + (end - start) // seg * seg
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("lo", "step", "codes", "err", "x")}
    for s0, s1, size in ((start, whole, seg), (whole, end, end - whole)):
        if s1 == s0:
            continue
        ks = keys[:, s0:s1].reshape(hkv, (s1 - s0) // size, size, d)
        lo, step = ref.quant_fit_range(ks, bits)
        codes, err = ref.quant_encode(ks, lo, step, bits, group)
        deq = lo.double()[:, :, None] + step.double()[:, :, None] * codes.double()
        out["lo"].append(lo)
        out["step"].append(step)
        out["codes"].append(ref.pack_codes(codes.reshape(hkv, s1 - s0, d), bits, coarse))
        out["err"].append(err.reshape(hkv, s1 - s0, d // group))
        out["x"].append((ks.double() - deq).reshape(hkv, s1 - s0, d // group, group))
    return {k: torch.cat(v, dim=1) for k, v in out.items()}


# (name, key kind, dtype, D, bits, coarse, group, segment, start, norm_start, end, Hkv,
#  keys per program, torch's float64 norms round to the exact rounded-up value)
CASES = [
    ("random-2seg+5", "random", torch.float16, 64, 6, 4, 16, 16, 0, 0, 37, 2, 64, True),
    ("clustered-chunks-partial1", "clustered", torch.bfloat16, 128, 4, 2, 16, 16, 0, 0, 33, 1,
     8, True),
    ("duplicates-whole", "duplicates", torch.float32, 64, 5, 4, 8, 32, 0, 0, 64, 2, 64, True),
    ("constant-channels", "constant", torch.float16, 64, 6, 4, 16, 16, 0, 0, 24, 2, 64, True),
    ("fp16-65504", "fp16_65504", torch.float16, 128, 6, 4, 16, 16, 0, 0, 20, 1, 64, True),
    ("tiny-fp32", "tiny", torch.float32, 64, 6, 4, 32, 16, 0, 0, 20, 2, 64, True),
    ("lattice-group1", "boundary", torch.float16, 64, 6, 4, 1, 16, 0, 0, 17, 1, 64, True),
    ("group12-D96-restart", "outlier_channel", torch.bfloat16, 96, 6, 4, 12, 16, 16, 21, 40, 2,
     64, True),
    ("huge-2^64", "huge64", torch.float32, 64, 6, 4, 16, 16, 0, 0, 20, 2, 64, False),
    # the GPU's summation path (tl.reduce) under the interpreter too, on a small case (the
    # interpreter runs tl.reduce's combine once per element: slow)
    ("reduce-path", "random", torch.float16, 64, 6, 4, 16, 8, 0, 0, 9, 1, 64, True),
]


def case_keys(kind: str, hkv: int, n: int, d: int, dtype: torch.dtype,
              gen: torch.Generator) -> torch.Tensor:
    """Keys of a key family (keygen's, plus the adversarial ones of this file)."""
    if kind == "constant":
        # constant channels (step clamped to 1e-8), a channel constant within each segment
        # of 16, and duplicated keys
        k = make_keys("random", hkv, n, d, dtype, gen)
        k[..., :5] = 1.5
        k[..., 7] = -3.0
        k[:, :, 9] = torch.arange(n).div(16, rounding_mode="floor").to(dtype)
        k[:, 12:16] = k[:, 11:12]
        return k
    if kind == "fp16_65504":
        # the float16 extremes: entries at +-65504 next to subnormal-sized ones
        k = make_keys("fp16_extreme", hkv, n, d, dtype, gen)
        k[0, :, 4] = 65504.0
        k[0, ::2, 4] = -65504.0
        k[:, 3, :] = 65504.0
        k[:, 5, ::2] = -65504.0
        return k
    if kind == "tiny":
        return (torch.randn(hkv, n, d, generator=gen) * 1e-30).to(dtype)
    if kind == "huge64":
        # entries of +-2^64 (MAX_KEY_ABS) among ordinary ones: ||k||^2 = 2^128 + O(D) rounds
        # to 2^128 in float64, below the exact norm's square; residual norms above 65504 store
        # err = +inf (as the reference)
        k = make_keys("random", hkv, n, d, torch.float32, gen)
        k[:, 3, 2] = 2.0 ** 64
        k[:, 5, 9] = -(2.0 ** 64)
        k[:, 6, :] = 2.0 ** 60
        return k.to(dtype)
    return make_keys(kind, hkv, n, d, dtype, gen)


@pytest.mark.parametrize("spec", CASES, ids=[c[0] for c in CASES])
def test_encode_matches_reference(spec: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
                                  ) -> None:
    (name, kind, dtype, d, bits, coarse, group, seg, start, norm_start, end, hkv, kpp,
     torch_exact) = spec
    if name == "reduce-path":
        monkeypatch.setattr(encode, "_INTERPRETED", False)
    gen, seed = gen_seed()
    msg = f"seed {seed}"
    cap = (end // seg + 2) * seg
    keys = torch.zeros(hkv, cap, d, dtype=dtype)
    keys[:, :end] = case_keys(kind, hkv, end, d, dtype, gen)
    want = reference_flush(keys, start, end, seg, bits, coarse, group)
    if kind == "constant":     # the step clamp is exercised
        assert bool((want["step"] == torch.tensor(1e-8)).any())
    if kind == "huge64":       # so is err = +inf (residual norms above 65504)
        assert bool(want["err"].isinf().any())
    s0, s1 = start // seg, -(-end // seg)
    # outputs poisoned where the launch writes; running maxima start from random values
    codes = torch.full((hkv, cap, d * bits // 8), 0xA5, dtype=torch.uint8)
    err = torch.full((hkv, cap, d // group), math.nan, dtype=torch.float16)
    lo = torch.full((hkv, cap // seg, d), math.nan)
    step = torch.full((hkv, cap // seg, d), math.nan)
    init = [torch.rand(hkv, generator=gen) * 2 for _ in range(3)]
    kmax, lmax, rmax = (t.clone().to(DEVICE) for t in init)
    outs = [t.to(DEVICE) for t in (keys, codes, err, lo, step)]
    quant_encode_packed(*outs, kmax, lmax, rmax, start=start, end=end, segment_size=seg,
                        bits=bits, coarse=coarse, group=group, norm_start=norm_start,
                        keys_per_program=kpp)
    _, codes, err, lo, step = (t.cpu() for t in outs)

    assert torch.equal(lo[:, s0:s1], want["lo"]), msg
    assert torch.equal(step[:, s0:s1], want["step"]), msg
    assert torch.equal(codes[:, start:end], want["codes"]), msg
    # nothing written outside [start, end) / the segments
    assert bool((codes[:, end:] == 0xA5).all()) and bool((codes[:, :start] == 0xA5).all()), msg
    assert bool(err[:, end:].isnan().all()) and bool(lo[:, s1:].isnan().all()), msg

    e = err[:, start:end]
    g = d // group
    exact_e = ref.round_up_f16(exact_ru32_norms(want["x"].reshape(-1, group)))
    check_norms("err", e.reshape(-1), exact_e, want["err"].reshape(-1), torch_exact, msg)
    # the running maxima: max(initial, the exact rounded-up norms); torch: reference.py
    k_new = keys[:, norm_start:end]
    exact_k = exact_ru32_norms(k_new.reshape(-1, d)).reshape(hkv, -1).amax(dim=1)
    exact_l = exact_ru32_norms(want["lo"].reshape(-1, d)).reshape(hkv, -1).amax(dim=1)
    exact_r = exact_ru32_norms(e.reshape(-1, g)).reshape(hkv, -1).amax(dim=1)
    torch_k = ref.key_norm_max(k_new)
    torch_l = ref.round_up_f32(want["lo"].double().norm(dim=-1).amax(dim=1))
    torch_r = ref.round_up_f32(e.double().norm(dim=-1).amax(dim=1))
    for name, got, exact, via_torch, first in (("kmax", kmax, exact_k, torch_k, init[0]),
                                               ("lmax", lmax, exact_l, torch_l, init[1]),
                                               ("rmax", rmax, exact_r, torch_r, init[2])):
        check_norms(name, got, torch.maximum(first, exact), torch.maximum(first, via_torch),
                    torch_exact, msg)
    if not torch_exact:   # the case is built so that torch's float64 norm is below the exact
        assert not torch.equal(torch.maximum(init[0], torch_k), kmax.cpu()), msg


def test_huge_keys_torch_float64_norm_is_below_the_exact_one() -> None:
    """The premise of the huge-2^64 case: the reference's rounded-up float64 norm is below
    the exact norm there (so it is not sound), the kernel's is not."""
    k = torch.zeros(1, 1, 64)
    k[0, 0, 2] = 2.0 ** 64
    k[0, 0, 5] = 3.0
    exact = exact_ru32_norms(k.reshape(1, 64))
    assert float(ref.key_norm_max(k)) == 2.0 ** 64 < float(exact)
    assert Fraction(float(exact)) ** 2 >= Fraction(2) ** 128 + 9


# ----------------------------------------------------------------------------------------------
# the exact rounding of norms, on its own
# ----------------------------------------------------------------------------------------------


@triton.jit
def _norm_rows_kernel(x_ptr, out_ptr, R: tl.constexpr, N: tl.constexpr, TREE: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    s, c = _square(tl.load(x_ptr + offs))
    s, c = _row_sum(s, c, R, N, TREE)
    tl.store(out_ptr + tl.arange(0, R), _ru32_sqrt(s, c))


@pytest.mark.parametrize("tree", [True, False], ids=["tree", "tl.reduce"])
def test_norm_rounding_is_the_exact_rounded_up_norm(tree: bool) -> None:
    """_square / _row_sum / _ru32_sqrt: the smallest float32 >= the exact norm of float64
    rows, including rows whose float64 norm (torch, any order) rounds below it. Both
    summation paths (the interpreter's tree, the GPU's tl.reduce) run on either machine."""
    gen, seed = gen_seed()
    r, n = 32, 16
    mant = torch.randn(r, n, generator=gen, dtype=torch.float64)
    x = torch.ldexp(mant, torch.randint(-80, 80, (r, n), generator=gen).double())
    x[0] = 0.0                                           # zero norm
    x[1] = 0.0
    x[1, 3] = 1.0
    x[1, 7] = 2.0 ** -30                                 # 1 + 2^-60: float64 gives 1.0
    x[2] = 0.0
    x[2, :2] = torch.tensor([3.0, 4.0])                  # exactly 5
    x[3] = 0.0
    x[3, 0] = 1.0 + 2.0 ** -40                           # a square with more than 53 bits
    x[4] = 2.0 ** 64                                     # 2^66, exactly
    x[4, 0] = 2.0 ** 64 + 2.0 ** 20                      # just above a float32 at 2^66
    x[5] = mant[5] * 2.0 ** -140                         # tiny: float32 subnormal range
    x[6] = torch.ldexp(torch.ones(n, dtype=torch.float64), torch.arange(n).double() * 3)
    out = torch.empty(r, dtype=torch.float32, device=DEVICE)
    _norm_rows_kernel[(1,)](x.to(DEVICE), out, R=r, N=n, TREE=tree, enable_fp_fusion=False)
    exact = exact_ru32_norms(x)
    assert torch.equal(out.cpu(), exact), f"seed {seed}"
    # torch's float64 norm rounded up is below the exact norm on row 1 (not sound)
    assert float(ref.round_up_f32(x[1].norm())) == 1.0 < float(out[1])


# ----------------------------------------------------------------------------------------------
# the index: flushes on the Triton backend against the torch backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "group"), [(torch.float16, 16), (torch.bfloat16, 8)])
def test_index_flushes_match_torch_backend(dtype: torch.dtype, group: int) -> None:
    """A LouverIndex(backend="triton") built and appended across several flushes (partial
    segments re-encoded, a flush of several segments) holds the torch backend's records."""
    gen, seed = gen_seed()
    hkv, d, seg, bits, coarse = 2, 64, 16, 6, 4
    cfg = dict(kind=IndexKind.QUANT, buffer_size=seg, quant_bits=bits, quant_coarse_bits=coarse,
               quant_group=group)
    keys = make_keys("clustered", hkv, 37, d, dtype, gen)
    t_idx = LouverIndex.build(keys, keys, IndexConfig(backend="torch", **cfg))
    g_idx = LouverIndex.build(keys.to(DEVICE), keys.to(DEVICE),
                              IndexConfig(backend="triton", **cfg))
    assert g_idx.uses_triton and not t_idx.uses_triton
    for t in (7, 7, 7, 40, 3):    # 37 | 44 51 58* | 98* | 101 (*: flushes)
        k = make_keys("clustered", hkv, t, d, dtype, gen)
        t_idx.append(k, k)
        g_idx.append(k.to(DEVICE), k.to(DEVICE))
        assert_same_records(g_idx, t_idx, f"seed {seed} after {t_idx.num_keys} keys")
    # the short flushes went through encode.CapturedFlush: graph replays on CUDA
    assert isinstance(g_idx._flush, encode.CapturedFlush)
    assert (g_idx._flush._graph is not None) == CUDA


def assert_same_records(g_idx: LouverIndex, t_idx: LouverIndex, msg: str) -> None:
    """The Triton index holds the torch backend index's records (packed) and maxima."""
    cfg = t_idx.config
    n = t_idx.num_indexed
    assert g_idx.num_indexed == n and g_idx.num_flushes == t_idx.num_flushes, msg
    nseg = -(-n // cfg.buffer_size)
    assert torch.equal(g_idx._codes[:, :n].cpu(), ref.pack_codes(
        t_idx._codes[:, :n], cfg.quant_bits, cfg.quant_coarse_bits)), msg
    assert torch.equal(g_idx._err[:, :n].cpu(), t_idx._err[:, :n]), msg
    assert torch.equal(g_idx._lo[:, :nseg].cpu(), t_idx._lo[:, :nseg]), msg
    assert torch.equal(g_idx._step[:, :nseg].cpu(), t_idx._step[:, :nseg]), msg
    for name in ("_kmax", "_lmax", "_rmax"):
        assert torch.equal(getattr(g_idx, name).cpu(), getattr(t_idx, name)), (name, msg)


def test_captured_flush_follows_growth_and_lets_the_index_go() -> None:
    """Decode-time flushes go through CapturedFlush (graph replays on CUDA); growing the
    storage makes a new one over the new tensors (the records stay the torch backend's, the
    device counters follow), and a dropped index is freed at once (no reference cycle)."""
    gen, seed = gen_seed()
    hkv, d, seg = 2, 64, 32
    cfg = dict(kind=IndexKind.QUANT, buffer_size=seg)
    keys = make_keys("clustered", hkv, 50, d, torch.float16, gen)
    t_idx = LouverIndex.build(keys, keys, IndexConfig(backend="torch", **cfg))
    g_idx = LouverIndex.build(keys.to(DEVICE), keys.to(DEVICE),
                              IndexConfig(backend="triton", **cfg))
    graphs: list[object] = []
    new = make_keys("clustered", hkv, 400, d, torch.float16, gen)
    for step in range(400):     # 450 keys one by one: the storage grows from 256 to 512
        k = new[:, step:step + 1]
        t_idx.append(k, k)
        g_idx.append(k.to(DEVICE), k.to(DEVICE))
        if g_idx._flush is not None and all(g is not g_idx._flush for g in graphs):
            graphs.append(g_idx._flush)
        if g_idx.num_buffered == 0:
            assert_same_records(g_idx, t_idx, f"seed {seed} step {step}")
            assert [int(c) for c in g_idx.device_counters()] == [g_idx.num_keys] * 2
    assert g_idx._cap == 512 and len(graphs) == 2 and t_idx.num_flushes == 13
    gone = weakref.ref(g_idx)
    del g_idx
    assert gone() is None


def _storage(hkv: int, cap: int, d: int, seg: int, gen: torch.Generator
             ) -> dict[str, torch.Tensor]:
    """A QUANT storage on DEVICE: random keys, poisoned records, random running maxima."""
    return dict(keys=make_keys("clustered", hkv, cap, d, torch.float16, gen),
                codes=torch.full((hkv, cap, d * 6 // 8), 0xA5, dtype=torch.uint8),
                err=torch.full((hkv, cap, d // 16), math.nan, dtype=torch.float16),
                lo=torch.full((hkv, cap // seg, d), math.nan),
                step=torch.full((hkv, cap // seg, d), math.nan),
                kmax=torch.rand(hkv, generator=gen), lmax=torch.rand(hkv, generator=gen),
                rmax=torch.rand(hkv, generator=gen))


@pytest.mark.parametrize(("n_idx", "n_keys", "max_keys", "start", "end", "seg", "kpp", "dtype"), [
    (16, 32, 32, 16, 32, 16, 16, torch.int32),     # one aligned segment
    (21, 37, 32, 16, 37, 16, 16, torch.int32),     # unaligned: num_indexed's segment re-fitted
    (21, 37, 32, 16, 37, 16, 4, torch.int64),      # the same, 4 programs per segment, int64
    (32, 32, 32, 32, 32, 16, 16, torch.int32),     # nothing to flush
    (40, 30, 32, 16, 30, 16, 16, torch.int32),     # num_indexed > num_keys: clamped to num_keys
    (-5, 20, 32, 0, 20, 16, 8, torch.int32),       # num_indexed < 0: clamped to 0
    (40, 200, 64, 32, 64, 32, 8, torch.int32),     # num_keys beyond the storage: clamped to cap
    (0, 48, 32, 0, 32, 16, 16, torch.int32),       # longer than max_keys: the grid's segments
], ids=["aligned", "unaligned", "unaligned-4-per-program-int64", "empty", "clamped-start",
        "negative-start", "clamped-end", "grid-bound"])
def test_counted_encode_is_the_packed_encode(n_idx: int, n_keys: int, max_keys: int,
                                             start: int, end: int, seg: int, kpp: int,
                                             dtype: torch.dtype) -> None:
    """quant_encode_counted with positions read on the device writes exactly what
    quant_encode_packed(start=n // B * B, end=m, norm_start=n) writes (clamped to the
    storage, cut at the grid's max_keys), and nothing else."""
    gen, seed = gen_seed()
    hkv, cap, d = 2, 64, 64
    base = _storage(hkv, cap, d, seg, gen)
    got = {k: v.clone().to(DEVICE) for k, v in base.items()}
    want = {k: v.clone().to(DEVICE) for k, v in base.items()}
    pos = torch.tensor([n_idx, n_keys], dtype=dtype, device=DEVICE)
    opts: dict[str, Any] = dict(segment_size=seg, bits=6, coarse=4, group=16,
                                keys_per_program=kpp)
    encode.quant_encode_counted(**got, num_indexed=pos[0:1], num_keys=pos[1:2],
                                max_keys=max_keys, **opts)
    quant_encode_packed(**want, start=start, end=end,
                        norm_start=min(max(n_idx, start), end), **opts)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    for name in base:   # bit for bit (the poison is NaN)
        g, w = got[name].cpu(), want[name].cpu()
        assert torch.equal(g.view(as_int[g.element_size()]), w.view(as_int[w.element_size()])), \
            f"{name}, seed {seed}"


@pytest.mark.skipif(not CUDA, reason="host synchronizations exist on CUDA only")
def test_flush_does_not_synchronize_and_validation_synchronizes_once() -> None:
    gen = torch.Generator().manual_seed(5)
    keys = make_keys("random", 2, 40, 64, torch.float16, gen).to(DEVICE)
    index = LouverIndex.build(keys, keys, IndexConfig(backend="triton", buffer_size=32))
    first, extra = (make_keys("random", 2, 20, 64, torch.float16, gen).to(DEVICE)
                    for _ in range(2))
    longer = make_keys("random", 2, 80, 64, torch.float16, gen).to(DEVICE)
    index._store(*index._validate_kv(first, first, False))
    index._index_pending(captured=True)         # records the flush's graph (synchronizes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            index._store(*index._validate_kv(extra, extra))
        assert sum("synchroniz" in str(w.message) for w in record) == 1
        torch.cuda.set_sync_debug_mode("error")
        index._index_pending(captured=True)     # a replay of the captured flush
        index._store(*index._validate_kv(longer, longer, False))
        index._index_pending(captured=True)     # 3 segments: the launch
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert index.num_indexed == 160


def test_validate_kv_messages() -> None:
    keys = torch.randn(1, 20, 64).to(DEVICE)
    index = LouverIndex.build(keys, keys, IndexConfig(backend="triton", buffer_size=16))
    good = torch.randn(1, 3, 64).to(DEVICE)
    bad_nan, bad_inf, huge = good.clone(), good.clone(), good.clone().bfloat16()
    bad_nan[0, 1, 2] = math.nan
    bad_inf[0, 2, 5] = -math.inf
    huge[0, 0, 0] = 2.0 ** 70
    with pytest.raises(ValueError, match="keys contain NaN or Inf"):
        index.append(bad_nan, bad_inf)
    with pytest.raises(ValueError, match="values contain NaN or Inf"):
        index.append(good, bad_inf)
    with pytest.raises(ValueError, match="keys have entries above"):
        index.append(huge, good)
    assert index.num_keys == 20
    index.append(good, good)
    assert index.num_keys == 23


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _args(hkv: int = 1, cap: int = 32, d: int = 64, bits: int = 6, group: int = 16
          ) -> dict[str, Any]:
    return dict(keys=torch.zeros(hkv, cap, d, dtype=torch.float16),
                codes=torch.zeros(hkv, cap, d * bits // 8, dtype=torch.uint8),
                err=torch.zeros(hkv, cap, d // group, dtype=torch.float16),
                lo=torch.zeros(hkv, 2, d), step=torch.zeros(hkv, 2, d),
                kmax=torch.zeros(hkv), lmax=torch.zeros(hkv), rmax=torch.zeros(hkv))


@pytest.mark.parametrize(("change", "kw"), [
    ({"keys": torch.zeros(1, 32, 64, dtype=torch.int32)}, {}),
    ({"codes": torch.zeros(1, 32, 64, dtype=torch.uint8)}, {}),
    ({"err": torch.zeros(1, 32, 4)}, {}),
    ({"lo": torch.zeros(1, 1, 64)}, {}),
    ({"step": torch.zeros(1, 2, 64).transpose(0, 1)}, {}),
    ({"kmax": torch.zeros(2)}, {}),
    ({"lmax": "0"}, {}),
    ({}, {"start": 3}),
    ({}, {"end": 33}),
    ({}, {"norm_start": 40}),
    ({}, {"coarse": 3}),
    ({}, {"bits": 8, "coarse": 4}),
    ({}, {"group": 5}),
    ({}, {"segment_size": 0}),
    ({}, {"num_warps": 3}),
])
def test_bad_arguments_raise_value_error(change: dict[str, Any], kw: dict[str, Any]) -> None:
    args = _args()
    args.update(change)
    opts: dict[str, Any] = dict(start=0, end=32, segment_size=16, bits=6, coarse=4, group=16)
    opts.update(kw)
    with pytest.raises(ValueError):
        quant_encode_packed(**args, **opts)
    # the defaults are valid; an empty range launches nothing
    quant_encode_packed(**_args(), start=16, end=16, segment_size=16, bits=6, coarse=4,
                        group=16)


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_indexed": torch.zeros(1)}, "num_indexed given as a tensor must hold one int32"),
    ({"num_indexed": torch.zeros(2, dtype=torch.int32)}, "must hold one int32/int64 element"),
    ({"num_keys": 3}, "num_keys must be a torch.Tensor"),
    ({"max_keys": 0}, "max_keys must be an int"),
    ({"segment_size": 0}, "segment_size must be an int"),
    ({"segment_size": 8}, "ceil\\(cap / segment_size\\) = 4 segments"),
    ({"group": 5}, "group=5 must divide"),
    ({"keys": "k"}, "keys must be a torch.Tensor"),
], ids=["float", "two-elements", "int", "max-keys", "segment", "too-few-segments", "group",
        "keys"])
def test_counted_bad_arguments_raise_value_error(kw: dict[str, Any], match: str) -> None:
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    opts: dict[str, Any] = dict(num_indexed=zero, num_keys=zero, max_keys=32, segment_size=16,
                                bits=6, coarse=4, group=16)
    args = {k: v.to(DEVICE) for k, v in _args().items()}
    encode.quant_encode_counted(**args, **opts)        # valid; positions (0, 0) write nothing
    args.update({k: v for k, v in kw.items() if k in args})
    opts.update({k: v for k, v in kw.items() if k not in args})
    with pytest.raises(ValueError, match=match):
        encode.quant_encode_counted(**args, **opts)
