"""The dispatch stage of an MoE layer: the :class:`TokenDispatcher` protocol and
:class:`LocalDispatcher`.

A dispatcher moves each token's routed copies (slots) to the experts that run them and brings the
experts' outputs back::

    x_sorted, offsets, ctx = dispatcher.dispatch(x [T, d], decision)   # expert-sorted [T*k, d]
    y_sorted = experts(x_sorted, offsets)
    y = dispatcher.combine(y_sorted, ctx)                               # [T, d], gate-weighted

:class:`LocalDispatcher` does it on one device with ``ops.permute`` / ``ops.unpermute``. An
expert-parallel dispatcher (all-to-all between the ranks that hold the experts) implements the
same two methods and plugs into :class:`~moe_framework.moe_layer.MoELayer` in its place.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import nn

from . import ops
from .supervisor import RoutingDecision

__all__ = ["DispatchContext", "LocalDispatcher", "TokenDispatcher"]


class DispatchContext(NamedTuple):
    """What :meth:`TokenDispatcher.combine` needs to undo a dispatch (device tensors).

    row_of_slot: ``[T*k]`` int64, the row of ``x_sorted`` that holds slot ``s = t*k + j``
        (dropped slots: rows from ``offsets[E]`` on). The layer's draft reports read it too.
    weights: ``[T, k]`` gate weights the combine applies (0 for a dropped slot).
    """

    row_of_slot: torch.Tensor
    weights: torch.Tensor


class TokenDispatcher(Protocol):
    """The dispatch stage of an :class:`~moe_framework.moe_layer.MoELayer`.

    ``dispatch(x [T, d], decision) -> (x_sorted [T*k, d], offsets [E+1] int64, ctx)``: every slot
    of ``decision.ids`` ``[T, k]`` becomes one row of ``x_sorted``, grouped by expert: rows
    ``offsets[e]:offsets[e+1]`` go to expert ``e``. Slots with id ``-1`` (dropped by the router's
    capacity limit, padding, unused expert-choice slots) are kept out of every expert: they sit in
    rows ``offsets[E]:`` and get no output. ``ctx`` is a :class:`DispatchContext` (or a NamedTuple
    with at least its fields) that ``combine`` reads.

    ``combine(y_sorted [T*k, d], ctx) -> y [T, d]``: each token's expert outputs, weighted by its
    gate weights and summed; a token whose slots were all dropped gets zeros.

    Optional ``combine_rows(y_sorted, ctx) -> (y, rows [T*k, d], offsets [E+1])``: a dispatcher
    whose ``y_sorted`` is not this process's own slots (the expert-parallel
    :class:`~moe_framework.distributed.AllToAllDispatcher`) also returns the outputs of its own
    slots in the ``ops.permute`` layout, which the layer's draft reports read.

    Who decides capacity: the router (it marks dropped slots with ``-1``); the dispatcher honours
    it. Shapes are static (``T*k`` rows whatever the routing) and ``offsets`` stays on the device,
    so a dispatcher that keeps to that compiles with ``torch.compile(fullgraph=True)`` and can be
    captured in a CUDA graph. A new dispatcher (expert-parallel all-to-all, next) is one new class
    with these two methods, passed as ``MoELayer(router, experts, dispatcher=...)``.
    """

    def dispatch(
        self, x: torch.Tensor, decision: RoutingDecision
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]: ...

    def combine(self, y_sorted: torch.Tensor, ctx: DispatchContext) -> torch.Tensor: ...


class LocalDispatcher(nn.Module):
    """All experts on this device: ``ops.permute`` (stable sort of the slots by expert) and
    ``ops.unpermute`` (fixed-order weighted gather-combine, no atomics: deterministic).

    Args:
        num_experts: E, the experts the offsets describe (the layer's ``experts.num_experts``).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(
                f"LocalDispatcher: num_experts must be an int >= 1, got {num_experts!r}"
            )
        self.num_experts = num_experts

    def dispatch(
        self, x: torch.Tensor, decision: RoutingDecision
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """``x [T, d]``, ``decision.ids [T, k]`` -> ``(x_sorted [T*k, d], offsets [E+1], ctx)``."""
        x_sorted, row_of_slot, offsets = ops.permute(x, decision.ids, self.num_experts)
        return x_sorted, offsets, DispatchContext(row_of_slot, decision.weights)

    def combine(self, y_sorted: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """``y_sorted [T*k, d]`` -> ``y [T, d]`` (dtype of ``y_sorted``)."""
        return ops.unpermute(y_sorted, ctx.row_of_slot, ctx.weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"
