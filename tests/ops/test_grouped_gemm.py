"""grouped_gemm / grouped_gemm_wgrad: against the plain-PyTorch reference, gradients, opcheck,
torch.compile, determinism and input validation (CPU; CUDA tests are marked and skip without a
GPU)."""

import pytest
import torch
from conftest import TOLERANCES
from torch.library import opcheck

import moe_framework  # noqa: F401
from moe_framework.ops import grouped_gemm
from moe_framework.ops.reference import grouped_gemm_ref, grouped_gemm_wgrad_ref

ops = torch.ops.moe_framework
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Compared with a float64 reference rounded to the dtype: fp32 accumulation over K <= ~300 terms
# of randn products (|out| ~ sqrt(K)), plus one rounding of the output for bf16/fp16.
TOL = TOLERANCES["gemm"]


def _rand_offsets(M, E, zero_frac=0.3, gaps=False):
    """offsets [E+1] int64: random group sizes summing to M (to fewer rows with `gaps`), a
    fraction of experts with zero rows."""
    w = torch.rand(E)
    w[torch.rand(E) < zero_frac] = 0
    used = M
    start = 0
    if gaps and M > 2:
        start = int(torch.randint(0, M // 3 + 1, ()))
        used = int(torch.randint(0, M - start + 1, ()))
    if w.sum() == 0:
        w[int(torch.randint(0, E, ()))] = 1
    counts = torch.floor(w / w.sum() * used).long()
    counts[int(torch.argmax(w))] += used - counts.sum()
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(counts, 0)
    return off + start


def _ref64(a, b, offsets, trans_b):
    return grouped_gemm_ref(a.double(), b.double(), offsets, trans_b)


def _make(M, K, N, E, dtype, trans_b, scale=1.0):
    a = (torch.randn(M, K) * scale).to(dtype)
    b = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(dtype)
    return a, b


# ------------------------------------------------------------------------------------------------
# forward against the reference


@pytest.mark.parametrize("E", [1, 8, 64, 256])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_matches_reference(seed, E, trans_b, dtype):
    for M in (0, 1, int(torch.randint(2, 300, ()))):
        K = int(torch.randint(1, 80, ()))
        N = int(torch.randint(1, 80, ()))
        a, b = _make(M, K, N, E, dtype, trans_b)
        off = _rand_offsets(M, E, gaps=bool(torch.randint(0, 2, ())))
        got = grouped_gemm(a, b, off, trans_b)
        assert got.dtype == dtype and got.shape == (M, N)
        want = _ref64(a, b, off, trans_b)
        torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=f"M={M} K={K} N={N}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 200])
def test_grouped_gemm_matches_reference_at_model_sizes(seed, dtype, rows):
    # Sizes that exercise the small-group tile kernel and the large-group GEMM path, with K and N
    # not multiples of the register tile.
    E, K, N = 6, 131, 203
    M = rows * E + 3
    a, b = _make(M, K, N, E, dtype, trans_b=False)
    off = torch.arange(E + 1, dtype=torch.long) * rows
    for trans_b in (False, True):
        bb = b.transpose(1, 2).contiguous() if trans_b else b
        got = grouped_gemm(a, bb, off, trans_b)
        torch.testing.assert_close(got.double(), _ref64(a, bb, off, trans_b), **TOL[dtype])
        assert torch.all(got[rows * E :] == 0), "rows after offsets[E] must be zero"


def test_grouped_gemm_rows_outside_offsets_are_zero(seed):
    a, b = _make(20, 7, 9, 3, torch.float32, False)
    off = torch.tensor([4, 6, 6, 15])
    out = grouped_gemm(a, b, off)
    assert torch.all(out[:4] == 0) and torch.all(out[15:] == 0)
    torch.testing.assert_close(out[4:6], a[4:6] @ b[0])
    torch.testing.assert_close(out[6:15], a[6:15] @ b[2])


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_noncontiguous_inputs(seed, trans_b, dtype):
    M, K, N, E = 77, 45, 38, 5
    a_big = torch.randn(K, 2 * M).to(dtype)
    a = a_big.t()[::2]  # [M, K] with strides (2, 2M): transposed and strided
    b_big = torch.randn(E, 2 * K, N).to(dtype) if not trans_b else torch.randn(E, K, 2 * N)
    b_big = b_big.to(dtype)
    b = b_big[:, ::2] if not trans_b else b_big.transpose(1, 2)[:, ::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    off = _rand_offsets(M, E)
    got = grouped_gemm(a, b, off, trans_b)
    want = grouped_gemm(a.contiguous(), b.contiguous(), off, trans_b)
    torch.testing.assert_close(got.double(), _ref64(a, b, off, trans_b), **TOL[dtype])
    torch.testing.assert_close(got, want, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# weight gradient


@pytest.mark.parametrize("E", [1, 8, 64, 256])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_wgrad_matches_reference(seed, E, trans_b, dtype):
    for M in (0, 1, int(torch.randint(2, 300, ()))):
        K = int(torch.randint(1, 60, ()))
        N = int(torch.randint(1, 60, ()))
        a = torch.randn(M, K).to(dtype)
        g = torch.randn(M, N).to(dtype)
        off = _rand_offsets(M, E, gaps=bool(torch.randint(0, 2, ())))
        got = ops.grouped_gemm_wgrad(a, g, off, trans_b)
        assert got.dtype == dtype and got.shape == ((E, N, K) if trans_b else (E, K, N))
        torch.testing.assert_close(
            got.double(), grouped_gemm_wgrad_ref(a, g, off, trans_b), **TOL[dtype]
        )


def test_grouped_gemm_wgrad_experts_without_rows_get_zero(seed):
    a, g = torch.randn(10, 6), torch.randn(10, 4)
    off = torch.tensor([0, 0, 10, 10])
    db = ops.grouped_gemm_wgrad(a, g, off, False)
    assert torch.all(db[0] == 0) and torch.all(db[2] == 0)
    torch.testing.assert_close(db[1], a.t() @ g)


@pytest.mark.parametrize("rows", [3, 16, 40, 300])
def test_grouped_gemm_wgrad_noncontiguous_and_large_groups(seed, rows):
    E, K, N = 4, 70, 51
    M = E * rows
    a = torch.randn(K, M).t()
    g = torch.randn(M, 2 * N)[:, ::2]
    off = torch.arange(E + 1) * rows
    for trans_b in (False, True):
        got = ops.grouped_gemm_wgrad(a, g, off, trans_b)
        torch.testing.assert_close(
            got.double(), grouped_gemm_wgrad_ref(a, g, off, trans_b), **TOL[torch.float32]
        )


# ------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_gradcheck_float64(seed, trans_b):
    M, K, N, E = 13, 5, 4, 4
    a = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    shape = (E, N, K) if trans_b else (E, K, N)
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([1, 4, 4, 9, 12])  # gap before, an empty expert, a gap after
    assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, off, trans_b), (a, b))
    assert torch.autograd.gradgradcheck(lambda a, b: grouped_gemm(a, b, off, trans_b), (a, b))


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_wgrad_gradcheck_float64(seed, trans_b):
    a = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0, 5, 5, 10])
    assert torch.autograd.gradcheck(lambda a, g: ops.grouped_gemm_wgrad(a, g, off, trans_b), (a, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_backward_matches_autograd_of_reference(seed, dtype):
    M, K, N, E = 90, 33, 21, 8
    a, b = _make(M, K, N, E, dtype, False)
    off = _rand_offsets(M, E, gaps=True)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.double().requires_grad_(), b.double().requires_grad_()
    dy = torch.randn(M, N).to(dtype)
    grouped_gemm(a1, b1, off).backward(dy)
    # With gaps, every expert can be empty (offsets[E] == offsets[0]): the reference output is then
    # a constant without a graph, and the expected gradients are zero.
    ref = grouped_gemm_ref(a2, b2, off)
    (ref * dy.double()).sum().add(0 * (a2.sum() + b2.sum())).backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, **TOL[dtype])
    torch.testing.assert_close(b1.grad.double(), b2.grad, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# opcheck, torch.compile, determinism


def test_opcheck_grouped_gemm_and_wgrad(seed):
    M, K, N, E = 23, 6, 5, 4
    off = torch.tensor([0, 7, 7, 20, 23])
    for trans_b in (False, True):
        a = torch.randn(M, K, requires_grad=True)
        b = torch.randn((E, N, K) if trans_b else (E, K, N), requires_grad=True)
        opcheck(ops.grouped_gemm.default, (a, b, off, trans_b))
        opcheck(ops.grouped_gemm.default, (a.detach()[:0], b, torch.zeros(E + 1).long(), trans_b))
        g = torch.randn(M, N, requires_grad=True)
        opcheck(ops.grouped_gemm_wgrad.default, (a, g, off, trans_b))


def _expert_mlp(x, w1, w2, off):
    h = torch.nn.functional.gelu(grouped_gemm(x, w1, off))
    return grouped_gemm(h, w2, off, True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_forward_and_backward(seed, backend):
    M, d, h, E = 40, 16, 24, 8
    x = torch.randn(M, d, requires_grad=True)
    w1 = torch.randn(E, d, h, requires_grad=True)
    w2 = torch.randn(E, d, h, requires_grad=True)
    off = _rand_offsets(M, E)
    compiled = torch.compile(_expert_mlp, backend=backend, fullgraph=True)
    y_c = compiled(x, w1, w2, off)
    g_c = torch.autograd.grad(y_c.sum(), (x, w1, w2))
    y_e = _expert_mlp(x, w1, w2, off)
    g_e = torch.autograd.grad(y_e.sum(), (x, w1, w2))
    torch.testing.assert_close(y_c, y_e)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge)


def test_compile_has_no_graph_breaks(seed):
    M, d, h, E = 24, 8, 12, 4
    x = torch.randn(M, d, requires_grad=True)
    w1 = torch.randn(E, d, h, requires_grad=True)
    w2 = torch.randn(E, d, h, requires_grad=True)
    off = _rand_offsets(M, E)
    explanation = torch._dynamo.explain(_expert_mlp)(x, w1, w2, off)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_runs_and_thread_counts_give_bitwise_equal_results(seed, dtype):
    M, K, N, E = 300, 64, 96, 16
    a, b = _make(M, K, N, E, dtype, False)
    off = _rand_offsets(M, E)
    g = torch.randn(M, N).to(dtype)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, max(2, threads), 1):
            torch.set_num_threads(t)
            runs.append((grouped_gemm(a, b, off), ops.grouped_gemm_wgrad(a, g, off, False)))
    finally:
        torch.set_num_threads(threads)
    for out, db in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(db, runs[0][1])


# ------------------------------------------------------------------------------------------------
# bad input


def _good():
    return torch.randn(10, 4), torch.randn(3, 4, 5), torch.tensor([0, 3, 6, 10])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda a, b, o: (a[0], b, o), "a must have 2 dimensions"),
        (lambda a, b, o: (a, b[0], o), "b must have 3 dimensions"),
        (lambda a, b, o: (a.int(), b, o), "a must have dtype in"),
        (lambda a, b, o: (a, b.double(), o), "b must have the dtype of a"),
        (lambda a, b, o: (a[:, :3], b, o), "inner dimensions differ"),
        (lambda a, b, o: (a, b, o.int()), "offsets must have dtype in"),
        (lambda a, b, o: (a, b, o[:3]), "offsets must have E\\+1 entries"),
        (lambda a, b, o: (a, b, o.view(2, 2)), "offsets must have 1 dimensions"),
        (
            lambda a, b, o: (a, b, torch.tensor([0, 6, 3, 10])),
            "offsets must be non-decreasing, got offsets\\[1\\] = 6",
        ),
        (lambda a, b, o: (a, b, torch.tensor([0, 3, 6, 11])), "offsets\\[E\\] must be <= M = 10"),
        (lambda a, b, o: (a, b, torch.tensor([-1, 3, 6, 10])), "offsets\\[0\\] must be >= 0"),
    ],
)
def test_grouped_gemm_rejects_bad_inputs_with_clear_errors(make, match):
    a, b, o = make(*_good())
    with pytest.raises(RuntimeError, match="grouped_gemm: " + match):
        grouped_gemm(a, b, o)


def test_grouped_gemm_wgrad_rejects_bad_inputs_with_clear_errors():
    a, g, o = torch.randn(10, 4), torch.randn(10, 5), torch.tensor([0, 3, 6, 10])
    with pytest.raises(RuntimeError, match="grouped_gemm_wgrad: grad_out must have the M=10 rows"):
        ops.grouped_gemm_wgrad(a, g[:9], o, False)
    with pytest.raises(RuntimeError, match="grouped_gemm_wgrad: grad_out must have the dtype"):
        ops.grouped_gemm_wgrad(a, g.double(), o, False)
    with pytest.raises(RuntimeError, match="grouped_gemm_wgrad: offsets must be non-decreasing"):
        ops.grouped_gemm_wgrad(a, g, torch.tensor([0, 6, 3, 10]), False)
    with pytest.raises(RuntimeError, match="grouped_gemm_wgrad: offsets\\[E\\] must be <= M"):
        ops.grouped_gemm_wgrad(a, g, torch.tensor([0, 6, 8, 12]), False)


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 8, 64, 256])
def test_cuda_grouped_gemm_matches_reference(seed, dtype, E):
    for M in (0, 1, 7, 300, 2048):
        for trans_b in (False, True):
            K = int(torch.randint(1, 300, ()))
            N = int(torch.randint(1, 300, ()))
            a, b = _make(M, K, N, E, dtype, trans_b)
            off = _rand_offsets(M, E, gaps=True)
            got = grouped_gemm(a.cuda(), b.cuda(), off.cuda(), trans_b)
            assert got.is_cuda and got.dtype == dtype
            tol = dict(TOL[dtype])
            if dtype == torch.float32:  # the GPU may use TF32-free FMA but a different sum order
                tol = dict(rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got.cpu().double(), _ref64(a, b, off, trans_b), **tol)
            g = torch.randn(M, N).to(dtype)
            db = ops.grouped_gemm_wgrad(a.cuda(), g.cuda(), off.cuda(), trans_b)
            torch.testing.assert_close(
                db.cpu().double(), grouped_gemm_wgrad_ref(a, g, off, trans_b), **tol
            )


@pytest.mark.cuda
def test_cuda_grouped_gemm_clamps_bad_offsets_without_reading_out_of_bounds(seed):
    a, b = _make(10, 8, 8, 3, torch.float32, False)
    off = torch.tensor([0, 6, 3, 99]).cuda()  # non-monotone, past M: clamped into [0, M]
    out = grouped_gemm(a.cuda(), b.cuda(), off)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here as a CUDA error
    assert out.shape == (10, 8)
    # Values for invalid offsets are unspecified; rows covered by a valid expert range are right.
    torch.testing.assert_close(out[:3].cpu(), a[:3] @ b[0], rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_grouped_gemm_opcheck_and_backward(seed):
    M, K, N, E = 50, 40, 24, 4
    a = torch.randn(M, K, device="cuda", requires_grad=True)
    b = torch.randn(E, K, N, device="cuda", requires_grad=True)
    off = torch.tensor([0, 10, 10, 40, 50], device="cuda")
    opcheck(ops.grouped_gemm.default, (a, b, off, False))
    dy = torch.randn(M, N, device="cuda")
    grouped_gemm(a, b, off).backward(dy)
    a2, b2 = a.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()
    grouped_gemm_ref(a2, b2, off.cpu()).backward(dy.cpu().double())
    torch.testing.assert_close(a.grad.cpu().double(), a2.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad.cpu().double(), b2.grad, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# every CPU build (scalar baseline, AVX2+FMA, AVX-512) against the reference

_ISA_SCRIPT = r"""
import sys
import torch
import moe_framework  # noqa: F401
from moe_framework.ops.reference import grouped_gemm_ref, grouped_gemm_wgrad_ref

ops = torch.ops.moe_framework
torch.manual_seed(int(sys.argv[1]))
# Rows per expert cover every remainder of the 4- and 8-row register tiles, the 8-row streaming
# and 32/128-row BLAS thresholds and zero-row experts; N covers every remainder of the 24- and
# 48-column tiles and a split into two column blocks (> 1056); K = 300 spans two packed k blocks
# (fp32 panels at N = 49, bf16 pair panels at N = 1100); odd K leaves a bf16 pair half empty.
COUNTS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 0, 63, 64, 65, 130]
CASES = [(COUNTS, 37, 97), (COUNTS, 300, 49), ([5, 0, 70], 301, 1100)]
CASES += [([3, 8, 13], 20, n) for n in range(1, 50)]
# fp32 b^T groups from 24 rows run the AVX-512 kernel on transposed panels (16x16 blocks: K and
# N remainders of 16), in ranges of up to 512 rows of one expert (600 rows: two ranges).
CASES += [([0, 23, 24, 25, 0, 40, 600], 83, 115), ([33, 0, 47], 513, 1061)]
# fp32 a @ b[e] tiles of 1-16 rows run the direct AVX-512 kernel (no packing; two 8-row passes
# from 9 rows): every row count, 48-column strip tails, odd K and K past its prefetch distance.
CASES += [(list(range(17)), 33, 113), ([16, 0, 9, 1], 67, 16), ([12, 5], 1, 50)]
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
checked = 0
for counts, K, N in CASES:
    E = len(counts)
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(off[-1]) + 2  # two rows after offsets[E]
    for dtype in TOL:
        for trans_b in (False, True):
            a = torch.randn(M, K).to(dtype)
            b = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(dtype)
            g = torch.randn(M, N).to(dtype)
            out = ops.grouped_gemm(a, b, off, trans_b)
            assert torch.equal(out, ops.grouped_gemm(a, b, off, trans_b)), "not deterministic"
            want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
            torch.testing.assert_close(out.double(), want, **TOL[dtype], msg=f"{counts} {K} {N}")
            db = ops.grouped_gemm_wgrad(a, g, off, trans_b)
            want_db = grouped_gemm_wgrad_ref(a, g, off, trans_b)
            torch.testing.assert_close(db.double(), want_db, **TOL[dtype], msg=f"db {K} {N}")
            checked += 1
# Strided operands on the direct kernel: rows of a with a padded stride, b[e] with a padded row
# stride, a transposed a (copied to rows), and a b^T whose storage is row-major [K, N].
counts, K, N = [16, 3, 0, 8, 11], 45, 100
E = len(counts)
off = torch.zeros(E + 1, dtype=torch.long)
off[1:] = torch.cumsum(torch.tensor(counts), 0)
M = int(off[-1])
for a, b, trans_b in [
    (torch.randn(M, K + 7)[:, 3 : 3 + K], torch.randn(E, K, N + 5)[:, :, 2 : 2 + N], False),
    (torch.randn(K, M).t(), torch.randn(E, K, N), False),
    (torch.randn(M, K), torch.randn(E, K, N).transpose(1, 2), True),
]:
    out = ops.grouped_gemm(a, b, off, trans_b)
    want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32], msg="strided")
    checked += 1
print("checked", checked)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "default"])
def test_each_cpu_build_matches_reference_at_every_tile_remainder(seed, isa):
    from isa_builds import output_under

    out = output_under(isa, _ISA_SCRIPT, str(seed))
    assert out.decode().split() == ["checked", str(57 * 3 * 2 + 3)]
