"""Slots per expert of a routing decision."""

from __future__ import annotations

import torch

__all__ = ["expert_counts"]


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert: ids ``[T, k]`` int (-1 = empty slot, ignored) -> counts ``[E]`` int32.

    A bincount with the empty slots sent to an extra bin, so there is no host sync and no
    data-dependent shape.
    """
    flat = ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    bins = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    bins = bins.scatter_add(0, key, torch.ones_like(key))
    return bins[:num_experts].to(torch.int32)
