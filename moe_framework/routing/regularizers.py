"""Training-time routing regularisers: router dropout (on the router's input) and expert dropout
(whole routed slots). Both draw counter-based noise (:mod:`~moe_framework.routing.rng`), so they
trace under ``torch.compile(fullgraph=True)`` and a resumed run draws the same masks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch

from .counts import expert_counts
from .rng import counter_uniform

if TYPE_CHECKING:
    from .common import Selection

__all__ = ["expert_slot_dropout", "router_input_dropout"]

# Counter-RNG streams (0 = input jitter, 2 and 3 = noisy top-k's normal noise).
ROUTER_DROPOUT_STREAM = 8
EXPERT_DROPOUT_STREAM = 9


def router_input_dropout(x: torch.Tensor, p: float, seed: int, step: torch.Tensor) -> torch.Tensor:
    """Inverted dropout of the router's input ``x [T, d]``: each element is zeroed with
    probability ``p`` and the rest scaled by ``1 / (1 - p)``. Only the router sees the dropped
    input; the experts get the token unchanged."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"router_input_dropout: p must be in [0, 1), got {p!r}")
    u = counter_uniform(seed, step, tuple(x.shape), ROUTER_DROPOUT_STREAM, x.device)
    keep = u >= p
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros_like(x))


def expert_slot_dropout(
    sel: Selection, p: float, num_experts: int, seed: int, step: torch.Tensor
) -> Tuple[Selection, torch.Tensor]:
    """Expert dropout: each routed slot of a :class:`~moe_framework.routing.common.Selection`
    is emptied (id -1, weight 0) with probability ``p``; surviving weights are scaled by
    ``1 / (1 - p)`` so the expected combined output is unchanged. ``selected`` (what the
    balancing losses charged) is left as it was. Returns ``(selection, dropped)`` with
    ``dropped`` the 0-dim int64 number of slots it emptied (not counted in ``stats["dropped"]``,
    which stays the capacity drops)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"expert_slot_dropout: p must be in [0, 1), got {p!r}")
    ids, weights = sel.ids, sel.weights
    u = counter_uniform(seed, step, tuple(ids.shape), EXPERT_DROPOUT_STREAM, ids.device)
    routed = ids >= 0
    drop = routed & (u < p)
    new_ids = torch.where(drop, torch.full_like(ids, -1), ids)
    new_w = torch.where(drop, torch.zeros_like(weights), weights * (1.0 / (1.0 - p)))
    counts = expert_counts(new_ids, num_experts)
    return sel._replace(weights=new_w, ids=new_ids, counts=counts), drop.sum()
