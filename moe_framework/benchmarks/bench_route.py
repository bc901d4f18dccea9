"""ops.route (fused gate) vs the eager PyTorch chain it replaces.

Two gates, in one run:
  * softmax top-2 (Mixtral): softmax -> topk -> renormalise -> bincount;
  * DeepSeek-style sigmoid grouped top-8: sigmoid -> + bias -> group top-2 sums -> topk groups ->
    mask -> topk -> gather -> renormalise -> scale (2.5) -> bincount. n_group = 8, topk_group = 4
    (E = 8: 4 groups of 2, keep 2, k = 4, the most the grouping allows).
The eager chain is written the way Hugging Face's MixtralTopKRouter / DeepseekV3TopkRouter write it
(plus the bincount every MoE layer needs). Logits are fp32 [T, E]; forward only.

A second table times route on tied and non-finite rows at E = 257, 1024, 4096 (softmax top-8, and
the DeepSeek gate where 8 groups divide E): all zeros (a zero-initialised router), all NaN, all
-inf, against random logits of the same shape in the same run ("vs random": the goal is <= 2x).

"GB/s" counts the bytes route must move at least once (read the logits, write weights and ids),
against the measured DRAM triad bandwidth of the same thread count: at these sizes the logits
mostly sit in cache, so a value above 100% is possible and means "compute bound".

    python -m moe_framework.benchmarks.bench_route            # full matrix (a few minutes)
    python -m moe_framework.benchmarks.bench_route --quick    # smoke run
    python -m moe_framework.benchmarks.bench_route --device cuda
"""

from __future__ import annotations

import functools
import itertools

import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.ops import route


def eager_softmax_topk(logits, k):
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[1])
    return w, ids, counts


def eager_grouped_sigmoid(logits, k, bias, n_group, topk_group, scale):
    T, E = logits.shape
    scores = torch.sigmoid(logits)
    choice = scores + bias
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scale
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return w, ids, counts


def gate_config(name, E):
    """(k, kwargs for ops.route) of a named gate at E experts."""
    if name == "softmax-top2":
        return 2, dict(scoring="softmax")
    n_group, topk_group = (8, 4) if E >= 16 else (4, 2)
    k = min(8, topk_group * (E // n_group))
    return k, dict(scoring="sigmoid", n_group=n_group, topk_group=topk_group, scaling_factor=2.5)


def make_fns(name, logits, E, device):
    k, kw = gate_config(name, E)
    if name == "softmax-top2":
        return k, (lambda: route(logits, k, **kw)), (lambda: eager_softmax_topk(logits, k))
    bias = torch.randn(E, device=device) * 0.01
    kw["correction_bias"] = bias

    def eager():
        return eager_grouped_sigmoid(
            logits, k, bias, kw["n_group"], kw["topk_group"], kw["scaling_factor"]
        )

    return k, (lambda: route(logits, k, **kw)), eager


TIE_FILLS = (("zeros", 0.0), ("nan", float("nan")), ("-inf", float("-inf")))


def tie_rows(T, threads, device, quick):
    """Rows of the tied-logits table: route on random, all-zero, all-NaN and all -inf logits."""
    rows = []
    kw: dict
    for E, gate in itertools.product([257, 1024, 4096], ["softmax-top8", "deepseek-grouped-top8"]):
        if gate == "softmax-top8":
            k, kw = 8, {"scoring": "softmax"}
        elif E % 8 == 0:
            k, kw = gate_config("deepseek-sigmoid-grouped-top8", E)
            kw["correction_bias"] = torch.zeros(E, device=device)  # a fresh bias ties too
        else:
            continue
        gen = torch.Generator().manual_seed(E)
        inputs = [("random", torch.randn(T, E, generator=gen).to(device))]
        inputs += [(name, torch.full((T, E), fill, device=device)) for name, fill in TIE_FILLS]
        random_s = None
        for name, logits in inputs:
            with torch.no_grad():
                res = common.timeit(
                    functools.partial(route, logits, k, **kw),
                    device=device,
                    min_reps=3,
                    min_time=0.05 if quick else 0.3,
                )
            if random_s is None:
                random_s = res["median_s"]
            row = {
                "gate": gate,
                "E": E,
                "k": k,
                "T": T,
                "threads": threads,
                "logits": name,
                "route_us": res["median_s"] * 1e6,
                "vs random": res["median_s"] / random_s,
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = args.device
    Ts = [64, 1024] if args.quick else [1, 64, 1024, 16384]
    Es = [8, 64, 256]
    gates = ["softmax-top2", "deepseek-sigmoid-grouped-top8"]
    threads = common.thread_counts(args.threads or [1, 2]) if device == "cpu" else [0]
    info = common.machine_info(device)
    rows = []
    tied = []
    roofs = {}
    for t in threads:
        if device == "cpu":
            torch.set_num_threads(t)
            roofs[t] = common.roofline(t, quick=args.quick)
            bw = roofs[t]["triad_gbs"]
            print(f"threads={t}: measured triad {bw:.1f} GB/s", flush=True)
        else:
            bw = float("nan")
        for gate, E, T in itertools.product(gates, Es, Ts):
            gen = torch.Generator().manual_seed(T * 1000 + E)
            logits = torch.randn(T, E, generator=gen).to(device)
            k, ours, eager = make_fns(gate, logits, E, device)
            with torch.no_grad():
                res = {
                    name: common.timeit(
                        fn, device=device, min_reps=3, min_time=0.05 if args.quick else 0.3
                    )
                    for name, fn in (("route", ours), ("eager", eager))
                }
            ours_s, eager_s = res["route"]["median_s"], res["eager"]["median_s"]
            gbs = (T * E * 4 + T * k * 8) / ours_s / 1e9
            row = {
                "gate": gate,
                "E": E,
                "k": k,
                "T": T,
                "threads": t if device == "cpu" else device,
                "route_us": ours_s * 1e6,
                "eager_us": eager_s * 1e6,
                "speedup": eager_s / ours_s,
                "route_GB/s": gbs,
            }
            if device == "cpu":
                row["%triad"] = 100.0 * gbs / bw
            rows.append(row)
            print(row, flush=True)
        tied += tie_rows(
            256 if args.quick else 1024, t if device == "cpu" else device, device, args.quick
        )
    table = common.print_table(rows, title=f"route vs the eager chain ({device})")
    tied_table = common.print_table(
        tied, title=f"route on tied and non-finite logits vs random logits ({device})"
    )
    common.write_json(
        "bench_route" + ("" if device == "cpu" else f"_{device}"),
        {
            "machine": info,
            "roofline": roofs,
            "rows": rows,
            "table": table,
            "tied_rows": tied,
            "tied_table": tied_table,
        },
        out_dir=args.out,
    )


if __name__ == "__main__":
    main()
