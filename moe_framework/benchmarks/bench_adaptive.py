"""Adaptive, hierarchical and multimodal MoE next to the plain MoELayer on small tasks built from
packaged data (scikit-learn): quality, balance and speed, every variant trained in the same run.

Task A (sklearn digits as patch tokens: each 8x8 image is 4 tokens of 4x4 pixels): embed ->
MoE block (residual) -> mean pool -> 10 classes. Variants at equal active experts per token:
plain MoELayer E=4 and E=8 (k=2), the adaptive layer (starts at E=4, AdaptationController splits /
merges up to 8), and HierarchicalMoELayer (2 groups, k_g=1, of MoELayers with 4 experts, k=2).

Task B (two modalities: digits patch tokens and breast-cancer tabular features as 4 tokens of 8
features): plain MoELayer E=6 versus MultimodalMoELayer (pools 3 + 2, one shared routed expert,
"restrict" and "bias" routing). Reported per modality: accuracy, and expert purity (the share of
each expert's slots from its dominant modality, with each modality's slots normalised to the same
total and experts weighted by their share: 0.5 = routing ignores the modality, 1 = every expert
serves one modality).

    python -m moe_framework.benchmarks.bench_adaptive [--quick] [--out DIR]

Task C: the adaptation machinery's cost on a mid-size layer (train step plain / adapted / with
the controller; split, merge, snapshot, restore).

Columns: test accuracy, load CV over the test set (population std / mean of slots per expert),
final experts, step_ms (median forward + backward of one 64-sample batch per modality after
training, the adapted layer at its final size), train tokens/s (the whole training loop,
controller included), 1 thread.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from moe_framework import MoELayer
from moe_framework.adaptation import (
    AdaptationController,
    Snapshot,
    make_adaptive,
    merge_experts,
    split_expert,
)
from moe_framework.benchmarks import common
from moe_framework.hierarchical import HierarchicalMoELayer
from moe_framework.metrics import load_summary
from moe_framework.multimodal import MultimodalMoELayer
from moe_framework.routing import TopKRouter

D, H, SEQ = 32, 32, 4


def digits_tokens(seed: int):
    """sklearn digits as [N, 4, 16] patch tokens (four 4x4 quadrants), labels 0-9; 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    patches = img.reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, SEQ, 16)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    lab = torch.tensor(y)
    return patches[tr], lab[tr], patches[te], lab[te]


def cancer_tokens(seed: int):
    """sklearn breast cancer (30 standardised features, zero-padded to 32) as [N, 4, 8] tokens."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    z = torch.tensor((x - mean) / std, dtype=torch.float32)
    z = torch.cat([z, torch.zeros(len(y), 2)], 1).reshape(-1, SEQ, 8)
    lab = torch.tensor(y)
    return z[tr], lab[tr], z[te], lab[te]


class Net(nn.Module):
    """Per-modality token embedding + positions -> LayerNorm -> MoE (residual) -> mean -> head."""

    def __init__(self, moe: nn.Module, in_dims, num_classes: int, multimodal: bool = False):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(i, D) for i in in_dims)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.02)
        self.norm = nn.LayerNorm(D)
        self.moe = moe
        self.head = nn.Linear(D, num_classes)
        self.multimodal = multimodal

    def forward(self, xs, mods):
        h = torch.cat([self.embed[m](x) for m, x in zip(mods, xs)]) + self.pos
        mid = torch.cat([torch.full(x.shape[:2], m, dtype=torch.long) for m, x in zip(mods, xs)])
        z = self.norm(h)
        y, info = self.moe(z, mid) if self.multimodal else self.moe(z)
        return self.head((h + y).mean(1)), info, z, mid


def _counts(info) -> torch.Tensor:
    if hasattr(info, "members"):  # HierarchicalRoutingInfo: the flat member experts
        return torch.cat([i.counts for i in info.members])
    return info.counts


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch] for i in range(0, n, batch)]


def _purity(mod_counts: torch.Tensor) -> float:
    """Expert purity from [M, E] slot counts: each modality's counts are first normalised to sum
    1 (so a larger data set does not count more), then the share of each expert's (normalised)
    slots from its dominant modality, weighted by the expert's share. 1/M for routing that
    ignores the modality, 1 when every expert serves one modality."""
    frac = mod_counts.double() / mod_counts.sum(1, keepdim=True).clamp_min(1).double()
    per_expert = frac.sum(0)
    total = float(per_expert.sum())
    return float(frac.max(0).values.sum() / total) if total else 0.0


def train_eval(
    name: str,
    model: Net,
    data: list,
    epochs: int,
    seed: int,
    controller_kw: Optional[dict] = None,
) -> dict:
    """Train on every modality's train split (mixed batches), evaluate each modality's test split."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ctl = None
    if controller_kw is not None:
        ctl = AdaptationController(model.moe, opt, **controller_kw)
    mods = list(range(len(data)))
    n_tr = [len(d[0]) for d in data]
    steps = max(len(_batches(n, 64, gen)) for n in n_tr)
    tokens = 0
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        orders = [_batches(n, 64, gen) for n in n_tr]
        for s in range(steps):
            idx = [o[s % len(o)] for o in orders]
            xs = [d[0][i] for d, i in zip(data, idx)]
            ys = torch.cat([d[1][i] for d, i in zip(data, idx)])
            logits, info, z, _ = model(xs, mods)
            loss = nn.functional.cross_entropy(logits, ys) + info.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            tokens += sum(x.shape[0] for x in xs) * SEQ
            if ctl is not None:
                ctl.observe(z.detach(), info)
                ctl.step()
    train_s = time.perf_counter() - t0
    # One training step's forward + backward on a fixed batch (median of repeats; the final
    # size of an adapted layer; no optimiser step, no controller).
    xs = [d[0][:64] for d in data]
    ys = torch.cat([d[1][:64] for d in data])

    def fwd_bwd():
        logits, info, _, _ = model(xs, mods)
        (nn.functional.cross_entropy(logits, ys) + info.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    step = common.timeit(fwd_bwd, warmup=3, min_reps=10, min_time=0.5)
    model.eval()
    row: dict = {"variant": name}
    counts = None
    mod_counts = None
    with torch.no_grad():
        for m, d in enumerate(data):
            logits, info, _, mid = model([d[2]], [m])
            acc = float((logits.argmax(1) == d[3]).float().mean())
            row[f"acc_{m}" if len(data) > 1 else "accuracy"] = acc
            c = _counts(info).to(torch.int64)
            counts = c if counts is None else counts + c
            if mod_counts is None:
                mod_counts = torch.zeros(len(data), c.shape[0], dtype=torch.int64)
            mod_counts[m] += c
    assert counts is not None and mod_counts is not None
    row["load_cv"] = load_summary(counts)["cv"]
    row["experts"] = int(counts.shape[0])
    if len(data) > 1:
        row["purity"] = _purity(mod_counts)
    row["step_ms"] = step["median_s"] * 1e3
    row["train_tokens_per_s"] = tokens / train_s
    row["train_s"] = train_s
    if ctl is not None:
        row["events"] = [e["action"] for e in ctl.history]
    return row


def _seeded(seed: int, fn):
    torch.manual_seed(seed)
    return fn()


def task_a(epochs: int, seed: int) -> list:
    data = [digits_tokens(seed)]

    def plain(E):
        return lambda: Net(
            MoELayer.build(d_model=D, d_hidden=H, num_experts=E, k=2, load_balance_coef=0.01),
            [16],
            10,
        )

    def adaptive():
        layer = MoELayer.build(d_model=D, d_hidden=H, num_experts=4, k=2, load_balance_coef=0.01)
        make_adaptive(layer)
        return Net(layer, [16], 10)

    def hierarchical():
        members = [
            MoELayer.build(d_model=D, d_hidden=H, num_experts=4, k=2, load_balance_coef=0.01)
            for _ in range(2)
        ]
        group = TopKRouter(D, 2, 1, load_balance_coef=0.01)
        return Net(HierarchicalMoELayer(group, members), [16], 10)

    steps = (len(data[0][0]) + 63) // 64
    ctl_kw = dict(window=max(2, steps // 2), split_ratio=1.2, merge_ratio=0.1, max_experts=8)
    rows = [
        train_eval("plain MoELayer E=4 k=2", _seeded(seed, plain(4)), data, epochs, seed),
        train_eval("plain MoELayer E=8 k=2", _seeded(seed, plain(8)), data, epochs, seed),
        train_eval("adaptive E=4->max 8 k=2", _seeded(seed, adaptive), data, epochs, seed, ctl_kw),
        train_eval(
            "hierarchical 2x4 (k_g=1, k=2)", _seeded(seed, hierarchical), data, epochs, seed
        ),
    ]
    return rows


def task_b(epochs: int, seed: int) -> list:
    data = [digits_tokens(seed), cancer_tokens(seed)]
    data[1] = (data[1][0], data[1][1] + 10, data[1][2], data[1][3] + 10)  # labels 10, 11

    def plain():
        layer = MoELayer.build(d_model=D, d_hidden=H, num_experts=6, k=2, load_balance_coef=0.01)
        return Net(layer, [16, 8], 12)

    def mm(mode):
        layer = MultimodalMoELayer(
            d_model=D,
            d_hidden=H,
            experts_per_modality=[3, 2],
            num_shared_routed=1,
            k=2,
            mode=mode,
            load_balance_coef=0.01,
        )
        return lambda: Net(layer, [16, 8], 12, multimodal=True)

    return [
        train_eval("plain MoELayer E=6 k=2", _seeded(seed, plain), data, epochs, seed),
        train_eval(
            "multimodal restrict (3+2+1 shared)", _seeded(seed, mm("restrict")), data, epochs, seed
        ),
        train_eval("multimodal bias (3+2+1 shared)", _seeded(seed, mm("bias")), data, epochs, seed),
    ]


def task_c(quick: bool, seed: int) -> list:
    """The adaptation machinery's own cost on a mid-size layer: forward + backward of the plain
    layer, of the adapted layer (AdaptiveRouter sub-routing after one split) and of the same
    layer with the window statistics' ``observe``; and the between-step operations (split, merge,
    snapshot, restore) with AdamW state."""
    d, h, E, T = (128, 256, 8, 512) if quick else (512, 1024, 16, 2048)
    torch.manual_seed(seed)
    layer = MoELayer.build(d_model=d, d_hidden=h, num_experts=E, k=2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(T, d)

    def step(lyr):
        y, info = lyr(x)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return info

    rows = []
    rows.append({"operation": f"train step, plain MoELayer E={E}", **_ms(lambda: step(layer))})
    make_adaptive(layer)
    t0 = time.perf_counter()
    split_expert(layer, 0, tokens=x, optimizer=opt)
    split = {"ms": (time.perf_counter() - t0) * 1e3}
    rows.append(
        {"operation": f"train step, adapted (E={E}+1, sub-routing)", **_ms(lambda: step(layer))}
    )
    ctl = AdaptationController(layer, opt, window=10_000)  # never acts while timed
    rows.append(
        {
            "operation": "train step, adapted + controller.observe/step",
            **_ms(lambda: (ctl.observe(x, step(layer)), ctl.step())),
        }
    )
    rows.append({"operation": "split_expert (once, with AdamW state)", **split})
    t0 = time.perf_counter()
    snap = Snapshot(layer, [opt])
    rows.append({"operation": "Snapshot(layer, [opt])", "ms": (time.perf_counter() - t0) * 1e3})
    t0 = time.perf_counter()
    merge_experts(layer, 0, E, optimizer=opt)
    rows.append({"operation": "merge_experts (once)", "ms": (time.perf_counter() - t0) * 1e3})
    t0 = time.perf_counter()
    snap.restore()
    rows.append({"operation": "Snapshot.restore()", "ms": (time.perf_counter() - t0) * 1e3})
    for r in rows:
        r["shape"] = f"T={T} d={d} h={h}"
    return rows


def _ms(fn) -> dict:
    t = common.timeit(fn, warmup=2, min_reps=5, min_time=0.5)
    return {"ms": t["median_s"] * 1e3}


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = args.epochs or (2 if args.quick else 12)
    load_start = os.getloadavg()
    rows_a = task_a(epochs, args.seed)
    common.print_table(
        rows_a,
        ["variant", "accuracy", "load_cv", "experts", "step_ms", "train_tokens_per_s"],
        title=f"Task A: digits patch tokens, {epochs} epochs",
    )
    for r in rows_a:
        if "events" in r:
            print(f"{r['variant']}: controller events {r['events']}")
    rows_b = task_b(epochs, args.seed)
    common.print_table(
        rows_b,
        ["variant", "acc_0", "acc_1", "load_cv", "purity", "step_ms", "train_tokens_per_s"],
        title=f"Task B: digits (modality 0) + breast cancer (modality 1), {epochs} epochs",
    )
    rows_c = task_c(args.quick, args.seed)
    common.print_table(rows_c, ["operation", "ms", "shape"], title="Task C: adaptation costs")
    load_end = os.getloadavg()
    payload = {
        "machine": common.machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "epochs": epochs,
        "seed": args.seed,
        "quick": args.quick,
        "task_a": rows_a,
        "task_b": rows_b,
        "task_c": rows_c,
    }
    common.write_json("bench_adaptive", payload, args.out)


if __name__ == "__main__":
    main()
