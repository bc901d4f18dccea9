"""Grouped sigmoid routing (DeepSeek-V3): sigmoid scores, a correction bias for the choice,
group-limited top-k, scaled weights."""

from __future__ import annotations

import torch

from ._checks import check_bools
from .token_choice import TokenChoiceRouter

__all__ = ["GroupedSigmoidRouter"]


class GroupedSigmoidRouter(TokenChoiceRouter):
    """``s = sigmoid(l)``; the choice reads ``s + selection_bias`` (DeepSeek-V3's
    ``e_score_correction_bias``, always applied); experts in ``n_group`` groups, a group scores
    the sum of its two best choice scores, the ``topk_group`` best groups are kept (the others
    masked with -inf), top-k. Weights are the unbiased ``s``, renormalised if ``renormalize``,
    times ``routed_scaling_factor``. DeepSeek-V3: ``n_group=8, topk_group=4, k=8,
    routed_scaling_factor=2.5``.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= topk_group * num_experts / n_group``).
        renormalize: divide the k selected scores by their sum (``norm_topk_prob``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` (``n_group``,
            ``topk_group``, ``routed_scaling_factor``, ``bias_update_rate``, ...) and
            :class:`~moe_framework.routing.common.BaseRouter`.
    """

    strategy = "grouped_sigmoid"

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, renormalize: bool = True, **options
    ):
        super().__init__(d_model, num_experts, k, **options)
        check_bools(type(self).__name__, renormalize=renormalize)
        self.renormalize = renormalize

    @property
    def uses_selection_bias(self) -> bool:
        """Always True: the correction bias is part of DeepSeek-V3's selection."""
        return True

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        # The scores normalised per token (DeepSeek-V3's sequence-wise balance loss).
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)

    def _select(self, x, logits, bias):
        return self._gate(logits, "sigmoid", bias, self.renormalize)
