"""Routers: which experts see which tokens.

* :mod:`~moe_framework.routing.base`: :class:`RoutingDecision` and the :class:`Router` protocol.
* One class per strategy, one file each: :class:`TopKRouter`, :class:`TopKThenSoftmaxRouter`,
  :class:`SwitchRouter`, :class:`NoisyTopKRouter`, :class:`GroupedSigmoidRouter`,
  :class:`ExpertChoiceRouter`, :class:`AttentionRouter`; the router kinds outside the config
  strategies (:data:`ROUTER_KINDS`, :func:`make_router`): :class:`MLPRouter`,
  :class:`ContextRouter`, :class:`DenseRouter`, :class:`MemoryBankRouter`; all on the shared
  machinery of
  :class:`BaseRouter` / :class:`TokenChoiceRouter`.
* :class:`OverflowRouter`: capacity with overflow re-routing and a dynamic capacity factor
  around any token-choice router.
* Functional pieces: :mod:`~moe_framework.routing.losses`, :mod:`~moe_framework.routing.capacity`,
  :mod:`~moe_framework.routing.counts`, :mod:`~moe_framework.routing.rng`.
* :class:`Supervisor`: the factory building a router from a strategy name (:data:`ROUTERS`).

Everything runs on the device: no ``.item()``, no ``nonzero``, no data-dependent shape, so a
router traces under ``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph. A slot
whose id is -1 is empty (dropped by capacity, padding, or an unused expert-choice slot) and has
weight 0. See ``docs/routing.md``.
"""

from .attention import AttentionRouter
from .base import Router, RoutingDecision
from .capacity import CapacityResult, apply_capacity, expert_capacity
from .common import BaseRouter, Selection
from .context import ContextRouter
from .counts import expert_counts
from .dense import DenseRouter
from .expert_choice import ExpertChoiceRouter
from .factory import ROUTER_KINDS, ROUTERS, STRATEGIES, Supervisor, make_router, router_arguments
from .grouped_sigmoid import GroupedSigmoidRouter
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .memory_bank import MemoryBankRouter
from .mlp import MLPRouter
from .noisy_topk import NoisyTopKRouter
from .overflow import OverflowRouter, place_in_token_order
from .rng import counter_normal, counter_uniform
from .switch import SwitchRouter
from .token_choice import TokenChoiceRouter
from .topk import TopKRouter
from .topk_then_softmax import TopKThenSoftmaxRouter

__all__ = [
    "AttentionRouter",
    "BaseRouter",
    "ContextRouter",
    "DenseRouter",
    "CapacityResult",
    "ExpertChoiceRouter",
    "GroupedSigmoidRouter",
    "MLPRouter",
    "MemoryBankRouter",
    "NoisyTopKRouter",
    "OverflowRouter",
    "ROUTER_KINDS",
    "ROUTERS",
    "Router",
    "RoutingDecision",
    "STRATEGIES",
    "Selection",
    "Supervisor",
    "SwitchRouter",
    "TokenChoiceRouter",
    "TopKRouter",
    "TopKThenSoftmaxRouter",
    "apply_capacity",
    "counter_normal",
    "counter_uniform",
    "expert_capacity",
    "expert_counts",
    "load_balancing_loss",
    "make_router",
    "place_in_token_order",
    "router_arguments",
    "router_entropy",
    "router_z_loss",
]
