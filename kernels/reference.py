"""Plain-torch implementations: the ground truth for every kernel, and the CPU backend.

Every function here works on CPU and CUDA tensors, uses no Python loop per key or per cluster,
and computes in float32 (or float64 where it says so). GPU kernels in ``louver_kernels.triton``
must match these functions.

Soundness of the bounds in floating point
-----------------------------------------
The contract is: every key n with fl32(q.k_n) >= tau is returned, where fl32(q.k_n) is the score
computed in float32 from the stored key (any summation order, as any attention kernel may use).

Let u = 2^-24 (float32 unit roundoff) and gamma_m = m u / (1 - m u). For vectors of length m, any
float32 summation order gives |fl(x.y) - x.y| <= gamma_m sum_i |x_i y_i| (Higham, Thm 3.1).

A bound kind computes, in float32, B(k) = fl(sum of terms) where the exact real sum T(k) of the
terms satisfies T(k) >= q.k (proven per kind below). Then

    fl32(q.k) <= q.k + gamma_D |q|.|k|  <= T(k) + gamma_D ||q|| ||k||
    T(k)      <= B(k) + gamma_m sum |terms|

so UB(k) = B(k) + slack with slack >= gamma_D ||q|| ||k|| + gamma_m sum|terms| is a sound bound
of the float32 score. We use per head the scalars Kmax >= max_n ||k_n|| (rounded up) and bound
sum|terms| by a per-kind quantity written next to each kind; the slack is then a per-head
constant, multiplied by 2 for the rounding of the slack computation itself (all quantities are
tiny compared to score gaps, so this costs no pruning). Stored float quantities that enter the
bound (centers, scales) are used *as stored*: the radii / residual norms are computed against
the stored, rounded values and rounded up when stored.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24


def gamma(m: int) -> float:
    """gamma_m = m u / (1 - m u) for float32 (see the module docstring)."""
    return m * U32 / (1.0 - m * U32)


def round_up_f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 rounded toward +inf (so the stored value is >= x). x must be >= 0."""
    h = x.to(torch.float16)
    below = h.float() < x
    return torch.where(below, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded toward +inf."""
    f = x.to(torch.float32)
    below = f.double() < x
    return torch.where(below, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def expand_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat a per-KV-head tensor [Hkv, ...] to per-query-head [Hq, ...] (GQA: h -> h // G)."""
    group = num_q_heads // x.shape[0]
    return x.repeat_interleave(group, dim=0)


def scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exact float32 scores q.k for every key.

    Args:
        q: [Hq, D] any float dtype.
        keys: [Hkv, N, D] any float dtype; Hq is a multiple of Hkv.
    Returns:
        float32 [Hq, N].
    """
    hq, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    qf = q.float().reshape(hkv, g, d)
    return torch.bmm(qf, keys.float().transpose(1, 2)).reshape(hq, n)


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     attend: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a subset of keys, per query head, in float32.

    Args:
        q: [Hq, D]; keys: [Hkv, N, D]; values: [Hkv, N, Dv]; any float dtypes.
        attend: bool [Hq, N], the keys each query head attends.
        scale: softmax scale (usually 1/sqrt(D)).
    Returns:
        output float32 [Hq, Dv] (zeros for a head that attends nothing) and
        lse float32 [Hq] = logsumexp(scale * q.k) over the attended keys (-inf if none).
    """
    hq = q.shape[0]
    hkv, n, dv = values.shape
    s = scores(q, keys) * scale
    s = s.masked_fill(~attend, -math.inf)
    lse = torch.logsumexp(s, dim=-1) if n else torch.full((hq,), -math.inf, device=q.device)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[:, None]).masked_fill(~attend, 0.0)
    g = hq // hkv
    out = torch.bmm(p.reshape(hkv, g, n), values.float()).reshape(hq, dv)
    return out, lse


# ----------------------------------------------------------------------------------------------
# BALLS: per subspace, balanced clusters with a center and a radius (the original algorithm).
#
# Bound: for subspace s with slice q_s and the key's cluster a_s(k), center mu, radius r >=
# ||k_s - mu|| (computed against the stored float32 center, in float64, rounded up):
#   q_s.k_s = q_s.mu + q_s.(k_s - mu) <= q_s.mu + ||q_s|| r        (Cauchy-Schwarz)
# Terms: q_s.mu and ||q_s|| r per subspace; sum|terms| <= sum_s ||q_s|| (||mu|| + r)
#   <= sqrt(S) ||q|| (Kmax + 2 Rmax)   since ||mu|| <= ||k_s|| + r for any member.
# The products q_s.mu (D/S terms each) and ||q_s|| (D/S terms, sqrt) are themselves rounded:
# we account with m = D + 4 S in gamma_m, which covers every float32 operation on the path.
# ----------------------------------------------------------------------------------------------


def balanced_clusters(x: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Cluster ids from a balanced split tree, for a batch of point sets.

    Recursively splits every group at the median of its widest coordinate until groups hold at
    most ``cluster_size`` points. Vectorized over groups and batch (no per-cluster loop).

    Args:
        x: float [B, N, d] points (B independent sets, e.g. (head, subspace) pairs).
        cluster_size: target points per cluster (>= 1).
    Returns:
        int64 [B, N] cluster ids in [0, C) with C = number of clusters per set; every id in
        range has at least one member, and ids are the same for every set of the batch.
    """
    b, n, d = x.shape
    device = x.device
    group = torch.zeros(b, n, dtype=torch.long, device=device)
    if n == 0:
        return group
    levels = max(0, math.ceil(math.log2(max(n / cluster_size, 1.0))))
    xf = x.float()
    batch_off = (torch.arange(b, device=device) * (1 << levels))[:, None]
    for level in range(levels):
        ngroups = 1 << level
        gid = (group + batch_off // (1 << (levels - level))).reshape(-1)  # global group id
        total = b * ngroups
        flat = xf.reshape(-1, d)
        lo = torch.full((total, d), math.inf, device=device).scatter_reduce(
            0, gid[:, None].expand(-1, d), flat, "amin")
        hi = torch.full((total, d), -math.inf, device=device).scatter_reduce(
            0, gid[:, None].expand(-1, d), flat, "amax")
        widest = (hi - lo).argmax(dim=1)  # [total]
        coord = flat.gather(1, widest[gid][:, None]).squeeze(1)
        # rank of each point within its group along the widest coordinate
        order = torch.argsort(coord, stable=True)
        order = order[torch.argsort(gid[order], stable=True)]
        counts = torch.bincount(gid, minlength=total)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(gid)
        rank[order] = torch.arange(gid.numel(), device=device) - starts[gid[order]]
        upper = (rank >= (counts[gid] + 1) // 2).long()
        group = (group * 2 + upper.reshape(b, n))
    return group


def balls_fit(keys_sub: torch.Tensor, ids: torch.Tensor, num_clusters: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centers and sound radii for given cluster assignments.

    Args:
        keys_sub: float [B, N, d] points; ids: int64 [B, N] in [0, num_clusters).
    Returns:
        centers float32 [B, C, d] (the mean of the members; empty clusters get 0) and
        radii float32 [B, C] >= max over members of ||x - center|| computed in float64 against
        the stored float32 center, rounded up to float32.
    """
    b, n, d = keys_sub.shape
    xd = keys_sub.double()
    sums = torch.zeros(b, num_clusters, d, dtype=torch.float64, device=xd.device)
    sums.scatter_add_(1, ids[..., None].expand(-1, -1, d), xd)
    cnt = torch.zeros(b, num_clusters, dtype=torch.float64, device=xd.device)
    cnt.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    centers = (sums / cnt.clamp_min(1.0)[..., None]).float()
    dist = (xd - centers.double().gather(1, ids[..., None].expand(-1, -1, d))).norm(dim=-1)
    rad = torch.zeros(b, num_clusters, dtype=torch.float64, device=xd.device)
    rad.scatter_reduce_(1, ids, dist, "amax")
    return centers, round_up_f32(rad)


def balls_bound(q: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
    """Upper bounds of q.k (before slack) from subspace clusters.

    Args:
        q: [Hq, D]; centers: float32 [Hkv, S, C, D/S]; radii: float32 [Hkv, S, C];
        ids: int [Hkv, N, S] cluster of each key in each subspace.
    Returns:
        float32 [Hq, N]: sum_s q_s.mu_{s,a_s(k)} + ||q_s|| r_{s,a_s(k)}.
    """
    hq, d = q.shape
    hkv, s_, c, ds = centers.shape
    n = ids.shape[1]
    g = hq // hkv
    qs = q.float().reshape(hkv, g, s_, ds)
    qn = qs.norm(dim=-1)  # [Hkv, G, S]
    # per (kv head, q head, subspace, cluster): q_s.mu + ||q_s|| r
    table = torch.einsum("hgsd,hscd->hgsc", qs, centers) + qn[..., None] * radii[:, None]
    idx = ids.long().permute(0, 2, 1)  # [Hkv, S, N]
    gathered = table.gather(3, idx[:, None].expand(-1, g, -1, -1))  # [Hkv, G, S, N]
    return gathered.sum(dim=2).reshape(hq, n)


def balls_slack(q: torch.Tensor, kmax: torch.Tensor, rmax: torch.Tensor, num_subspaces: int
                ) -> torch.Tensor:
    """Per-query-head slack [Hq] that makes balls_bound sound for float32 scores.

    kmax, rmax: float32 [Hkv] upper bounds of key norms and of radii.
    """
    hq, d = q.shape
    qn = q.float().double().norm(dim=-1)
    km = expand_heads(kmax.double(), hq)
    rm = expand_heads(rmax.double(), hq)
    m = d + 4 * num_subspaces
    total = gamma(d) * qn * km + gamma(m) * math.sqrt(num_subspaces) * qn * (km + 2 * rm)
    return (2.0 * total).float()


# ----------------------------------------------------------------------------------------------
# QUANT: keys are indexed in aligned segments of B keys (B = the buffer size). Per (KV head,
# segment, channel) an affine code k^_d = lo_d + step_d c_d, c_d in [0, 2^b - 1], fitted on the
# segment's own keys (so ranges follow RoPE's drift over positions and growth needs no
# re-quantization); stored on the GPU as one record per key of two packed fields (pack_codes:
# the top bits of every channel, then the low bits) or one byte per code on the CPU. Per key and
# group of channels: the exact residual norm
# e_g >= ||k_g - k^_g||, computed in float64 against the exact real value lo + step c, rounded up
# to float16.
#
# Full bound: q.k = q.k^ + q.(k - k^) <= q.k^ + sum_g ||q_g|| e_g       (Cauchy-Schwarz per group)
# with q.k^ = sum_d q_d step_d c_d + sum_d q_d lo_d.
#
# Coarse bound from the top p bits only (what a first kernel pass reads): with
# c = 2^(b-p) t + u, u in [0, 2^(b-p) - 1], let M = (2^(b-p) - 1) / 2 and k1 = lo + step (2^(b-p) t
# + M). Then |k^_d - k1_d| <= step_d M, so
#   q.k <= q.k1 + sum_d |q_d| step_d M + sum_g ||q_g|| e_g     (>= the full bound, term by term).
#
# The dot with the codes is exact integer arithmetic (what the GPU kernel computes on int8
# tensor cores): quant_query_int turns fl(q_d step_d) into sigma qi_d >= fl(q_d step_d) (sigma a
# power of two, |qi_d| <= 2^14); since c_d >= 0, sigma sum_d qi_d c_d >= sum_d fl(q_d step_d) c_d,
# the integer sum is exact, and it is rounded to float32 once. The coarse dot uses the same
# qi with sigma 2^(b-p) and t for c. So the dot costs one rounding of fl(q_d step_d) per term and
# one of the sum, and its excess over sum_d fl(q_d step_d) c_d is positive (sound) and at most
# sigma sum_d c_d <= 2^-13 max_d |fl(q_d step_d)| D (2^b - 1).
#
# Rounding: in any summation order, every term of the bounds passes through at most 2D + G + 8
# rounded operations (its factors, the sums of the per-segment constants, the final sum). The
# term magnitudes sum to at most ||q|| (2 Kmax + 3 Emax + 3 Lmax) for the reference's terms
# (||step c|| <= ||k|| + ||e|| + ||lo||, ||step (2^(b-p) - 1)|| <= ||step c_max|| <= Kmax + Emax +
# 2 Lmax for a range fitted on the keys, Lmax >= ||lo|| over segments), plus the dot's excess
# <= 2^-13 D max_d |q_d step_d| c_max <= 2^-13 D ||q|| (Kmax + Emax + 2 Lmax): at most
# (1 + D 2^-13) <= 1.07 times that bound for D <= 512. gamma_m with m = 3D + 2G + 8 >=
# 1.07 (2D + G + 8) covers it (gamma_a c <= gamma_(c a) for c >= 1).
# ----------------------------------------------------------------------------------------------


def quant_fit_range(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, segment, channel) quantization range.

    Args:
        keys: [Hkv, S, B, D] (segments of B >= 1 keys).
    Returns:
        lo float32 [Hkv, S, D] and step float32 [Hkv, S, D] (> 0).
    """
    kf = keys.float()
    lo = kf.amin(dim=2)
    hi = kf.amax(dim=2)
    levels = (1 << bits) - 1
    step = ((hi - lo) / levels).clamp_min(1e-8)
    return lo, step


def code_fields(bits: int, coarse: int) -> tuple[int, int]:
    """(coarse, fine) field widths of the GPU code layout; each must divide 8 (fine may be 0)
    and codes must fit int8 (bits <= 7) for the kernels' integer dot."""
    fine = bits - coarse
    if coarse not in (1, 2, 4) or fine not in (0, 1, 2, 4) or bits > 7:
        raise ValueError(f"the GPU code layout needs coarse bits in {{1, 2, 4}}, the other "
                         f"bits in {{0, 1, 2, 4}} and at most 7 bits; got bits={bits}, "
                         f"coarse={coarse}")
    return coarse, fine


def _pack_field(values: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [..., D] (< 2^width) -> uint8 [..., D * width / 8]: byte i holds channels
    (8 / width) i + j at bits width j."""
    *lead, d = values.shape
    per = 8 // width
    shifts = width * torch.arange(per, device=values.device, dtype=torch.int32)
    return (values.reshape(*lead, d // per, per) << shifts).sum(-1).to(torch.uint8)


def _unpack_field(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of _pack_field: uint8 [..., B] -> int32 [..., B * 8 / width]."""
    per = 8 // width
    shifts = width * torch.arange(per, device=packed.device, dtype=torch.int32)
    v = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_codes(codes: torch.Tensor, bits: int, coarse: int) -> torch.Tensor:
    """The GPU code layout: uint8 [..., D] codes (< 2^bits) -> uint8 [..., D * bits / 8], one
    record per key: the coarse field (the top ``coarse`` bits of every channel, c >> fine),
    then the fine field (the low ``fine`` bits); see _pack_field for the bytes of a field."""
    cb, fb = code_fields(bits, coarse)
    c = codes.to(torch.int32)
    parts = [_pack_field(c >> fb, cb)]
    if fb:
        parts.append(_pack_field(c & ((1 << fb) - 1), fb))
    return torch.cat(parts, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, coarse: int, top: int | None = None
                 ) -> torch.Tensor:
    """Codes from pack_codes' layout -> int32 [..., D]; ``top`` = coarse: the coarse field only
    (c >> (bits - coarse))."""
    cb, fb = code_fields(bits, coarse)
    d = packed.shape[-1] * 8 // bits
    hi = _unpack_field(packed[..., : d * cb // 8], cb)
    if top is not None:
        if top != coarse:
            raise ValueError(f"top must be None or coarse={coarse}, got {top}")
        return hi
    if not fb:
        return hi
    return (hi << fb) | _unpack_field(packed[..., d * cb // 8:], fb)


def quant_query_int(qstep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer query of the exact dot: qstep float32 [..., D] (= fl(q_d step_d)) ->
    (qi int32 [..., D], sigma float32 [...]) with sigma a power of two, |qi_d| <= 2^14 and
    sigma qi_d >= qstep_d exactly (the codes are >= 0, so sum_d sigma qi_d c_d >=
    sum_d qstep_d c_d).

    sigma = 2^(E - 140) for the biased exponent E of max_d |qstep_d| (so max |qstep_d| / sigma
    < 2^14; sigma >= 2^-126), qi = ceil(qstep / sigma): the scaling by the power of two 1/sigma
    is exact except for results in float32's subnormal range (|x| < 2^-126, i.e. qi in {0, 1}),
    where qi is raised to 1 for every qstep_d > 0 so that rounding never loses the bound.
    """
    amax = qstep.abs().amax(dim=-1)
    e = ((amax.view(torch.int32) >> 23) - 13).clamp_min(1)            # biased exponent of sigma
    sigma = (e << 23).view(torch.float32)
    inv = ((254 - e) << 23).view(torch.float32)                        # 1 / sigma, exactly
    qi = torch.ceil(qstep * inv[..., None]).to(torch.int32)
    qi = torch.where(qstep > 0, qi.clamp_min(1), qi)
    return qi, sigma


def quant_encode(keys: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
                 group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and rounded-up residual norms of segmented keys.

    Args:
        keys: [Hkv, S, B, D]; lo, step: float32 [Hkv, S, D]; group divides D.
    Returns:
        codes uint8 [Hkv, S, B, D] (< 2^bits; see pack_codes for the GPU layout) and err
        float16 [Hkv, S, B, D/group] >= ||k_g - (lo + step c)_g||. Keys outside the range get
        clamped codes; their residual norm absorbs the difference, so the bound stays sound.
    """
    *lead, d = keys.shape
    levels = (1 << bits) - 1
    codes = torch.round((keys.float() - lo[:, :, None]) / step[:, :, None]).clamp(0, levels)
    deq = lo.double()[:, :, None] + step.double()[:, :, None] * codes.double()  # exact
    resid = (keys.double() - deq).reshape(*lead, d // group, group).norm(dim=-1)
    return codes.to(torch.uint8), round_up_f16(round_up_f32(resid))


def quant_bound(q: torch.Tensor, codes: torch.Tensor, err: torch.Tensor, lo: torch.Tensor,
                step: torch.Tensor, bits: int, top: int | None = None) -> torch.Tensor:
    """Upper bounds of q.k (before slack) from quantized keys.

    Args:
        q: [Hq, D]; codes: uint8 [Hkv, S*B, D] full codes of S whole segments of B keys;
        err: float16 [Hkv, S*B, G]; lo, step: float32 [Hkv, S, D] per segment;
        top: code bits read (None: all = the full bound; p < bits: the coarse bound of the
        module comment, from codes >> (bits - p)).
    Returns:
        float32 [Hq, S*B].
    """
    hq, d = q.shape
    hkv, n, ng = err.shape
    nseg = lo.shape[1]
    if nseg == 0:
        return torch.empty(hq, 0, device=q.device)
    seg = n // nseg
    g = hq // hkv
    p = bits if top is None else top
    shift = 1 << (bits - p)
    half = (shift - 1) / 2.0
    qf = q.float().reshape(hkv, g, d)
    qi, sigma = quant_query_int(qf[:, :, None] * step[:, None])         # [Hkv, G, S, D]
    base = (qf[:, :, None] * (lo + step * half)[:, None]).sum(-1)         # [Hkv, G, S]
    box = (qf[:, :, None].abs() * step[:, None]).sum(-1) * half           # [Hkv, G, S]
    c = codes if p == bits else codes >> (bits - p)
    c = c.reshape(hkv, nseg, seg, d).double()
    # exact integer dot (float64 holds it: |qi c| <= 2^21, D terms), rounded once to float32
    dot = torch.einsum("hgsd,hsnd->hgsn", qi.double(), c).float()       # [Hkv, G, S, B]
    dot = dot * (sigma * shift)[..., None] + (base + box)[..., None]
    qn = qf.reshape(hkv, g, ng, d // ng).norm(dim=-1)                     # [Hkv, G, Gr]
    corr = torch.bmm(qn, err.float().transpose(1, 2))                     # [Hkv, G, N]
    return (dot.reshape(hkv, g, n) + corr).reshape(hq, n)


def quant_slack(q: torch.Tensor, kmax: torch.Tensor, emax: torch.Tensor, lmax: torch.Tensor,
                groups: int) -> torch.Tensor:
    """Per-query-head slack [Hq] that makes quant_bound (full or coarse) sound for float32
    scores.

    kmax, emax, lmax: float32 [Hkv] upper bounds of key norms, of residual norms (over groups:
    ||e_n||_2) and of the segments' offset norms ||lo||.
    """
    hq, d = q.shape
    qn = q.float().double().norm(dim=-1)
    km = expand_heads(kmax.double(), hq)
    em = expand_heads(emax.double(), hq)
    lm = expand_heads(lmax.double(), hq)
    m = 3 * d + 2 * groups + 8
    total = gamma(d) * qn * km + gamma(m) * qn * (2 * km + 3 * em + 3 * lm)
    return (2.0 * total).float()


def key_norm_max(keys: torch.Tensor) -> torch.Tensor:
    """float32 [Hkv] >= max_n ||k_n|| (computed in float64, rounded up); 0 for no keys."""
    if keys.shape[1] == 0:
        return torch.zeros(keys.shape[0], device=keys.device)
    return round_up_f32(keys.double().norm(dim=-1).amax(dim=1))
