"""Candidate filter over a QUANT index (bit-plane codes): sound bounds, compaction, certificate.

One launch computes, for every KV head kh (query heads h = kh * G .. kh * G + G - 1) and every
indexed key n < num_indexed:

    coarse_h(n) = reference.quant_bound(q, ..., top=coarse_bits)[h, n] + slack[h]
    survivor(n) = any_h coarse_h(n) >= tau[h]                    (the coarse stage)
    full_h(n)   = reference.quant_bound(q, ..., top=None)[h, n] + slack[h]   (survivors only)
    cand(n)     = survivor(n) and any_h full_h(n) >= tau[h]      (the group's candidates)
    bound_h(n)  = full_h(n) if survivor(n) else coarse_h(n)

and writes

    cand_pos[kh, :cand_count[kh]]  the positions n with cand(n), each exactly once. Order: the
                                   keys of one block of BLOCK_N positions are ascending and
                                   contiguous, blocks appear in completion order (NOT sorted
                                   across blocks; the order may change from launch to launch).
    cand_count[kh]                 their number.
    pruned_lse[h]                  logsumexp over the keys that are NOT group candidates of
                                   scale * bound_h(n) (-inf if there is none). Group candidates
                                   that are below tau for head h are not included: the
                                   attention kernel computes their exact scores.

``quant_filter_reference`` at the end of this module is the plain-torch ground truth, built
on ``reference.quant_bound`` / ``reference.quant_slack`` (``LouverIndex.bounds``).

The bounds
----------
The kernel evaluates exactly the bound expressions of reference.py (same terms; only the
float32 summation order differs, which the slack covers: see reference.py's module docstring).
Let s = bits - coarse_bits, S = 2^s, H = (S - 1) / 2 and qs_d = fl(q_d step_d) S (an exact
power-of-two scaling of the reference's fl(q_d step_d); the reference's coarse factor
fl(q_d (step_d S)) is the same float). A code splits as c = S c1 + u (c1: the top planes, u:
the remaining s planes, 0 <= u < S):

    coarse = sum_d qs_d c1_d + sum_g ||q_g|| e_g + [sum_d q_d (lo_d + step_d H)
             + (sum_d |q_d| step_d) H] + slack
    full   = sum_d qs_d c1_d + sum_d qs_d (u_d / S) + sum_g ||q_g|| e_g + sum_d q_d lo_d + slack

The real value of sum_d qs_d c1_d + sum_d qs_d (u_d / S) is the reference's
sum_d fl(q_d step_d) c_d; each dot term of the reference becomes two products with the same two
rounded factors (u_d / S is exact), so the full bound is a float32 sum of 3D + G terms with at
most three rounded factors each: the count the slack of reference.quant_slack is proven for
(3D + 2G + 8). The coarse bound has the reference's terms one for one. The per-channel constant
terms are accumulated by each thread together with its dot-product terms and reduced with them
(another summation order of the same terms). lo and step are those of the key's segment. Both
stages read the residual norms e (the coarse bound needs them); no per-head maximum of ||e|| is
used, so the coarse bound is the reference's function, never a looser one.

Bit unpacking
-------------
Plane j holds bit (bits - 1 - j) of every code; channel 8i + k is bit k of byte i. For a chunk
of m <= 4 planes j0 .. j0 + m - 1 the kernel forms, per byte i, the word
W = sum_t B_{j0+t} << 8t (and W' = W << 4 once), then per channel k, with k' = k + 4 and the
source W' when k < 4 (bit k of every byte of W sits at bit k' of the byte in W'), else k' = k
and the source W:

    x = src & (0x01010101 << k')          bit t of the chunk's code sits at bit 8t + k'
    c = umulhi(x, MUL) & (2^m - 1)        MUL = sum_t 2^(31 + m - 9t - k') < 2^32

(umulhi: bits 32..63 of the 64-bit product). The product of bit t with the term t of MUL lands
at 32 + (m - 1 - t): the code, most significant plane highest, at bits 0..m-1 of the high word;
every cross product (bit i, term t != i) lies at 32 + (m - 1 - t) + 8(i - t), outside
[32, 32 + m), and the m^2 products are distinct powers of two, so no carry reaches the code.
k' >= 4 >= m keeps every exponent in [0, 31]. Three integer operations per channel and chunk
(AND, IMAD.HI, AND). The integer code (< 2^8) becomes a float with one OR and one subtraction:
bitcast(c | bits(2^23)) - 2^23 = c exactly; with the exponent of 2^(23 - s) instead, the same
two operations give u / S exactly. (Checked in the tests: exhaustively for m <= 2.)

Work decomposition
------------------
Grid (num_splits, Hkv): program (split, kh) walks a contiguous range of work items of KV head
kh, an item being (range segment, chunk of BLOCK_N keys of it); the range is computed on the
device from num_indexed, so the grid depends only on the capacity when num_indexed is a device
tensor. Per segment it forms the scaled query slices and constants from the segment's lo/step;
per block it loads the coarse planes and the
residual norms once for all G query heads (GQA), computes the G coarse bounds, and, only when
some key of the block survives, loads the remaining planes of the survivors (masked loads move
no bytes for the other rows) and computes the full bounds. Tiles are [T, BLOCK_N, V]: each
thread owns V bytes (8V channels) of T threads per key row, so it holds the 8V-channel slices of
the G scaled queries in registers and a dot product reduces within the thread, then across the
T threads of the row.

Compaction: per block, count the candidates, reserve a range of cand_pos with ONE atomic add on
a per-KV-head slot counter (relaxed: only the final count and the positions matter, both
ordered by the ticket below), write positions at offset + exclusive cumsum.

pruned_lse: per program, an online logsumexp per query head (state per row lane, merged at the
end of the program) -> a partial (max, sum) per (program, head) in a workspace. Each program
then takes a ticket on a per-KV-head arrival counter (acq_rel, after a CTA barrier); the last
arrival merges the num_splits partials of its KV head, writes pruned_lse and cand_count (read
from the slot counter with an exchange that resets it to zero) and resets the ticket. So:
one launch, no memset, no host synchronization; the counters live in a cached per-(device,
stream) buffer that is zero at creation and left zero by every launch (launches on one stream
are ordered; launches on different streams use different counters). cand_count and pruned_lse
are written by every launch, cand_pos up to cand_count: no pre-zeroing contract for the caller.

Measured (H200, benchmarks/bench_filter_gpu.py): 4-7 G keys/s per KV head, about 0.4-0.5 TB/s
of index bytes: the kernel is bound by instruction issue and latency (~57 warp instructions per
key and KV head for D=64, G=3; 168-255 registers, so 2-3 programs per SM; per-block barriers and
a returning atomic), not by memory. With these keys 20-78 % of them survive the coarse stage, so
nearly every block runs both stages.
"""

from __future__ import annotations

import math
from typing import no_type_check

import torch
import triton
import triton.language as tl

from louver_kernels import reference as ref
from louver_kernels.triton._launch import (
    FLOAT_DTYPES,
    CounterPool,
    check_device_scalar,
    next_pow2,
    num_sms,
)

__all__ = ["quant_filter", "quant_filter_reference"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_n(ptr, value, ON_DEVICE: tl.constexpr):
    """num_indexed: from a 1-element device tensor when ON_DEVICE, else the scalar."""
    if ON_DEVICE:
        return tl.load(ptr).to(tl.int32)
    else:
        return value


@triton.jit
def _chunk_word(row_ptr, mask, J0: tl.constexpr, M: tl.constexpr, stride_p):
    """uint32 word per byte: plane J0 + t in byte t (t < M); rows masked off read 0."""
    w = tl.load(row_ptr + J0 * stride_p, mask=mask, other=0).to(tl.uint32)
    for t in tl.static_range(1, M):
        b = tl.load(row_ptr + (J0 + t) * stride_p, mask=mask, other=0).to(tl.uint32)
        w = w | (b << (8 * t))
    return w


@triton.jit
def _mulhi_const(M: tl.constexpr, K2: tl.constexpr):
    """uint32 sum_{t < M} 2^(31 + M - 9t - K2) (see _chunk_code)."""
    mul = tl.full([], 1 << (31 + M - K2), tl.uint32)
    for t in tl.static_range(1, M):
        mul = mul | (1 << (31 + M - 9 * t - K2))
    return mul


@triton.jit
def _chunk_code(w, w4, K: tl.constexpr, M: tl.constexpr):
    """The M-bit code of channel bit K of every byte of ``w`` (w4 = w << 4), uint32."""
    if K < 4:
        hi = tl.umulhi(w4 & (0x01010101 << (K + 4)), _mulhi_const(M, K + 4))
    else:
        hi = tl.umulhi(w & (0x01010101 << K), _mulhi_const(M, K))
    return hi & ((1 << M) - 1)


@triton.jit
@no_type_check  # Triton code: tuples grow per head, which mypy cannot follow
def _quant_filter_kernel(
    q_ptr, planes_ptr, err_ptr, lo_ptr, step_ptr, slack_ptr, tau_ptr, n_ptr,
    cand_pos_ptr, cand_count_ptr, pruned_lse_ptr, ws_ptr, counter_ptr,
    n_value, cap_out, seg_size, num_splits, scale_log2, magic_bits, fine_bits,
    stride_qh, stride_ph, stride_pn, stride_pp, stride_eh, stride_en, stride_lh, stride_ls,
    stride_ch,
    G: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, V: tl.constexpr, T: tl.constexpr,
    NG: tl.constexpr, NGT: tl.constexpr, GRP: tl.constexpr, GRPP: tl.constexpr,
    BLOCK_N: tl.constexpr, R: tl.constexpr,
    CM0: tl.constexpr, CM1: tl.constexpr, FM0: tl.constexpr, FM1: tl.constexpr,
    SHIFT: tl.constexpr, HALF: tl.constexpr, FINE_MAGIC: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, N_ON_DEVICE: tl.constexpr, SEGMENTED: tl.constexpr,
):
    split = tl.program_id(0)
    kh = tl.program_id(1)
    NR: tl.constexpr = BLOCK_N // R
    PC: tl.constexpr = CM0 + CM1           # coarse planes
    FINE: tl.constexpr = FM0 > 0           # planes left for the full bound
    MAGIC: tl.constexpr = 8388608.0        # 2^23
    # magic_bits = bits of 2^23, fine_bits = bits of 2^(23 - s): runtime values, so that the
    # compiler keeps them in registers and fuses (code & mask) | magic into one LOP3
    magic_bits = magic_bits.to(tl.uint32)
    fine_bits = fine_bits.to(tl.uint32)

    # ---- this program's work: items (segment s, chunk c of BLOCK_N keys of the segment) ----
    n = _load_n(n_ptr, n_value, N_ON_DEVICE)
    n = tl.minimum(tl.maximum(n, 0), cap_out)
    if SEGMENTED:
        seg = seg_size
    else:
        seg = tl.maximum(n, 1)             # one range: a single segment of n keys
    cps = tl.cdiv(seg, BLOCK_N)            # chunks per segment
    n_items = tl.cdiv(n, seg) * cps
    per_split = tl.cdiv(n_items, num_splits)
    item_lo = split * per_split
    item_hi = tl.minimum(item_lo + per_split, n_items)

    # ---- loop-invariant per-head data ----
    # tile coordinates: byte i = t * V + v of a plane row (channels 8i .. 8i + 7)
    offs_t = tl.arange(0, T)
    offs_v = tl.arange(0, V)
    tv = offs_t[:, None] * V + offs_v[None, :]                      # [T, V]
    byte_ok = tv < NB
    byte3 = tv[:, None, :]                                          # [T, 1, V]
    byte_ok3 = byte_ok[:, None, :]
    offs_gp = tl.arange(0, GRPP)
    qn = ()        # per head, per err tile: [T, 1, V] ||q_g|| at group g = c NBP + tV + v
    taus = ()
    slacks = ()
    ms = ()        # per-lane online logsumexp state (log2 units) per head, [R] lanes
    ss = ()
    for g in tl.static_range(G):
        h = kh * G + g
        qn_g = ()
        for ct in tl.static_range(NGT):
            qgrp = ct * NBP + tv                                        # [T, V]
            qgrp_ok = qgrp < NG
            qg = tl.load(q_ptr + h * stride_qh + qgrp[:, :, None] * GRP + offs_gp[None, None, :],
                         mask=qgrp_ok[:, :, None] & (offs_gp < GRP)[None, None, :],
                         other=0.0).to(tl.float32)
            qn_g = qn_g + (tl.sqrt(tl.sum(qg * qg, axis=2))[:, None, :],)
        qn = qn + (qn_g,)
        taus = taus + (tl.load(tau_ptr + h),)
        slacks = slacks + (tl.load(slack_ptr + h),)
        ms = ms + (tl.full([R], float("-inf"), tl.float32),)
        ss = ss + (tl.zeros([R], tl.float32),)

    p_base = planes_ptr + kh.to(tl.int64) * stride_ph
    e_base = err_ptr + kh.to(tl.int64) * stride_eh
    c_base = cand_pos_ptr + kh.to(tl.int64) * stride_ch
    offs_n = tl.arange(0, BLOCK_N)

    s = item_lo // cps
    s_end = tl.cdiv(item_hi, cps)
    while s < s_end:
        # ---- per segment: scaled query slices and per-thread partial constants, per head ----
        # qs[g][k] [T, 1, V] = fl(q step) S at channel 8 (tV + v) + k; cc[g] / fc[g] [T, 1, V]:
        # this thread's channels' share of the coarse constant sum q (lo + step H) + |q| step H
        # and of the full constant sum q lo (summed with the dot products: any order is sound)
        r_base = lo_ptr + kh.to(tl.int64) * stride_lh + s.to(tl.int64) * stride_ls
        s_base = step_ptr + kh.to(tl.int64) * stride_lh + s.to(tl.int64) * stride_ls
        qs = ()
        cc = ()
        fc = ()
        for _g in tl.static_range(G):
            qs = qs + ((),)
            cc = cc + (tl.zeros([T, 1, V], tl.float32),)
            fc = fc + (tl.zeros([T, 1, V], tl.float32),)
        for k in tl.static_range(8):
            ch = byte3 * 8 + k
            st = tl.load(s_base + ch, mask=byte_ok3, other=0.0)
            lo = tl.load(r_base + ch, mask=byte_ok3, other=0.0)
            new_qs = ()
            new_cc = ()
            new_fc = ()
            for g in tl.static_range(G):
                qv = tl.load(q_ptr + (kh * G + g) * stride_qh + ch, mask=byte_ok3,
                             other=0.0).to(tl.float32)
                new_qs = new_qs + (qs[g] + (((qv * st) * SHIFT),),)
                new_cc = new_cc + (cc[g] + (qv * (lo + st * HALF) + (tl.abs(qv) * st) * HALF),)
                new_fc = new_fc + (fc[g] + qv * lo,)
            qs = new_qs
            cc = new_cc
            fc = new_fc

        c = tl.maximum(item_lo - s * cps, 0)
        c_hi = tl.minimum(item_hi - s * cps, cps)
        while c < c_hi:
            in_seg = c * BLOCK_N + offs_n
            rows = s * seg + in_seg
            valid = (in_seg < seg) & (rows < n)
            rows64 = rows.to(tl.int64)
            vmask = valid[None, :, None] & byte_ok3
            prow = p_base + rows64[None, :, None] * stride_pn + byte3   # [T, BLOCK_N, V] ptrs

            # ---- coarse stage: residual norms + top planes, all G heads ----
            accs = ()
            for _g in tl.static_range(G):
                accs = accs + (tl.zeros([T, BLOCK_N, V], tl.float32),)
            for ct in tl.static_range(NGT):
                egrp = ct * NBP + byte3
                e = tl.load(e_base + rows64[None, :, None] * stride_en + egrp,
                            mask=valid[None, :, None] & (egrp < NG), other=0.0).to(tl.float32)
                new_accs = ()
                for g in tl.static_range(G):
                    new_accs = new_accs + (accs[g] + e * qn[g][ct],)
                accs = new_accs
            w0 = _chunk_word(prow, vmask, 0, CM0, stride_pp)
            w0s = w0 << 4
            if CM1 > 0:
                w1 = _chunk_word(prow, vmask, CM0, CM1, stride_pp)
                w1s = w1 << 4
            for k in tl.static_range(8):
                code = _chunk_code(w0, w0s, k, CM0)
                if CM1 > 0:
                    code = (code << CM1) | _chunk_code(w1, w1s, k, CM1)
                f = (code | magic_bits).to(tl.float32, bitcast=True) - MAGIC
                new_accs = ()
                for g in tl.static_range(G):
                    new_accs = new_accs + (accs[g] + f * qs[g][k],)
                accs = new_accs
            coarse = ()
            surv = valid & False
            for g in tl.static_range(G):
                b = tl.sum(tl.sum(accs[g] + cc[g], axis=2), axis=0) + slacks[g]  # [BLOCK_N]
                coarse = coarse + (b,)
                surv = surv | (b >= taus[g])
            surv = surv & valid

            # ---- fine stage: remaining planes of the survivors ----
            if FINE:
                fulls = coarse
                if tl.max(surv.to(tl.int32), axis=0) > 0:
                    smask = surv[None, :, None] & byte_ok3
                    x0 = _chunk_word(prow, smask, PC, FM0, stride_pp)
                    x0s = x0 << 4
                    if FM1 > 0:
                        x1 = _chunk_word(prow, smask, PC + FM0, FM1, stride_pp)
                        x1s = x1 << 4
                    for k in tl.static_range(8):
                        code = _chunk_code(x0, x0s, k, FM0)
                        if FM1 > 0:
                            code = (code << FM1) | _chunk_code(x1, x1s, k, FM1)
                        f = (code | fine_bits).to(tl.float32, bitcast=True) - FINE_MAGIC  # u/S
                        new_accs = ()
                        for g in tl.static_range(G):
                            new_accs = new_accs + (accs[g] + f * qs[g][k],)
                        accs = new_accs
                    fulls = ()
                    for g in tl.static_range(G):
                        fulls = fulls + (tl.sum(tl.sum(accs[g] + fc[g], axis=2), axis=0)
                                         + slacks[g],)
                cand = surv & False
                bnds = ()
                for g in tl.static_range(G):
                    cand = cand | (surv & (fulls[g] >= taus[g]))
                    bnds = bnds + (tl.where(surv, fulls[g], coarse[g]),)
            else:
                cand = surv
                bnds = coarse

            # ---- certificate: online logsumexp of scale * bound over non-candidates ----
            pruned = valid & (~cand)
            new_ms = ()
            new_ss = ()
            for g in tl.static_range(G):
                x = tl.where(pruned, bnds[g] * scale_log2, float("-inf"))
                x2 = tl.reshape(x, [NR, R])
                m_new = tl.maximum(ms[g], tl.max(x2, axis=0))             # [R]
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(ms[g] - m_use)
                p = tl.exp2(x2 - m_use[None, :])                          # 0 where not pruned
                new_ss = new_ss + (ss[g] * alpha + tl.sum(p, axis=0),)
                new_ms = new_ms + (m_new,)
            ms = new_ms
            ss = new_ss

            # ---- compaction: one atomic per block reserves the block's slot range ----
            ci = cand.to(tl.int32)
            cnt = tl.sum(ci, axis=0)
            if cnt > 0:
                start = tl.atomic_add(counter_ptr + kh, cnt, sem="relaxed", scope="gpu")
                slot = start + tl.cumsum(ci, axis=0) - ci
                tl.store(c_base + slot, rows, mask=cand & (slot < cap_out))
            c += 1
        s += 1

    # ---- publish this program's partial (max, sum) per head ----
    slot_ws = (kh * num_splits + split) * 2 * G
    for g in tl.static_range(G):
        m_g = tl.max(ms[g], axis=0)
        m_ref = tl.where(m_g == float("-inf"), 0.0, m_g)
        tl.store(ws_ptr + slot_ws + g, m_g)
        tl.store(ws_ptr + slot_ws + G + g, tl.sum(ss[g] * tl.exp2(ms[g] - m_ref), axis=0))

    # every thread's stores and slot reservations are ordered before the ticket
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tl.num_programs(1) + kh, 1, sem="acq_rel", scope="gpu")
    if ticket == num_splits - 1:
        offs_s = tl.arange(0, SPLIT_CHUNK)
        for g in tl.static_range(G):
            m_tot = tl.max(tl.full([SPLIT_CHUNK], float("-inf"), tl.float32), axis=0)
            s0 = 0
            while s0 < num_splits:
                sp = s0 + offs_s
                m_s = tl.load(ws_ptr + (kh * num_splits + sp) * 2 * G + g,
                              mask=sp < num_splits, other=float("-inf"), cache_modifier=".cg")
                m_tot = tl.maximum(m_tot, tl.max(m_s, axis=0))
                s0 += SPLIT_CHUNK
            m_ref = tl.where(m_tot == float("-inf"), 0.0, m_tot)
            s_tot = tl.sum(tl.zeros([SPLIT_CHUNK], tl.float32), axis=0)
            s0 = 0
            while s0 < num_splits:
                sp = s0 + offs_s
                ok = sp < num_splits
                wsl = (kh * num_splits + sp) * 2 * G
                m_s = tl.load(ws_ptr + wsl + g, mask=ok, other=float("-inf"),
                              cache_modifier=".cg")
                s_s = tl.load(ws_ptr + wsl + G + g, mask=ok, other=0.0, cache_modifier=".cg")
                s_tot += tl.sum(s_s * tl.exp2(m_s - m_ref), axis=0)
                s0 += SPLIT_CHUNK
            has = s_tot > 0.0
            lse = (m_tot + tl.log2(tl.where(has, s_tot, 1.0))) * 0.6931471805599453
            tl.store(pruned_lse_ptr + kh * G + g, tl.where(has, lse, float("-inf")))
        total = tl.atomic_xchg(counter_ptr + kh, 0, sem="acq_rel", scope="gpu")
        tl.store(cand_count_ptr + kh, tl.minimum(total, cap_out))
        # leave the ticket at zero for the next launch on this stream
        tl.atomic_xchg(counter_ptr + tl.num_programs(1) + kh, 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_COUNTERS = CounterPool()  # per KV head: slot counters [0, Hkv), arrival tickets [Hkv, 2 Hkv)


def _chunks(count: int) -> tuple[int, int]:
    """Sizes of the (at most two) chunks of at most 4 planes that cover ``count`` planes."""
    return min(4, count), max(0, count - 4)


def _tile(nbp: int, g: int, num_warps: int, block_n: int | None, seg: int | None
          ) -> tuple[int, int, int, int]:
    """(V, T, R, BLOCK_N): V bytes (8V channels) per thread, T threads per key row, R rows per
    CTA tile, BLOCK_N rows per block (at most a segment, rounded up to R). V keeps the G query
    slices in <= 64 registers."""
    v = max(1, min(nbp, 8 // max(g, 1)))
    v = max(v, nbp // 32)
    t = nbp // v
    r = (32 // t) * num_warps
    if block_n is None:
        block_n = max(r, 128 if seg is None else min(128, next_pow2(seg)))
    if block_n % r:
        raise ValueError(f"block_n={block_n} must be a multiple of {r}")
    return v, t, r, block_n


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_out(name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device, min_cols: int | None = None) -> None:
    if t is None:
        return
    _check_tensor(name, t)
    ok_shape = (tuple(t.shape) == shape if min_cols is None else
                (t.dim() == 2 and t.shape[0] == shape[0] and t.shape[1] >= min_cols))
    if not ok_shape or t.dtype != dtype or t.device != device:
        want = list(shape) if min_cols is None else f"[{shape[0]}, >= {min_cols}]"
        raise ValueError(f"{name} must be {dtype} of shape {want} on {device}, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")
    if min_cols is None and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if min_cols is not None and t.shape[1] > 0 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def quant_filter(
    q: torch.Tensor,
    planes: torch.Tensor,
    err: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    slack: torch.Tensor,
    tau: torch.Tensor,
    *,
    num_indexed: int | torch.Tensor,
    bits: int,
    coarse_bits: int,
    group: int,
    scale: float,
    segment_size: int | None = None,
    cand_pos: torch.Tensor | None = None,
    cand_count: torch.Tensor | None = None,
    pruned_lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of a QUANT index for one decode step (two-stage bound, see the module doc).

    Args:
        q: [Hq, D] float16 / bfloat16 / float32, last dim contiguous; Hq = G * Hkv and query
            head h reads KV head h // G. D % 8 == 0.
        planes: uint8 [Hkv, cap, bits, D/8] bit planes (most significant first; channel
            8i + k is bit k of byte i), last dim contiguous (other strides free, e.g. a
            plane-major view). Rows >= num_indexed are never read.
        err: float16 [Hkv, cap, D/group] residual norms, last dim contiguous.
        lo, step: float32 affine ranges, last dim contiguous: [Hkv, D] (one range per KV
            head and channel) or [Hkv, S, D] per segment of ``segment_size`` keys (key n uses
            segment n // segment_size; S >= ceil(num_indexed / segment_size), or
            S >= ceil(cap / segment_size) when num_indexed is a tensor). Both must have the
            same strides.
        slack: float32 [Hq] contiguous (reference.quant_slack), added to every bound.
        tau: float32 [Hq] contiguous raw-score thresholds; -inf / +inf allowed, NaN is not
            (not checked: that would synchronize).
        num_indexed: keys to filter, 0 <= num_indexed <= cap: a Python int, or a 1-element
            int32/int64 tensor on q's device (read by the kernel and clamped to [0, cap]; the
            grid then covers cap, so one launch can be captured in a CUDA graph and replayed
            at every decode step).
        bits: code bits (planes.shape[2]), 1..8; coarse_bits: planes of the coarse stage,
            1..bits (== bits: one stage); group: channels per residual-norm group (divides D).
        scale: softmax scale (finite, > 0) applied to the bounds in pruned_lse.
        segment_size: keys per range segment (LouverIndex: config.buffer_size); required
            with 3-D lo/step, must be None with 2-D ones.
        cand_pos: optional int32 [Hkv, C] output, C >= num_indexed (C >= cap when num_indexed
            is a tensor), last dim contiguous; entries at and beyond cand_count are untouched.
        cand_count: optional int32 [Hkv] output; pruned_lse: optional float32 [Hq] output.
            All outputs are fully written by the kernel (no zeroing needed; allocated when
            None).
        num_splits, block_n, num_warps: tuning overrides (programs per KV head, keys per block,
            warps per program); the defaults fill the device.

    Returns:
        (cand_pos int32 [Hkv, C], cand_count int32 [Hkv], pruned_lse float32 [Hq]): see the
        module docstring. cand_pos[kh, :cand_count[kh]] holds each candidate position once,
        ascending within blocks of BLOCK_N positions, blocks in arbitrary order.

    Raises:
        ValueError: on any shape, dtype, device, layout or range problem of the arguments.
    """
    for name, t in (("q", q), ("planes", planes), ("err", err), ("lo", lo), ("step", step),
                    ("slack", slack), ("tau", tau)):
        _check_tensor(name, t)
    if q.dim() != 2:
        raise ValueError(f"q must be [Hq, D], got shape {list(q.shape)}")
    hq, d = q.shape
    device = q.device
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if d < 8 or d % 8:
        raise ValueError(f"head dim D={d} must be a positive multiple of 8")
    if q.stride(1) != 1:
        raise ValueError("q must be contiguous in its last dimension")
    for name, t in (("planes", planes), ("err", err), ("lo", lo), ("step", step),
                    ("slack", slack), ("tau", tau)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    bits = _check_int("bits", bits, 1, 8)
    coarse_bits = _check_int("coarse_bits", coarse_bits, 1, bits)
    group = _check_int("group", group, 1, d)
    if d % group:
        raise ValueError(f"group={group} must divide D={d}")
    nb, ng = d // 8, d // group
    if planes.dtype != torch.uint8 or planes.dim() != 4:
        raise ValueError(f"planes must be uint8 [Hkv, cap, bits, D/8], got {planes.dtype} "
                         f"{list(planes.shape)}")
    hkv, cap = planes.shape[0], planes.shape[1]
    if tuple(planes.shape[2:]) != (bits, nb):
        raise ValueError(f"planes must be [Hkv, cap, bits={bits}, D/8={nb}], got "
                         f"{list(planes.shape)}")
    if planes.stride(3) != 1:
        raise ValueError("planes must be contiguous in its last dimension")
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    g = hq // hkv
    if err.dtype != torch.float16 or err.dim() != 3 or tuple(err.shape) != (hkv, cap, ng):
        raise ValueError(f"err must be float16 [Hkv={hkv}, cap={cap}, D/group={ng}], got "
                         f"{err.dtype} {list(err.shape)}")
    if err.stride(2) != 1:
        raise ValueError("err must be contiguous in its last dimension")
    for name, t in (("lo", lo), ("step", step)):
        if t.dtype != torch.float32 or t.dim() not in (2, 3) or t.shape[0] != hkv \
                or t.shape[-1] != d or t.stride(-1) != 1:
            raise ValueError(f"{name} must be float32 [{hkv}, {d}] or [{hkv}, S, {d}] with a "
                             f"contiguous last dim, got {t.dtype} {list(t.shape)}")
    if lo.shape != step.shape or lo.stride() != step.stride():
        raise ValueError(f"lo and step must have the same shape and strides, got "
                         f"{list(lo.shape)} / {list(step.shape)}")
    for name, t in (("slack", slack), ("tau", tau)):
        if t.dtype != torch.float32 or tuple(t.shape) != (hq,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 [{hq}], got {t.dtype} "
                             f"{list(t.shape)} (contiguous: {t.is_contiguous()})")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    if isinstance(num_indexed, torch.Tensor):
        n_tensor = check_device_scalar("num_indexed", num_indexed, device)
        n_value, n_max = 0, cap
    else:
        n_value = _check_int("num_indexed", num_indexed, 0, cap)
        n_tensor, n_max = None, n_value
    segmented = lo.dim() == 3
    if segmented:
        if segment_size is None:
            raise ValueError("segment_size is required with per-segment lo/step [Hkv, S, D]")
        seg = _check_int("segment_size", segment_size, 1, 1 << 30)
        if lo.shape[1] * seg < n_max:
            raise ValueError(f"lo/step hold {lo.shape[1]} segments of {seg} keys, fewer than "
                             f"the {n_max} keys to filter")
        stride_lh, stride_ls = lo.stride(0), lo.stride(1)
    else:
        if segment_size is not None:
            raise ValueError("segment_size is only for per-segment lo/step [Hkv, S, D]")
        seg, stride_lh, stride_ls = 0, lo.stride(0), 0
    if num_splits is not None:
        _check_int("num_splits", num_splits, 1, 1 << 20)
    if not (isinstance(num_warps, int) and num_warps in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")

    _check_out("cand_pos", cand_pos, (hkv,), torch.int32, device, min_cols=n_max)
    _check_out("cand_count", cand_count, (hkv,), torch.int32, device)
    _check_out("pruned_lse", pruned_lse, (hq,), torch.float32, device)
    if cand_pos is None:
        cand_pos = torch.empty(hkv, max(cap, 1), dtype=torch.int32, device=device)
    if cand_count is None:
        cand_count = torch.empty(hkv, dtype=torch.int32, device=device)
    if pruned_lse is None:
        pruned_lse = torch.empty(hq, dtype=torch.float32, device=device)
    cap_out = min(cap, cand_pos.shape[1])

    # ---- plan (host-known quantities only) ----
    nbp = next_pow2(nb)
    v, tpr, r, bn = _tile(nbp, g, num_warps, block_n, seg if segmented else None)
    if segmented:
        blocks_max = max(1, triton.cdiv(n_max, seg) * triton.cdiv(seg, bn))
    else:
        blocks_max = max(1, triton.cdiv(n_max, bn))
    if num_splits is None:
        target = 8 * num_sms(device)
        num_splits = max(1, min(triton.cdiv(target, hkv), triton.cdiv(blocks_max, 2)))
    cm0, cm1 = _chunks(coarse_bits)
    fm0, fm1 = _chunks(bits - coarse_bits)
    s = bits - coarse_bits
    ws = torch.empty(hkv * num_splits * 2 * g, dtype=torch.float32, device=device)
    counters = _COUNTERS.get(device, 2 * hkv)

    _quant_filter_kernel[(num_splits, hkv)](
        q, planes, err, lo, step, slack, tau, n_tensor if n_tensor is not None else tau,
        cand_pos, cand_count, pruned_lse, ws, counters,
        n_value, cap_out, seg, num_splits, float(scale) * _LOG2E, 0x4B000000, (150 - s) << 23,
        q.stride(0), planes.stride(0), planes.stride(1), planes.stride(2),
        err.stride(0), err.stride(1), stride_lh, stride_ls, cand_pos.stride(0),
        G=g, NB=nb, NBP=nbp, V=v, T=tpr, NG=ng, NGT=triton.cdiv(ng, nbp), GRP=group,
        GRPP=next_pow2(group), BLOCK_N=bn, R=r,
        CM0=cm0, CM1=cm1, FM0=fm0, FM1=fm1,
        SHIFT=float(1 << s), HALF=((1 << s) - 1) / 2.0,
        FINE_MAGIC=float(2.0 ** (23 - s)),
        SPLIT_CHUNK=16, N_ON_DEVICE=n_tensor is not None, SEGMENTED=segmented,
        num_warps=num_warps, num_stages=1,
    )
    return cand_pos, cand_count, pruned_lse


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the ground truth of quant_filter
# ----------------------------------------------------------------------------------------------


def quant_filter_reference(
    q: torch.Tensor, planes: torch.Tensor, err: torch.Tensor, lo: torch.Tensor,
    step: torch.Tensor, slack: torch.Tensor, tau: torch.Tensor, *, num_indexed: int, bits: int,
    coarse_bits: int, scale: float, segment_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What quant_filter computes, from reference.quant_bound (float64 logsumexp).

    Args: as quant_filter (num_indexed a Python int; group is implied by err's shape).
    Returns:
        cand bool [Hkv, num_indexed] (the group candidates), coarse survivors bool
        [Hkv, num_indexed], and pruned_lse float32 [Hq] (-inf where nothing is pruned).
    """
    hq = q.shape[0]
    hkv = planes.shape[0]
    g = hq // hkv
    n = num_indexed
    if n == 0:
        empty = torch.zeros(hkv, 0, dtype=torch.bool, device=q.device)
        return empty, empty, torch.full((hq,), -math.inf, device=q.device)
    codes = ref.unpack_planes(planes[:, :n], bits).to(torch.uint8)
    e = err[:, :n]
    # one range per key (segments of one key), whatever the layout: the same function
    if lo.dim() == 2:
        lo_k = lo[:, None].expand(-1, n, -1)
        step_k = step[:, None].expand(-1, n, -1)
    else:
        seg_of = torch.arange(n, device=q.device) // int(segment_size or 1)
        lo_k, step_k = lo[:, seg_of], step[:, seg_of]
    coarse = ref.quant_bound(q, codes, e, lo_k, step_k, bits, coarse_bits) + slack[:, None]
    full = ref.quant_bound(q, codes, e, lo_k, step_k, bits, None) + slack[:, None]
    t = tau[:, None]
    surv = (coarse >= t).reshape(hkv, g, n).any(dim=1)
    cand = surv & (full >= t).reshape(hkv, g, n).any(dim=1)
    surv_h = ref.expand_heads(surv, hq)
    cand_h = ref.expand_heads(cand, hq)
    bound = torch.where(surv_h, full, coarse).double() * scale
    lse = torch.logsumexp(bound.masked_fill(cand_h, -math.inf), dim=1)
    return cand, surv, lse.float()
