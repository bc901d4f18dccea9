"""Routing telemetry: per-layer accumulators on the device, read only when asked.

:class:`RoutingStats` adds each routing decision into small device buffers (tokens per expert,
dropped slots, router entropy, balancing losses) with no host sync, so it can stay on inside a
compiled or CUDA-graph-captured training step. :meth:`RoutingStats.routing_stats` reads them once
and derives the load statistics (utilisation, coefficient of variation, Gini, max/mean, dead
experts). :func:`specialisation` relates routing to token labels (domain, class).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["RoutingStats", "Specialisation", "specialisation", "load_summary"]

_LOSSES = ("load_loss", "z_loss", "aux_loss")


def load_summary(load) -> dict:
    """Balance statistics of a per-expert load vector (list or 1-D tensor of counts).

    Returns ``cv`` (population std / mean), ``gini`` (0 = equal, (E-1)/E = one expert takes
    everything), ``max_over_mean``, ``dead_experts`` (ids with zero load) and ``utilisation``
    (each expert's load divided by the uniform share, 1.0 = balanced). Zero total load gives
    zeros (and every expert dead).
    """
    x = torch.as_tensor(load, dtype=torch.float64).reshape(-1).cpu()
    E = x.numel()
    total = float(x.sum()) if E else 0.0
    dead = [i for i, v in enumerate(x.tolist()) if v == 0]
    if E == 0 or total == 0:
        return {
            "cv": 0.0,
            "gini": 0.0,
            "max_over_mean": 0.0,
            "dead_experts": dead,
            "utilisation": [0.0] * E,
        }
    mean = total / E
    cv = float(x.std(unbiased=False)) / mean
    xs = torch.sort(x).values
    i = torch.arange(1, E + 1, dtype=torch.float64)
    gini = float(((2 * i - E - 1) * xs).sum()) / (E * total)
    return {
        "cv": cv,
        "gini": gini,
        "max_over_mean": float(x.max()) / mean,
        "dead_experts": dead,
        "utilisation": (x / mean).tolist(),
    }


class RoutingStats(nn.Module):
    """Accumulates routing telemetry of one layer on the device.

    Buffers (not persistent: telemetry is not model state): ``tokens_per_expert`` [E] int64,
    ``steps``, ``tokens`` (real tokens seen), ``routed`` and ``dropped`` slots (0-dim int64),
    ``entropy_sum`` (float64, nats summed over tokens), and a sum plus a count per balancing loss.
    Optionally ``label_counts`` [num_labels, E] for the specialisation analysis.
    """

    # Buffers, declared for type checkers (register_buffer creates them in __init__).
    tokens_per_expert: torch.Tensor
    steps: torch.Tensor
    tokens: torch.Tensor
    routed: torch.Tensor
    dropped: torch.Tensor
    entropy_sum: torch.Tensor
    entropy_tokens: torch.Tensor
    aux_loss_sum: torch.Tensor
    aux_loss_steps: torch.Tensor
    label_counts: torch.Tensor

    def __init__(self, num_experts: int, num_labels: Optional[int] = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"RoutingStats: num_experts must be >= 1, got {num_experts}")
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"RoutingStats: num_labels must be None or >= 1, got {num_labels}")
        self.num_experts = num_experts
        self.num_labels = num_labels
        z64 = torch.zeros((), dtype=torch.int64)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64), False
        )
        for name in ("steps", "tokens", "routed", "dropped"):
            self.register_buffer(name, z64.clone(), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), False)
        self.register_buffer("entropy_tokens", z64.clone(), persistent=False)
        for name in _LOSSES:
            self.register_buffer(f"{name}_sum", torch.zeros((), dtype=torch.float64), False)
            self.register_buffer(f"{name}_steps", z64.clone(), persistent=False)
        if num_labels is not None:
            self.register_buffer(
                "label_counts", torch.zeros(num_labels, num_experts, dtype=torch.int64), False
            )

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) would cast the float64 accumulators too and lose the sums:
        # they follow the device, never the dtype.
        keep = {
            n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float64
        }
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            assert new is not None
            if new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def update(self, decision, mask: Optional[torch.Tensor] = None, labels=None) -> None:
        """Add one :class:`~moe_framework.supervisor.RoutingDecision` (no host sync).

        Reads ``decision.counts``; from ``decision.stats``: "dropped", "tokens", "entropy_sum",
        "load_loss", "z_loss" when present (else the entropy is computed from
        ``softmax(decision.logits)`` over the tokens of ``mask``). ``aux_loss`` is recorded when
        any balancing loss is present. labels: optional [T] int64 (-1 = unlabelled) for
        ``label_counts`` (needs ``num_labels``).
        """
        st = decision.stats
        T = decision.ids.shape[0]
        self.tokens_per_expert.add_(decision.counts.to(torch.int64))
        self.steps.add_(1)
        self.routed.add_(decision.counts.to(torch.int64).sum())
        if "tokens" in st:
            self.tokens.add_(st["tokens"].to(torch.int64))
        elif mask is not None:
            self.tokens.add_(mask.to(torch.int64).sum())
        else:
            self.tokens.add_(T)
        if "dropped" in st:
            self.dropped.add_(st["dropped"].to(torch.int64))
        if "entropy_sum" in st:
            self.entropy_sum.add_(st["entropy_sum"].to(torch.float64))
            self.entropy_tokens.add_(st["tokens"].to(torch.int64) if "tokens" in st else T)
        else:
            p = torch.softmax(decision.logits.detach().float(), dim=-1)
            ent = -(p * torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
            if mask is not None:
                ent = ent * mask.to(ent.dtype)
                self.entropy_tokens.add_(mask.to(torch.int64).sum())
            else:
                self.entropy_tokens.add_(T)
            self.entropy_sum.add_(ent.sum().to(torch.float64))
        has_loss = False
        for name in ("load_loss", "z_loss"):
            if name in st:
                has_loss = True
                getattr(self, f"{name}_sum").add_(st[name].detach().to(torch.float64))
                getattr(self, f"{name}_steps").add_(1)
        if has_loss:
            self.aux_loss_sum.add_(decision.aux_loss.detach().to(torch.float64))
            self.aux_loss_steps.add_(1)
        if labels is not None:
            if self.num_labels is None:
                raise ValueError("RoutingStats.update: labels given but num_labels is None")
            self.label_counts.add_(
                specialisation_counts(decision.ids, labels, self.num_experts, self.num_labels)
            )

    def routing_stats(self) -> dict:
        """Everything accumulated since the last reset as a plain dict of Python numbers.

        Keys: steps, tokens, tokens_per_expert (list), load_fraction (list), utilisation (list,
        load / uniform share), cv, gini, max_over_mean, dead_experts (list of ids),
        num_dead_experts, routed, dropped, drop_rate (dropped / (routed + dropped)), entropy (mean
        nats per token), normalized_entropy (entropy / ln E), and the mean per step of load_loss,
        z_loss and aux_loss (None when never computed). With labels: the specialisation dict
        under "specialisation".
        """
        tpe = self.tokens_per_expert.tolist()
        total = sum(tpe)
        out: dict = {
            "steps": int(self.steps),
            "tokens": int(self.tokens),
            "tokens_per_expert": tpe,
            "load_fraction": [v / total if total else 0.0 for v in tpe],
        }
        out.update(load_summary(tpe))
        out["num_dead_experts"] = len(out["dead_experts"])
        routed, dropped = int(self.routed), int(self.dropped)
        out["routed"] = routed
        out["dropped"] = dropped
        out["drop_rate"] = dropped / (routed + dropped) if routed + dropped else 0.0
        n_ent = int(self.entropy_tokens)
        ent = float(self.entropy_sum) / n_ent if n_ent else 0.0
        out["entropy"] = ent
        out["normalized_entropy"] = (
            ent / math.log(self.num_experts) if self.num_experts > 1 else 0.0
        )
        for name in _LOSSES:
            n = int(getattr(self, f"{name}_steps"))
            out[name] = float(getattr(self, f"{name}_sum")) / n if n else None
        if self.num_labels is not None:
            out["specialisation"] = _specialisation_from_counts(self.label_counts).as_dict()
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every accumulator."""
        for buf in self.buffers():
            buf.zero_()


class Specialisation(NamedTuple):
    """Routing versus token labels (all device tensors).

    counts:         [L, E] int64 slots of label-l tokens routed to expert e.
    distribution:   [L, E] float32 routing distribution of each label (rows sum to 1, 0 if unseen).
    dominant_label: [E] int64 label with most of expert e's slots (-1 for an unused expert).
    dominant_share: [E] float32 fraction of expert e's slots that carry its dominant label.
    """

    counts: torch.Tensor
    distribution: torch.Tensor
    dominant_label: torch.Tensor
    dominant_share: torch.Tensor

    def as_dict(self) -> dict:
        """Plain Python lists (reads the device)."""
        return {k: v.tolist() for k, v in self._asdict().items()}


def specialisation_counts(
    ids: torch.Tensor, labels: torch.Tensor, num_experts: int, num_labels: int
) -> torch.Tensor:
    """[L, E] int64 slot counts per (label, expert); ids -1 and labels outside [0, L) ignored."""
    T, k = ids.shape
    lab = labels.reshape(T, 1).to(torch.int64).expand(T, k).reshape(-1)
    e = ids.reshape(-1).to(torch.int64)
    ok = (e >= 0) & (e < num_experts) & (lab >= 0) & (lab < num_labels)
    # Invalid pairs go to an extra bin that is sliced away: no boolean indexing, no host sync.
    flat = torch.where(ok, lab * num_experts + e, torch.full_like(e, num_labels * num_experts))
    bins = torch.zeros(num_labels * num_experts + 1, dtype=torch.int64, device=ids.device)
    bins = bins.scatter_add(0, flat, torch.ones_like(flat))
    return bins[:-1].reshape(num_labels, num_experts)


def _specialisation_from_counts(counts: torch.Tensor) -> Specialisation:
    c = counts.to(torch.float32)
    per_label = c.sum(1, keepdim=True)
    dist = torch.where(per_label > 0, c / per_label.clamp_min(1.0), torch.zeros_like(c))
    per_expert = c.sum(0)
    top, arg = c.max(0)
    used = per_expert > 0
    dom = torch.where(used, arg, torch.full_like(arg, -1))
    share = torch.where(used, top / per_expert.clamp_min(1.0), torch.zeros_like(top))
    return Specialisation(counts, dist, dom, share)


def specialisation(
    ids: torch.Tensor, labels: torch.Tensor, num_experts: int, num_labels: int
) -> Specialisation:
    """Specialisation analysis of one batch (or of concatenated batches).

    ids: [T, k] int expert ids (-1 = empty slot). labels: [T] int label of each token (-1 =
    unlabelled). Returns a :class:`Specialisation`: the routing distribution per label and each
    expert's dominant label with its share. Ties between labels go to the lower label id.
    """
    if ids.dim() != 2 or labels.reshape(-1).shape[0] != ids.shape[0]:
        raise ValueError(
            f"specialisation: ids must be [T, k] and labels [T], got {tuple(ids.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return _specialisation_from_counts(specialisation_counts(ids, labels, num_experts, num_labels))
