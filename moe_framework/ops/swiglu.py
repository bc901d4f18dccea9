"""Wrappers, fake kernels and autograd for the swiglu op family.

``swiglu(h)`` is the SwiGLU activation of an expert (or dense) FFN: ``h [..., 2H]`` holds the gate
in ``[..., :H]`` and the up projection in ``[..., H:]``, and the result is
``silu(gate) * up [..., H]``. One kernel pass replaces the separate ``silu`` and ``mul`` (and, in
backward, ``silu_backward``, two ``mul`` and the concatenation of the two halves); every element
is computed in float32 (float64 for float64 inputs) and rounded once.

``swiglu_backward(grad, h)`` is its gradient with respect to ``h``; ``swiglu_backward_`` writes
that gradient over ``h`` itself, for callers that own ``h`` and no longer need it (the expert FFN
does this: its backward then allocates no ``[..., 2H]`` buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_same_device

__all__ = ["swiglu", "swiglu_backward", "swiglu_backward_"]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :H]) * h[..., H:]``.

    Args:
        h: ``[..., 2H]`` float32, bfloat16, float16 or float64, any strides.

    Returns:
        ``[..., H]`` contiguous, dtype of ``h``.

    Differentiable (twice: when a graph of the backward is built, the backward runs in
    differentiable PyTorch ops).
    """
    return torch.ops.moe_framework.swiglu.default(h)


def swiglu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu` with respect to ``h`` for the incoming ``grad [..., H]``:
    ``[..., 2H]`` = ``[grad * up * silu'(gate) | grad * silu(gate)]``, dtype of ``h``."""
    return torch.ops.moe_framework.swiglu_backward.default(grad, h)


def swiglu_backward_(grad: torch.Tensor, h: torch.Tensor) -> None:
    """:func:`swiglu_backward` written over ``h`` itself (``h`` contiguous, ``grad`` of its dtype
    and not sharing its memory). For callers that own ``h`` and no longer need it; bumps ``h``'s
    version counter, so autograd refuses a later backward that would read the old values."""
    torch.ops.moe_framework.swiglu_backward_.default(grad, h)


def _check_h(op, h):
    torch._check(h.dim() >= 1, lambda: f"{op}: h must have at least 1 dimension [..., 2H]")
    torch._check(
        h.shape[-1] % 2 == 0,
        lambda: f"{op}: h's last dimension must be even (gate and up halves), got {h.shape[-1]}",
    )
    torch._check(
        h.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"{op}: h must be float32, float64, bfloat16 or float16, got {h.dtype}",
    )


def _check_grad(op, grad, h):
    check_same_device(op, grad=grad, h=h)
    _check_h(op, h)
    want = (*h.shape[:-1], h.shape[-1] // 2)
    torch._check(
        tuple(grad.shape) == want,
        lambda: f"{op}: grad must be h.shape[:-1] + [H] = {want}, got {tuple(grad.shape)}",
    )
    torch._check(
        grad.dtype == h.dtype, lambda: f"{op}: grad must have h's dtype {h.dtype}, got {grad.dtype}"
    )


@torch.library.register_fake("moe_framework::swiglu")
def _swiglu_fake(h):
    _check_h("swiglu", h)
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.register_fake("moe_framework::swiglu_backward")
def _swiglu_backward_fake(grad, h):
    _check_grad("swiglu_backward", grad, h)
    return h.new_empty(h.shape)


@torch.library.register_fake("moe_framework::swiglu_backward_")
def _swiglu_backward_inplace_fake(grad, h):
    _check_grad("swiglu_backward_", grad, h)


def silu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * d silu(x) / dx`` in differentiable ops (aten's silu_backward has no derivative)."""
    s = torch.sigmoid(x)
    return grad * s * (1 + x * (1 - s))


def swiglu_backward_differentiable(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_backward` in plain differentiable PyTorch ops, for double backward."""
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    return torch.cat([silu_grad(grad * up, gate), F.silu(gate) * grad], -1)


def _swiglu_setup_context(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _swiglu_autograd_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: a backward that is itself differentiable.
        return swiglu_backward_differentiable(grad, h)
    return torch.ops.moe_framework.swiglu_backward.default(grad, h)


torch.library.register_autograd(
    "moe_framework::swiglu", _swiglu_autograd_backward, setup_context=_swiglu_setup_context
)
