"""Service messages <-> the engine's and store's types.

Tensors, policies and index parameters go through :mod:`louver_proto.codec` (the one codec);
this module only resolves sessions, checks each field against the session's geometry and
assembles the service's messages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from louver_kernels import Fixed, IndexConfig, Policy
from louver_kernels.index import MAX_KEY_ABS, MAX_QUERY_ABS
from louver_proto import codec, pb
from louver_service.engine import (
    AppendChunk,
    AppendSummary,
    AttendJob,
    AttendResult,
    Candidates,
    SearchJob,
)
from louver_service.errors import InvalidArgument
from louver_service.sessions import Geometry, Session, SessionSpec, SessionStore

logger = logging.getLogger(__name__)

# Largest magnitudes the kernels accept (float32 scores must stay finite) are checked while
# decoding, so such a request fails before it changes any session.


def _check_magnitude(t: torch.Tensor, limit: float, field: str) -> torch.Tensor:
    if t.numel() and float(t.abs().max()) > limit:
        raise InvalidArgument(f"{field}: entries above {limit:g} in magnitude")
    return t


def geometry_from_proto(msg: pb.ModelGeometry) -> Geometry:
    """Decode and validate a geometry (value_dim 0 means head_dim)."""
    return Geometry(num_layers=msg.num_layers, num_q_heads=msg.num_q_heads,
                    num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
                    value_dim=msg.value_dim or msg.head_dim,
                    dtype=codec.dtype_from_proto(msg.dtype, "geometry.dtype"))


def geometry_to_proto(g: Geometry) -> pb.ModelGeometry:
    """Encode a geometry."""
    return pb.ModelGeometry(num_layers=g.num_layers, num_q_heads=g.num_q_heads,
                            num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
                            value_dim=g.value_dim, dtype=codec.dtype_to_proto(g.dtype))


def _policy(msg: pb.ThresholdPolicy, num_q_heads: int, field: str) -> Policy | None:
    """Decode a policy and check a Fixed policy's length against the query heads."""
    policy = codec.policy_from_proto(msg, field)
    if isinstance(policy, Fixed):
        try:
            policy.taus(num_q_heads)
        except ValueError as exc:
            raise InvalidArgument(f"{field}.fixed: {exc}") from None
    return policy


def session_spec_from_proto(req: pb.CreateSessionRequest, default_config: IndexConfig,
                            default_policy: Policy) -> SessionSpec:
    """Decode a CreateSession request, resolving zero fields against the server defaults.

    The server's decode backend (``default_config.backend``) applies to the sessions its
    kernels can run; a session they cannot (another index kind, a code layout or head dim the
    Triton kernels do not implement) runs on the torch backend instead of failing.
    """
    geometry = geometry_from_proto(req.geometry)
    config = codec.index_config_from_proto(req.index, default_config)   # backend: auto
    try:
        config.validate_dims(geometry.head_dim)
    except ValueError as exc:
        raise InvalidArgument(f"index: {exc}") from None
    if default_config.backend != "auto":
        try:
            chosen = replace(config, backend=default_config.backend)
            chosen.validate_dims(geometry.head_dim)
            config = chosen
        except ValueError as exc:
            logger.info("session %r runs on the torch backend: %s", req.session_id, exc)
    policy = _policy(req.default_policy, geometry.num_q_heads, "default_policy")
    return SessionSpec(geometry=geometry, config=config, policy=policy or default_policy,
                       session_id=req.session_id, expected_tokens=req.expected_tokens)


def session_info(session: Session) -> pb.SessionInfo:
    """Encode a session's state."""
    return pb.SessionInfo(
        session_id=session.id, geometry=geometry_to_proto(session.geometry),
        index=codec.index_config_to_proto(session.config),
        default_policy=codec.policy_to_proto(session.policy),
        layer_tokens=session.layer_tokens, kv_bytes=session.kv_bytes,
        index_bytes=session.index_bytes, created_unix_s=session.created_unix_s,
        last_used_unix_s=session.last_used_unix_s)


def _layer(session: Session, layer: int, field: str) -> int:
    session.layer(layer, field)  # range check
    return layer


def _query(msg: pb.Tensor, g: Geometry, field: str) -> torch.Tensor:
    """q [Hq, D] in any float dtype."""
    q = codec.tensor_from_proto(msg, field, dtypes=codec.FLOAT_DTYPES,
                                shape=(g.num_q_heads, g.head_dim))
    return _check_magnitude(q, MAX_QUERY_ABS, field)


def _kv(keys: pb.Tensor, values: pb.Tensor, g: Geometry, field_k: str, field_v: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [Hkv, T, D] and values [Hkv, T, Dv], both in the session dtype."""
    k = codec.tensor_from_proto(keys, field_k, dtypes=(g.dtype,),
                                shape=(g.num_kv_heads, None, g.head_dim))
    v = codec.tensor_from_proto(values, field_v, dtypes=(g.dtype,),
                                shape=(g.num_kv_heads, k.shape[1], g.value_dim))
    return _check_magnitude(k, MAX_KEY_ABS, field_k), v


def append_chunk_from_proto(req: pb.AppendRequest, store: SessionStore, index: int
                            ) -> AppendChunk:
    """Decode the ``index``-th message of an Append stream."""
    field = f"chunks[{index}]"
    session = store.get(req.session_id)
    keys, values = _kv(req.keys, req.values, session.geometry, f"{field}.keys",
                       f"{field}.values")
    return AppendChunk(session=session, layer=_layer(session, req.layer, f"{field}.layer"),
                       start=req.start, keys=keys, values=values, field=field)


def append_response(summary: AppendSummary) -> pb.AppendResponse:
    """Encode an AppendSummary."""
    return pb.AppendResponse(layer_tokens=summary.layer_tokens,
                             chunks_applied=summary.chunks_applied,
                             chunks_skipped=summary.chunks_skipped)


def attend_jobs_from_proto(req: pb.AttendRequest, store: SessionStore) -> list[AttendJob]:
    """Decode every item of an Attend request (all of them before anything runs)."""
    return [_attend_job(item, store, f"items[{i}]") for i, item in enumerate(req.items)]


def _attend_job(item: pb.AttendItem, store: SessionStore, field: str) -> AttendJob:
    session = store.get(item.session_id)
    g = session.geometry
    q = _query(item.q, g, f"{field}.q")
    has_k, has_v = item.HasField("new_keys"), item.HasField("new_values")
    if has_k != has_v:
        raise InvalidArgument(f"{field}: new_keys and new_values must be sent together")
    keys = values = None
    if has_k:
        keys, values = _kv(item.new_keys, item.new_values, g, f"{field}.new_keys",
                           f"{field}.new_values")
    return AttendJob(session=session, layer=_layer(session, item.layer, f"{field}.layer"), q=q,
                     new_keys=keys, new_values=values,
                     start=item.start if item.HasField("start") else None,
                     policy=_policy(item.policy, g.num_q_heads, f"{field}.policy"), field=field)


def attend_response(results: list[AttendResult]) -> pb.AttendResponse:
    """Encode Attend results, in item order."""
    return pb.AttendResponse(results=[_attend_result(r) for r in results])


def _attend_result(r: AttendResult) -> pb.AttendResult:
    stats = pb.AttendStats(tau=r.tau.tolist(), num_candidates=r.num_candidates.tolist(),
                           num_attended=r.num_attended.tolist(),
                           dropped_mass_bound=r.dropped_mass_bound.tolist(),
                           num_keys=r.num_keys)
    return pb.AttendResult(output=codec.tensor_to_proto(r.output),
                           lse=codec.tensor_to_proto(r.lse), stats=stats)


def search_job_from_proto(req: pb.SearchRequest, store: SessionStore) -> SearchJob:
    """Decode a Search request; tau has 1 or Hq finite values."""
    session = store.get(req.session_id)
    g = session.geometry
    taus = list(req.tau)
    if len(taus) not in (1, g.num_q_heads) or not all(math.isfinite(t) for t in taus):
        raise InvalidArgument(f"tau: expected 1 or {g.num_q_heads} finite values, got "
                              f"{len(taus)}")
    tau = torch.tensor(taus, dtype=torch.float32).expand(g.num_q_heads).contiguous()
    return SearchJob(session=session, layer=_layer(session, req.layer, "layer"),
                     q=_query(req.q, g, "q"), tau=tau)


def search_response(c: Candidates) -> pb.SearchResponse:
    """Encode candidates."""
    return pb.SearchResponse(offsets=c.offsets, positions=codec.tensor_to_proto(c.positions))
