"""``AllToAllDispatcher``: the expert-parallel :class:`~moe_framework.dispatch.TokenDispatcher`.

Rank ``r`` of an expert-parallel group of ``ep`` ranks owns the global experts
``r*E/ep ... (r+1)*E/ep - 1`` (``E_l = E/ep`` of them). One forward::

    x [T, d], decision (global expert ids)
    local permute by global expert (ops.permute)       -> rows grouped by owning rank
    all_to_all_single (autograd)                       -> the rows of MY experts, from every rank
    regroup by local expert                            -> x_sorted, offsets [E_l + 1]
    experts(x_sorted, offsets)                         (the rank's own ExpertBank slice)
    ungroup, all_to_all_single back, ops.unpermute     -> y [T, d], the usual ordered combine

Two modes:

``"dropless"``
    Every routed slot is sent. The per-expert counts are exchanged first (one all-to-all of
    ``E`` integers); the split sizes of the token all-to-all must then reach the host (one
    device->host copy per forward), so the shapes depend on the data: no CUDA graph capture, and
    ``torch.compile`` breaks the graph there.
``"capacity"``
    Each expert takes at most ``C = expert_capacity(T, k, E, capacity_factor)`` slots of each
    source rank, first come first served in token order (:func:`~moe_framework.routing.capacity.
    apply_capacity`, exactly the single-process rule on the rank's own T tokens); every rank sends
    a ``[ep, E_l * C, d]`` buffer. Static shapes, no host synchronisation: the whole layer compiles
    with ``torch.compile(fullgraph=True)`` (tested on gloo), which is what CUDA graph capture needs
    too (capture with NCCL is not tested here: no GPU). Empty buffer rows are computed and thrown
    away (the price of static shapes).

Within an expert the received rows are ordered by source rank, then by token: the order the
single-process layer sees on the concatenation of the ranks' batches, so the forward is bitwise
equal to it (tests/modules/test_expert_parallel.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..dispatch import DispatchContext
from ..experts import expert_of_row
from ..routing.capacity import apply_capacity, expert_capacity
from ..supervisor import RoutingDecision
from ._comm import all_to_all, all_to_all_counts

__all__ = ["AllToAllDispatcher", "EPContext", "MODES"]

MODES = ("dropless", "capacity")


class EPContext(NamedTuple):
    """What :meth:`AllToAllDispatcher.combine` needs (a :class:`DispatchContext` plus more).

    row_of_slot: ``[T*k]`` int64, the row of the LOCAL expert-sorted layout (``ops.permute`` by
        global expert) holding slot ``t*k + j``.
    weights: ``[T, k]`` gate weights of the combine (0 for a slot dropped by capacity).
    offsets: ``[E+1]`` int64, global-expert offsets of that local layout.
    rows_index: dropless: ``[M]`` int64, the received row of each ``x_sorted`` row; capacity: ``[T*k]``
        int64, the send-buffer row of each local-layout row (``E*C`` = the zero row).
    in_splits, out_splits: dropless: the rows sent to / received from each rank (host ints).
    dropped: 0-dim int64, slots dropped by the capacity (0 when dropless).
    """

    row_of_slot: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    rows_index: torch.Tensor
    in_splits: Optional[list[int]]
    out_splits: Optional[list[int]]
    dropped: torch.Tensor


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class AllToAllDispatcher(nn.Module):
    """Token dispatch to the ranks that own the experts, over ``all_to_all_single``.

    Args:
        group: the expert-parallel process group (``ep = group.size()`` ranks), gloo or NCCL.
        num_global_experts: E, the experts of the whole layer (divisible by ``ep``).
        mode: ``"dropless"`` or ``"capacity"`` (see the module docstring).
        capacity_factor: capacity mode only: ``C = ceil(capacity_factor * T * k / E)`` slots per
            expert per source rank (``> 0``).
        capacity_tokens: capacity mode only: the T of that formula (default: the rank's own T).
            Every rank must use the same C (the buffers have static shapes and are not checked
            against each other, which would need a host sync): with equal batches on every rank
            the default does it; ranks with different T (a rank with no tokens) need
            ``capacity_tokens`` set to the same value everywhere.

    ``num_experts`` is ``E_l = E / ep``, the experts on this rank (what ``offsets`` describes
    and what the rank's experts run); ``expert_offset`` is the first of them.
    """

    def __init__(
        self,
        group,
        num_global_experts: int,
        mode: str = "dropless",
        capacity_factor: Optional[float] = None,
        capacity_tokens: Optional[int] = None,
    ):
        super().__init__()
        if not _is_int(num_global_experts) or num_global_experts < 1:
            raise ValueError(
                f"AllToAllDispatcher: num_global_experts must be an int >= 1, got "
                f"{num_global_experts!r}"
            )
        if mode not in MODES:
            raise ValueError(f"AllToAllDispatcher: mode must be one of {MODES}, got {mode!r}")
        if mode == "capacity":
            if (
                isinstance(capacity_factor, bool)
                or not isinstance(capacity_factor, (int, float))
                or not capacity_factor > 0
            ):
                raise ValueError(
                    "AllToAllDispatcher: mode='capacity' needs capacity_factor, a float > 0, got "
                    f"{capacity_factor!r}"
                )
        elif capacity_factor is not None:
            raise ValueError(
                "AllToAllDispatcher: capacity_factor is for mode='capacity'; got "
                f"capacity_factor={capacity_factor!r} with mode={mode!r}"
            )
        if capacity_tokens is not None and (
            mode != "capacity" or not _is_int(capacity_tokens) or capacity_tokens < 0
        ):
            raise ValueError(
                "AllToAllDispatcher: capacity_tokens must be None or an int >= 0 with "
                f"mode='capacity', got capacity_tokens={capacity_tokens!r} with mode={mode!r}"
            )
        ep = dist.get_world_size(group)
        if num_global_experts % ep != 0:
            raise ValueError(
                f"AllToAllDispatcher: num_global_experts={num_global_experts} must be divisible by "
                f"the expert-parallel size ep={ep}"
            )
        self.group = group
        self.ep = ep
        self.rank = dist.get_rank(group)
        self.num_global_experts = num_global_experts
        self.num_experts = num_global_experts // ep
        self.expert_offset = self.rank * self.num_experts
        self.mode = mode
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.capacity_tokens = capacity_tokens

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(
        self, x: torch.Tensor, decision: RoutingDecision
    ) -> tuple[torch.Tensor, torch.Tensor, EPContext]:
        """``x [T, d]``, ``decision.ids [T, k]`` (global experts) -> ``(x_sorted [M, d], offsets
        [E_l + 1], ctx)``: the rows this rank's experts run, from every rank."""
        if self.mode == "capacity":
            return self._dispatch_capacity(x, decision)
        return self._dispatch_dropless(x, decision)

    def _dispatch_dropless(self, x, decision):
        E, El, ep = self.num_global_experts, self.num_experts, self.ep
        x_perm, row_of_slot, offsets = ops.permute(x, decision.ids, E)
        counts = offsets[1:] - offsets[:-1]
        recv_counts = all_to_all_counts(counts, self.group)
        # The one host sync of dropless mode: the split sizes of the token all-to-all.
        host = torch.cat([counts, recv_counts]).tolist()
        send, recv = host[:E], host[E:]
        in_splits = [sum(send[j * El : (j + 1) * El]) for j in range(ep)]
        out_splits = [sum(recv[s * El : (s + 1) * El]) for s in range(ep)]
        routed, M = sum(in_splits), sum(out_splits)
        x_recv = all_to_all(
            x_perm[:routed].contiguous(), out_splits, in_splits, self.group, "the token all-to-all"
        )
        # Received rows come as (source rank, local expert, token); regroup as (expert, source,
        # token). Block (s, e) starts at starts[s, e] and has c[s, e] rows.
        c = recv_counts.view(ep, El)
        flat = c.reshape(-1)
        starts = (torch.cumsum(flat, 0) - flat).view(ep, El)
        lengths = c.t().reshape(-1)
        block_start = starts.t().reshape(-1)
        out_start = torch.cumsum(lengths, 0) - lengths
        index = torch.repeat_interleave(block_start - out_start, lengths, output_size=M)
        index = index + torch.arange(M, device=x.device, dtype=index.dtype)
        x_sorted = x_recv[index]
        per_expert = c.sum(0)
        local_offsets = torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)])
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        ctx = EPContext(
            row_of_slot, decision.weights, offsets, index, in_splits, out_splits, dropped
        )
        return x_sorted, local_offsets, ctx

    def capacity(self, num_tokens: int, k: int) -> int:
        """C, the slots each expert takes from each source rank for ``num_tokens`` tokens."""
        assert self.capacity_factor is not None
        if self.capacity_tokens is not None:
            num_tokens = self.capacity_tokens
        return expert_capacity(num_tokens, k, self.num_global_experts, self.capacity_factor)

    def _dispatch_capacity(self, x, decision):
        E, El, ep = self.num_global_experts, self.num_experts, self.ep
        T, k = decision.ids.shape
        C = self.capacity(T, k)
        kept = apply_capacity(decision.weights, decision.ids, E, C)
        x_perm, row_of_slot, offsets = ops.permute(x, kept.ids, E)
        # Local-layout row r (expert e, rank p = r - offsets[e] inside it) <-> buffer row e*C + p;
        # rows of dropped slots (r >= offsets[E]) <-> the zero row E*C.
        TK = x_perm.shape[0]
        rows = torch.arange(TK, device=x.device, dtype=torch.int64)
        e_of_row = expert_of_row(offsets, TK)
        routed = e_of_row < E
        start = offsets[e_of_row.clamp(max=E - 1)]
        slot_row = torch.where(routed, e_of_row * C + rows - start, torch.full_like(rows, E * C))
        # Buffer row b = e*C + p reads local row offsets[e] + p when p < count[e], else zero.
        b = torch.arange(E * C, device=x.device, dtype=torch.int64)
        e_b = torch.div(b, C, rounding_mode="floor") if C > 0 else b
        count = offsets[1:] - offsets[:-1]
        src = torch.where(b - e_b * C < count[e_b], offsets[e_b] + b - e_b * C, TK)
        x_pad = torch.cat([x_perm, x_perm.new_zeros(1, x_perm.shape[1])])
        send = x_pad[src]
        recv = all_to_all(send, None, None, self.group, "the token all-to-all")
        d = x.shape[1]
        x_sorted = recv.view(ep, El, C, d).transpose(0, 1).reshape(El * ep * C, d)
        local_offsets = torch.arange(El + 1, device=x.device, dtype=torch.int64) * (ep * C)
        ctx = EPContext(row_of_slot, kept.weights, offsets, slot_row, None, None, kept.dropped)
        return x_sorted, local_offsets, ctx

    # -- combine -------------------------------------------------------------------------------

    def combine(self, y_sorted: torch.Tensor, ctx: EPContext) -> torch.Tensor:
        """``y_sorted [M, d]`` (this rank's expert outputs) -> ``y [T, d]`` of this rank's
        tokens, gate-weighted (``ops.unpermute``: fixed order, no atomics)."""
        return self.combine_rows(y_sorted, ctx)[0]

    def combine_rows(
        self, y_sorted: torch.Tensor, ctx: EPContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`combine`, also returning the expert outputs of this rank's slots in the local
        layout (``[T*k, d]``) and its global offsets ``[E+1]``: what ``MoELayer``'s draft reports
        read (the optional dispatcher method ``combine_rows``)."""
        TK = ctx.row_of_slot.shape[0]
        d = y_sorted.shape[1]
        if self.mode == "capacity":
            El, ep = self.num_experts, self.ep
            C = y_sorted.shape[0] // max(1, El * ep)
            send = y_sorted.view(El, ep, C, d).transpose(0, 1).reshape(ep * El * C, d)
            back = all_to_all(send, None, None, self.group, "the return all-to-all")
            back = torch.cat([back, back.new_zeros(1, d)])
            y_rows = back[ctx.rows_index]
        else:
            assert ctx.in_splits is not None and ctx.out_splits is not None
            M = y_sorted.shape[0]
            inverse = torch.empty_like(ctx.rows_index).scatter_(
                0,
                ctx.rows_index,
                torch.arange(M, device=ctx.rows_index.device, dtype=ctx.rows_index.dtype),
            )
            back = all_to_all(
                y_sorted[inverse],
                ctx.in_splits,
                ctx.out_splits,
                self.group,
                "the return all-to-all",
            )
            y_rows = torch.cat([back, back.new_zeros(TK - back.shape[0], d)])
        y = ops.unpermute(y_rows, ctx.row_of_slot, ctx.weights)
        return y, y_rows, ctx.offsets

    def extra_repr(self) -> str:
        cf = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}"
        return (
            f"ep={self.ep}, rank={self.rank}, num_global_experts={self.num_global_experts}, "
            f"experts={self.expert_offset}..{self.expert_offset + self.num_experts - 1}, "
            f"mode={self.mode!r}{cf}"
        )


def local_context(ctx: EPContext) -> DispatchContext:
    """The plain :class:`DispatchContext` view of an :class:`EPContext`."""
    return DispatchContext(ctx.row_of_slot, ctx.weights)
