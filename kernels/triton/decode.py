"""One decode step of a QUANT index on the GPU: threshold, candidate filter, sparse attention.

The step reads, per KV head: the coarse code field and the residual norms of every indexed key
(and the low bits of the keys whose coarse bound reaches tau), then K of the
group's candidates and V of the keys some head attends, then the recent buffer. It computes
exactly what ``LouverIndex.attend`` computes on the reference backend for the policies it
supports (Fixed, Relative, Dense): the same tau, the same attended set {s >= tau} U buffer, the
same per-group candidate counts, and a certificate from the same terms.

Launches (eager, ``attend``): three, and no host synchronization on the step itself:

1. ``_prologue_kernel`` (programs per KV head and chunk of probe keys, plus one per KV head
   for the slack and the check): ||q_h|| and the slack
   (from the index's running maxima, see ``slack_coef``), the on-device check
   of q (finite, within MAX_QUERY_ABS), the probe scores (sinks, buffer and recent keys) and
   tau for the policy.
2. ``quant_filter``: candidates, cand_count, pruned_lse.
3. ``sparse_attention`` with below_lse and the fused certificate: out, lse, num_attended,
   dropped_mass_bound and num_candidates (written by each KV head's last-arriving program).

A Dense policy runs ``dense_attention`` over every key instead (two launches: the split-K pass
on tensor cores, and its merge, which also writes tau = -inf, dropped_mass_bound = 0,
num_candidates = the number of keys and the check of q).

A Fixed policy adds one host-to-device copy of its taus per eager step (none when captured).
On a GPU that has it (compute capability >= 9.0), the launches after a step's first one use
programmatic dependent launch (``_launch.pdl_launch``): a kernel starts while the one before it
finishes and waits on the device for its results (on an H200 this took 0.3-2.5 us off 7 of 8
graph-replayed steps of bench_gpu).
``CapturedStep`` records the same three launches (reading num_indexed / num_keys from device
counters) in a CUDA graph; a replay is the graph launch, plus a copy of q into the graph's
input unless the caller wrote it there.
With ``fallback`` (Relative policies) it also records the index's Dense step, times both now
and then, and replays the faster: the automatic dense fallback.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from louver_kernels import reference as ref
from louver_kernels.threshold import Dense, Fixed, Policy, Relative
from louver_kernels.triton._device import await_prior, load_scalar, query_error
from louver_kernels.triton._launch import CounterPool, capture_graph, next_pow2, pdl_launch
from louver_kernels.triton.attention import sparse_attention
from louver_kernels.triton.dense_attention import dense_attention
from louver_kernels.triton.quant_filter import quant_filter

if TYPE_CHECKING:
    from louver_kernels.index import AttendOutput, LouverIndex

SUPPORTED = (Fixed, Relative, Dense)

# Relative inflation of the slack coefficient (see slack_coef).
_COEF_INFLATE = 1.0 + 2.0 ** -30


def slack_constants(head_dim: int, groups: int) -> tuple[float, float, float]:
    """(gamma_D, gamma_m, 1 + 2^-30): the float64 constants of slack_coef's expression."""
    return ref.gamma(head_dim), ref.gamma(3 * head_dim + 2 * groups + 8), _COEF_INFLATE


def slack_coef(kmax: torch.Tensor, emax: torch.Tensor, lmax: torch.Tensor, head_dim: int,
               groups: int) -> torch.Tensor:
    """float64 [Hkv] C_kh such that fl32(fl64(||q_h|| C_kh)) >= reference.quant_slack(q)[h].

    reference.quant_slack computes, in float64 from float32 inputs,

        S_ref = RN32(2 (gamma_D qn km + gamma_m qn (2 km + 3 em + 3 lm)))

    with qn the float64 norm of q. Its float64 value before the final rounding is within a
    relative (D + 16) 2^-53 of the exact real 2 ||q|| (gamma_D km + gamma_m (2 km + 3 em +
    3 lm)) = ||q|| C* (a float64 norm of D terms and a dozen float64 operations, each adding
    at most one relative 2^-53 rounding). This function computes C* in float64 (relative error
    <= 16 2^-53 from the same dozen operations) and multiplies it by 1 + 2^-30; the prologue
    kernel computes ||q|| in float64 (relative error <= (D + 2) 2^-53) and the float64 product
    (one more 2^-53). For D <= 2^12 every one of these errors is below 2^-40 relative, so the
    kernel's float64 value is >= ||q|| C* (1 + 2^-30 - 2^-39) > S_ref's float64 value, and
    round-to-nearest to float32 is monotone: the kernel's slack is >= S_ref, i.e. the slack the
    bounds are proven with (reference.py's module docstring) is matched or exceeded. It exceeds
    S_ref by at most one float32 ulp (when the 2^-30 inflation crosses a rounding boundary):
    the slack is ~1e-6 of a score, so this changes no attended key and, in practice, no
    candidate.

    The prologue kernel evaluates this same float64 expression on the device from the index's
    running maxima (which the encoder updates in place), so a flush launches nothing for the
    slack; a fused multiply-add there rounds once where this function rounds twice, within the
    same error bound.
    """
    km, em, lm = kmax.double(), emax.double(), lmax.double()
    g_d, g_m, inflate = slack_constants(head_dim, groups)
    coef = 2.0 * (g_d * km + g_m * (2 * km + 3 * em + 3 * lm))
    return coef * inflate


def probe_max(q: torch.Tensor, keys: torch.Tensor, num_indexed: int, total: int, sinks: int,
              recent: int) -> torch.Tensor:
    """m_lo float32 [Hq]: the largest exact score over the first ``sinks`` keys, the buffer
    [num_indexed, total) and the last ``recent`` keys (the reference's construction); -inf if
    total == 0. Plain torch: the ground truth of the prologue kernel's probe."""
    hq = q.shape[0]
    if total == 0:
        return torch.full((hq,), -math.inf, device=q.device)
    head = min(sinks, total)
    tail_start = max(head, min(total - recent, num_indexed))
    parts = [ref.scores(q, keys[:, :head])] if head else []
    if tail_start < total:
        parts.append(ref.scores(q, keys[:, tail_start:total]))
    return torch.cat(parts, dim=1).amax(dim=1)


# ----------------------------------------------------------------------------------------------
# Prologue kernel: slack, q check, probe scores and tau
# ----------------------------------------------------------------------------------------------

MODE_DENSE, MODE_FIXED, MODE_RELATIVE = 0, 1, 2
_PROBE_BLOCK = 64                # probe keys per program and chunk
_COUNTERS = CounterPool()        # per KV head: the prologue's arrival tickets


@triton.jit(do_not_specialize=["n_value", "total_value"])
def _prologue_kernel(
    q_ptr, k_ptr, kmax_ptr, emax_ptr, lmax_ptr, const_ptr, tau_in_ptr, n_ptr, total_ptr,
    tau_ptr, slack_ptr, bad_ptr, ws_ptr, counter_ptr,
    n_value, total_value, cap, tau_off, max_abs,
    stride_qh, stride_kh, stride_kn,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, SINKS: tl.constexpr,
    RECENT: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, ON_DEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (kh, c) of grid (Hkv, S + 1) (Relative) or (Hkv, 1), for the query heads
    h = kh * G + g of KV head kh:

    slack[h] = fl32(||q_h||_float64 * coef_kh)    (the last program, c == S), coef_kh =
               slack_coef's float64 expression of kmax/emax/lmax[kh] with the constants in
               const (float64 [3], slack_constants)
    bad[kh]  = 1 if any entry of the G heads of kh is NaN, +-Inf or above max_abs in magnitude
               (the last program)
    tau[h]   = tau_in[h] (Fixed) | m_lo[h] - tau_off (Relative), with m_lo the
               largest float32 score over positions [0, min(SINKS, total)) and
               [max(head, min(total - RECENT, n)), total) (probe_max's construction).

    Relative: program c < S scores the probe keys of chunks c, c + S, ... (BLOCK keys each; one
    read of a key serves the G heads), writes its maxima to a workspace and takes a ticket on
    a per-KV-head arrival counter; the last arrival merges the S partials, writes tau and
    leaves the counter at zero (CounterPool's contract). S = 1 writes tau directly. The slack
    and the check run in a program of their own, beside the probe (the kernel is a chain of
    dependent latencies, not throughput: one program doing both took longer). One program per
    KV head for the whole probe (a 512-key tile, 16 warps: no ticket, no merge) took the
    captured step 0.1-0.7 us longer for 9/3/64 and 4-6 us for 32/8/128 (spills), two of
    256-key chunks 0.4-2 us (H200, 4k-128k keys, in-process A/B).
    """
    await_prior(PDL)
    kh = tl.program_id(0)
    c = tl.program_id(1)
    num_c = tl.num_programs(1) - 1 if MODE == 2 else 0    # S, the probe programs
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, G_P)
    g_ok = offs_g < G
    heads = kh * G + offs_g
    if c == num_c:
        km = tl.load(kmax_ptr + kh).to(tl.float64)
        em = tl.load(emax_ptr + kh).to(tl.float64)
        lm = tl.load(lmax_ptr + kh).to(tl.float64)
        coef = 2.0 * (tl.load(const_ptr) * km
                      + tl.load(const_ptr + 1) * (2.0 * km + 3.0 * em + 3.0 * lm))
        coef = coef * tl.load(const_ptr + 2)
        for g in tl.static_range(G):
            q64 = tl.load(q_ptr + (kh * G + g) * stride_qh + offs_d).to(tl.float64)
            qn = tl.sqrt(tl.sum(q64 * q64, axis=0))
            tl.store(slack_ptr + kh * G + g, (qn * coef).to(tl.float32))
        tl.store(bad_ptr + kh, query_error(q_ptr, kh, stride_qh, max_abs, G, G_P, D))
        if MODE == 1:
            tl.store(tau_ptr + heads, tl.load(tau_in_ptr + heads, mask=g_ok), mask=g_ok)
    elif MODE == 2:
        n = load_scalar(n_ptr, n_value, ON_DEVICE)
        total = load_scalar(total_ptr, total_value, ON_DEVICE)
        total = tl.minimum(tl.maximum(total, 0), cap)
        n = tl.minimum(tl.maximum(n, 0), total)
        head = tl.minimum(total, SINKS)
        tail = tl.maximum(head, tl.minimum(total - RECENT, n))
        length = head + (total - tail)
        offs_b = tl.arange(0, BLOCK)
        k_base = k_ptr + kh.to(tl.int64) * stride_kh
        m = tl.full([G_P], float("-inf"), tl.float32)
        start = c * BLOCK
        while start < length:
            idx = start + offs_b
            ok = idx < length
            pos = tl.where(idx < head, idx, tail + (idx - head)).to(tl.int64)
            kt = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None],
                         other=0.0).to(tl.float32)
            for g in tl.static_range(G):
                qv = tl.load(q_ptr + (kh * G + g) * stride_qh + offs_d).to(tl.float32)
                mg = tl.max(tl.where(ok, tl.sum(kt * qv[None, :], axis=1), float("-inf")),
                            axis=0)
                m = tl.where(offs_g == g, tl.maximum(m, mg), m)
            start += num_c * BLOCK
        if num_c == 1:
            tl.store(tau_ptr + heads, m - tau_off, mask=g_ok)
        else:
            tl.store(ws_ptr + (kh * num_c + c) * G_P + offs_g, m)
            tl.debug_barrier()
            ticket = tl.atomic_add(counter_ptr + kh, 1, sem="acq_rel", scope="gpu")
            if ticket == num_c - 1:
                offs_c = tl.arange(0, 32)
                m_all = tl.full([G_P], float("-inf"), tl.float32)
                c0 = 0
                while c0 < num_c:
                    cs = c0 + offs_c
                    part = tl.load(ws_ptr + (kh * num_c + cs)[:, None] * G_P + offs_g[None, :],
                                   mask=(cs < num_c)[:, None], other=float("-inf"),
                                   cache_modifier=".cg")
                    m_all = tl.maximum(m_all, tl.max(part, axis=0))
                    c0 += 32
                tl.store(tau_ptr + heads, m_all - tau_off, mask=g_ok)
                tl.atomic_xchg(counter_ptr + kh, 0, sem="relaxed", scope="gpu")


def _policy_mode(policy: Policy) -> int:
    if isinstance(policy, Dense):
        return MODE_DENSE
    if isinstance(policy, Fixed):
        return MODE_FIXED
    if isinstance(policy, Relative):
        return MODE_RELATIVE
    raise ValueError(f"policy {policy!r} has no GPU step; use the reference path")


def _tau_offset(index: LouverIndex, policy: Policy) -> float:
    """log(1/eps) / scale as the float32 value torch's ``m_lo - offset`` subtracts."""
    if not isinstance(policy, Relative):
        return 0.0
    off = math.log(1.0 / policy.eps) / index.scale
    return float(torch.tensor(off, dtype=torch.float32))


def _prologue(index: LouverIndex, q: torch.Tensor, mode: int, tau_off: float,
              tau_in: torch.Tensor | None, tau: torch.Tensor, slack: torch.Tensor,
              slack_const: torch.Tensor,
              bad: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Launch the prologue (sizes from the index; no validation beyond the caller's).

    Relative: enough programs per KV head for one chunk of probe keys each when the buffer is
    full (sinks + max(recent, buffer) keys: the grid does not depend on the key count, so a
    captured step replays it as keys arrive); the kernel loops if there are more. Every mode:
    one more program per KV head for the slack and the check of q."""
    cfg = index.config
    hkv, d = index.num_kv_heads, index.head_dim
    keys = index._keys
    dummy = tau
    g = q.shape[0] // hkv
    g_p = next_pow2(g)
    chunks = _chunks(index, mode)
    ws = (torch.empty(hkv * chunks * g_p, dtype=torch.float32, device=q.device) if chunks > 1
          else dummy)
    # the step's first kernel: launched as usual (after whatever came before), it only lets
    # the filter launch early (see _launch.pdl_launch)
    pdl = bool(pdl_launch(q.device))
    _prologue_kernel[(hkv, chunks + 1)](
        q, keys, index._kmax, index._rmax, index._lmax, slack_const,
        tau_in if tau_in is not None else dummy,
        counts[0] if counts is not None else dummy, counts[1] if counts is not None else dummy,
        tau, slack, bad, ws, _COUNTERS.get(q.device, hkv),
        index.num_indexed, index.num_keys, keys.shape[1], tau_off,
        float(_max_query_abs()),
        q.stride(0), keys.stride(0), keys.stride(1),
        G=g, G_P=g_p, D=d, SINKS=cfg.sink_tokens, RECENT=cfg.probe_recent,
        BLOCK=_PROBE_BLOCK, MODE=mode, ON_DEVICE=counts is not None, PDL=pdl,
        num_warps=4, num_stages=1,
    )


def _chunks(index: LouverIndex, mode: int) -> int:
    """Probe programs per KV head: one per chunk of the longest probe (Relative), else 0."""
    cfg = index.config
    probe = cfg.sink_tokens + max(cfg.probe_recent, cfg.buffer_size)
    return triton.cdiv(probe, _PROBE_BLOCK) if mode == MODE_RELATIVE else 0


def probe_chunks(index: LouverIndex, policy: Policy) -> int:
    """Probe programs per KV head of the prologue for ``policy`` (how the probe is split; 0
    for the policies without a probe). The prologue has one more per KV head."""
    return _chunks(index, _policy_mode(policy))


def _max_query_abs() -> float:
    from louver_kernels.index import MAX_QUERY_ABS

    return MAX_QUERY_ABS


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


class _Scratch:
    """Per-index intermediates of the eager step (reused from step to step on one stream):
    slack, q flags, candidate lists and the certificate's terms. Sized by (Hq, capacity);
    ``lists=False`` (a Dense step, which runs no filter) leaves out the candidate lists."""

    def __init__(self, index: LouverIndex, hq: int, lists: bool = True) -> None:
        dev, hkv = index.device, index.num_kv_heads
        self.key = (hq, index._cap)
        self.slack = torch.empty(hq, device=dev)
        self.cand_pos = torch.empty(hkv, max(index._cap, 1) if lists else 1,
                                    dtype=torch.int32, device=dev)
        self.cand_count = torch.empty(hkv, dtype=torch.int32, device=dev)
        self.pruned_lse = torch.empty(hq, device=dev)
        self.below_lse = torch.empty(hq, device=dev)
        self.slack_const = torch.tensor(
            slack_constants(index.head_dim, index.head_dim // index.config.quant_group),
            dtype=torch.float64, device=dev)


def _scratch(index: LouverIndex, hq: int) -> _Scratch:
    s = index._step_scratch
    if s is None or s.key != (hq, index._cap):
        s = _Scratch(index, hq)
        index._step_scratch = s
    return s


def _run(index: LouverIndex, q: torch.Tensor, mode: int, tau_off: float,
         tau_in: torch.Tensor | None, sc: _Scratch, tau: torch.Tensor, bad: torch.Tensor,
         out: torch.Tensor, lse: torch.Tensor, num_att: torch.Tensor, dropped: torch.Tensor,
         num_cand: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor] | None,
         stages: int = 3, tuning: dict[str, dict[str, int]] | None = None) -> None:
    """The three launches of one step. counts None: host ints (grids sized to the indexed
    keys); counts (num_indexed, num_keys) device tensors: grids sized by the capacity, every
    bound read on the device (what CapturedStep records). ``stages`` < 3 runs only the first
    launches (profiling: the outputs of the others are then stale); ``tuning`` passes launch
    overrides to the kernels ({"filter": {...}, "attention": {...}, "dense": {...}}:
    num_splits, block_n, num_warps; maxnreg for the filter)."""
    tuning = tuning or {}
    cfg = index.config
    if mode == MODE_DENSE:
        # every key attended: no prologue, no filter; K and V streamed [0, buffer_end) on tensor
        # cores, and the merge launch writes the step's other outputs and checks q
        if stages >= 3:
            dense_attention(q, index._keys, index._values, scale=index.scale,
                            end=index.num_keys if counts is None else counts[1], out=out,
                            lse=lse, num_attended=num_att,
                            step_outputs=(tau, dropped, num_cand, bad),
                            max_query_abs=_max_query_abs(), **tuning.get("dense", {}))
        return
    if stages < 1:
        return
    _prologue(index, q, mode, tau_off, tau_in, tau, sc.slack, sc.slack_const, bad, counts)
    if stages < 2:
        return
    if counts is None:
        n, total = index.num_indexed, index.num_keys
        nseg = max(-(-n // cfg.buffer_size), 1)
        lo, step = index._lo[:, :nseg], index._step[:, :nseg]
        n_arg, bs, be = n, n, total
    else:
        lo, step = index._lo, index._step
        n_arg, bs, be = counts[0], counts[0], counts[1]
    quant_filter(
        q, index._codes, index._err, lo, step, sc.slack, tau, num_indexed=n_arg,
        bits=cfg.quant_bits, coarse_bits=cfg.quant_coarse_bits, group=cfg.quant_group,
        scale=index.scale, segment_size=cfg.buffer_size, cand_pos=sc.cand_pos,
        cand_count=sc.cand_count, pruned_lse=sc.pruned_lse,
        **{"early": True, **tuning.get("filter", {})})
    if stages < 3:
        return
    sparse_attention(
        q, index._keys, index._values, tau, scale=index.scale, cand_pos=sc.cand_pos,
        cand_count=sc.cand_count, buffer_start=bs, buffer_end=be, out=out, lse=lse,
        num_attended=num_att, below_lse=sc.below_lse, pruned_lse=sc.pruned_lse,
        dropped=dropped, num_candidates=num_cand, **tuning.get("attention", {}))


def attend(index: LouverIndex, q: torch.Tensor, policy: Policy) -> AttendOutput:
    """``index.attend(q, policy)`` through the Triton kernels (QUANT index, packed code records).

    Args:
        index: a QUANT LouverIndex with the Triton backend (packed code records).
        q: [Hq, D] query on the index's device (shape-checked; its values are checked on the
            device: AttendOutput.q_error).
        policy: Fixed, Relative or Dense.
    Returns:
        AttendOutput with fresh output tensors; q_error int32 [Hkv] is nonzero for the KV
        heads whose query heads hold NaN, Inf or entries above MAX_QUERY_ABS (the other
        outputs are then meaningless).
    """
    from louver_kernels.index import AttendOutput

    mode = _policy_mode(policy)
    hq = q.shape[0]
    dev = index.device
    tau_in = policy.taus(hq).to(dev) if isinstance(policy, Fixed) else None
    sc = _scratch(index, hq)
    tau = torch.empty(hq, device=dev)
    bad = torch.empty(index.num_kv_heads, dtype=torch.int32, device=dev)
    out = torch.empty(hq, index.value_dim, device=dev)
    lse = torch.empty(hq, device=dev)
    num_att = torch.empty(hq, dtype=torch.int64, device=dev)
    dropped = torch.empty(hq, device=dev)
    num_cand = torch.empty(hq, dtype=torch.int64, device=dev)
    _run(index, q, mode, _tau_offset(index, policy), tau_in, sc, tau, bad, out, lse, num_att,
         dropped, num_cand, None)
    return AttendOutput(output=out, lse=lse, tau=tau, num_candidates=num_cand,
                        num_attended=num_att, dropped_mass_bound=dropped, q_error=bad)


class _Faster:
    """Which of two step variants to run (0: the policy's sparse step, 1: the Dense step of the
    same index), from their measured times.

    Calls 0 and 1 of every ``probe_every`` run variant 0 and variant 1, timed; the other calls
    run the variant with the smaller estimate (variant 0 until both have one). An estimate is
    an exponential moving average (weight ``alpha`` for a new sample), so the choice follows
    the index as it grows and the candidate fraction as it drifts. Samples are callables that
    return the elapsed seconds, or None while the device has not finished (they are read at
    later calls, never waited for)."""

    def __init__(self, probe_every: int, alpha: float = 0.5) -> None:
        if probe_every < 3:
            raise ValueError(f"probe_every must be >= 3, got {probe_every}")
        self.probe_every = probe_every
        self.alpha = alpha
        self.estimate: list[float | None] = [None, None]
        self._calls = 0
        self._pending: deque[tuple[int, Callable[[], float | None]]] = deque()

    def pick(self) -> tuple[int, bool]:
        """(the variant to run, whether to time it)."""
        self._collect()
        phase = self._calls % self.probe_every
        self._calls += 1
        if phase < 2:
            return phase, True
        e0, e1 = self.estimate
        return (1 if e0 is not None and e1 is not None and e1 < e0 else 0), False

    def add(self, variant: int, sample: Callable[[], float | None]) -> None:
        self._pending.append((variant, sample))

    def _collect(self) -> None:
        while self._pending:
            variant, sample = self._pending[0]
            t = sample()
            if t is None:
                return
            self._pending.popleft()
            old = self.estimate[variant]
            self.estimate[variant] = t if old is None else old + self.alpha * (t - old)


def _clock(device: torch.device) -> Callable[[], Callable[[], float | None]]:
    """Start a timer of the work issued from now on: returns stop(), which returns the sample
    (CUDA events on ``device``'s current stream, where the step runs, read once complete;
    elsewhere the step runs synchronously and the host clock measures it)."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)

        def stop_cuda() -> Callable[[], float | None]:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            return lambda: start.elapsed_time(end) * 1e-3 if end.query() else None

        return stop_cuda
    t0 = time.perf_counter()

    def stop_host() -> Callable[[], float | None]:
        t = time.perf_counter() - t0
        return lambda: t

    return stop_host


FALLBACK_PROBE_EVERY = 64   # calls per timing round of a step with the dense fallback


class CapturedStep:
    """The decode step of one index under one policy, recorded once in a CUDA graph.

    ``step(q)`` copies q into the graph's static input ``step.q`` and replays the three
    launches of ``attend`` (prologue, filter, attention with the fused certificate), which read
    num_indexed and num_keys from the index's device counters (``LouverIndex.device_counters``,
    updated by every append and flush without synchronization). A step therefore costs one copy
    kernel and one graph launch on the host, whatever the number of keys. ``step(step.q)``
    skips the copy, for callers that write the query there themselves; a query on the host is
    copied straight into ``step.q`` (the service passes the request's query so). Either saves
    the device-to-device copy (~3 us of a step on an H200, benchmarks/bench_gpu.py).

    Re-capture: the graph holds the addresses of the index's storage and of this object's
    buffers. Appends and flushes write the storage and the running maxima the slack is computed
    from in place, so they need no re-capture; a capacity growth (``_grow``,
    amortized doubling: when num_keys passes a power of two >= 256) reallocates the storage,
    and the next call re-captures automatically (``stale`` tells beforehand; growth happens
    about log2(N / 256) times over a sequence). Changing the policy needs another
    CapturedStep, except for Fixed thresholds (a Fixed step takes new ones per call).

    Contracts: the outputs returned by a call are views of static buffers (this object's, or
    its dense step's with ``fallback``) and may be overwritten by the next call; q must have
    the shape and dtype given at construction; one replay at a time per object (its kernels
    share per-stream arrival counters that were allocated for its capture stream). q's values
    are not checked on the host: ``q_error`` of the output (int32 [Hkv], nonzero where a query
    head holds NaN, Inf or an entry above MAX_QUERY_ABS) can be checked lazily
    (``AttendOutput.raise_if_invalid``).

    Args:
        index: a LouverIndex with ``uses_triton``.
        policy: Fixed, Relative or Dense.
        num_q_heads: Hq (a multiple of Hkv); q_dtype: the dtype of the queries (default: the
            index's storage dtype).
        graph: record a CUDA graph (default: when the index is on a CUDA device). False runs
            the same launches eagerly at every call (the body of the graph; used on the CPU
            under Triton's interpreter and for debugging).
        stages, tuning: profiling only: record the first ``stages`` launches (0-3) of the
            step (outputs of the launches left out are stale); launch overrides per kernel
            ({"filter": {"num_splits": ...}, "attention": {...}}).
        q_buffer: the static input to read q from (shape [Hq, D], q_dtype, on the index's
            device; default: a new zero tensor): steps that share it read the same query (the
            dense fallback shares its step's).
        fallback: Relative policies only: also capture the Dense step of the index and run
            whichever of the two measured faster. Two calls of every FALLBACK_PROBE_EVERY
            are timed (one per variant; CUDA events, read at later calls without waiting);
            the others run the faster (see _Faster). The dense step attends every key, a
            superset of the policy's attended set (zero false negatives, dropped_mass_bound
            0, num_candidates = num_attended = every key, tau = -inf); it wins where the
            filter costs more than it saves: short contexts, high candidate fractions.
            ``last_dense`` tells which ran.
    """

    def __init__(self, index: LouverIndex, policy: Policy, num_q_heads: int,
                 q_dtype: torch.dtype | None = None, graph: bool | None = None,
                 stages: int = 3, tuning: dict[str, dict[str, int]] | None = None,
                 fallback: bool = False, q_buffer: torch.Tensor | None = None) -> None:
        if not index.uses_triton:
            raise ValueError("CapturedStep needs an index with backend='triton' (QUANT)")
        if num_q_heads < 1 or num_q_heads % index.num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} must be a positive multiple of "
                             f"Hkv={index.num_kv_heads}")
        if fallback and not isinstance(policy, Relative):
            raise ValueError(f"the dense fallback is for Relative policies, got {policy!r}")
        self.index = index
        self.policy = policy
        self.mode = _policy_mode(policy)
        self.tau_off = _tau_offset(index, policy)
        self.hq = num_q_heads
        self.q_dtype = q_dtype or index.dtype
        use_graph = index.device.type == "cuda" if graph is None else graph
        if use_graph and index.device.type != "cuda":
            raise ValueError("a CUDA graph needs an index on a CUDA device")
        self.use_graph = use_graph
        self.stages = stages
        self.tuning = tuning
        self.counts = index.device_counters()
        dev, hq = index.device, num_q_heads
        if q_buffer is None:
            q_buffer = torch.zeros(hq, index.head_dim, dtype=self.q_dtype, device=dev)
        elif (not isinstance(q_buffer, torch.Tensor)
              or tuple(q_buffer.shape) != (hq, index.head_dim)
              or q_buffer.dtype != self.q_dtype or q_buffer.device != dev):
            raise ValueError(f"q_buffer must be {self.q_dtype} [{hq}, {index.head_dim}] on "
                             f"{dev}")
        self.q = q_buffer
        self.tau_in = policy.taus(hq).to(dev) if isinstance(policy, Fixed) else None
        self.tau = torch.empty(hq, device=dev)
        self.bad = torch.zeros(index.num_kv_heads, dtype=torch.int32, device=dev)
        self.out = torch.empty(hq, index.value_dim, device=dev)
        self.lse = torch.empty(hq, device=dev)
        self.num_att = torch.empty(hq, dtype=torch.int64, device=dev)
        self.dropped = torch.empty(hq, device=dev)
        self.num_cand = torch.empty(hq, dtype=torch.int64, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._cap = -1
        self._sc: _Scratch | None = None
        self._faster = _Faster(FALLBACK_PROBE_EVERY) if fallback else None
        self._dense: CapturedStep | None = None
        self.last_dense = False
        self._capture()

    @property
    def scratch_bytes(self) -> int:
        """Bytes of device memory this step holds besides the index (its buffers; the
        candidate list, int32 [Hkv, capacity] except in a Dense step, dominates)."""
        own = (self.q, self.tau, self.bad, self.out, self.lse, self.num_att, self.dropped,
               self.num_cand)
        sc = self._sc
        held = () if sc is None else (sc.slack, sc.cand_pos, sc.cand_count, sc.pruned_lse,
                                      sc.below_lse, sc.slack_const)
        dense = 0 if self._dense is None else self._dense.scratch_bytes
        return sum(t.numel() * t.element_size() for t in (*own, *held)) + dense

    @property
    def stale(self) -> bool:
        """Whether the index's storage was reallocated since the capture (the next call
        re-captures)."""
        return self._cap != self.index._cap

    def _body(self) -> None:
        assert self._sc is not None
        _run(self.index, self.q, self.mode, self.tau_off, self.tau_in, self._sc, self.tau,
             self.bad, self.out, self.lse, self.num_att, self.dropped, self.num_cand,
             self.counts, self.stages, self.tuning)

    def _capture(self) -> None:
        index = self.index
        self._cap = index._cap
        # own buffers: the graph keeps their addresses
        self._sc = _Scratch(index, self.hq, lists=self.mode != MODE_DENSE)
        self.graph = None
        if not self.use_graph:
            return
        self.graph = capture_graph(index.device, self._body, warmups=2)

    def __call__(self, q: torch.Tensor, policy: Fixed | None = None) -> AttendOutput:
        """One decode step: q [Hq, D] of the construction's dtype, on the index's device or
        on the host (copied straight into ``step.q``: a query that arrives on the host needs
        no device copy besides), or ``step.q`` itself (no copy).

        A step built for a Fixed policy takes another Fixed policy per call: its thresholds
        replace the previous ones in the graph's input (one more small copy), for this call
        and the later ones; one graph serves every threshold."""
        if tuple(q.shape) != tuple(self.q.shape) or q.dtype != self.q.dtype:
            raise ValueError(f"q must be {self.q.dtype} {list(self.q.shape)}, got {q.dtype} "
                             f"{list(q.shape)}")
        self.index._await_flush()
        if policy is not None:
            if self.tau_in is None or not isinstance(policy, Fixed):
                raise ValueError("only a step built for a Fixed policy takes a Fixed policy "
                                 "per call")
            # checks the count (Fixed checked the values); the graph reads tau_in at replay
            self.tau_in.copy_(policy.taus(self.hq))
            self.policy = policy
        out = self._step(q)
        self.index._after_step()
        return out

    def _step(self, q: torch.Tensor) -> AttendOutput:
        """The replay of this step, or with the fallback the faster of it and the Dense one."""
        if self._faster is None:
            return self._replay(q)
        variant, timed = self._faster.pick()
        if variant == 1 and self._dense is None:
            self._dense = CapturedStep(self.index, Dense(), self.hq, q_dtype=self.q_dtype,
                                       graph=self.use_graph, stages=self.stages,
                                       tuning=self.tuning, q_buffer=self.q)
        step = self if variant == 0 else self._dense
        assert step is not None
        self.last_dense = variant == 1
        if not timed:
            return step._replay(q)
        if step.stale:
            step._capture()                  # not part of the step's time
        stop = _clock(self.index.device)
        out = step._replay(q)
        self._faster.add(variant, stop())
        return out

    def _replay(self, q: torch.Tensor) -> AttendOutput:
        from louver_kernels.index import AttendOutput

        if self.stale:
            self._capture()
        if q is not self.q:
            self.q.copy_(q)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        return AttendOutput(output=self.out, lse=self.lse, tau=self.tau,
                            num_candidates=self.num_cand, num_attended=self.num_att,
                            dropped_mass_bound=self.dropped, q_error=self.bad)


__all__ = ["SUPPORTED", "CapturedStep", "attend", "probe_chunks", "probe_max", "slack_coef",
           "slack_constants"]
