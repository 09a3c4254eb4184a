"""Host-side helpers shared by the Triton launchers (attention.py, dense_attention.py,
encode.py, quant_filter.py, decode.py).

Host code only; the device-side helpers shared by the kernels are in _device.py.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch
import triton

__all__ = ["FLOAT_DTYPES", "CounterPool", "attention_outputs", "capture_graph",
           "check_attention_inputs", "check_bound", "check_code_layout", "check_device_scalar",
           "check_int", "check_out", "graph_counters", "interpreted", "next_pow2", "num_sms",
           "pdl_launch", "side_stream"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_SM_COUNT: dict[int, int] = {}
_PDL_CAPABLE: dict[int, bool] = {}
# Programmatic dependent launch for the step's kernels (pdl_launch); False turns it off
# (a benchmark's comparison, or a driver that mishandles it).
USE_PDL = True
_CAPTURE_LOCK = threading.RLock()   # a nested capture fails in CUDA, never deadlocks
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_SIDE_LOCK = threading.Lock()
_GRAPH_SCOPE = threading.local()   # .counters: the counters of the graph being captured


def interpreted(kernel: object) -> bool:
    """Whether a @triton.jit kernel runs in Triton's interpreter (it was defined under
    TRITON_INTERPRET=1): no inline PTX there, and its own summation order."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _device_index(device: torch.device) -> int:
    """CUDA ordinal of ``device`` (-1 for a non-CUDA device)."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _current_stream(dev_id: int) -> int:
    """Raw handle of the current CUDA stream of device ``dev_id`` (0 when dev_id < 0).

    Uses torch's raw-stream getter where it exists: it skips building a Stream object, which
    matters at one launch per decode step."""
    if dev_id < 0:
        return 0
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get_raw is not None:
        return int(get_raw(dev_id))
    return int(torch.cuda.current_stream(dev_id).cuda_stream)


class CounterPool:
    """Per-(device, stream) int32 counter buffers that are zero between launches, and a set of
    its own for every CUDA graph (capture_graph).

    A kernel that uses them (arrival tickets, slot counters) must leave every counter it touches
    at zero when it ends; a buffer is zero at creation. Launches on one stream are ordered, so
    they never share a counter concurrently; eager launches on different streams use different
    buffers. A graph's launches use buffers made for that graph (kept alive by it): graphs
    replayed at once on different streams never share a counter, whichever stream they were
    captured on (torch hands out its pooled streams again and again). Each launcher module
    owns its own pool.

    A buffer that is outgrown is replaced by a larger one but kept alive: a CUDA graph recorded
    with it still points at it (a graph does not own the tensors it reads).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        """int32 [>= max(n, 64)] counters on ``device``: the graph's being captured on this
        thread (made in capture_graph's warm-up calls), else its current stream's."""
        dev_id = _device_index(device)
        scope: dict[tuple[int, int], list[torch.Tensor]] | None = getattr(
            _GRAPH_SCOPE, "counters", None)
        if scope is not None:
            held = scope.setdefault((id(self), dev_id), [])
            if not held or held[-1].numel() < n:
                if dev_id >= 0 and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("a graph's counters are made in its warm-up calls, "
                                       "not while it is captured")
                held.append(self._new(device, n, held[-1] if held else None))
            return held[-1]
        key = (dev_id, _current_stream(dev_id))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            if buf is not None:
                self._retired.append(buf)
            buf = self._new(device, n, buf)
            self._bufs[key] = buf
        return buf

    @staticmethod
    def _new(device: torch.device, n: int, old: torch.Tensor | None) -> torch.Tensor:
        size = max(n, 64, 2 * old.numel() if old is not None else 0)
        return torch.zeros(size, dtype=torch.int32, device=device)


def capture_graph(device: torch.device, body: Callable[[], None], warmups: int
                  ) -> torch.cuda.CUDAGraph:
    """body() recorded in a CUDA graph on a side stream of ``device``, after ``warmups`` eager
    calls on that stream (they compile the kernels and create the graph's own CounterPool
    buffers, which the returned graph keeps alive: a body whose launchers take counters needs
    warmups >= 1). The capture is thread_local: CUDA work that other threads issue meanwhile
    (a server serves other sessions from several threads) does not invalidate it. The capture
    neither synchronizes the device nor empties the allocator's cache (as entering
    torch.cuda.graph does): a step captured on one thread does not wait for the work other
    sessions queued, nor make them allocate device memory anew. Captures are serialized by a
    lock (one graph memory pool in the making at a time)."""
    # one capture at a time in this process (see the docstring)
    with _CAPTURE_LOCK, graph_counters() as counters:
        graph = _capture(device, body, warmups)
    graph.louver_counters = counters   # type: ignore[attr-defined]  # alive with the graph
    return graph


@contextlib.contextmanager
def graph_counters() -> Iterator[dict[tuple[int, int], list[torch.Tensor]]]:
    """Within it, CounterPool.get on this thread hands out buffers of a new set, yielded (per
    pool and device, every buffer made, the current one last): the counters of the graph that
    capture_graph records."""
    counters: dict[tuple[int, int], list[torch.Tensor]] = {}
    _GRAPH_SCOPE.counters = counters
    try:
        yield counters
    finally:
        _GRAPH_SCOPE.counters = None


def _capture(device: torch.device, body: Callable[[], None], warmups: int
             ) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            body()
        except BaseException:
            with contextlib.suppress(RuntimeError):   # the capture is invalid: body's error
                graph.capture_end()
            raise
        graph.capture_end()
    return graph


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of a CUDA ``device`` that work overlapping the decode stream runs on (the
    side-stream flush, encode.CapturedFlush): one per device, made once."""
    index = _device_index(device)
    with _SIDE_LOCK:
        stream = _SIDE_STREAMS.get(index)
        if stream is None:
            stream = torch.cuda.Stream(device)
            _SIDE_STREAMS[index] = stream
        return stream


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 132 (an H100/H200) otherwise."""
    if device.type != "cuda":
        return 132
    index = _device_index(device)
    count = _SM_COUNT.get(index)
    if count is None:
        count = torch.cuda.get_device_properties(index).multi_processor_count
        _SM_COUNT[index] = count
    return count


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The launch options of a kernel that starts with ``_device.await_prior(PDL)``: on a CUDA
    device of compute capability >= 9.0 (while USE_PDL), {"launch_pdl": True}, and the
    kernel's PDL flag is True; else {} and False (an older GPU, the CPU interpreter).

    Programmatic dependent launch lets the GPU start a kernel while the kernel before it on the
    stream is still running, once every program of that one has begun (await_prior lets them
    go first thing); the new kernel's programs then wait (griddepcontrol.wait) for it to
    complete and its memory to be visible before reading or writing anything, so only the
    launch latency between two dependent kernels is hidden, never a dependency (one exception,
    by contract with its caller: the filter's ``early`` start reads what the kernel before it
    does not write before it waits; quant_filter). A CUDA graph records it as a programmatic
    edge.

    The first kernel of an operation (the step's prologue, the dense pass) takes the PDL flag
    but not these options: it launches after whatever came before as usual, and only lets its
    successor start early. Launched with them too, so that each call chained into the next,
    back-to-back dense calls took 19-23 % longer at 32k-128k keys on an H200 than without PDL
    (20 calls in one graph; ``benchmarks/bench_back_to_back.py``)."""
    if not USE_PDL or device.type != "cuda":
        return {}
    index = _device_index(device)
    capable = _PDL_CAPABLE.get(index)
    if capable is None:
        capable = torch.cuda.get_device_capability(index) >= (9, 0)
        _PDL_CAPABLE[index] = capable
    return {"launch_pdl": True} if capable else {}


def next_pow2(x: int) -> int:
    """The smallest power of two >= x, for x >= 1."""
    return 1 << max(0, (x - 1).bit_length())


def check_device_scalar(name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Validate a scalar the kernel reads from memory: one int32/int64 element on ``device``."""
    if value.numel() != 1 or value.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} given as a tensor must hold one int32/int64 element, got "
                         f"shape {list(value.shape)} dtype {value.dtype}")
    if value.get_device() != _device_index(device):
        raise ValueError(f"{name} is on {value.device}, expected {device}")
    return value


def check_out(name: str, t: torch.Tensor | None, shape: tuple[int, ...],
              dtypes: tuple[torch.dtype, ...], dev_id: int) -> None:
    """An optional preallocated output: None, or a contiguous tensor of ``shape``, one of
    ``dtypes``, on CUDA ordinal ``dev_id`` (-1: CPU); ValueError otherwise."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or None")
    if tuple(t.shape) != shape or t.dtype not in dtypes or t.get_device() != dev_id:
        raise ValueError(f"{name} must be {list(dtypes)} of shape {list(shape)} on q's device, "
                         f"got {t.dtype} {list(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def attention_outputs(out: torch.Tensor | None, lse: torch.Tensor | None,
                      num_attended: torch.Tensor | None, hq: int, dv: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attention launcher's (out float32 [Hq, Dv], lse float32 [Hq], num_attended int32 or
    int64 [Hq]): the given ones validated (check_out), the missing ones allocated."""
    dev_id = _device_index(device)
    check_out("out", out, (hq, dv), (torch.float32,), dev_id)
    check_out("lse", lse, (hq,), (torch.float32,), dev_id)
    check_out("num_attended", num_attended, (hq,), (torch.int32, torch.int64), dev_id)
    return (torch.empty(hq, dv, dtype=torch.float32, device=device) if out is None else out,
            torch.empty(hq, dtype=torch.float32, device=device) if lse is None else lse,
            torch.empty(hq, dtype=torch.int32, device=device) if num_attended is None
            else num_attended)


def check_attention_inputs(q: object, keys: object, values: object, scale: object
                           ) -> tuple[int, int, int, int, int]:
    """Validate the (q, keys, values, scale) of an attention launcher: q [Hq, D], keys
    [Hkv, cap, D], values [Hkv, cap_v, Dv] on one device, float16 / bfloat16 / float32,
    contiguous last dims, Hq a multiple of Hkv, D and Dv powers of two in [16, 512], scale a
    finite float > 0. Returns (Hq, D, Hkv, min(cap, cap_v), Dv); ValueError otherwise."""
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(keys, torch.Tensor) \
        and isinstance(values, torch.Tensor)
    if q.dim() != 2:
        raise ValueError(f"q must be [Hq, D], got shape {list(q.shape)}")
    if keys.dim() != 3 or values.dim() != 3:
        raise ValueError(f"keys and values must be [Hkv, cap, D] and [Hkv, cap, Dv], got "
                         f"{list(keys.shape)} and {list(values.shape)}")
    hq, d = q.shape
    hkv, cap, dk = keys.shape
    dv = values.shape[2]
    for name, t in (("keys", keys), ("values", values)):
        if t.get_device() != q.get_device():
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if dk != d:
        raise ValueError(f"keys head dim {dk} != q head dim {d}")
    if values.shape[0] != hkv:
        raise ValueError(f"values has {values.shape[0]} KV heads, keys has {hkv}")
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    if not (_is_pow2(d) and 16 <= d <= 512) or not (_is_pow2(dv) and 16 <= dv <= 512):
        raise ValueError(f"D={d} and Dv={dv} must be powers of two in [16, 512]")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(float(scale)) or float(scale) <= 0.0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    return hq, d, hkv, min(cap, values.shape[1]), dv


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_bound(name: str, value: int | torch.Tensor, device: torch.device
                ) -> tuple[int, torch.Tensor | None]:
    """Validate a position bound: a Python int or a 1-element integer tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return 0, check_device_scalar(name, value, device)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or a 1-element integer tensor, got "
                         f"{type(value).__name__}")
    return value, None


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """value as an int in [lo, hi] (bool is not an int here); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def check_code_layout(bits: object, coarse: object, group: object, head_dim: int,
                      coarse_name: str = "coarse") -> tuple[int, int, int]:
    """Validate the QUANT code arguments of a launcher: (bits, group, and the field widths of
    reference.code_fields) -> (group, coarse field width, fine field width)."""
    from louver_kernels.reference import code_fields

    b = check_int("bits", bits, 1, 8)
    c = check_int(coarse_name, coarse, 1, b)
    cb, fb = code_fields(b, c)
    g = check_int("group", group, 1, head_dim)
    if head_dim % g:
        raise ValueError(f"group={g} must divide D={head_dim}")
    return g, cb, fb
