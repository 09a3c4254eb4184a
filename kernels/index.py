"""LouverIndex: the KV cache of one layer with a sound index over its keys.

Layout (per layer, per KV head, contiguous, growing by amortized doubling):

    keys    [Hkv, cap, D]   stored dtype (float16, bfloat16 or float32)
    values  [Hkv, cap, Dv]
    positions [0, num_indexed) are in the index; [num_indexed, num_keys) are the recent buffer,
    which is always attended exactly. A build indexes the whole prefill; when the buffer holds
    B = ``buffer_size`` keys, they are encoded (clustered or quantized, locally) and appended to
    the index records. QUANT keeps one quantization range per segment [jB, (j+1)B) of positions;
    the last segment may be partial and is re-encoded when a flush fills it.

Index records per kind (fixed width per key, so a GPU kernel reads them coalesced):

    BALLS  ids     int32 [Hkv, cap, S]          cluster of the key in each subspace
           centers float32 [Hkv, S, Ccap, D/S]  radii float32 [Hkv, S, Ccap]
    QUANT  codes   uint8 [Hkv, cap, D]          one code per channel (torch backend), or
           codes   uint8 [Hkv, cap, D*bits/8]   packed records (Triton backend,
                                                reference.pack_codes: the top bits of every
                                                channel, then the low bits; a first kernel
                                                pass reads the top field)
           err     float16 [Hkv, cap, D/group]  residual norm per group, rounded up
           lo, step float32 [Hkv, cap/B, D]     per segment and channel affine range

Attention semantics (every backend): query head h attends the buffer and every indexed key
whose exact float32 score reaches tau_h. The output therefore does not depend on how tight the
bound is; the bound only decides how many exact scores are computed (the candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from louver_kernels import reference as ref
from louver_kernels.config import IndexConfig, IndexKind
from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK, mass_tau

if TYPE_CHECKING:
    from louver_kernels.triton.encode import CapturedFlush

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Keys must keep float32 scores finite: |k_i| <= 2^64 keeps q.k far below float32's max for any
# query accepted here (|q_i| <= 2^48, D <= 2^12). Public: callers validate requests with them.
MAX_KEY_ABS = 2.0 ** 64
MAX_QUERY_ABS = 2.0 ** 48
_MIN_CAPACITY = 256
_ALIGN = 256   # bytes: the alignment of every storage tensor in its allocation


@dataclass
class AttendOutput:
    """Result of :meth:`LouverIndex.attend` for one query token.

    Attributes:
        output: float32 [Hq, Dv], softmax(scale * q.k) over the attended keys, times V.
        lse: float32 [Hq], logsumexp(scale * q.k) over the attended keys (-inf if none).
        tau: float32 [Hq], the threshold used (raw score; -inf for Dense).
        num_candidates: int64 [Hq], keys whose exact score was computed for the head: the
            indexed keys whose bound reached tau for any query head of its GQA group, plus
            the buffer.
        num_attended: int64 [Hq], keys in the softmax (score >= tau, plus the buffer).
        dropped_mass_bound: float32 [Hq], an upper bound of the probability mass that the
            skipped keys would have had in a dense softmax over all keys.
        q_error: Triton step only: int32 [Hkv] device flags, nonzero where a query head of the
            KV head's group held NaN, Inf or an entry above MAX_QUERY_ABS (the other fields
            are then meaningless); None on the reference path. Only meaningful when q was not
            validated on the host (``attend(..., validate=False)``, ``CapturedStep``): check it
            lazily with :meth:`raise_if_invalid`.
    """

    output: torch.Tensor
    lse: torch.Tensor
    tau: torch.Tensor
    num_candidates: torch.Tensor
    num_attended: torch.Tensor
    dropped_mass_bound: torch.Tensor
    q_error: torch.Tensor | None = None

    def raise_if_invalid(self) -> None:
        """Raise ValueError if the device-side query check failed (synchronizes)."""
        if self.q_error is not None and bool(self.q_error.any()):
            raise ValueError(f"q contains NaN, Inf or entries above {MAX_QUERY_ABS:g} in "
                             "magnitude")


class SearchResult:
    """Candidate positions per query head (a superset of {n : q_h.k_n >= tau_h}).

    Args:
        mask: bool [Hq, N]: candidate keys (the buffer included).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def candidates(self, h: int) -> torch.Tensor:
        """int64 [C_h] sorted absolute positions of query head h's candidates."""
        return torch.nonzero(self.mask[h], as_tuple=False).reshape(-1)

    @property
    def num_candidates(self) -> torch.Tensor:
        """int64 [Hq] candidates per query head."""
        return self.mask.sum(dim=1)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


class LouverIndex:
    """The KV cache of one layer with a sound index over its keys (see the module docstring).

    Build with :meth:`build`; the constructor is internal.
    """

    # the storage (see _allocate): views of one allocation, replaced when the capacity grows
    _keys: torch.Tensor
    _values: torch.Tensor
    _ids: torch.Tensor       # BALLS
    _codes: torch.Tensor     # QUANT
    _err: torch.Tensor
    _lo: torch.Tensor
    _step: torch.Tensor

    def __init__(self, num_kv_heads: int, head_dim: int, value_dim: int, dtype: torch.dtype,
                 device: torch.device, config: IndexConfig, capacity: int = 0) -> None:
        config.validate_dims(head_dim)
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_dim = value_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.scale = config.scale_for(head_dim)
        self.num_keys = 0
        self.num_indexed = 0
        self.num_flushes = 0
        # whether attend() runs the Triton kernels (and the records take their layout)
        self.uses_triton = self._resolve_triton(config, head_dim, self.device)
        # storage for ``capacity`` keys (a build's prefill: allocated once)
        self._cap = self._capacity_for(capacity, config)
        for name, t in self._allocate(self._cap).items():
            setattr(self, name, t)
        # per-head bounds used by the slack (running maxima over indexed keys): kmax, the
        # radius / residual norm, and QUANT's range norm (one allocation)
        self._kmax, self._rmax, self._lmax = torch.zeros(3, num_kv_heads,
                                                         device=self.device).unbind(0)
        # Triton step: lazily created device counters (num_indexed, num_keys) for captured
        # steps, and the eager step's scratch
        self._counters: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step_scratch: object | None = None
        # Triton backend: the decode-time flush (triton.encode.CapturedFlush, a CUDA graph on
        # CUDA) over the current storage, dropped when the storage is reallocated; whether an
        # append filled the buffer and the flush waits for the next step (_after_step)
        self._flush: CapturedFlush | None = None
        self._flush_due = False
        self._unpublished: int | None = None   # see _after_step
        if config.kind is IndexKind.BALLS:
            s = config.num_subspaces
            h = num_kv_heads
            self._centers = torch.empty(h, s, 0, head_dim // s, device=self.device)
            self._radii = torch.empty(h, s, 0, device=self.device)
            self._num_clusters = 0

    @staticmethod
    def _resolve_triton(config: IndexConfig, head_dim: int, device: torch.device) -> bool:
        """``uses_triton``: whether the index keeps the Triton kernels' record layout and its
        Fixed / Relative / Dense steps run them (IndexConfig.backend; "auto": on a CUDA GPU of
        compute capability >= 9.0, where they are tested, for a configuration they
        implement)."""
        if config.backend == "auto":
            return (device.type == "cuda" and config.triton_supports(head_dim)
                    and torch.cuda.get_device_capability(device) >= (9, 0))
        return config.kind is IndexKind.QUANT and config.backend == "triton"

    # ------------------------------------------------------------------ construction / growth

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor,
              config: IndexConfig | None = None) -> LouverIndex:
        """Index a prefill.

        Args:
            keys: [Hkv, N, D] float16/bfloat16/float32 (N may be 0); the storage dtype and
                device of the index are those of ``keys``.
            values: [Hkv, N, Dv] (cast to the keys' dtype).
            config: index parameters (defaults: IndexConfig()).

        Raises:
            ValueError: on a bad shape or dtype, or keys / values that are not finite or keys
                above MAX_KEY_ABS (after conversion to the storage dtype).
        """
        _check_float("keys", keys)
        _check_float("values", values)
        if keys.dim() != 3 or values.dim() != 3:
            raise ValueError(f"keys and values must be 3-D [Hkv, N, D]; got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        hkv, _, d = keys.shape
        if hkv < 1 or d < 1 or values.shape[2] < 1:
            raise ValueError("keys/values need at least one head and one dimension")
        index = cls(hkv, d, values.shape[2], keys.dtype, keys.device, config or IndexConfig(),
                    capacity=keys.shape[1])
        k, v = index._convert_kv(keys, values)
        index._store(k, v)
        index._index_pending()
        # the value check comes last: its reduction queues behind the encoding, and its one
        # synchronization waits for both (a failed build discards the index, so nothing needs
        # the check earlier)
        index._raise_if_invalid(index._extremes(k, v))
        return index

    @staticmethod
    def estimate_bytes(num_kv_heads: int, head_dim: int, value_dim: int, dtype: torch.dtype,
                       num_tokens: int, config: IndexConfig) -> int:
        """Bytes an index over ``num_tokens`` keys allocates (K/V plus index records)."""
        cap = LouverIndex._capacity_for(num_tokens, config)
        item = torch.empty((), dtype=dtype).element_size()
        per_key = num_kv_heads * ((head_dim + value_dim) * item
                                  + LouverIndex.record_bytes(head_dim, config))
        return cap * per_key

    @staticmethod
    def record_bytes(head_dim: int, config: IndexConfig) -> int:
        """Index bytes per key and KV head, as the kernels store them (tables amortized)."""
        if config.kind is IndexKind.BALLS:
            # int16 ids (int32 in this reference layout) + one center and radius per cluster
            s = config.num_subspaces
            return 2 * s + math.ceil(s * (head_dim // s * 4 + 4) / config.cluster_size)
        groups = head_dim // config.quant_group
        ranges = math.ceil(2 * head_dim * 4 / config.buffer_size)  # lo, step per segment
        return head_dim * config.quant_bits // 8 + 2 * groups + ranges

    @staticmethod
    def _capacity_for(n: int, config: IndexConfig) -> int:
        """Capacity for n keys: a power of two >= 256, and for QUANT whole segments (so that a
        partial last segment never reaches past it)."""
        cap = _MIN_CAPACITY
        while cap < n:
            cap *= 2
        if config.kind is IndexKind.QUANT:
            cap = -(-cap // config.buffer_size) * config.buffer_size
        return cap

    def _layout(self, cap: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(attribute, dtype, shape) of every storage tensor for ``cap`` keys."""
        h, d, cfg = self.num_kv_heads, self.head_dim, self.config
        layout = [("_keys", self.dtype, (h, cap, d)), ("_values", self.dtype,
                                                       (h, cap, self.value_dim))]
        if cfg.kind is IndexKind.BALLS:
            return [*layout, ("_ids", torch.int32, (h, cap, cfg.num_subspaces))]
        # packed code records for the Triton kernels (reference.pack_codes), one byte per code
        # for the torch backend; lo and step per segment of buffer_size keys
        record = d * cfg.quant_bits // 8 if self.uses_triton else d
        segments = -(-cap // cfg.buffer_size)
        return [*layout, ("_codes", torch.uint8, (h, cap, record)),
                ("_err", torch.float16, (h, cap, d // cfg.quant_group)),
                ("_lo", torch.float32, (h, segments, d)),
                ("_step", torch.float32, (h, segments, d))]

    def _allocate(self, cap: int) -> dict[str, torch.Tensor]:
        """Zero-filled storage for ``cap`` keys, as views of ONE allocation (one allocation and
        one fill launch per growth instead of one each per tensor: a short prefill's build is
        host-bound). Zero-filled: no kernel reads a row before it is written (positions are
        masked by num_keys / num_indexed), and a row that is never written reads as zeros,
        not as memory another session freed."""
        layout = self._layout(cap)
        sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in layout]
        starts = [0]
        for size in sizes:   # every part 256-byte aligned (the kernels' vector loads)
            starts.append(starts[-1] + -(-size // _ALIGN) * _ALIGN)
        arena = torch.zeros(starts[-1], dtype=torch.uint8, device=self.device)
        return {name: arena[start: start + size].view(dtype).view(shape)
                for (name, dtype, shape), start, size in zip(layout, starts[:-1], sizes,
                                                              strict=True)}

    def _grow(self, needed: int) -> None:
        """Ensure capacity >= needed, keeping every stored key and record."""
        if needed <= self._cap:
            return
        cap = self._capacity_for(needed, self.config)
        self._flush = None
        for name, t in self._allocate(cap).items():
            old = getattr(self, name)
            t[:, : old.shape[1]] = old
            setattr(self, name, t)
        self._cap = cap

    def _validate_kv(self, keys: torch.Tensor, values: torch.Tensor, check_values: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values checked (shapes, dtypes; with ``check_values`` also finite and within
        MAX_KEY_ABS: one synchronization) and converted to the storage dtype and device."""
        k, v = self._convert_kv(keys, values)
        if check_values:
            self._raise_if_invalid(self._extremes(k, v))
        return k, v

    def _convert_kv(self, keys: torch.Tensor, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_float("keys", keys)
        _check_float("values", values)
        want_k = (self.num_kv_heads, self.head_dim)
        if keys.dim() != 3 or (keys.shape[0], keys.shape[2]) != want_k:
            raise ValueError(f"keys must be [Hkv={self.num_kv_heads}, T, D={self.head_dim}], "
                             f"got {tuple(keys.shape)}")
        if values.dim() != 3 or (values.shape[0], values.shape[2]) != (
                self.num_kv_heads, self.value_dim) or values.shape[1] != keys.shape[1]:
            raise ValueError(f"values must be [Hkv={self.num_kv_heads}, T={keys.shape[1]}, "
                             f"Dv={self.value_dim}], got {tuple(values.shape)}")
        return (keys.to(device=self.device, dtype=self.dtype),
                values.to(device=self.device, dtype=self.dtype))

    @staticmethod
    def _extremes(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """max |x| of converted keys and values as a float [2] on their device (queued, no
        synchronization; None when there are no keys): one reduction pass per tensor, no
        temporary. NaN propagates (torch's max reductions do) and Inf is its own maximum, so
        both read as non-finite (exact in the storage dtype, which k and v share)."""
        if not k.numel():   # T = 0 (v is then empty too)
            return None
        return torch.stack([torch.linalg.vector_norm(k, ord=math.inf),
                            torch.linalg.vector_norm(v, ord=math.inf)])

    @staticmethod
    def _raise_if_invalid(extremes: torch.Tensor | None) -> None:
        """Raise ValueError unless ``_extremes`` says the keys and values are finite and the
        keys within MAX_KEY_ABS (reads it: one synchronization on a GPU)."""
        if extremes is None:
            return
        k_abs, v_abs = extremes.tolist()
        if not math.isfinite(k_abs):
            raise ValueError("keys contain NaN or Inf (after conversion to the storage dtype)")
        if not math.isfinite(v_abs):
            raise ValueError("values contain NaN or Inf (after conversion to the storage dtype)")
        if k_abs > MAX_KEY_ABS:
            raise ValueError(f"keys have entries above {MAX_KEY_ABS:g} in magnitude; float32 "
                             "scores would overflow")

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write validated keys and values (``_validate_kv``) at [num_keys, num_keys + T)."""
        t = k.shape[1]
        self._grow(self.num_keys + t)
        self._keys.narrow(1, self.num_keys, t).copy_(k)
        self._values.narrow(1, self.num_keys, t).copy_(v)
        self.num_keys += t
        if self._counters is not None:
            self._counters[1].fill_(self.num_keys)

    def append(self, keys: torch.Tensor, values: torch.Tensor, *, validate: bool = True
               ) -> None:
        """Append decode-time keys at positions [num_keys, num_keys + T).

        Args:
            keys: [Hkv, T, D]; values: [Hkv, T, Dv]; cast to the storage dtype and device.
            validate: check that the converted keys and values are finite and the keys within
                MAX_KEY_ABS (one host synchronization on a GPU). Pass False only when the
                caller has checked them in the storage dtype (the service does while decoding
                a request); shapes and dtypes are checked either way.
        The keys enter the recent buffer (attended exactly). A full buffer is flushed into the
        index after the next step (``attend`` or a CapturedStep call, see ``_after_step``), or
        at the next append if no step came in between; a buffer of two full buffers or more (a
        long append, e.g. a chunk of prompt) is flushed at once. Nothing is changed if
        validation fails.
        """
        k, v = self._validate_kv(keys, values, validate)
        self._await_flush()
        if self._flush_due:
            self._flush_due = False
            self._index_pending(captured=True)
        self._store(k, v)
        if self.num_buffered >= 2 * self.config.buffer_size:
            self._index_pending(captured=True)
        else:
            self._flush_due = self.num_buffered >= self.config.buffer_size

    def _after_step(self) -> None:
        """The end of a decode step: run the flush that the last append made due, after the
        step, which read those keys as buffer keys (attended exactly). On CUDA (Triton
        backend) it is the CapturedFlush's graph on a side stream: the work queued after the
        step (the other layers' steps) overlaps it instead of waiting for it. Its keys count
        as indexed (num_indexed, what the host sees) from the next operation on this index on,
        which waits for it (``_await_flush``): until then the index reads as the step saw it."""
        if self._flush_due:
            self._flush_due = False
            self._await_flush()
            self._unpublished = self._encode_pending(captured=True, side=True)

    def _await_flush(self) -> None:
        """Order the current stream after a side-stream flush of this index still in flight
        (no host synchronization), and count the keys of a flush run by _after_step as
        indexed. Every operation that reads or writes the records, the counters or the
        storage calls it first."""
        if self._flush is not None:
            self._flush.wait()
        if self._unpublished is not None:
            self._publish(self._unpublished)
            self._unpublished = None

    def _index_pending(self, captured: bool = False) -> None:
        """Index every stored key now (the buffer becomes empty). ``captured``: a decode-time
        flush, which may replay the index's CapturedFlush (a build launches: its storage usually
        grows before the next flush, which would waste the graph)."""
        self._await_flush()
        self._publish(self._encode_pending(captured))

    def _encode_pending(self, captured: bool, side: bool = False) -> int:
        """Write the records of the buffered keys [num_indexed, num_keys) and the device
        counter of indexed keys; returns num_keys (the host's num_indexed is the caller's).
        ``captured``, ``side``: see _index_pending and _replay_flush."""
        start, end = self.num_indexed, self.num_keys
        if end <= start:
            return start
        # the replay (Triton backend only) publishes num_indexed itself and needs no key view
        if captured and self._replay_flush(start, end, side):
            return end
        k = self._keys[:, start:end]
        if not self.uses_triton:   # the Triton encoder raises _kmax itself (no sync)
            self._kmax = torch.maximum(self._kmax, ref.key_norm_max(k))
        if self.config.kind is IndexKind.BALLS:
            self._encode_balls(k, start, end)
        else:
            self._encode_quant(k, start, end)
        if self._counters is not None:
            self._counters[0].fill_(end)
        return end

    def _publish(self, end: int) -> None:
        """The keys below ``end`` (records written) count as indexed."""
        if end > self.num_indexed:
            self.num_indexed = end
            self.num_flushes += 1

    def device_counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_indexed, num_keys) as int32 [1] tensors on the index's device, kept up to date
        by every append and flush (a fill on the current stream, no synchronization): what a
        captured decode step (louver_kernels.triton.decode.CapturedStep) reads. Waits for a
        flush in flight first (they are made from the host's counts)."""
        self._await_flush()
        if self._counters is None:
            self._counters = (
                torch.full((1,), self.num_indexed, dtype=torch.int32, device=self.device),
                torch.full((1,), self.num_keys, dtype=torch.int32, device=self.device))
        return self._counters

    def _replay_flush(self, start: int, end: int, side: bool = False) -> bool:
        """Encode [start, end) with the index's CapturedFlush (made on first use for the
        current storage: a CUDA graph on CUDA, eager launches otherwise), which also publishes
        num_indexed = end in the device counters, where that applies: the Triton backend and
        a range of at most two segments from the start of num_indexed's segment (longer ranges
        take _encode_quant's launch). The same records as _encode_quant. Using it creates the
        device counters, which every append then keeps current (one small fill). ``side``: on
        the side stream (CapturedFlush)."""
        if not self.uses_triton:
            return False
        from louver_kernels.triton.encode import CapturedFlush

        if not CapturedFlush.covers(start, end, self.config.buffer_size):
            return False
        if self._flush is None:
            self._flush = CapturedFlush(self, graph=self.device.type == "cuda")
        self._flush(start, end, side=side)
        return True

    def _encode_balls(self, k: torch.Tensor, start: int, end: int) -> None:
        hkv, t, d = k.shape
        s = self.config.num_subspaces
        sub = k.reshape(hkv, t, s, d // s).permute(0, 2, 1, 3).reshape(hkv * s, t, d // s)
        ids = ref.balanced_clusters(sub, self.config.cluster_size)
        num = int(ids.max()) + 1
        centers, radii = ref.balls_fit(sub, ids, num)
        self._centers = torch.cat([self._centers, centers.reshape(hkv, s, num, d // s)], dim=2)
        self._radii = torch.cat([self._radii, radii.reshape(hkv, s, num)], dim=2)
        ids = ids.reshape(hkv, s, t).permute(0, 2, 1) + self._num_clusters
        self._ids[:, start:end] = ids.to(torch.int32)
        self._num_clusters += num
        self._rmax = torch.maximum(self._rmax, radii.reshape(hkv, -1).amax(dim=1))

    def _encode_quant(self, k: torch.Tensor, start: int, end: int) -> None:
        """Encode positions [start, end): whole segments at once, then a partial last one. A
        partial segment already in the index is re-encoded over all of its keys."""
        cfg = self.config
        seg = cfg.buffer_size
        first = start // seg * seg                   # re-fit a partial segment from its start
        if self.uses_triton:
            from louver_kernels.triton.encode import quant_encode_packed

            # one launch: the segments of [first, end), the ranges, records and running maxima
            quant_encode_packed(
                self._keys, self._codes, self._err, self._lo, self._step, self._kmax,
                self._lmax, self._rmax, start=first, end=end, segment_size=seg,
                bits=cfg.quant_bits, coarse=cfg.quant_coarse_bits, group=cfg.quant_group,
                norm_start=start, validate=False)   # the index's own storage
            return
        whole_end = first + (end - first) // seg * seg
        if whole_end > first:
            self._encode_quant_segments(first, whole_end, seg)
        if end > whole_end:
            self._encode_quant_segments(whole_end, end, end - whole_end)

    def _encode_quant_segments(self, start: int, end: int, size: int) -> None:
        """Encode [start, end) (start a multiple of buffer_size) as segments of ``size`` keys
        (the torch backend; the Triton one encodes with triton.encode.quant_encode_packed)."""
        cfg = self.config
        k = self._keys[:, start:end]
        hkv, t, d = k.shape
        ks = k.reshape(hkv, t // size, size, d)
        lo, step = ref.quant_fit_range(ks, cfg.quant_bits)
        codes, err = ref.quant_encode(ks, lo, step, cfg.quant_bits, cfg.quant_group)
        codes = codes.reshape(hkv, t, d)
        s0 = start // cfg.buffer_size
        self._lo[:, s0: s0 + t // size] = lo
        self._step[:, s0: s0 + t // size] = step
        self._lmax = torch.maximum(self._lmax, ref.round_up_f32(lo.double().norm(dim=-1)
                                                                .amax(dim=1)))
        self._codes[:, start:end] = codes
        self._err[:, start:end] = err.reshape(hkv, t, -1)
        emax = ref.round_up_f32(err.double().norm(dim=-1).amax(dim=2).amax(dim=1))
        self._rmax = torch.maximum(self._rmax, emax)

    # ------------------------------------------------------------------ accessors

    @property
    def num_buffered(self) -> int:
        """Keys in the recent buffer (attended exactly, not yet indexed)."""
        return self.num_keys - self.num_indexed

    @property
    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self._keys.nbytes + self._values.nbytes

    @property
    def index_bytes(self) -> int:
        """Bytes allocated for index records and tables (as the kernels store them)."""
        per_key = self.record_bytes(self.head_dim, self.config)
        return self._cap * self.num_kv_heads * per_key

    def keys_range(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys [Hkv, end-start, D] and values [Hkv, end-start, Dv] (views)."""
        if not 0 <= start <= end <= self.num_keys:
            raise ValueError(f"range [{start}, {end}) outside [0, {self.num_keys})")
        return self._keys[:, start:end], self._values[:, start:end]

    # ------------------------------------------------------------------ bounds and search

    def _validate_q(self, q: torch.Tensor) -> torch.Tensor:
        q = self._check_q_shape(q)
        # one synchronization: NaN fails the comparison, Inf exceeds the bound (float32 holds
        # 2^48 exactly, float16 does not)
        if not bool((q.float().abs() <= MAX_QUERY_ABS).all()):
            if not bool(torch.isfinite(q).all()):
                raise ValueError("q contains NaN or Inf")
            raise ValueError(f"q has entries above {MAX_QUERY_ABS:g} in magnitude")
        return q

    def _check_q_shape(self, q: torch.Tensor) -> torch.Tensor:
        """The host-only part of _validate_q (dtype, shape, device): no synchronization."""
        _check_float("q", q)
        if q.dim() != 2 or q.shape[1] != self.head_dim or q.shape[0] < 1 or (
                q.shape[0] % self.num_kv_heads):
            raise ValueError(f"q must be [Hq, D={self.head_dim}] with Hq a multiple of "
                             f"Hkv={self.num_kv_heads}, got {tuple(q.shape)}")
        return q.to(self.device)

    def _validate_tau(self, tau: torch.Tensor | float | list[float], hq: int) -> torch.Tensor:
        t = torch.as_tensor(tau, dtype=torch.float32, device=self.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(hq)
        if t.numel() != hq:
            raise ValueError(f"tau must have 1 or Hq={hq} values, got {t.numel()}")
        if bool(torch.isnan(t).any()):
            raise ValueError("tau contains NaN")
        return t

    def bounds(self, q: torch.Tensor, top: int | None = None) -> torch.Tensor:
        """Sound upper bounds of the float32 scores of the indexed keys.

        Args:
            q: [Hq, D] (validated).
            top: QUANT only: bound from the top ``top`` bits of the codes (the coarse first
                pass of the kernels); None: every bit (the tightest bound).
        Returns:
            float32 [Hq, num_indexed]: UB >= fl32(q.k_n) for every indexed key n.
        """
        self._await_flush()
        n = self.num_indexed
        if self.config.kind is IndexKind.BALLS:
            ub = ref.balls_bound(q, self._centers, self._radii, self._ids[:, :n])
            slack = ref.balls_slack(q, self._kmax, self._rmax, self.config.num_subspaces)
        else:
            if n == 0:
                return torch.empty(q.shape[0], 0, device=self.device)
            seg = self.config.buffer_size
            nseg = -(-n // seg)
            codes, err = self._codes[:, : nseg * seg], self._err[:, : nseg * seg]
            if self.uses_triton:
                codes = ref.unpack_codes(codes, self.config.quant_bits,
                                         self.config.quant_coarse_bits).to(torch.uint8)
            ub = ref.quant_bound(q, codes, err, self._lo[:, :nseg], self._step[:, :nseg],
                                 self.config.quant_bits, top)[:, :n]
            slack = ref.quant_slack(q, self._kmax, self._rmax, self._lmax,
                                    self.head_dim // self.config.quant_group)
        return ub + slack[:, None]

    def search(self, q: torch.Tensor, tau: torch.Tensor | float | list[float]) -> SearchResult:
        """Candidates per query head: a superset of {n : fl32(q_h.k_n) >= tau_h}.

        Args:
            q: [Hq, D] float tensor; tau: float32 [Hq] (or one value for every head).
        Returns:
            SearchResult over all num_keys positions (buffer positions always included).
        """
        q = self._validate_q(q)
        t = self._validate_tau(tau, q.shape[0])
        mask = torch.ones(q.shape[0], self.num_keys, dtype=torch.bool, device=self.device)
        mask[:, : self.num_indexed] = self.bounds(q) >= t[:, None]
        return SearchResult(mask)

    # ------------------------------------------------------------------ thresholds

    def _probe_max(self, s_idx: torch.Tensor, s_buf: torch.Tensor) -> torch.Tensor:
        """m_lo [Hq]: the largest exact score among the sink tokens and the most recent
        ``probe_recent`` keys (buffer included); -inf when there are none. Any exact score is
        <= the true maximum, which is all the policies need."""
        cfg = self.config
        n = s_idx.shape[1]
        recent = max(cfg.probe_recent - s_buf.shape[1], 0)
        parts = [s_idx[:, : min(cfg.sink_tokens, n)], s_idx[:, max(n - recent, 0):], s_buf]
        probe = torch.cat(parts, dim=1)
        if probe.shape[1] == 0:
            return torch.full((s_idx.shape[0],), -math.inf, device=s_idx.device)
        return probe.amax(dim=1)

    def _choose_tau(self, policy: Policy, ub: torch.Tensor, s_idx: torch.Tensor,
                    s_buf: torch.Tensor) -> torch.Tensor:
        """tau float32 [Hq] for a policy, given bounds ub [Hq, n] and exact scores of the
        indexed keys s_idx [Hq, n] (only read at positions the policy may look at) and of the
        buffer s_buf [Hq, b]."""
        hq, n = ub.shape
        neg_inf = torch.full((hq,), -math.inf, device=self.device)
        if isinstance(policy, Dense):
            return neg_inf
        if isinstance(policy, Fixed):
            return policy.taus(hq).to(self.device)
        if n == 0:
            return neg_inf  # only the buffer: every policy attends it all
        if isinstance(policy, TopK):
            if policy.k >= n:
                return neg_inf
            top = ub.topk(policy.k, dim=1).indices
            t0 = s_idx.gather(1, top).amin(dim=1)            # <= the true k-th largest score
            cand = ub >= t0[:, None]                         # holds every key scoring >= t0
            s_c = s_idx.masked_fill(~cand, -math.inf)
            return s_c.topk(policy.k, dim=1).values[:, -1]   # the true k-th largest score
        m_lo = self._probe_max(s_idx, s_buf)
        if isinstance(policy, Relative):
            return m_lo - math.log(1.0 / policy.eps) / self.scale
        if isinstance(policy, Mass):
            return self._mass_tau(ub, m_lo, s_buf, policy.delta)
        raise ValueError(f"unknown policy {policy!r}")

    def _mass_tau(self, ub: torch.Tensor, m_lo: torch.Tensor, s_buf: torch.Tensor,
                  budget: float) -> torch.Tensor:
        """tau [Hq] whose keys with bound < tau carry certified mass <= budget, relative to a
        normalizer every such tau keeps (the buffer and the best probed key, since tau <=
        m_lo)."""
        # both the buffer and the best probed key stay attended; either sum is a lower bound
        z_lo_log = m_lo * self.scale
        if s_buf.shape[1]:
            z_lo_log = torch.maximum(z_lo_log, torch.logsumexp(s_buf * self.scale, dim=1))
        tau = mass_tau(ub.sort(dim=1, descending=True).values, z_lo_log, budget, self.scale)
        return torch.minimum(tau, m_lo)

    # ------------------------------------------------------------------ attention

    def attend(self, q: torch.Tensor, policy: Policy, *, validate: bool = True) -> AttendOutput:
        """Sparse attention of one query token under a threshold policy.

        Args:
            q: [Hq, D] float tensor (Hq a multiple of Hkv).
            policy: Fixed, Relative, TopK, Mass or Dense.
            validate: check q's values on the host (ValueError on NaN, Inf or entries above
                MAX_QUERY_ABS; one synchronization). False skips that check (dtype and shape
                are still checked): for callers that validated q already (the service checks
                it when decoding a request). The Triton step then reports a bad q on the
                device instead (AttendOutput.q_error, raise_if_invalid); the reference path
                does not check it at all.
        Returns:
            AttendOutput (see its docstring). Keys attended: the buffer, and every indexed key
            with float32 score >= tau (all of them are candidates: zero false negatives).
        """
        q = self._validate_q(q) if validate else self._check_q_shape(q)
        self._await_flush()
        if self.uses_triton and isinstance(policy, (Fixed, Relative, Dense)):
            from louver_kernels.triton import decode

            out = decode.attend(self, q, policy)
            self._after_step()
            return out
        n, total = self.num_indexed, self.num_keys
        s_all = ref.scores(q, self._keys[:, :total])        # exact float32 [Hq, total]
        s_idx, s_buf = s_all[:, :n], s_all[:, n:]
        ub = self.bounds(q)
        tau = self._choose_tau(policy, ub, s_idx, s_buf)
        cand, attend_idx, dropped = self._certify(ub, s_idx, s_buf, tau)
        if isinstance(policy, Mass):
            # Candidates scoring below tau are dropped too, so the bound-only choice of tau can
            # exceed delta: retry with smaller budgets, and attend every key as a last resort.
            for budget in (policy.delta / 8, policy.delta / 64, 0.0):
                bad = dropped > policy.delta
                if not bool(bad.any()):
                    break
                if budget > 0:
                    retry = self._choose_tau(Mass(budget), ub, s_idx, s_buf)
                else:
                    retry = torch.full_like(tau, -math.inf)
                tau = torch.where(bad, retry, tau)
                cand, attend_idx, dropped = self._certify(ub, s_idx, s_buf, tau)
        attend = torch.cat([attend_idx, torch.ones_like(s_buf, dtype=torch.bool)], dim=1)
        out, lse = ref.masked_attention(q, self._keys[:, :total], self._values[:, :total],
                                        attend, self.scale)
        b = total - n
        result = AttendOutput(
            output=out,
            lse=lse,
            tau=tau.float(),
            num_candidates=cand.sum(dim=1) + b,
            num_attended=attend.sum(dim=1),
            dropped_mass_bound=dropped.float(),
        )
        self._after_step()
        return result

    def _certify(self, ub: torch.Tensor, s_idx: torch.Tensor, s_buf: torch.Tensor,
                 tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates, attended indexed keys and the dropped-mass certificate for tau.

        A key is a candidate of a GQA group when its bound reaches tau for any query head of
        the group: the kernels read it once per KV head and compute its exact score for every
        head of the group.

        Args:
            ub, s_idx: float32 [Hq, n] bounds and exact scores of the indexed keys;
            s_buf: float32 [Hq, b] exact scores of the buffer; tau: float32 [Hq].
        Returns:
            cand bool [Hq, n] (the group's candidates), attend_idx bool [Hq, n] (candidates with
            s >= tau), and the certificate float64 [Hq]: skipped keys enter with their bound
            (not candidates) or their exact score (candidates below tau); with P >= the true
            skipped sum and A the attended sum, the skipped probability mass is <= P / (A + P).
        """
        hq, n = ub.shape
        hkv = self.num_kv_heads
        reach = (ub >= tau[:, None]).reshape(hkv, hq // hkv, n)
        cand = reach.any(dim=1, keepdim=True).expand_as(reach).reshape(hq, n)
        attend_idx = cand & (s_idx >= tau[:, None])
        skipped = torch.where(cand, s_idx, ub).masked_fill(attend_idx, -math.inf).double()
        attended = torch.cat([s_idx.masked_fill(~attend_idx, -math.inf), s_buf], dim=1).double()
        neg = torch.full((hq,), -math.inf, dtype=torch.float64, device=ub.device)
        lse_p = torch.logsumexp(skipped * self.scale, dim=1) if n else neg
        lse_a = torch.logsumexp(attended * self.scale, dim=1) if attended.shape[1] else neg
        dropped = torch.sigmoid(lse_p - lse_a)
        dropped = torch.where(torch.isneginf(lse_p), torch.zeros_like(dropped), dropped)
        return cand, attend_idx, dropped
