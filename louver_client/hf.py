"""transformers integration: decode-time attention of a causal LM served by a Louver session.

An attention function is registered with transformers' ``AttentionInterface`` under the name
``"louver"`` (and the SDPA mask function under the same name with ``AttentionMaskInterface``);
no model class is patched. Inside :func:`louver_attention` the model's attention implementation
is switched to it, and every attention call of the model runs as follows (batch size 1):

- prefill (a query block over keys whose history is at hand): computed locally with torch SDPA
  (causal, GQA), exactly like transformers' "sdpa" implementation; the block's post-RoPE K/V
  [Hkv, L, D] are streamed to the session (one Append stream for all layers, sent while the
  next layers compute; the session indexes them when the last layer is done);
- decode (one query token): q [Hq, D] and the token's k/v [Hkv, 1, D] go to the session, which
  appends them and returns the attention output [Hq, Dv] (sparse, with a certificate) that the
  model uses;
- a multi-token continuation without local history (a :class:`LouverCache` primed with a
  prefix held only by the session) is served token by token through the session.

Shapes from transformers: query [B, Hq, L, D], key/value [B, Hkv, L_kv, D] after the model's
cache update; the function returns [B, L, Hq, Dv] like ``sdpa_attention_forward``.

:class:`LouverCache` keeps no K/V (only lengths), so the model does not duplicate the cache the
session holds; pass ``**handle.cache_kwargs()`` to ``model(...)`` / ``model.generate(...)``
(``cache=handle.cache()`` from transformers 5.24 on, ``past_key_values=`` before). With the
model's default DynamicCache everything works too, at the price of a local copy.
"""

from __future__ import annotations

import inspect
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from louver_client.errors import LouverError, invalid_argument
from louver_client.session import Appender, Decoder, Session
from louver_client.types import AttendOutput
from louver_kernels.threshold import Policy

__all__ = ["ATTN_IMPLEMENTATION", "LouverAttention", "LouverCache", "PrefillCapture",
           "StepStats", "cache_argument", "capture_prefill", "louver_attention"]

#: The attention implementation name registered with transformers.
ATTN_IMPLEMENTATION = "louver"

#: progress(stage, done, total): stage "prefill" (layers done), "index" (0 of 1 when the
#: session starts indexing the prefill, 1 of 1 when it is done).
Progress = Callable[[str, int, int], None]

_BINDINGS: dict[int, LouverAttention] = {}
_BINDINGS_LOCK = threading.Lock()


def _louver_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              dropout: float = 0.0, scaling: float | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function (dispatches to the model's :class:`LouverAttention`).

    Args:
        module: the attention module (its ``layer_idx`` and ``config`` identify the call).
        query: [B, Hq, L, D]; key, value: [B, Hkv, L_kv, D] / [B, Hkv, L_kv, Dv].
        attention_mask: None or a boolean/additive mask [B, 1, L, L_kv].
    Returns:
        ([B, L, Hq, Dv] in query's dtype, None).
    """
    binding = _BINDINGS.get(id(getattr(module, "config", None)))
    if binding is None:
        raise RuntimeError("the 'louver' attention implementation is only usable inside "
                           "louver_client.hf.louver_attention(model, session)")
    return binding._forward(module, query, key, value, attention_mask, dropout, scaling, kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _louver_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------- cache


class _LengthLayer(DynamicLayer):
    """A cache layer that stores no K/V: ``update`` returns only the new states and counts
    them, so attention sees the new token(s) and the session holds the rest."""

    is_croppable = False

    def __init__(self, offset: int = 0) -> None:
        super().__init__()
        self.cumulative_length = offset

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += int(key_states.shape[-2])
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LouverCache cannot be cropped (the session holds the K/V)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("LouverCache supports batch size 1 only")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("LouverCache supports batch size 1 only")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("LouverCache does not support beam search")


class LouverCache(Cache):
    """A transformers Cache holding only per-layer lengths (the K/V live in the session).

    Args:
        num_layers: the model's layers.
        offset: tokens the session already holds (positions continue from there).
    """

    def __init__(self, num_layers: int, offset: int = 0) -> None:
        super().__init__(layers=[_LengthLayer(offset) for _ in range(num_layers)])


# ---------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class StepStats:
    """One decode step (one token through every layer).

    Attributes:
        position: the token's absolute position.
        candidate_fraction: mean over layers and query heads of candidates / keys.
        attended_fraction: mean over layers and query heads of attended keys / keys.
        max_dropped_mass: the largest certificate (dropped-mass bound) over layers and heads.
        attend_s: seconds spent in the session's attention calls (sum over layers).
        step_s: wall seconds from the first layer's call to the last layer's answer (includes
            the model's own compute between layers).
    """

    position: int
    candidate_fraction: float
    attended_fraction: float
    max_dropped_mass: float
    attend_s: float
    step_s: float


@dataclass
class _StepAccumulator:
    position: int
    start: float
    cand: list[float] = field(default_factory=list)
    attended: list[float] = field(default_factory=list)
    max_dropped: float = 0.0
    attend_s: float = 0.0


@dataclass
class PrefillCapture:
    """Post-RoPE K/V of a prefill, per layer: keys [Hkv, L, D], values [Hkv, L, Dv] (the
    model's dtype, CPU or the model's device), and the last position's logits [V]."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_logits: torch.Tensor


# ---------------------------------------------------------------------------------- binding


class LouverAttention:
    """A model bound to a session (returned by :func:`louver_attention`).

    Attributes:
        session: the session (None: capture-only, see :func:`capture_prefill`).
        policy: the threshold policy of decode steps (None: the session default).
        stats: one StepStats per decode step.
        captured: per-layer prefill K/V when ``capture=True``.
    """

    def __init__(self, model: Any, session: Session | None, policy: Policy | None, *,
                 use_stream: bool, capture: bool, progress: Progress | None) -> None:
        cfg = model.config.get_text_config(decoder=True)
        self.model = model
        self.session = session
        self.policy = policy
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_q_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_q_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None)
                            or cfg.hidden_size // cfg.num_attention_heads)
        self.cache_arg = cache_argument(model)
        self.stats: list[StepStats] = []
        self.captured: list[tuple[torch.Tensor, torch.Tensor] | None] | None = (
            [None] * self.num_layers if capture else None)
        self._use_stream = use_stream
        self._progress = progress
        self._decoder: Decoder | None = None
        self._appender: Appender | None = None
        self._step: _StepAccumulator | None = None
        self._prev_impl: Any = None
        self._lengths = [0] * self.num_layers
        if session is not None:
            g = session.geometry
            want = (self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)
            have = (g.num_layers, g.num_q_heads, g.num_kv_heads, g.head_dim)
            if want != have:
                raise invalid_argument(f"session geometry (layers, Hq, Hkv, D)={have} does not "
                                       f"match the model's {want}")
            self._lengths = [int(n) for n in session.info().layer_tokens]

    # ------------------------------------------------------------------ binding

    def _attach(self) -> None:
        key = id(self.model.config)
        with _BINDINGS_LOCK:
            if key in _BINDINGS:
                raise RuntimeError("this model is already inside louver_attention()")
            _BINDINGS[key] = self
        self._prev_impl = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except BaseException:
            with _BINDINGS_LOCK:
                _BINDINGS.pop(key, None)
            raise

    def _detach(self, failed: bool) -> None:
        try:
            if self._appender is not None:
                appender, self._appender = self._appender, None
                if failed:
                    appender.abort()
                else:
                    self._finish_prefill(appender)
        finally:
            if self._decoder is not None:
                self._decoder.close()
                self._decoder = None
            try:
                self.model.set_attn_implementation(self._prev_impl)
            finally:
                with _BINDINGS_LOCK:
                    _BINDINGS.pop(id(self.model.config), None)

    def cache(self) -> LouverCache:
        """A fresh LouverCache positioned after what the session holds."""
        offset = self._lengths[0]
        if any(n != offset for n in self._lengths):
            raise invalid_argument(f"the session's layers hold different token counts "
                                   f"{sorted(set(self._lengths))}; cannot continue")
        return LouverCache(self.num_layers, offset)

    def cache_kwargs(self) -> dict[str, LouverCache]:
        """A fresh cache (:meth:`cache`) under the name the model's forward takes it by
        (``cache_arg``): ``model.generate(input_ids, **handle.cache_kwargs())``."""
        return {self.cache_arg: self.cache()}

    # ------------------------------------------------------------------ attention

    def _forward(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                 scaling: float | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        b, hq, q_len, d = query.shape
        if b != 1:
            raise ValueError(f"louver attention supports batch size 1, got {b}")
        if kwargs.get("sliding_window") or kwargs.get("softcap"):
            raise ValueError("louver attention does not support sliding windows or softcapping")
        if scaling is not None and not math.isclose(scaling, d ** -0.5, rel_tol=1e-6):
            raise ValueError(f"the session attends with scale 1/sqrt(D)={d ** -0.5:.6g}; the "
                             f"model uses {scaling:.6g}")
        n = self._lengths[layer]
        kv_len = int(key.shape[2])
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.numel():
            first = int(positions.reshape(-1)[0])
            if first != n:
                raise LouverError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"layer {layer}: the model is at position {first} but the "
                                  f"session holds {n} tokens; pass the handle's cache "
                                  f"(**handle.cache_kwargs())")
        new_k = key[0, :, kv_len - q_len:].detach()   # [Hkv, L, D]
        new_v = value[0, :, kv_len - q_len:].detach()  # [Hkv, L, Dv]
        if q_len == 1 and (n > 0 or kv_len == 1):
            _check_no_padding(mask, q_len)
            out = self._decode(layer, query[0, :, 0], new_k, new_v)  # [Hq, Dv]
            return out.to(query.dtype).reshape(1, 1, hq, -1), None
        if kv_len == n + q_len:  # the whole history is here: attend locally (prefill)
            out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0,
                                            scaling=scaling, **kwargs)
            self._store_prefill(layer, new_k, new_v)
            return out, None
        if kv_len == q_len and n > 0:  # continuation whose history only the session holds
            _check_no_padding(mask, q_len)
            rows = [self._decode(layer, query[0, :, i], new_k[:, i:i + 1], new_v[:, i:i + 1],
                                 record=False) for i in range(q_len)]
            return torch.stack(rows).to(query.dtype).reshape(1, q_len, hq, -1), None
        raise LouverError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"layer {layer}: the model passes {kv_len} keys for {q_len} queries "
                          f"but the session holds {n} tokens; was the cache reset?")

    def _store_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.captured is not None:
            prev = self.captured[layer]
            self.captured[layer] = (k, v) if prev is None else (
                torch.cat([prev[0], k], dim=1), torch.cat([prev[1], v], dim=1))
        if self.session is not None:
            if self._appender is None:
                self._appender = self.session.appender()
            self._appender.add(layer, k, v, start=self._lengths[layer])
        self._lengths[layer] += int(k.shape[1])
        if self._progress is not None:
            self._progress("prefill", layer + 1, self.num_layers)
        if layer == self.num_layers - 1 and self._appender is not None:
            appender, self._appender = self._appender, None
            self._finish_prefill(appender)

    def _finish_prefill(self, appender: Appender) -> None:
        if self._progress is not None:
            self._progress("index", 0, 1)
        appender.finish()
        if self._progress is not None:
            self._progress("index", 1, 1)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                record: bool = True) -> torch.Tensor:
        """Serve one query token: q [Hq, D], k [Hkv, 1, D], v [Hkv, 1, Dv] -> [Hq, Dv]."""
        if self.session is None:
            raise RuntimeError("decode attention needs a session (this binding only captures)")
        if self._appender is not None:  # a prefill stream is still open: finish it first
            appender, self._appender = self._appender, None
            self._finish_prefill(appender)
        now = time.perf_counter()
        if record and layer == 0:
            self._step = _StepAccumulator(position=self._lengths[0], start=now)
        if self._use_stream:
            if self._decoder is None:
                self._decoder = self.session.decoder()
            out = self._decoder.step(layer, q, k, v, self.policy)
        else:
            out = self.session.attend(layer, q, k, v, self.policy)
        done = time.perf_counter()
        self._lengths[layer] += 1
        if record and self._step is not None:
            self._record(layer, out, self._lengths[layer], done - now, done)
        return out.output.to(q.device)

    def _record(self, layer: int, out: AttendOutput, num_keys: int, seconds: float,
                now: float) -> None:
        acc = self._step
        assert acc is not None
        acc.cand.append(float(out.num_candidates.double().mean()) / num_keys)
        acc.attended.append(float(out.num_attended.double().mean()) / num_keys)
        acc.max_dropped = max(acc.max_dropped, float(out.dropped_mass_bound.max()))
        acc.attend_s += seconds
        if layer == self.num_layers - 1:
            self.stats.append(StepStats(acc.position, statistics.fmean(acc.cand),
                                        statistics.fmean(acc.attended), acc.max_dropped,
                                        acc.attend_s, now - acc.start))
            self._step = None

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Greedy decoding with every attention served as described in the module docstring.

        If the session already holds a prefix of ``input_ids`` (e.g. fed from a
        :class:`PrefillCapture`), only the rest is run, through the session.

        Args:
            input_ids: int64 [1, L] prompt (the session must hold fewer than L tokens).
            max_new_tokens: tokens to generate.
            eos_token_id: stop after generating it (None: never stop early).
            on_token: called with every generated token id.
        Returns:
            int64 [1, L + generated] on input_ids' device.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, L], got {list(input_ids.shape)}")
        cache = self.cache()
        done = cache.get_seq_length()
        if done >= input_ids.shape[1]:
            raise ValueError(f"the session already holds {done} tokens, the prompt has "
                             f"{input_ids.shape[1]}")
        ids = input_ids
        step_ids = input_ids[:, done:]
        for _ in range(max_new_tokens):
            out = self.model(input_ids=step_ids, use_cache=True, logits_to_keep=1,
                             **{self.cache_arg: cache})
            token = int(out.logits[0, -1].argmax())
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            step_ids = ids[:, -1:]
        return ids

    def summary(self) -> dict[str, float]:
        """Aggregate decode statistics: steps, mean candidate fraction, largest certificate,
        per-step latency median / p90 (seconds; attention round trips and wall)."""
        if not self.stats:
            return {"steps": 0}
        attend = sorted(s.attend_s for s in self.stats)
        wall = sorted(s.step_s for s in self.stats)
        return {
            "steps": len(self.stats),
            "mean_candidate_fraction": statistics.fmean(s.candidate_fraction
                                                        for s in self.stats),
            "mean_attended_fraction": statistics.fmean(s.attended_fraction for s in self.stats),
            "max_dropped_mass": max(s.max_dropped_mass for s in self.stats),
            "attend_s_median": _quantile(attend, 0.5),
            "attend_s_p90": _quantile(attend, 0.9),
            "step_s_median": _quantile(wall, 0.5),
            "step_s_p90": _quantile(wall, 0.9),
        }


def cache_argument(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a Cache: ``cache`` (transformers
    5.24 and later) or ``past_key_values`` (earlier releases, and the deprecated alias)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list."""
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def _check_no_padding(mask: torch.Tensor | None, q_len: int) -> None:
    """Served queries attend every stored key up to their own position: refuse masks that hide
    some of those (padding, custom masks). ``mask``: [B, 1 or H, L, K], boolean or additive."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed.reshape(-1, q_len, allowed.shape[-1])
    k = allowed.shape[-1]
    rows = torch.arange(q_len, device=mask.device)[:, None]
    needed = torch.arange(k, device=mask.device)[None, :] <= k - q_len + rows  # causal part
    if not bool(allowed[:, needed].all()):
        raise ValueError("louver attention does not support padded or custom attention masks")


@contextmanager
def louver_attention(model: Any, session: Session | None, policy: Policy | None = None, *,
                     use_stream: bool = True, capture: bool = False,
                     progress: Progress | None = None) -> Iterator[LouverAttention]:
    """Run ``model`` with its attention served by ``session`` inside the block.

    Args:
        model: a transformers causal LM using the AttentionInterface (e.g. Llama, SmolLM2).
        session: a RemoteSession or LocalSession with the model's geometry (layers, Hq, Hkv,
            D); None only captures prefill K/V (no decode possible).
        policy: threshold policy of decode steps (None: the session default).
        use_stream: serve decode steps over one Decode stream (remote) instead of unary
            Attend calls.
        capture: keep the prefill's K/V per layer in ``handle.captured``.
        progress: progress(stage, done, total) callback (see :data:`Progress`).
    Yields:
        the :class:`LouverAttention` handle (``cache_kwargs()``, ``generate()``, ``stats``).

    On exit the previous attention implementation is restored and the decode stream closed.
    """
    handle = LouverAttention(model, session, policy, use_stream=use_stream, capture=capture,
                             progress=progress)
    handle._attach()
    failed = True
    try:
        yield handle
        failed = False
    finally:
        handle._detach(failed)


@torch.inference_mode()
def capture_prefill(model: Any, input_ids: torch.Tensor,
                    progress: Progress | None = None) -> PrefillCapture:
    """Run a prefill locally and return its post-RoPE K/V per layer (and the last logits).

    Feed the K/V to sessions with ``session.prefill_layers(capture.kv)``; several sessions
    (e.g. different policies) then share one prefill.

    Args:
        input_ids: int64 [1, L].
    """
    with louver_attention(model, None, capture=True, progress=progress) as h:
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **h.cache_kwargs())
    assert h.captured is not None
    kv = [pair for pair in h.captured if pair is not None]
    if len(kv) != h.num_layers:
        raise RuntimeError("the model did not run every layer through the louver attention")
    return PrefillCapture(kv, out.logits[0, -1].float())
