"""Calls back to back in one CUDA graph: the dense attention, the sparse step and cuDNN's SDPA,
with and without programmatic dependent launch (CUDA only).

``bench_gpu`` times one step per graph replay with the L2 flushed in between (a step among a
model's other kernels). Here CALLS calls of the same operation are recorded in one graph and
the replay's time is divided by CALLS (median of 15 replays after warm-up, CUDA events): the
launch floor is amortized and each call's start meets the previous call's end, the regime of
many layers' or sessions' steps issued in a row. Per shape and context:

    sdpa_us                   torch SDPA, cuDNN backend (GQA), the same inputs
    dense_us, dense_nopdl_us  ``dense_attention`` over every key, PDL on (the default) / off
    single_dense_us, single_sdpa_us
                              one call per graph (CALLS = 1), for comparison
    sparse_us, sparse_nopdl_us
                              the eager sparse step (``LouverIndex.attend``, Relative(1e-3),
                              validate=False; real keys only), PDL on / off

Dense inputs are random float16 keys and values (the dense pass reads every key whatever
their values); the sparse step runs on real SmolLM2 keys (``--capture``, made by
``bench_gpu --make-capture``; contexts beyond it repeat it, as in bench_gpu).

    python -m benchmarks.bench_back_to_back --capture real_l20_64k.pt --out b2b.json
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.bench_gpu import SHAPES
from benchmarks.gpu_common import capture_args, record_graph, repeated_kv, write_result
from louver_kernels import IndexConfig, LouverIndex, Relative
from louver_kernels.triton import _launch
from louver_kernels.triton.dense_attention import dense_attention

CALLS = 20


def graph_us(fn: Callable[[], object], calls: int = CALLS) -> float:
    """Median time per call of ``calls`` calls of fn recorded in one CUDA graph."""
    graph = record_graph(fn, calls, warmups=3)
    graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def with_pdl(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with programmatic dependent launch on / off for its launches (captured ones too)."""
    def call() -> object:
        saved = _launch.USE_PDL
        _launch.USE_PDL = on
        try:
            return fn()
        finally:
            _launch.USE_PDL = saved
    return call


def dense_row(hq: int, hkv: int, d: int, n: int, dev: torch.device) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = torch.randn(hkv, n, d, device=dev, dtype=torch.float16)
    v = torch.randn(hkv, n, d, device=dev, dtype=torch.float16)
    q = torch.randn(hq, d, device=dev, dtype=torch.float16)
    end = torch.tensor([n], dtype=torch.int32, device=dev)
    out = torch.empty(hq, d, device=dev)
    lse = torch.empty(hq, device=dev)
    natt = torch.empty(hq, dtype=torch.int32, device=dev)

    def dense() -> object:
        return dense_attention(q, k, v, scale=d ** -0.5, end=end, out=out, lse=lse,
                               num_attended=natt)

    def sdpa() -> object:
        return F.scaled_dot_product_attention(q.view(1, hq, 1, d), k.view(1, hkv, n, d),
                                              v.view(1, hkv, n, d), enable_gqa=True)

    row: dict[str, Any] = {"shape": f"{hq}/{hkv}/{d}", "context": n}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["sdpa_us"] = graph_us(sdpa)
        row["single_sdpa_us"] = graph_us(sdpa, calls=1)
    row["dense_us"] = graph_us(with_pdl(True, dense))
    row["dense_nopdl_us"] = graph_us(with_pdl(False, dense))
    row["single_dense_us"] = graph_us(with_pdl(True, dense), calls=1)
    return row


def sparse_rows(capture: str, contexts: list[int], dev: torch.device) -> list[dict[str, Any]]:
    real = torch.load(capture, weights_only=True)
    rows = []
    for label, make in SHAPES.values():
        cap = make(real)
        q = cap["q"][:, -1].to(dev)
        for n in contexts:
            keys, values = repeated_kv(cap["k"], cap["v"], n, dev)
            index = LouverIndex.build(keys, values, IndexConfig(backend="triton"))

            def step(index: LouverIndex = index, q: torch.Tensor = q) -> object:
                return index.attend(q, Relative(1e-3), validate=False)

            rows.append({"shape": label, "context": n,
                         "sparse_us": graph_us(with_pdl(True, step)),
                         "sparse_nopdl_us": graph_us(with_pdl(False, step))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    args = capture_args(__doc__, "bench_back_to_back", "8192,32768,131072")
    dev = torch.device("cuda")
    contexts = [int(x) for x in args.contexts.split(",")]
    dense = []
    for hq, hkv, d in ((9, 3, 64), (32, 8, 128)):
        for n in contexts:
            dense.append(dense_row(hq, hkv, d, n, dev))
            print(json.dumps(dense[-1]), flush=True)
    write_result(args.out, "bench_back_to_back", {
        "calls_per_graph": CALLS, "pdl_available": bool(_launch.pdl_launch(dev)), "dense": dense,
        "sparse": sparse_rows(args.capture, [n for n in contexts if n >= 32768], dev)})


if __name__ == "__main__":
    main()
