""":class:`AdaptiveRouter`: a router whose experts can be split (and merged back) while training.

It wraps any :class:`~moe_framework.routing.base.Router` (the *inner* router, over L *logical*
experts) and routes to P >= L *physical* experts. Every physical expert belongs to one logical
expert (``parent``); a split makes a logical expert's tokens divide among its physical children::

    decision = inner(x)                       slots over logical experts [T, k]
    score[t, p] = x[t] . split_dir[p] + split_offset[p]      one sub-routing row per child
    physical slot = the child of the slot's logical expert with the highest score

The gate weight of a slot stays the inner router's (a slot changes only which copy runs it), so a
split whose copy is an exact duplicate leaves the layer's output unchanged, bit for bit. The
sub-routing rows are buffers (not trained): a new child gets a duplicate of its sibling's row plus
a random direction, with a bias offset (the median of the direction over the expert's recent
tokens) so the traffic divides in half. Everything in ``forward`` is device tensors with static
shapes (``[T, k, P]`` masks, an argmax): no host sync, ``torch.compile(fullgraph=True)`` works.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn

from ..routing.base import Router, RoutingDecision
from ..routing.counts import expert_counts

__all__ = ["AdaptiveRouter"]


class AdaptiveRouter(nn.Module):
    """Routes to physical experts that split from the inner router's logical experts.

    Args:
        inner: the router over the logical experts (any ``Router`` module with ``d_model``).

    Attributes: ``num_experts`` (P, physical), ``num_logical`` (L), ``slots_per_token`` (the
    inner router's). Buffers (in the state dict): ``parent`` [P] int64, ``split_dir`` [P, d]
    float32, ``split_offset`` [P] float32. Telemetry and the balancing losses are the inner
    router's (over logical experts); the adaptation package keeps per-physical-expert windows.
    """

    parent: torch.Tensor
    split_dir: torch.Tensor
    split_offset: torch.Tensor

    def __init__(self, inner: nn.Module):
        super().__init__()
        if not isinstance(inner, nn.Module) or not isinstance(inner, Router):
            raise ValueError(
                "AdaptiveRouter: inner must be an nn.Module implementing the Router protocol, "
                f"got {type(inner).__name__}"
            )
        d_model = getattr(inner, "d_model", None)
        if not isinstance(d_model, int):
            raise ValueError(
                f"AdaptiveRouter: inner router must have an int d_model, got {d_model!r}"
            )
        routes = cast(Router, inner)
        self.inner = inner
        self.d_model = d_model
        L = routes.num_experts
        self.num_experts = L
        dev = next((t.device for t in inner.parameters()), None)
        self.register_buffer("parent", torch.arange(L, dtype=torch.int64, device=dev))
        self.register_buffer("split_dir", torch.zeros(L, d_model, device=dev))
        self.register_buffer("split_offset", torch.zeros(L, device=dev))

    @property
    def num_logical(self) -> int:
        """L, the inner router's experts."""
        return cast(Router, self.inner).num_experts

    @property
    def slots_per_token(self) -> int:
        return cast(Router, self.inner).slots_per_token

    def physical_ids(self, x: torch.Tensor, logical_ids: torch.Tensor) -> torch.Tensor:
        """Logical slots ``[T, k]`` (-1 = empty) -> physical slots ``[T, k]`` int32 (no sync)."""
        if self.num_experts == self.num_logical:
            return logical_ids  # no split: physical = logical (parent is the identity)
        score = x.float() @ self.split_dir.t() + self.split_offset  # [T, P]
        ids = logical_ids.long()
        cand = self.parent.view(1, 1, -1) == ids.unsqueeze(-1)  # [T, k, P]
        masked = torch.where(cand, score.unsqueeze(1), torch.full_like(score.unsqueeze(1), -1e30))
        phys = masked.argmax(-1)
        return torch.where(ids < 0, torch.full_like(phys, -1), phys).to(torch.int32)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
    ) -> RoutingDecision:
        """As the inner router, with slots over the physical experts; ``logits`` ``[T, P]`` repeat
        each logical logit for each of its children."""
        dec = self.inner(x, mask, seq_len=seq_len)
        if self.num_experts == self.num_logical:
            return dec
        ids = self.physical_ids(x, dec.ids)
        counts = expert_counts(ids, self.num_experts)
        logits = dec.logits.index_select(1, self.parent)
        return RoutingDecision(dec.weights, ids, counts, logits, dec.aux_loss, dec.stats)

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """The inner router's balancing hook; physical ``counts`` [P] are summed per logical."""
        if counts is not None:
            logical = torch.zeros(self.num_logical, dtype=torch.int64, device=counts.device)
            counts = logical.index_add_(0, self.parent.to(counts.device), counts.long())
        cast(Router, self.inner).update_bias(counts)

    @torch.no_grad()
    def balance_siblings(self, counts: torch.Tensor, rate: float) -> None:
        """Move split siblings' loads towards their mean, on the device (no sync):
        ``split_offset[p] += rate * sign(mean load of p's siblings - load[p])`` for every physical
        expert whose logical expert has several children (the aux-loss-free bias rule, applied to
        the sub-routing). ``counts``: ``[P]`` slots per physical expert of a step."""
        if self.num_experts == self.num_logical or rate == 0:
            return
        L = self.num_logical
        load = counts.to(device=self.split_offset.device, dtype=torch.float32)
        total = torch.zeros(L, device=load.device).index_add_(0, self.parent, load)
        n = torch.zeros(L, device=load.device).index_add_(0, self.parent, torch.ones_like(load))
        mean = (total / n.clamp_min(1.0))[self.parent]
        split = (n[self.parent] > 1).to(torch.float32)
        self.split_offset.add_(rate * torch.sign(mean - load) * split)

    def routing_stats(self) -> dict:
        """The inner router's telemetry (over logical experts)."""
        return cast(Router, self.inner).routing_stats()

    def reset_stats(self) -> None:
        cast(Router, self.inner).reset_stats()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_logical={self.num_logical}"
