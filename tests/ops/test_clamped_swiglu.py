"""clamped_swiglu / clamped_swiglu_backward (GPT-OSS's clamped SwiGLU gate): against GPT-OSS's own
formula in plain PyTorch, both layouts, gradients (gradcheck, gradgradcheck), opcheck,
torch.compile, bad input and CUDA."""

import pytest
import torch
from conftest import TOLERANCES
from torch.library import opcheck

from moe_framework import ops
from moe_framework.ops.clamped_swiglu import clamped_swiglu_reference

OPS = torch.ops.moe_framework
TOL = TOLERANCES["elementwise"]


def _shapes(g):
    H = int(torch.randint(1, 40, (1,), generator=g))
    return [
        (int(torch.randint(1, 30, (1,), generator=g)), 2 * H),
        (3, 5, 2 * 17),
        (7, 2),
        (0, 2 * H),
    ]


def _h(shape, g, dtype):
    # Spread wide enough that both clamps (limit 7) are hit, away from the kinks.
    # (after rounding to dtype: a bf16 value can land exactly on the clamp bound).
    h = (6 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    near = ((h.double().abs() - 7).abs() < 0.1) | ((h.double() * 1.702).abs() > 60)
    return torch.where(near, torch.zeros_like(h), h)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("interleaved", [True, False])
def test_clamped_swiglu_and_backward_match_gpt_oss_formula(seed, dtype, interleaved):
    g = torch.Generator().manual_seed(seed)
    alpha, limit = 1.702, 7.0
    for shape in _shapes(g):
        h = _h(shape, g, dtype)
        want = clamped_swiglu_reference(h.double(), alpha, limit, interleaved).to(dtype)
        got = ops.clamped_swiglu(h, alpha, limit, interleaved)
        torch.testing.assert_close(got, want, **TOL[dtype])
        grad = torch.randn(want.shape, generator=g).to(dtype)
        hd = h.double().requires_grad_(True)
        (gh,) = torch.autograd.grad(
            clamped_swiglu_reference(hd, alpha, limit, interleaved), hd, grad.double()
        )
        got_g = ops.clamped_swiglu_backward(grad, h, alpha, limit, interleaved)
        torch.testing.assert_close(got_g, gh.to(dtype), **TOL[dtype])


def test_clamped_swiglu_non_contiguous_and_gradcheck(seed):
    g = torch.Generator().manual_seed(seed)
    h = _h((9, 2 * 11 + 3), g, torch.float64)[:, :22]
    torch.testing.assert_close(
        ops.clamped_swiglu(h, 1.5, 5.0),
        clamped_swiglu_reference(h, 1.5, 5.0),
        rtol=1e-12,
        atol=1e-12,
    )
    hd = _h((4, 2 * 5), g, torch.float64).requires_grad_(True)
    for inter in (True, False):

        def f(t, inter=inter):
            return ops.clamped_swiglu(t, 1.702, 7.0, inter)

        assert torch.autograd.gradcheck(f, (hd,))
        assert torch.autograd.gradgradcheck(f, (hd,))


def test_opcheck_and_compile(seed):
    g = torch.Generator().manual_seed(seed)
    h = _h((5, 12), g, torch.float32).requires_grad_(True)
    opcheck(OPS.clamped_swiglu.default, (h, 1.702, 7.0, True))
    grad = torch.randn(5, 6, generator=g)
    opcheck(OPS.clamped_swiglu_backward.default, (grad, h.detach(), 1.702, 7.0, False))

    def f(t):
        return ops.clamped_swiglu(t, 1.702, 7.0, True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h), f(h))
    (ge,) = torch.autograd.grad(f(h).sum(), h)
    (gc,) = torch.autograd.grad(compiled(h).sum(), h)
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(3, 5), 1.0, 7.0), "even"),
        ((torch.randn(3, 4).int(), 1.0, 7.0), "dtype"),
        ((torch.randn(3, 4), 1.0, -1.0), "limit must be >= 0"),
        ((torch.randn(3, 4), float("nan"), 7.0), "alpha must be a finite number"),
    ],
)
def test_bad_input_raises_clear_error(args, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.clamped_swiglu(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOL))
def test_cuda_clamped_swiglu_matches_cpu(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    for inter in (True, False):
        h = _h((17, 2 * 33), g, dtype)
        grad = torch.randn(17, 33, generator=g).to(dtype)
        torch.testing.assert_close(
            ops.clamped_swiglu(h.cuda(), 1.702, 7.0, inter).cpu(),
            ops.clamped_swiglu(h, 1.702, 7.0, inter),
            **TOL[dtype],
        )
        torch.testing.assert_close(
            ops.clamped_swiglu_backward(grad.cuda(), h.cuda(), 1.702, 7.0, inter).cpu(),
            ops.clamped_swiglu_backward(grad, h, 1.702, 7.0, inter),
            **TOL[dtype],
        )
