"""Expert parallelism on CPU/gloo: tokens/s of an OLMoE-like layer forward+backward at ep = 1
(one process, 2 threads) and ep = 2 (two processes, 1 thread each), dropless and capacity modes,
with the all-to-all time and bytes per step next to the analytic volume.

    flock /tmp/moe_bench.lock python -m moe_framework.benchmarks.bench_expert_parallel [--quick]

Shape: OLMoE's expert geometry (64 experts, top-8, h = d/2) scaled down in width (d = 512,
1024 with --full) to fit a 2-core machine. Each all-to-all moves about ``T*k*d*bytes*(ep-1)/ep``
per rank (the rows routed to the other rank's experts); a forward+backward has four of them
(dispatch, combine, and their backward).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import cast

import torch
from safetensors.torch import load_file, save_file

from .common import base_parser, machine_info, print_table, write_json

WIDTHS = {"quick": (256, 128, 128), "default": (512, 256, 256), "full": (1024, 512, 256)}
E, K = 64, 8


def _worker(args) -> None:
    """One rank (or the single ep = 1 process): prints ``RESULT {json}``."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    from moe_framework import MoELayer
    from moe_framework.distributed import (
        AllToAllDispatcher,
        expert_parallel,
        init_distributed,
    )

    d, h, T = WIDTHS[args.size]
    ep = args.ep
    torch.set_num_threads(2 if ep == 1 else 1)
    torch.manual_seed(0)
    layer = MoELayer.build(d_model=d, d_hidden=h, num_experts=E, k=K, report_top_tokens=None)
    rank = 0
    tokens = T * 2 if ep == 1 else T  # the same global batch: 2T tokens
    if ep > 1:
        rank, _ = init_distributed("gloo", timeout_s=120)
        cf = 1.25 if args.mode == "capacity" else None
        expert_parallel(layer, None, mode=args.mode, capacity_factor=cf)
    elif args.mode == "capacity":
        layer = MoELayer.build(
            d_model=d, d_hidden=h, num_experts=E, k=K, report_top_tokens=None, capacity_factor=1.25
        )
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1 + rank))
    x.requires_grad_(True)

    def step():
        y, _ = layer(x)
        y.sum().backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        if ep > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    res = {"ep": ep, "mode": args.mode, "rank": rank, "tokens_per_rank": tokens, "step_s": times}
    if ep > 1:
        # The all-to-all alone, with this step's split sizes: 4 per forward+backward.
        dec = layer.router(x.detach())
        disp = cast(AllToAllDispatcher, layer.dispatcher)
        ctx = disp.dispatch(x.detach(), dec)[2]
        if ctx.in_splits is None or ctx.out_splits is None:  # capacity: static equal splits
            C = disp.capacity(tokens, K)
            sent_rows = [disp.num_experts * C] * ep
            recv_rows = sent_rows
        else:
            sent_rows, recv_rows = list(ctx.in_splits), list(ctx.out_splits)
        send = torch.randn(sum(sent_rows), d)
        comm = []
        for i in range(args.warmup + args.reps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(4):
                fc.wait_tensor(fc.all_to_all_single(send, recv_rows, sent_rows, group=disp.group))
            if i >= args.warmup:
                comm.append(time.perf_counter() - t0)
        remote = sum(r for j, r in enumerate(sent_rows) if j != rank)
        res.update(
            comm_s=comm,
            bytes_to_other_ranks_per_step=4 * remote * d * 4,
            analytic_bytes_per_step=4 * tokens * K * d * 4 * (ep - 1) / ep,
            rows_sent=sent_rows,
        )
        dist.destroy_process_group()
    print("RESULT " + json.dumps(res), flush=True)


def _median(v):
    v = sorted(v)
    return v[len(v) // 2]


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="d = 1024 (slower)")
    p.add_argument(
        "--deepspeed-python",
        default=None,
        help="python of a venv with deepspeed + the same torch: adds the DeepSpeed-MoE peer row",
    )
    p.add_argument("--worker", action="store_true", help=argparse_hide())
    p.add_argument("--ep", type=int, default=1, help=argparse_hide())
    p.add_argument("--mode", default="dropless", help=argparse_hide())
    p.add_argument("--size", default="default", help=argparse_hide())
    p.add_argument("--reps", type=int, default=5, help=argparse_hide())
    p.add_argument("--warmup", type=int, default=2, help=argparse_hide())
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    from moe_framework.distributed import launch_local

    size = "quick" if args.quick else ("full" if args.full else "default")
    reps, warmup = (3, 1) if args.quick else (5, 2)
    load0 = os.getloadavg()
    rows, raw = [], []
    for mode in ("dropless", "capacity"):
        base = None
        for ep in (1, 2):
            flags = ["--worker", "--ep", str(ep), "--mode", mode, "--size", size]
            flags += ["--reps", str(reps), "--warmup", str(warmup)]
            res = launch_local(
                "moe_framework.benchmarks.bench_expert_parallel",
                flags,
                ep,
                timeout_s=280,
                threads=2 if ep == 1 else 1,
            )
            outs = []
            for r in res:
                if r.returncode != 0:
                    print(r.stdout, r.stderr, file=sys.stderr)
                    raise SystemExit(f"bench_expert_parallel: ep={ep} {mode} rank {r.rank} failed")
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
                outs.append(json.loads(line[7:]))
            raw.extend(outs)
            # A step ends when the slowest rank ends.
            step = _median([max(ts) for ts in zip(*(o["step_s"] for o in outs))])
            tokens = sum(o["tokens_per_rank"] for o in outs)
            row = {
                "mode": mode,
                "ep": ep,
                "procs x threads": f"{ep} x {2 if ep == 1 else 1}",
                "tokens": tokens,
                "step_ms": step * 1e3,
                "tokens_per_s": tokens / step,
            }
            if base is None:
                base = step
            row["speedup_vs_ep1"] = base / step
            if ep > 1:
                comm = _median([max(ts) for ts in zip(*(o["comm_s"] for o in outs))])
                row["a2a_ms_per_step"] = comm * 1e3
                row["a2a_share"] = comm / step
                row["MB_sent_per_rank"] = (
                    _median([o["bytes_to_other_ranks_per_step"] for o in outs]) / 1e6
                )
                row["MB_analytic"] = outs[0]["analytic_bytes_per_step"] / 1e6
            rows.append(row)
    peer = None
    if args.deepspeed_python:
        peer = _deepspeed_peer(args.deepspeed_python, size, reps, warmup, rows)
        rows.append(peer["row"])
    load1 = os.getloadavg()
    d, h, T = WIDTHS[size]
    title = f"expert parallel, OLMoE-like layer E={E} k={K} d={d} h={h}, 2T={2 * T} tokens"
    columns = ["mode", "ep", "procs x threads", "tokens", "step_ms", "tokens_per_s"]
    columns += ["speedup_vs_ep1", "a2a_ms_per_step", "a2a_share", "MB_sent_per_rank"]
    print_table(rows, columns + ["MB_analytic"], title=title)
    shared = max(load0[0], load1[0]) > 2.5
    if peer is not None:
        print(
            f"DeepSpeed-MoE peer: max |y_ds - y_moelayer| = "
            f"{peer['max_abs_diff_vs_single_process_moelayer']:.3g}; our dropless ep=2 is "
            f"{peer['ours_dropless_ep2_over_deepspeed_speed']:.2f}x its speed"
        )
    if shared:
        print(f"note: the machine was shared (1-min load {load0[0]:.1f} -> {load1[0]:.1f})")
    write_json(
        "bench_expert_parallel",
        {
            "machine": machine_info("cpu"),
            "shape": {"E": E, "k": K, "d": d, "h": h, "tokens_per_rank_ep2": T},
            "rows": rows,
            "raw": raw,
            "peer_deepspeed": None
            if peer is None
            else {k: v for k, v in peer.items() if k != "row"},
            "loadavg_start": load0,
            "loadavg_end": load1,
            "machine_shared": shared,
        },
        args.out,
    )
    return 0


def _deepspeed_peer(python: str, size: str, reps: int, warmup: int, rows: list) -> dict:
    """DeepSpeed-MoE at ep = 2 on the same weights and tokens (_peer_deepspeed_moe.py, in its own
    venv): its outputs against the single-process MoELayer's, and its step time against ours."""
    import tempfile

    from moe_framework import MoELayer
    from moe_framework.distributed import launch_local
    from moe_framework.experts import ExpertBank

    d, h, T = WIDTHS[size]
    torch.manual_seed(0)  # the weights every _worker builds
    layer = MoELayer.build(d_model=d, d_hidden=h, num_experts=E, k=K, report_top_tokens=None)
    xs = [torch.randn(T, d, generator=torch.Generator().manual_seed(1 + r)) for r in range(2)]
    bank = cast(ExpertBank, layer.experts)
    gate = cast(torch.nn.Linear, layer.router.gate)
    with tempfile.TemporaryDirectory() as tmp:
        wpath, out = os.path.join(tmp, "weights.safetensors"), os.path.join(tmp, "out")
        save_file(
            {
                "gate": gate.weight.detach().contiguous(),
                "w_gate_up": bank.weight_in.detach().contiguous(),
                "w_out": bank.w_out.detach().contiguous(),
                "k": torch.tensor(K),
                "x0": xs[0],
                "x1": xs[1],
            },
            wpath,
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["DS_ACCELERATOR"] = "cpu"
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_peer_deepspeed_moe.py")
        res = launch_local(
            script, [wpath, out, str(reps), str(warmup)], 2, timeout_s=280, env=env, python=python
        )
        if any(r.returncode != 0 for r in res):
            tails = "\n".join(f"--- rank {r.rank}:\n{r.stderr[-2500:]}" for r in res)
            raise SystemExit(f"DeepSpeed peer failed:\n{tails}")
        got = [load_file(f"{out}.rank{r}.safetensors") for r in range(2)]
    with torch.no_grad():
        ref = [layer(x)[0] for x in xs]
    diff = max(float((g["y"] - y).abs().max()) for g, y in zip(got, ref))
    step = _median([max(ts) for ts in zip(*(g["step_s"].tolist() for g in got))])
    ours = [r for r in rows if r["mode"] == "dropless" and r["ep"] == 2][0]
    row = {
        "mode": "DeepSpeed-MoE (peer)",
        "ep": 2,
        "procs x threads": "2 x 1",
        "tokens": 2 * T,
        "step_ms": step * 1e3,
        "tokens_per_s": 2 * T / step,
    }
    return {
        "row": row,
        "max_abs_diff_vs_single_process_moelayer": diff,
        "ours_dropless_ep2_over_deepspeed_speed": step / (ours["step_ms"] / 1e3),
    }


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
