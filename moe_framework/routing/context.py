"""Context-aware routing: ``router(x, context=c)`` adds a learned function of a per-token context
(task id embedding, sequence summary, modality, retrieval result...) to the logits."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._checks import bad, check_bools, is_int
from .base import RoutingDecision
from .token_choice import TokenChoiceRouter

__all__ = ["ContextRouter"]


class ContextRouter(TokenChoiceRouter):
    """Logits ``gate(x) + context_gate(context)``, then softmax top-k as
    :class:`~moe_framework.routing.topk.TopKRouter`.

    ``forward(x [T, d_model], mask=None, seq_len=None, context=None)``: ``context`` is
    ``[T, context_dim]`` (one row per token) or ``[context_dim]`` (the same for every token);
    None routes on ``x`` alone. ``context_gate`` starts at zero, so a fresh router routes as top-k
    until training teaches it what the context means. ``MoELayer(...)(x, context=c)`` passes a
    context ``[..., context_dim]`` shaped like ``x`` through.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        context_dim: width of the context (a positive int).
        renormalize: divide the k selected probabilities by their sum.
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.

    State: ``gate.weight`` [E, d_model], ``context_gate.weight`` [E, context_dim].
    """

    strategy = "context"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        context_dim: int,
        renormalize: bool = True,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, renormalize=renormalize)
        if not is_int(context_dim) or context_dim < 1:
            bad(owner, "context_dim", "a positive int", context_dim)
        self.renormalize = renormalize
        self.context_dim = int(context_dim)
        self.context_gate = nn.Linear(self.context_dim, num_experts, bias=False)
        nn.init.zeros_(self.context_gate.weight)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
        context: Optional[torch.Tensor] = None,
    ) -> RoutingDecision:
        """Route T tokens given their context (see the class docstring)."""
        if context is not None:
            c = self.context_dim
            if context.dim() == 1 and context.shape[0] == c:
                context = context.unsqueeze(0).expand(x.shape[0], c)
            elif context.dim() != 2 or tuple(context.shape) != (x.shape[0], c):
                raise ValueError(
                    f"ContextRouter: context must be [T={x.shape[0]}, context_dim={c}] or "
                    f"[context_dim={c}], got {tuple(context.shape)}"
                )
            if not context.is_floating_point():
                raise ValueError(f"ContextRouter: context must be float, got {context.dtype}")
        return self._route(x, mask, seq_len, context)

    def _context_logits(self, context: torch.Tensor) -> torch.Tensor:
        return self.context_gate(context.to(self.context_gate.weight.dtype)).float()

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, self.renormalize)
