"""Opt-in expert capacity: at most C slots per expert, first come first served in token order."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import ops

__all__ = ["CapacityResult", "expert_capacity", "apply_capacity"]


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert may take: ``ceil(capacity_factor * T * k / E)``, at most T, at least 0.

    Static for a static T (it only reads shapes), so buffers sized by it are CUDA-graph safe.
    """
    cap = math.ceil(capacity_factor * num_tokens * k / num_experts)
    return max(0, min(cap, num_tokens))


class CapacityResult(NamedTuple):
    """Output of :func:`apply_capacity` (all [T, k] except ``dropped``).

    weights:  float, 0 where the slot overflowed.
    ids:      int32, -1 where the slot overflowed (or was already -1).
    position: int64 position of the slot inside its expert's buffer (its rank among the slots routed
              to that expert, in token order); -1 for dropped/empty slots.
    dropped:  0-dim int64, number of slots that had an expert but overflowed its capacity.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    position: torch.Tensor
    dropped: torch.Tensor


def apply_capacity(
    weights: torch.Tensor, ids: torch.Tensor, num_experts: int, capacity: int
) -> CapacityResult:
    """Keep at most ``capacity`` slots per expert, first come first served in token order.

    Slots are ranked in the flattened token-major order ``s = t*k + j`` (the order ``ops.permute``
    uses): the stable counting sort of ``ops.permute`` (run on a zero-width ``[T, 0]`` input, so
    nothing but the order is computed) gives each slot its row ``row_of_slot[s]`` in the
    expert-sorted layout, and ``position = row_of_slot[s] - offsets[expert]``: no [T*k, E] one-hot,
    no comparison sort (torch's stable int64 CPU sort is ~300x slower), no host sync. Slots at
    position >= capacity get id -1 and weight 0 and are counted in ``dropped``.

    weights [T, k] float, ids [T, k] int (-1 = already empty) -> :class:`CapacityResult`.
    """
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    empty = torch.empty(T, 0, dtype=torch.float32, device=ids.device)
    _, row_of_slot, offsets = ops.permute(empty, ids, num_experts)
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    position = row_of_slot - offsets[key]
    routed = flat >= 0
    keep = routed & (position < capacity)
    dropped = (routed & ~keep).sum()
    new_ids = torch.where(keep, flat, torch.full_like(flat, -1)).to(torch.int32).reshape(T, k)
    new_w = torch.where(keep.reshape(T, k), weights, torch.zeros_like(weights))
    position = torch.where(keep, position, torch.full_like(position, -1)).reshape(T, k)
    return CapacityResult(new_w, new_ids, position, dropped)
