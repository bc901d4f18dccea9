"""Options of the training step for MoE models (docs/adaptive_routing.md):

* per-group learning-rate multipliers: :func:`parameter_groups` splits a model's parameters into
  ``router``, ``experts``, ``shared`` and ``other`` groups, each with ``lr * multiplier``;
* router dropout (on the router's input) and expert dropout (whole routed slots), set on every
  router of the model by :func:`apply_training_options` and active in training forwards only;
* an expert-diversity loss (:func:`expert_diversity_loss`): the mean squared cosine between the
  flattened weights of each pair of routed experts, added to the loss with its coefficient.

:class:`TrainingOptions` holds them; ``training_step(..., options=TrainingOptions(...))``
(:mod:`moe_framework.training`) applies the dropouts and adds the diversity loss; the optimiser is
yours, so build it from :func:`parameter_groups` for the multipliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from torch import nn

if TYPE_CHECKING:
    from .moe_layer import MoELayer

__all__ = [
    "TrainingOptions",
    "apply_training_options",
    "expert_diversity_loss",
    "parameter_groups",
]


@dataclass(frozen=True)
class TrainingOptions:
    """Options of the MoE training step (all off by default).

    router_lr_mult, expert_lr_mult, shared_lr_mult: learning-rate multipliers of the router,
        routed-expert and shared-expert parameters (finite floats >= 0; used by
        :func:`parameter_groups`).
    router_dropout: probability of zeroing each element of the router's input (in [0, 1)).
    expert_dropout: probability of emptying each routed slot (in [0, 1); survivors' gate weights
        are scaled by ``1 / (1 - p)``).
    diversity_loss_coef: weight of :func:`expert_diversity_loss` in the loss (>= 0).
    """

    router_lr_mult: float = 1.0
    expert_lr_mult: float = 1.0
    shared_lr_mult: float = 1.0
    router_dropout: float = 0.0
    expert_dropout: float = 0.0
    diversity_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("router_lr_mult", "expert_lr_mult", "shared_lr_mult", "diversity_loss_coef"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (v >= 0 and math.isfinite(v))
            ):
                raise ValueError(f"TrainingOptions: {name} must be a finite float >= 0, got {v!r}")
        for name in ("router_dropout", "expert_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"TrainingOptions: {name} must be a float in [0, 1), got {v!r}")


def _moe_layers(model: nn.Module) -> List[MoELayer]:
    from .moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def parameter_groups(
    model: nn.Module, lr: float, options: TrainingOptions = TrainingOptions()
) -> List[Dict[str, Any]]:
    """Optimiser parameter groups of ``model`` with the options' learning-rate multipliers:
    ``[{"name": "router", "params": [...], "lr": lr * router_lr_mult}, {"name": "experts", ...},
    {"name": "shared", ...}, {"name": "other", "lr": lr}]`` (empty groups left out). The router,
    experts and shared experts of every :class:`~moe_framework.moe_layer.MoELayer` in ``model``;
    "other" is everything else (embeddings, norms, heads, attention). Pass the list to any
    ``torch.optim`` optimiser."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"parameter_groups: lr must be a float > 0, got {lr!r}")
    seen: set = set()
    groups: Dict[str, list] = {"router": [], "experts": [], "shared": [], "other": []}

    def take(module, group):
        if module is None:
            return
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                groups[group].append(p)

    for layer in _moe_layers(model):
        take(layer.supervisor, "router")
        take(layer.experts, "experts")
        take(layer.shared_experts, "shared")
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            groups["other"].append(p)
    mult = {
        "router": options.router_lr_mult,
        "experts": options.expert_lr_mult,
        "shared": options.shared_lr_mult,
        "other": 1.0,
    }
    return [
        {"name": name, "params": params, "lr": lr * mult[name]}
        for name, params in groups.items()
        if params
    ]


def apply_training_options(model: nn.Module, options: TrainingOptions) -> int:
    """Set ``router_dropout`` / ``expert_dropout`` on every router of ``model`` (every
    :class:`~moe_framework.routing.common.BaseRouter` among its modules); returns how many. They
    act in training forwards only."""
    from .routing.common import BaseRouter

    n = 0
    for m in model.modules():
        if isinstance(m, BaseRouter):
            m.router_dropout = float(options.router_dropout)
            m.expert_dropout = float(options.expert_dropout)
            n += 1
    return n


def expert_diversity_loss(model: nn.Module) -> torch.Tensor:
    """Mean over the MoE layers of ``model`` of the mean squared cosine similarity between the
    flattened weights of each pair of distinct routed experts (0 = mutually orthogonal experts,
    1 = identical ones). Every parameter of a layer's ``experts`` module whose first dimension is
    ``num_experts`` counts (``w_gate_up`` / ``w_in``, ``w_out``, biases). Differentiable; 0-dim
    float32 (0 for a model without MoE layers or with one expert)."""
    losses = []
    for layer in _moe_layers(model):
        E = int(layer.num_experts)
        experts: nn.Module = layer.experts
        parts = [p.reshape(E, -1) for p in experts.parameters() if p.dim() >= 1 and p.shape[0] == E]
        if E < 2 or not parts:
            continue
        w = torch.cat(parts, dim=1).float()
        unit = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
        cos = unit @ unit.t()
        off = ~torch.eye(E, dtype=torch.bool, device=w.device)
        losses.append(cos[off].square().mean())
    if not losses:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), dtype=torch.float32, device=None if p is None else p.device)
    return torch.stack(losses).mean()
