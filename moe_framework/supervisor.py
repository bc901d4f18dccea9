"""Compatibility module: the routers moved to :mod:`moe_framework.routing`.

``from moe_framework.supervisor import Supervisor, RoutingDecision, STRATEGIES, ...`` keeps
working; :class:`Supervisor` is now the factory that returns the router class of a strategy.
"""

from .routing import (
    ROUTERS,
    STRATEGIES,
    CapacityResult,
    Router,
    RoutingDecision,
    Supervisor,
    apply_capacity,
    counter_normal,
    counter_uniform,
    expert_capacity,
    expert_counts,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
)

__all__ = [
    "RoutingDecision",
    "Router",
    "Supervisor",
    "STRATEGIES",
    "ROUTERS",
    "CapacityResult",
    "expert_capacity",
    "apply_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
    "expert_counts",
    "counter_uniform",
    "counter_normal",
]
