"""Sliding-window per-expert statistics on the device, and routing drift between windows.

:class:`ExpertWindowStats` keeps the last ``window`` steps of each expert's load, summed gate
weight, output norm and the dropped slots in ring buffers on the device: :meth:`update` is a few
``index_copy_`` calls with no host sync (it may run inside a compiled or captured step);
:meth:`summary` reads them once, off the hot path. :func:`js_divergence` / :func:`kl_divergence`
compare the routing distributions of two windows; :class:`DriftDetector` turns that into a
trigger.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from ..metrics import load_summary

__all__ = ["ExpertWindowStats", "DriftDetector", "kl_divergence", "js_divergence"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class ExpertWindowStats(nn.Module):
    """Per-expert statistics of the last ``window`` steps (device ring buffers).

    Args:
        num_experts: E.
        window: W, the steps kept (an int >= 1).

    Buffers (not persistent; telemetry, not model state): ``load`` [W, E] float32 slots per
    expert, ``gate_sum`` [W, E] summed gate weight, ``out_norm`` [W, E] L2 norm of the expert's
    mean output (from the layer's draft reports; 0 without them), ``dropped`` [W] slots dropped by
    capacity, ``pos`` (next row) and ``filled`` (rows written, at most W), 0-dim int64; with
    ``d_model``, ``mean_output`` [E, d]: each expert's mean output as a moving average (weight
    1/W per step in which the expert had tokens), what output-similarity merges compare.
    """

    load: torch.Tensor
    gate_sum: torch.Tensor
    out_norm: torch.Tensor
    dropped: torch.Tensor
    pos: torch.Tensor
    filled: torch.Tensor
    mean_output: torch.Tensor

    def __init__(
        self, num_experts: int, window: int = 50, device=None, d_model: Optional[int] = None
    ):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("window", window)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"ExpertWindowStats: {name} must be an int >= 1, got {v!r}")
        self.num_experts = int(num_experts)
        self.window = int(window)
        W, E = self.window, self.num_experts
        for name in ("load", "gate_sum", "out_norm"):
            self.register_buffer(name, torch.zeros(W, E, device=device), persistent=False)
        self.register_buffer("dropped", torch.zeros(W, device=device), persistent=False)
        for name in ("pos", "filled"):
            self.register_buffer(
                name, torch.zeros((), dtype=torch.int64, device=device), persistent=False
            )
        if d_model is not None and (not _is_int(d_model) or d_model < 1):
            raise ValueError(
                f"ExpertWindowStats: d_model must be None or an int >= 1, got {d_model!r}"
            )
        self.d_model = d_model
        # With d_model: each expert's mean output, an exponential moving average over about a
        # window (weight 1/window per step with tokens): what output-similarity merges compare.
        self.register_buffer(
            "mean_output", torch.zeros(E, d_model or 0, device=device), persistent=False
        )

    @torch.no_grad()
    def update(self, info) -> None:
        """Add one step: ``info`` is the layer's :class:`~moe_framework.moe_layer.RoutingInfo`
        (``ids``, ``weights``, ``counts``, ``stats["dropped"]``, ``reports``). No host sync."""
        E = self.num_experts
        if info.counts.shape[0] != E:
            raise ValueError(
                f"ExpertWindowStats.update: counts must be [num_experts={E}], got "
                f"{tuple(info.counts.shape)}"
            )
        ids = info.ids.reshape(-1).long()
        key = torch.where(ids < 0, torch.full_like(ids, E), ids)
        w = info.weights.reshape(-1).float()
        gate = torch.zeros(E + 1, device=w.device).scatter_add(0, key, w)[:E]
        norm = torch.zeros(E, device=w.device)
        reports = getattr(info, "reports", None)
        if reports is not None:
            mo = reports.mean_output.float()
            norm = mo.norm(dim=1)
            if self.d_model is not None and mo.shape[1] == self.d_model:
                a = 1.0 / self.window
                seen = (info.counts > 0).unsqueeze(1)
                ema = (1 - a) * self.mean_output + a * mo
                self.mean_output.copy_(torch.where(seen, ema, self.mean_output))
        drop = info.stats.get("dropped") if isinstance(info.stats, dict) else None
        drop = torch.zeros((), device=w.device) if drop is None else drop.float()
        idx = self.pos.view(1)
        self.load.index_copy_(0, idx, info.counts.float().view(1, E))
        self.gate_sum.index_copy_(0, idx, gate.view(1, E))
        self.out_norm.index_copy_(0, idx, norm.view(1, E))
        self.dropped.index_copy_(0, idx, drop.view(1))
        self.pos.copy_((self.pos + 1) % self.window)
        self.filled.copy_(torch.clamp(self.filled + 1, max=self.window))

    @torch.no_grad()
    def reset(self, num_experts: Optional[int] = None) -> None:
        """Clear the window (and resize it to ``num_experts`` when given)."""
        if num_experts is not None and num_experts != self.num_experts:
            if not _is_int(num_experts) or num_experts < 1:
                raise ValueError(
                    f"ExpertWindowStats.reset: num_experts must be an int >= 1, got {num_experts!r}"
                )
            self.num_experts = int(num_experts)
            for name in ("load", "gate_sum", "out_norm"):
                setattr(self, name, self.load.new_zeros(self.window, self.num_experts))
            self.mean_output = self.load.new_zeros(self.num_experts, self.d_model or 0)
        for buf in self.buffers():
            buf.zero_()

    def summary(self) -> dict:
        """The window as plain Python numbers (reads the device once).

        Keys: ``steps`` (rows filled), ``load`` (slots per expert over the window, list),
        ``load_fraction``, ``mean_gate`` (mean gate weight of each expert's slots, 0 when
        unused), ``output_norm`` (mean over the window), ``dropped`` (total), and the balance
        statistics of :func:`~moe_framework.metrics.load_summary` (``cv``, ``gini``,
        ``max_over_mean``, ``dead_experts``, ``utilisation``).
        """
        n = int(self.filled)
        if n == 0:
            zeros = [0.0] * self.num_experts
            out = {"steps": 0, "load": zeros, "load_fraction": zeros, "mean_gate": zeros}
            out.update({"output_norm": zeros, "dropped": 0.0})
            out.update(load_summary(zeros))
            return out
        load = self.load.sum(0)
        total = float(load.sum())
        gate = self.gate_sum.sum(0)
        out = {
            "steps": n,
            "load": load.tolist(),
            "load_fraction": (load / total).tolist() if total > 0 else [0.0] * len(load),
            "mean_gate": torch.where(load > 0, gate / load.clamp_min(1.0), 0.0).tolist(),
            "output_norm": (self.out_norm.sum(0) / n).tolist(),
            "dropped": float(self.dropped.sum()),
        }
        out.update(load_summary(load))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, window={self.window}"


def _distribution(p) -> torch.Tensor:
    t = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    s = t.sum()
    if t.numel() == 0 or not bool(torch.all(t >= 0)) or float(s) <= 0:
        raise ValueError(f"expected a non-negative load vector with a positive sum, got {p!r}")
    return t / s


def kl_divergence(p, q, eps: float = 1e-9) -> float:
    """KL(p || q) in nats of two load vectors (normalised here; ``eps`` smooths empty bins)."""
    P, Q = _distribution(p), _distribution(q)
    if P.shape != Q.shape:
        raise ValueError(
            f"kl_divergence: p and q must have the same length, got {P.shape}, {Q.shape}"
        )
    P = (P + eps) / (1 + eps * P.numel())
    Q = (Q + eps) / (1 + eps * Q.numel())
    return float((P * (P / Q).log()).sum())


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in nats (0 .. ln 2) of two load vectors (normalised here)."""
    P, Q = _distribution(p), _distribution(q)
    if P.shape != Q.shape:
        raise ValueError(
            f"js_divergence: p and q must have the same length, got {P.shape}, {Q.shape}"
        )
    M = 0.5 * (P + Q)

    def kl(a: torch.Tensor) -> float:
        nz = a > 0
        return float((a[nz] * (a[nz] / M[nz]).log()).sum())

    return max(0.0, 0.5 * kl(P) + 0.5 * kl(Q))


class DriftDetector:
    """Routing drift between consecutive windows: ``check(load)`` compares the window's load
    distribution with the previous window's (Jensen-Shannon, or KL with ``metric="kl"``) and
    returns True when it exceeds ``threshold`` nats. The first window, and the first after the
    number of experts changed, set the reference and return False."""

    def __init__(self, threshold: float = 0.05, metric: str = "js"):
        if not isinstance(threshold, numbers.Real) or not 0 <= threshold < math.inf:
            raise ValueError(
                f"DriftDetector: threshold must be a finite float >= 0, got {threshold!r}"
            )
        if metric not in ("js", "kl"):
            raise ValueError(f"DriftDetector: metric must be 'js' or 'kl', got {metric!r}")
        self.threshold: float = float(threshold)
        self.metric: str = metric
        self.previous: Optional[list] = None
        self.last_divergence: Optional[float] = None

    def check(self, load) -> bool:
        cur = [float(v) for v in torch.as_tensor(load).reshape(-1).tolist()]
        prev, self.previous = self.previous, cur
        if prev is None or len(prev) != len(cur) or sum(cur) <= 0 or sum(prev) <= 0:
            self.last_divergence = None
            return False
        fn = js_divergence if self.metric == "js" else kl_divergence
        self.last_divergence = fn(prev, cur)
        return self.last_divergence > self.threshold
