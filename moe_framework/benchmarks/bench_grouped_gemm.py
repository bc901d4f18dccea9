"""grouped_gemm vs the per-expert torch.mm loop, one dense torch.mm of the same FLOPs, and
torch._grouped_mm (when this torch has it on the device).

Shapes are (E experts, rows per expert) mixes from 8 x 512 (prefill, large groups) to 256 x 8
(decode, fine-grained experts), at d_model = 1024 and d_ff in 512..2048. "fwd" times
``out = a @ b[e]`` per group; "fwd+bwd" adds the backward to ``a`` and ``b``. GFLOP/s count
2*M*K*N per GEMM (x3 for fwd+bwd); "peak" is the measured large-square torch.mm rate of the same
dtype and thread count, "fma" the cores' arithmetic peak (fp32 FMAs, bf16 dot products) measured
by fma_peak.c (common.py roofline).

Goals (CPU): >= 0.95x the dense mm at >= 128 rows/expert; >= 2x the per-expert loop at <= 16.

    python -m moe_framework.benchmarks.bench_grouped_gemm            # full matrix (several minutes)
    python -m moe_framework.benchmarks.bench_grouped_gemm --quick    # smoke run

``--sweep``: the small-group sweep (issue 14): E = 64 experts, rows per expert 1..256, (K, N) =
512x768, 768x512, 1024x2816, both layouts (``trans_b`` False: b is [E, K, N]; True: b is
[E, N, K], Hugging Face's [E, out, in]), forward and weight gradient. Forward contenders: ours,
``torch._grouped_mm`` (what transformers' ``grouped_mm`` calls), the per-expert ``torch.mm`` loop
and one ``torch.bmm`` on the [E, rows, K] view (equal group sizes, so no padding copy: the best
case of a padded bmm). wgrad: ours vs the per-expert loop. Times are the median ms per call.
``--baseline OLD.json`` adds ``old ms`` and ``old/new`` columns from a sweep of another build (run
the same command with the other build first, e.g. from a checkout of main), so before/after come
from back-to-back runs on the same machine.

    python -m moe_framework.benchmarks.bench_grouped_gemm --sweep --threads 2 [--quick]
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.ops import grouped_gemm, grouped_gemm_wgrad

# (experts, rows per expert, K = d_model, N = d_ff)
SHAPES = [
    (8, 512, 1024, 2048),
    (32, 128, 1024, 1024),
    (64, 64, 1024, 512),
    (64, 16, 1024, 1024),
    (128, 8, 1024, 1024),
    (256, 8, 1024, 512),
]
QUICK_SHAPES = [(8, 128, 256, 256), (64, 8, 256, 256)]


def loop_mm(a, b, counts):
    """The per-expert loop (what torch._grouped_mm does on CPU): one torch.mm per expert.
    split/unbind (not slicing/indexing) so the backward gathers the per-expert grads with one
    cat/stack instead of a zero-filled full-size gradient per expert."""
    return torch.cat([x @ w for x, w in zip(torch.split(a, counts), b.unbind(0))])


def _case(E, rows, K, N, dtype, device):
    M = E * rows
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(E, K, N, dtype=dtype, device=device) / K**0.5
    w = torch.randn(K, N, dtype=dtype, device=device) / K**0.5
    offsets = torch.arange(E + 1, device=device) * rows
    dy = torch.randn(M, N, dtype=dtype, device=device)
    return a, b, w, offsets, dy


def _methods(a, b, w, offsets, dy):
    counts = offsets.diff().tolist()  # the loop baseline needs host sizes (ours never does)
    ends = offsets[1:].to(torch.int32)
    fwd = {
        "ours": lambda: grouped_gemm(a, b, offsets),
        "loop": lambda: loop_mm(a, b, counts),
        "dense": lambda: torch.mm(a, w),
    }
    if hasattr(torch, "_grouped_mm"):
        fwd["torch_grouped_mm"] = lambda: torch._grouped_mm(a, b, offs=ends)

    def with_bwd(f):
        def run():
            a.requires_grad_(True)
            b.requires_grad_(True)
            w.requires_grad_(True)
            try:
                out = f()
                torch.autograd.backward(out, dy)
            finally:
                for t in (a, b, w):
                    t.grad = None
                    t.requires_grad_(False)

        return run

    return fwd, {k: with_bwd(f) for k, f in fwd.items()}


SWEEP_ROWS = [1, 2, 4, 8, 16, 64, 256]
SWEEP_KN = [(512, 768), (768, 512), (1024, 2816)]
# The largest shape stops at 16 rows per expert in the default sweep (at 256 rows one call is
# ~95 GFLOP: seconds per contender on a 2-core CPU); --sweep-big-rows 256 includes them all.
QUICK_SWEEP_ROWS = [1, 4, 16]
SLOW_S = 0.5
QUICK_SWEEP_KN = [(512, 768)]


def _sweep_methods(a, b, offsets, trans_b, E, rows):
    K = a.shape[1]
    counts = [rows] * E
    ends = offsets[1:].to(torch.int32)
    bt = b.transpose(1, 2) if trans_b else b  # [E, K, N] view for the torch contenders
    methods = {
        "ours": lambda: grouped_gemm(a, b, offsets, trans_b=trans_b),
        "loop": lambda: loop_mm(a, bt, counts),
        "bmm": lambda: torch.bmm(a.view(E, rows, K), bt).view(E * rows, -1),
    }
    if hasattr(torch, "_grouped_mm"):
        methods["_grouped_mm"] = lambda: torch._grouped_mm(a, bt, offs=ends)
    return methods


def _wgrad_methods(a, dy, offsets, trans_b, rows):
    E = offsets.numel() - 1
    a_s, dy_s = a.split(rows), dy.split(rows)
    if trans_b:
        loop = lambda: torch.stack([g.t() @ x for x, g in zip(a_s, dy_s)])  # noqa: E731
    else:
        loop = lambda: torch.stack([x.t() @ g for x, g in zip(a_s, dy_s)])  # noqa: E731
    assert len(a_s) == E
    return {"ours": lambda: grouped_gemm_wgrad(a, dy, offsets, trans_b=trans_b), "loop": loop}


def _ms(fn, heavy: bool) -> Optional[float]:
    """Median ms per call; a call slower than SLOW_S is timed once (torch's bf16 CPU GEMM can
    take seconds per call on AVX2-only CPUs: repeating it would blow the run's time budget)."""
    try:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > SLOW_S:
            return first * 1e3
        t = common.timeit(fn, warmup=0, min_reps=2 if heavy else 5, min_time=0 if heavy else 0.05)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  skipped: {type(exc).__name__}: {exc}")
        return None
    return t["median_s"] * 1e3


def sweep(args) -> None:
    """The small-group sweep (see the module docstring)."""
    rows_list = QUICK_SWEEP_ROWS if args.quick else SWEEP_ROWS
    kn_list = QUICK_SWEEP_KN if args.quick else SWEEP_KN
    old = {}
    if args.baseline:
        with open(args.baseline) as f:
            for r in json.load(f)["rows"]:
                old[_sweep_key(r)] = r["ms"]
    load_start = os.getloadavg()
    out = []
    gen = torch.Generator().manual_seed(0)
    for threads in common.thread_counts(args.threads):
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for K, N in kn_list:
                for rows in rows_list:
                    if (K, N) == (1024, 2816) and rows > args.sweep_big_rows:
                        continue
                    E, M = 64, 64 * rows
                    a = torch.randn(M, K, generator=gen).to(dtype)
                    dy = torch.randn(M, N, generator=gen).to(dtype)
                    offsets = torch.arange(E + 1) * rows
                    heavy = 2.0 * M * K * N > 5e9
                    for trans_b in (False, True):
                        shape = (E, N, K) if trans_b else (E, K, N)
                        b = (torch.randn(*shape, generator=gen) / K**0.5).to(dtype)
                        for op, methods in (
                            ("fwd", _sweep_methods(a, b, offsets, trans_b, E, rows)),
                            ("wgrad", _wgrad_methods(a, dy, offsets, trans_b, rows)),
                        ):
                            for name, fn in methods.items():
                                row = {
                                    "threads": threads,
                                    "dtype": dtype_name,
                                    "op": op,
                                    "trans_b": trans_b,
                                    "rows/expert": rows,
                                    "K x N": f"{K}x{N}",
                                    "method": name,
                                    "ms": _ms(fn, heavy),
                                }
                                row["GF/s"] = (
                                    2.0 * M * K * N / row["ms"] / 1e6 if row["ms"] else None
                                )
                                if old:
                                    before = old.get(_sweep_key(row))
                                    row["old ms"] = before
                                    row["old/new"] = (
                                        before / row["ms"] if before and row["ms"] else None
                                    )
                                out.append(row)
                                print(row, flush=True)
    load_end = os.getloadavg()
    # One summary row per cell: ours against the best contender, and out_in against in_out.
    summary = []
    for r in out:
        if r["method"] != "ours" or r["ms"] is None:
            continue
        peers = [
            x["ms"]
            for x in out
            if x["method"] != "ours" and x["ms"] and _sweep_key(x)[:-1] == _sweep_key(r)[:-1]
        ]
        other = [
            x["ms"]
            for x in out
            if x["method"] == "ours"
            and x["trans_b"] != r["trans_b"]
            and _sweep_key(x)[:3] == _sweep_key(r)[:3]
            and _sweep_key(x)[4:] == _sweep_key(r)[4:]
        ]
        s = {k: r[k] for k in ("threads", "dtype", "op", "trans_b", "rows/expert", "K x N")}
        s["ours ms"] = r["ms"]
        s["best peer ms"] = min(peers) if peers else None
        s["peer/ours"] = min(peers) / r["ms"] if peers else None
        s["ours / other layout"] = r["ms"] / other[0] if other else None
        if old:
            s["old/new"] = r.get("old/new")
        summary.append(s)
    info = common.machine_info("cpu")
    common.print_table(out, title=f"grouped_gemm sweep ({info['cpu']}, torch {info['torch']})")
    common.print_table(summary, title="ours vs the best contender, and vs the other layout")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    common.write_json(
        args.name or "grouped_gemm_sweep",
        {
            "machine": info,
            "quick": args.quick,
            "load_start": load_start,
            "load_end": load_end,
            "baseline": args.baseline,
            "tuning": args.tuning,
            "rows": out,
            "summary": summary,
        },
        args.out,
    )


def _sweep_key(r: dict) -> tuple:
    return (
        r["threads"],
        r["dtype"],
        r["op"],
        r["trans_b"],
        r["rows/expert"],
        r["K x N"],
        r["method"],
    )


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="the small-group sweep (issue 14)")
    parser.add_argument("--sweep-big-rows", type=int, default=16, help="max rows at 1024x2816")
    parser.add_argument("--baseline", default=None, help="sweep JSON of another build to compare")
    parser.add_argument("--name", default=None, help="JSON file name (default grouped_gemm_sweep)")
    common.add_tuning_arg(parser)
    args = parser.parse_args()
    common.apply_tuning(parser, args.tuning)
    if args.sweep:
        return sweep(args)
    device = args.device
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows_out, roofs = [], {}
    for threads in common.thread_counts(args.threads):
        torch.set_num_threads(threads)
        roof = roofs[threads] = common.roofline(threads, device=device, quick=args.quick)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            peak = roof["gemm_bf16_gflops" if dtype == torch.bfloat16 else "gemm_fp32_gflops"]
            fma = roof.get("dot_bf16_gflops" if dtype == torch.bfloat16 else "fma_fp32_gflops")
            for E, rows, K, N in shapes:
                a, b, w, offsets, dy = _case(E, rows, K, N, dtype, device)
                fwd, fwdbwd = _methods(a, b, w, offsets, dy)
                flops = 2.0 * E * rows * K * N
                for mode, methods, mult in (("fwd", fwd, 1), ("fwd+bwd", fwdbwd, 3)):
                    res = {}
                    for name, fn in methods.items():
                        try:
                            t = common.timeit(fn, device=device, warmup=1, min_reps=3, min_time=0.1)
                            res[name] = mult * flops / t["min_s"] / 1e9
                        except (RuntimeError, NotImplementedError) as exc:
                            res[name] = None
                            print(f"{name} {dtype_name} {mode}: {type(exc).__name__}: {exc}")
                    rows_out.append(
                        {
                            "threads": threads,
                            "dtype": dtype_name,
                            "mode": mode,
                            "E x rows": f"{E}x{rows}",
                            "K x N": f"{K}x{N}",
                            "ours GF/s": res["ours"],
                            "loop GF/s": res["loop"],
                            "dense GF/s": res["dense"],
                            "_grouped_mm GF/s": res.get("torch_grouped_mm"),
                            "ours/loop": res["ours"] / res["loop"],
                            "ours/dense": res["ours"] / res["dense"],
                            "ours/peak": res["ours"] / peak,
                            "ours/fma": res["ours"] / fma if fma else None,
                        }
                    )
                    print(rows_out[-1], flush=True)
    info = common.machine_info(device)
    common.print_table(rows_out, title=f"grouped_gemm ({info['cpu']}, torch {info['torch']})")
    common.write_json(
        "grouped_gemm",
        {"machine": info, "quick": args.quick, "roofline": roofs, "rows": rows_out},
        args.out,
    )


if __name__ == "__main__":
    main()
