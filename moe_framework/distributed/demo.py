"""``python -m moe_framework demo --ep N``: the digits demo's MoE, trained expert-parallel.

Launched by ``torchrun --nproc-per-node N -m moe_framework demo --ep N`` (``--ep 1`` runs the
same loop in one process, without torch.distributed: the reference the expert-parallel run
matches). Every rank reads the same data and takes a contiguous 1/N of each global batch; the
loss of a rank is its share of the global batch's loss (``sum over its rows / global batch``)
plus its balancing losses divided by N, gradients are made global by
:func:`~moe_framework.distributed.reduce_gradients` (``"sum"``), clipped with the global norm,
and the aux-loss-free bias update uses the global loads. Differences to ``demo`` (single
process): no dense baseline, no plots, and dropout is off (dropout masks of a split batch cannot
equal those of the whole batch; with it off, the only difference between the runs is the
balancing losses computed per rank and the order of floating-point sums).

Rank 0 is the knowledge graph's only writer: the draft reports are gathered to it once per
epoch (:func:`~moe_framework.distributed.training.gather_reports`); the other ranks then query
the store read-only. At the end the model is saved as a DCP checkpoint and exported (rank 0) to
the single-process ``MixtureOfExpertsSystem.load`` format.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["run_ep_demo"]


def run_ep_demo(
    ep: int,
    out_dir: str = os.path.join("outputs", "demo_ep"),
    epochs: Optional[int] = None,
    tiny: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    threads: Optional[int] = 1,
    mode: str = "dropless",
) -> dict:
    """Train the demo's MoE at expert-parallel size ``ep``; returns (rank 0 writes it as
    ``summary.json``) the per-epoch losses and the test accuracy."""
    from ..demo import demo_config, load_digits_split
    from ..system import MixtureOfExpertsSystem
    from . import checkpoint
    from .launch import init_distributed
    from .sharding import reduce_gradients, update_bias
    from .training import clip_grad_norm_, expert_parallel_system, gather_reports

    if threads is not None:
        torch.set_num_threads(threads)
    rank, world = 0, 1
    if ep > 1 or "RANK" in os.environ:
        rank, world = init_distributed()
    if world != ep:
        raise ValueError(
            f"demo --ep {ep}: the launch has {world} processes; start it with "
            f"torchrun --nproc-per-node {ep} -m moe_framework demo --ep {ep}"
        )
    epochs = epochs if epochs is not None else (2 if tiny else 30)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, tiny)
    steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
    cfg = demo_config(out_dir, tiny, steps_per_epoch, seed)
    cfg.dropout = 0.0
    kg_path = cfg.kg_path
    if rank != 0:
        cfg.kg_path = None  # only rank 0 opens the store for writing
    elif kg_path is not None and os.path.exists(kg_path):
        from ..demo import _clear_store

        _clear_store(kg_path)
    os.makedirs(out_dir, exist_ok=True)
    moe = MixtureOfExpertsSystem(cfg)
    if ep > 1:
        expert_parallel_system(moe, None, mode=mode)
    opt = torch.optim.AdamW(moe.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _epoch in range(epochs):
        total = torch.zeros((), dtype=torch.float64)
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i : i + batch_size]
            mine = torch.tensor_split(idx, ep)[rank]
            moe.train()
            opt.zero_grad(set_to_none=True)
            out = moe(x_tr[mine])
            task = F.cross_entropy(out.output, y_tr[mine], reduction="sum") / len(idx)
            loss = task + out.aux_loss / ep
            loss.backward()
            if ep > 1:
                reduce_gradients(moe, loss_scaling="sum")
                norm_clip = clip_grad_norm_
            else:
                norm_clip = None
            if cfg.grad_clip_norm is not None:
                if norm_clip is not None:
                    norm_clip(moe, cfg.grad_clip_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(moe.parameters(), cfg.grad_clip_norm)
            opt.step()
            if cfg.bias_update_rate > 0:
                if ep > 1:
                    update_bias(moe)
                else:
                    for r in moe.routers():
                        r.update_bias()
            moe.step += 1
            t = task.detach().double()
            if ep > 1:
                dist.all_reduce(t)
            total += t
        if ep > 1:
            gather_reports(moe, writer=0)
        if rank == 0 and cfg.kg_path is not None:
            moe.consolidate()
        losses.append(float(total) / steps_per_epoch)
        if rank == 0:
            print(f"epoch {_epoch + 1}/{epochs}: train loss {losses[-1]:.5f}", flush=True)

    moe.eval()
    moe.collect_reports = False
    with torch.no_grad():
        n = len(x_te)
        mine = torch.tensor_split(torch.arange(n), ep)[rank]
        correct = (moe(x_te[mine]).output.argmax(-1) == y_te[mine]).sum().double()
        if ep > 1:
            dist.all_reduce(correct)
    acc = float(correct) / n
    summary = {
        "ep": ep,
        "mode": mode,
        "epochs": epochs,
        "train_loss_per_epoch": losses,
        "test_accuracy": acc,
    }
    ckpt = os.path.join(out_dir, "checkpoint")
    checkpoint.save(moe, ckpt)
    if ep > 1:
        dist.barrier()
    if rank == 0:
        if moe.config.kg_path is not None:
            moe.close()
        export_cfg = demo_config(out_dir, tiny, steps_per_epoch, seed)
        export_cfg.dropout = 0.0
        checkpoint.export_system(export_cfg, ckpt, os.path.join(out_dir, "model"))
        summary["knowledge_graph"] = kg_path
        summary["seconds"] = time.perf_counter() - t_start
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"test accuracy {acc:.4f}; wrote {out_dir}", flush=True)
    if ep > 1:
        dist.barrier()
        if rank != 0 and kg_path is not None:
            from .training import open_readonly_graph

            kg = open_readonly_graph(kg_path)
            print(f"rank {rank}: the knowledge graph has {len(kg)} nodes (read-only)", flush=True)
            kg.close()
        dist.barrier()
        dist.destroy_process_group()
    return summary
