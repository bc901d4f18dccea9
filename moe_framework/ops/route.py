"""Wrapper, fake kernel and autograd of the fused router op ``route``.

One op from router logits ``[T, E]`` to the routing decision, in place of the eager chain
softmax/sigmoid -> (+ bias) -> (group mask) -> topk -> renormalise -> scale -> bincount. Every output
has a static shape (``[T, k]``, ``[T, k]``, ``[E]``) and stays on the logits' device: no host sync,
so it traces into one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import check_same_device

__all__ = ["route"]

_SCORINGS = ("softmax", "sigmoid")


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"route: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"route: {name} must be {bound}, got {value}")


def route(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
):
    """Fused top-k gate: router logits to (weights, expert ids, tokens per expert).

    Args:
        logits: ``[T, E]`` float32, bfloat16, float16 or float64, CPU or CUDA, any strides.
            Scores are computed in float32 (float64 for float64 logits).
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` (Mixtral, Qwen-MoE) or ``"sigmoid"`` (DeepSeek-V3).
        correction_bias: optional ``[E]`` float tensor on the logits' device, added to the scores
            for **selection only** (DeepSeek-V3's ``e_score_correction_bias``); the weights come
            from the unbiased scores.
        n_group: split the experts into ``n_group`` contiguous groups (``E % n_group == 0``).
        topk_group: keep the ``topk_group`` groups whose two best (biased) scores sum highest,
            ``1 <= topk_group <= n_group``; the k experts are chosen inside them, so
            ``k <= topk_group * E / n_group``.
        renormalize: divide the k weights by their sum (softmax: the softmax over the k selected
            logits; sigmoid: ``s / (sum(s) + 1e-20)``, as DeepSeek-V3's ``norm_topk_prob``).
        scaling_factor: finite multiplier of the weights (DeepSeek-V3's routed_scaling_factor).

    Returns:
        ``(weights, ids, counts)``:

        - ``weights`` ``[T, k]`` float32 (float64 for float64 logits): gate weight of each slot.
        - ``ids`` ``[T, k]`` int32: k **distinct** experts in ``[0, E)`` per token, best first.
        - ``counts`` ``[E]`` int32: number of slots routed to each expert (sums to ``T * k``).

    Selection: experts are ranked by ``score + correction_bias``; without a bias and with
    ``n_group == 1`` by the logit itself (the same order, as both scorings are monotone, but free
    of the ties that rounding creates, e.g. sigmoid saturating to 1.0). NaN ranks as ``-inf``.
    Ties go to the lowest expert id (and the lowest group id). The result is deterministic: the
    same bits for any thread count.

    Non-finite logits: ``ids`` are always k distinct in-range experts. A row holding a NaN logit
    gets NaN weights (never silently hidden). Infinities follow the limits: sigmoid(+-inf) is 1 or
    0; a softmax row with +inf logits puts all its mass uniformly on them; an all ``-inf`` softmax
    row (every expert masked) gets zero weights.

    Differentiable with respect to ``logits`` (through the weights; ``ids`` and ``counts`` are
    integer outputs). Bad arguments raise ``ValueError`` (here) or ``RuntimeError`` (from the
    kernel, for shape, dtype and device errors), naming the argument.
    """
    _check_int("k", k, 1)
    if scoring not in _SCORINGS:
        raise ValueError(f'route: scoring must be "softmax" or "sigmoid", got {scoring!r}')
    _check_int("n_group", n_group, 1)
    _check_int("topk_group", topk_group, 1, n_group)
    if not isinstance(renormalize, bool):
        raise ValueError(f"route: renormalize must be a bool, got {renormalize!r}")
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)):
        raise ValueError(f"route: scaling_factor must be a float, got {scaling_factor!r}")
    # Under torch.compile a float may be symbolic; the kernel's TORCH_CHECK covers it there.
    if not torch.compiler.is_compiling() and not math.isfinite(scaling_factor):
        raise ValueError(f"route: scaling_factor must be finite, got {scaling_factor}")
    if correction_bias is not None and correction_bias.device != logits.device:
        raise ValueError(
            f"route: correction_bias must be on the same device as logits ({logits.device}), "
            f"got {correction_bias.device}"
        )
    return torch.ops.moe_framework.route.default(
        logits,
        k,
        scoring,
        correction_bias,
        n_group,
        topk_group,
        renormalize,
        float(scaling_factor),
    )


@torch.library.register_fake("moe_framework::route")
def _route_fake(logits, k, scoring, correction_bias, n_group, topk_group, renormalize, scale):
    # The fake kernel lets torch.compile trace route: every output shape is static.
    if correction_bias is not None:
        check_same_device("route", logits=logits, correction_bias=correction_bias)
    torch._check(logits.dim() == 2, lambda: f"route: logits must be [T, E], got {logits.shape}")
    E = logits.shape[1]
    torch._check(E >= 1, lambda: "route: logits must have at least one expert column")
    torch._check(1 <= k <= E, lambda: f"route: k must be in [1, num_experts={E}], got {k}")
    torch._check(n_group >= 1, lambda: f"route: n_group must be >= 1, got {n_group}")
    torch._check(
        E % n_group == 0,
        lambda: f"route: n_group must divide num_experts={E}, got n_group={n_group}",
    )
    torch._check(
        1 <= topk_group <= n_group,
        lambda: f"route: topk_group must be in [1, n_group={n_group}], got {topk_group}",
    )
    torch._check(
        k <= topk_group * (E // n_group),
        lambda: f"route: k must be <= topk_group * (num_experts / n_group), got {k}",
    )
    if correction_bias is not None:
        torch._check(
            correction_bias.dim() == 1 and correction_bias.shape[0] == E,
            lambda: f"route: correction_bias must be [{E}], got {correction_bias.shape}",
        )
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    T = logits.shape[0]
    weights = logits.new_empty((T, k), dtype=wdtype)
    ids = logits.new_empty((T, k), dtype=torch.int32)
    counts = logits.new_empty((E,), dtype=torch.int32)
    return weights, ids, counts


@torch.library.register_fake("moe_framework::route_backward")
def _route_backward_fake(grad_weights, logits, ids, scoring, renormalize, scale):
    check_same_device("route_backward", grad_weights=grad_weights, logits=logits, ids=ids)
    torch._check(logits.dim() == 2, lambda: "route_backward: logits must be [T, E]")
    torch._check(
        grad_weights.shape == ids.shape,
        lambda: "route_backward: grad_weights must have the shape of ids",
    )
    torch._check(
        ids.dim() == 2 and ids.shape[0] == logits.shape[0],
        lambda: "route_backward: ids must be [T, k]",
    )
    return logits.new_empty(logits.shape)


def _route_setup_context(ctx, inputs, output):
    logits, _k, scoring, _bias, _n_group, _topk_group, renormalize, scale = inputs
    _weights, ids, _counts = output
    ctx.save_for_backward(logits, ids)
    ctx.scoring = scoring
    ctx.renormalize = renormalize
    ctx.scale = scale


def _route_backward(ctx, grad_weights, _grad_ids, _grad_counts):
    # Only the weights carry a gradient, and only to the logits: the bias moves the selection,
    # which is piecewise constant.
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        logits, ids = ctx.saved_tensors
        grad_logits = torch.ops.moe_framework.route_backward.default(
            grad_weights.contiguous(), logits, ids, ctx.scoring, ctx.renormalize, ctx.scale
        )
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd(
    "moe_framework::route", _route_backward, setup_context=_route_setup_context
)
