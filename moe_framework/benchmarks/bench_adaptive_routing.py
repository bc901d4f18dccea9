"""Adaptive routing on the digits demo task, next to the plain MoELayer, in one run.

Part 1, the memory-bank router (issue 17 item 4): the demo's ``MixtureOfExpertsSystem``
(``demo_config``: 2 layers x 8 SwiGLU experts, top-2) trained as the demo trains it, once with its
default top-k routers and once with each layer's router replaced by a
:class:`~moe_framework.routing.MemoryBankRouter` whose memory (one knowledge graph per layer) the
librarian refreshes after every epoch. Reported: test accuracy, and the routing agreement with the
graph: the share of test tokens whose first expert is the one their nearest memory rows vote for
(memory rebuilt the same way for both models from a pass over the training set).

Part 2, the router kinds and training options (item 6): a one-MoE-layer digits classifier
(embed -> x + MoELayer(LN(x)) -> LN -> head) with the plain top-k ``MoELayer`` and each
alternative: MLP gate, context-aware gate (context: the image's 8 row sums), dense soft routing,
capacity 1.0 with drops vs overflow re-routing vs dynamic capacity (drop counts before / after),
and the training-step options (router/expert dropout, diversity loss, router LR x0.5).
Reported: test accuracy, train ms/step, inference tokens/s, slots dropped per step, expert
diversity (mean squared cosine between experts' weights).

    python -m moe_framework.benchmarks.bench_adaptive_routing [--quick] [--epochs N]
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

import moe_framework  # noqa: F401
from moe_framework import MoELayer
from moe_framework.benchmarks import common
from moe_framework.demo import demo_config, load_digits_split
from moe_framework.kg import KnowledgeGraph
from moe_framework.librarian import Librarian
from moe_framework.routing import (
    ContextRouter,
    DenseRouter,
    MemoryBankRouter,
    MLPRouter,
    OverflowRouter,
    TopKRouter,
)
from moe_framework.system import MixtureOfExpertsSystem
from moe_framework.training_options import (
    TrainingOptions,
    apply_training_options,
    expert_diversity_loss,
    parameter_groups,
)


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


# ============================================================== part 1: memory bank on the demo


def _router_inputs(model: MixtureOfExpertsSystem, x: torch.Tensor):
    """The input of each layer's router and its first choice, for ``x`` (eval, no grad)."""
    seen: list = []
    hooks = [
        r.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].detach()))
        for r in model.routers()
    ]
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, [info.ids[:, 0].long() for info in out.routing]


def agreement_with_memory(model, x_tr, x_te, tmp: str, tag: str) -> list:
    """Per layer: the share of test tokens whose first expert is the one their memory_k=8
    nearest memory rows vote for; the memory: the centroids of the training tokens of each
    first-choice expert, filed by a Librarian into a fresh graph."""
    ins_tr, first_tr = _router_inputs(model, x_tr)
    ins_te, first_te = _router_inputs(model, x_te)
    E = model.config.num_experts
    out = []
    for layer, (xi, fi, xt, ft) in enumerate(zip(ins_tr, first_tr, ins_te, first_te)):
        probe = MemoryBankRouter(xi.shape[1], E, 2)
        onehot = F.one_hot(fi, E).float()
        probe.centroid_sum.copy_(onehot.t() @ xi.float())
        probe.centroid_count.copy_(onehot.sum(0))
        g = KnowledgeGraph.create(os.path.join(tmp, f"probe_{tag}_{layer}.sqlite"), dim=xi.shape[1])
        probe.refresh_memory(Librarian(g, node_type="routing_memory"), layer=layer)
        with torch.no_grad():
            prior, _, found = probe.retrieve(xt)
        out.append(float(((prior.argmax(1) == ft) & found).float().mean()))
        g.close()
    return out


def run_memory_bank(args, tmp: str) -> list:
    seed = args.seed
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, False)
    batch = 64
    steps_per_epoch = (len(x_tr) + batch - 1) // batch
    epochs = args.epochs or (2 if args.quick else 20)
    rows = []
    for variant in ("top-k (demo default)", "memory bank"):
        torch.manual_seed(seed)
        out_dir = os.path.join(tmp, variant.split()[0])
        os.makedirs(out_dir, exist_ok=True)
        cfg = demo_config(out_dir, False, steps_per_epoch, seed)
        model = MixtureOfExpertsSystem(cfg)
        libs = []
        if variant == "memory bank":
            for layer, block in enumerate(model._blocks()):
                old = cast(Any, block.moe.supervisor)
                new = MemoryBankRouter(cfg.d_model, cfg.num_experts, cfg.k,
                                       load_balance_coef=cfg.load_balance_coef,
                                       z_loss_coef=cfg.z_loss_coef)  # fmt: skip
                new.gate.weight.data.copy_(old.gate.weight.data)
                block.moe.supervisor = new
                g = KnowledgeGraph.create(
                    os.path.join(tmp, f"memory_{layer}.sqlite"), dim=cfg.d_model
                )
                libs.append(Librarian(g, node_type="routing_memory"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        t_train = t_refresh = 0.0
        for _ in range(epochs):
            for idx in _batches(len(x_tr), batch, gen):
                t0 = time.perf_counter()
                model.training_step((x_tr[idx], y_tr[idx]), opt)
                t_train += time.perf_counter() - t0
            t0 = time.perf_counter()
            for layer, (router, lib) in enumerate(zip(model.routers(), libs)):
                router.refresh_memory(lib, layer=layer, step=model.step)
            t_refresh += time.perf_counter() - t0
        model.eval()
        model.collect_reports = False
        with torch.no_grad():
            out = model(x_te)
        acc = float((out.output.argmax(-1) == y_te).float().mean())
        agree = agreement_with_memory(model, x_tr, x_te, tmp, variant.split()[0])
        row = {
            "routing": variant,
            "test acc": acc,
            "agreement L0": agree[0],
            "agreement L1": agree[1],
            "train ms/step": 1e3 * t_train / (epochs * steps_per_epoch),
            "refresh ms/epoch": 1e3 * t_refresh / epochs,
        }
        if libs:
            live = []
            ins, firsts = _router_inputs(model, x_te)
            for router, xi, fi in zip(model.routers(), ins, firsts):
                with torch.no_grad():
                    prior, _, found = router.retrieve(xi)
                live.append(float(((prior.argmax(1) == fi) & found).float().mean()))
            row["live-memory agreement"] = sum(live) / len(live)
            row["memory nodes"] = sum(len(list(lib.graph.iter_nodes())) for lib in libs)
            for lib in libs:
                lib.graph.close()
        model.close()
        rows.append(row)
    return rows


# ============================================================== part 2: router kinds, options


class DigitsMoE(nn.Module):
    def __init__(self, router: nn.Module, d: int = 64, E: int = 8, k: int = 2):
        super().__init__()
        self.embed = nn.Linear(64, d)
        self.norm1 = nn.LayerNorm(d)
        self.moe = MoELayer.build(d_model=d, d_hidden=64, num_experts=E, k=k, router=router)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x, context=None):
        h = self.embed(x)
        y, info = self.moe(self.norm1(h), context=context)
        return self.head(self.norm2(h + y)), info


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 8, 8).sum(-1) / 8.0


def run_router_kinds(args) -> list:
    seed = args.seed
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, False)
    d, E, k, batch = 64, 8, 2, 64
    epochs = args.epochs or (1 if args.quick else 10)
    lb: dict[str, Any] = dict(load_balance_coef=1e-2)
    opts = TrainingOptions(router_lr_mult=0.5, router_dropout=0.1, expert_dropout=0.1,
                           diversity_loss_coef=0.1)  # fmt: skip
    variants = [
        ("top-k (plain MoELayer)", lambda: TopKRouter(d, E, k, **lb), None),
        ("MLP gate", lambda: MLPRouter(d, E, k, **lb), None),
        ("context gate (row sums)", lambda: ContextRouter(d, E, k, context_dim=8, **lb), None),
        ("dense soft (all 8)", lambda: DenseRouter(d, E, **lb), None),
        ("top-k capacity 1.0 (drop)", lambda: TopKRouter(d, E, k, capacity_factor=1.0, **lb), None),
        ("capacity 1.0 + re-route", lambda: OverflowRouter(TopKRouter(d, E, k, **lb), 1.0), None),
        ("dynamic capacity + re-route",
         lambda: OverflowRouter(TopKRouter(d, E, k, **lb), 1.0, dynamic=True,
                                min_capacity_factor=0.75, max_capacity_factor=2.0), None),
        ("top-k + training options", lambda: TopKRouter(d, E, k, **lb), opts),
    ]  # fmt: skip
    rows = []
    for name, make, options in variants:
        torch.manual_seed(seed)
        router = make()
        model = DigitsMoE(router, d, E, cast(Any, router).slots_per_token)
        use_ctx = isinstance(router, ContextRouter)
        options = options or TrainingOptions()
        apply_training_options(model, options)
        opt = torch.optim.AdamW(parameter_groups(model, 3e-3, options), weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        steps, t_train = 0, 0.0
        dropped_before = dropped_after = 0
        for _ in range(epochs):
            for idx in _batches(len(x_tr), batch, gen):
                xb, yb = x_tr[idx], y_tr[idx]
                t0 = time.perf_counter()
                model.train()
                logits, info = model(xb, _row_sums(xb) if use_ctx else None)
                loss = F.cross_entropy(logits, yb) + info.aux_loss
                if options.diversity_loss_coef > 0:
                    loss = loss + options.diversity_loss_coef * expert_diversity_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                t_train += time.perf_counter() - t0
                steps += 1
                dropped_after += int(info.stats["dropped"])
                dropped_before += int(
                    info.stats.get("dropped_before_reroute", info.stats["dropped"])
                )
        model.eval()
        ctx_te = _row_sums(x_te) if use_ctx else None
        with torch.no_grad():
            logits, info = model(x_te, ctx_te)
            t = common.timeit(functools.partial(model, x_te, ctx_te), warmup=2, min_time=0.3)
            similarity = float(expert_diversity_loss(model))
        counts = info.counts.float()
        rows.append({
            "routing": name,
            "test acc": float((logits.argmax(-1) == y_te).float().mean()),
            "train ms/step": 1e3 * t_train / steps,
            "infer tok/s": len(x_te) / t["median_s"],
            "dropped/step before": dropped_before / steps,
            "dropped/step after": dropped_after / steps,
            "load cv (test)": float(counts.std() / counts.mean().clamp(min=1e-9)),
            "expert sim": similarity,
        })  # fmt: skip
    return rows


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs of each training run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=["all", "memory", "routers"], default="all")
    args = p.parse_args()
    # One thread by default (as the demo): the matrices are 64 wide, too small for a thread pool,
    # and on a shared machine spinning workers cost far more than they give.
    threads = common.thread_counts(args.threads or [1])[-1]
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    payload: dict = {"machine": common.machine_info("cpu"), "loadavg_start": load_start,
                     "threads": threads, "epochs": args.epochs}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "memory"):
            rows = run_memory_bank(args, tmp)
            cols = ["routing", "test acc", "agreement L0", "agreement L1",
                    "live-memory agreement", "memory nodes", "train ms/step", "refresh ms/epoch"]  # fmt: skip
            common.print_table(rows, cols, title="Memory-bank routing on the digits demo system")
            payload["memory_bank"] = rows
        if args.part in ("all", "routers"):
            rows = run_router_kinds(args)
            common.print_table(rows, title="Router kinds and training options, digits, 1 MoE layer")
            payload["router_kinds"] = rows
    payload["loadavg_end"] = os.getloadavg()
    print(f"load average: start {load_start[0]:.2f}, end {payload['loadavg_end'][0]:.2f}")
    common.write_json("adaptive_routing", payload, args.out)


if __name__ == "__main__":
    main()
