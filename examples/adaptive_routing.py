"""Adaptive routing in one script (docs/adaptive_routing.md): the router kinds, overflow
re-routing with a dynamic capacity, the memory-bank router refreshed by the librarian, sparse
expert attention, and the training-step options.

    python examples/adaptive_routing.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

from moe_framework import MoELayer
from moe_framework.kg import KnowledgeGraph
from moe_framework.librarian import Librarian
from moe_framework.routing import MemoryBankRouter, OverflowRouter, TopKRouter, make_router
from moe_framework.sparse_attention import SparseExpertAttention
from moe_framework.training_options import (
    TrainingOptions,
    apply_training_options,
    expert_diversity_loss,
    parameter_groups,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    d, E, k, T = 32, 8, 2, 256
    x = torch.randn(T, d)

    # 1. router kinds: MLP gate, context-aware gate, dense soft routing
    for kind, kw in (("mlp", {}), ("context", {"context_dim": 4}), ("dense", {})):
        router = make_router(kind, d, E, k, **kw)
        layer = MoELayer.build(d_model=d, d_hidden=32, num_experts=E,
                               k=router.slots_per_token, router=router)  # fmt: skip
        context = torch.randn(T, 4) if kind == "context" else None
        y, info = layer(x, context=context)
        print(f"{kind:8s} slots/token={router.slots_per_token} y={tuple(y.shape)}")

    # 2. capacity 1.0: drops with the router's own capacity, fewer with re-routing
    skewed = x + 2.0 * torch.randn(1, d)  # every token leans the same way
    plain = TopKRouter(d, E, k, capacity_factor=1.0)
    inner = TopKRouter(d, E, k)
    inner.load_state_dict(plain.state_dict())
    rerouted = OverflowRouter(inner, 1.0, dynamic=True)
    a, b = plain(skewed), rerouted(skewed)
    print(f"capacity 1.0: dropped {int(a.stats['dropped'])} slots; with re-routing "
          f"{int(b.stats['dropped_before_reroute'])} overflowed, {int(b.stats['rerouted'])} "
          f"re-routed, {int(b.stats['dropped'])} dropped")  # fmt: skip

    # 3. memory-bank router: train, file centroids with the librarian, route with the memory
    with tempfile.TemporaryDirectory() as tmp:
        graph = KnowledgeGraph.create(os.path.join(tmp, "memory.sqlite"), dim=d)
        librarian = Librarian(graph, node_type="routing_memory")
        router = MemoryBankRouter(d, E, k, memory_k=4)
        layer = MoELayer.build(d_model=d, d_hidden=32, num_experts=E, k=k, router=router)
        opts = TrainingOptions(router_lr_mult=0.5, router_dropout=0.1, expert_dropout=0.1,
                               diversity_loss_coef=0.1)  # fmt: skip
        apply_training_options(layer, opts)
        opt = torch.optim.AdamW(parameter_groups(layer, 1e-2, opts))
        target = torch.tanh(x @ torch.randn(d, d))
        for step in range(args.steps):
            layer.train()
            y, info = layer(x)
            loss = F.mse_loss(y, target) + info.aux_loss
            loss = loss + opts.diversity_loss_coef * expert_diversity_loss(layer)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 10 == 0:  # between steps, off the hot path
                summary = router.refresh_memory(librarian, layer=0, step=step + 1)
                print(f"step {step + 1}: loss {float(loss.detach()):.4f}, memory: filed "
                      f"{summary.filed}, {len(router.memory)} rows")  # fmt: skip
        layer.eval()
        with torch.no_grad():
            prior, _, found = router.retrieve(x)
            first = layer(x)[1].ids[:, 0].long()
        agree = float(((prior.argmax(1) == first) & found).float().mean())
        print(f"routing agrees with the memory's vote for {agree:.0%} of the tokens")
        graph.close()

    # 4. sparse expert attention: k of E query/output experts per token, shared K/V
    attn = SparseExpertAttention(d, E, k, head_dim=8)
    y, dec = attn(torch.randn(2, 16, d))
    print(f"SparseExpertAttention y={tuple(y.shape)} experts of token 0: {dec.ids[0].tolist()}")


if __name__ == "__main__":
    main()
