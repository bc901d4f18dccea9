"""``MoELayer`` (the "constellation"): supervisor -> permute -> experts -> unpermute, plus draft
reports.

One forward pass, all static shapes and no host sync (``torch.compile(fullgraph=True)`` and CUDA
graph capture work in training and inference)::

    x [..., d] -> x2 [T, d]
    decision = supervisor(x2)                          weights [T,k] f32, ids [T,k] i32 (-1 = dropped)
    x_sorted, row_of_slot, offsets = ops.permute(x2, ids, E)      [T*k, d], [T*k], [E+1]
    y_sorted = experts(x_sorted, offsets)              two ops.grouped_gemm, rows offsets[E]: are 0
    y = ops.unpermute(y_sorted, row_of_slot, weights)  fixed-order weighted sum, no atomics
    y += shared(x2)  (optionally * sigmoid(shared_gate(x2)), as Qwen2-MoE's shared_expert_gate)

Dropless: every token keeps its k slots, so the only data-dependent quantities are the per-expert
``offsets``, which stay on the device and are read by the grouped GEMM kernel itself.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import ops
from .experts import ACTIVATIONS, DenseFFN, ExpertBank, expert_of_row
from .supervisor import RoutingDecision, Supervisor

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
    aux_loss: 0-dim float32 balancing loss of the supervisor (add it to the training loss).
    stats:   the supervisor's dict of statistics.
    reports: :class:`DraftReports`, or ``None`` when the layer was built with ``reports=False``.
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
        row_of_slot: ``[T*k]`` int64 from ``ops.permute``.
        offsets: ``[E+1]`` int64 from ``ops.permute``.
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
    sums = torch.ops.moe_framework.grouped_gemm_wgrad.default(ones, y_sorted, offsets, False)
    wsums = torch.ops.moe_framework.grouped_gemm_wgrad.default(
        ones.float(), w_sorted.unsqueeze(1), offsets, False
    )
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


def _check_supervisor(supervisor: nn.Module, d_model: int, num_experts: int, k: int) -> None:
    """A given supervisor must route this layer's tokens: checked at construction, so a mismatch
    is not found only by the first forward."""
    spt = getattr(supervisor, "slots_per_token", None)
    if spt != k:
        raise ValueError(f"MoELayer: k={k} must equal supervisor.slots_per_token, got {spt!r}")
    # Routers that do not say (plain user modules) are trusted; those that do must agree.
    for name, want in (("num_experts", num_experts), ("d_model", d_model)):
        got = getattr(supervisor, name, want)
        if got != want:
            raise ValueError(
                f"MoELayer: supervisor.{name} must equal the layer's {name}={want}, got {got!r}"
            )


class MoELayer(nn.Module):
    """Dropless Mixture-of-Experts feed-forward layer.

    Args:
        d_model: token width d.
        d_hidden: hidden width h of each routed expert.
        num_experts: E routed experts.
        k: slots per token (top-k) of the default supervisor; must equal
            ``supervisor.slots_per_token`` when a supervisor is given.
        activation: ``"swiglu"`` (default) or ``"gelu"``, for routed and shared experts.
        bias: biases in the expert projections.
        num_shared_experts: always-on experts run on every token (DeepSeek / Qwen-MoE); they are
            one dense FFN of hidden width ``num_shared_experts * shared_hidden``.
        shared_hidden: hidden width of each shared expert (default ``d_hidden``).
        shared_expert_gate: scale the shared output by ``sigmoid(x @ w)``, ``w [d, 1]``
            (Qwen2-MoE's ``shared_expert_gate``).
        supervisor: the router (default ``Supervisor(d_model, num_experts, k)``): any module
            returning a :class:`~moe_framework.supervisor.RoutingDecision` with a static
            ``slots_per_token``.
        report_top_tokens: r, token indices kept per expert in the draft reports.
        reports: compute :class:`DraftReports` (set False to skip their small cost).
        layout, init_std, recompute_activation, inplace_backward, dtype, device: of the
            :class:`ExpertBank` (see ``moe_framework.experts``); ``inplace_backward`` also applies
            to the shared experts.

    ``forward(x [..., d]) -> (y [..., d], RoutingInfo)``. ``y`` has the dtype of ``x``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 2,
        *,
        activation: str = "swiglu",
        bias: bool = False,
        num_shared_experts: int = 0,
        shared_hidden: Optional[int] = None,
        shared_expert_gate: bool = False,
        supervisor: Optional[nn.Module] = None,
        report_top_tokens: int = 4,
        reports: bool = True,
        layout: str = "in_out",
        init_std: Optional[float] = None,
        recompute_activation: bool = True,
        inplace_backward: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"MoELayer: {name} must be an int >= 1, got {v!r}")
        if not _is_int(k) or not 1 <= k <= num_experts:
            raise ValueError(
                f"MoELayer: k must be an int in [1, num_experts={num_experts}], got {k!r}"
            )
        # A bool flag given as a string ("no") would be truthy: only real bools are accepted.
        for name, v in (
            ("bias", bias),
            ("shared_expert_gate", shared_expert_gate),
            ("reports", reports),
            ("recompute_activation", recompute_activation),
            ("inplace_backward", inplace_backward),
        ):
            if not isinstance(v, bool):
                raise ValueError(f"MoELayer: {name} must be a bool, got {v!r}")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"MoELayer: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if not _is_int(num_shared_experts) or num_shared_experts < 0:
            raise ValueError(
                f"MoELayer: num_shared_experts must be an int >= 0, got {num_shared_experts!r}"
            )
        if shared_hidden is not None and (not _is_int(shared_hidden) or shared_hidden < 1):
            raise ValueError(
                f"MoELayer: shared_hidden must be None or an int >= 1, got {shared_hidden!r}"
            )
        if shared_expert_gate and num_shared_experts == 0:
            raise ValueError(
                "MoELayer: shared_expert_gate=True needs num_shared_experts >= 1, got 0"
            )
        if not _is_int(report_top_tokens) or report_top_tokens < 0:
            raise ValueError(
                f"MoELayer: report_top_tokens must be an int >= 0, got {report_top_tokens!r}"
            )
        if supervisor is None:
            supervisor = Supervisor(d_model, num_experts, k)
            supervisor.to(device=device, dtype=dtype)
        else:
            _check_supervisor(supervisor, d_model, num_experts, k)
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.report_top_tokens = report_top_tokens
        self.reports = reports
        self.supervisor = supervisor
        self.experts = ExpertBank(
            num_experts,
            d_model,
            d_hidden,
            activation,
            bias,
            layout=layout,
            init_std=init_std,
            recompute_activation=recompute_activation,
            inplace_backward=inplace_backward,
            dtype=dtype,
            device=device,
        )
        self.shared_experts = None
        self.shared_gate = None
        if num_shared_experts > 0:
            self.shared_experts = DenseFFN(
                d_model,
                num_shared_experts * (shared_hidden or d_hidden),
                activation,
                bias,
                init_std=init_std,
                inplace_backward=inplace_backward,
                dtype=dtype,
                device=device,
            )
            if shared_expert_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False, dtype=dtype, device=device)

    # The three stages are methods so that adapters (integrations.transformers) can reuse the
    # pipeline with other parameter containers.
    def _route(
        self, x2: torch.Tensor, mask: Optional[torch.Tensor], seq_len: Optional[int]
    ) -> RoutingDecision:
        if isinstance(self.supervisor, Supervisor):
            return self.supervisor(x2, mask, seq_len=seq_len)
        # a user-supplied router only has to accept the tokens (and a mask when one is given)
        return self.supervisor(x2) if mask is None else self.supervisor(x2, mask)

    def routing_stats(self) -> dict:
        """The supervisor's accumulated routing telemetry as a plain dict (reads the device
        buffers once; see :class:`~moe_framework.metrics.RoutingStats`). Needs a supervisor built
        with ``track_stats=True`` (``MoEConfig(track_stats=True)`` in a system): otherwise a
        ``RuntimeError`` says so, instead of zeros that would call every expert dead."""
        if not hasattr(self.supervisor, "routing_stats"):
            raise ValueError(
                "MoELayer.routing_stats: the supervisor does not track statistics (it has no "
                "routing_stats(); use a Supervisor(..., track_stats=True))"
            )
        return self.supervisor.routing_stats()

    def reset_stats(self) -> None:
        """Clear the supervisor's accumulated routing telemetry."""
        if hasattr(self.supervisor, "reset_stats"):
            self.supervisor.reset_stats()

    def _run_experts(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.experts(x_sorted, offsets)

    def _shared(self, x2: torch.Tensor) -> Optional[torch.Tensor]:
        if self.shared_experts is None:
            return None
        out = self.shared_experts(x2)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x2)) * out
        return out

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """x ``[..., d]`` -> ``(y [..., d], RoutingInfo)``.

        mask: optional bool ``[...]`` (x's shape without d), True for real tokens; padding tokens
        are routed nowhere (their routed output is 0), use no capacity and are left out of the
        balancing losses and telemetry. For x ``[B, S, d]`` the supervisor also gets
        ``seq_len=S`` (per-sequence load balancing).
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer: x must have last dimension d_model={self.d_model}, got {tuple(x.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MoELayer: mask must have shape {tuple(x.shape[:-1])} (x without its last "
                f"dimension), got {tuple(mask.shape)}"
            )
        x2 = x.reshape(-1, self.d_model)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        decision = self._route(x2, None if mask is None else mask.reshape(-1), seq_len)
        x_sorted, row_of_slot, offsets = ops.permute(x2, decision.ids, self.num_experts)
        y_sorted = self._run_experts(x_sorted, offsets)
        y = ops.unpermute(y_sorted, row_of_slot, decision.weights)
        shared = self._shared(x2)
        if shared is not None:
            y = y + shared
        reports = None
        if self.reports:
            reports = draft_reports(
                y_sorted, row_of_slot, offsets, decision.weights, self.report_top_tokens
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
