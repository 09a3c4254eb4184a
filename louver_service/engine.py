"""Executes decoded requests against the session store: Append streams, Attend batches, Search.

Every public method validates everything it can before it changes any session, holds the locks
of the sessions it touches, and charges memory before storing tokens.

Batching seam: :func:`plan_batches` splits an Attend call into batches of items that one
batched kernel launch could run (same device and layer geometry, at most one item per
(session, layer), request order kept between dependent items). :meth:`Engine._attend_batch`
runs one batch; today it loops over the items, later it becomes one launch.

Threads: index builds (end of an Append stream) and attention over many keys run in a worker
thread so the event loop keeps serving other sessions; the small decode path runs inline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from louver_kernels import AttendOutput, Policy
from louver_service.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from louver_service.metrics import Metrics
from louver_service.sessions import LayerState, Session, SessionStore

T = TypeVar("T")


@dataclass(frozen=True)
class AppendChunk:
    """One decoded Append message.

    keys: [Hkv, T, D] and values: [Hkv, T, Dv] in the session dtype (CPU, as decoded); they
    cover positions [start, start + T) of ``layer``. ``field`` names the message in errors.
    """

    session: Session
    layer: int
    start: int
    keys: torch.Tensor
    values: torch.Tensor
    field: str = "chunk"


@dataclass(frozen=True)
class AppendSummary:
    """Outcome of an Append stream: tokens per layer after it, chunks stored and skipped."""

    layer_tokens: list[int]
    chunks_applied: int
    chunks_skipped: int


@dataclass(frozen=True)
class AttendJob:
    """One decoded Attend item.

    q: [Hq, D] float (any float dtype). new_keys [Hkv, T, D] / new_values [Hkv, T, Dv] in the
    session dtype, or both None. start: where new_keys must start (None: not checked).
    policy: None means the session default. ``field`` names the item in errors.
    """

    session: Session
    layer: int
    q: torch.Tensor
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None
    start: int | None = None
    policy: Policy | None = None
    field: str = "item"

    @property
    def new_tokens(self) -> int:
        """Tokens this item appends."""
        return 0 if self.new_keys is None else int(self.new_keys.shape[1])


@dataclass(frozen=True)
class AttendResult:
    """Attention of one item, on the CPU.

    output float32 [Hq, Dv]; lse, tau, dropped_mass_bound float32 [Hq]; num_candidates,
    num_attended int64 [Hq]; num_keys: keys in the layer (after the item's append).
    """

    output: torch.Tensor
    lse: torch.Tensor
    tau: torch.Tensor
    num_candidates: torch.Tensor
    num_attended: torch.Tensor
    dropped_mass_bound: torch.Tensor
    num_keys: int

    @classmethod
    def from_output(cls, out: AttendOutput, num_keys: int) -> AttendResult:
        """Copy a kernel result to the CPU."""
        return cls(output=out.output.float().cpu(), lse=out.lse.float().cpu(),
                   tau=out.tau.float().cpu(), num_candidates=out.num_candidates.cpu(),
                   num_attended=out.num_attended.cpu(),
                   dropped_mass_bound=out.dropped_mass_bound.float().cpu(), num_keys=num_keys)


@dataclass(frozen=True)
class SearchJob:
    """One decoded Search: q [Hq, D] float, tau float32 [Hq] (raw scores)."""

    session: Session
    layer: int
    q: torch.Tensor
    tau: torch.Tensor


@dataclass(frozen=True)
class Candidates:
    """Search result: head h's sorted positions are positions[offsets[h]:offsets[h + 1]];
    positions is int64 [total] on the CPU."""

    offsets: list[int]
    positions: torch.Tensor


def group_key(job: AttendJob) -> Hashable:
    """Items with equal keys can share one batched kernel launch (device, layer geometry,
    storage dtype and index parameters)."""
    s = job.session
    g = s.geometry
    return (s.device, g.num_q_heads, g.num_kv_heads, g.head_dim, g.value_dim, g.dtype, s.config)


def plan_batches(jobs: Sequence[AttendJob]) -> list[list[int]]:
    """Split jobs into batches (lists of job indices) that can each run as one launch.

    Batches run in list order. Items on the same (session, layer) depend on each other (the
    later one sees the earlier one's keys), so a repeated (session, layer) starts a new wave;
    within a wave, items are grouped by :func:`group_key`.
    """
    batches: list[list[int]] = []
    open_batches: dict[Hashable, int] = {}
    wave: set[tuple[str, int]] = set()
    for i, job in enumerate(jobs):
        slot = (job.session.id, job.layer)
        if slot in wave:
            open_batches.clear()
            wave.clear()
        key = group_key(job)
        if key not in open_batches:
            open_batches[key] = len(batches)
            batches.append([])
        batches[open_batches[key]].append(i)
        wave.add(slot)
    return batches


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("deadline exceeded between items")


class Engine:
    """Runs Append, Attend and Search against a SessionStore.

    Args:
        store: the sessions.
        metrics: where work is counted.
        inline_max_keys: calls over at most this many keys run on the event loop.
        compute_threads: worker threads for heavy work.
        dense_fallback: Relative steps on the Triton backend also run the layer's dense step
            where that measures faster (off unless given; the server passes
            Settings.dense_fallback, on by default).
    """

    def __init__(self, store: SessionStore, metrics: Metrics, inline_max_keys: int,
                 compute_threads: int = 2, dense_fallback: bool = False) -> None:
        self.store = store
        self.dense_fallback = dense_fallback
        self.metrics = metrics
        self.inline_max_keys = inline_max_keys
        self._executor = ThreadPoolExecutor(max_workers=compute_threads,
                                            thread_name_prefix="louver-compute")

    def close(self) -> None:
        """Wait for running thread work and release the worker threads."""
        self._executor.shutdown(wait=True)

    async def _run(self, heavy: bool, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` inline, or in a worker thread when ``heavy``.

        A cancelled caller still waits for the thread to finish, so the session locks it holds
        are not released while the thread mutates the session.
        """
        if not heavy:
            return fn(*args)
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():
                try:
                    await asyncio.wait({fut})
                except asyncio.CancelledError:
                    pass
            raise

    # ------------------------------------------------------------------ append

    async def append(self, chunks: AsyncIterable[AppendChunk]) -> AppendSummary:
        """Store a stream of chunks of one session, then index every layer it left pending.

        Each chunk is validated and charged on arrival; a chunk that repeats stored positions
        with identical contents is skipped. If the stream fails, the chunks stored before the
        failure stay (pending) and a retried stream skips them.
        """
        session: Session | None = None
        applied = skipped = 0
        async for chunk in chunks:
            if session is None:
                session = chunk.session
            elif chunk.session is not session:
                raise InvalidArgument(f"{chunk.field}.session_id: one Append stream carries "
                                      f"one session ({session.id!r})")
            async with self.store.hold([session]):
                if self._store_chunk(chunk):
                    applied += 1
                else:
                    skipped += 1
        if session is None:
            return AppendSummary([], 0, 0)
        async with self.store.hold([session]):
            if any(layer.has_pending for layer in session.layers):
                try:
                    await self._run(True, self._flush_all, session)
                finally:
                    self.store.reconcile(session)
            return AppendSummary(session.layer_tokens, applied, skipped)

    def _store_chunk(self, chunk: AppendChunk) -> bool:
        """Store a chunk (True) or recognise it as a retry of stored positions (False)."""
        session = chunk.session
        layer = session.layer(chunk.layer, f"{chunk.field}.layer")
        if self._is_retry(layer, chunk):
            return False
        keys = chunk.keys.to(session.device)
        values = chunk.values.to(session.device)
        tokens = int(keys.shape[1])
        self.store.charge({session: {chunk.layer: tokens}})
        layer.add(keys, values)
        self.store.reconcile(session, [chunk.layer])
        self.metrics.tokens_appended.inc(tokens)
        return True

    @staticmethod
    def _is_retry(layer: LayerState, chunk: AppendChunk) -> bool:
        """Whether the chunk repeats stored positions exactly; InvalidArgument on a gap, a
        partial overlap or differing contents."""
        length, tokens = layer.length, int(chunk.keys.shape[1])
        where = f"{chunk.field}.start: chunk [{chunk.start}, {chunk.start + tokens})"
        if chunk.start == length:
            return False
        if chunk.start > length:
            raise InvalidArgument(f"{where} leaves a gap: layer {chunk.layer} holds {length} "
                                  "tokens")
        if chunk.start + tokens > length:
            raise InvalidArgument(f"{where} partially overlaps the {length} stored tokens of "
                                  f"layer {chunk.layer}")
        keys, values = layer.stored(chunk.start, chunk.start + tokens)
        if not (torch.equal(keys, chunk.keys.to(keys.device))
                and torch.equal(values, chunk.values.to(values.device))):
            raise InvalidArgument(f"{where} differs from the stored tokens of layer "
                                  f"{chunk.layer}")
        return True

    @staticmethod
    def _flush_all(session: Session) -> None:
        """Index every pending chunk of every layer (torch work; may run in a thread)."""
        for layer in session.layers:
            layer.flush(session.config)

    # ------------------------------------------------------------------ attend

    async def attend(self, jobs: Sequence[AttendJob],
                     deadline: float | None = None) -> list[AttendResult]:
        """Append each item's new K/V and attend, in request order.

        Everything (layers, starts, non-empty layers, memory) is checked for all items before
        any session changes. ``deadline`` (time.monotonic()) is checked between batches.
        """
        if not jobs:
            return []
        touched: dict[Session, set[int]] = {}
        for job in jobs:
            touched.setdefault(job.session, set()).add(job.layer)
        async with self.store.hold(touched):
            self.store.charge(self._validate_attend(jobs))
            heavy = sum(job.session.layers[job.layer].length for job in jobs) \
                > self.inline_max_keys
            try:
                results = await self._run(heavy, self._attend_all, jobs, deadline)
            finally:
                for session, layers in touched.items():
                    self.store.reconcile(session, layers)
        self._record(jobs, results)
        return results

    @staticmethod
    def _validate_attend(jobs: Sequence[AttendJob]) -> dict[Session, dict[int, int]]:
        """Check every item against the state it will meet; returns the tokens each
        (session, layer) will grow by."""
        lengths: dict[tuple[str, int], int] = {}
        growth: dict[Session, dict[int, int]] = {}
        for job in jobs:
            layer = job.session.layer(job.layer, f"{job.field}.layer")
            slot = (job.session.id, job.layer)
            length = lengths.get(slot, layer.length)
            if job.start is not None and job.start != length:
                raise InvalidArgument(f"{job.field}.start: {job.start} must equal the length "
                                      f"{length} of layer {job.layer}")
            length += job.new_tokens
            if length == 0:
                raise FailedPrecondition(f"{job.field}: layer {job.layer} of session "
                                         f"{job.session.id!r} holds no keys yet")
            lengths[slot] = length
            if job.new_tokens:
                per_layer = growth.setdefault(job.session, {})
                per_layer[job.layer] = per_layer.get(job.layer, 0) + job.new_tokens
        return growth

    def _attend_all(self, jobs: Sequence[AttendJob], deadline: float | None
                    ) -> list[AttendResult]:
        """Run every batch of :func:`plan_batches`; results in item order."""
        results: list[AttendResult | None] = [None] * len(jobs)
        for batch in plan_batches(jobs):
            _check_deadline(deadline)
            for i, result in zip(batch, self._attend_batch([jobs[i] for i in batch]), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _attend_batch(self, jobs: Sequence[AttendJob]) -> list[AttendResult]:
        """Run one batch (independent items of one group_key). The seam for a batched launch."""
        results = []
        for job in jobs:
            session = job.session
            layer = session.layers[job.layer]
            if job.new_keys is not None and job.new_values is not None:
                layer.extend(job.new_keys.to(session.device), job.new_values.to(session.device),
                             session.config)
            else:
                layer.flush(session.config)
            # a layer without keys was refused by _validate_attend (LayerState.attend checks
            # it again). q's values were checked while decoding the request (finite,
            # magnitude): the step skips the index's second check and its host
            # synchronization; the layer moves q to the device (into the captured step's
            # input: one copy)
            out = layer.attend(job.q, job.policy or session.policy,
                               fallback=self.dense_fallback)
            results.append(AttendResult.from_output(out, layer.length))
        return results

    def _record(self, jobs: Sequence[AttendJob], results: Sequence[AttendResult]) -> None:
        m = self.metrics
        m.attend_items.inc(len(results))
        m.keys_scanned.inc(sum(r.num_keys * int(j.q.shape[0])
                               for j, r in zip(jobs, results, strict=True)))
        m.keys_candidate.inc(sum(int(r.num_candidates.sum()) for r in results))
        m.keys_attended.inc(sum(int(r.num_attended.sum()) for r in results))
        m.tokens_appended.inc(sum(j.new_tokens for j in jobs))

    # ------------------------------------------------------------------ search

    async def search(self, job: SearchJob) -> Candidates:
        """Candidate positions per query head (a superset of {n : q_h.k_n >= tau_h}); every
        head's list is empty on a layer with no keys."""
        async with self.store.hold([job.session]):
            layer = job.session.layer(job.layer)
            try:
                return await self._run(layer.length > self.inline_max_keys, self._search, job)
            finally:
                self.store.reconcile(job.session, [job.layer])

    @staticmethod
    def _search(job: SearchJob) -> Candidates:
        session = job.session
        layer = session.layers[job.layer]
        layer.flush(session.config)
        hq = int(job.q.shape[0])
        if layer.index is None:
            return Candidates([0] * (hq + 1), torch.empty(0, dtype=torch.int64))
        result = layer.index.search(job.q.to(session.device), job.tau.to(session.device))
        per_head = [result.candidates(h).to(torch.int64).cpu() for h in range(hq)]
        offsets = [0]
        for positions in per_head:
            offsets.append(offsets[-1] + int(positions.numel()))
        return Candidates(offsets, torch.cat(per_head))
