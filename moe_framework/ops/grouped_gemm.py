"""Wrappers, fake kernels and autograd for the grouped_gemm op family.

``grouped_gemm`` multiplies the rows of each expert by that expert's weight matrix: rows
``offsets[e]:offsets[e+1]`` of ``a`` times ``b[e]``. ``offsets`` stays on the device and is read
by the kernel itself, so the output shape is static (``[M, N]``) and nothing syncs with the host:
forward and backward trace into one graph under ``torch.compile(fullgraph=True)``.

The backward is two more custom ops: ``da`` is a grouped GEMM with ``b`` transposed and ``db`` is
``grouped_gemm_wgrad`` (per expert ``a_e^T @ grad_e``, a fixed-order reduction over its rows).
"""

from __future__ import annotations

import torch

from ._checks import check_same_device

__all__ = ["grouped_gemm", "grouped_gemm_wgrad"]


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Grouped matrix product over experts.

    ``out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ (b[e].T if trans_b else b[e])``;
    rows outside ``[offsets[0], offsets[E])`` are zero.

    Args:
        a: ``[M, K]`` float32, bfloat16, float16 or float64 (any strides), rows sorted by expert
            (as :func:`permute` returns them).
        b: ``[E, K, N]`` (or ``[E, N, K]`` with ``trans_b``), dtype of ``a``, any strides.
        offsets: ``[E+1]`` int64 on ``a``'s device, non-decreasing, ``offsets[E] <= M``. On CPU
            other values raise; on CUDA (where checking would need a host sync) they are clamped
            into ``[0, M]``.
        trans_b: use ``b[e].T``.

    Returns:
        ``[M, N]``, dtype of ``a``. bfloat16/float16 products accumulate in float32.

    Differentiable with respect to ``a`` and ``b`` (twice: the backward ops are differentiable
    too).
    """
    return torch.ops.moe_framework.grouped_gemm.default(a, b, offsets, trans_b)


def grouped_gemm_wgrad(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Per-expert ``a_e^T @ grad_out_e``: the weight gradient of :func:`grouped_gemm`.

    ``out[e] = a[offsets[e]:offsets[e+1]].T @ grad_out[offsets[e]:offsets[e+1]]`` (transposed,
    ``[N, K]``, with ``trans_b``), a fixed-order reduction over the expert's rows, so the result
    is deterministic on every device; an expert without rows gets zeros. Also a grouped column
    sum: with ``a`` a ones column, ``out[e, 0]`` is the sum of expert ``e``'s rows of ``grad_out``.

    Args:
        a: ``[M, K]`` float32, bfloat16, float16 or float64, rows sorted by expert.
        grad_out: ``[M, N]``, dtype of ``a``.
        offsets: ``[E+1]`` int64 on ``a``'s device, as for :func:`grouped_gemm`.
        trans_b: return ``[E, N, K]`` (the gradient of a ``trans_b`` grouped GEMM's ``b``).

    Returns:
        ``[E, K, N]`` (or ``[E, N, K]``), dtype of ``a``; bfloat16/float16 accumulate in float32.

    Differentiable with respect to ``a`` and ``grad_out``.
    """
    return torch.ops.moe_framework.grouped_gemm_wgrad.default(a, grad_out, offsets, trans_b)


def _check_offsets(op, offsets, num_experts):
    torch._check(
        offsets.dim() == 1 and offsets.shape[0] == num_experts + 1,
        lambda: f"{op}: offsets must be [E+1] = [{num_experts + 1}], got {tuple(offsets.shape)}",
    )
    torch._check(
        offsets.dtype == torch.int64,
        lambda: f"{op}: offsets must be int64, got {offsets.dtype}",
    )


@torch.library.register_fake("moe_framework::grouped_gemm")
def _grouped_gemm_fake(a, b, offsets, trans_b):
    # The fake kernel lets torch.compile trace grouped_gemm: the output shape is static.
    check_same_device("grouped_gemm", a=a, b=b, offsets=offsets)
    torch._check(a.dim() == 2, lambda: f"grouped_gemm: a must be [M, K], got {tuple(a.shape)}")
    torch._check(
        b.dim() == 3, lambda: f"grouped_gemm: b must be [E, K, N] or [E, N, K], got {b.shape}"
    )
    torch._check(
        a.dtype == b.dtype, lambda: f"grouped_gemm: b must have a's dtype {a.dtype}, got {b.dtype}"
    )
    kb = b.shape[2] if trans_b else b.shape[1]
    torch._check(
        kb == a.shape[1],
        lambda: f"grouped_gemm: inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}",
    )
    _check_offsets("grouped_gemm", offsets, b.shape[0])
    n = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_framework::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(a, grad_out, offsets, trans_b):
    check_same_device("grouped_gemm_wgrad", a=a, grad_out=grad_out, offsets=offsets)
    torch._check(a.dim() == 2, lambda: "grouped_gemm_wgrad: a must be [M, K]")
    torch._check(grad_out.dim() == 2, lambda: "grouped_gemm_wgrad: grad_out must be [M, N]")
    torch._check(
        grad_out.shape[0] == a.shape[0],
        lambda: f"grouped_gemm_wgrad: grad_out must have the {a.shape[0]} rows of a",
    )
    torch._check(
        a.dtype == grad_out.dtype, lambda: "grouped_gemm_wgrad: grad_out must have a's dtype"
    )
    torch._check(offsets.dim() == 1, lambda: "grouped_gemm_wgrad: offsets must be [E+1]")
    num_experts = offsets.shape[0] - 1
    _check_offsets("grouped_gemm_wgrad", offsets, num_experts)
    k, n = a.shape[1], grad_out.shape[1]
    return a.new_empty((num_experts, n, k) if trans_b else (num_experts, k, n))


def _grouped_gemm_setup_context(ctx, inputs, output):
    a, b, offsets, trans_b = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b = trans_b


def _grouped_gemm_backward(ctx, grad_out):
    a, b, offsets = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        # d a_e = grad_e @ b[e]^T (or grad_e @ b[e] when the forward used b[e]^T).
        grad_a = torch.ops.moe_framework.grouped_gemm.default(grad_out, b, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.moe_framework.grouped_gemm_wgrad.default(
            a, grad_out, offsets, ctx.trans_b
        )
    return grad_a, grad_b, None, None


torch.library.register_autograd(
    "moe_framework::grouped_gemm",
    _grouped_gemm_backward,
    setup_context=_grouped_gemm_setup_context,
)


def _wgrad_setup_context(ctx, inputs, output):
    a, grad_out, offsets, trans_b = inputs
    ctx.save_for_backward(a, grad_out, offsets)
    ctx.trans_b = trans_b


def _wgrad_backward(ctx, grad_db):
    # wgrad is bilinear: db[e] = a_e^T g_e (or g_e^T a_e with trans_b). Its gradients are grouped
    # GEMMs again, which makes grouped_gemm twice differentiable.
    a, grad_out, offsets = ctx.saved_tensors
    gg = torch.ops.moe_framework.grouped_gemm.default
    grad_a = grad_g = None
    if ctx.needs_input_grad[0]:
        # d a_e = g_e @ G[e]^T  (G [E, K, N]),  or g_e @ G[e]  (G [E, N, K], trans_b).
        grad_a = gg(grad_out, grad_db, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        # d g_e = a_e @ G[e]  (G [E, K, N]),  or a_e @ G[e]^T  (trans_b).
        grad_g = gg(a, grad_db, offsets, ctx.trans_b)
    return grad_a, grad_g, None, None


torch.library.register_autograd(
    "moe_framework::grouped_gemm_wgrad", _wgrad_backward, setup_context=_wgrad_setup_context
)
