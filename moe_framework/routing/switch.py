"""Switch routing (Switch Transformer): top-1, the probability itself as the weight."""

from __future__ import annotations

from ._checks import bad
from .token_choice import TokenChoiceRouter

__all__ = ["SwitchRouter"]


class SwitchRouter(TokenChoiceRouter):
    """Top-1 of the softmax; the weight is the probability (renormalising would make it 1).
    Usually paired with ``capacity_factor``.

    Args:
        d_model, num_experts: sizes.
        k: must be 1 (kept so every router is built as ``Router(d_model, num_experts, k)``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.
    """

    strategy = "switch"

    def __init__(self, d_model: int, num_experts: int, k: int = 1, **options):
        super().__init__(d_model, num_experts, k, **options)
        if k != 1:
            bad(type(self).__name__, "k", "1 for strategy='switch' (top-1 routing)", k)

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, False)
