"""Two-level (hierarchical) MoE: a group router picks expert groups, then an expert router picks
within each chosen group.

* :class:`HierarchicalRouter`: a :class:`~moe_framework.routing.base.Router` composed of routers
  (one over G groups, one per group over its experts), usable as the router of a plain
  :class:`~moe_framework.moe_layer.MoELayer` over all ``N = sum(E_g)`` experts.
* :class:`HierarchicalMoELayer`: level-1 members that are themselves MoE layers ("constellations of
  constellations"): each token goes through its chosen groups' layers, weighted by the group gate.

Both keep device-side telemetry per level (no host sync in forward; static shapes: every group's
router sees every token, masked to the tokens that chose the group), so they compile with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, cast

import torch
from torch import nn

from .metrics import load_summary
from .routing.base import Router, RoutingDecision
from .routing.counts import expert_counts

__all__ = ["HierarchicalRouter", "HierarchicalMoELayer", "HierarchicalRoutingInfo"]


def _check_router(owner: str, name: str, r) -> Router:
    if not isinstance(r, nn.Module) or not isinstance(r, Router):
        raise ValueError(
            f"{owner}: {name} must be an nn.Module implementing the Router protocol, got "
            f"{type(r).__name__}"
        )
    return cast(Router, r)


def _check_width(owner: str, parts: Sequence[tuple]) -> Optional[int]:
    widths = [(n, getattr(p, "d_model", None)) for n, p in parts]
    widths = [(n, w) for n, w in widths if w is not None]
    for n, w in widths[1:]:
        if w != widths[0][1]:
            raise ValueError(
                f"{owner}: {n}.d_model={w} must equal {widths[0][0]}.d_model={widths[0][1]}"
            )
    return widths[0][1] if widths else None


def _group_weight(group: RoutingDecision, g: int) -> torch.Tensor:
    """[T] float32 gate weight of group g for each token (0 when it did not choose g)."""
    return (group.weights.float() * (group.ids == g).to(torch.float32)).sum(1)


def _member_mask(group: RoutingDecision, g: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    sel = (group.ids == g).any(1)
    return sel if mask is None else sel & mask


class HierarchicalRouter(nn.Module):
    """A router over ``N = sum(E_g)`` experts composed of a group router and per-group routers.

    Args:
        group_router: a ``Router`` over G groups (``num_experts == G``), ``k_g`` slots.
        expert_routers: G ``Router`` s, router g over group g's ``E_g`` experts; all with the same
            ``slots_per_token`` ``k_e``.

    Expert ``i`` of group g has the flat id ``start_g + i`` (groups in order). Each token gets
    ``k_g * k_e`` slots: for its j-th group the k_e experts expert router g picks for it, with
    weight ``w_group * w_expert`` (so when both routers' weights sum to 1, so do the token's). A
    group router run on every token, masked to the tokens that chose the group, keeps shapes static
    and each expert router's balancing loss and telemetry over its own tokens. ``aux_loss`` is the
    group router's plus every expert router's. ``logits`` are the joint log-probabilities
    ``log_softmax(group) + log_softmax(expert)`` ``[T, N]``.

    Telemetry (device buffers, read by :meth:`routing_stats`): slots per group (level 0) and per
    expert (level 1).
    """

    group_load: torch.Tensor
    expert_load: torch.Tensor

    def __init__(self, group_router: nn.Module, expert_routers: Sequence[nn.Module]):
        super().__init__()
        owner = "HierarchicalRouter"
        gr = _check_router(owner, "group_router", group_router)
        experts = list(expert_routers)
        if len(experts) != gr.num_experts:
            raise ValueError(
                f"{owner}: expert_routers must hold one router per group "
                f"(group_router.num_experts={gr.num_experts}), got {len(experts)}"
            )
        ers = [_check_router(owner, f"expert_routers[{i}]", r) for i, r in enumerate(experts)]
        k_e = {r.slots_per_token for r in ers}
        if len(k_e) != 1:
            raise ValueError(
                f"{owner}: every expert router must have the same slots_per_token, got {sorted(k_e)}"
            )
        parts = [("group_router", group_router)] + [
            (f"expert_routers[{i}]", r) for i, r in enumerate(experts)
        ]
        self.d_model = _check_width(owner, parts)
        self.group_router = group_router
        self.expert_routers = nn.ModuleList(experts)
        self.group_sizes = [r.num_experts for r in ers]
        self.starts = [sum(self.group_sizes[:g]) for g in range(len(ers))]
        self.num_groups = gr.num_experts
        self.num_experts = sum(self.group_sizes)
        self.k_group = gr.slots_per_token
        self.k_expert = k_e.pop()
        self._slots = self.k_group * self.k_expert
        self.register_buffer("group_load", torch.zeros(self.num_groups, dtype=torch.int64), False)
        self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.int64), False)

    @property
    def slots_per_token(self) -> int:
        return self._slots

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
    ) -> RoutingDecision:
        """Route T tokens: ``k_g * k_e`` slots each (group-major), ids over all N experts."""
        if mask is not None:
            mask = mask.to(torch.bool)
        group = self.group_router(x, mask, seq_len=seq_len)
        T = x.shape[0]
        ids_g, w_g, logits = [], [], []
        aux = group.aux_loss
        dropped = group.stats.get("dropped", torch.zeros((), dtype=torch.int64, device=x.device))
        group_logp = torch.log_softmax(group.logits.float(), dim=-1)
        for g, router in enumerate(self.expert_routers):
            dec = router(x, _member_mask(group, g, mask), seq_len=seq_len)
            start = self.starts[g]
            ids_g.append(torch.where(dec.ids < 0, dec.ids, dec.ids + start))
            w_g.append(dec.weights.float())
            aux = aux + dec.aux_loss
            if "dropped" in dec.stats:
                dropped = dropped + dec.stats["dropped"]
            expert_logp = torch.log_softmax(dec.logits.float(), dim=-1)
            logits.append(group_logp[:, g : g + 1] + expert_logp)
        all_ids = torch.stack(ids_g, 1)  # [T, G, k_e]
        all_w = torch.stack(w_g, 1)
        gid = group.ids.long()  # [T, k_g]
        idx = gid.clamp(min=0).unsqueeze(-1).expand(T, self.k_group, self.k_expert)
        ids = torch.gather(all_ids, 1, idx)
        w = torch.gather(all_w, 1, idx) * group.weights.float().unsqueeze(-1)
        empty = (gid < 0).unsqueeze(-1)
        ids = torch.where(empty, torch.full_like(ids, -1), ids).reshape(T, self._slots)
        w = torch.where(empty, torch.zeros_like(w), w).reshape(T, self._slots)
        counts = expert_counts(ids, self.num_experts)
        with torch.no_grad():
            self.group_load.add_(group.counts.to(torch.int64))
            self.expert_load.add_(counts.to(torch.int64))
        stats = {"dropped": dropped, "group_counts": group.counts}
        return RoutingDecision(w, ids.to(torch.int32), counts, torch.cat(logits, 1), aux, stats)

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """Each level's balancing hook: expert counts ``[N]`` are split per group; the group
        router gets None (its own accumulated loads)."""
        cast(Router, self.group_router).update_bias(None)
        for g, router in enumerate(self.expert_routers):
            part = None
            if counts is not None:
                part = counts[self.starts[g] : self.starts[g] + self.group_sizes[g]]
            cast(Router, router).update_bias(part)

    def routing_stats(self) -> dict:
        """Per level: ``level0`` (load statistics over groups), ``level1`` (one per group, over
        its experts) and ``experts`` (over all N), each a
        :func:`~moe_framework.metrics.load_summary` dict plus ``load``."""
        groups = self.group_load.tolist()
        experts = self.expert_load.tolist()
        out: dict = {"level0": dict(load_summary(groups), load=groups)}
        out["level1"] = [
            dict(load_summary(experts[s : s + n]), load=experts[s : s + n])
            for s, n in zip(self.starts, self.group_sizes)
        ]
        out["experts"] = dict(load_summary(experts), load=experts)
        return out

    def reset_stats(self) -> None:
        self.group_load.zero_()
        self.expert_load.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, group_sizes={self.group_sizes}, "
            f"k_group={self.k_group}, k_expert={self.k_expert}"
        )


class HierarchicalRoutingInfo(NamedTuple):
    """Routing of one :class:`HierarchicalMoELayer` forward (device tensors).

    group: the group router's :class:`RoutingDecision` (level 0).
    members: one :class:`~moe_framework.moe_layer.RoutingInfo` per member layer (level 1).
    aux_loss: 0-dim, the group router's balancing loss plus every member's.
    counts: ``[sum E_g]`` int slots per member expert, members in order (so a
        ``HierarchicalMoELayer`` can itself be a member of another one).
    """

    group: RoutingDecision
    members: List
    aux_loss: torch.Tensor
    counts: torch.Tensor


class HierarchicalMoELayer(nn.Module):
    """MoE whose level-1 experts are MoE layers: ``y = sum_j w_j * member_{g_j}(x)`` over the
    token's ``k_g`` chosen groups ``g_j`` (+ optional shared experts on every token).

    Args:
        group_router: a ``Router`` over G groups.
        members: G modules called as ``member(x [T, d], mask=[T] bool) -> (y [T, d], info)`` with a
            ``RoutingInfo``-like ``info`` (``aux_loss``, ``counts``) and an int ``num_experts``:
            an :class:`~moe_framework.moe_layer.MoELayer`, or another ``HierarchicalMoELayer``
            (three levels and more).
        shared: optional always-on experts ``x [T, d] -> [T, d]``.

    Every member sees every token, masked to the tokens that chose its group (padding-style: a
    masked token routes nowhere), so shapes are static and each member's balancing loss covers
    its own tokens. ``forward(x [..., d], mask=None) -> (y, HierarchicalRoutingInfo)``.

    Telemetry per level (device buffers): ``group_load`` [G] slots per group, ``member_load``
    [sum E_g] slots per member expert; :meth:`routing_stats` summarises them.
    """

    group_load: torch.Tensor
    member_load: torch.Tensor

    def __init__(
        self,
        group_router: nn.Module,
        members: Sequence[nn.Module],
        shared: Optional[nn.Module] = None,
    ):
        super().__init__()
        owner = "HierarchicalMoELayer"
        gr = _check_router(owner, "group_router", group_router)
        members = list(members)
        if len(members) != gr.num_experts:
            raise ValueError(
                f"{owner}: members must hold one layer per group "
                f"(group_router.num_experts={gr.num_experts}), got {len(members)}"
            )
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module) or not isinstance(getattr(m, "num_experts", None), int):
                raise ValueError(
                    f"{owner}: members[{i}] must be an MoE layer module with an int num_experts, "
                    f"got {type(m).__name__}"
                )
        parts = [("group_router", group_router)] + [
            (f"members[{i}]", m) for i, m in enumerate(members)
        ]
        if shared is not None:
            parts.append(("shared", shared))
        self.d_model = _check_width(owner, parts)
        self.group_router = group_router
        self.members = nn.ModuleList(members)
        self.shared_experts = shared
        self.num_groups = gr.num_experts
        self.member_sizes: List[int] = [cast(int, m.num_experts) for m in members]
        self.starts = [sum(self.member_sizes[:g]) for g in range(len(members))]
        self.register_buffer("group_load", torch.zeros(self.num_groups, dtype=torch.int64), False)
        total = sum(self.member_sizes)
        self.num_experts = total  # the member experts, flat (what an enclosing layer counts)
        self.register_buffer("member_load", torch.zeros(total, dtype=torch.int64), False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """x ``[..., d]`` -> ``(y [..., d], HierarchicalRoutingInfo)``; mask ``[...]`` bool."""
        if self.d_model is not None and x.shape[-1] != self.d_model:
            raise ValueError(
                f"HierarchicalMoELayer: x must have last dimension d_model={self.d_model}, got "
                f"{tuple(x.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"HierarchicalMoELayer: mask must have shape {tuple(x.shape[:-1])}, got "
                f"{tuple(mask.shape)}"
            )
        x2 = x.reshape(-1, x.shape[-1])
        m2 = None if mask is None else mask.reshape(-1).to(torch.bool)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        group = self.group_router(x2, m2, seq_len=seq_len)
        y = torch.zeros_like(x2)
        aux = group.aux_loss
        infos = []
        for g, member in enumerate(self.members):
            y_g, info = member(x2, mask=_member_mask(group, g, m2))
            y = y + _group_weight(group, g).to(y_g.dtype).unsqueeze(1) * y_g
            aux = aux + info.aux_loss
            infos.append(info)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        counts = torch.cat([i.counts.to(torch.int64) for i in infos])
        with torch.no_grad():
            self.group_load.add_(group.counts.to(torch.int64))
            self.member_load.add_(counts)
        return y.reshape(x.shape), HierarchicalRoutingInfo(group, infos, aux, counts)

    def routing_stats(self) -> dict:
        """``level0``: load statistics over groups; ``level1``: one per member, over its experts
        (:func:`~moe_framework.metrics.load_summary` dicts plus ``load``)."""
        groups = self.group_load.tolist()
        members = self.member_load.tolist()
        return {
            "level0": dict(load_summary(groups), load=groups),
            "level1": [
                dict(load_summary(members[s : s + n]), load=members[s : s + n])
                for s, n in zip(self.starts, self.member_sizes)
            ],
        }

    def reset_stats(self) -> None:
        self.group_load.zero_()
        self.member_load.zero_()

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, member_sizes={self.member_sizes}"
