"""MLP gate: the router logits come from a two-layer perceptron instead of one linear map."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ._checks import bad, check_bools, is_int
from .token_choice import TokenChoiceRouter

__all__ = ["MLPRouter"]


class MLPRouter(TokenChoiceRouter):
    """Logits ``W2 gelu(W1 x + b1)`` (a hidden layer of ``mlp_hidden`` units), then softmax
    top-k as :class:`~moe_framework.routing.topk.TopKRouter`. A non-linear gate can separate
    token clusters a linear gate cannot (e.g. XOR-like layouts of the token space).

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        renormalize: divide the k selected probabilities by their sum.
        mlp_hidden: width of the hidden layer (default ``d_model``).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.

    State: ``mlp.0.weight`` [mlp_hidden, d_model], ``mlp.0.bias`` [mlp_hidden], ``mlp.2.weight``
    [E, mlp_hidden] (no ``gate``).
    """

    strategy = "mlp"
    _gate_logits = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        renormalize: bool = True,
        mlp_hidden: Optional[int] = None,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, renormalize=renormalize)
        if mlp_hidden is not None and (not is_int(mlp_hidden) or mlp_hidden < 1):
            bad(owner, "mlp_hidden", "None or a positive int", mlp_hidden)
        self.renormalize = renormalize
        self.mlp_hidden = int(mlp_hidden or d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, self.mlp_hidden),
            nn.GELU(),
            nn.Linear(self.mlp_hidden, num_experts, bias=False),
        )

    def _raw_logits(self, x):
        return self.mlp(x).float()

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, self.renormalize)
