"""Expert-parallel training of a :class:`~moe_framework.system.MixtureOfExpertsSystem`.

:func:`expert_parallel_system` shards every MoE layer of a system; :func:`clip_grad_norm_` clips
with the global norm (expert gradients are sharded); :func:`gather_reports` brings every rank's
draft reports to the one rank that writes the knowledge graph (the store stays single-writer);
:func:`open_readonly_graph` lets every other rank query it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ._comm import all_reduce_sum, comm_device
from .sharding import _info, expert_parallel, expert_parameters

__all__ = ["clip_grad_norm_", "expert_parallel_system", "gather_reports", "open_readonly_graph"]


def expert_parallel_system(system: Any, mesh_or_group=None, **kw) -> Any:
    """:func:`~moe_framework.distributed.expert_parallel` on the MoE layer of every block of a
    ``MixtureOfExpertsSystem`` (``kw``: ``mode``, ``capacity_factor``, ...). Returns it."""
    for block in system.blocks:
        expert_parallel(block.moe, mesh_or_group, **kw)
    return system


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole expert-parallel model, after
    :func:`~moe_framework.distributed.reduce_gradients`: dense gradients (identical on every
    rank) count once, expert gradients are summed over the ep group. Same clip coefficient as
    the single-process call (``max_norm / (norm + 1e-6)``, at most 1). Returns the norm."""
    info = _info(model)
    experts = {id(p) for p in expert_parameters(model)}
    dev = comm_device(info.ep_group)
    dense_sq = torch.zeros((), dtype=torch.float64, device=dev)
    expert_sq = torch.zeros((), dtype=torch.float64, device=dev)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().to(dev)
        if id(p) in experts:
            expert_sq += sq
        else:
            dense_sq += sq
    all_reduce_sum(expert_sq, info.ep_group, "the gradient-norm all-reduce")
    norm = torch.sqrt(dense_sq + expert_sq).float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return norm


@torch.no_grad()
def gather_reports(system: Any, writer: int = 0) -> None:
    """Sum every rank's draft-report accumulators into rank ``writer``'s (exact: they are
    token-weighted sums and counts), merge the per-expert top tokens (highest gate weight first;
    a position ``p`` of rank ``r``'s token stream becomes ``p * world + r``), and clear the other
    ranks' accumulators. Call it on every rank; then only ``writer`` runs ``consolidate()``."""
    world, rank = dist.get_world_size(), dist.get_rank()
    for name in ("report_output_sum", "report_confidence_sum", "report_tokens"):
        buf = getattr(system, name)
        dist.reduce(buf, dst=writer)
    w, idx = system.report_top_weight, system.report_top_index
    idx_g = torch.where(idx >= 0, idx * world + rank, idx)
    ws = [torch.empty_like(w) for _ in range(world)]
    ids = [torch.empty_like(idx_g) for _ in range(world)]
    dist.all_gather(ws, w.contiguous())
    dist.all_gather(ids, idx_g.contiguous())
    R = w.shape[-1]
    cand_w, cand_i = torch.cat(ws, -1), torch.cat(ids, -1)
    order = torch.sort(-cand_w, dim=-1, stable=True).indices[..., :R]
    if rank == writer:
        system.report_top_weight.copy_(cand_w.gather(-1, order))
        system.report_top_index.copy_(cand_i.gather(-1, order))
        system.report_seen.mul_(world)
    else:
        system.report_output_sum.zero_()
        system.report_confidence_sum.zero_()
        system.report_tokens.zero_()
        system.report_top_weight.fill_(-1.0)
        system.report_top_index.fill_(-1)
        system.report_seen.zero_()


def open_readonly_graph(path: str, dim: Optional[int] = None):
    """A read-only :class:`~moe_framework.knowledge_graph.KnowledgeGraph` handle for the ranks
    that do not write (queries only; the writer rank keeps the single write handle)."""
    from ..knowledge_graph import KnowledgeGraph

    return KnowledgeGraph(path, dim, readonly=True)
