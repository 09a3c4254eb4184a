"""Candidate filter over a QUANT index (packed codes, int8 tensor cores): sound bounds,
compaction, certificate.

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
The kernel evaluates the bound expressions of reference.quant_bound: the dot with the codes is
the same exact integer dot (reference.quant_query_int: per segment and head, sigma qi_d >=
fl(q_d step_d) with sigma a power of two and |qi_d| <= 2^14), computed on int8 tensor cores as
256 (c . qh) + (c . ql) with qi = 256 qh + ql (qh in [-64, 64], ql in [-128, 127]): ONE dot
against the query matrix of columns qh, ql per head (2 NQ columns) gives both products, exact
in int32, combined and rounded once to float32. The coarse stage uses the top field t = c >> s
with scale sigma 2^s; the full stage reuses its dot, c . qi = 2^FB (t . qi) + u . qi for the
low field u (exact integers, so the same value as one dot with c). The per-segment constants
(sum_d q_d (lo_d + step_d H) + (sum_d |q_d| step_d) H for the coarse bound, sum_d q_d lo_d
for the full one) and the residual terms sum_g ||q_g|| e_g are float32 sums of the reference's
terms in another order, which the slack covers (reference.py's QUANT comment).

Code layout
-----------
codes[kh, n] is one record of D * bits / 8 bytes (reference.pack_codes): the coarse field (top
CB bits of every channel, 8 / CB channels per byte, channel (8 / CB) i + j at bits CB j of byte
i), then the fine field (the low FB = bits - CB bits, likewise). A field of NB >= 32 bytes
goes into the dot by bit planes: plane j (value j of every byte: bits W j, channels
(8 / W) i + j) is the bytes shifted and masked, multiplied with the query rows of those
channels (a channel permutation of codes and query alike, which leaves the dot unchanged), so
the bytes need no expansion. On the GPU a plane is cut out of four bytes at once (one 32-bit
shift and mask in inline PTX, ``_bits``); Triton's own uint8 arithmetic works byte by byte and
repacks the bytes for the shared-memory store of the dot operand, which cost ~40 % of the
kernel's instructions (measured on an H200). The interpreter takes the plain-Triton form. A
field of 16 bytes of 2- or 4-bit values (D = 64 with 2 low bits) has planes of 16 values,
too few for one dot (K >= 32): they go in pairs (tl.join of planes j and j + 1, K = 32, the
query rows paired likewise); for 9/3/64 this took the loop body from 736 to 555 SASS
instructions against the expansion below. Other narrower fields are expanded to one value
per channel in channel order with shifts, masks and tl.join. The query matrix interleaves
the heads' columns as (qh_0, ql_0, qh_1, ql_1, ...), so that the two products of one head land
in one thread of the MMA result and combine without data movement.

Work decomposition
------------------
Grid (num_splits, Hkv): program (split, kh) walks a contiguous range of work items of KV head
kh, an item being (range segment, chunk of BLOCK_N keys of it); the range is computed on the
device from num_indexed, so the grid depends only on the capacity when num_indexed is a device
tensor; only the first min(num_splits, ceil(items / 2)) programs take part (the others exit at
once), so a grid sized for the capacity costs little at short contexts. Per segment the program
forms the integer query (the G heads of the group, padded to NQ >= 4 columns, so that the query
matrix has >= 8 columns for the int8 dot) once in channel order and splits it into the query
matrices of the bit planes in registers, plus the per-head constants, then walks the segment's
blocks in an inner loop, where the query matrices are loop-invariant: they are staged for the
tensor cores once per segment (carried across one flat loop over items they were re-staged
through shared memory at every block: the loop body went from 901 to 694 SASS instructions for
32/8/128, the filter ~4 % faster on an H200 at 128k keys). Per block it bounds the
coarse fields and the residual norms (a [BLOCK_N, NG, 1] tile broadcast over the heads, so that
the sum over groups stays within a thread) of all heads (one int8 dot per coarse plane), then
loads the fine fields of the survivors (masked loads move no bytes for the other rows) and
computes the full bounds (one more dot per fine plane). No software pipeline in registers:
carrying the next block's code bytes across the loop made Triton unpack and repack them byte by
byte, and did not hide latency (measured).

Where the time goes (H200, 32/8/128, 128k keys, ~80 us with four-warp programs; hardware
counters and sweeps): the kernel is latency-bound at low occupancy: 0.46 instructions issued
per cycle and scheduler, 0.69 of 3.8 resident warps eligible, 25 % occupancy (128 registers),
DRAM at 30 % of peak. A 128-key block cost each warp ~690 SASS instructions: bit-plane
extraction ~20 %, cross-lane reductions over the heads and the compaction's scan ~20 %, the
loads with their address and mask arithmetic ~15 %. Block addresses as a scalar 64-bit base
plus 32-bit offsets, and the residual norms loaded once per key (not once per head and key,
which also converted each float16 four times) took the loop to 559 instructions (9/3/64: 555
-> 465), but the filter only ~2-5 % faster (the same A/B on an H200): issue slots are not what
it waits for. The stalls are on-chip: the dependency chains through shared memory (the dot
operands), shuffles and the CTA barriers of each block's loop body (13 of them), with ~4 warps
per scheduler to cover them. A flat loop over items under Triton's software pipeliner (2-4
stages), blocks of 64-256 keys, 1-8 warps and register caps of 64-112 gained at most ~9 %.

Launch shape. For D = 128 and D = 64 (G <= 4) the launcher runs one-warp programs walking
blocks of 4096 / D keys (32 and 64: 3.5 KB of records each), 16 per SM (the register file at
128 registers per thread), at least 2 blocks each: the same occupancy as four-warp programs,
but a barrier waits for one warp only and the warps do not wait for each other. Measured on an
H200 inside the captured decode step (real keys, eps 1e-3): 32/8/128 at 8k / 32k / 128k keys,
prologue + filter 19.1 / 32.6 / 81.6 -> 18.0 / 31.2 / 71.1 us. For 9/3/64, 32-key one-warp
blocks were no faster (16.3 -> 18.1 us at 32k, equal at 128k); 64-key ones (A/B against
four-warp programs of 128-key blocks, about one wave of them, at most 8 blocks each;
alternating processes, three each) 30.1 -> 27.7 us at 128k, 16.1 -> 16.6 at 32k and 14.5 ->
15.0 at 8k (the whole step 48.5 -> 45.9, 30.0 -> 29.8, 27.1 -> 27.7 us). Other shapes keep the
four-warp programs. Register caps below 128 with more one-warp programs per SM (112 / 96 / 80
/ 64 registers at 18 / 21 / 25 / 32 per SM; a few spills) were 14-28 % slower for 32/8/128 at
128k keys and 14-29 % for 9/3/64's 32-key blocks (variants in turn in one process), and
64-key blocks for D = 128 (16 or 12 per SM) 2-6 %: more resident warps do not make this loop
faster.
One-warp programs load every row's fine field together with its coarse field (one memory round
trip per block instead of two dependent ones, for 32 more bytes per key at D = 128, 16 at
D = 64); four-warp programs load only the survivors' (A/B on an H200, prologue + filter in
the captured step, alternating processes: 32/8/128 at 32k / 128k 29.8 / 65.6 -> 29.0 / 62.0
us; 9/3/64 with four-warp programs 30.2 -> 31.0 at 128k, so not there). Both shapes compute
the next block's mask at the end of an iteration, so that its loads issue at once (the same
kind of A/B: 32/8/128 31.2 / 70.4 -> 29.7 / 65.7 us; 9/3/64 29.5 -> 30.1 at 128k). A software
pipeline (the next block's coarse records loaded with this block's fine fields, the
compaction's store one block later) was slower (32/8/128 at 128k: 71.3 against 66.1 us; 9/3/64
33.4 against 30.5), and so was deferring the store alone, with the segment's row end computed
once instead of c0 (66.0 against 61.7 us; 9/3/64 32.0 against 30.4). The inner loop as a
``tl.range`` under Triton's pipeliner (records copied asynchronously, 2 or 3 stages) was no
faster (62.5 / 66.2 against 61.7 us) and, with ``early``, attended other key sets than this
kernel on the same inputs; without ``early`` the same sets (61.1 against 62.8 us, both without
it). So the pipeliner evidently moves the loads of tau and slack, which must follow gdc_wait,
ahead of it (into its prologue): loads that wait for the previous kernel must not sit in a
loop that Triton pipelines, one reason to keep the explicit while loops. All three A/Bs: H200,
prologue + filter in the captured step, real keys, eps 1e-3, versions in alternating
processes. An L2 prefetch of the records PF blocks ahead (one ``prefetch.global.L2`` per lane
and 128-byte line, no registers held) took the whole step 0-3 % down with PF = 1 (9/3/64;
32/8/128 +1.4 to -1.2 %) and up to 17 % up with PF = 2-8 at 128k keys (in-process A/B). Dots
on CUDA cores instead of tensor cores (``dp4a``, four channels per instruction, the query as
packed bytes in registers) compile to 512 IDP instructions per 32-key block for 32/8/128,
nearly as many as the whole tensor-core loop body (598), and with Triton's layouts to 2087
instructions and 320 B of spills: not run.

Compaction: per block, count the candidates, reserve a range of cand_pos with ONE atomic add on
a per-KV-head slot counter (relaxed: only the final count and the positions matter, both
ordered by the ticket below), write positions at offset + exclusive cumsum. Writing them to a
per-program range of a scratch list instead (no atomic in the loop: 543 instead of 598 loop
instructions for 32/8/128), then reserving the program's slots with one atomic and copying
them, made the step 0.6-1.3 us slower at 4k-128k keys, both shapes, except 32/8/128 at 128k
(0.5 us faster; in-process A/B on an H200).

pruned_lse: per program, an online logsumexp per (row lane, query head) over the non-candidates
(no cross-thread traffic in the loop; one exp2 per entry), merged over the rows once -> a
partial (max, sum) per (program, head) in a workspace. Each program then takes a ticket on a
per-KV-head arrival counter (acq_rel, after a CTA barrier); the last arrival merges the
num_splits partials of its KV head (all heads at once, one pass), writes pruned_lse and
cand_count (read from the slot counter with an exchange that resets it to zero) and resets the
ticket; the two exchanges come before the merge's loads, so that their round trips overlap
(0.3-0.7 us less per decode step than after them: H200, captured step, real keys, eps 1e-3, both
shapes at 4k-128k keys, the two orders alternating in one process, two runs). So: one launch, no
memset, no host synchronization; the counters live in a cached per-(device, stream) buffer that
is zero at creation and left zero by every launch (launches on one stream are ordered; launches
on different streams use different counters). cand_count and pruned_lse are written by every
launch, cand_pos up to cand_count: no pre-zeroing contract for the caller.
"""

from __future__ import annotations

import math
from typing import no_type_check

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from louver_kernels import reference as ref
from louver_kernels.triton._device import await_prior, load_scalar
from louver_kernels.triton._launch import (
    FLOAT_DTYPES,
    CounterPool,
    check_code_layout,
    check_device_scalar,
    check_int,
    interpreted,
    next_pow2,
    num_sms,
    pdl_launch,
)

__all__ = ["quant_filter", "quant_filter_reference"]

_LOG2E = 1.4426950408889634
# partials per load in the last arrival's merge: a constant, so that the kernel compiles once
# per shape, not once per capacity class (the split count follows the capacity). 256 against
# 128: up to 1.1 us less at 32k-128k keys (H200, captured step, alternating processes; 9/3/64
# runs 704 programs per KV head at 128k), no spills; 512 spills for 32/8/128
_MERGE_CHUNK = 256


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expand(b, W: tl.constexpr, BN: tl.constexpr, NBYTES: tl.constexpr):
    """Field bytes uint8 [BN, NBYTES] -> the values [BN, NBYTES * 8 / W] in channel order
    (value j of byte i = bits W j .. W j + W - 1, channel (8 / W) i + j)."""
    if W == 8:
        return b
    elif W == 4:
        return tl.reshape(tl.join(b & 15, b >> 4), [BN, NBYTES * 2])
    elif W == 2:
        v = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
        return tl.reshape(v, [BN, NBYTES * 4])
    else:
        lo = tl.join(tl.join(b & 1, (b >> 4) & 1), tl.join((b >> 2) & 1, (b >> 6) & 1))
        hi = tl.join(tl.join((b >> 1) & 1, (b >> 5) & 1), tl.join((b >> 3) & 1, b >> 7))
        return tl.reshape(tl.join(lo, hi), [BN, NBYTES * 8])


@triton.jit
@no_type_check  # Triton code: tuples grow in static loops
def _planes(x, P: tl.constexpr):
    """The rows of x [D, NQ] (channels in order) as P planes [D / P, NQ], plane j holding the
    channels P i + j: even/odd splits, in registers (a channel permutation, no memory)."""
    if P == 1:
        return (x,)
    else:
        ev, od = tl.split(tl.permute(tl.reshape(x, [x.shape[0] // 2, 2, x.shape[1]]), (0, 2, 1)))
        pe = _planes(ev, P // 2)
        po = _planes(od, P // 2)
        out = ()
        for j in tl.static_range(P // 2):
            out = out + (pe[j], po[j])
        return out


@triton.jit
def _int_query(qi):
    """Integer query rows qi int32 [rows, NQ] -> int8 [rows, 2 NQ]: columns (qh_h, ql_h) per
    head h (interleaved), qi = 256 qh + ql with qh in [-64, 64], ql in [-128, 127]."""
    qhi = (qi + 128) >> 8
    hl = tl.join(qhi, qi - qhi * 256)                                           # [rows, NQ, 2]
    return tl.reshape(hl, [qi.shape[0], 2 * qi.shape[1]]).to(tl.int8)


@triton.jit
@no_type_check  # Triton code: tuples grow in static loops
def _field_query(qi, W: tl.constexpr, NB: tl.constexpr):
    """The query matrices of a field of NB bytes of W-bit values, as _field_dot takes them,
    from the integer query qi int32 [D, NQ] in channel order."""
    if NB >= 32:
        pl = _planes(qi, 8 // W)
        qm = ()
        for j in tl.static_range(8 // W):
            qm = qm + (_int_query(pl[j]),)
    elif NB == 16 and W >= 2:
        # planes of 16 values, two per dot (K = 32): rows (i, p) = plane j + p, value i
        pl = _planes(qi, 8 // W)
        qm = ()
        for j in tl.static_range(0, 8 // W, 2):
            pair = tl.permute(tl.join(pl[j], pl[j + 1]), (0, 2, 1))         # [16, 2, NQ]
            qm = qm + (_int_query(tl.reshape(pair, [32, qi.shape[1]])),)
    else:
        qm = (_int_query(qi),)
    return qm


@triton.jit
def _bits(b, SH: tl.constexpr, W: tl.constexpr, PACKED: tl.constexpr):
    """(b >> SH) & (2^W - 1) of every byte of b (uint8), SH + W <= 8. PACKED (GPU): four
    bytes per 32-bit shift-and-mask (bits shifted in from the next byte are masked off),
    instead of one byte at a time."""
    if PACKED:
        mask: tl.constexpr = ((1 << W) - 1) * 0x01010101
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t; shr.b32 t, $1, {SH}; and.b32 $0, t, {mask}; }}",
            "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        return (b >> SH) & ((1 << W) - 1)


@triton.jit
def _field_dot(b, qm, W: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
               PACKED: tl.constexpr):
    """Exact sum_d v_d qm[d, :] over the W-bit values v of field bytes b [BN, NB], int32
    [BN, 2 NQ]. With NB >= 32 one int8 dot per bit plane j (value j of every byte, i.e. the
    channels (8 / W) i + j, whose query rows are qm[j]): a channel permutation applied to codes
    and query alike, so no expansion; with NB == 16 and W >= 2 one dot per pair of planes
    (K = 32); else one dot with the values in channel order (int8 dots need K >= 32)."""
    if NB >= 32:
        acc = tl.dot(_bits(b, 0, W, PACKED).to(tl.int8), qm[0], out_dtype=tl.int32)
        for j in tl.static_range(1, 8 // W):
            acc = tl.dot(_bits(b, W * j, W, PACKED).to(tl.int8), qm[j], acc,
                         out_dtype=tl.int32)
    elif NB == 16 and W >= 2:
        acc = tl.zeros([BN, qm[0].shape[1]], tl.int32)
        for j in tl.static_range(0, 8 // W, 2):
            pair = tl.join(_bits(b, W * j, W, PACKED), _bits(b, W * (j + 1), W, PACKED))
            acc = tl.dot(tl.reshape(pair, [BN, 32]).to(tl.int8), qm[j // 2], acc,
                         out_dtype=tl.int32)
    else:
        acc = tl.dot(_expand(b, W, BN, NB).to(tl.int8), qm[0], out_dtype=tl.int32)
    return acc


@triton.jit
def _combine(acc, BN: tl.constexpr, NQ: tl.constexpr):
    """Products with the interleaved (qh_h, ql_h) columns [BN, 2 NQ] -> c . qi = 256 (c . qh) +
    (c . ql), int32 [BN, NQ] (the two columns of a head are adjacent, so one thread of the MMA
    layout holds both: no data movement)."""
    ah, al = tl.split(tl.reshape(acc, [BN, NQ, 2]))
    return ah * 256 + al


@triton.jit
def _segment(qt, st, lo, HALF: tl.constexpr, CB: tl.constexpr, NBC: tl.constexpr,
             FB: tl.constexpr, NBF: tl.constexpr):
    """Per range segment (lo, step [D]): the integer query (reference.quant_query_int) as the
    query matrices of the coarse and fine fields, its scale sigma [NQ], and the constants of
    the coarse and full bounds [NQ]."""
    qstep = qt * st[:, None]                                                    # fl(q step)
    amax = tl.max(tl.abs(qstep), axis=0)
    ex = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) - 13, 1)
    sigma = (ex << 23).to(tl.float32, bitcast=True)
    inv = ((254 - ex) << 23).to(tl.float32, bitcast=True)
    qi = tl.ceil(qstep * inv[None, :]).to(tl.int32)
    qi = tl.where(qstep > 0.0, tl.maximum(qi, 1), qi)
    qmc = _field_query(qi, CB, NBC)
    if FB > 0:
        qmf = _field_query(qi, FB, NBF)
    else:
        qmf = qmc
    cc = (tl.sum(qt * (lo + st * HALF)[:, None], axis=0)
          + tl.sum(tl.abs(qt) * st[:, None], axis=0) * HALF)                    # coarse
    fc = tl.sum(qt * lo[:, None], axis=0)                                       # full
    return qmc, qmf, sigma, cc, fc


@triton.jit(do_not_specialize=["n_value", "cap_out", "num_splits"])
@no_type_check  # Triton code: mypy cannot follow the constexpr-typed tuples
def _quant_filter_kernel(
    q_ptr, codes_ptr, err_ptr, lo_ptr, step_ptr, slack_ptr, tau_ptr, n_ptr,
    cand_pos_ptr, cand_count_ptr, pruned_lse_ptr, ws_ptr, counter_ptr,
    n_value, cap_out, seg_size, num_splits, scale_log2,
    stride_qh, stride_kh, stride_kn, stride_eh, stride_lh, stride_ls, stride_ch,
    G: tl.constexpr, D: tl.constexpr, NQ: tl.constexpr, NG: tl.constexpr, GRP: tl.constexpr,
    CB: tl.constexpr, FB: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, N_ON_DEVICE: tl.constexpr, SEGMENTED: tl.constexpr,
    PACKED: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, FINE_FIRST: tl.constexpr,
):
    if EARLY:
        # only let the next kernel launch: the wait for the previous one (which writes tau and
        # slack, nothing else this kernel reads) comes before the first use of tau (see
        # quant_filter's ``early``)
        gdc_launch_dependents()
    else:
        await_prior(PDL)
    split = tl.program_id(0)
    kh = tl.program_id(1)
    NBC: tl.constexpr = D * CB // 8        # bytes of the coarse field
    NBF: tl.constexpr = D * FB // 8        # bytes of the fine field
    SHIFT: tl.constexpr = 1 << FB

    # ---- this program's work: items (segment s, chunk c of BLOCK_N keys of the segment) ----
    n = load_scalar(n_ptr, n_value, N_ON_DEVICE)
    n = tl.minimum(tl.maximum(n, 0), cap_out)
    if SEGMENTED:
        seg = seg_size
    else:
        seg = tl.maximum(n, 1)             # one range: a single segment of n keys
    cps = tl.cdiv(seg, BLOCK_N)            # chunks per segment
    n_items = tl.cdiv(n, seg) * cps
    # the grid is sized for the most work (the capacity when n is read on the device); at most
    # one split per 2 items takes part: the others exit at once and the merge reads only the
    # active splits' partials
    active = tl.maximum(tl.minimum(num_splits, tl.cdiv(n_items, 2)), 1)
    if split >= active:
        return
    per_split = tl.cdiv(n_items, active)
    item_lo = split * per_split
    item_hi = tl.minimum(item_lo + per_split, n_items)

    # ---- loop-invariant per-head data: q as [D, NQ] (channels x heads of the group) ----
    offs_d = tl.arange(0, D)
    offs_q = tl.arange(0, NQ)
    q_ok = offs_q < G
    heads = kh * G + offs_q
    qt = tl.load(q_ptr + heads[None, :] * stride_qh + offs_d[:, None], mask=q_ok[None, :],
                 other=0.0).to(tl.float32)                                      # [D, NQ]
    qng = tl.sqrt(tl.sum(tl.reshape(qt * qt, [NG, GRP, NQ]), axis=1))           # ||q_g||, [NG, NQ]
    if not EARLY:
        tau = tl.load(tau_ptr + heads, mask=q_ok, other=float("inf"))
        slack = tl.load(slack_ptr + heads, mask=q_ok, other=0.0)

    k_base = codes_ptr + kh.to(tl.int64) * stride_kh
    e_base = err_ptr + kh.to(tl.int64) * stride_eh
    c_base = cand_pos_ptr + kh.to(tl.int64) * stride_ch
    r_base = kh.to(tl.int64) * stride_lh
    offs_n = tl.arange(0, BLOCK_N)
    offs_bc = tl.arange(0, NBC)
    offs_g = tl.arange(0, NG)

    # certificate: per (row lane, head) online logsumexp of scale * bound over the pruned keys,
    # merged over rows once per program (no cross-thread traffic in the loop)
    m_el = tl.full([BLOCK_N, NQ], float("-inf"), tl.float32)
    s_el = tl.zeros([BLOCK_N, NQ], tl.float32)
    it = item_lo
    while it < item_hi:
        # ---- per segment: the integer query and the constants, then the segment's chunks in
        # an inner loop (the query matrices are loop-invariant there: staged once per segment)
        s = it // cps
        r_row = r_base + s.to(tl.int64) * stride_ls + offs_d
        qmc, qmf, sigma, cc, fc = _segment(qt, tl.load(step_ptr + r_row),
                                           tl.load(lo_ptr + r_row), HALF, CB, NBC, FB, NBF)
        sig_c = sigma * SHIFT
        seg_end = tl.minimum(item_hi, (s + 1) * cps)
        # chunk it - s * cps of segment s: rows row0 + offs_n, valid below the segment's and the
        # index's ends (scalar bases, 32-bit offsets within the block: fewer address
        # instructions). The next chunk's mask is computed at the end of each iteration, so
        # that its loads issue at the top of the next (see the module docstring, Launch shape)
        c0 = (it - s * cps) * BLOCK_N
        row0 = s * seg + c0
        valid = offs_n < tl.minimum(seg - c0, n - row0)
        while it < seg_end:
            rows = row0 + offs_n
            kb = k_base + row0.to(tl.int64) * stride_kn
            hb = tl.load(kb + offs_n[:, None] * stride_kn + offs_bc[None, :],
                         mask=valid[:, None], other=0)
            if FB > 0 and FINE_FIRST:
                # every row's fine field, with the coarse one: one memory round trip per block
                lb = tl.load(kb + offs_n[:, None] * stride_kn + NBC
                             + tl.arange(0, NBF)[None, :], mask=valid[:, None], other=0)
            # residual norms as [BLOCK_N, NG, 1] (broadcast over the heads after the load), so
            # that the sum over groups stays within a thread (a [BLOCK_N, NG] tile put the
            # groups across lanes: ~100 shuffles per block)
            e = tl.load(e_base + row0.to(tl.int64) * NG
                        + (offs_n[:, None] * NG + offs_g[None, :])[:, :, None],
                        mask=valid[:, None, None], other=0.0).to(tl.float32)
            # ---- coarse stage: residual terms + coarse field, all heads ----
            et = tl.sum(e * qng[None, :, :], axis=1)
            a = _combine(_field_dot(hb, qmc, CB, BLOCK_N, NBC, PACKED), BLOCK_N, NQ)  # c . qi
            if EARLY:
                # the previous kernel's tau and slack (a no-op wait after the first block; the
                # loads hit the cache)
                gdc_wait()
                tau = tl.load(tau_ptr + heads, mask=q_ok, other=float("inf"))
                slack = tl.load(slack_ptr + heads, mask=q_ok, other=0.0)
            coarse = (a.to(tl.float32) * sig_c[None, :] + cc[None, :] + et) + slack[None, :]
            hit = (coarse >= tau[None, :]) & q_ok[None, :]
            surv = (tl.max(hit.to(tl.int32), axis=1) > 0) & valid

            # ---- fine stage: the low field of the survivors, full bound (no branch on "any
            # survivor": at realistic candidate fractions nearly every block has one, and the
            # masked load moves no bytes for the other rows) ----
            if FB > 0:
                if not FINE_FIRST:
                    lb = tl.load(kb + offs_n[:, None] * stride_kn + NBC
                                 + tl.arange(0, NBF)[None, :], mask=surv[:, None], other=0)
                # (t << FB | u) . qi = 2^FB (t . qi) + u . qi, exact in int32
                a2 = a * SHIFT + _combine(_field_dot(lb, qmf, FB, BLOCK_N, NBF, PACKED), BLOCK_N,
                                          NQ)
                full = (a2.to(tl.float32) * sigma[None, :] + fc[None, :] + et) + slack[None, :]
                hit_f = (full >= tau[None, :]) & q_ok[None, :]
                cand = surv & (tl.max(hit_f.to(tl.int32), axis=1) > 0)
                bnd = tl.where(surv[:, None], full, coarse)
            else:
                cand = surv
                bnd = coarse

            # ---- certificate: x = scale * bound (log2 units) of the pruned keys ----
            x = tl.where((valid & (~cand))[:, None] & q_ok[None, :], bnd * scale_log2,
                         float("-inf"))
            # one exp2 per entry: exp2(-|x - m|) rescales whichever of (sum, new term) is smaller
            up = x > m_el
            mx = tl.maximum(m_el, x)
            ex = tl.exp2(tl.minimum(m_el, x) - tl.where(mx == float("-inf"), 0.0, mx))
            s_el = tl.where(up, s_el * ex + 1.0, s_el + ex)
            m_el = mx

            # ---- compaction: one atomic per block reserves the block's slot range ----
            ci = cand.to(tl.int32)
            cnt = tl.sum(ci, axis=0)
            if cnt > 0:
                start = tl.atomic_add(counter_ptr + kh, cnt, sem="relaxed", scope="gpu")
                slot = start + tl.cumsum(ci, axis=0) - ci
                tl.store(c_base + slot, rows, mask=(ci > 0) & (slot < cap_out))
            c0 += BLOCK_N
            row0 += BLOCK_N
            valid = offs_n < tl.minimum(seg - c0, n - row0)
            it += 1

    if EARLY:
        gdc_wait()   # a program without items: before its first write
    # ---- publish this program's partial (max, sum) per head ----
    m_run = tl.max(m_el, axis=0)
    m_ref = tl.where(m_run == float("-inf"), 0.0, m_run)
    s_run = tl.sum(s_el * tl.exp2(m_el - m_ref[None, :]), axis=0)              # rel. to m_run
    slot_ws = (kh * num_splits + split) * 2 * G
    tl.store(ws_ptr + slot_ws + offs_q, m_run, mask=q_ok)
    tl.store(ws_ptr + slot_ws + G + offs_q, s_run, mask=q_ok)

    # every thread's stores and slot reservations are ordered before the ticket
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tl.num_programs(1) + kh, 1, sem="acq_rel", scope="gpu")
    if ticket == active - 1:
        # last arrival: first the candidate count (the slot counter, reset to zero) and the
        # ticket's reset, whose round trips then overlap the merge's loads (relaxed: the
        # ticket's acquire already ordered every slot reservation before them); then merge the
        # partials of all heads at once, SPLIT_CHUNK splits per load (one pass with an online
        # max; 1-4 steps for the launcher's default split counts)
        total = tl.atomic_xchg(counter_ptr + kh, 0, sem="relaxed", scope="gpu")
        tl.store(cand_count_ptr + kh, tl.minimum(total, cap_out))
        # leave the ticket at zero for the next launch on this stream
        tl.atomic_xchg(counter_ptr + tl.num_programs(1) + kh, 0, sem="relaxed", scope="gpu")
        offs_s = tl.arange(0, SPLIT_CHUNK)
        m_tot = tl.full([NQ], float("-inf"), tl.float32)
        s_tot = tl.zeros([NQ], tl.float32)
        s0 = 0
        while s0 < active:
            sp = s0 + offs_s
            msk = (sp < active)[:, None] & q_ok[None, :]                     # [SC, NQ]
            wsl = ((kh * num_splits + sp) * 2 * G)[:, None] + offs_q[None, :]
            m_s = tl.load(ws_ptr + wsl, mask=msk, other=float("-inf"), cache_modifier=".cg")
            s_s = tl.load(ws_ptr + wsl + G, mask=msk, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_tot, tl.max(m_s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_tot = (s_tot * tl.exp2(m_tot - m_use)
                     + tl.sum(s_s * tl.exp2(m_s - m_use[None, :]), axis=0))
            m_tot = m_new
            s0 += SPLIT_CHUNK
        has = s_tot > 0.0
        lse = (m_tot + tl.log2(tl.where(has, s_tot, 1.0))) * 0.6931471805599453
        tl.store(pruned_lse_ptr + heads, tl.where(has, lse, float("-inf")), mask=q_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_COUNTERS = CounterPool()  # per KV head: slot counters [0, Hkv), arrival tickets [Hkv, 2 Hkv)
_INTERPRETED = interpreted(_quant_filter_kernel)    # no inline PTX in the interpreter


def _block_n(block_n: int | None, seg: int | None) -> int:
    """Keys per block: at most a segment (>= 16 for the dot), 128 by default."""
    if block_n is None:
        return 128 if seg is None else max(16, min(128, next_pow2(seg)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    return block_n


def split_count(blocks: int, hkv: int, per_sm: int, sms: int, max_blocks: int | None = None
                ) -> int:
    """Programs per KV head for ``blocks`` blocks per head: per_sm programs per SM over the
    Hkv heads (more where a program would walk more than max_blocks blocks), at least 2
    blocks each, at least one program. The launcher's default; tuning sweeps use it too."""
    wave = triton.cdiv(per_sm * sms, hkv)
    if max_blocks is not None:
        wave = max(wave, triton.cdiv(blocks, max_blocks))
    return max(1, min(wave, triton.cdiv(blocks, 2)))


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


def quant_filter(
    q: torch.Tensor,
    codes: torch.Tensor,
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
    num_warps: int | None = None,
    maxnreg: int | None = None,
    early: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of a QUANT index for one decode step (two-stage bound, see the module doc).

    Args:
        q: [Hq, D] float16 / bfloat16 / float32, last dim contiguous; Hq = G * Hkv and query
            head h reads KV head h // G. D % 8 == 0.
        codes: uint8 [Hkv, cap, D * bits / 8] code records (reference.pack_codes), last dim
            contiguous. Rows >= num_indexed are never read.
        err: float16 [Hkv, cap, D/group] residual norms, rows contiguous (strides
            [*, D/group, 1]).
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
        bits: code bits, coarse_bits: bits of the coarse stage (reference.code_fields: coarse
            in {1, 2, 4}, bits - coarse in {0, 1, 2, 4}, bits <= 7; bits == coarse: one
            stage); group: channels per residual-norm group (divides D).
        scale: softmax scale (finite, > 0) applied to the bounds in pruned_lse.
        segment_size: keys per range segment (LouverIndex: config.buffer_size); required
            with 3-D lo/step, must be None with 2-D ones.
        cand_pos: optional int32 [Hkv, C] output, C >= num_indexed (C >= cap when num_indexed
            is a tensor), last dim contiguous; entries at and beyond cand_count are untouched.
        cand_count: optional int32 [Hkv] output; pruned_lse: optional float32 [Hq] output.
            All outputs are fully written by the kernel (no zeroing needed; allocated when
            None).
        num_splits, block_n, num_warps, maxnreg: tuning overrides (programs per KV head, keys
            per block, warps per program, register cap per thread); the defaults fill the
            device (maxnreg: 128 where that does not spill, G <= 4 and D <= 128; for D = 128
            and D = 64 programs of one warp walking blocks of 4096 / D keys, else of four
            warps and 128-key blocks: see the module docstring, Work decomposition).
        early: with programmatic dependent launch (_launch.pdl_launch), start before the
            kernel launched just before this one completes: each program reads q, the
            records and num_indexed and computes its first block's coarse dot, and waits for
            that kernel only before it reads tau and slack (and before any write). The caller
            guarantees that the kernel before it writes nothing else this one reads and was
            itself launched without PDL options (so everything before that one is complete):
            the decode step's prologue (decode._run). Measured on an H200 (real keys, eps
            1e-3, captured step): 1.2-2.1 us less per step at 32k and 128k keys, both shapes
            of bench_gpu. False: the usual wait before the first memory access.

    Returns:
        (cand_pos int32 [Hkv, C], cand_count int32 [Hkv], pruned_lse float32 [Hq]): see the
        module docstring. cand_pos[kh, :cand_count[kh]] holds each candidate position once,
        ascending within blocks of BLOCK_N positions, blocks in arbitrary order.

    Raises:
        ValueError: on any shape, dtype, device, layout or range problem of the arguments.
    """
    for name, t in (("q", q), ("codes", codes), ("err", err), ("lo", lo), ("step", step),
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
    for name, t in (("codes", codes), ("err", err), ("lo", lo), ("step", step),
                    ("slack", slack), ("tau", tau)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    group, cb, fb = check_code_layout(bits, coarse_bits, group, d, "coarse_bits")
    if d < 32 or d > 512 or d & (d - 1):
        raise ValueError(f"head dim D={d} must be a power of two in [32, 512]")
    ng, rec = d // group, d * bits // 8
    if codes.dtype != torch.uint8 or codes.dim() != 3:
        raise ValueError(f"codes must be uint8 [Hkv, cap, D*bits/8], got {codes.dtype} "
                         f"{list(codes.shape)}")
    hkv, cap = codes.shape[0], codes.shape[1]
    if codes.shape[2] != rec:
        raise ValueError(f"codes must be [Hkv, cap, D*bits/8={rec}], got {list(codes.shape)}")
    if codes.stride(2) != 1:
        raise ValueError("codes must be contiguous in its last dimension")
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    g = hq // hkv
    if err.dtype != torch.float16 or err.dim() != 3 or tuple(err.shape) != (hkv, cap, ng):
        raise ValueError(f"err must be float16 [Hkv={hkv}, cap={cap}, D/group={ng}], got "
                         f"{err.dtype} {list(err.shape)}")
    if err.stride(2) != 1 or (cap > 1 and err.stride(1) != ng):
        raise ValueError("err must have contiguous rows (strides [*, D/group, 1])")
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
        n_value = check_int("num_indexed", num_indexed, 0, cap)
        n_tensor, n_max = None, n_value
    segmented = lo.dim() == 3
    if segmented:
        if segment_size is None:
            raise ValueError("segment_size is required with per-segment lo/step [Hkv, S, D]")
        seg = check_int("segment_size", segment_size, 1, 1 << 30)
        if lo.shape[1] * seg < n_max:
            raise ValueError(f"lo/step hold {lo.shape[1]} segments of {seg} keys, fewer than "
                             f"the {n_max} keys to filter")
        stride_lh, stride_ls = lo.stride(0), lo.stride(1)
    else:
        if segment_size is not None:
            raise ValueError("segment_size is only for per-segment lo/step [Hkv, S, D]")
        seg, stride_lh, stride_ls = 0, lo.stride(0), 0
    if num_splits is not None:
        check_int("num_splits", num_splits, 1, 1 << 20)
    if num_warps is not None and not (isinstance(num_warps, int)
                                      and num_warps in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")
    if maxnreg is not None:
        check_int("maxnreg", maxnreg, 32, 255)

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
    nq = max(4, next_pow2(g))
    one_warp = (block_n is None and num_warps is None and maxnreg is None and nq <= 4
                and d in (64, 128))
    if one_warp:
        # blocks of 4096 / D keys: 32 at D = 128, 64 at D = 64 (3.5 KB of records each)
        block_n = min(4096 // d, _block_n(None, seg if segmented else None))
        num_warps = 1
    num_warps = 4 if num_warps is None else num_warps
    bn = _block_n(block_n, seg if segmented else None)
    if segmented:
        blocks_max = max(1, triton.cdiv(n_max, seg) * triton.cdiv(seg, bn))
    else:
        blocks_max = max(1, triton.cdiv(n_max, bn))
    if maxnreg is None and nq <= 4 and d <= 128:
        # 128 registers (4 programs per SM instead of 2-3) without spills for these shapes
        # (ptxas, sm_90); larger NQ or D spill. Measured on an H200, 32/8/128 at 128k keys:
        # 112 -> 92 us; 9/3/64: 47 -> 43 us
        maxnreg = 128
    if num_splits is None and one_warp:
        # one-warp programs: 16 per SM (the register file at 128 registers), at least 2
        # blocks each (see the module docstring, Work decomposition)
        num_splits = split_count(blocks_max, hkv, 16, num_sms(device))
    elif num_splits is None:
        # about one wave of resident programs, at most 8 blocks each (more programs than fit
        # hide more latency on long ranges), at least 2 blocks each (measured on an H200 at
        # 4k-128k keys)
        per_sm = 4 if maxnreg is not None and maxnreg <= 128 else 2
        num_splits = split_count(blocks_max, hkv, per_sm, num_sms(device), max_blocks=8)
    ws = torch.empty(hkv * num_splits * 2 * g, dtype=torch.float32, device=device)
    counters = _COUNTERS.get(device, 2 * hkv)
    pdl = pdl_launch(device)

    _quant_filter_kernel[(num_splits, hkv)](
        q, codes, err, lo, step, slack, tau, n_tensor if n_tensor is not None else tau,
        cand_pos, cand_count, pruned_lse, ws, counters,
        n_value, cap_out, seg, num_splits, float(scale) * _LOG2E,
        q.stride(0), codes.stride(0), codes.stride(1), err.stride(0),
        stride_lh, stride_ls, cand_pos.stride(0),
        G=g, D=d, NQ=nq, NG=ng, GRP=group, CB=cb, FB=fb,
        HALF=((1 << fb) - 1) / 2.0, BLOCK_N=bn,
        SPLIT_CHUNK=_MERGE_CHUNK,
        N_ON_DEVICE=n_tensor is not None, SEGMENTED=segmented, PACKED=not _INTERPRETED,
        PDL=bool(pdl), EARLY=bool(pdl) and early, FINE_FIRST=num_warps == 1,
        num_warps=num_warps, num_stages=1,
        **({"maxnreg": maxnreg} if maxnreg else {}), **pdl,
    )
    return cand_pos, cand_count, pruned_lse


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the ground truth of quant_filter
# ----------------------------------------------------------------------------------------------


def quant_filter_reference(
    q: torch.Tensor, codes: torch.Tensor, err: torch.Tensor, lo: torch.Tensor,
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
    hkv = codes.shape[0]
    g = hq // hkv
    n = num_indexed
    if n == 0:
        empty = torch.zeros(hkv, 0, dtype=torch.bool, device=q.device)
        return empty, empty, torch.full((hq,), -math.inf, device=q.device)
    full_codes = ref.unpack_codes(codes[:, :n], bits, coarse_bits).to(torch.uint8)
    e = err[:, :n]
    # one range per key (segments of one key), whatever the layout: the same function
    if lo.dim() == 2:
        lo_k = lo[:, None].expand(-1, n, -1)
        step_k = step[:, None].expand(-1, n, -1)
    else:
        seg_of = torch.arange(n, device=q.device) // int(segment_size or 1)
        lo_k, step_k = lo[:, seg_of], step[:, seg_of]
    coarse = ref.quant_bound(q, full_codes, e, lo_k, step_k, bits, coarse_bits) + slack[:, None]
    full = ref.quant_bound(q, full_codes, e, lo_k, step_k, bits, None) + slack[:, None]
    t = tau[:, None]
    surv = (coarse >= t).reshape(hkv, g, n).any(dim=1)
    cand = surv & (full >= t).reshape(hkv, g, n).any(dim=1)
    surv_h = ref.expand_heads(surv, hq)
    cand_h = ref.expand_heads(cand, hq)
    bound = torch.where(surv_h, full, coarse).double() * scale
    lse = torch.logsumexp(bound.masked_fill(cand_h, -math.inf), dim=1)
    return cand, surv, lse.float()
