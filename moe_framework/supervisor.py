"""Supervisors: the router that decides which experts see which tokens.

This first version holds the contract the rest of the package codes against (``RoutingDecision``)
and the default Mixtral-style top-k softmax strategy; the routing-strategies issue extends it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from . import ops

__all__ = ["RoutingDecision", "Supervisor"]


class RoutingDecision(NamedTuple):
    """What a supervisor decides for a batch of T tokens (all device tensors, no host sync).

    weights: [T, k] float32 gate weight of each slot (0 for a dropped slot).
    ids:     [T, k] int32 expert of each slot (-1 for a dropped slot).
    counts:  [E] int32 slots actually routed to each expert.
    logits:  [T, E] float32 router logits (what the balancing losses read).
    aux_loss: 0-dim float32, the weighted sum of the enabled balancing losses (0 when none).
    stats:   dict of 0-dim or [E] device tensors (e.g. "dropped", "z_loss", "load_loss").
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict


class Supervisor(nn.Module):
    """Linear router + fused top-k gate (``ops.route``).

    x: [T, d_model] float -> RoutingDecision with k slots per token.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *, renormalize: bool = True):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"Supervisor: k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts = num_experts
        self.k = k
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def slots_per_token(self) -> int:
        """Static number of slots per token in the decisions this supervisor returns."""
        return self.k

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RoutingDecision:
        logits = self.gate(x).float()
        weights, ids, counts = ops.route(logits, self.k, renormalize=self.renormalize)
        zero = logits.new_zeros(())
        return RoutingDecision(weights, ids, counts, logits, zero, {})
