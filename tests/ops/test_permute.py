"""permute / unpermute: against the plain-PyTorch references, gradients, opcheck, torch.compile,
determinism and input validation (CPU; CUDA tests are marked and skip without a GPU)."""

import pytest
import torch
from conftest import TOLERANCES
from torch.library import opcheck

import moe_framework  # noqa: F401
from moe_framework.ops import permute, unpermute
from moe_framework.ops.reference import permute_ref, unpermute_ref

ops = torch.ops.moe_framework
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# unpermute accumulates in fp32 (fp64 for fp64); compared with a float64 reference these bound one
# rounding of the result plus the rounding of fp32 products.
TOL = TOLERANCES["gather"]


def _rand_ids(T, k, E, drop_frac=0.0, dtype=torch.int32, device="cpu", used=None):
    """ids [T, k]: random experts (from `used` when given), a fraction set to -1 (dropped)."""
    pool = torch.arange(E) if used is None else torch.as_tensor(used)
    ids = pool[torch.randint(0, len(pool), (T, k))]
    if drop_frac > 0:
        ids[torch.rand(T, k) < drop_frac] = -1
    return ids.to(dtype=dtype, device=device)


def _rand_sizes(gen_max_t=70):
    T = int(torch.randint(2, gen_max_t, ()))
    d = int(torch.randint(1, 40, ()))
    return T, d


# ------------------------------------------------------------------------------------------------
# permute against the reference


@pytest.mark.parametrize("E", [1, 8, 64, 256])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_matches_reference(seed, E, k, dtype):
    for T in (0, 1, *_rand_sizes()[:1]):
        d = int(torch.randint(1, 40, ()))
        x = torch.randn(T, d).to(dtype)
        ids = _rand_ids(T, k, E, drop_frac=0.2)
        got = permute(x, ids, E)
        want = permute_ref(x, ids, E)
        for name, g, w in zip(("x_sorted", "row_of_slot", "offsets"), got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.equal(g, w), f"{name} differs at T={T} d={d}"


@pytest.mark.parametrize("E", [8, 256])
def test_permute_matches_reference_when_split_across_threads(seed, E):
    # Large enough that the CPU kernel splits the slots into one chunk per thread: the per-chunk
    # histograms and cursors must still give the single stable order.
    T, k, d = 4099, 8, 8
    x = torch.randn(T, d)
    ids = _rand_ids(T, k, E, drop_frac=0.05, dtype=torch.int64)
    for g, w in zip(permute(x, ids, E), permute_ref(x, ids, E)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_permute_is_stable_within_each_expert(seed, index_dtype):
    T, k, E = 257, 4, 8
    ids = _rand_ids(T, k, E, dtype=index_dtype)
    x = torch.randn(T, 5)
    x_sorted, row_of_slot, offsets = permute(x, ids, E)
    flat = ids.reshape(-1).long()
    for e in range(E):
        slots = (flat == e).nonzero().flatten()  # ascending slot order
        rows = row_of_slot[slots]
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert torch.equal(rows, torch.arange(lo, hi)), f"expert {e} rows not in slot order"
        assert torch.equal(x_sorted[lo:hi], x[slots // k])


def test_permute_puts_dropped_slots_last_as_zero_rows(seed):
    T, k, E, d = 50, 3, 4, 7
    ids = _rand_ids(T, k, E, drop_frac=0.4)
    x = torch.randn(T, d) + 10.0  # no row of x is zero
    x_sorted, row_of_slot, offsets = permute(x, ids, E)
    dropped = int((ids == -1).sum())
    assert int(offsets[E]) == T * k - dropped
    assert torch.equal(x_sorted[int(offsets[E]) :], torch.zeros(dropped, d))
    assert bool((row_of_slot[ids.reshape(-1) == -1] >= offsets[E]).all())
    assert bool((x_sorted[: int(offsets[E])] != 0).all())


def test_permute_all_slots_dropped_gives_zero_offsets_and_zero_rows():
    x = torch.randn(6, 3)
    ids = torch.full((6, 2), -1, dtype=torch.int32)
    x_sorted, row_of_slot, offsets = permute(x, ids, 5)
    assert torch.equal(offsets, torch.zeros(6, dtype=torch.long))
    assert torch.equal(x_sorted, torch.zeros(12, 3))
    assert torch.equal(row_of_slot, torch.arange(12))


def test_permute_experts_without_tokens_have_empty_ranges(seed):
    T, k, E = 40, 2, 16
    used = [1, 5, 6, 15]
    ids = _rand_ids(T, k, E, used=used)
    _, _, offsets = permute(torch.randn(T, 4), ids, E)
    counts = offsets[1:] - offsets[:-1]
    for e in range(E):
        assert int(counts[e]) == int((ids == e).sum())
    assert all(int(counts[e]) == 0 for e in range(E) if e not in used)
    assert int(offsets[0]) == 0 and int(offsets[E]) == T * k


def test_permute_noncontiguous_x_and_ids_match_contiguous(seed):
    T, k, E, d = 33, 3, 8, 10
    x_big = torch.randn(d * 2, T)  # x = x_big.t()[:, ::2]: row stride 1, column stride 2*T
    x = x_big.t()[:, ::2]
    ids_big = _rand_ids(T, 2 * k, E, drop_frac=0.1, dtype=torch.int64)
    ids = ids_big[:, ::2]
    assert not x.is_contiguous() and not ids.is_contiguous()
    got = permute(x, ids, E)
    want = permute_ref(x.contiguous(), ids.contiguous(), E)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # row-strided x (inner stride 1) goes through the no-copy path
    x_rows = torch.randn(T, d + 5)[:, 2 : 2 + d]
    assert torch.equal(permute(x_rows, ids, E)[0], permute_ref(x_rows.contiguous(), ids, E)[0])


# ------------------------------------------------------------------------------------------------
# unpermute against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("weights_fp32", [True, False])
def test_unpermute_matches_reference(seed, dtype, k, weights_fp32):
    E = 8
    for T in (0, 1, *_rand_sizes()[:1]):
        d = int(torch.randint(1, 40, ()))
        ids = _rand_ids(T, k, E, drop_frac=0.1)
        _, row_of_slot, _ = permute(torch.zeros(T, 1), ids, E)
        y_sorted = torch.randn(T * k, d).to(dtype)
        weights = torch.rand(T, k).to(torch.float32 if weights_fp32 else dtype)
        got = unpermute(y_sorted, row_of_slot, weights)
        want = unpermute_ref(y_sorted.double(), row_of_slot, weights.double())
        assert got.dtype == dtype and got.shape == (T, d)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_unpermute_sums_in_j_order_bitwise_like_sequential_fp32(seed):
    # The fp32 combine is defined as ((0 + w0*y0) + w1*y1) + ...: the reference computes exactly
    # that sequence in fp32, so the results must agree bit for bit.
    T, k, E, d = 31, 8, 8, 33
    ids = _rand_ids(T, k, E)
    _, row_of_slot, _ = permute(torch.zeros(T, 1), ids, E)
    y_sorted = torch.randn(T * k, d) * 1e3
    weights = torch.rand(T, k)
    assert torch.equal(
        unpermute(y_sorted, row_of_slot, weights), unpermute_ref(y_sorted, row_of_slot, weights)
    )


def test_unpermute_of_permute_with_unit_weights_is_k_times_x(seed):
    T, k, E, d = 29, 4, 6, 9
    x = torch.randn(T, d, dtype=torch.float64)
    ids = _rand_ids(T, k, E)
    x_sorted, row_of_slot, _ = permute(x, ids, E)
    y = unpermute(x_sorted, row_of_slot, torch.ones(T, k, dtype=torch.float64))
    torch.testing.assert_close(y, k * x)


def test_unpermute_noncontiguous_inputs(seed):
    T, k, E, d = 21, 3, 5, 12
    ids = _rand_ids(T, k, E)
    _, row_of_slot, _ = permute(torch.zeros(T, 1), ids, E)
    y_sorted = torch.randn(d, T * k).t()  # column-major
    weights = torch.rand(k, T).t()
    row_big = torch.stack([row_of_slot, row_of_slot], 1).reshape(-1)[::2]
    assert not y_sorted.is_contiguous() and not weights.is_contiguous()
    got = unpermute(y_sorted, row_big, weights)
    want = unpermute(y_sorted.contiguous(), row_of_slot, weights.contiguous())
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# gradients


def test_permute_gradcheck_float64_skips_dropped_slots(seed):
    T, k, E, d = 9, 3, 4, 5
    ids = _rand_ids(T, k, E, drop_frac=0.3)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, ids, E)[0], (x,))
    # gradient of sum(x_sorted) is the number of routed (not dropped) slots of each token
    permute(x, ids, E)[0].sum().backward()
    routed = (ids >= 0).sum(1, keepdim=True).to(torch.float64)
    assert torch.equal(x.grad, routed.expand(T, d))


def test_unpermute_gradcheck_float64_y_sorted_and_weights(seed):
    T, k, E, d = 7, 3, 5, 6
    ids = _rand_ids(T, k, E, drop_frac=0.2)
    _, row_of_slot, _ = permute(torch.zeros(T, 1), ids, E)
    y_sorted = torch.randn(T * k, d, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: unpermute(y, row_of_slot, w), (y_sorted, weights))


def test_permute_unpermute_chain_gradcheck_float64(seed):
    T, k, E, d = 6, 2, 3, 4
    ids = _rand_ids(T, k, E, drop_frac=0.2)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(T * k, 1, dtype=torch.float64)

    def f(x, w):
        x_sorted, row_of_slot, _ = permute(x, ids, E)
        return unpermute(x_sorted * scale, row_of_slot, w)

    assert torch.autograd.gradcheck(f, (x, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_backward_matches_autograd_of_reference(seed, dtype):
    T, k, E, d = 40, 4, 8, 24
    ids = _rand_ids(T, k, E)
    _, row_of_slot, _ = permute(torch.zeros(T, 1), ids, E)
    y_sorted = torch.randn(T * k, d).to(dtype)
    weights = torch.rand(T, k)
    grad_y = torch.randn(T, d).to(dtype)
    g_ys, g_w = ops.unpermute_backward(grad_y, y_sorted, row_of_slot, weights)
    assert g_ys.dtype == dtype and g_w.dtype == torch.float32
    yr = y_sorted.double().requires_grad_()
    wr = weights.double().requires_grad_()
    unpermute_ref(yr, row_of_slot, wr).backward(grad_y.double())
    torch.testing.assert_close(g_ys.double(), yr.grad, **TOL[dtype])
    torch.testing.assert_close(g_w.double(), wr.grad, rtol=TOL[dtype]["rtol"], atol=1e-3 * d)


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_samples():
    T, k, E, d = 11, 3, 6, 7
    ids = _rand_ids(T, k, E, drop_frac=0.2)
    x = torch.randn(T, d, requires_grad=True)
    x_sorted, row_of_slot, offsets = permute(x.detach(), ids, E)
    weights = torch.rand(T, k, requires_grad=True)
    y_sorted = torch.randn(T * k, d, requires_grad=True)
    return T, k, E, d, ids, x, x_sorted, row_of_slot, offsets, weights, y_sorted


def test_opcheck_permute_and_unpermute(seed):
    T, k, E, d, ids, x, x_sorted, row_of_slot, offsets, weights, y_sorted = _opcheck_samples()
    opcheck(ops.permute.default, (x, ids, E))
    opcheck(ops.permute.default, (x.detach()[:0], ids[:0], E))
    opcheck(ops.unpermute.default, (y_sorted, row_of_slot, weights))
    opcheck(ops.permute_backward.default, (torch.randn(T * k, d), row_of_slot, offsets, k))
    opcheck(
        ops.unpermute_backward.default,
        (torch.randn(T, d), y_sorted.detach(), row_of_slot, weights.detach()),
    )


# ------------------------------------------------------------------------------------------------
# torch.compile


def _moe_like(x, ids, weights, scale, E):
    x_sorted, row_of_slot, offsets = permute(x, ids, E)
    y_sorted = torch.tanh(x_sorted * scale)
    return unpermute(y_sorted, row_of_slot, weights), offsets


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_forward_and_backward(seed, backend):
    T, k, E, d = 24, 2, 8, 16
    ids = _rand_ids(T, k, E, drop_frac=0.1)
    scale = torch.randn(T * k, 1)
    x = torch.randn(T, d, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(_moe_like, backend=backend, fullgraph=True)
    y_c, off_c = compiled(x, ids, w, scale, E)
    gx_c, gw_c = torch.autograd.grad(y_c.square().sum(), (x, w))
    y_e, off_e = _moe_like(x, ids, w, scale, E)
    gx_e, gw_e = torch.autograd.grad(y_e.square().sum(), (x, w))
    assert torch.equal(off_c, off_e)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gw_c, gw_e)


def test_compile_has_no_graph_breaks(seed):
    T, k, E, d = 16, 2, 4, 8
    ids = _rand_ids(T, k, E)
    x = torch.randn(T, d)
    w = torch.rand(T, k)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(_moe_like)(x, ids, w, torch.ones(T * k, 1), E)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


# ------------------------------------------------------------------------------------------------
# determinism


def test_two_runs_and_thread_counts_give_bitwise_equal_results(seed):
    T, k, E, d = 3000, 8, 64, 40
    ids = _rand_ids(T, k, E, drop_frac=0.05)
    x = torch.randn(T, d, dtype=torch.bfloat16)
    w = torch.rand(T, k)
    grad_y = torch.randn(T, d, dtype=torch.bfloat16)
    before = torch.get_num_threads()

    def run():
        xs, ros, off = permute(x, ids, E)
        y = unpermute(xs, ros, w)
        gys, gw = ops.unpermute_backward(grad_y, xs, ros, w)
        gx = ops.permute_backward(gys, ros, off, k)
        return xs, ros, off, y, gys, gw, gx

    try:
        first = run()
        second = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# bad input


def test_permute_rejects_out_of_range_ids_naming_the_slot():
    x = torch.randn(3, 2)
    ids = torch.tensor([[0, 1], [2, 4], [1, 0]], dtype=torch.int32)
    with pytest.raises(
        RuntimeError, match=r"permute: ids must be in \[-1, num_experts\).*ids\[1, 1\] = 4"
    ):
        permute(x, ids, 4)
    with pytest.raises(RuntimeError, match=r"ids\[0, 0\] = -2"):
        permute(x, torch.tensor([[-2, 0], [0, 0], [0, 0]]), 4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(3, 2), torch.zeros(3, 2), 4), r"permute: ids must have dtype in"),
        (
            lambda: (torch.randn(3, 2).int(), torch.zeros(3, 2, dtype=torch.int32), 4),
            r"x must have dtype",
        ),
        (
            lambda: (torch.randn(3), torch.zeros(3, 2, dtype=torch.int32), 4),
            r"x must have 2 dimensions",
        ),
        (
            lambda: (torch.randn(3, 2), torch.zeros(4, 2, dtype=torch.int32), 4),
            r"one row per token of x \(3\), got 4",
        ),
        (lambda: (torch.randn(3, 2), torch.zeros(3, 0, dtype=torch.int32), 4), r"k >= 1"),
        (
            lambda: (torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.int32), 0),
            r"num_experts must be >= 1, got 0",
        ),
    ],
)
def test_permute_rejects_bad_inputs_with_clear_errors(make, match):
    with pytest.raises(RuntimeError, match=match):
        permute(*make())


def test_unpermute_rejects_bad_inputs_with_clear_errors():
    T, k, d = 4, 2, 3
    y = torch.randn(T * k, d)
    rows = torch.arange(T * k)
    w = torch.rand(T, k)
    with pytest.raises(
        RuntimeError,
        match=r"unpermute: row_of_slot values must be in \[0, 8\), got row_of_slot\[3\] = 8",
    ):
        unpermute(y, torch.tensor([0, 1, 2, 8, 4, 5, 6, 7]), w)
    with pytest.raises(RuntimeError, match=r"unpermute: y_sorted must have T\*k = 8 rows"):
        unpermute(y[:7], rows, w)
    with pytest.raises(RuntimeError, match=r"unpermute: row_of_slot must have dtype in \{Long\}"):
        unpermute(y, rows.int(), w)
    with pytest.raises(RuntimeError, match=r"weights must be float32 or the dtype of y_sorted"):
        unpermute(y.bfloat16(), rows, w.half())
    with pytest.raises(
        RuntimeError, match=r"unpermute_backward: row_of_slot must be a permutation"
    ):
        ops.unpermute_backward(torch.randn(T, d), y, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), w)
    with pytest.raises(RuntimeError, match=r"permute_backward: row_of_slot values must be in"):
        ops.permute_backward(y, torch.tensor([0, 1, 2, -1, 4, 5, 6, 7]), torch.tensor([0, 8]), k)
    with pytest.raises(
        RuntimeError, match=r"permute_backward: offsets\[E\] must be in \[0, T\*k = 8\], got 9"
    ):
        ops.permute_backward(y, rows, torch.tensor([0, 9]), k)


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 8, 64, 256])
def test_cuda_permute_and_unpermute_match_cpu(seed, dtype, E):
    for T, k, d in ((0, 2, 8), (1, 8, 3), (1000, 2, 64), (3001, 8, 130)):
        ids = _rand_ids(T, k, E, drop_frac=0.1)
        x = torch.randn(T, d).to(dtype)
        w = torch.rand(T, k)
        cpu = permute(x, ids, E)
        gpu = permute(x.cuda(), ids.cuda(), E)
        for c, g in zip(cpu, gpu):
            assert g.is_cuda
            assert torch.equal(c, g.cpu())
        y_cpu = unpermute(cpu[0], cpu[1], w)
        y_gpu = unpermute(gpu[0], gpu[1], w.cuda())
        torch.testing.assert_close(y_gpu.cpu().double(), y_cpu.double(), **TOL[dtype])
        grad_y = torch.randn(T, d).to(dtype)
        bc = ops.unpermute_backward(grad_y, cpu[0], cpu[1], w)
        bg = ops.unpermute_backward(grad_y.cuda(), gpu[0], gpu[1], w.cuda())
        torch.testing.assert_close(bg[0].cpu().double(), bc[0].double(), **TOL[dtype])
        torch.testing.assert_close(bg[1].cpu(), bc[1], rtol=1e-3, atol=1e-3 * max(d, 1))
        gx_c = ops.permute_backward(bc[0], cpu[1], cpu[2], k)
        gx_g = ops.permute_backward(bg[0], gpu[1], gpu[2], k)
        torch.testing.assert_close(gx_g.cpu().double(), gx_c.double(), **TOL[dtype])


@pytest.mark.cuda
def test_cuda_permute_with_many_experts_uses_global_counters_and_matches_cpu(seed):
    # E + 1 bins of int64 counters exceed the shared-memory budget: the kernels fall back to a
    # global scratch of counters per chunk.
    T, k, E, d = 5000, 4, 6000, 16
    ids = _rand_ids(T, k, E, drop_frac=0.1)
    x = torch.randn(T, d)
    for c, g in zip(permute(x, ids, E), permute(x.cuda(), ids.cuda(), E)):
        assert torch.equal(c, g.cpu())


@pytest.mark.cuda
def test_cuda_results_are_bitwise_deterministic(seed):
    T, k, E, d = 20000, 8, 64, 96
    ids = _rand_ids(T, k, E, drop_frac=0.05, device="cuda")
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, k, device="cuda")
    gy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

    def run():
        xs, ros, off = permute(x, ids, E)
        gys, gw = ops.unpermute_backward(gy, xs, ros, w)
        return xs, ros, off, unpermute(xs, ros, w), gys, gw, ops.permute_backward(gys, ros, off, k)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_out_of_range_ids_are_treated_as_dropped():
    x = torch.randn(4, 3, device="cuda")
    ids = torch.tensor([[0, 7], [1, -5], [0, 1], [2, 2]], device="cuda")
    x_sorted, row_of_slot, offsets = permute(x, ids, 3)
    want = permute_ref(x.cpu(), torch.where((ids >= 0) & (ids < 3), ids, -1).cpu(), 3)
    for g, w in zip((x_sorted, row_of_slot, offsets), want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck(seed):
    T, k, E, d = 8, 3, 4, 5
    ids = _rand_ids(T, k, E, drop_frac=0.2, device="cuda")
    x = torch.randn(T, d, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, device="cuda", requires_grad=True)

    def f(x, w):
        xs, ros, _ = permute(x, ids, E)
        return unpermute(xs * 1.5, ros, w)

    assert torch.autograd.gradcheck(f, (x, w))
    opcheck(ops.permute.default, (x, ids, E))
    xs, ros, off = permute(x.detach(), ids, E)
    opcheck(ops.unpermute.default, (xs, ros, w))
    opcheck(ops.permute_backward.default, (xs, ros, off, k))


_ISA_SCRIPT = """
import sys, torch, moe_framework
from moe_framework.ops import permute, unpermute
ops = torch.ops.moe_framework
g = torch.Generator().manual_seed(int(sys.argv[1]))
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    T, k, E, d = 77, 4, 8, 45
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.randint(-1, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    xs, ros, off = permute(x, ids, E)
    gys, gw = ops.unpermute_backward(x, xs, ros, w)
    out += [unpermute(xs, ros, w), gys, gw, ops.permute_backward(gys, ros, off, k)]
sys.stdout.buffer.write(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in out))
"""


def test_cpu_avx2_and_baseline_builds_give_identical_bits(seed):
    from isa_builds import outputs_of_both_builds

    baseline, default = outputs_of_both_builds(_ISA_SCRIPT, str(seed))
    assert len(baseline) > 0 and baseline == default
