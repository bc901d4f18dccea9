"""Supervisor forward time per strategy and the cost of capacity, balancing losses and telemetry.

Baseline in the same run: the plain-PyTorch Mixtral router (linear gate, softmax, top-k,
renormalise; what transformers' MixtralSparseMoeBlock does) on the same inputs and weights.

    python -m moe_framework.benchmarks.bench_supervisor [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import functools

import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.supervisor import Supervisor


def mixtral_router(x, weight, k):
    logits = torch.nn.functional.linear(x, weight)
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def main():
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    dev = args.device
    T, d, E, k = (512, 256, 16, 2) if args.quick else (4096, 1024, 64, 8)
    threads = common.thread_counts(args.threads)[-1]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev)

    configs: list[tuple[str, dict]] = [
        ("topk", {}),
        ("topk", {"capacity_factor": 1.25}),
        ("topk", {"load_balance_coef": 1e-2, "z_loss_coef": 1e-3}),
        ("topk", {"track_stats": True}),
        ("topk", {"bias_update_rate": 1e-3}),
        ("topk_then_softmax", {}),
        ("noisy_topk", {}),
        ("grouped_sigmoid", {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}),
        ("expert_choice", {}),
        ("attention", {"attention_dim": 128}),
    ]
    rows = []
    base = Supervisor(d, E, k).to(dev)
    with torch.no_grad():
        t_base = common.timeit(
            lambda: mixtral_router(x, base.gate.weight, k), device=dev, warmup=3, min_time=1.0
        )
    rows.append({"router": "plain-torch Mixtral (baseline)", "ms": t_base["median_s"] * 1e3})
    for strategy, kw in configs:
        sup = Supervisor(d, E, 1 if strategy == "switch" else k, strategy=strategy, **kw).to(dev)
        sup.train()
        if strategy != "attention":
            sup.gate.weight.data.copy_(base.gate.weight.data)
        with torch.no_grad():
            t = common.timeit(functools.partial(sup, x), device=dev, warmup=3, min_time=1.0)
        name = strategy + ("" if not kw else " " + ",".join(f"{a}={b}" for a, b in kw.items()))
        rows.append(
            {
                "router": name,
                "ms": t["median_s"] * 1e3,
                "vs baseline": t["median_s"] / t_base["median_s"],
            }
        )
    title = f"Supervisor forward (training mode, no grad), T={T} d={d} E={E} k={k}, {dev}"
    common.print_table(rows, ["router", "ms", "vs baseline"], title=title)
    common.write_json(
        "supervisor",
        {"machine": common.machine_info(dev), "shape": [T, d, E, k], "rows": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
