"""The whole decode step through the Triton kernels (IndexConfig(backend="triton")) against
the plain-torch backend over the same keys: same tau, same attended set, same output and LSE,
and a certificate that bounds the true dropped mass.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (small shapes).
"""

from __future__ import annotations

import math

import pytest
import torch

from louver_kernels import Dense, Fixed, IndexConfig, IndexKind, LouverIndex, Relative
from louver_kernels import reference as ref
from louver_kernels.index import MAX_QUERY_ABS, AttendOutput
from louver_kernels.triton import decode
from tests.kernels.keygen import gen_seed, make_keys

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def make_kv(kind: str, hkv: int, t: int, d: int, dtype: torch.dtype, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """t keys of keygen ``kind`` and random values (of dim D), [Hkv, t, D] in ``dtype``."""
    return (make_keys(kind, hkv, t, d, dtype, gen),
            torch.randn(hkv, t, d, generator=gen).to(dtype))


def build_pair(kind: str, hkv: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator,
               **cfg: object) -> tuple[LouverIndex, LouverIndex]:
    """A torch-backend and a Triton-backend QUANT index (``cfg``) over the same n keys of
    keygen ``kind`` and random values."""
    keys, values = make_kv(kind, hkv, n, d, dtype, gen)
    base = dict(kind=IndexKind.QUANT, **cfg)
    torch_index = LouverIndex.build(keys, values, IndexConfig(backend="torch", **base))
    triton_index = LouverIndex.build(keys.to(DEVICE), values.to(DEVICE),
                                     IndexConfig(backend="triton", **base))
    assert triton_index.uses_triton and not torch_index.uses_triton
    return torch_index, triton_index


def append_same(indexes: tuple[LouverIndex, ...], kind: str, t: int, gen: torch.Generator
                ) -> None:
    """Append the same t keys (keygen ``kind``) and random values, in the first index's
    dtype and head dim (values of dim D), to every index."""
    first = indexes[0]
    k, v = make_kv(kind, first.num_kv_heads, t, first.head_dim, first.dtype, gen)
    for index in indexes:
        index.append(k, v)


# (kind, dtype) pairs rather than their product keep the interpreter's runtime in check
@pytest.mark.parametrize(("kind", "dtype"), [("clustered", torch.float16),
                                             ("outlier_channel", torch.bfloat16),
                                             ("duplicates", torch.float16)])
@pytest.mark.parametrize("group", [1, 3])
def test_triton_step_matches_torch_backend(kind: str, dtype: torch.dtype, group: int) -> None:
    gen, seed = gen_seed()
    hkv, n, d = 2, 150, 64
    t_idx, g_idx = build_pair(kind, hkv, n, d, dtype, gen, buffer_size=32, quant_bits=6,
                              quant_coarse_bits=4, probe_recent=16)
    append_same((t_idx, g_idx), kind, 20, gen)   # crosses a flush; leaves keys in the buffer
    assert g_idx.num_buffered == t_idx.num_buffered > 0
    q = (torch.randn(hkv * group, d, generator=gen) * 2).to(dtype)
    s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
    # a fixed tau in the middle gap between two distinct scores: kernels sum in another order
    # than torch, so a tau equal to a score may round either way (both keep the contract)
    gaps = []
    for row in s:
        u = torch.unique(row)
        mid = len(u) // 2
        gaps.append(float(u[mid - 1] + u[mid]) / 2)
    for policy in (Relative(1e-2), Relative(1e-4), Dense(), Fixed(gaps)):
        want = t_idx.attend(q, policy)
        got = g_idx.attend(q.to(DEVICE), policy)
        check_step(t_idx, q, s, want, got, policy, f"seed {seed} policy {policy}")


def poison_unwritten(index: LouverIndex) -> None:
    """Fill every storage row that holds nothing yet with NaN (floats) or 0xFF (codes): keys
    and values beyond num_keys, records beyond num_indexed, ranges beyond its segments."""
    index._await_flush()   # a flush run after the last step counts as indexed from here on
    n, total = index.num_indexed, index.num_keys
    nseg = -(-n // index.config.buffer_size)
    for t, start in ((index._keys, total), (index._values, total), (index._codes, n),
                     (index._err, n), (index._lo, nseg), (index._step, nseg)):
        t[:, start:] = 255 if t.dtype == torch.uint8 else math.nan


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unwritten_storage_is_never_read(backend: str) -> None:
    """Storage rows that were never written (the capacity beyond the keys, the buffer's
    records, the segments not reached) do not change any answer: with NaN and 0xFF there the
    step gives the answers of a twin index whose storage was never poisoned, and later appends
    and flushes overwrite them."""
    gen, seed = gen_seed()
    hkv, g, d, dtype = 2, 3, 64, torch.float16
    device = DEVICE if backend == "triton" else torch.device("cpu")
    keys, values = make_kv("clustered", hkv, 150, d, dtype, gen)
    cfg = IndexConfig(kind=IndexKind.QUANT, backend=backend, buffer_size=32, quant_bits=6,
                      quant_coarse_bits=4, probe_recent=16)
    poisoned, clean = (LouverIndex.build(keys.to(device), values.to(device), cfg)
                       for _ in range(2))
    for extra in (20, 0, 40):   # leaves keys in the buffer; then a flush and a partial segment
        if extra:
            k, v = make_kv("clustered", hkv, extra, d, dtype, gen)
            for index in (poisoned, clean):
                index.append(k.to(device), v.to(device))
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype).to(device)
        for policy in (Relative(1e-3), Dense()):
            for index in (poisoned, clean):
                index.attend(q, Dense())   # a due flush first, in both
            want = clean.attend(q, policy)
            poison_unwritten(poisoned)
            got = poisoned.attend(q, policy)
            msg = f"seed {seed} extra {extra} policy {policy}"
            for name in ("tau", "num_attended", "num_candidates"):
                assert torch.equal(getattr(got, name), getattr(want, name)), f"{msg}: {name}"
            # float sums: on a GPU in the (varying) order of the candidate list
            for name in ("output", "lse", "dropped_mass_bound"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name),
                                           msg=f"{msg}: {name}")


def check_step(t_idx: LouverIndex, q: torch.Tensor, s: torch.Tensor, want: AttendOutput,
               got: AttendOutput, policy: object, msg: str) -> None:
    """The Triton step's output ``got`` against the torch backend's ``want`` for query q
    (s: the exact scores of every stored key)."""
    # tau comes from float32 probe scores, which the kernel sums in another order than torch:
    # equal up to twice the rounding bound of a float32 dot (reference.py's docstring); keys
    # whose score lies within that distance of tau may be attended by one side only
    keys = t_idx.keys_range(0, t_idx.num_keys)[0]
    tol = 2 * ref.gamma(q.shape[1]) * q.float().norm(dim=1) * keys.float().norm(dim=-1).max()
    got_tau, want_tau = got.tau.cpu(), want.tau
    same = (got_tau == want_tau) | ((got_tau - want_tau).abs() <= tol)
    assert bool(same.all()), f"{msg}: tau {got_tau.tolist()} != {want_tau.tolist()}"
    near = ((s - want_tau[:, None]).abs() <= 2 * tol[:, None]).sum(dim=1)
    assert bool(((got.num_attended.cpu() - want.num_attended).abs() <= near).all()), msg
    # each float32 score may differ by up to tol: each softmax weight by a factor within
    # exp(+-2 scale tol), so lse by scale tol and the output by 2 scale tol max|v| (plus
    # float32 noise of the sums)
    rel = (t_idx.scale * tol)[:, None]
    vmax = t_idx.keys_range(0, t_idx.num_keys)[1].float().abs().max()
    same = got.num_attended.cpu() == want.num_attended   # heads with the same attended set
    out_tol = 1e-4 * want.output.abs() + 1e-5 + 4 * rel * vmax
    out_ok = ((got.output.cpu() - want.output).abs() <= out_tol).all(dim=1)
    assert bool((out_ok | ~same).all()), msg
    lse_tol = 1e-5 * want.lse.abs() + 1e-5 + 2 * rel[:, 0]
    lse_ok = ((got.lse.cpu() - want.lse).abs() <= lse_tol) | (got.lse.cpu() == want.lse)
    assert bool((lse_ok | ~same).all()), msg
    # candidates: the kernels' two-stage bound selects the same group union up to keys
    # whose bound is within rounding of tau; never fewer than the attended keys
    assert bool((got.num_candidates.cpu() >= want.num_attended).all()), msg
    assert (got.num_candidates.cpu() - want.num_candidates).abs().max() <= 2, msg
    # the certificate bounds the true dropped mass of a dense softmax over every key
    attend = s >= got.tau.cpu()[:, None]
    attend[:, t_idx.num_indexed:] = True
    p = torch.softmax(s.double() * t_idx.scale, dim=1)
    true_dropped = (p * ~attend).sum(dim=1)
    assert bool((got.dropped_mass_bound.cpu().double() + 1e-6 >= true_dropped).all()), msg
    if isinstance(policy, Dense):
        assert bool((got.dropped_mass_bound == 0).all()), msg


def test_triton_backend_needs_quant() -> None:
    with pytest.raises(ValueError):
        IndexConfig(kind=IndexKind.BALLS, backend="triton")


def test_auto_backend_follows_the_device() -> None:
    """backend="auto" runs the Triton kernels on a CUDA GPU of compute capability >= 9.0 for
    the configurations they implement, and the torch backend elsewhere."""
    keys = torch.randn(2, 40, 64, dtype=torch.float16)
    assert not LouverIndex.build(keys, keys, IndexConfig()).uses_triton        # CPU tensors
    assert IndexConfig().triton_supports(64) and IndexConfig().triton_supports(128)
    assert not IndexConfig().triton_supports(48)          # not a power of two
    assert not IndexConfig().triton_supports(16)          # below 32
    assert not IndexConfig(quant_bits=8).triton_supports(64)
    assert not IndexConfig(kind=IndexKind.BALLS).triton_supports(64)
    if CUDA:
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        gpu = keys.to(DEVICE)
        assert LouverIndex.build(gpu, gpu, IndexConfig()).uses_triton == hopper
        assert not LouverIndex.build(gpu, gpu, IndexConfig(backend="torch")).uses_triton
        assert not LouverIndex.build(gpu, gpu, IndexConfig(kind=IndexKind.BALLS)).uses_triton
        narrow = torch.randn(2, 40, 16, dtype=torch.float16, device=DEVICE)
        assert not LouverIndex.build(narrow, narrow, IndexConfig()).uses_triton


def test_triton_step_empty_index_and_buffer_only() -> None:
    keys = torch.empty(1, 0, 64, dtype=torch.float16)
    index = LouverIndex.build(keys.to(DEVICE), keys.to(DEVICE),
                              IndexConfig(backend="triton", buffer_size=8))
    out = index.attend(torch.randn(3, 64).to(DEVICE), Relative(1e-3))
    assert out.num_attended.tolist() == [0, 0, 0]
    assert bool(torch.isneginf(out.lse).all()) and not bool(out.output.isnan().any())
    index.append(torch.randn(1, 5, 64).half().to(DEVICE), torch.randn(1, 5, 64).half().to(DEVICE))
    out = index.attend(torch.randn(3, 64).to(DEVICE), Relative(1e-3))
    assert out.num_attended.tolist() == [5, 5, 5]
    assert math.isclose(float(out.dropped_mass_bound.max()), 0.0)


def test_slack_coef_matches_or_exceeds_reference_slack() -> None:
    gen = torch.Generator().manual_seed(7)
    hkv, g, d, groups = 3, 3, 64, 16
    kmax, emax, lmax = (torch.rand(hkv, generator=gen) * 30 for _ in range(3))
    coef = decode.slack_coef(kmax, emax, lmax, d, groups)
    for scale in (1e-3, 1.0, 1e4):
        q = (torch.randn(hkv * g, d, generator=gen) * scale).half().float()
        want = ref.quant_slack(q, kmax, emax, lmax, groups)
        qn = q.double().norm(dim=-1)
        got = (qn * ref.expand_heads(coef, hkv * g)).float()
        assert bool((got >= want).all())
        # exceeds it by at most one float32 ulp
        assert bool((got <= torch.nextafter(want, torch.full_like(want, math.inf))).all())


def test_prologue_slack_matches_or_exceeds_reference_slack() -> None:
    """The step's slack, computed on the device from the index's running maxima (after a
    build and after appends that flush), against reference.quant_slack: never below it, at
    most one float32 ulp above."""
    gen = torch.Generator().manual_seed(13)
    hkv, g, d, group = 2, 3, 64, 16
    keys = make_keys("clustered", hkv, 200, d, torch.float16, gen)
    index = LouverIndex.build(keys.to(DEVICE), keys.to(DEVICE),
                              IndexConfig(backend="triton", buffer_size=64, quant_group=group))
    for step in range(3):
        if step:
            more = make_keys("outlier_channel", hkv, 64, d, torch.float16, gen) * (2.0 * step)
            index.append(more.to(DEVICE), more.to(DEVICE))
        for scale in (1e-3, 1.0, 30.0):
            q = (torch.randn(hkv * g, d, generator=gen) * scale).half()
            decode.attend(index, q.to(DEVICE), Relative(1e-3))
            got = index._step_scratch.slack.cpu()
            want = ref.quant_slack(q.float(), index._kmax.cpu(), index._rmax.cpu(),
                                   index._lmax.cpu(), d // group)
            msg = f"step {step} scale {scale}"
            assert bool((got >= want).all()), msg
            assert bool((got <= torch.nextafter(want, torch.full_like(want, math.inf))).all()), msg


def test_captured_step_body_tracks_appends_flushes_and_growth() -> None:
    """CapturedStep's launches (device counters, capacity-sized grids) over a sequence of
    decode steps: appends, flushes and one capacity growth (re-capture). Without CUDA the body
    runs eagerly under the interpreter (graph=False): the CUDA graph itself is GPU-only."""
    gen = torch.Generator().manual_seed(11)
    hkv, g, d, dtype = 1, 3, 64, torch.float16
    t_idx, g_idx = build_pair("clustered", hkv, 230, d, dtype, gen, buffer_size=32,
                              quant_bits=6, quant_coarse_bits=4, probe_recent=16)
    steps = {p: decode.CapturedStep(g_idx, p, hkv * g, graph=CUDA)
             for p in (Relative(1e-3), Dense(), Fixed(0.0))}
    for t, extra in enumerate((7, 20, 5)):   # 237, 257 (growth past 256), 262 (flush due)
        append_same((t_idx, g_idx), "clustered", extra, gen)
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        # the steps below compare different calls over one state: run a due flush first
        for index in (t_idx, g_idx):
            index.attend(q.to(index.device), Dense())
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        # the Fixed step takes new thresholds at every call: between two distinct scores
        gaps = [float(u[len(u) // 2 - 1] + u[len(u) // 2]) / 2
                for u in (torch.unique(row) for row in s)]
        for built, step in steps.items():
            assert step.stale == (t == 1)
            policy = Fixed(gaps) if isinstance(built, Fixed) else built
            got = step(q.to(DEVICE), policy if isinstance(built, Fixed) else None)
            assert not step.stale
            want = t_idx.attend(q, policy)
            check_step(t_idx, q, s, want, got, policy, f"step {t} policy {policy}")
            got.raise_if_invalid()
            # the eager step agrees with the captured body
            eager = g_idx.attend(q.to(DEVICE), policy, validate=False)
            assert torch.equal(eager.num_attended, got.num_attended)
            torch.testing.assert_close(eager.output, got.output)
    with pytest.raises(ValueError):
        steps[Dense()](torch.zeros(hkv * g, d, dtype=torch.float32, device=DEVICE))
    # a Dense step runs no filter: it holds no candidate list
    cap = g_idx._cap
    assert (steps[Relative(1e-3)].scratch_bytes - steps[Dense()].scratch_bytes
            == 4 * hkv * (cap - 1))
    q = torch.zeros(hkv * g, d, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match="Fixed"):
        steps[Dense()](q, Fixed(0.0))
    with pytest.raises(ValueError, match="expected 1 or 3"):
        steps[Fixed(0.0)](q, Fixed([0.0, 1.0]))


def test_captured_step_runs_a_due_flush_after_the_step() -> None:
    """An append that fills the buffer leaves its keys in the buffer for the next step (the
    captured step attends them exactly, like the torch backend's attend); the flush runs after
    that step (on CUDA on a side stream) and the following steps see the keys indexed."""
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, dtype = 2, 2, 64, torch.float16
    t_idx, g_idx = build_pair("random", hkv, 100, d, dtype, gen, buffer_size=16,
                              quant_bits=6, quant_coarse_bits=4, probe_recent=8)
    step = decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA)
    for t in range(40):   # crosses two flushes
        append_same((t_idx, g_idx), "random", 1, gen)
        due = g_idx.num_buffered >= 16
        assert t_idx.num_buffered == g_idx.num_buffered
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        want = t_idx.attend(q, Relative(1e-3))
        got = step(q.to(DEVICE))
        check_step(t_idx, q, s, want, got, Relative(1e-3), f"append {t}")
        # the buffer was attended whole: the step saw the unflushed state
        assert int(got.num_candidates.min()) >= g_idx.num_buffered
        if due:
            flushes = g_idx.num_flushes
            g_idx.bounds(q.to(DEVICE))            # the next operation counts the keys
            assert g_idx.num_buffered == 0 and g_idx.num_flushes == flushes + 1
    assert g_idx.num_flushes == t_idx.num_flushes >= 2


def test_captured_step_made_after_an_eager_step_with_a_long_flush() -> None:
    """A CapturedStep made right after an eager step whose flush took the eager encoder (a
    range the CapturedFlush does not cover) reads the flushed count from the device counters,
    and later flushes keep every key attended (a stale count would leave keys neither indexed
    nor in the buffer)."""
    gen = torch.Generator().manual_seed(3)
    hkv, g, d, dtype = 1, 2, 64, torch.float16
    t_idx, g_idx = build_pair("random", hkv, 31, d, dtype, gen, buffer_size=16,
                              quant_bits=6, quant_coarse_bits=4, probe_recent=8)
    append_same((t_idx, g_idx), "random", 20, gen)    # 51 keys: [31, 51) spans 3 segments
    q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
    for index in (t_idx, g_idx):
        index.attend(q.to(index.device), Relative(1e-3))    # runs the flush after the step
    step = decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA)
    for extra in (0, 25, 3):
        append_same((t_idx, g_idx), "random", extra, gen)
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        for _ in range(2):    # before and after the flush the first step runs
            want = t_idx.attend(q, Relative(1e-3))
            got = step(q.to(DEVICE))
            check_step(t_idx, q, s, want, got, Relative(1e-3), f"append {extra}")


def test_programmatic_dependent_launch_where_the_gpu_has_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's kernels launch with PDL on a GPU of compute capability >= 9.0 (so this
    file's GPU runs exercise it), never under the interpreter; with it turned off (what the
    benchmark compares against) a captured step gives the same answers as with it."""
    from louver_kernels.triton import _launch

    pdl = CUDA and torch.cuda.get_device_capability() >= (9, 0)
    assert _launch.pdl_launch(DEVICE) == ({"launch_pdl": True} if pdl else {})
    assert _launch.pdl_launch(torch.device("cpu")) == {}
    gen, seed = gen_seed()
    hkv, g, d, dtype = 2, 4, 64, torch.bfloat16
    n = 20000 if CUDA else 300
    t_idx, g_idx = build_pair("clustered", hkv, n, d, dtype, gen, buffer_size=64,
                              probe_recent=32)
    steps = {True: decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA)}
    monkeypatch.setattr(_launch, "USE_PDL", False)
    assert _launch.pdl_launch(DEVICE) == {}
    steps[False] = decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA)
    for t in range(12 if CUDA else 2):
        append_same((t_idx, g_idx), "clustered", 1, gen)
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        want = t_idx.attend(q, Relative(1e-3))
        for flag, step in steps.items():
            check_step(t_idx, q, s, want, step(q.to(DEVICE)), Relative(1e-3),
                       f"seed {seed} token {t} pdl {flag and pdl}")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs on two streams")
def test_captured_steps_replayed_at_once_on_two_streams() -> None:
    """Two layers' captured steps replayed at the same time on two streams (what serving
    several sessions on several streams does): each graph holds counters of its own (arrival
    tickets, slot counters), so every replay gives the eager step's answer."""
    gen, seed = gen_seed()
    hkv, g, d, dtype, rounds = 8, 4, 128, torch.float16, 12
    cfg = IndexConfig(kind=IndexKind.QUANT, backend="triton", buffer_size=64)
    indexes = [LouverIndex.build(*(t.to(DEVICE) for t in make_kv("clustered", hkv, n, d, dtype,
                                                                 gen)), cfg)
               for n in (30000, 20000)]
    steps = [decode.CapturedStep(ix, Relative(1e-3), hkv * g) for ix in indexes]
    ptrs = [{t.data_ptr() for held in step.graph.louver_counters.values() for t in held}
            for step in steps]
    assert ptrs[0] and ptrs[1] and not ptrs[0] & ptrs[1]
    qs = [[(torch.randn(hkv * g, d, generator=gen) * 2).to(dtype).to(DEVICE)
           for _ in range(rounds)] for _ in steps]
    want = [[ix.attend(q, Relative(1e-3)) for q in layer_qs]
            for ix, layer_qs in zip(indexes, qs, strict=True)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got: list[list[tuple[torch.Tensor, ...]]] = [[], []]
    torch.cuda.synchronize()
    for r in range(rounds):
        for i, (step, stream) in enumerate(zip(steps, streams, strict=True)):
            with torch.cuda.stream(stream):
                res = step(qs[i][r])
                got[i].append((res.output.clone(), res.lse.clone(), res.num_attended.clone(),
                               res.num_candidates.clone()))
    torch.cuda.synchronize()
    for i in range(2):
        for r in range(rounds):
            out, lse, natt, ncand = got[i][r]
            msg = f"seed {seed} layer {i} round {r}"
            assert torch.equal(natt, want[i][r].num_attended), msg
            assert torch.equal(ncand, want[i][r].num_candidates), msg
            torch.testing.assert_close(out, want[i][r].output, msg=msg)
            torch.testing.assert_close(lse, want[i][r].lse, msg=msg)


@pytest.mark.skipif(not CUDA, reason="side streams and CUDA graphs")
def test_side_stream_flushes_between_layers() -> None:
    """Two layers decoded token by token: each layer's flush runs on the side stream while the
    other layer's step runs; every step matches the torch backend, and an index freed with a
    flush in flight is safe."""
    gen = torch.Generator().manual_seed(8)
    hkv, g, d, dtype = 3, 3, 64, torch.float16
    layers = [build_pair("clustered", hkv, 3000, d, dtype, gen, buffer_size=64)
              for _ in range(2)]
    steps = [decode.CapturedStep(g_idx, Relative(1e-3), hkv * g) for _, g_idx in layers]
    for t in range(150):                        # two flushes per layer
        for (t_idx, g_idx), step in zip(layers, steps, strict=True):
            append_same((t_idx, g_idx), "clustered", 1, gen)
            q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
            got = step(q.to(DEVICE))
            want = t_idx.attend(q, Relative(1e-3))
            s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
            check_step(t_idx, q, s, want, got, Relative(1e-3), f"token {t}")
    assert all(g_idx.num_flushes >= 2 for _, g_idx in layers)
    _, g_idx = layers[0]
    append_same((g_idx,), "clustered", 64, gen)                     # fills the buffer
    steps[0](torch.randn(hkv * g, d, device=DEVICE, dtype=dtype))   # launches a flush
    del steps, layers, g_idx
    torch.cuda.synchronize()


def compiled_variants() -> dict[str, int]:
    """Per Triton kernel of louver_kernels.triton: how many binaries it has compiled so far."""
    from triton.runtime.jit import JITFunction

    from louver_kernels.triton import attention, dense_attention, encode, quant_filter

    counts: dict[str, int] = {}
    for module in (attention, dense_attention, decode, encode, quant_filter):
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                counts[f"{module.__name__}.{name}"] = sum(
                    len(caches[0]) for caches in fn.device_caches.values())
    return counts


@pytest.mark.skipif(not CUDA, reason="compiled kernels (the interpreter compiles nothing)")
def test_kernels_compile_once_as_the_capacity_grows() -> None:
    """A sequence that grows from 2k to 128k keys (six capacity classes) compiles no kernel
    after its first steps: every launch argument that follows the capacity or the positions
    is a runtime value (a compile stalls a decode step for about a second)."""
    gen = torch.Generator().manual_seed(12)
    hkv, g, d, dtype = 2, 3, 64, torch.float16
    index = LouverIndex.build(*(t.to(DEVICE) for t in make_kv("clustered", hkv, 2000, d, dtype,
                                                              gen)),
                              IndexConfig(kind=IndexKind.QUANT, backend="triton"))
    policies = (Relative(1e-3), Fixed(0.0), Dense())
    steps = [decode.CapturedStep(index, p, hkv * g) for p in policies]

    def decode_tokens(tokens: int) -> None:
        for _ in range(tokens):
            k, v = make_kv("clustered", hkv, 1, d, dtype, gen)
            index.append(k.to(DEVICE), v.to(DEVICE))
            q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
            for step in steps:
                step(q)
            for p in policies:
                index.attend(q, p)

    decode_tokens(300)                       # past a flush of the decode buffer
    first = compiled_variants()
    assert first and all(first.values()), first
    while index.num_keys < 128 * 1024:       # prefill-sized appends, then decode again
        k, v = make_kv("clustered", hkv, index.num_keys, d, dtype, gen)
        index.append(k.to(DEVICE), v.to(DEVICE))
        decode_tokens(300)
    torch.cuda.synchronize()
    assert index._cap >= 128 * 1024
    assert compiled_variants() == first


def test_faster_times_both_variants_then_runs_the_faster() -> None:
    """_Faster: calls 0 and 1 of every round run (and time) each variant, the others the one
    with the smaller moving average; samples not ready yet are read at later calls."""
    f = decode._Faster(probe_every=5, alpha=0.5)
    assert f.pick() == (0, True)
    f.add(0, lambda: 2.0)
    assert f.pick() == (1, True)
    ready = [False]
    f.add(1, lambda: 1.0 if ready[0] else None)
    assert f.pick() == (0, False)           # the dense sample is still pending
    ready[0] = True
    assert [f.pick() for _ in range(2)] == [(1, False)] * 2
    assert f.estimate == [2.0, 1.0]
    assert f.pick() == (0, True)            # the next round
    f.add(0, lambda: 0.5)
    assert f.pick() == (1, True)
    f.add(1, lambda: 1.5)
    assert f.pick() == (0, False)           # averages 1.25 against 1.25: ties go sparse
    assert f.estimate == [1.25, 1.25]
    with pytest.raises(ValueError):
        decode._Faster(probe_every=2)


def test_captured_step_dense_fallback() -> None:
    """A Relative step with the dense fallback runs its own step or the index's Dense step:
    each call's output is the one of the variant it reports (last_dense), and whichever runs,
    no key at or above tau is missed; other policies refuse the fallback. q is passed in
    turn on the device, on the host and in place (written into step.q, which the dense step
    shares)."""
    gen = torch.Generator().manual_seed(12)
    hkv, g, d, dtype = 1, 3, 64, torch.float16
    t_idx, g_idx = build_pair("clustered", hkv, 200, d, dtype, gen, buffer_size=32,
                              quant_bits=6, quant_coarse_bits=4, probe_recent=16)
    step = decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA, fallback=True)
    assert step._faster is not None
    ran = []
    for t in range(6):
        if t in (2, 4):             # pretend the dense step measured faster, then slower
            step._faster._pending.clear()
            step._faster.estimate = [2.0, 1.0] if t == 2 else [1.0, 2.0]
        append_same((t_idx, g_idx), "clustered", 3, gen)
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        if t % 3 == 0:
            got = step(q.to(DEVICE))
        elif t % 3 == 1:
            got = step(q)                    # on the host: copied straight into step.q
        else:
            step.q.copy_(q)
            got = step(step.q)               # in place (t = 2 runs the dense step)
        policy = Dense() if step.last_dense else Relative(1e-3)
        check_step(t_idx, q, s, t_idx.attend(q, policy), got, policy, f"call {t}")
        ran.append(step.last_dense)
    # calls 0 and 1 time both variants; then the (pretended) faster one runs
    assert ran == [False, True, True, True, False, False]
    assert step._dense is not None and step._dense.q is step.q
    for bad in (torch.zeros(hkv * g, d + 8, dtype=dtype, device=DEVICE),
                torch.zeros(hkv * g, d, dtype=torch.float32, device=DEVICE)):
        with pytest.raises(ValueError, match="q_buffer"):
            decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA, q_buffer=bad)
    assert step.scratch_bytes > decode.CapturedStep(g_idx, Relative(1e-3), hkv * g,
                                                    graph=CUDA).scratch_bytes
    for policy in (Dense(), Fixed(0.0)):
        with pytest.raises(ValueError, match="fallback"):
            decode.CapturedStep(g_idx, policy, hkv * g, graph=CUDA, fallback=True)


def test_probe_split_over_programs_matches_torch_backend() -> None:
    """A probe longer than one chunk of the prologue (sinks + 150 recent keys: three programs
    per KV head, merged by the last arrival), over several steps: tau and the whole step agree
    with the torch backend at every step, eager and captured, so the arrival counters are
    left at zero between launches."""
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, dtype = 2, 3, 32, torch.float16
    t_idx, g_idx = build_pair("outlier_channel", hkv, 300, d, dtype, gen, buffer_size=64,
                              quant_bits=6, quant_coarse_bits=4, probe_recent=150)
    assert decode.probe_chunks(g_idx, Relative(1e-3)) == 3
    step = decode.CapturedStep(g_idx, Relative(1e-3), hkv * g, graph=CUDA)
    for t, extra in enumerate((3, 40, 1)):
        append_same((t_idx, g_idx), "outlier_channel", extra, gen)
        q = (torch.randn(hkv * g, d, generator=gen) * 2).to(dtype)
        s = ref.scores(q, t_idx.keys_range(0, t_idx.num_keys)[0])
        want = t_idx.attend(q, Relative(1e-3))
        check_step(t_idx, q, s, want, g_idx.attend(q.to(DEVICE), Relative(1e-3)),
                   Relative(1e-3), f"eager step {t}")
        check_step(t_idx, q, s, want, step(q.to(DEVICE)), Relative(1e-3), f"captured {t}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on NaN
def test_q_validation_host_and_device() -> None:
    gen = torch.Generator().manual_seed(3)
    keys = make_keys("clustered", 1, 40, 64, torch.float16, gen).to(DEVICE)
    index = LouverIndex.build(keys, keys, IndexConfig(backend="triton", buffer_size=16))
    good = torch.randn(2, 64, generator=gen).to(DEVICE)
    for bad_value in (math.nan, math.inf, 2.0 * MAX_QUERY_ABS):
        bad = good.clone()
        bad[1, 5] = bad_value
        with pytest.raises(ValueError):          # default: checked on the host
            index.attend(bad, Relative(1e-3))
        out = index.attend(bad, Relative(1e-3), validate=False)   # flagged on the device
        assert out.q_error is not None and out.q_error.tolist() == [1]
        with pytest.raises(ValueError):
            out.raise_if_invalid()
    out = index.attend(good, Relative(1e-3), validate=False)
    assert out.q_error is not None and out.q_error.tolist() == [0]
    out.raise_if_invalid()
