"""Wrappers, fake kernels and autograd for the permute op family.

``permute`` moves every token's ``k`` routed copies into an expert-sorted buffer of static shape
``[T*k, d]``; ``unpermute`` brings expert outputs back and combines them with the gate weights.
Only ``offsets`` depends on the data, and it stays on the device: no host sync in forward or
backward, so both ops trace into one graph under ``torch.compile(fullgraph=True)``.

Slots are flattened token-major, ``s = t*k + j``. The sort is stable (within an expert, slots keep
their order ``s``) and dropped slots (``ids == -1``) go after every expert, in rows
``offsets[E]:T*k`` of ``x_sorted``, which are zero.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device

__all__ = ["permute", "permute_backward", "unpermute", "unpermute_backward"]


def permute(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Sort the token slots of ``x`` by expert.

    Args:
        x: ``[T, d]`` float32, bfloat16, float16 or float64 (any row stride).
        ids: ``[T, k]`` int32 or int64, ``k >= 1``: expert of each slot in ``[0, num_experts)``,
            or ``-1`` for a dropped slot. On CPU other values raise; on CUDA (where checking would
            need a host sync) they are treated as dropped.
        num_experts: ``E >= 1``.

    Returns:
        ``(x_sorted, row_of_slot, offsets)``:

        - ``x_sorted`` ``[T*k, d]`` (dtype of ``x``): row ``row_of_slot[t*k+j]`` is ``x[t]``;
          rows of expert ``e`` are ``offsets[e]:offsets[e+1]``; rows ``offsets[E]:`` are zero
          (dropped slots).
        - ``row_of_slot`` ``[T*k]`` int64: the row of ``x_sorted`` holding slot ``s = t*k + j``
          (a permutation of ``0..T*k-1``).
        - ``offsets`` ``[E+1]`` int64 on ``x``'s device, ``offsets[0] = 0``; ``offsets[E]`` is the
          number of routed (not dropped) slots.

    Differentiable with respect to ``x``.
    """
    return torch.ops.moe_framework.permute.default(x, ids, num_experts)


@torch.library.register_fake("moe_framework::permute")
def _permute_fake(x, ids, num_experts):
    # The fake kernel lets torch.compile trace permute: every output shape is static (T*k rows).
    check_same_device("permute", x=x, ids=ids)
    torch._check(x.dim() == 2, lambda: f"permute: x must be [T, d], got {tuple(x.shape)}")
    torch._check(ids.dim() == 2, lambda: f"permute: ids must be [T, k], got {tuple(ids.shape)}")
    torch._check(
        ids.shape[0] == x.shape[0],
        lambda: f"permute: ids must have one row per token ({x.shape[0]}), got {ids.shape[0]}",
    )
    torch._check(ids.shape[1] >= 1, lambda: "permute: ids must have k >= 1 columns")
    torch._check(num_experts >= 1, lambda: f"permute: num_experts must be >= 1, got {num_experts}")
    n = ids.shape[0] * ids.shape[1]
    x_sorted = x.new_empty((n, x.shape[1]))
    row_of_slot = ids.new_empty((n,), dtype=torch.long)
    offsets = ids.new_empty((num_experts + 1,), dtype=torch.long)
    return x_sorted, row_of_slot, offsets


def permute_backward(
    grad_x_sorted: torch.Tensor, row_of_slot: torch.Tensor, offsets: torch.Tensor, k: int
) -> torch.Tensor:
    """Gradient of :func:`permute` with respect to ``x``: ``grad_x [T, d]``, the sum over each
    token's ``k`` slots of ``grad_x_sorted[row_of_slot[t*k + j]]`` (dropped slots excluded), in
    slot order. ``grad_x_sorted [T*k, d]``, ``row_of_slot [T*k]`` and ``offsets [E+1]`` as
    :func:`permute` returned them."""
    return torch.ops.moe_framework.permute_backward.default(grad_x_sorted, row_of_slot, offsets, k)


@torch.library.register_fake("moe_framework::permute_backward")
def _permute_backward_fake(grad_x_sorted, row_of_slot, offsets, k):
    check_same_device(
        "permute_backward", grad_x_sorted=grad_x_sorted, row_of_slot=row_of_slot, offsets=offsets
    )
    torch._check(k >= 1, lambda: f"permute_backward: k must be >= 1, got {k}")
    torch._check(
        grad_x_sorted.shape[0] == row_of_slot.shape[0],
        lambda: "permute_backward: grad_x_sorted must have one row per slot",
    )
    return grad_x_sorted.new_empty((row_of_slot.shape[0] // k, grad_x_sorted.shape[1]))


def _permute_setup_context(ctx, inputs, output):
    _, ids, _ = inputs
    _, row_of_slot, offsets = output
    ctx.save_for_backward(row_of_slot, offsets)
    ctx.k = ids.shape[1]


def _permute_backward(ctx, grad_x_sorted, _grad_row_of_slot, _grad_offsets):
    grad_x = None
    if ctx.needs_input_grad[0] and grad_x_sorted is not None:
        row_of_slot, offsets = ctx.saved_tensors
        grad_x = torch.ops.moe_framework.permute_backward.default(
            grad_x_sorted, row_of_slot, offsets, ctx.k
        )
    return grad_x, None, None


torch.library.register_autograd(
    "moe_framework::permute", _permute_backward, setup_context=_permute_setup_context
)


def unpermute(y_sorted: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor):
    """Combine expert outputs back into token order.

    ``y[t] = sum_{j=0..k-1} weights[t, j] * y_sorted[row_of_slot[t*k + j]]``, summed in ``j`` order
    in the accumulation type (float32 for bf16/fp16/fp32, float64 for fp64): no atomics, the same
    bits on every run and thread count.

    Args:
        y_sorted: ``[T*k, d]`` float32, bfloat16, float16 or float64 (any row stride).
        row_of_slot: ``[T*k]`` int64, as returned by :func:`permute` (values in ``[0, T*k)``; on
            CPU others raise, on CUDA rows out of range are skipped).
        weights: ``[T, k]`` float32 or the dtype of ``y_sorted``. Slots dropped by ``permute``
            read zero rows when ``y_sorted`` keeps them zero (as ``grouped_gemm`` does).

    Returns:
        ``y``: ``[T, d]``, dtype of ``y_sorted``.

    Differentiable with respect to ``y_sorted`` and ``weights`` (the backward needs
    ``row_of_slot`` to be a permutation, which :func:`permute` guarantees).
    """
    return torch.ops.moe_framework.unpermute.default(y_sorted, row_of_slot, weights)


def _check_unpermute_shapes(op, y_sorted, row_of_slot, weights):
    torch._check(y_sorted.dim() == 2, lambda: f"{op}: y_sorted must be [T*k, d]")
    torch._check(weights.dim() == 2, lambda: f"{op}: weights must be [T, k]")
    n = weights.shape[0] * weights.shape[1]
    torch._check(
        row_of_slot.shape[0] == n,
        lambda: f"{op}: row_of_slot must have T*k entries, got {row_of_slot.shape[0]}",
    )
    torch._check(
        y_sorted.shape[0] == n,
        lambda: f"{op}: y_sorted must have T*k rows, got {y_sorted.shape[0]}",
    )


@torch.library.register_fake("moe_framework::unpermute")
def _unpermute_fake(y_sorted, row_of_slot, weights):
    check_same_device("unpermute", y_sorted=y_sorted, row_of_slot=row_of_slot, weights=weights)
    _check_unpermute_shapes("unpermute", y_sorted, row_of_slot, weights)
    return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))


def unpermute_backward(
    grad_y: torch.Tensor, y_sorted: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor
):
    """Gradients of :func:`unpermute`: ``(grad_y_sorted [T*k, d], grad_weights [T, k])`` for the
    incoming ``grad_y [T, d]``; the inputs as :func:`unpermute` received them."""
    return torch.ops.moe_framework.unpermute_backward.default(
        grad_y, y_sorted, row_of_slot, weights
    )


@torch.library.register_fake("moe_framework::unpermute_backward")
def _unpermute_backward_fake(grad_y, y_sorted, row_of_slot, weights):
    check_same_device(
        "unpermute_backward",
        grad_y=grad_y,
        y_sorted=y_sorted,
        row_of_slot=row_of_slot,
        weights=weights,
    )
    _check_unpermute_shapes("unpermute_backward", y_sorted, row_of_slot, weights)
    torch._check(
        grad_y.shape[0] == weights.shape[0] and grad_y.shape[1] == y_sorted.shape[1],
        lambda: "unpermute_backward: grad_y must be [T, d]",
    )
    return y_sorted.new_empty(y_sorted.shape), weights.new_empty(weights.shape)


def _unpermute_setup_context(ctx, inputs, output):
    y_sorted, row_of_slot, weights = inputs
    ctx.save_for_backward(y_sorted, row_of_slot, weights)


def _unpermute_backward(ctx, grad_y):
    y_sorted, row_of_slot, weights = ctx.saved_tensors
    grad_y_sorted, grad_weights = torch.ops.moe_framework.unpermute_backward.default(
        grad_y, y_sorted, row_of_slot, weights
    )
    return (
        grad_y_sorted if ctx.needs_input_grad[0] else None,
        None,
        grad_weights if ctx.needs_input_grad[2] else None,
    )


torch.library.register_autograd(
    "moe_framework::unpermute", _unpermute_backward, setup_context=_unpermute_setup_context
)
