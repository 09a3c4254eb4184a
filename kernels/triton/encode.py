"""Flush of a QUANT index (packed GPU code records): fit, encode and pack keys in one launch.

``quant_encode_packed`` does, for the keys of positions [start, end) of an index cut into
segments [start + jB, start + (j+1)B) (B = segment_size; the last one may be partial), what
``LouverIndex._index_pending`` does with the functions of reference.py:

    lo, step [Hkv, S, D]         reference.quant_fit_range, per segment
    codes [Hkv, cap, D bits/8]   reference.pack_codes(codes of reference.quant_encode)
    err [Hkv, cap, D/group]      the residual norms of reference.quant_encode (float16)
    kmax [Hkv]  max= RU32(max ||k_n||) over the keys n >= norm_start  (reference.key_norm_max)
    lmax [Hkv]  max= RU32(max ||lo_s||) over the segments
    rmax [Hkv]  max= RU32(max ||err_n||) over the keys (of the stored float16 err)

RU32: rounded up to float32; "max=": an atomic max into the running per-head maximum. Grid
(segment x chunk, KV head): every program reads its whole segment once to fit the range (min /
max), then encodes its chunk of the segment's keys; nothing is synchronized with the host.

Exactness
---------
lo, step and the codes (hence the packed records) are bit-exact with reference.py evaluated
in IEEE float32, as torch computes it on the CPU: the min / max are exact, step =
max(RN((hi - lo) / levels), 1e-8) with a correctly rounded division (tl.div_rn), the code is
round-half-even((k - lo) / step) (tl.div_rn, then (x + 2^23) - 2^23, exact for 0 <= x < 2^22;
the launch disables FMA contraction), clamped to [0, 2^b - 1]. Torch on CUDA divides by the
Python scalar ``levels`` as a multiplication by its reciprocal, so its step can differ from this
one (and the CPU's) by one ulp; either is sound, since the residual norms are computed against
the stored step. Where a segment's channel has both +0.0 and -0.0 as its minimum, the sign of
the stored zero lo may differ from torch's amin (same value, same codes).

The norms (err, kmax, lmax, rmax) are those of reference.py's float64 vectors: the residual
x_d = fl64(k_d - fl64(lo_d + step_d c_d)) (step_d c_d is exact in float64, so this is the
reference's value), the keys, lo, and the float16 err. reference.py sums their squares in
float64 in torch's order and rounds that norm up to float32, which is below the exact norm
whenever the float64 rounding crossed a float32 value. The kernel decides the rounding from the
exact norm instead: each square is split exactly (Veltkamp: x = h + l with h, l of at most 26
bits, so h^2, 2hl and l^2 are exact; squares of the float32 keys, of lo and of float16 err are
exact as they are), and the squares are summed as an unevaluated pair s + c with TwoSum (the
rounding errors of every addition go to c; Sum2 of Ogita, Rump and Oishi): for n >= 1
nonnegative terms of exact sum S, |s + c - S| <= n^2 2^-106 S. Then f = RN32(sqrt(s + c)) is
raised by one ulp when f^2 < s + c (f^2 and f^2 - s are exact in float64, Sterbenz): the
result is the smallest float32 >= sqrt(S), the correctly rounded-up norm, unless S lies within
a relative n^2 2^-106 (n <= 3 D) of the square of a float32 (which needs an exact norm within
about 2^-80 of a float32 value without being one). So the stored values are >= the exact norms
(sound; err is RU16 of that float32, the smallest float16 >= the norm, +inf above 65504, as
round_up_f16(round_up_f32(.))). They equal the reference's whenever the reference's float64
rounding did not cross a float32 value; where it did, the reference is one float32 ulp lower
(below the exact norm) or higher, and the float16 err differs by at most one float16 ulp.

Layout and cost
---------------
Keys are read as tiles of BK keys in two layouts: [BK, NGP, GP], channel g * group + j (the
residual groups; padded to powers of two), and [BK, NBP, 8], channel 8 i + k (the bytes of the
packed fields). The range is fitted in both (the same exact min / max, so the same codes). The
sums of squares are tl.reduce's with the TwoSum combine (under the interpreter, whose
tl.reduce runs the combine once per element, log2 vectorized levels of the same combine). About
2048 key-channel elements per tile and 8 warps: ptxas (sm_90) reports no spills for D = 64,
96, 128 and groups 1 .. D. Programs take ``keys_per_program`` keys each (64 for a build, 16
for a flush: a flush of one 256-key segment of 8 KV heads takes 128 programs (its grid covers
two segments, the others return at once); on an H200 it took ~21 us as a graph replay for
32/8/128, ~30 us with 64 keys per program).

A flush at decode time (quant_encode_counted) reads its positions from the index's device
counters, so LouverIndex records it once per storage allocation in a CUDA graph, together with
the publication of the new num_indexed, and replays it (CapturedFlush).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, no_type_check

import torch
import triton
import triton.language as tl

from louver_kernels.triton._device import load_scalar
from louver_kernels.triton._launch import (
    FLOAT_DTYPES,
    capture_graph,
    check_code_layout,
    check_device_scalar,
    check_int,
    interpreted,
    next_pow2,
    side_stream,
)

if TYPE_CHECKING:
    from louver_kernels.index import LouverIndex

__all__ = ["CapturedFlush", "quant_encode_counted", "quant_encode_packed"]

_VELTKAMP = tl.constexpr(134217729.0)  # 2^27 + 1: splits a float64 into two halves of <= 26 bits
_RINT_MAGIC = tl.constexpr(8388608.0)  # 2^23: (x + 2^23) - 2^23 = round-half-even(x), 0 <= x < 2^22
_TILE = 2048  # key-channel elements per tile


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _two_sum(a, b):
    """(s, e): s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _square(x):
    """x^2 (float64) as an unevaluated pair s + c, exactly up to the rounding of c: Veltkamp
    split x = h + l (h, l of <= 26 bits), so h^2, 2hl and l^2 are exact products."""
    t = x * _VELTKAMP
    h = t - (t - x)
    lx = x - h
    s, c = _two_sum(h * h, (2.0 * h) * lx)
    s, e = _two_sum(s, lx * lx)
    return s, c + e


@triton.jit
def _dd_add(s0, c0, s1, c1):
    """(s0 + c0) + (s1 + c1) as an unevaluated pair: TwoSum of s0 + s1, its error added to c."""
    s, e = _two_sum(s0, s1)
    return s, (c0 + c1) + e


@triton.jit
def _row_sum(s, c, R: tl.constexpr, N: tl.constexpr, TREE: tl.constexpr):
    """Row sums [R] of the unevaluated pairs s + c [R, N] (c None: zeros) with _dd_add (Sum2
    of Ogita, Rump and Oishi; its error bound holds in any order). TREE (the interpreter, whose
    tl.reduce calls the combine once per element): log2(N) vectorized levels of pairs, N a
    power of two <= 4096; otherwise tl.reduce (reshape / split trees get replicated layouts
    and spill on the GPU)."""
    if c is None:
        c = tl.zeros_like(s)
    if TREE:
        for lvl in tl.static_range(12):
            if (N >> lvl) > 1:
                s0, s1 = tl.split(tl.reshape(s, [R, N >> (lvl + 1), 2]))
                c0, c1 = tl.split(tl.reshape(c, [R, N >> (lvl + 1), 2]))
                s, c = _dd_add(s0, c0, s1, c1)
        s = tl.reshape(s, [R])
        c = tl.reshape(c, [R])
    else:
        s, c = tl.reduce((s, c), 1, _dd_add)
    return s, c


@triton.jit
def _ru32_sqrt(s, c):
    """The smallest float32 >= sqrt(s + c) (the exact real sum; s >= 0 and s + c >= 0 as
    _square / _row_sum build them from nonnegative terms), +inf when s is +inf (c may then be
    NaN)."""
    f = tl.sqrt(s + c).to(tl.float32)
    ff = f.to(tl.float64)
    up = (f.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    f = tl.where(ff * ff - s < c, up, f)   # ff * ff and ff * ff - s are exact
    return tl.where(s == float("inf"), float("inf"), f)


@triton.jit
def _ru16(f):
    """The smallest float16 >= f (float32 >= 0; +inf above 65504)."""
    h = f.to(tl.float16)
    up = (h.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    return tl.where(h.to(tl.float32) < f, up, h)


@triton.jit
def _codes(x, lo, step, LEVELS: tl.constexpr):
    """reference.quant_encode's codes: clamp(round((x - lo) / step), 0, LEVELS), float32."""
    q = tl.div_rn(x - lo, step)
    return tl.minimum(tl.maximum((q + _RINT_MAGIC) - _RINT_MAGIC, 0.0), LEVELS)


@triton.jit
def _store_field(rec, value, live, BK: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
                 W: tl.constexpr, OFF: tl.constexpr):
    """reference._pack_field of W-bit values [BK, NBP, 8] (channel 8 i + k) into the record
    bytes OFF + (channel // (8/W)) at bits W (channel % (8/W)); rec: [BK] record pointers."""
    PER: tl.constexpr = 8 // W
    shifted = value << (W * (tl.arange(0, 8) % PER))[None, None, :]
    packed = tl.sum(tl.reshape(shifted, [BK, NBP, W, PER]), axis=3)    # disjoint bits
    i = tl.arange(0, NBP)[:, None]
    off = OFF + i * W + tl.arange(0, W)[None, :]
    tl.store(rec[:, None, None] + off[None], packed.to(tl.uint8),
             mask=live[:, None, None] & (i < NB)[None])


@triton.jit(do_not_specialize=["start", "end", "norm_start"])
@no_type_check
def _encode_kernel(
    keys_ptr, codes_ptr, err_ptr, lo_ptr, step_ptr, kmax_ptr, lmax_ptr, rmax_ptr,
    n_idx_ptr, n_keys_ptr,
    start, end, norm_start, seg_size, chunks, cap,
    stride_kh, stride_kn, stride_ch, stride_cn, stride_eh, stride_en, stride_lh, stride_ls,
    NB: tl.constexpr, NBP: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr,
    GROUP: tl.constexpr, GP: tl.constexpr, CB: tl.constexpr, FB: tl.constexpr,
    BK: tl.constexpr, CHUNK: tl.constexpr, TREE: tl.constexpr, ON_DEVICE: tl.constexpr,
):
    LEVELS: tl.constexpr = (1 << (CB + FB)) - 1
    pid = tl.program_id(0)
    kh = tl.program_id(1).to(tl.int64)
    if ON_DEVICE:
        # the positions of a captured flush: [num_indexed // B * B, num_keys), the norms from
        # num_indexed (clamped to the storage: never trust the inputs)
        end = tl.minimum(tl.maximum(load_scalar(n_keys_ptr, end, ON_DEVICE), 0), cap)
        norm_start = tl.minimum(tl.maximum(load_scalar(n_idx_ptr, norm_start, ON_DEVICE), 0),
                                end)
        start = norm_start // seg_size * seg_size
    seg_start = start + (pid // chunks) * seg_size
    if seg_start >= end:   # a captured flush's grid covers its longest range
        return
    seg_end = tl.minimum(seg_start + seg_size, end)
    chunk_start = seg_start + (pid % chunks) * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, seg_end)
    k_head = keys_ptr + kh * stride_kh
    # layout A [BK, NGP, GP]: channel g GROUP + j; layout B [BK, NBP, 8]: channel 8 i + k
    g = tl.arange(0, NGP)[:, None]
    ch_a = g * GROUP + tl.arange(0, GP)[None, :]
    ok_a = (tl.arange(0, GP)[None, :] < GROUP) & (g < NG)
    ch_b = tl.arange(0, NBP)[:, None] * 8 + tl.arange(0, 8)[None, :]
    ok_b = ch_b < 8 * NB
    r = tl.arange(0, BK)

    # ---- quant_fit_range over the whole segment (exact: min / max in any order) ----
    mn_a = tl.full([BK, NGP, GP], float("inf"), tl.float32)
    mx_a = tl.full([BK, NGP, GP], -float("inf"), tl.float32)
    mn_b = tl.full([BK, NBP, 8], float("inf"), tl.float32)
    mx_b = tl.full([BK, NBP, 8], -float("inf"), tl.float32)
    n0 = seg_start
    while n0 < seg_end:
        rows = (n0 + r).to(tl.int64)[:, None, None]
        k_rows = k_head + rows * stride_kn
        m_a = (rows < seg_end) & ok_a[None]
        k_a = tl.load(k_rows + ch_a[None], mask=m_a, other=0.0).to(tl.float32)
        mn_a = tl.minimum(mn_a, tl.where(m_a, k_a, float("inf")))
        mx_a = tl.maximum(mx_a, tl.where(m_a, k_a, -float("inf")))
        m_b = (rows < seg_end) & ok_b[None]
        k_b = tl.load(k_rows + ch_b[None], mask=m_b, other=0.0).to(tl.float32)
        mn_b = tl.minimum(mn_b, tl.where(m_b, k_b, float("inf")))
        mx_b = tl.maximum(mx_b, tl.where(m_b, k_b, -float("inf")))
        n0 += BK
    levels = tl.full([], LEVELS, tl.float32)
    lo_a = tl.min(mn_a, axis=0)
    step_a = tl.maximum(tl.div_rn(tl.max(mx_a, axis=0) - lo_a, levels), 1e-8)
    lo_b = tl.min(mn_b, axis=0)
    step_b = tl.maximum(tl.div_rn(tl.max(mx_b, axis=0) - lo_b, levels), 1e-8)
    if pid % chunks == 0:   # the segment's first program stores the range and raises lmax
        seg_off = kh * stride_lh + (seg_start // seg_size) * stride_ls
        tl.store(lo_ptr + seg_off + ch_a, lo_a, mask=ok_a)
        tl.store(step_ptr + seg_off + ch_a, step_a, mask=ok_a)
        lo64 = tl.where(ok_a, lo_a, 0.0).to(tl.float64)
        ls, lc = _row_sum(lo64 * lo64, None, NGP, GP, TREE)
        ls, lc = _row_sum(tl.reshape(ls, [1, NGP]), tl.reshape(lc, [1, NGP]), 1, NGP, TREE)
        tl.atomic_max(lmax_ptr + kh, tl.max(_ru32_sqrt(ls, lc), axis=0))

    # ---- quant_encode, pack_codes and the norms, BK keys of the chunk at a time ----
    kmax = tl.zeros([], tl.float32)
    rmax = tl.zeros([], tl.float32)
    n0 = chunk_start
    while n0 < chunk_end:
        rows = (n0 + r).to(tl.int64)
        live = rows < chunk_end
        k_rows = k_head + rows[:, None, None] * stride_kn
        m_a = live[:, None, None] & ok_a[None]
        k_a = tl.load(k_rows + ch_a[None], mask=m_a, other=0.0).to(tl.float32)
        code = _codes(k_a, lo_a[None], step_a[None], LEVELS)
        k64 = k_a.to(tl.float64)                 # 0 in padding lanes
        deq = lo_a.to(tl.float64)[None] + step_a.to(tl.float64)[None] * code.to(tl.float64)
        es, ec = _square(tl.where(m_a, k64 - deq, 0.0))   # the reference's float64 residual
        es, ec = _row_sum(tl.reshape(es, [BK * NGP, GP]), tl.reshape(ec, [BK * NGP, GP]),
                          BK * NGP, GP, TREE)
        e = tl.reshape(_ru16(_ru32_sqrt(es, ec)), [BK, NGP])
        m_e = live[:, None] & (tl.arange(0, NGP)[None, :] < NG)
        e_row = err_ptr + kh * stride_eh + rows[:, None] * stride_en
        tl.store(e_row + tl.arange(0, NGP)[None, :], e, mask=m_e)
        e64 = tl.where(m_e, e.to(tl.float64), 0.0)
        rs, rc = _row_sum(e64 * e64, None, BK, NGP, TREE)
        rmax = tl.maximum(rmax, tl.max(tl.where(live, _ru32_sqrt(rs, rc), 0.0), axis=0))
        ks, kc = _row_sum(tl.reshape(k64 * k64, [BK * NGP, GP]), None, BK * NGP, GP, TREE)
        ks, kc = _row_sum(tl.reshape(ks, [BK, NGP]), tl.reshape(kc, [BK, NGP]), BK, NGP, TREE)
        kn = tl.where(live & (rows >= norm_start), _ru32_sqrt(ks, kc), 0.0)
        kmax = tl.maximum(kmax, tl.max(kn, axis=0))
        # pack_codes: the coarse field (c >> FB, CB bits), then the fine field (FB low bits)
        m_b = live[:, None, None] & ok_b[None]
        k_b = tl.load(k_rows + ch_b[None], mask=m_b, other=0.0).to(tl.float32)
        code_b = _codes(k_b, lo_b[None], step_b[None], LEVELS).to(tl.int32)
        rec = codes_ptr + kh * stride_ch + rows * stride_cn
        _store_field(rec, code_b >> FB, live, BK, NB, NBP, CB, 0)
        if FB > 0:
            _store_field(rec, code_b & ((1 << FB) - 1), live, BK, NB, NBP, FB, NB * CB)
        n0 += BK
    # running per-head maxima (values >= 0: the float32 atomic max is exact)
    tl.atomic_max(kmax_ptr + kh, kmax)
    tl.atomic_max(rmax_ptr + kh, rmax)


_INTERPRETED = interpreted(_encode_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def quant_encode_packed(
    keys: torch.Tensor,
    codes: torch.Tensor,
    err: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    kmax: torch.Tensor,
    lmax: torch.Tensor,
    rmax: torch.Tensor,
    *,
    start: int,
    end: int,
    segment_size: int,
    bits: int,
    coarse: int,
    group: int,
    norm_start: int | None = None,
    keys_per_program: int = 64,
    num_warps: int = 8,
    validate: bool = True,
) -> None:
    """Encode the keys of positions [start, end) into a QUANT index's records, in place (see
    the module docstring for what is computed, and how exactly).

    Args:
        keys: float16 / bfloat16 / float32 [Hkv, cap, D], last dim contiguous; 8 divides D.
        codes: uint8 [Hkv, cap, D * bits / 8] output (reference.pack_codes records), last dim
            contiguous: rows [start, end) are written.
        err: float16 [Hkv, cap, D / group] output, last dim contiguous: rows [start, end).
        lo, step: float32 [Hkv, S, D] outputs with the same strides and a contiguous last dim,
            S >= ceil(end / segment_size): segments start / B .. ceil(end / B) - 1 are written.
        kmax, lmax, rmax: float32 [Hkv] contiguous running maxima (>= 0), raised in place.
        start: a multiple of segment_size; end: start <= end <= cap. The segments have
            ``segment_size`` keys from start, the last one ends at ``end`` (a partial last
            segment is fitted on its own keys, as LouverIndex._encode_quant does).
        segment_size: keys per range segment B (LouverIndex: config.buffer_size), >= 1.
        bits, coarse: code bits and coarse field bits (reference.code_fields must accept them).
        group: channels per residual-norm group (divides D).
        norm_start: kmax covers the keys [norm_start, end) only (LouverIndex: the keys not
            indexed yet; those of a re-encoded partial segment are in kmax already);
            start <= norm_start <= end, default start.
        keys_per_program, num_warps: tuning (programs encode keys_per_program keys of one
            segment each, rounded up to a whole tile; each reads its whole segment to fit it).
        validate: check the storage tensors (~15 us of host time on a CPU here; the validated
            launch costs ~65 us on an H200 host). False only for storage made to these shapes
            with end within it (LouverIndex's own).

    One launch, none when start == end; nothing is synchronized with the host. CapturedFlush
    replays a flush without the launch's host work.

    Raises:
        ValueError: on any shape, dtype, device, layout or range problem of the arguments.
    """
    start = check_int("start", start, 0, 1 << 40)
    end = check_int("end", end, start, 1 << 40)
    norm_start = check_int("norm_start", start if norm_start is None else norm_start,
                            start, end)
    seg = check_int("segment_size", segment_size, 1, 1 << 20)
    if start % seg:
        raise ValueError(f"start={start} must be a multiple of segment_size={seg}")
    if validate:
        fields = _check_storage(keys, codes, err, lo, step, kmax, lmax, rmax, bits, coarse,
                                group, seg, end, keys_per_program, num_warps)
    else:
        fields = check_code_layout(bits, coarse, group, keys.shape[2])
    if end == start:
        return
    _launch(keys, codes, err, lo, step, kmax, lmax, rmax, None, start, end, norm_start,
            triton.cdiv(end - start, seg), seg, fields, keys_per_program, num_warps)


def quant_encode_counted(
    keys: torch.Tensor,
    codes: torch.Tensor,
    err: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    kmax: torch.Tensor,
    lmax: torch.Tensor,
    rmax: torch.Tensor,
    *,
    num_indexed: torch.Tensor,
    num_keys: torch.Tensor,
    max_keys: int,
    segment_size: int,
    bits: int,
    coarse: int,
    group: int,
    keys_per_program: int = 16,
    num_warps: int = 8,
) -> None:
    """quant_encode_packed(start=n // B * B, end=m, norm_start=n) with n = num_indexed[0] and
    m = num_keys[0] read on the device when the kernel runs (B = segment_size): a launch with
    no host value that changes from one flush to the next, which a CUDA graph records once
    and replays at every flush (LouverIndex does on CUDA: see CapturedFlush).

    Args:
        keys, codes, err, lo, step, kmax, lmax, rmax: as quant_encode_packed, with lo / step
            holding ceil(cap / B) segments (any range of the storage may be flushed).
        num_indexed, num_keys: 1-element int32/int64 tensors on keys' device; clamped on the
            device to 0 <= n <= m <= cap.
        max_keys: the grid covers ceil(max_keys / B) segments from n // B * B: the caller
            guarantees m - n // B * B <= max_keys (keys beyond are NOT encoded).
        segment_size, bits, coarse, group: as quant_encode_packed.
        keys_per_program, num_warps: tuning, as quant_encode_packed (a flush of one segment
            has few programs: 16 keys each was the fastest of 16-128 with 2-8 warps on an H200,
            256-key segments, 9/3/64 and 32/8/128).

    Raises:
        ValueError: on any shape, dtype, device or layout problem of the arguments.
    """
    seg = check_int("segment_size", segment_size, 1, 1 << 20)
    max_keys = check_int("max_keys", max_keys, 1, 1 << 40)
    fields = _check_storage(keys, codes, err, lo, step, kmax, lmax, rmax, bits, coarse, group,
                            seg, 0, keys_per_program, num_warps)
    if lo.shape[1] < triton.cdiv(keys.shape[1], seg):
        raise ValueError(f"lo and step must hold ceil(cap / segment_size) = "
                         f"{triton.cdiv(keys.shape[1], seg)} segments, got {lo.shape[1]}")
    for name, t in (("num_indexed", num_indexed), ("num_keys", num_keys)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_device_scalar(name, t, keys.device)
    _launch(keys, codes, err, lo, step, kmax, lmax, rmax, (num_indexed, num_keys), 0, 0, 0,
            triton.cdiv(max_keys, seg), seg, fields, keys_per_program, num_warps)


def _check_storage(keys: torch.Tensor, codes: torch.Tensor, err: torch.Tensor,
                   lo: torch.Tensor, step: torch.Tensor, kmax: torch.Tensor, lmax: torch.Tensor,
                   rmax: torch.Tensor, bits: int, coarse: int, group: int, seg: int, end: int,
                   keys_per_program: int, num_warps: int) -> tuple[int, int, int]:
    """Validate the index storage for a flush of positions < end: (group, coarse field width,
    fine field width)."""
    tensors = (("keys", keys), ("codes", codes), ("err", err), ("lo", lo), ("step", step),
               ("kmax", kmax), ("lmax", lmax), ("rmax", rmax))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != keys.device:
            raise ValueError(f"{name} is on {t.device} but keys are on {keys.device}")
    if keys.dtype not in FLOAT_DTYPES or keys.dim() != 3 or keys.stride(2) != 1:
        raise ValueError(f"keys must be float16/bfloat16/float32 [Hkv, cap, D] with a contiguous "
                         f"last dim, got {keys.dtype} {list(keys.shape)}")
    hkv, cap, d = keys.shape
    if d < 8 or d % 8:
        raise ValueError(f"head dim D={d} must be a positive multiple of 8")
    fields = check_code_layout(bits, coarse, group, d)
    group = fields[0]
    check_int("end", end, 0, cap)
    for name, t, dtype, shape in (("codes", codes, torch.uint8, (hkv, cap, d * bits // 8)),
                                  ("err", err, torch.float16, (hkv, cap, d // group))):
        if t.dtype != dtype or tuple(t.shape) != shape or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {dtype} {list(shape)} with a contiguous last dim, "
                             f"got {t.dtype} {list(t.shape)}")
    nseg_min = triton.cdiv(end, seg)
    for name, t in (("lo", lo), ("step", step)):
        if t.dtype != torch.float32 or t.dim() != 3 or t.shape[0] != hkv or t.shape[2] != d \
                or t.shape[1] < nseg_min or t.stride(2) != 1:
            raise ValueError(f"{name} must be float32 [{hkv}, >= {nseg_min}, {d}] with a "
                             f"contiguous last dim, got {t.dtype} {list(t.shape)}")
    if lo.stride() != step.stride():
        raise ValueError("lo and step must have the same strides")
    for name, t in (("kmax", kmax), ("lmax", lmax), ("rmax", rmax)):
        if t.dtype != torch.float32 or tuple(t.shape) != (hkv,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 [{hkv}], got {t.dtype} "
                             f"{list(t.shape)}")
    check_int("keys_per_program", keys_per_program, 1, 1 << 20)
    if not (isinstance(num_warps, int) and num_warps in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")
    return fields


def _launch(keys: torch.Tensor, codes: torch.Tensor, err: torch.Tensor, lo: torch.Tensor,
            step: torch.Tensor, kmax: torch.Tensor, lmax: torch.Tensor, rmax: torch.Tensor,
            counts: tuple[torch.Tensor, torch.Tensor] | None, start: int, end: int,
            norm_start: int, segments: int, seg: int, fields: tuple[int, int, int],
            keys_per_program: int, num_warps: int) -> None:
    """One launch over ``segments`` segments (validated arguments); positions from ``counts``
    (num_indexed, num_keys) on the device when given, else start / end / norm_start."""
    hkv, cap, d = keys.shape
    group, cb, fb = fields
    nbp, ngp, gp = next_pow2(d // 8), next_pow2(d // group), next_pow2(group)
    per_program = min(seg, keys_per_program)
    bk = min(next_pow2(per_program), max(1, _TILE // max(8 * nbp, ngp * gp)))
    chunk = triton.cdiv(per_program, bk) * bk
    chunks = triton.cdiv(seg, chunk)
    n_idx, n_keys = counts if counts is not None else (kmax, kmax)
    _encode_kernel[(segments * chunks, hkv)](
        keys, codes, err, lo, step, kmax, lmax, rmax, n_idx, n_keys,
        start, end, norm_start, seg, chunks, cap,
        keys.stride(0), keys.stride(1), codes.stride(0), codes.stride(1),
        err.stride(0), err.stride(1), lo.stride(0), lo.stride(1),
        NB=d // 8, NBP=nbp, NG=d // group, NGP=ngp, GROUP=group, GP=gp, CB=cb, FB=fb,
        BK=bk, CHUNK=chunk, TREE=_INTERPRETED, ON_DEVICE=counts is not None,
        num_warps=num_warps, num_stages=1,
        enable_fp_fusion=False,   # TwoSum, Veltkamp and (x + 2^23) - 2^23 need plain roundings
    )


class CapturedFlush:
    """A decode-time flush of a LouverIndex (Triton backend) as one CUDA graph replay.

    With ``side=True`` the replay runs on the device's side stream (_launch.side_stream), after
    the work queued so far on the current stream, and returns at once: the work queued after it
    overlaps it. ``wait()`` orders the current stream after it (no host synchronization); the
    index calls it before every operation that touches its records (LouverIndex._await_flush),
    and the object synchronizes with a flush still in flight before it is freed (its graph and
    the storage it writes stay alive until then).

    The flush reads its positions from the index's device counters (``device_counters``:
    num_indexed, num_keys; append keeps num_keys current) and publishes num_indexed = num_keys
    there itself, so a replay takes no argument from the host, and nothing is kept in step
    between host and device beyond the stream order every index operation relies on. On an
    H200 host an append that flushes this way took 52-56 us against 39-41 us for one that does
    not; the validated launch alone took 66-110 us.
    The graph records the storage tensors of the moment: the index drops this object when it
    reallocates them (LouverIndex._grow). Without ``graph`` (no CUDA) the same launches run
    eagerly.
    """

    SEGMENTS = 2   # the grid: a full buffer from an unaligned num_indexed spans two segments

    def __init__(self, index: LouverIndex, graph: bool) -> None:
        cfg = index.config
        self.segment_size = cfg.buffer_size
        # the storage itself, not the index: the index holds this object (no reference cycle
        # that would keep a dropped index's memory until the garbage collector runs)
        storage = (index._keys, index._codes, index._err, index._lo, index._step, index._kmax,
                   index._lmax, index._rmax)
        n_idx, n_keys = index.device_counters()
        opts = dict(max_keys=self.SEGMENTS * cfg.buffer_size, segment_size=cfg.buffer_size,
                    bits=cfg.quant_bits, coarse=cfg.quant_coarse_bits, group=cfg.quant_group)

        def flush() -> None:
            quant_encode_counted(*storage, num_indexed=n_idx, num_keys=n_keys, **opts)
            n_idx.copy_(n_keys)

        self._flush = flush
        self.device = index.device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._done: torch.cuda.Event | None = None
        self._pending = False
        if graph:
            self._done = torch.cuda.Event()
            # compile the kernel outside the graph: positions (0, 0) encode nothing
            zero = torch.zeros(1, dtype=torch.int32, device=index.device)
            quant_encode_counted(*storage, num_indexed=zero, num_keys=zero, **opts)
            self._graph = capture_graph(index.device, flush, warmups=0)

    @classmethod
    def covers(cls, start: int, end: int, segment_size: int) -> bool:
        """Whether the grid covers a flush of [start, end) (segments of segment_size keys, the
        index's buffer_size)."""
        return end - start // segment_size * segment_size <= cls.SEGMENTS * segment_size

    def __call__(self, start: int, end: int, side: bool = False) -> None:
        """Encode [start // B * B, end) with the norms from ``start`` and publish
        num_indexed = end; (start, end) must be what the device counters hold. ``side``: on
        the side stream (a CUDA graph only; otherwise on the current stream)."""
        if not self.covers(start, end, self.segment_size):
            raise ValueError(f"a flush of [{start}, {end}) is longer than the captured grid")
        if self._graph is None:
            self._flush()
        elif not side:
            self._graph.replay()
        else:
            assert self._done is not None
            stream = side_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._graph.replay()
            self._done.record(stream)
            self._pending = True

    def wait(self) -> None:
        """Order the current stream after the last side-stream flush (a no-op once it is
        known to be done)."""
        if not self._pending:
            return
        assert self._done is not None
        if self._done.query():
            self._pending = False
        else:
            torch.cuda.current_stream(self.device).wait_event(self._done)

    def __del__(self) -> None:
        if self._pending and self._done is not None:
            with contextlib.suppress(Exception):   # at interpreter exit CUDA may be gone
                self._done.synchronize()
