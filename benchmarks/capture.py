"""Capture the post-RoPE query, key and value states of SmolLM2 over long real text.

Real keys (clustered, with outlier channels and attention sinks) decide how well the index
prunes; this module records them once so that benchmarks and tests can replay them without the
model.

How: a custom attention function is registered with transformers' ``AttentionInterface`` (and
the sdpa mask function under the same name with ``AttentionMaskInterface``, so that masks are
built exactly as for ``sdpa``). The model is switched to it with ``set_attn_implementation``;
for the chosen layers it copies the query, key and value states it receives (these are post-RoPE:
the Llama attention module rotates q and k before calling the attention function) and then
delegates to transformers' own sdpa implementation, so the forward pass is the model's own.
The previous implementation is restored afterwards.

A capture is a dict::

    {"meta": {...}, "ids": int32 [N], "layers": {layer: {"q": [Hq, N, D], "k": [Hkv, N, D],
                                                        "v": [Hkv, N, D]}}}

with float16 tensors (SmolLM2: Hq=9, Hkv=3, D=64; query head h reads KV head h // (Hq // Hkv);
attention weights are softmax(scale * q.k) with scale = D ** -0.5). ``meta`` records the model,
its compute dtype, the text source and, for captures made of several documents, the segments:
each document is run through the model on its own (positions restart at 0) and the states are
concatenated along N.

Every capture runs a self-check on its last rows: (1) softmax(scale q.k^T, causal) v recomputed
from the stored float16 q/k/v matches the output sdpa produced inside the model; (2) the stored
keys equal the layer's raw ``k_proj`` output rotated by standard RoPE at their absolute position
(and differ clearly from the unrotated projection). The errors are stored in ``meta["check"]``.

CLI::

    python -m benchmarks.capture --tokens 8192 --layers 0,5,10,15,20,25,29 \\
        --out data/captures/smollm2_8k.pt [--docs K] [--chunk C]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTURE_ATTN = "louver_capture"
FORMAT_VERSION = 1
MODEL_NAME = "SmolLM2-135M-Instruct"
TEXT_SOURCE = "docstrings of the Python standard library (louver_client.smollm2.stdlib_text)"
CHECK_ROWS = 16
STORE_DTYPE = torch.float16

Progress = Callable[[str], None]


def load_model(progress: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (float32, eval, CPU) and its tokenizer from the local package."""
    from louver_client.smollm2 import load_smollm2

    return load_smollm2(progress=progress)


# --------------------------------------------------------------------------------------------
# Recording attention
# --------------------------------------------------------------------------------------------


@dataclass
class _Recorder:
    """Per-layer buffers filled by the recording attention function during one capture."""

    layers: frozenset[int]
    check_from: int  # absolute position of the first row kept for the self-check
    q: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # fp16 [Hq, L, D] chunks
    k: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # fp16 [Hkv, L, D] chunks
    v: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # fp16 [Hkv, L, D] chunks
    out: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # fp32 [Hq, R, D] sdpa out
    k_raw: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # fp32 [Hkv, R, D]
    seen: dict[int, int] = field(default_factory=dict)  # positions recorded so far per layer
    scale: dict[int, float] = field(default_factory=dict)

    def record(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, out: torch.Tensor) -> None:
        """Store one call's new states. query [1, Hq, L, D]; key/value [1, Hkv, P+L, D] (cache
        included, the new L positions last); out [1, L, Hq, D] (sdpa output)."""
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        if query.shape[0] != 1:
            raise ValueError(f"capture needs batch size 1, got {query.shape[0]}")
        length = query.shape[2]
        start = self.seen.get(layer, 0)
        self.q.setdefault(layer, []).append(query[0].detach().to(STORE_DTYPE))
        self.k.setdefault(layer, []).append(key[0, :, -length:].detach().to(STORE_DTYPE))
        self.v.setdefault(layer, []).append(value[0, :, -length:].detach().to(STORE_DTYPE))
        first = max(self.check_from - start, 0)
        if first < length:
            rows = out[0, first:].detach().float().transpose(0, 1).contiguous()
            self.out.setdefault(layer, []).append(rows)
        self.seen[layer] = start + length
        self.scale[layer] = float(getattr(module, "scaling", query.shape[-1] ** -0.5))

    def record_raw_key(self, layer: int, k_proj_out: torch.Tensor, num_kv: int) -> None:
        """Store the pre-RoPE projection rows of the check window; k_proj_out [1, L, Hkv*D]."""
        length = k_proj_out.shape[1]
        start = self.seen.get(layer, 0)  # the projection runs before the attention call
        first = max(self.check_from - start, 0)
        if first < length:
            rows = k_proj_out[0, first:].detach().float().view(length - first, num_kv, -1)
            self.k_raw.setdefault(layer, []).append(rows.transpose(0, 1).contiguous())


_ACTIVE: _Recorder | None = None


def _recording_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function for ``AttentionInterface``: record, then run transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rec = _ACTIVE
    if rec is not None and getattr(module, "layer_idx", None) in rec.layers:
        rec.record(module, query, key, value, out)
    return out, weights


def _register() -> None:
    """Register the recording attention (and the sdpa mask builder) under ``CAPTURE_ATTN``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN, _recording_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def _to_ids(tokenizer: Any, text_or_ids: str | Sequence[int] | torch.Tensor,
            max_tokens: int) -> torch.Tensor:
    """Token ids as int64 [N] with N = min(len, max_tokens)."""
    if isinstance(text_or_ids, str):
        ids = torch.tensor(tokenizer(text_or_ids).input_ids, dtype=torch.long)
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("capture needs at least one token")
    return ids[:max_tokens]


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Standard (Llama, rotate-half) RoPE, written independently of transformers.

    x float32 [H, R, D]; positions int64 [R]; returns float32 [H, R, D].
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [R, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal GQA attention of some query rows over all keys, in float32.

    q [Hq, R, D] (rows at absolute ``positions`` int64 [R]); k, v [Hkv, N, D] (any float
    dtype). Query head h reads KV head h // (Hq // Hkv); a row at position p sees keys 0..p.
    Returns float32 [Hq, R, D].
    """
    hq, hkv = q.shape[0], k.shape[0]
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = scale * (q.float() @ kf.transpose(1, 2))  # [Hq, R, N]
    cols = torch.arange(k.shape[1])
    scores = scores.masked_fill(cols[None, None, :] > positions[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vf


def _self_check(rec: _Recorder, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                theta: float | None) -> dict[str, float]:
    """Errors of the stored states against what the model computed (see module docstring)."""
    n = q.shape[1]
    positions = torch.arange(rec.check_from, n)
    ref_out = torch.cat(rec.out[layer], dim=1)  # [Hq, R, D]
    mine = reference_attention(q[:, rec.check_from:], k, v, positions, rec.scale[layer])
    result = {"attn_out_rel_err": float((mine - ref_out).abs().max() / ref_out.abs().max())}
    if theta is not None and layer in rec.k_raw:
        raw = torch.cat(rec.k_raw[layer], dim=1)  # [Hkv, R, D] pre-RoPE
        stored = k[:, rec.check_from:].float()
        rotated = _rope(raw, positions, theta)
        norm = stored.abs().max()
        result["rope_rel_err"] = float((stored - rotated).abs().max() / norm)
        result["unrotated_rel_diff"] = float((stored - raw).abs().max() / norm)
    return result


def _rope_theta(config: Any) -> float | None:
    """RoPE base of a default-RoPE config, or None when the RoPE variant is not plain."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type", "default") == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        return float(theta) if theta is not None else None
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None and not params else None


def capture(model: Any, tokenizer: Any, text_or_ids: str | Sequence[int] | torch.Tensor,
            layers: list[int], max_tokens: int, chunk: int | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Run the model once over the tokens and record post-RoPE q/k/v of the chosen layers.

    Args:
        model: a Llama-architecture transformers causal LM (batch 1, CPU or any device).
        tokenizer: its tokenizer (used only when ``text_or_ids`` is a string).
        text_or_ids: the text, or token ids (int sequence / tensor [N]).
        layers: layer indices to record (0-based, each < config.num_hidden_layers).
        max_tokens: the ids are truncated to this many tokens.
        chunk: None runs one forward pass; an int runs a chunked prefill of that many tokens per
            step with the model's KV cache (same states, bounded activation memory).
        progress: called with short progress lines (e.g. ``print``).

    Returns:
        ``{"meta": dict, "ids": int32 [N], "layers": {layer: {"q": float16 [Hq, N, D],
        "k": float16 [Hkv, N, D], "v": float16 [Hkv, N, D]}}}``; ``meta["check"][layer]`` holds
        the self-check errors and ``meta["seconds"]`` the wall time of the forward pass.
    """
    global _ACTIVE
    config = model.config
    num_layers = int(config.num_hidden_layers)
    chosen = sorted({int(x) for x in layers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_layers:
        raise ValueError(f"layers must be non-empty and within [0, {num_layers}), got {layers}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    ids = _to_ids(tokenizer, text_or_ids, max_tokens)
    n = int(ids.numel())
    device = next(model.parameters()).device
    num_kv = int(config.num_key_value_heads)

    _register()
    rec = _Recorder(layers=frozenset(chosen), check_from=max(n - CHECK_ROWS, 0))
    decoder_layers = model.model.layers
    handles = []
    for layer in chosen:
        def hook(_mod: Any, _inp: Any, out: torch.Tensor, layer: int = layer) -> None:
            rec.record_raw_key(layer, out, num_kv)
        handles.append(decoder_layers[layer].self_attn.k_proj.register_forward_hook(hook))
    tick = [time.perf_counter()]

    def layer_progress(_mod: Any, _inp: Any, _out: Any, index: int = 0) -> None:
        if progress is not None and chunk is None and index % 10 == 9:
            progress(f"  layer {index + 1}/{num_layers}  {time.perf_counter() - tick[0]:.1f} s")
    for index, block in enumerate(decoder_layers):
        handles.append(block.register_forward_hook(
            lambda m, i, o, index=index: layer_progress(m, i, o, index)))

    previous = config._attn_implementation
    from louver_client.hf import cache_argument

    cache_kw = cache_argument(model)
    start = time.perf_counter()
    try:
        model.set_attn_implementation(CAPTURE_ATTN)
        _ACTIVE = rec
        with torch.inference_mode():
            if chunk is None or chunk >= n:
                model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
            else:
                from transformers import DynamicCache

                kv_cache = DynamicCache(config=config)
                for lo in range(0, n, chunk):
                    hi = min(lo + chunk, n)
                    model(input_ids=ids[None, lo:hi].to(device), use_cache=True,
                          logits_to_keep=1, **{cache_kw: kv_cache})
                    if progress is not None:
                        elapsed = time.perf_counter() - start
                        progress(f"  {hi}/{n} tokens  {elapsed:.1f} s  {hi / elapsed:.0f} tok/s")
                del kv_cache
    finally:
        _ACTIVE = None
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    seconds = time.perf_counter() - start

    theta = _rope_theta(config)
    out_layers: dict[int, dict[str, torch.Tensor]] = {}
    check: dict[int, dict[str, float]] = {}
    for layer in chosen:
        if rec.seen.get(layer) != n:
            raise RuntimeError(f"layer {layer}: recorded {rec.seen.get(layer)} of {n} positions; "
                               "the attention function was not called as expected")
        q = torch.cat(rec.q[layer], dim=1).cpu().contiguous()
        k = torch.cat(rec.k[layer], dim=1).cpu().contiguous()
        v = torch.cat(rec.v[layer], dim=1).cpu().contiguous()
        out_layers[layer] = {"q": q, "k": k, "v": v}
        check[layer] = _self_check(rec, layer, q, k, v, theta)
    any_q = out_layers[chosen[0]]["q"]
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": MODEL_NAME,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "store_dtype": str(STORE_DTYPE).removeprefix("torch."),
        "tokens": n,
        "layers": chosen,
        "num_layers": num_layers,
        "num_q_heads": int(any_q.shape[0]),
        "num_kv_heads": num_kv,
        "head_dim": int(any_q.shape[2]),
        "scale": rec.scale[chosen[0]],
        "rope_theta": theta,
        "post_rope": True,
        "chunk": chunk if chunk is not None and chunk < n else None,
        "seconds": seconds,
        "tokens_per_second": n / seconds,
        "check": check,
        "segments": [{"start": 0, "end": n}],
        "torch": str(torch.__version__),
        "transformers": _transformers_version(),
        "python": platform.python_version(),
    }
    return {"meta": meta, "ids": ids.to(torch.int32), "layers": out_layers}


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


# --------------------------------------------------------------------------------------------
# Documents, several-document captures, files
# --------------------------------------------------------------------------------------------

_MODULE_HEADER = re.compile(r"^Module ([\w.]+)\.$", re.MULTILINE)


def document_ids(tokenizer: Any, tokens: int, skip: int) -> tuple[list[int], dict[str, Any]]:
    """At least ``tokens`` token ids (or fewer if the text runs out) of one stdlib document.

    The document is ``stdlib_text(chars, skip)``: module docstrings from the ``skip``-th
    module on. Returns (ids, info) with info = {"skip", "modules" (count), "first", "last"}.
    """
    from louver_client.smollm2 import stdlib_text

    chars = max(4 * tokens + 2000, 4000)
    while True:
        try:
            text = stdlib_text(chars, skip=skip)
            exhausted = False
        except RuntimeError:
            text = _all_text(skip)
            exhausted = True
        ids = tokenizer(text).input_ids
        if len(ids) >= tokens or exhausted:
            break
        chars = int(chars * 1.5 * tokens / max(len(ids), 1)) + 1000
    names = _MODULE_HEADER.findall(text)
    info = {"skip": skip, "modules": len(names), "first": names[0] if names else None,
            "last": names[-1] if names else None}
    return ids[:tokens], info


def _all_text(skip: int) -> str:
    """Every docstring from the ``skip``-th module on (stdlib_text raises when asked for more)."""
    from louver_client.smollm2 import stdlib_text

    lo, hi = 1, 10_000_000
    while lo < hi:  # largest min_chars that succeeds
        mid = (lo + hi + 1) // 2
        try:
            stdlib_text(mid, skip=skip)
            lo = mid
        except RuntimeError:
            hi = mid - 1
    return stdlib_text(lo, skip=skip)


def capture_documents(model: Any, tokenizer: Any, tokens: int, layers: list[int], docs: int = 1,
                      chunk: int | None = None, progress: Progress | None = None
                      ) -> dict[str, Any]:
    """Capture ``tokens`` tokens of real text made of ``docs`` disjoint stdlib documents.

    Each document gets tokens // docs tokens (the last one the remainder) and its own forward
    pass (positions restart at 0: a document never sees another), so ``docs`` is raised to
    ceil(tokens / max_position_embeddings) when needed. Document i starts at the first module
    after those used by document i-1. The states are concatenated along N; ``meta["segments"]``
    lists [start, end) per document with its module range. Same return format as ``capture``.
    """
    if tokens < 1 or docs < 1:
        raise ValueError(f"tokens and docs must be >= 1, got {tokens}, {docs}")
    max_pos = int(getattr(model.config, "max_position_embeddings", tokens))
    requested = docs
    docs = max(docs, math.ceil(tokens / max_pos))
    if docs > tokens:
        raise ValueError(f"{docs} documents cannot share {tokens} tokens")
    sizes = [tokens // docs] * docs
    sizes[-1] += tokens - sum(sizes)
    parts: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    skip = 0
    for index, size in enumerate(sizes):
        ids, info = document_ids(tokenizer, size, skip)
        if len(ids) < size:
            raise RuntimeError(f"document {index} (skip {skip}) has only {len(ids)} tokens; "
                               f"the stdlib docstrings cannot supply {tokens} tokens in {docs} "
                               "disjoint documents")
        skip += info["modules"]
        if progress is not None:
            progress(f"document {index + 1}/{docs}: {size} tokens, modules {info['first']}.."
                     f"{info['last']} (skip {info['skip']})")
        parts.append(capture(model, tokenizer, ids, layers, size, chunk=chunk, progress=progress))
        infos.append(info)
        if progress is not None:
            m = parts[-1]["meta"]
            progress(f"  captured in {m['seconds']:.1f} s ({m['tokens_per_second']:.0f} tok/s)")
    result = parts[0] if docs == 1 else _concatenate(parts)
    meta = result["meta"]
    meta["docs"] = docs
    meta["docs_requested"] = requested
    meta["text_source"] = TEXT_SOURCE
    offset = 0
    segments = []
    for size, info, part in zip(sizes, infos, parts, strict=True):
        segments.append({"start": offset, "end": offset + size, **info,
                         "seconds": part["meta"]["seconds"], "check": part["meta"]["check"]})
        offset += size
    meta["segments"] = segments
    return result


def _concatenate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate captures along N; the meta of the first, with totals and worst checks."""
    meta = dict(parts[0]["meta"])
    meta["tokens"] = sum(p["meta"]["tokens"] for p in parts)
    meta["seconds"] = sum(p["meta"]["seconds"] for p in parts)
    meta["tokens_per_second"] = meta["tokens"] / meta["seconds"]
    meta["check"] = {layer: {key: max(p["meta"]["check"][layer][key] for p in parts)
                             for key in parts[0]["meta"]["check"][layer]}
                     for layer in parts[0]["meta"]["check"]}
    layers = {layer: {name: torch.cat([p["layers"][layer][name] for p in parts], dim=1)
                      for name in ("q", "k", "v")}
              for layer in parts[0]["layers"]}
    ids = torch.cat([p["ids"] for p in parts])
    return {"meta": meta, "ids": ids, "layers": layers}


def save_capture(cap: dict[str, Any], path: str | Path) -> Path:
    """Write a capture (torch.save; a ``.json`` with the meta alongside). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cap = {**cap, "meta": _plain(cap["meta"])}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(cap, tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(cap["meta"], indent=2, default=str) + "\n")
    return path


def _plain(value: Any) -> Any:
    """``value`` with only the types ``torch.load(weights_only=True)`` accepts (others as str)."""
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (bool, int, float):  # subclasses (e.g. numpy.float64) as the base type
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def load_capture(path: str | Path) -> dict[str, Any]:
    """Load a capture written by ``save_capture`` (tensors on the CPU, float16 q/k/v)."""
    cap = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(cap, dict) or cap.get("meta", {}).get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a capture of format {FORMAT_VERSION}")
    return cap


def ensure_capture(path: str | Path, tokens: int, layers: list[int], docs: int = 1,
                   chunk: int | None = None, model: Any = None, tokenizer: Any = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Load the capture at ``path``, creating it first when it is missing or does not match.

    A file matches when its token count, layers and document count are the requested ones.
    Creating it loads the model (unless ``model`` and ``tokenizer`` are given) and runs
    ``capture_documents``.
    """
    path = Path(path)
    want = sorted({int(x) for x in layers})
    if path.is_file():
        try:
            cap = load_capture(path)
            meta = cap["meta"]
            if (meta["tokens"] == tokens and meta["layers"] == want
                    and meta.get("docs_requested", meta.get("docs")) == docs):
                return cap
        except (ValueError, RuntimeError, KeyError, OSError):
            pass
    if model is None or tokenizer is None:
        model, tokenizer = load_model(progress=progress is not None)
    cap = capture_documents(model, tokenizer, tokens, want, docs=docs, chunk=chunk,
                            progress=progress)
    save_capture(cap, path)
    return cap


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def capture_stats(cap: dict[str, Any], last: int = 64, eps: float = 1e-3) -> dict[int, dict]:
    """Sanity statistics per layer, computed in float32 from the stored states.

    For each of the last ``last`` queries (position t, seeing keys 0..t of the concatenated
    capture) and each query head: the fraction of keys with q.k >= max - sqrt(D) ln(1/eps),
    i.e. keys whose softmax weight is >= eps times the largest (the true kept fraction of the
    ``relative(eps)`` policy), and the weight on key 0 (attention sink). Also key norms and the
    outlier channels of the keys (mean |k| per channel: largest over median). In a capture of
    several documents, key 0 is the first key of the first document.
    """
    stats: dict[int, dict] = {}
    meta = cap["meta"]
    scale = float(meta["scale"])
    for layer, states in cap["layers"].items():
        q = states["q"].float()
        k = states["k"].float()
        hq, n, dim = q.shape
        group = hq // k.shape[0]
        rows = min(last, n)
        positions = torch.arange(n - rows, n)
        kq = k.repeat_interleave(group, dim=0)
        scores = q[:, n - rows:] @ kq.transpose(1, 2)  # [Hq, R, N]
        masked = scores.masked_fill(torch.arange(n)[None, None] > positions[None, :, None],
                                    float("-inf"))
        best = masked.amax(dim=-1, keepdim=True)
        kept = (masked >= best - math.sqrt(dim) * math.log(1.0 / eps)).sum(-1).float()
        frac = kept / (positions + 1).float()[None, :]
        weights = torch.softmax(scale * masked, dim=-1)
        norms = k.norm(dim=-1)  # [Hkv, N]
        channel = k.abs().mean(dim=1)  # [Hkv, D]
        ratio = channel.amax(dim=1) / channel.median(dim=1).values
        energy = (k ** 2).sum(dim=1)  # [Hkv, D]
        top2 = energy.topk(2, dim=1).values.sum(1) / energy.sum(1)
        stats[int(layer)] = {
            "key_norm_min": float(norms.min()),
            "key_norm_median": float(norms.median()),
            "key_norm_max": float(norms.max()),
            "key0_norm": [round(float(x), 2) for x in norms[:, 0]],
            "query_norm_median": float(q.norm(dim=-1).median()),
            "kept_frac_mean": float(frac.mean()),
            "kept_frac_max": float(frac.max()),
            "kept_keys_median": float(kept.median()),
            "sink_weight_key0": float(weights[..., 0].mean()),
            "argmax_is_key0": float((masked.argmax(-1) == 0).float().mean()),
            "outlier_channel": [int(x) for x in channel.argmax(dim=1)],
            "outlier_ratio": [round(float(x), 1) for x in ratio],
            "top2_channel_energy": [round(float(x), 3) for x in top2],
        }
    return stats


def print_stats(stats: dict[int, dict], eps: float, last: int) -> None:
    """Print the statistics of ``capture_stats`` as a table."""
    print(f"per layer, last {last} queries; kept = keys with weight >= {eps:g} x max, averaged "
          "over heads and queries")
    print(f"{'layer':>5} {'|k| min':>8} {'|k| med':>8} {'|k| max':>8} {'|k0| per head':>20} "
          f"{'kept %':>8} {'max %':>7} {'kept #':>7} {'w(k0)':>6} {'amax=0':>6} "
          f"{'outlier ch (ratio)':>28}")
    for layer, s in sorted(stats.items()):
        outliers = " ".join(f"{c}({r:g})" for c, r in
                            zip(s["outlier_channel"], s["outlier_ratio"], strict=True))
        k0 = "/".join(f"{x:.1f}" for x in s["key0_norm"])
        print(f"{layer:>5} {s['key_norm_min']:>8.2f} {s['key_norm_median']:>8.2f} "
              f"{s['key_norm_max']:>8.2f} {k0:>20} {100 * s['kept_frac_mean']:>8.3f} "
              f"{100 * s['kept_frac_max']:>7.2f} {s['kept_keys_median']:>7.0f} "
              f"{s['sink_weight_key0']:>6.3f} {s['argmax_is_key0']:>6.2f} {outliers:>28}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.capture``: capture, save, print timings, checks and statistics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29",
                        help="comma-separated layer indices")
    parser.add_argument("--out", type=Path, default=Path("data/captures/smollm2_8k.pt"))
    parser.add_argument("--docs", type=int, default=1,
                        help="number of disjoint documents, each run on its own")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunked prefill with this many tokens per step (default: one pass)")
    parser.add_argument("--last", type=int, default=64, help="queries used for the statistics")
    parser.add_argument("--eps", type=float, default=1e-3, help="relative threshold for stats")
    parser.add_argument("--stats-only", action="store_true",
                        help="load --out and print its statistics")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]

    if args.stats_only:
        cap = load_capture(args.out)
    else:
        t0 = time.perf_counter()
        model, tokenizer = load_model(progress=False)
        print(f"model loaded in {time.perf_counter() - t0:.1f} s "
              f"({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
        cap = capture_documents(model, tokenizer, args.tokens, layers, docs=args.docs,
                                chunk=args.chunk, progress=lambda line: print(line, flush=True))
        t1 = time.perf_counter()
        cap["meta"]["stats"] = {str(k): v for k, v in
                                capture_stats(cap, args.last, args.eps).items()}
        cap["meta"]["stats_params"] = {"last": args.last, "eps": args.eps}
        save_capture(cap, args.out)
        print(f"saved {args.out}: {args.out.stat().st_size / 2**20:.1f} MiB "
              f"(stats and save {time.perf_counter() - t1:.1f} s)")
    meta = cap["meta"]
    print(f"{meta['model']} ({meta['model_dtype']}, stored {meta['store_dtype']}): "
          f"{meta['tokens']} tokens, {meta['docs']} document(s), layers {meta['layers']}, "
          f"capture {meta['seconds']:.1f} s ({meta['tokens_per_second']:.0f} tok/s)")
    print("self-check (max over layers): attention output rel err "
          f"{max(c['attn_out_rel_err'] for c in meta['check'].values()):.2e}, RoPE rel err "
          f"{max(c.get('rope_rel_err', float('nan')) for c in meta['check'].values()):.2e}, "
          "unrotated rel diff "
          f"{min(c.get('unrotated_rel_diff', float('nan')) for c in meta['check'].values()):.2f}")
    print_stats(capture_stats(cap, args.last, args.eps), args.eps, args.last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
