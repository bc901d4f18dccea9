"""Autograd nodes of the expert FFN that fuse the SwiGLU op with what surrounds it.

Two nodes, both for an activation ``h`` that the caller owns (a GEMM output nothing else saves):

* :func:`swiglu_owned` is ``swiglu(h)`` whose backward may write the gradient of ``h`` over ``h``
  itself (the ``swiglu_backward_`` op), so the backward allocates no ``[..., 2H]`` buffer, the
  largest one of an expert FFN's backward.
* :func:`swiglu_down_proj` is ``grouped_gemm(swiglu(h), w_out, offsets)`` saving only ``h``: the
  ``[M, H]`` SwiGLU output is recomputed in backward for the weight gradient instead of being kept
  between forward and backward (a third less activation memory in the experts).

Writing over ``h`` bumps its version counter, so a second backward through the same graph
(``retain_graph=True``, ``gradcheck``) raises an error naming ``inplace_backward=False`` instead of
reading overwritten values. When a graph of the backward is built (double backward) the backward
runs in differentiable ops, and under ``torch.compile`` a fresh buffer is used (the compiler plans
buffer reuse itself).
"""

from __future__ import annotations

import torch

from .grouped_gemm import grouped_gemm, grouped_gemm_wgrad
from .swiglu import swiglu, swiglu_backward, swiglu_backward_, swiglu_backward_differentiable

__all__ = ["swiglu_owned", "swiglu_down_proj"]


def _saved(ctx) -> tuple:
    # ctx.saved_tensors, with autograd's version-counter error for an h that an earlier backward
    # overwrote (inplace_backward) explained in our terms.
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if ctx.inplace_backward and "modified by an inplace operation" in str(e):
            raise RuntimeError(
                "moe_framework expert FFN: this graph was already backpropagated once, and that "
                "backward wrote the SwiGLU gradient over its saved activation h to save memory "
                "(inplace_backward=True, the default). A second backward through the same graph "
                "(retain_graph=True, torch.autograd.gradcheck) needs inplace_backward=False on "
                "ExpertBank / MoELayer / DenseFFN / expert_ffn / replace_moe_blocks."
            ) from e
        raise


def _swiglu_backward_owned(grad: torch.Tensor, h: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Gradient of ``silu(h[..., :H]) * h[..., H:]`` with respect to ``h``, written over ``h``
    when ``inplace`` (and ``h`` is contiguous, no graph of the backward is built and nothing is
    being compiled); a fresh buffer otherwise."""
    if torch.is_grad_enabled():
        return swiglu_backward_differentiable(grad, h)
    grad = grad.to(h.dtype)  # a no-op unless a caller fed a gradient of another dtype
    if inplace and h.is_contiguous() and not torch.compiler.is_compiling():
        swiglu_backward_(grad, h)  # bumps h's version
        return h
    return swiglu_backward(grad, h)


class _SwiGLUOwned(torch.autograd.Function):
    """``swiglu(h)`` saving only ``h`` and writing the gradient over it in backward."""

    @staticmethod
    def forward(ctx, h, inplace):
        ctx.save_for_backward(h)
        ctx.inplace_backward = inplace
        return swiglu(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = _saved(ctx)
        return _swiglu_backward_owned(grad, h, ctx.inplace_backward), None


class _SwiGLUDown(torch.autograd.Function):
    """``grouped_gemm(swiglu(h), w_out)`` saving ``h`` but not the ``[M, H]`` SwiGLU output.

    Autograd through ``swiglu`` then ``grouped_gemm`` keeps both ``h [M, 2H]`` (for the SwiGLU
    backward) and the SwiGLU output ``[M, H]`` (for the weight gradient) alive until backward; this
    keeps only ``h``, for one extra SwiGLU pass in backward.
    """

    @staticmethod
    def forward(ctx, h, w_out, offsets, trans_b, inplace):
        act = swiglu(h)
        ctx.save_for_backward(h, w_out, offsets)
        ctx.trans_b = trans_b
        ctx.inplace_backward = inplace
        return grouped_gemm(act, w_out, offsets, trans_b=trans_b)

    @staticmethod
    def backward(ctx, grad_y):
        h, w_out, offsets = _saved(ctx)
        grad_h = grad_w = None
        if ctx.needs_input_grad[1]:
            # The recomputed SwiGLU output lives only for the weight-gradient GEMM. Under a graph
            # of the backward (double backward) the wrappers' own autograd formulas apply.
            act = swiglu(h)
            grad_w = grouped_gemm_wgrad(act, grad_y, offsets, trans_b=ctx.trans_b)
            del act
        if ctx.needs_input_grad[0]:
            grad_act = grouped_gemm(grad_y, w_out, offsets, trans_b=not ctx.trans_b)
            grad_h = _swiglu_backward_owned(grad_act, h, ctx.inplace_backward)
        return grad_h, grad_w, None, None, None


def swiglu_owned(h: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``silu(h[..., :H]) * h[..., H:]`` for an ``h [..., 2H]`` the caller owns.

    Same values as :func:`moe_framework.ops.swiglu`; saves only ``h``. With ``inplace_backward``
    the backward writes the gradient of ``h`` over ``h`` (no ``[..., 2H]`` allocation), so the
    graph can be backpropagated once: a second backward raises a ``RuntimeError`` naming
    ``inplace_backward=False``. Double backward (``create_graph=True``) works either way.
    """
    return _SwiGLUOwned.apply(h, inplace_backward)


def swiglu_down_proj(
    h: torch.Tensor,
    w_out: torch.Tensor,
    offsets: torch.Tensor,
    trans_b: bool = False,
    inplace_backward: bool = True,
) -> torch.Tensor:
    """``grouped_gemm(swiglu(h), w_out, offsets, trans_b)`` keeping ``h`` but not the SwiGLU output.

    Args:
        h: ``[M, 2H]`` expert-sorted first-projection output (gate columns first), owned by the
            caller (see ``inplace_backward``).
        w_out: ``[E, H, d]`` (or ``[E, d, H]`` with ``trans_b``), dtype of ``h``.
        offsets: ``[E+1]`` int64 on ``h``'s device, as for :func:`grouped_gemm`.
        trans_b: use ``w_out[e].T``.
        inplace_backward: write the gradient of ``h`` over ``h`` in backward (see
            :func:`swiglu_owned`).

    Returns:
        ``[M, d]``, dtype of ``h``; rows from ``offsets[E]`` on are zero.

    Differentiable with respect to ``h`` and ``w_out``, twice.
    """
    return _SwiGLUDown.apply(h, w_out, offsets, trans_b, inplace_backward)
