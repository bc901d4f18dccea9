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
"""

from __future__ import annotations

import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.ops import grouped_gemm

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


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    args = parser.parse_args()
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
