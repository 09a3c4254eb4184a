"""What the GPU kernels compile to, without a GPU: registers, spills, shared memory and the SASS
instructions of each loop, for the launches the decode step makes.

The launcher of a kernel is called with (unfilled) CPU tensors of the decode step's shapes and a
stand-in kernel that records the launch instead of running it, so the arguments, constexprs and
options are exactly the launcher's. The launch is then compiled for sm_90 with Triton's own
toolchain (its bundled ptxas, nvdisasm and cuobjdump) and the SASS summarized. Every loop is a
backward branch in the SASS; its body's instruction count is what one iteration issues per warp.
With ``--lines``, the body of the largest innermost loop is broken down by source line (with
each line's opcodes: where a loop spends its instructions, e.g. conversions or shuffles).

Not under Triton's interpreter (TRITON_INTERPRET must be unset: the kernels must be JIT
functions).

    python -m benchmarks.sass filter --shape 32/8/128
    python -m benchmarks.sass attention --shape 9/3/64 --lines
    python -m benchmarks.sass dense --shape 32/8/128
    python -m benchmarks.sass filter --json          # machine-readable (tests/kernels/test_sass.py)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32",
          torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments by name, launch options."""

    kernel: Any
    args: dict[str, Any]
    options: dict[str, Any]


@contextmanager
def recording(module: Any, name: str) -> Iterator[list[Launch]]:
    """Replace ``module.name`` (a @triton.jit kernel) by a recorder for the duration."""
    kernel = getattr(module, name)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels run under Triton's interpreter: unset TRITON_INTERPRET")
    launches: list[Launch] = []

    class _Recorder:
        def __getitem__(self, grid: object) -> Callable[..., None]:
            def launch(*args: Any, **kwargs: Any) -> None:
                named = dict(zip(kernel.arg_names, args, strict=False))
                named.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
                options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
                launches.append(Launch(kernel, named, options))
            return launch

    setattr(module, name, _Recorder())
    try:
        yield launches
    finally:
        setattr(module, name, kernel)


def compile_launch(launch: Launch, arch: int = 90) -> Any:
    """Compile a recorded launch for sm_``arch`` with the specializations Triton's launcher
    applies: ints equal to 1 become constants, pointers and ints divisible by 16 say so."""
    kernel = launch.kernel
    skip = set(kernel.do_not_specialize) | {kernel.arg_names[i] for i in
                                             getattr(kernel, "do_not_specialize_indices", ())}
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(kernel.arg_names):
        value = launch.args[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]      # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in skip:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(value).__name__}")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)


@dataclass
class Report:
    """What a compiled kernel is made of."""

    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    instructions: int
    loops: list[dict[str, int]] = field(default_factory=list)   # start, end, instructions
    opcodes: dict[str, int] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)   # largest innermost loop, per line
    line_opcodes: dict[str, dict[str, int]] = field(default_factory=dict)   # the same, by opcode


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout


def analyze(compiled: Any, lines: bool = False) -> Report:
    """Registers, spills (stack and local bytes), shared memory and the loops of the SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _tool("cuobjdump", "-res-usage", path)
        sass = _tool("nvdisasm", "-c", "-g", path)

    def usage_of(key: str) -> int:
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    instrs: list[tuple[str, str]] = []          # (source line, instruction)
    labels: dict[str, int] = {}
    where = "?"
    for raw in sass.splitlines():
        m = re.search(r'//## File "(.*?)", line (\d+)', raw)
        if m:
            where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = re.match(r"^\s*\.(L_x_\d+):", raw)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", raw)
        if m:
            instrs.append((where, m.group(1)))
    loops = []
    for i, (_, text) in enumerate(instrs):
        m = re.search(r"BRA.*?(L_x_\d+)", text)
        if m and labels.get(m.group(1), len(instrs)) <= i:
            start = labels[m.group(1)]
            loops.append({"start": start, "end": i, "instructions": i - start + 1})
    def opcode(text: str) -> str:
        return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]

    opcodes = collections.Counter(opcode(text) for _, text in instrs)
    per_line: dict[str, int] = {}
    line_opcodes: dict[str, dict[str, int]] = {}
    innermost = [lp for lp in loops if not any(
        o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]
    if lines and innermost:
        big = max(innermost, key=lambda lp: lp["instructions"])
        body = instrs[big["start"]: big["end"] + 1]
        per_line = dict(collections.Counter(w for w, _ in body).most_common())
        by_line: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        for w, text in body:
            by_line[w][opcode(text)] += 1
        line_opcodes = {w: dict(by_line[w].most_common()) for w in per_line}
    return Report(registers=usage_of("REG"), stack_bytes=usage_of("STACK"),
                  local_bytes=usage_of("LOCAL"), shared_bytes=compiled.metadata.shared,
                  instructions=len(instrs), loops=loops, opcodes=dict(opcodes.most_common()),
                  lines=per_line, line_opcodes=line_opcodes)


# ----------------------------------------------------------------------------------------------
# The decode step's launches (shapes as CapturedStep makes them: counts read on the device)
# ----------------------------------------------------------------------------------------------


def filter_launch(hq: int, hkv: int, d: int, cap: int = 1 << 17, bits: int = 6,
                  coarse: int = 4, group: int = 16, segment: int = 256) -> Launch:
    """The candidate filter of a QUANT index of capacity ``cap`` (fp16 queries)."""
    from louver_kernels.triton import quant_filter as qf

    e = torch.empty
    with recording(qf, "_quant_filter_kernel") as launches:
        qf.quant_filter(
            e(hq, d, dtype=torch.float16), e(hkv, cap, d * bits // 8, dtype=torch.uint8),
            e(hkv, cap, d // group, dtype=torch.float16), e(hkv, cap // segment, d),
            e(hkv, cap // segment, d), e(hq), e(hq),
            num_indexed=torch.zeros(1, dtype=torch.int32), bits=bits, coarse_bits=coarse,
            group=group, scale=d ** -0.5, segment_size=segment)
    return launches[0]


def attention_launch(hq: int, hkv: int, d: int, cap: int = 1 << 17) -> Launch:
    """The sparse attention of the decode step (fp16 K/V, certificate fused)."""
    from louver_kernels.triton import attention as at

    e = torch.empty
    with recording(at, "_sparse_attention_kernel") as launches:
        at.sparse_attention(
            e(hq, d, dtype=torch.float16), e(hkv, cap, d, dtype=torch.float16),
            e(hkv, cap, d, dtype=torch.float16), e(hq), scale=d ** -0.5,
            cand_pos=e(hkv, cap, dtype=torch.int32), cand_count=e(hkv, dtype=torch.int32),
            buffer_start=torch.zeros(1, dtype=torch.int32),
            buffer_end=torch.zeros(1, dtype=torch.int32), below_lse=e(hq), pruned_lse=e(hq),
            dropped=e(hq), num_candidates=e(hq, dtype=torch.int64))
    return launches[0]


def dense_launch(hq: int, hkv: int, d: int, cap: int = 1 << 17) -> Launch:
    """The dense step's split-K pass (fp16 K/V, end read on the device); its merge launch is
    recorded too but not returned."""
    from louver_kernels.triton import dense_attention as da

    e = torch.empty
    with recording(da, "_dense_attention_kernel") as launches, \
            recording(da, "_dense_merge_kernel"):
        da.dense_attention(
            e(hq, d, dtype=torch.float16), e(hkv, cap, d, dtype=torch.float16),
            e(hkv, cap, d, dtype=torch.float16), scale=d ** -0.5,
            end=torch.zeros(1, dtype=torch.int32))
    return launches[0]


KERNELS = {"filter": filter_launch, "attention": attention_launch, "dense": dense_launch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--shape", default="32/8/128", help="Hq/Hkv/D")
    parser.add_argument("--lines", action="store_true",
                        help="break the largest innermost loop down by source line")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    hq, hkv, d = (int(x) for x in args.shape.split("/"))
    launch = KERNELS[args.kernel](hq, hkv, d)
    report = analyze(compile_launch(launch), lines=args.lines)
    if args.json:
        print(json.dumps(asdict(report)))
        return
    print(f"{args.kernel} {args.shape}: {report.registers} registers, stack "
          f"{report.stack_bytes} B, local {report.local_bytes} B, shared {report.shared_bytes} B, "
          f"{report.instructions} instructions; options {launch.options}")
    for lp in report.loops:
        print(f"  loop [{lp['start']}, {lp['end']}]: {lp['instructions']} instructions")
    print("  opcodes:", ", ".join(f"{k} {v}" for k, v in list(report.opcodes.items())[:16]))
    for where, count in list(report.lines.items())[:30]:
        ops = ", ".join(f"{k} {v}" for k, v in list(report.line_opcodes[where].items())[:6])
        print(f"  {count:5d}  {where:28s} {ops}")


if __name__ == "__main__":
    main()
