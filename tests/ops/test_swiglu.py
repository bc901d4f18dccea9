"""swiglu / swiglu_backward / swiglu_backward_: against the plain-PyTorch reference, gradients,
opcheck, torch.compile, bad input, the CPU builds, and the expert FFNs' in-place backward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch.library import opcheck

from moe_framework import MoELayer, ops
from moe_framework.experts import DenseFFN, expert_ffn
from moe_framework.ops.reference import swiglu_backward_ref, swiglu_ref

OPS = torch.ops.moe_framework
# bf16/fp16: one rounding of the fp32 result (the reference rounds the same fp32 math once, but
# our exp differs from torch's by up to 2 ulp in fp32, which can flip a rounding).
TOL = TOLERANCES["elementwise"]


def _shapes(g):
    # odd sizes, N-d, 1-d, rows of H = 1, widths around the 16-lane vector, zero-size
    H = int(torch.randint(1, 40, (1,), generator=g))
    return [
        (int(torch.randint(1, 30, (1,), generator=g)), 2 * H),
        (3, 5, 2 * 17),
        (2 * 16,),
        (7, 2),
        (0, 2 * H),
        (4, 0),
        (2, 0, 6),
    ]


@pytest.mark.parametrize("dtype", list(TOL))
def test_swiglu_and_backward_match_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    for shape in _shapes(g):
        h = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        grad = torch.randn((*shape[:-1], shape[-1] // 2), generator=g, dtype=torch.float64).to(
            dtype
        )
        y = ops.swiglu(h)
        assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
        torch.testing.assert_close(y, swiglu_ref(h), **TOL[dtype])
        gh = ops.swiglu_backward(grad, h)
        assert gh.shape == h.shape and gh.dtype == dtype
        torch.testing.assert_close(gh, swiglu_backward_ref(grad, h), **TOL[dtype])
        # the in-place variant writes the same values over h
        h2 = h.clone()
        OPS.swiglu_backward_(grad, h2)
        torch.testing.assert_close(h2, gh, rtol=0, atol=0)


def test_swiglu_reads_non_contiguous_inputs(seed):
    base = torch.randn(9, 3 * 26)
    h = base[:, 5 : 5 + 26]  # row slices: strided rows
    assert not h.is_contiguous()
    torch.testing.assert_close(ops.swiglu(h), swiglu_ref(h))
    ht = torch.randn(26, 9).t()  # transposed: inner stride != 1
    torch.testing.assert_close(ops.swiglu(ht), swiglu_ref(ht))
    grad = torch.randn(13, 9).t()
    torch.testing.assert_close(ops.swiglu_backward(grad, ht), swiglu_backward_ref(grad, ht))
    h3 = torch.randn(4, 6, 20).transpose(0, 1)
    torch.testing.assert_close(ops.swiglu(h3), swiglu_ref(h3))


def test_swiglu_limits_follow_torch_silu():
    x = torch.tensor([0.0, -0.0, 1e-30, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    up = torch.linspace(-2, 2, x.numel())
    h = torch.cat([x, up]).unsqueeze(0)
    want = F.silu(x.double()) * up.double()
    got = ops.swiglu(h)[0].double()
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=1e-30)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    # gradients at the limits: never NaN where torch's formula is finite
    grad = torch.ones(1, x.numel())
    gh = ops.swiglu_backward(grad, h)[0].double()
    hd = h.double().requires_grad_(True)
    (want_g,) = torch.autograd.grad(
        F.silu(hd[0, : x.numel()]) * hd[0, x.numel() :], hd, grad[0].double()
    )
    fin = want_g[0].isfinite()
    torch.testing.assert_close(gh[fin], want_g[0][fin], rtol=2e-6, atol=1e-30)


def test_swiglu_gradcheck_and_gradgradcheck_float64(seed):
    h = torch.randn(5, 2 * 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))
    assert torch.autograd.gradgradcheck(ops.swiglu, (h,))


def test_opcheck_swiglu_ops(seed):
    for shape in [(6, 2 * 9), (2, 3, 2 * 17), (0, 8)]:
        h = torch.randn(shape, requires_grad=True)
        opcheck(OPS.swiglu.default, (h,))
        grad = torch.randn((*shape[:-1], shape[-1] // 2))
        opcheck(OPS.swiglu_backward.default, (grad, h.detach()))
        opcheck(OPS.swiglu_backward_.default, (grad, h.detach().clone()))


def test_swiglu_compiles_fullgraph_with_same_values_and_gradients(seed):
    h = torch.randn(11, 2 * 21, requires_grad=True)

    def f(h):
        return ops.swiglu(h * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, yc = f(h), compiled(h)
    torch.testing.assert_close(yc, y, rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), h)
    (gc,) = torch.autograd.grad(compiled(h).sum(), h)
    torch.testing.assert_close(gc, g, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (OPS.swiglu, (torch.randn(3, 5),), "last dimension must be even"),
        (OPS.swiglu, (torch.tensor(1.0),), "at least 1 dimension"),
        (OPS.swiglu, (torch.ones(3, 4, dtype=torch.int32),), "dtype"),
        (
            OPS.swiglu_backward,
            (torch.randn(3, 3), torch.randn(3, 4)),
            "last dimension must be H = 2",
        ),
        (OPS.swiglu_backward, (torch.randn(2, 2), torch.randn(3, 4)), "grad must be h.shape"),
        (
            OPS.swiglu_backward,
            (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4)),
            "grad must have h's dtype",
        ),
        (OPS.swiglu_backward_, (torch.randn(4, 3), torch.randn(6, 4).t()), "must be contiguous"),
    ],
)
def test_swiglu_bad_input_raises_clear_error(fn, args, match):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_swiglu_backward_inplace_bumps_the_version_so_autograd_refuses_stale_saved_h(seed):
    h = torch.randn(4, 10)
    v = h._version
    OPS.swiglu_backward_(torch.randn(4, 5), h)
    assert h._version == v + 1
    # h saved by an autograd node, then overwritten by the op: backward must refuse, not use it
    x = torch.randn(4, 10, requires_grad=True)
    y = x * 2
    loss = (y * y).sum()  # saves y
    with torch.no_grad():
        OPS.swiglu_backward_(torch.randn(4, 5), y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_swiglu_backward_inplace_rejects_grad_aliasing_h():
    h = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="must not share memory"):
        OPS.swiglu_backward_(h[:, :4], h)


_ISA_SCRIPT = """
import sys, torch, moe_framework
ops = torch.ops.moe_framework
g = torch.Generator().manual_seed(int(sys.argv[1]))
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for rows, half in ((37, 53), (5, 16), (3, 1)):
        h = (4 * torch.randn(rows, 2 * half, generator=g)).to(dtype)
        grad = torch.randn(rows, half, generator=g).to(dtype)
        out += [ops.swiglu(h), ops.swiglu_backward(grad, h)]
sys.stdout.buffer.write(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in out))
"""


def test_cpu_builds_give_identical_bits(seed):
    # The baseline, AVX2 (GCC-vectorised scalar loop) and AVX-512 (16-lane vectors) builds run the
    # same operations without FMA: every build must give the same bits.
    from isa_builds import ISAS, output_under

    outs = [output_under(isa, _ISA_SCRIPT, str(seed)) for isa in ISAS]
    assert len(outs[0]) > 0 and all(o == outs[0] for o in outs[1:])


# ------------------------------------------------------------------------------------------------
# the expert FFNs write the SwiGLU gradient over their own activation


def _expert_case(dtype=torch.float64):
    E, d, hid, M = 3, 6, 5, 11
    offsets = torch.tensor([0, 4, 4, 11], dtype=torch.int64)
    x = torch.randn(M, d, dtype=dtype, requires_grad=True)
    w_in = torch.randn(E, d, 2 * hid, dtype=dtype, requires_grad=True)
    w_out = torch.randn(E, hid, d, dtype=dtype, requires_grad=True)
    return offsets, x, w_in, w_out, (M, 2 * hid)


class _OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("recompute", [True, False])
def test_expert_ffn_inplace_backward_same_gradients_and_no_new_activation_sized_buffer(
    seed, recompute
):
    offsets, x, w_in, w_out, h_shape = _expert_case()
    g = torch.randn(x.shape[0], x.shape[1], dtype=x.dtype)
    grads = {}
    for inplace in (False, True):
        y = expert_ffn(
            x, offsets, w_in, w_out, recompute_activation=recompute, inplace_backward=inplace
        )
        with _OutputShapes() as mode:
            grads[inplace] = torch.autograd.grad(y, (x, w_in, w_out), g)
        made = [f for f, s in mode.shapes if s == h_shape]
        # out of place the SwiGLU backward allocates one [M, 2H] gradient; in place none
        assert made == ([] if inplace else ["moe_framework.swiglu_backward.default"]), mode.shapes
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recompute", [True, False])
def test_expert_ffn_second_backward_after_inplace_raises_clear_error(seed, recompute):
    offsets, x, w_in, w_out, _ = _expert_case()
    y = expert_ffn(x, offsets, w_in, w_out, recompute_activation=recompute)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=False"):
        y.sum().backward()
    # inplace_backward=False allows it: the second backward accumulates the same gradients
    for t in (x, w_in, w_out):
        t.grad = None
    y = expert_ffn(x, offsets, w_in, w_out, recompute_activation=recompute, inplace_backward=False)
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, w_in, w_out)]
    y.sum().backward()
    for t, f in zip((x, w_in, w_out), first):
        torch.testing.assert_close(t.grad, 2 * f)


def test_expert_ffn_gradcheck_with_inplace_backward_off(seed):
    offsets, x, w_in, w_out, _ = _expert_case()

    def f(x, w_in, w_out):
        return expert_ffn(x, offsets, w_in, w_out, inplace_backward=False)

    assert torch.autograd.gradcheck(f, (x, w_in, w_out))


def test_moe_layer_and_dense_ffn_gradients_do_not_depend_on_inplace_backward(seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 7, 16)
    for make in (
        lambda ip: MoELayer.build(
            d_model=16, d_hidden=24, num_experts=6, k=2, num_shared_experts=1, inplace_backward=ip
        ),
        lambda ip: DenseFFN(d_model=16, d_hidden=24, inplace_backward=ip),
    ):
        torch.manual_seed(seed)
        a = make(True)
        torch.manual_seed(seed)
        b = make(False)
        for m in (a, b):
            out = m(x)
            (out[0] if isinstance(out, tuple) else out).square().sum().backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad)


def test_inplace_backward_keeps_double_backward(seed):
    offsets, x, w_in, w_out, _ = _expert_case()
    y = expert_ffn(x, offsets, w_in, w_out)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w_in)
    y2 = expert_ffn(x, offsets, w_in, w_out, inplace_backward=False)
    (gx2,) = torch.autograd.grad(y2.square().sum(), x, create_graph=True)
    (gw2,) = torch.autograd.grad(gx2.square().sum(), w_in)
    torch.testing.assert_close(gw, gw2, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOL))
def test_cuda_swiglu_matches_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    for shape in _shapes(g):
        h = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        grad = torch.randn((*shape[:-1], shape[-1] // 2), generator=g).to(dtype)
        hc, gc = h.cuda(), grad.cuda()
        torch.testing.assert_close(ops.swiglu(hc).cpu(), swiglu_ref(h), **TOL[dtype])
        want = swiglu_backward_ref(grad, h)
        torch.testing.assert_close(ops.swiglu_backward(gc, hc).cpu(), want, **TOL[dtype])
        h2 = hc.clone()
        OPS.swiglu_backward_(gc, h2)
        torch.testing.assert_close(h2.cpu(), want, **TOL[dtype])
    hd = torch.randn(4, 2 * 33, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (hd,))
    opcheck(OPS.swiglu.default, (hd,))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_moe_layer_under_activation_checkpointing_gives_same_gradients(seed, use_reentrant):
    # Checkpointing recomputes the forward in backward; the in-place SwiGLU backward then writes
    # over the recomputed h, which must not disturb either checkpoint implementation.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(seed)
    m = MoELayer.build(
        d_model=16, d_hidden=24, num_experts=6, k=2, num_shared_experts=1, dtype=torch.float64
    )
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)

    def grads(f):
        m.zero_grad(set_to_none=True)
        x.grad = None
        f(x).square().sum().backward()
        return [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]

    want = grads(lambda t: m(t)[0])
    got = grads(lambda t: checkpoint(lambda u: m(u)[0], t, use_reentrant=use_reentrant))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# ops own their autograd: the fused expert-FFN nodes live in moe_framework.ops


def test_only_the_ops_package_calls_torch_ops_moe_framework():
    import pathlib

    package = pathlib.Path(ops.__file__).resolve().parent.parent
    offenders = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.parent != package / "ops" and "torch.ops.moe_framework" in p.read_text()
    )
    assert offenders == []


@pytest.mark.parametrize("trans_b", [False, True])
def test_ops_swiglu_down_proj_matches_the_plain_formula_and_gradcheck(seed, trans_b):
    E, hid, d = 3, 4, 5
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int64)  # rows 6..7 are dropped slots
    h = torch.randn(8, 2 * hid, dtype=torch.float64, requires_grad=True)
    shape = (E, d, hid) if trans_b else (E, hid, d)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = ops.swiglu_down_proj(h, w, offsets, trans_b, inplace_backward=False)
    act = F.silu(h[:, :hid]) * h[:, hid:]
    wt = w.transpose(1, 2) if trans_b else w
    want = torch.cat(
        [act[lo:hi] @ wt[e] for e, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 6)])]
        + [h.new_zeros(2, d)]
    )
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    assert torch.autograd.gradcheck(
        lambda h, w: ops.swiglu_down_proj(h, w, offsets, trans_b, inplace_backward=False), (h, w)
    )
    assert torch.autograd.gradcheck(lambda h: ops.swiglu_owned(h, inplace_backward=False), (h,))
    torch.testing.assert_close(ops.swiglu_owned(h), ops.swiglu(h), rtol=0, atol=0)


def test_ops_wrappers_of_the_backward_ops_equal_the_raw_ops(seed):
    from moe_framework.ops.reference import grouped_gemm_wgrad_ref

    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int64)
    a, g = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    for trans_b in (False, True):
        got = ops.grouped_gemm_wgrad(a, g, offsets, trans_b=trans_b)
        torch.testing.assert_close(got, grouped_gemm_wgrad_ref(a, g, offsets, trans_b))
    h, grad = torch.randn(6, 8), torch.randn(6, 4)
    want = ops.swiglu_backward(grad, h)
    ops.swiglu_backward_(grad, h)
    assert torch.equal(h, want)
    x, ids = torch.randn(5, 3), torch.tensor([[0, 2], [1, -1], [2, 0], [0, 1], [-1, 2]])
    x_sorted, row_of_slot, offsets = ops.permute(x, ids, 3)
    w = torch.rand(5, 2)
    gy = torch.randn(5, 3)
    gys, gw = ops.unpermute_backward(gy, x_sorted, row_of_slot, w)
    assert torch.equal(gys, OPS.unpermute_backward(gy, x_sorted, row_of_slot, w)[0])
    assert torch.equal(gw, OPS.unpermute_backward(gy, x_sorted, row_of_slot, w)[1])
    gx = ops.permute_backward(gys, row_of_slot, offsets, 2)
    assert torch.equal(gx, OPS.permute_backward(gys, row_of_slot, offsets, 2))
