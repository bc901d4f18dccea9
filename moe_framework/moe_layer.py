"""``MoELayer``: router -> dispatcher -> experts -> combine (+ shared experts), plus draft reports.

The layer is composed of parts, each behind a small protocol, and never subclassed::

    x [..., d] -> x2 [T, d]
    decision = router(x2, mask, seq_len=S)        Router: weights [T,k] f32, ids [T,k] (-1 = dropped)
    x_sorted, offsets, ctx = dispatcher.dispatch(x2, decision)   TokenDispatcher: [T*k, d], [E+1]
    y_sorted = experts(x_sorted, offsets)         Experts: rows offsets[E]: (dropped) give 0
    y = dispatcher.combine(y_sorted, ctx)         fixed-order weighted sum, no atomics
    y += shared(x2)                               optional always-on experts (any module x -> y)

With the default parts (``Supervisor``, :class:`~moe_framework.dispatch.LocalDispatcher`,
:class:`~moe_framework.experts.ExpertBank`) every shape is static and nothing syncs with the host:
every token keeps its k slots, so the only data-dependent quantities are the per-expert
``offsets``, which stay on the device and are read by the grouped GEMM kernel itself
(``torch.compile(fullgraph=True)`` and CUDA graph capture work in training and inference).
:meth:`MoELayer.build` builds that default layer from sizes.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, cast

import torch
from torch import nn

from . import ops
from .dispatch import LocalDispatcher, TokenDispatcher
from .experts import (
    ACTIVATIONS,
    CheckpointedExperts,
    DenseFFN,
    ExpertBank,
    Experts,
    GatedSharedExperts,
    expert_of_row,
)
from .routing.base import Router
from .run_metrics import stage
from .supervisor import Supervisor

__all__ = ["DraftReports", "RoutingInfo", "MoELayer", "draft_reports"]


class DraftReports(NamedTuple):
    """What each expert saw in one forward pass: fixed shapes, device tensors, detached.

    mean_output: ``[E, d]`` float32, mean of the expert's outputs (before gate weighting) over the
        slots routed to it; zeros for an expert with no tokens.
    confidence:  ``[E]`` float32, mean gate weight of those slots (0 for an expert with no tokens).
    token_count: ``[E]`` int64, number of slots routed to the expert (dropped slots excluded).
    top_tokens:  ``[E, r]`` int64, flattened token indices (into the ``T = prod(x.shape[:-1])``
        tokens) of the expert's r most confident slots, highest gate weight first, ties to the lower
        token index; ``-1`` where the expert had fewer than r tokens.
    """

    mean_output: torch.Tensor
    confidence: torch.Tensor
    token_count: torch.Tensor
    top_tokens: torch.Tensor


class RoutingInfo(NamedTuple):
    """Routing of one ``MoELayer`` forward pass (device tensors; no host sync to build it).

    weights: ``[T, k]`` float32 gate weights (0 for a dropped slot).
    ids:     ``[T, k]`` int32 experts (-1 for a dropped slot).
    counts:  ``[E]`` int32 slots routed to each expert.
    aux_loss: 0-dim float32 balancing loss of the router (add it to the training loss).
    stats:   the router's dict of statistics.
    reports: :class:`DraftReports`, or ``None`` when the layer has ``report_top_tokens=None``.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict
    reports: Optional[DraftReports]


@torch.no_grad()
def draft_reports(
    y_sorted: torch.Tensor,
    row_of_slot: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    top_r: int,
) -> DraftReports:
    """Per-expert summaries from the expert-sorted layout, without a ``[T, E]`` buffer or host sync.

    Args:
        y_sorted: ``[T*k, d]`` expert outputs in expert-sorted order (rows ``offsets[E]:`` dropped).
        row_of_slot: ``[T*k]`` int64, the sorted row of each slot (``ctx.row_of_slot`` of the
            dispatcher, from ``ops.permute``).
        offsets: ``[E+1]`` int64 from the dispatcher.
        weights: ``[T, k]`` gate weights.
        top_r: r, the number of token indices kept per expert (``>= 0``).

    Extra memory is O(T*k) indices plus ``[E, d]``; per-expert sums are ordered grouped reductions
    (``grouped_gemm_wgrad`` with a ones column), so the reports are deterministic on every device.
    """
    y_sorted = y_sorted.detach()
    weights = weights.detach()
    M = y_sorted.shape[0]
    k = weights.shape[1]
    E = offsets.shape[0] - 1
    dev = y_sorted.device
    counts = offsets[1:] - offsets[:-1]
    rows_expert = expert_of_row(offsets, M)
    rows = torch.arange(M, device=dev, dtype=torch.long)
    slot_of_row = torch.empty_like(row_of_slot).scatter_(0, row_of_slot, rows)
    w_sorted = weights.reshape(-1).float()[slot_of_row]

    # Column sums per expert as grouped reductions over the sorted rows: ones[M,1]^T @ y_e.
    ones = y_sorted.new_ones(M, 1)
    sums = ops.grouped_gemm_wgrad(ones, y_sorted, offsets)
    wsums = ops.grouped_gemm_wgrad(ones.float(), w_sorted.unsqueeze(1), offsets)
    denom = counts.clamp(min=1).to(torch.float32)
    mean_output = sums.reshape(E, -1).float() / denom.unsqueeze(1)
    confidence = wsums.reshape(E) / denom

    # Top-r per expert: order rows by confidence (stable: ties keep row order = token order, since
    # permute is stable), then stably regroup by expert. Expert e's rows then sit at positions
    # offsets[e]:offsets[e+1], most confident first.
    by_conf = torch.sort(-w_sorted, stable=True).indices
    order = by_conf[torch.sort(rows_expert[by_conf], stable=True).indices]
    token_of_pos = torch.cat([slot_of_row[order] // k, rows.new_full((1,), -1)])
    ranks = torch.arange(top_r, device=dev, dtype=torch.long)
    pos = (offsets[:-1].unsqueeze(1) + ranks.unsqueeze(0)).clamp(max=M)
    valid = ranks.unsqueeze(0) < counts.unsqueeze(1)
    top_tokens = torch.where(valid, token_of_pos[pos], torch.full_like(pos, -1))
    return DraftReports(mean_output, confidence, counts.to(torch.long), top_tokens)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_router(router: nn.Module, d_model: int, num_experts: int, k: int) -> None:
    """A router given to :meth:`MoELayer.build` must route this layer's tokens: checked at
    construction, so a mismatch is not found only by the first forward."""
    spt = router.slots_per_token
    if spt != k:
        raise ValueError(f"MoELayer.build: k={k} must equal router.slots_per_token, got {spt!r}")
    for name, want in (("num_experts", num_experts), ("d_model", d_model)):
        # A router that does not say its width (a plain user module) is trusted.
        got = getattr(router, name, want)
        if got != want:
            raise ValueError(f"MoELayer.build: router.{name} must equal {name}={want}, got {got!r}")


def _load_legacy_keys(module, state_dict, prefix, *args) -> None:
    # State dicts saved before the layer was composed of parts (issue 13) held the Qwen2-MoE style
    # shared gate beside the shared experts: `shared_gate.weight` and `shared_experts.<ffn>`. It is
    # now GatedSharedExperts(ffn, gate): `shared_experts.gate.weight`, `shared_experts.ffn.<ffn>`.
    old_gate = prefix + "shared_gate.weight"
    if old_gate not in state_dict:
        return
    shared = prefix + "shared_experts."
    for key in [k for k in state_dict if k.startswith(shared)]:
        state_dict[shared + "ffn." + key[len(shared) :]] = state_dict.pop(key)
    state_dict[shared + "gate.weight"] = state_dict.pop(old_gate)


def _require_module(part: str, value, protocol: str) -> None:
    # A part that is not an nn.Module would be stored as a plain attribute: its parameters would
    # silently be missing from parameters(), state_dict() and .to().
    if not isinstance(value, nn.Module):
        hint = ""
        if _is_int(value):
            hint = (
                "; MoELayer takes its parts now: to build a layer from sizes use "
                "MoELayer.build(d_model=..., d_hidden=..., num_experts=..., k=...)"
            )
        raise ValueError(
            f"MoELayer: {part} must be an nn.Module implementing the {protocol} protocol, got "
            f"{type(value).__name__} {value!r}{hint}"
        )


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer composed of swappable parts.

    Args:
        router: a ``Router`` module: ``router(x [T, d], mask [T] bool or None, seq_len=S or None)
            -> RoutingDecision`` with ``slots_per_token`` (k) slots per token; attributes
            ``num_experts`` and ``slots_per_token``; methods ``routing_stats()``,
            ``reset_stats()`` (and ``update_bias()`` for the training loop). ``Supervisor`` is
            one (every strategy of docs/routing.md). Registered as ``self.supervisor``, the name
            its parameters have in state dicts and saved models; ``self.router`` is the same
            module.
        experts: an :class:`~moe_framework.experts.Experts` module: ``experts(x_sorted [M, d],
            offsets [E+1]) -> [M, d]`` with ``num_experts`` equal to the router's
            (:class:`~moe_framework.experts.ExpertBank`,
            :class:`~moe_framework.experts.CheckpointedExperts`, ...).
        dispatcher: a :class:`~moe_framework.dispatch.TokenDispatcher` (default
            ``LocalDispatcher(experts.num_experts)``: ``ops.permute`` / ``ops.unpermute``).
        shared: optional always-on experts, a module ``x [T, d] -> [T, d]`` added to the routed
            output (:class:`~moe_framework.experts.DenseFFN`,
            :class:`~moe_framework.experts.GatedSharedExperts`); ``self.shared_experts``.
        report_top_tokens: r, the token indices kept per expert in the :class:`DraftReports`
            (``int >= 0``), or ``None`` for no draft reports (skips their small cost).

    ``forward(x [..., d], mask=None) -> (y [..., d], RoutingInfo)``; ``y`` has the dtype of ``x``.
    Parts that state ``num_experts`` / ``d_model`` must agree: checked here, with a ``ValueError``
    naming the part. :meth:`build` makes the default layer from sizes.
    """

    # The parts, declared for type checkers (nn.Module.__setattr__ registers the modules among
    # them as children). Router and experts are any modules that implement their protocol.
    supervisor: nn.Module
    experts: nn.Module
    dispatcher: TokenDispatcher
    shared_experts: Optional[nn.Module]

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        dispatcher: Optional[TokenDispatcher] = None,
        shared: Optional[nn.Module] = None,
        *,
        report_top_tokens: Optional[int] = 4,
    ):
        super().__init__()
        _require_module("router", router, "Router")
        _require_module("experts", experts, "Experts")
        if shared is not None:
            _require_module("shared", shared, "shared-experts (x -> y)")
        _check_report_top_tokens("MoELayer", report_top_tokens)
        # Modules (checked above) whose protocol members are read here: nn.Module types unknown
        # attributes as Tensor | Module, so the protocols are named for the type checker.
        routes = cast(Router, router)
        num_experts = cast(Experts, experts).num_experts
        if routes.num_experts != num_experts:
            raise ValueError(
                f"MoELayer: router.num_experts={routes.num_experts!r} must equal "
                f"experts.num_experts={num_experts!r}"
            )
        k = routes.slots_per_token
        if not _is_int(k) or k < 1:
            raise ValueError(f"MoELayer: router.slots_per_token must be an int >= 1, got {k!r}")
        if dispatcher is None:
            dispatcher = LocalDispatcher(num_experts)
        else:
            # A dispatcher that does not say how many experts it serves is trusted.
            dispatcher_experts = getattr(dispatcher, "num_experts", num_experts)
            if dispatcher_experts != num_experts:
                raise ValueError(
                    f"MoELayer: dispatcher.num_experts={dispatcher_experts!r} must equal "
                    f"experts.num_experts={num_experts!r}"
                )
        self.d_model = _agreed_width(router, experts, dispatcher, shared)
        self.num_experts = num_experts
        self.k = k
        self.report_top_tokens = report_top_tokens
        self.supervisor = router
        self.experts = experts
        self.dispatcher = dispatcher
        self.shared_experts = shared
        self.register_load_state_dict_pre_hook(_load_legacy_keys)

    @classmethod
    def build(
        cls,
        *,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 2,
        activation: str = "swiglu",
        bias: bool = False,
        num_shared_experts: int = 0,
        shared_hidden: Optional[int] = None,
        shared_expert_gate: bool = False,
        router: Optional[nn.Module] = None,
        report_top_tokens: Optional[int] = 4,
        layout: str = "in_out",
        init_std: Optional[float] = None,
        recompute_activation: bool = True,
        inplace_backward: bool = True,
        checkpoint_experts: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        **router_kw,
    ) -> MoELayer:
        """The default layer from sizes: ``Supervisor`` -> ``LocalDispatcher`` -> ``ExpertBank``
        (+ ``DenseFFN`` shared experts).

        Args (keyword-only):
            d_model, d_hidden, num_experts: token width d, each routed expert's hidden width h,
                and E (ints >= 1).
            k: slots per token (top-k) of the default router; must equal
                ``router.slots_per_token`` when a router is given.
            activation: ``"swiglu"`` (default) or ``"gelu"``, for routed and shared experts.
            bias: biases in the expert projections.
            num_shared_experts: always-on experts run on every token (DeepSeek / Qwen-MoE); they
                are one ``DenseFFN`` of hidden width ``num_shared_experts * shared_hidden``.
            shared_hidden: hidden width of each shared expert (default ``d_hidden``).
            shared_expert_gate: scale the shared output by ``sigmoid(x @ w)``, ``w [d, 1]``
                (Qwen2-MoE's ``shared_expert_gate``; a :class:`GatedSharedExperts`).
            router: the router (default ``Supervisor(d_model, num_experts, k, **router_kw)``);
                its ``slots_per_token``, ``num_experts`` and ``d_model`` (when it has one) must
                match. ``router_kw``: further ``Supervisor`` arguments (``strategy=``,
                ``load_balance_coef=``, ...), only without ``router``.
            report_top_tokens: r of the draft reports, ``None`` for none.
            layout, init_std, recompute_activation, inplace_backward, dtype, device: of the
                ``ExpertBank`` (see ``moe_framework.experts``); ``inplace_backward``, ``init_std``
                and ``dtype`` / ``device`` apply to the shared experts too.
            checkpoint_experts: wrap the experts in :class:`CheckpointedExperts` (recompute
                them in backward; the router is never recomputed).

        Parameters are created in a fixed order (router, routed experts, shared experts, shared
        gate), so a seeded build gives the same weights every time.
        """
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"MoELayer.build: {name} must be an int >= 1, got {v!r}")
        if not _is_int(k) or not 1 <= k <= num_experts:
            raise ValueError(
                f"MoELayer.build: k must be an int in [1, num_experts={num_experts}], got {k!r}"
            )
        _check_report_top_tokens("MoELayer.build", report_top_tokens)
        _check_build_options(
            activation=activation,
            num_shared_experts=num_shared_experts,
            shared_hidden=shared_hidden,
            bias=bias,
            shared_expert_gate=shared_expert_gate,
            recompute_activation=recompute_activation,
            inplace_backward=inplace_backward,
            checkpoint_experts=checkpoint_experts,
        )
        if router is None:
            router = Supervisor(d_model, num_experts, k, **router_kw)
            router.to(device=device, dtype=dtype)
        elif router_kw:
            raise ValueError(
                "MoELayer.build: router arguments "
                f"{sorted(router_kw)} configure the default Supervisor and cannot go with "
                "router=...; set them on the router you pass"
            )
        else:
            _check_router(router, d_model, num_experts, k)
        kw = dict(init_std=init_std, inplace_backward=inplace_backward, dtype=dtype, device=device)
        experts: nn.Module = ExpertBank(
            d_model=d_model,
            d_hidden=d_hidden,
            num_experts=num_experts,
            activation=activation,
            bias=bias,
            layout=layout,
            recompute_activation=recompute_activation,
            **kw,
        )
        if checkpoint_experts:
            experts = CheckpointedExperts(experts)
        shared: Optional[nn.Module] = None
        if num_shared_experts > 0:
            hidden = num_shared_experts * (shared_hidden or d_hidden)
            shared = DenseFFN(
                d_model=d_model, d_hidden=hidden, activation=activation, bias=bias, **kw
            )
            if shared_expert_gate:
                gate = nn.Linear(d_model, 1, bias=False, dtype=dtype, device=device)
                shared = GatedSharedExperts(shared, gate)
        return cls(router, experts, None, shared, report_top_tokens=report_top_tokens)

    @property
    def router(self) -> nn.Module:
        """The router (registered as ``supervisor``, the name in state dicts)."""
        return self.supervisor

    def routing_stats(self) -> dict:
        """The router's accumulated routing telemetry as a plain dict (see
        :class:`~moe_framework.metrics.RoutingStats`). A ``Supervisor`` needs
        ``track_stats=True`` (``MoEConfig(track_stats=True)`` in a system): otherwise it raises a
        ``RuntimeError`` saying so, instead of zeros that would call every expert dead."""
        return self._router_protocol.routing_stats()

    def reset_stats(self) -> None:
        """Clear the router's accumulated routing telemetry."""
        self._router_protocol.reset_stats()

    @property
    def _router_protocol(self) -> Router:
        # The router module seen through its Router members (for the type checker).
        return cast(Router, self.supervisor)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        *,
        context: Optional[torch.Tensor] = None,
    ):
        """x ``[..., d]`` -> ``(y [..., d], RoutingInfo)``.

        mask: optional bool ``[...]`` (x's shape without d), True for real tokens; padding tokens
        are routed nowhere (their routed output is 0), use no capacity and are left out of the
        balancing losses and telemetry. For x ``[B, S, d]`` the router also gets ``seq_len=S``
        (per-sequence load balancing).
        context: optional ``[..., c]`` (x's shape without d, then the context width) for a
        context-aware router (``ContextRouter``), passed as ``context=`` ``[T, c]``.
        """
        if self.d_model is not None and x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer: x must have last dimension d_model={self.d_model}, got {tuple(x.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MoELayer: mask must have shape {tuple(x.shape[:-1])} (x without its last "
                f"dimension), got {tuple(mask.shape)}"
            )
        x2 = x.reshape(-1, x.shape[-1])
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        flat_mask = None if mask is None else mask.reshape(-1)
        # Named ranges (profiler traces, RunMetrics stage times; nothing under torch.compile).
        with stage("routing"):
            if context is None:
                decision = self.router(x2, flat_mask, seq_len=seq_len)
            else:
                if tuple(context.shape[:-1]) != tuple(x.shape[:-1]):
                    raise ValueError(
                        f"MoELayer: context must have shape {tuple(x.shape[:-1])} + "
                        f"(context_dim,), got {tuple(context.shape)}"
                    )
                ctx2 = context.reshape(-1, context.shape[-1])
                decision = self.router(x2, flat_mask, seq_len=seq_len, context=ctx2)
        with stage("dispatch"):
            x_sorted, offsets, ctx = self.dispatcher.dispatch(x2, decision)
        with stage("experts"):
            y_sorted = self.experts(x_sorted, offsets)
        # A dispatcher whose y_sorted is not this rank's own slots (expert parallel) also hands
        # back those slots' outputs in the local layout, for the draft reports: `combine_rows`.
        combine_rows = getattr(self.dispatcher, "combine_rows", None)
        with stage("combine"):
            if combine_rows is None:
                y = self.dispatcher.combine(y_sorted, ctx)
                rows, row_offsets = y_sorted, offsets
            else:
                y, rows, row_offsets = combine_rows(y_sorted, ctx)
        if self.shared_experts is not None:
            with stage("experts"):
                y = y + self.shared_experts(x2)
        reports = None
        if self.report_top_tokens is not None:
            reports = draft_reports(
                rows, ctx.row_of_slot, row_offsets, decision.weights, self.report_top_tokens
            )
        info = RoutingInfo(
            decision.weights,
            decision.ids,
            decision.counts,
            decision.aux_loss,
            decision.stats,
            reports,
        )
        return y.reshape(x.shape), info

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, report_top_tokens={self.report_top_tokens}"


def _agreed_width(*parts) -> Optional[int]:
    """The ``d_model`` the parts that state one agree on (``None`` when none does)."""
    named = zip(("router", "experts", "dispatcher", "shared"), parts)
    widths = [(n, getattr(p, "d_model", None)) for n, p in named if p is not None]
    widths = [(n, w) for n, w in widths if w is not None]
    for name, w in widths[1:]:
        first, want = widths[0]
        if w != want:
            raise ValueError(f"MoELayer: {name}.d_model={w!r} must equal {first}.d_model={want!r}")
    return widths[0][1] if widths else None


def _check_report_top_tokens(owner: str, r) -> None:
    if r is not None and (not _is_int(r) or r < 0):
        raise ValueError(
            f"{owner}: report_top_tokens must be None (no draft reports) or an int >= 0, got {r!r}"
        )


def _check_build_options(
    *, activation, num_shared_experts, shared_hidden, shared_expert_gate, **flags
) -> None:
    # A bool flag given as a string ("no") would be truthy: only real bools are accepted.
    for name, v in dict(flags, shared_expert_gate=shared_expert_gate).items():
        if not isinstance(v, bool):
            raise ValueError(f"MoELayer.build: {name} must be a bool, got {v!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"MoELayer.build: activation must be one of {ACTIVATIONS}, got {activation!r}"
        )
    if not _is_int(num_shared_experts) or num_shared_experts < 0:
        raise ValueError(
            f"MoELayer.build: num_shared_experts must be an int >= 0, got {num_shared_experts!r}"
        )
    if shared_hidden is not None and (not _is_int(shared_hidden) or shared_hidden < 1):
        raise ValueError(
            f"MoELayer.build: shared_hidden must be None or an int >= 1, got {shared_hidden!r}"
        )
    if shared_expert_gate and num_shared_experts == 0:
        raise ValueError(
            "MoELayer.build: shared_expert_gate=True needs num_shared_experts >= 1, got 0"
        )
