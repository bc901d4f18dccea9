"""swiglu (forward) and its backward vs eager PyTorch and torch.compile (inductor), on CPU.

The SwiGLU activation of an expert FFN: ``h [M, 2H] = [gate | up]`` -> ``silu(gate) * up [M, H]``.
Methods, timed interleaved in one process on the same inputs:
  * ``eager``    ``F.silu(h[:, :H]) * h[:, H:]``; its backward is autograd's (silu_backward, two
                 muls, and the two zero-padded slice gradients summed into ``[M, 2H]``)
  * ``compiled`` the same function under ``torch.compile`` (inductor: one fused loop each way)
  * ``ours``     ``ops.swiglu`` / ``ops.swiglu_backward`` (one pass each; fresh output buffer)
  * ``ours_inplace`` ``swiglu_backward_``, which writes the gradient over ``h`` (what the expert
                 FFNs run: no new ``[M, 2H]`` buffer, so no page faults on fresh memory)
"bwd" times the backward alone (given ``h`` and the incoming gradient). GB/s counts the bytes each
pass must move once (fwd: read 2H, write H; bwd: read 3H, write 2H per row), against the
measured DRAM triad of the same thread count (``%triad``).

    python -m moe_framework.benchmarks.bench_swiglu            # M in {256, 4096, 16384}, H in {256, 1792}
    python -m moe_framework.benchmarks.bench_swiglu --quick    # smoke run
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.ops import swiglu, swiglu_backward, swiglu_backward_


def eager_fwd(h):
    half = h.shape[-1] // 2
    return F.silu(h[:, :half]) * h[:, half:]


def eager_bwd(h, g):
    x = h.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(eager_fwd(x), x, g)
    return gx


def _methods(pas, h, g, scratch, compiled_fwd, compiled_bwd):
    if pas == "fwd":
        methods = {"eager": lambda: eager_fwd(h), "ours": lambda: swiglu(h)}
        if compiled_fwd is not None:
            methods["compiled"] = lambda: compiled_fwd(h)
        return methods
    methods = {
        "eager": lambda: eager_bwd(h, g),
        "ours": lambda: swiglu_backward(g, h),
        # scratch is overwritten by every call: timing only, its values are not used
        "ours_inplace": lambda: swiglu_backward_(g, scratch),
    }
    if compiled_bwd is not None:
        methods["compiled"] = lambda: compiled_bwd(h, g)
    return methods


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args()
    Ms = [256, 4096] if args.quick else [256, 4096, 16384]
    Hs = [256] if args.quick else [256, 1792]
    threads = common.thread_counts(args.threads or [1, 2])
    compiled_fwd = None if args.no_compile else torch.compile(eager_fwd, dynamic=False)
    compiled_bwd = None if args.no_compile else torch.compile(eager_bwd, dynamic=False)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        bw = common.roofline(t, quick=args.quick)["triad_gbs"]
        print(f"threads={t}: measured triad {bw:.1f} GB/s", flush=True)
        for M, H, dtype in itertools.product(Ms, Hs, (torch.float32, torch.bfloat16)):
            esize = torch.finfo(dtype).bits // 8
            gen = torch.Generator().manual_seed(M + H)
            h = (2 * torch.randn(M, 2 * H, generator=gen)).to(dtype)
            g = torch.randn(M, H, generator=gen).to(dtype)
            scratch = h.clone()
            for pas in ("fwd", "bwd"):
                methods = _methods(pas, h, g, scratch, compiled_fwd, compiled_bwd)
                nbytes = (3 if pas == "fwd" else 5) * M * H * esize
                best: dict = {}
                for _ in range(1 if args.quick else 3):
                    for name, fn in methods.items():
                        tm = common.timeit(fn, min_reps=3, min_time=0.03 if args.quick else 0.1)
                        best[name] = min(best.get(name, float("inf")), tm["min_s"])
                row = {
                    "threads": t,
                    "M": M,
                    "H": H,
                    "dtype": str(dtype).replace("torch.", ""),
                    "pass": pas,
                }
                for name, s in best.items():
                    row[f"{name}_ms"] = s * 1e3
                row["ours_GB/s"] = nbytes / best["ours"] / 1e9
                row["%triad"] = 100 * row["ours_GB/s"] / bw
                row["vs_eager"] = best["eager"] / best["ours"]
                if "compiled" in best:
                    row["vs_compiled"] = best["compiled"] / best["ours"]
                if "ours_inplace" in best:
                    row["inplace_vs_eager"] = best["eager"] / best["ours_inplace"]
                rows.append(row)
    cols = [
        "threads", "M", "H", "dtype", "pass", "eager_ms", "compiled_ms", "ours_ms",
        "ours_inplace_ms", "ours_GB/s", "%triad", "vs_eager", "vs_compiled", "inplace_vs_eager",
    ]  # fmt: skip
    common.print_table(rows, cols, title="swiglu: forward and backward (fastest rep)")
    common.write_json(
        "bench_swiglu", {"machine": common.machine_info(), "rows": rows}, out_dir=args.out
    )


if __name__ == "__main__":
    main()
