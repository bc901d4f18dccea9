"""Dense (soft) routing: every token goes to every expert, weighted by the softmax of its logits."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import bad, is_int
from .common import BaseRouter, Selection
from .counts import expert_counts

__all__ = ["DenseRouter"]


class DenseRouter(BaseRouter):
    """All E experts per token with weights ``softmax(logits)``: a soft mixture (the original
    mixture of experts of Jacobs et al.), no selection and so no routing discontinuity.

    Each token has ``slots_per_token = num_experts`` slots (slot ``j`` is expert ``j``), so the
    experts run ``T * E`` rows: the compute of a dense layer E times as wide. Useful as the upper
    bound a sparse router is measured against, and for small E.

    Args:
        d_model, num_experts: sizes.
        k: None or ``num_experts`` (the slots are all experts).
        **options: the arguments of :class:`~moe_framework.routing.common.BaseRouter` except
            ``capacity_factor`` (there is nothing to drop).

    State: ``gate.weight`` [E, d_model].
    """

    strategy = "dense"

    def __init__(self, d_model: int, num_experts: int, k: Optional[int] = None, **options):
        if k is not None and (not is_int(k) or k != num_experts):
            bad(type(self).__name__, "k", f"None or num_experts={num_experts!r}", k)
        if options.get("capacity_factor") is not None:
            bad(type(self).__name__, "capacity_factor", "None (dense routing drops nothing)",
                options["capacity_factor"])  # fmt: skip
        super().__init__(d_model, num_experts, num_experts, **options)

    def _decide(self, x, logits, mask) -> Selection:
        T, E = logits.shape
        weights = torch.softmax(logits, dim=-1)
        ids = torch.arange(E, dtype=torch.int32, device=logits.device).expand(T, E)
        if mask is not None:
            keep = mask[:, None]
            ids = torch.where(keep, ids, torch.full_like(ids, -1))
            weights = torch.where(keep, weights, torch.zeros_like(weights))
        counts = expert_counts(ids, E)
        dropped = torch.zeros((), dtype=torch.int64, device=logits.device)
        return Selection(weights, ids.contiguous(), ids, counts, dropped)
