"""Top-k then softmax (Shazeer 2017, GShard style): the k largest logits, softmax over them."""

from __future__ import annotations

from .token_choice import TokenChoiceRouter

__all__ = ["TopKThenSoftmaxRouter"]


class TopKThenSoftmaxRouter(TokenChoiceRouter):
    """Top-k of the logits, weights = softmax over the k selected logits.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.
    """

    strategy = "topk_then_softmax"

    def _select(self, x, logits, bias):
        # softmax over the k largest logits == the renormalised top-k of the full softmax.
        return self._gate(logits, "softmax", bias, True)
