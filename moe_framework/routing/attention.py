"""Attention routing: tokens attend over learnable expert embeddings."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import bad, check_bools, check_choice, is_int
from .token_choice import TokenChoiceRouter

__all__ = ["AttentionRouter"]

from ..options import ATTENTION_SCORES


class AttentionRouter(TokenChoiceRouter):
    """Logits are similarities of ``q = x W_q`` to expert embeddings ``e [E, attention_dim]``;
    then softmax top-k as :class:`~moe_framework.routing.topk.TopKRouter`.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        renormalize: divide the k selected probabilities by their sum.
        attention_score: "cosine" (``cos(q, e_i)``, in [-1, 1]: pair it with a small
            ``temperature`` such as 0.1) or "dot" (``q . e_i / sqrt(attention_dim)``).
        attention_dim: width of queries and embeddings (default ``d_model``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.

    State: ``query.weight`` [attention_dim, d_model], ``expert_embeddings`` [E, attention_dim]
    (no ``gate``).
    """

    strategy = "attention"
    _gate_logits = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        renormalize: bool = True,
        attention_score: str = "cosine",
        attention_dim: Optional[int] = None,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, renormalize=renormalize)
        check_choice(owner, "attention_score", attention_score, ATTENTION_SCORES)
        if attention_dim is not None and (not is_int(attention_dim) or attention_dim < 1):
            bad(owner, "attention_dim", "None or a positive int", attention_dim)
        self.renormalize = renormalize
        self.attention_score = attention_score
        self.attention_dim = int(attention_dim or d_model)
        a = self.attention_dim
        self.query = nn.Linear(d_model, a, bias=False)
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, a) / math.sqrt(a))

    def _raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).float()
        e = self.expert_embeddings.float()
        if self.attention_score == "cosine":
            return F.normalize(q, dim=-1) @ F.normalize(e, dim=-1).t()
        return (q @ e.t()) / math.sqrt(q.shape[-1])

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, self.renormalize)
