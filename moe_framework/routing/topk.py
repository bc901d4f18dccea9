"""Top-k routing (Mixtral): softmax over all experts, then the k best."""

from __future__ import annotations

from ._checks import check_bools
from .token_choice import TokenChoiceRouter

__all__ = ["TopKRouter"]


class TopKRouter(TokenChoiceRouter):
    """Softmax over all E experts, top-k (+ selection bias for the choice only).

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        renormalize: divide the k selected probabilities by their sum (Mixtral; False is
            OLMoE / Qwen-MoE ``norm_topk_prob=False``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.
    """

    strategy = "topk"

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, renormalize: bool = True, **options
    ):
        super().__init__(d_model, num_experts, k, **options)
        check_bools(type(self).__name__, renormalize=renormalize)
        self.renormalize = renormalize

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, self.renormalize)
