"""Expert choice (Zhou et al. 2022): each expert picks its best tokens of the batch."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import bad, check_bools, is_int
from .capacity import expert_capacity
from .common import BaseRouter, Selection
from .counts import expert_counts

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(BaseRouter):
    """Each expert ranks all T tokens of the batch by ``p = softmax(l)`` and takes the best
    ``C = min(T, ceil(capacity_factor * T * k / E))`` (``capacity_factor`` defaults to 1: every
    expert exactly full, balanced by construction, so no selection bias). A token keeps the
    ``expert_choice_slots`` experts with its highest probabilities among those that chose it;
    further picks are counted in ``stats["dropped"]``. Weights are ``p[t, e]``.

    **Not causal**: an expert's choice depends on the other tokens of the batch, later ones
    included. Use it for encoders, vision, non-autoregressive models.

    Args:
        d_model, num_experts, k: sizes; k is the average number of experts per token.
        causal: declare the model autoregressive; True is refused (see above).
        expert_choice_slots: static slots per token, in [1, num_experts] (default k: the static
            shapes of top-k routing). The MoE layer is built with ``k = slots_per_token``.
        **options: the arguments of :class:`~moe_framework.routing.common.BaseRouter`.
    """

    strategy = "expert_choice"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        causal: bool = False,
        expert_choice_slots: Optional[int] = None,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, causal=causal)
        if causal:
            raise ValueError(
                f"{owner}: strategy='expert_choice' is not causal (each expert ranks all tokens "
                "of the batch, future ones included); it cannot be used with causal=True"
            )
        if expert_choice_slots is not None and not (
            is_int(expert_choice_slots) and 1 <= expert_choice_slots <= num_experts
        ):
            bad(
                owner,
                "expert_choice_slots",
                f"None or an int in [1, {num_experts}]",
                expert_choice_slots,
            )
        self.causal = causal
        self.expert_choice_slots = expert_choice_slots
        self._slots = int(expert_choice_slots or k)

    def _decide(
        self, x: torch.Tensor, logits: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Selection:
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)
        cf = 1.0 if self.capacity_factor is None else self.capacity_factor
        C = expert_capacity(T, self.k, E, cf)
        score = probs
        if mask is not None:
            score = torch.where(mask.reshape(T, 1), probs, torch.full_like(probs, -1.0))
        # Each expert ranks all tokens of the batch: this is what makes expert choice non-causal.
        top_val, top_tok = torch.topk(score.t(), C, dim=1)  # [E, C]
        chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device)
        chosen = chosen.scatter(1, top_tok, top_val >= 0).t()  # [T, E]; padding never chosen
        # Each token keeps at most `slots` of the experts that chose it, its highest-scoring ones.
        masked = torch.where(chosen, probs, torch.full_like(probs, -1.0))
        val, ids = torch.topk(masked, self._slots, dim=1)
        valid = val >= 0
        ids = torch.where(valid, ids, torch.full_like(ids, -1)).to(torch.int32)
        weights = torch.where(valid, val, torch.zeros_like(val))
        dropped = chosen.sum() - valid.sum()
        return Selection(weights, ids, ids, expert_counts(ids, E), dropped)
