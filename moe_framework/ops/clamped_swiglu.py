"""Wrapper, fake kernels and autograd of ``clamped_swiglu``, GPT-OSS's clamped SwiGLU gate.

GPT-OSS's experts store the gate and up projections interleaved (``h[..., 0::2]`` gates,
``h[..., 1::2]`` ups) and gate with ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``,
``g = min(gate, limit)`` (``alpha = 1.702``, ``limit = 7``). In eager PyTorch that is two strided
slices, two clamps, a sigmoid and four products, each a pass over the activation rounded to the
model dtype; this op is one pass computed in float32 (float64 for float64), rounded once.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_same_device

__all__ = ["clamped_swiglu", "clamped_swiglu_backward", "clamped_swiglu_reference"]


def _check_scalars(op: str, alpha: float, limit: float) -> None:
    for name, v in (("alpha", alpha), ("limit", limit)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    if limit < 0:
        raise ValueError(f"{op}: limit must be >= 0, got {limit}")


def clamped_swiglu(
    h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0, interleaved: bool = True
) -> torch.Tensor:
    """``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.

    Args:
        h: ``[..., 2H]`` float32, bfloat16, float16 or float64, any strides: ``H`` (gate, up)
            pairs, interleaved (``gate = h[..., 0::2]``, ``up = h[..., 1::2]``, GPT-OSS) or, with
            ``interleaved=False``, concatenated (``[gate | up]``).
        alpha: finite sigmoid slope (GPT-OSS: 1.702).
        limit: finite clamp bound ``>= 0`` (GPT-OSS: 7.0).
        interleaved: the layout of ``h``.

    Returns:
        ``[..., H]`` contiguous, dtype of ``h``.

    Differentiable (twice: with a graph of the backward built, the backward runs in plain
    differentiable ops). The clamps pass the gradient where the input lies inside the closed
    interval, as ``torch.clamp`` does.
    """
    _check_scalars("clamped_swiglu", alpha, limit)
    return torch.ops.moe_framework.clamped_swiglu.default(
        h, float(alpha), float(limit), bool(interleaved)
    )


def clamped_swiglu_backward(
    grad: torch.Tensor, h: torch.Tensor, alpha: float, limit: float, interleaved: bool = True
) -> torch.Tensor:
    """Gradient of :func:`clamped_swiglu` with respect to ``h`` for the incoming
    ``grad [..., H]``: ``[..., 2H]`` in ``h``'s layout, dtype of ``h``."""
    _check_scalars("clamped_swiglu_backward", alpha, limit)
    return torch.ops.moe_framework.clamped_swiglu_backward.default(
        grad, h, float(alpha), float(limit), bool(interleaved)
    )


def clamped_swiglu_reference(
    h: torch.Tensor, alpha: float, limit: float, interleaved: bool = True
) -> torch.Tensor:
    """:func:`clamped_swiglu` in plain differentiable PyTorch ops (GPT-OSS's formula)."""
    if interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _check_h(op, h):
    torch._check(h.dim() >= 1, lambda: f"{op}: h must have at least 1 dimension [..., 2H]")
    torch._check(
        h.shape[-1] % 2 == 0,
        lambda: f"{op}: h's last dimension must be even (gate and up pairs), got {h.shape[-1]}",
    )
    torch._check(
        h.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"{op}: h must be float32, float64, bfloat16 or float16, got {h.dtype}",
    )


@torch.library.register_fake("moe_framework::clamped_swiglu")
def _clamped_swiglu_fake(h, alpha, limit, interleaved):
    _check_h("clamped_swiglu", h)
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.register_fake("moe_framework::clamped_swiglu_backward")
def _clamped_swiglu_backward_fake(grad, h, alpha, limit, interleaved):
    check_same_device("clamped_swiglu_backward", grad=grad, h=h)
    _check_h("clamped_swiglu_backward", h)
    want = (*h.shape[:-1], h.shape[-1] // 2)
    torch._check(
        tuple(grad.shape) == want,
        lambda: f"clamped_swiglu_backward: grad must be {want}, got {tuple(grad.shape)}",
    )
    torch._check(
        grad.dtype == h.dtype,
        lambda: f"clamped_swiglu_backward: grad must have h's dtype {h.dtype}, got {grad.dtype}",
    )
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    h, alpha, limit, interleaved = inputs
    ctx.save_for_backward(h)
    ctx.args = (alpha, limit, interleaved)


def clamped_swiglu_backward_differentiable(
    grad: torch.Tensor, h: torch.Tensor, alpha: float, limit: float, interleaved: bool = True
) -> torch.Tensor:
    """:func:`clamped_swiglu_backward` in plain differentiable PyTorch ops, for double backward."""
    if interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    s = torch.sigmoid(alpha * g)
    zero = grad.new_zeros(())
    dup = torch.where((up >= -limit) & (up <= limit), grad * g * s, zero)
    dgate = torch.where(gate <= limit, grad * (u + 1) * (s + alpha * g * s * (1 - s)), zero)
    if interleaved:
        return torch.stack([dgate, dup], dim=-1).flatten(-2)
    return torch.cat([dgate, dup], dim=-1)


def _backward(ctx, grad):
    (h,) = ctx.saved_tensors
    alpha, limit, interleaved = ctx.args
    if torch.is_grad_enabled():
        # create_graph: a backward that is itself differentiable.
        return (
            clamped_swiglu_backward_differentiable(grad, h, alpha, limit, interleaved),
            None,
            None,
            None,
        )
    gh = torch.ops.moe_framework.clamped_swiglu_backward.default(grad, h, alpha, limit, interleaved)
    return gh, None, None, None


torch.library.register_autograd(
    "moe_framework::clamped_swiglu", _backward, setup_context=_setup_context
)
