"""Several sessions' decode steps at once against one batched SDPA call (CUDA only).

``bench_gpu`` times one session's step alone: a chain of dependent launches and memory accesses
that leaves most of the GPU idle (the kernels are latency-bound at low occupancy). A server
decodes many sessions at a time. Here B sessions, each its own index over the same real keys
(``--capture``, repeated beyond the capture as in bench_gpu) and its own query, run their steps
as B parallel branches of one CUDA graph (each branch the body of the session's
``CapturedStep``: prologue, filter, attention; its own stream, so its own arrival counters).
The queries are the capture's last QUERIES decode queries, in QUERIES / B groups of B (one
replay time per group, the median over the groups): every B sees the same queries, whose
candidate fractions differ (2.2-5.7 % among the last four, 32/8/128 at 128k keys). The baseline
is the strongest dense call for the same work: one torch SDPA call over the batch of B
sequences (every backend that takes the shapes, GQA or packed, the fastest;
``bench_gpu.sdpa_best``). Louver's dense step (Dense policy, every key) runs the same way as a
third entry. Per shape, context and B: median us of a graph replay (triton.testing.do_bench, L2
flushed in between), per session (divided by B), and the ratios to SDPA's. Checks, per session
and group: the attended counts of the concurrent replay equal those of the session's step run
alone, the outputs agree within 1e-5, and no key with an exact score >= tau is left out (zero
false negatives).

    python -m benchmarks.bench_sessions --capture real_l20_64k.pt --out sessions.json
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import torch
import triton
import triton.testing

from benchmarks.bench_gpu import SHAPES, _missed, sdpa_best
from benchmarks.gpu_common import capture_args, record_graph, repeated_kv, write_result
from louver_kernels import IndexConfig, LouverIndex, Relative
from louver_kernels import reference as ref
from louver_kernels.threshold import Dense, Policy
from louver_kernels.triton.decode import CapturedStep

SESSIONS = (1, 4, 16)
QUERIES = 16
EPS = 1e-3


def _branches(steps: list[CapturedStep], streams: list[torch.cuda.Stream]) -> None:
    """Each step's body on its own stream, forked from and joined into the current one."""
    here = torch.cuda.current_stream()
    for step, stream in zip(steps, streams, strict=True):
        stream.wait_stream(here)
        with torch.cuda.stream(stream):
            step._body()
    for stream in streams:
        here.wait_stream(stream)


def _concurrent(indexes: list[LouverIndex], policy: Policy, hq: int, dtype: torch.dtype
                ) -> tuple[torch.cuda.CUDAGraph, list[CapturedStep]]:
    """One graph replaying the B sessions' steps as parallel branches, and the steps (each
    reads its query from ``step.q``; their outputs hold the last replay's results)."""
    steps = [CapturedStep(index, policy, hq, q_dtype=dtype, graph=False) for index in indexes]
    streams = [torch.cuda.Stream() for _ in steps]
    return record_graph(lambda: _branches(steps, streams)), steps


def _replay_us(graph: torch.cuda.CUDAGraph) -> float:
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median")


def run(k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, n: int, b: int,
        dev: torch.device) -> dict[str, Any]:
    """One context and number of sessions."""
    keys, values = repeated_kv(k, v, n, dev)
    qs = qs[:, -QUERIES:].to(dev)
    indexes = [LouverIndex.build(keys.clone(), values.clone(), IndexConfig(backend="triton"))
               for _ in range(b)]
    graph, steps = _concurrent(indexes, Relative(EPS), qs.shape[0], qs.dtype)
    times, same, worst, false_neg = [], True, 0.0, 0
    for g in range(QUERIES // b):
        q = qs[:, g * b:(g + 1) * b]
        for j, step in enumerate(steps):
            step.q.copy_(q[:, j])
        times.append(_replay_us(graph))
        graph.replay()
        torch.cuda.synchronize()
        for j, (index, step) in enumerate(zip(indexes, steps, strict=True)):
            alone = index.attend(q[:, j], Relative(EPS))   # the session's step by itself
            same = same and torch.equal(alone.num_attended, step.num_att)
            worst = max(worst, float((alone.output - step.out).abs().max()))
            false_neg += _missed(ref.scores(q[:, j], keys), step.tau, index.num_indexed,
                                 step.num_att)
    sparse_us = statistics.median(times)
    dense_graph, _ = _concurrent(indexes, Dense(), qs.shape[0], qs.dtype)  # reads every key
    dense_us = _replay_us(dense_graph)
    del indexes, steps, graph, dense_graph
    q4 = qs[:, :b].transpose(0, 1)[:, :, None, :]              # [B, Hq, 1, D]
    k4, v4 = keys[None].expand(b, -1, -1, -1).clone(), values[None].expand(b, -1, -1, -1).clone()
    sdpa = sdpa_best(q4, k4, v4)
    sdpa_us = min(sdpa.values())
    return {"context": n, "sessions": b, "sdpa_us": sdpa_us, "sdpa_backend_us": sdpa,
            "louver_us": sparse_us, "louver_us_per_group": times, "louver_dense_us": dense_us,
            "sdpa_us_per_session": sdpa_us / b, "louver_us_per_session": sparse_us / b,
            "ratio": sparse_us / sdpa_us, "ratio_dense": dense_us / sdpa_us,
            "same_as_alone": same and worst < 1e-5, "max_abs_diff": worst,
            "false_negatives": false_neg}


def main() -> None:
    args = capture_args(__doc__, "bench_sessions", "8192,32768,131072")
    real = torch.load(args.capture, weights_only=True)
    dev = torch.device("cuda")
    rows = []
    for shape in ("smollm2", "llama"):
        label, make = SHAPES[shape]
        cap = make(real)
        for n in (int(c) for c in args.contexts.split(",")):
            for b in SESSIONS:
                row = {"shape": label, **run(cap["k"], cap["v"], cap["q"], n, b, dev)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                torch.cuda.empty_cache()
    write_result(args.out, "bench_sessions", {
        "eps": EPS, "queries": QUERIES,
        "timing": "median of triton.testing.do_bench over replays of one CUDA graph holding the "
                  "B sessions' steps as parallel branches (Louver; the median over QUERIES / B "
                  "groups of queries) or one batched call (SDPA, fastest backend); L2 flushed "
                  "between replays",
        "rows": rows})


if __name__ == "__main__":
    main()
