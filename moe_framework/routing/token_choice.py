"""Token choice: every token picks its k experts through the fused gate ``ops.route``, with
optional group-limited selection, a selection bias (aux-loss-free balancing) and capacity."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops
from ._checks import (
    bad,
    check_bools,
    check_floats,
    check_ints,
    check_non_negative,
    check_positive,
)
from .capacity import apply_capacity, expert_capacity
from .common import BaseRouter, Selection
from .counts import expert_counts

__all__ = ["TokenChoiceRouter"]


class TokenChoiceRouter(BaseRouter):
    """Base of the token-choice routers (each token selects ``k`` experts).

    Args (keyword-only, besides those of :class:`~moe_framework.routing.common.BaseRouter`):
        bias_update_rate: u of the aux-loss-free balancing ``b_i += u * sign(mean_load - load_i)``
            (0 = off). The bias only shifts which experts are selected, never the weights.
        auto_update_bias: update the bias inside every training forward from that step's load
            instead of waiting for :meth:`update_bias`.
        n_group, topk_group: group-limited routing (experts in n_group groups; each token picks
            experts only from its topk_group best groups).
        routed_scaling_factor: multiplies the weights (DeepSeek-V3 uses 2.5).

    A subclass implements ``_select(x, logits, bias) -> (weights, ids, counts)``, usually one
    call of :meth:`_gate`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        bias_update_rate: float = 0.0,
        auto_update_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, auto_update_bias=auto_update_bias)
        check_ints(owner, n_group=n_group, topk_group=topk_group)
        check_floats(
            owner, bias_update_rate=bias_update_rate, routed_scaling_factor=routed_scaling_factor
        )
        check_non_negative(owner, bias_update_rate=bias_update_rate)
        check_positive(owner, routed_scaling_factor=routed_scaling_factor)
        if n_group < 1 or num_experts % n_group != 0:
            bad(owner, "n_group", f"a positive divisor of num_experts={num_experts}", n_group)
        if not 1 <= topk_group <= n_group:
            bad(owner, "topk_group", f"in [1, n_group={n_group}]", topk_group)
        reachable = topk_group * (num_experts // n_group)
        if k > reachable:
            bad(owner, "k", f"<= topk_group * experts per group = {reachable}", k)
        self.bias_update_rate = float(bias_update_rate)
        self.auto_update_bias = auto_update_bias
        self.n_group = int(n_group)
        self.topk_group = int(topk_group)
        self.routed_scaling_factor = float(routed_scaling_factor)

    @property
    def uses_selection_bias(self) -> bool:
        """Whether ``selection_bias`` shifts expert selection (on with bias balancing)."""
        return self.bias_update_rate > 0

    def _gate(
        self,
        logits: torch.Tensor,
        scoring: str,
        bias: Optional[torch.Tensor],
        renormalize: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused gate with this router's k, groups and scaling: (weights, ids, counts)."""
        return ops.route(
            logits,
            self.k,
            scoring=scoring,
            correction_bias=bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=renormalize,
            scaling_factor=self.routed_scaling_factor,
        )

    def _select(
        self, x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _select")

    def _decide(
        self, x: torch.Tensor, logits: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Selection:
        T, E = x.shape[0], self.num_experts
        bias = None
        if self.uses_selection_bias:
            # A copy, so an in-forward bias update cannot alias a tensor autograd may hold.
            bias = self.selection_bias.clone() if self.auto_update_bias else self.selection_bias
        weights, ids, counts = self._select(x, logits, bias)
        if mask is not None:
            keep = mask[:, None]
            ids = torch.where(keep, ids, torch.full_like(ids, -1))
            weights = torch.where(keep, weights, torch.zeros_like(weights))
        selected = ids
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if self.capacity_factor is not None:
            cap = expert_capacity(T, self.k, E, self.capacity_factor)
            weights, ids, _, dropped = apply_capacity(weights, ids, E, cap)
        if mask is not None or self.capacity_factor is not None:
            counts = expert_counts(ids, E)
        return Selection(weights, ids, selected, counts, dropped)

    def _record_training_load(self, selected: torch.Tensor) -> None:
        if self.bias_update_rate > 0:
            with torch.no_grad():
                sel_counts = expert_counts(selected, self.num_experts)
                if self.auto_update_bias:
                    self.update_bias(sel_counts)
                else:
                    self.load_accumulator.add_(sel_counts.long())

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing step: ``b_i += u * sign(mean(load) - load_i)`` (no host sync).

        counts: [E] tokens per expert of the step just taken (e.g. ``decision.counts`` summed over
        micro-batches). None uses the loads accumulated by the training forwards since the last
        call and clears them. Call it after ``optimizer.step()`` (or set ``auto_update_bias``).
        """
        if counts is None:
            load = self.load_accumulator.to(torch.float32)
            self.load_accumulator.zero_()
        else:
            load = counts.to(device=self.selection_bias.device, dtype=torch.float32)
        self.selection_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
