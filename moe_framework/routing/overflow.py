"""Capacity with overflow re-routing and a dynamic capacity factor, around any token-choice router.

:class:`OverflowRouter` wraps a dropless router: it applies an expert capacity itself, and a slot
that overflows its expert is moved to the token's next-best expert that still has room instead of
being dropped. With ``dynamic=True`` the capacity factor follows the observed load (an
exponential moving average of the factor each training step would have needed to drop nothing).
Everything stays on the device with static shapes: the capacity is a 0-dim tensor, each re-routing
round is one ``ops.permute`` of ``[T, 1]`` ids, so the wrapper traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, cast

import torch
from torch import nn

from .. import ops
from ._checks import bad, check_bools, is_int, is_real
from .base import Router, RoutingDecision
from .counts import expert_counts

__all__ = ["OverflowRouter", "place_in_token_order"]


def place_in_token_order(ids: torch.Tensor, room: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Which slots fit: ``ids [T, k]`` int (-1 = empty), ``room [E]`` int64 free places per
    expert -> ``[T, k]`` bool, True for a slot whose rank among the slots of its expert (token-major
    order ``s = t*k + j``, first come first served) is below ``room[expert]``. The ranks come from
    the stable counting sort of ``ops.permute`` on a zero-width input (as
    :func:`~moe_framework.routing.capacity.apply_capacity`)."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    empty = torch.empty(T, 0, dtype=torch.float32, device=ids.device)
    _, row_of_slot, offsets = ops.permute(empty, ids.to(torch.int32), num_experts)
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    position = row_of_slot - offsets[key]
    room_of = torch.cat([room, room.new_zeros(1)])[key]
    return ((flat >= 0) & (position < room_of)).reshape(T, k)


class OverflowRouter(nn.Module):
    """Expert capacity with overflow re-routing (and optionally a dynamic capacity factor) around
    a dropless token-choice router.

    Per forward: the inner router decides (``capacity_factor=None``); each expert keeps at most
    ``C = ceil(f * T * k / E)`` slots in token order; then, for up to ``reroute_rounds`` rounds,
    each token with an overflowing slot offers it to its best-scoring expert that it does not
    already use and that still has room (scores: the inner router's logits, plus its selection
    bias when that steers selection), places are granted in token order, and the slot keeps its
    gate weight. Slots still without a place are dropped (id -1, weight 0).

    ``stats`` of the decision: ``dropped_before_reroute`` (slots over capacity), ``dropped``
    (still dropped after re-routing), ``rerouted``, ``capacity`` (C, 0-dim int64) and
    ``capacity_factor`` (f, 0-dim float32), besides the inner router's.

    Args:
        router: the inner router (a :class:`~moe_framework.routing.common.BaseRouter` with
            ``capacity_factor=None``; its ``slots_per_token`` is k).
        capacity_factor: f, or the starting f with ``dynamic=True`` (a float > 0).
        reroute: move overflowing slots (False: drop them, as the routers' own capacity does).
        reroute_rounds: re-routing rounds (int >= 1; default ``min(4, E - k)``, at least 1).
        dynamic: f follows the observed load: after each training forward
            ``ema <- momentum * ema + (1 - momentum) * max_e(load_e) * E / (T * k)`` and the next
            forwards use ``f = clamp(ema, min_capacity_factor, max_capacity_factor)``.
        momentum: of the moving average, in [0, 1).
        min_capacity_factor, max_capacity_factor: bounds of the dynamic f.

    State: the inner router's (under ``router.``) and ``capacity_ema`` (0-dim float32).
    """

    capacity_ema: torch.Tensor

    def __init__(
        self,
        router: nn.Module,
        capacity_factor: float = 1.25,
        *,
        reroute: bool = True,
        reroute_rounds: Optional[int] = None,
        dynamic: bool = False,
        momentum: float = 0.9,
        min_capacity_factor: float = 1.0,
        max_capacity_factor: float = 4.0,
    ):
        super().__init__()
        owner = type(self).__name__
        check_bools(owner, reroute=reroute, dynamic=dynamic)
        if not isinstance(router, nn.Module) or not hasattr(router, "slots_per_token"):
            bad(owner, "router", "a Router module", router)
        if getattr(router, "capacity_factor", None) is not None:
            bad(owner, "router.capacity_factor", "None (the wrapper applies the capacity)",
                router.capacity_factor)  # fmt: skip
        for name, v in (
            ("capacity_factor", capacity_factor),
            ("min_capacity_factor", min_capacity_factor),
            ("max_capacity_factor", max_capacity_factor),
        ):
            if not (is_real(v) and v > 0 and math.isfinite(v)):
                bad(owner, name, "a finite float > 0", v)
        if min_capacity_factor > max_capacity_factor:
            bad(owner, "min_capacity_factor", f"<= max_capacity_factor={max_capacity_factor}",
                min_capacity_factor)  # fmt: skip
        if not (is_real(momentum) and 0 <= momentum < 1):
            bad(owner, "momentum", "in [0, 1)", momentum)
        parts: Any = router
        E, k = int(parts.num_experts), int(parts.slots_per_token)
        if reroute_rounds is None:
            reroute_rounds = max(1, min(4, E - k))
        if not is_int(reroute_rounds) or reroute_rounds < 1:
            bad(owner, "reroute_rounds", "None or an int >= 1", reroute_rounds)
        self.router = router
        self.num_experts = E
        self.k = k
        self.reroute = reroute
        self.reroute_rounds = int(reroute_rounds)
        self.dynamic = dynamic
        self.momentum = float(momentum)
        self.min_capacity_factor = float(min_capacity_factor)
        self.max_capacity_factor = float(max_capacity_factor)
        self.register_buffer("capacity_ema", torch.tensor(float(capacity_factor)))

    @property
    def slots_per_token(self) -> int:
        return self.k

    @property
    def _inner(self) -> Router:
        return cast(Router, self.router)

    @property
    def d_model(self):
        return getattr(self.router, "d_model", None)

    def capacity_factor(self) -> torch.Tensor:
        """The capacity factor the next forward uses (0-dim float32 device tensor)."""
        f = self.capacity_ema
        if self.dynamic:
            f = f.clamp(self.min_capacity_factor, self.max_capacity_factor)
        return f

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
        **router_kw,
    ) -> RoutingDecision:
        """Route T tokens: the inner router's decision under this capacity (class docstring).
        Extra keyword arguments (``context=``) go to the inner router."""
        dec = self.router(x, mask, seq_len=seq_len, **router_kw)
        T, k, E = dec.ids.shape[0], self.k, self.num_experts
        tokens = (
            torch.full((), T, dtype=torch.int64, device=x.device)
            if mask is None
            else mask.to(torch.bool).sum()
        )
        f = self.capacity_factor()
        cap = torch.ceil(f * (T * k / E)).to(torch.int64).clamp(0, T)
        if self.dynamic and self.training:
            with torch.no_grad():
                need = dec.counts.max().float() * E / (tokens.clamp(min=1).float() * k)
                # a batch of padding only says nothing about the load: the average stays
                need = torch.where(tokens > 0, need, self.capacity_ema)
                self.capacity_ema.mul_(self.momentum).add_((1.0 - self.momentum) * need)

        fits = place_in_token_order(dec.ids, cap.expand(E), E)
        overflow = (dec.ids >= 0) & ~fits
        ids = torch.where(fits, dec.ids, torch.full_like(dec.ids, -1))
        weights = torch.where(fits, dec.weights, torch.zeros_like(dec.weights))
        dropped_before = overflow.sum()
        if self.reroute:
            ids, weights, overflow = self._reroute(dec, ids, weights, overflow, cap)
        counts = expert_counts(ids, E)
        stats = dict(dec.stats)
        stats["dropped_before_reroute"] = dropped_before
        stats["dropped"] = overflow.sum()
        stats["rerouted"] = dropped_before - stats["dropped"]
        stats["capacity"] = cap
        stats["capacity_factor"] = f.detach().clone()
        return RoutingDecision(weights, ids, counts, dec.logits, dec.aux_loss, stats)

    def _reroute(
        self, dec, ids, weights, pending, cap
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, k, E = ids.shape[0], self.k, self.num_experts
        dev = ids.device
        score = dec.logits.detach().float()
        if getattr(self.router, "uses_selection_bias", False):
            score = score + self.router.selection_bias
        used = torch.zeros(T, E + 1, dtype=torch.bool, device=dev)
        col = torch.where(dec.ids >= 0, dec.ids.long(), torch.full_like(dec.ids.long(), E))
        used = used.scatter(1, col, torch.ones_like(col, dtype=torch.bool))[:, :E]
        slot = torch.arange(k, device=dev)
        neg_inf = torch.full_like(score, float("-inf"))
        for _ in range(self.reroute_rounds):
            room = cap - expert_counts(ids, E).long()
            open_ = ~used & (room > 0)[None, :]
            best, cand = torch.where(open_, score, neg_inf).max(dim=1)
            # each token offers its first still-pending slot to its best open expert
            has = pending.any(dim=1) & (best > float("-inf"))
            first = torch.where(pending, slot, torch.full_like(slot, k)).min(dim=1).values
            offer = torch.where(has, cand, torch.full_like(cand, -1)).to(torch.int32)
            won = place_in_token_order(offer[:, None], room.clamp(min=0), E)[:, 0]
            at = won[:, None] & (slot[None, :] == first[:, None])
            ids = torch.where(at, offer[:, None].expand(T, k), ids)
            weights = torch.where(at, dec.weights, weights)
            pending = pending & ~at
            hit = won[:, None] & (torch.arange(E, device=dev)[None, :] == cand[:, None])
            used = used | hit
        return ids, weights, pending

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """The inner router's aux-loss-free balancing step."""
        self._inner.update_bias(counts)

    def routing_stats(self) -> dict:
        """The inner router's telemetry (what it asked for, before capacity)."""
        return self._inner.routing_stats()

    def reset_stats(self) -> None:
        self._inner.reset_stats()

    def extra_repr(self) -> str:
        return (
            f"reroute={self.reroute}, rounds={self.reroute_rounds}, dynamic={self.dynamic}, "
            f"momentum={self.momentum}"
        )
