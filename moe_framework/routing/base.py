"""The routing vocabulary: :class:`RoutingDecision` (what a router returns) and the
:class:`Router` protocol (what an MoE layer may rely on)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

__all__ = ["RoutingDecision", "Router"]


class RoutingDecision(NamedTuple):
    """What a router decides for a batch of T tokens (all device tensors, no host sync).

    weights: [T, k] float32 gate weight of each slot (0 for a dropped slot).
    ids:     [T, k] int32 expert of each slot (-1 for a dropped slot).
    counts:  [E] int32 slots actually routed to each expert.
    logits:  [T, E] float32 router logits (what the balancing losses read).
    aux_loss: 0-dim float32, the weighted sum of the enabled balancing losses (0 when none).
    stats:   dict of 0-dim or [E] device tensors (e.g. "dropped", "z_loss", "load_loss").
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict


@runtime_checkable
class Router(Protocol):
    """What an MoE layer needs from its router (a ``torch.nn.Module`` in practice).

    Every router of :mod:`moe_framework.routing` implements it, and so can a plain module written
    elsewhere: the layer calls these members and nothing else, without probing for them.

    Attributes:
        num_experts: E, the experts the ids refer to (``0 <= id < E``, -1 = empty slot).
        slots_per_token: S, the static number of slots per token of every decision (``k`` for
            token-choice routers); the layer's permuted buffer has ``T * S`` rows.

    ``isinstance(obj, Router)`` (the protocol is ``runtime_checkable``) only checks that these
    members exist, not their signatures.
    """

    @property
    def num_experts(self) -> int:
        """E, the number of routed experts."""
        ...

    @property
    def slots_per_token(self) -> int:
        """S, the static number of slots per token in every decision."""
        ...

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
    ) -> RoutingDecision:
        """Route T tokens.

        Args:
            x: ``[T, d_model]`` float tokens.
            mask: optional ``[T]`` bool, True for real tokens. Padding tokens get empty slots
                (id -1, weight 0) and are left out of losses and telemetry.
            seq_len: tokens per sequence (T is a multiple of it) for per-sequence statistics;
                routers that do not need it ignore it.

        Returns:
            A :class:`RoutingDecision` with ``slots_per_token`` slots per token. Must not
            synchronise with the host (no ``.item()``, no data-dependent shapes).
        """
        ...

    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """The aux-loss-free balancing hook, called by the training loop after the optimiser
        step. ``counts``: ``[E]`` slots per expert of the step, or None for the loads the router
        accumulated itself. A no-op for routers without a selection bias."""
        ...

    def routing_stats(self) -> dict:
        """Routing telemetry accumulated since the last reset, as a plain dict. Raises
        ``RuntimeError`` (saying how to turn tracking on) when the router does not track it."""
        ...

    def reset_stats(self) -> None:
        """Clear the telemetry accumulators. A router that keeps no telemetry at all raises
        ``RuntimeError``; one that keeps an accumulator clears it even while tracking is off."""
        ...
