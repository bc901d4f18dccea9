"""Noisy top-k gating (Shazeer et al. 2017): learned, input-dependent noise on the logits in
training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._checks import check_floats, check_non_negative
from .rng import counter_normal
from .token_choice import TokenChoiceRouter

__all__ = ["NoisyTopKRouter"]


class NoisyTopKRouter(TokenChoiceRouter):
    """Top-k of ``l + eps * (softplus(x W_noise) + noise_eps) / temperature``, ``eps ~ N(0, 1)``
    in training only; weights = softmax over the k selected noisy logits. The noise is
    counter-based (a function of ``seed``, ``noise_step``, token and expert); the losses read the
    clean logits.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        noise_eps: floor added to the learned noise std (>= 0).
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.

    State: ``noise_gate.weight`` [E, d_model], zero-initialised (std ``log 2 + noise_eps`` at
    the start).
    """

    strategy = "noisy_topk"
    _draws_noise = True

    def __init__(
        self, d_model: int, num_experts: int, k: int = 2, *, noise_eps: float = 1e-2, **options
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_floats(owner, noise_eps=noise_eps)
        check_non_negative(owner, noise_eps=noise_eps)
        self.noise_eps = float(noise_eps)
        self.noise_gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.noise_gate.weight)

    def _select(self, x, logits, bias):
        sel = logits
        if self.training:
            std = F.softplus(self.noise_gate(x).float()) + self.noise_eps
            noise = counter_normal(self.seed, self.noise_step, tuple(logits.shape), 1)
            sel = logits + noise * std / self.temperature
        return self._gate(sel, "softmax", bias, True)
