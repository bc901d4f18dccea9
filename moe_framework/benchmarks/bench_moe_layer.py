"""MoELayer vs Hugging Face's Mixtral sparse MoE block on the same weights, and peak memory.

Speed (one process, baselines in the same run, same weights and inputs):
  * ``hf_eager``      MixtralSparseMoeBlock, experts_implementation="eager" (per-expert loop)
  * ``hf_grouped_mm`` the same block with transformers' "grouped_mm" experts (sort + torch._grouped_mm)
  * ``ours_hf``       the block after ``replace_moe_blocks`` (HF router, our permute / grouped GEMM
                      / unpermute on the shared weights)
  * ``moe_layer``     ``MoELayer`` (our fused route + draft reports) on the same weights
  * ``moe_layer_keep_act`` the same with ``recompute_activation=False`` (keeps the SwiGLU output
                      for backward instead of recomputing it: faster, more memory)
  * ``dense_ffn``     a dense SwiGLU FFN with the active parameters of one token (hidden k*h): the
                      practical roofline of the expert FLOPs
"fwd" runs under no_grad; "fwd+bwd" adds the backward to the input and every parameter.

Memory (``--memory``): one fresh process per configuration (``common.peak_memory_in_subprocess``),
fwd+bwd of MoELayer vs a dense SwiGLU FFN with the same active parameters: the textbook
three-``nn.Linear`` one (``dense_linear``, ``vs_linear``: what the layer replaces) and ours
(``dense_ffn``, ``DenseFFN``, which also writes its SwiGLU gradient in place: ``vs_dense_ffn``).
``moe_layer_keep_act`` is MoELayer with ``recompute_activation=False``, ``moe_layer_copy_grad``
with ``inplace_backward=False`` (a fresh buffer for the SwiGLU gradient). The peak
is that of a second, steady-state training step (a warm-up step first pages in library code;
large blocks mmapped, see ``common.peak_memory_in_subprocess``): parameters + the step's RSS growth.
``act_MB`` is the peak minus parameters and their gradients (what grows with tokens); a layer with
E=64 experts shows that nothing grows with T*E.

    python -m moe_framework.benchmarks.bench_moe_layer                 # speed, all shapes (~15 min on 2 cores)
    python -m moe_framework.benchmarks.bench_moe_layer --quick         # smoke run
    python -m moe_framework.benchmarks.bench_moe_layer --memory        # peak memory table only
    python -m moe_framework.benchmarks.bench_moe_layer --goal          # the issue's goal comparison, interleaved

Goal (``--goal``): fwd+bwd at 2048 tokens, 8 experts, top-2, HF eager vs ``MoELayer`` (and
``keep_act``) measured in turn for ``--rounds`` rounds, the fastest repetition of each, so that a
slow spell of a shared machine hits all three alike; at d = 512 (the goal shape) and the other
widths of ``--goal-d`` (h = 3.5 d), which show how the ratio moves as the layer gets GEMM-bound.
``%gemm_roof`` is the layer's expert-GEMM rate against one large torch.mm measured in the same run
(MKL / oneDNN); ``%fma_peak`` against the cores' arithmetic peak measured in the same run
(``common.cpu_compute_peak``: fp32 FMAs, bf16 dot products). ``max_x`` is HF eager's time over
the time the layer's expert GEMMs alone take at that peak: the most any implementation of the
layer could reach against HF eager on this machine, the bound the goal runs into
(docs/performance.md).
"""

from __future__ import annotations

import gc
from typing import cast

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.experts import DenseFFN
from moe_framework.integrations.transformers import HFMoEBlock
from moe_framework.moe_layer import MoELayer

# (T, E, k, d, h): the goal shape first (Mixtral's proportions h = 3.5 d, scaled to d = 512),
# then fine-grained experts (DeepSeek / Qwen3 style, ~192 rows per expert) and a small batch.
SHAPES = [
    (2048, 8, 2, 512, 1792),
    (2048, 64, 6, 512, 256),
    (256, 8, 2, 512, 1792),
]
QUICK_SHAPES = [(512, 8, 2, 128, 448)]


def _hf_block(T, E, k, d, h, dtype, seed=0):
    impl: dict = {"experts_implementation": "eager"}  # a PretrainedConfig kwarg, not in the stubs
    cfg = transformers.MixtralConfig(
        hidden_size=d,
        intermediate_size=h,
        num_local_experts=E,
        num_experts_per_tok=k,
        **impl,
    )
    torch.manual_seed(seed)
    blk = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0.0, 0.02)  # Mixtral's initializer_range
    return cfg, blk.to(dtype)


def _moe_layer_on(blk, E, k, d, h, dtype):
    """MoELayer sharing the HF block's tensors (out_in layout = HF's, no copy)."""
    layer = MoELayer.build(d_model=d, d_hidden=h, num_experts=E, k=k, layout="out_in", dtype=dtype)
    layer.experts.w_gate_up = blk.experts.gate_up_proj
    layer.experts.w_out = blk.experts.down_proj
    cast(torch.nn.Linear, layer.supervisor.gate).weight = blk.gate.weight
    return layer


def _contenders(T, E, k, d, h, dtype):
    """The HF block, MoELayer and MoELayer keep_act on its weights, and the input / output grad."""
    cfg, blk = _hf_block(T, E, k, d, h, dtype)
    layer = _moe_layer_on(blk, E, k, d, h, dtype)
    keep = _moe_layer_on(blk, E, k, d, h, dtype)
    keep.experts.recompute_activation = False
    torch.manual_seed(1)
    x = torch.randn(1, T, d).to(dtype)
    grad_y = torch.randn(1, T, d).to(dtype)
    return cfg, blk, layer, keep, x, grad_y


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _timed(module, x, grad_y, backward, quick):
    if backward:
        xg = x.detach().requires_grad_()
        params = [p for p in module.parameters() if p.requires_grad]

        def step():
            y = _first(module(xg))
            torch.autograd.backward(y, grad_y)
            xg.grad = None
            for p in params:
                p.grad = None

    else:

        def step():
            with torch.no_grad():
                module(x)

    return common.timeit(step, warmup=1, min_reps=2 if quick else 3, min_time=0.1 if quick else 1.0)


def speed(args):
    shapes = QUICK_SHAPES if args.quick else SHAPES
    threads = common.thread_counts(args.threads or [1, 2])
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        roof = common.roofline(t, quick=args.quick)
        print(f"threads={t}: roofline {roof}", flush=True)
        for T, E, k, d, h in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                cfg, blk, layer, layer_keep, x, grad_y = _contenders(T, E, k, d, h, dtype)
                ours_hf = HFMoEBlock(blk)
                dense = DenseFFN(d_model=d, d_hidden=k * h, dtype=dtype)
                flops = 2.0 * T * k * 3 * d * h  # expert FLOPs of one forward
                for backward in (False, True):
                    res = {}
                    for name, mod in (
                        ("hf_eager", blk),
                        ("hf_grouped_mm", blk),
                        ("ours_hf", ours_hf),
                        ("moe_layer", layer),
                        ("moe_layer_keep_act", layer_keep),
                        ("dense_ffn", dense),
                    ):
                        cfg._experts_implementation = (
                            "grouped_mm" if name == "hf_grouped_mm" else "eager"
                        )
                        try:
                            res[name] = _timed(mod, x, grad_y, backward, args.quick)["median_s"]
                        except RuntimeError as exc:  # e.g. torch._grouped_mm stride limits
                            print(f"{name} failed: {exc}", flush=True)
                            res[name] = float("nan")
                    total = flops * (3 if backward else 1)
                    peak = roof[
                        "gemm_bf16_gflops" if dtype == torch.bfloat16 else "gemm_fp32_gflops"
                    ]
                    row = {
                        "threads": t,
                        "T": T,
                        "E": E,
                        "k": k,
                        "d": d,
                        "h": h,
                        "dtype": str(dtype).replace("torch.", ""),
                        "pass": "fwd+bwd" if backward else "fwd",
                        **{f"{n}_ms": v * 1e3 for n, v in res.items()},
                        "x_vs_hf_eager": res["hf_eager"] / res["moe_layer"],
                        "x_vs_hf_grouped": res["hf_grouped_mm"] / res["moe_layer"],
                        "ours_hf_x_vs_eager": res["hf_eager"] / res["ours_hf"],
                        "moe_GFLOP/s": total / res["moe_layer"] / 1e9,
                        "%gemm_peak": 100.0 * total / res["moe_layer"] / 1e9 / peak,
                    }
                    rows.append(row)
                    print(row, flush=True)
    common.print_table(rows, title="MoELayer vs Hugging Face Mixtral sparse block (CPU)")
    return rows


# -------------------------------------------------------------------------------------------- goal


def goal(args):
    """HF eager vs MoELayer fwd+bwd at 2048 tokens, 8 experts, top-2, interleaved rounds."""
    T, E, k = (512, 8, 2) if args.quick else (2048, 8, 2)
    widths = [128] if args.quick else args.goal_d
    rounds = 1 if args.quick else args.rounds
    threads = common.thread_counts(args.threads or [1, 2])
    rows, roofs = [], {}
    for t in threads:
        torch.set_num_threads(t)
        roof = roofs[t] = common.roofline(t, quick=args.quick)
        print(f"threads={t}: roofline {roof}", flush=True)
        for d in widths:
            h = int(3.5 * d)
            for dtype in (torch.float32, torch.bfloat16):
                cfg, blk, layer, keep, x, grad_y = _contenders(T, E, k, d, h, dtype)
                cfg._experts_implementation = "eager"
                best: dict = {"hf_eager": [], "moe_layer": [], "keep_act": []}
                for _ in range(rounds):
                    for name, mod in (("hf_eager", blk), ("moe_layer", layer), ("keep_act", keep)):
                        best[name].append(_timed(mod, x, grad_y, True, args.quick)["min_s"])
                ms = {n: 1e3 * min(v) for n, v in best.items()}
                gemm_gflop = 3 * 2.0 * T * k * 3 * d * h / 1e9  # 3 projections, fwd + bwd
                gflops = gemm_gflop / (ms["moe_layer"] / 1e3)
                row = {
                    "threads": t,
                    "d": d,
                    "h": h,
                    "dtype": str(dtype).replace("torch.", ""),
                    "hf_eager_ms": ms["hf_eager"],
                    "moe_layer_ms": ms["moe_layer"],
                    "keep_act_ms": ms["keep_act"],
                    "x_vs_hf_eager": ms["hf_eager"] / ms["moe_layer"],
                    "keep_act_x": ms["hf_eager"] / ms["keep_act"],
                    "rounds_x": " ".join(
                        f"{a / b:.2f}" for a, b in zip(best["hf_eager"], best["moe_layer"])
                    ),
                    "moe_GFLOP/s": gflops,
                    "%gemm_roof": 100.0
                    * gflops
                    / roof["gemm_bf16_gflops" if dtype == torch.bfloat16 else "gemm_fp32_gflops"],
                }
                peak = roof["dot_bf16_gflops" if dtype == torch.bfloat16 else "fma_fp32_gflops"]
                if peak:
                    row["%fma_peak"] = 100.0 * gflops / peak
                    row["max_x"] = ms["hf_eager"] / (1e3 * gemm_gflop / peak)
                rows.append(row)
                print(row, flush=True)
    common.print_table(
        rows, title=f"goal: fwd+bwd, T={T}, E={E}, top-{k}, best of {rounds} interleaved rounds"
    )
    return {"T": T, "E": E, "k": k, "roofline": roofs, "rows": rows}


# ------------------------------------------------------------------------------------------ memory


class _LinearSwiGLU(torch.nn.Module):
    """The textbook dense SwiGLU FFN (three ``nn.Linear``, ``down(silu(gate(x)) * up(x))``), as
    Hugging Face's Llama / Mixtral MLPs write it."""

    def __init__(self, d: int, h: int, dtype: torch.dtype):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False, dtype=dtype)  # noqa: E731
        self.gate, self.up, self.down = lin(d, h), lin(d, h), lin(h, d)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mem_run(kind: str, T: int, E: int, k: int, d: int, h: int, dtype: str, threads: int) -> dict:
    """Build one layer, run fwd+bwd twice (in a fresh process); return the second step's peak.

    The first step is a warm-up: it pages in library code (oneDNN's bf16 kernels, tens of MB of
    file-backed pages counted by RSS) and builds one-time caches, which a training loop pays once,
    not per step. The gradients are then dropped, the RSS high-water mark is reset (Linux: writing
    5 to /proc/self/clear_refs resets VmHWM) and the second step is measured. peak = parameters +
    the step's RSS growth (its activations, gradients and temporaries).
    """
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    mod: torch.nn.Module
    if kind.startswith("moe_layer"):
        mod = MoELayer.build(
            d_model=d,
            d_hidden=h,
            num_experts=E,
            k=k,
            dtype=dt,
            recompute_activation=kind != "moe_layer_keep_act",
            inplace_backward=kind != "moe_layer_copy_grad",
        )
    elif kind == "dense_linear":
        mod = _LinearSwiGLU(d, k * h, dt)
    elif kind == "hf_eager":
        _, mod = _hf_block(T, E, k, d, h, dt)
    else:
        mod = DenseFFN(d_model=d, d_hidden=k * h, dtype=dt)
    x = torch.randn(1, T, d, dtype=dt, requires_grad=True)

    def step():
        y = _first(mod(x))
        y.backward(torch.ones_like(y))

    step()
    mod.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status_mb("VmRSS")
    step()
    pbytes = sum(p.numel() * p.element_size() for p in mod.parameters())
    return {"param_MB": pbytes / 2**20, "peak_MB": pbytes / 2**20 + _status_mb("VmHWM") - base}


def memory(args):
    T = 512 if args.quick else 2048
    d, h = (128, 448) if args.quick else (512, 1792)
    configs = [
        ("dense_linear", 8, 2),
        ("dense_ffn", 8, 2),
        ("moe_layer", 8, 2),
        ("moe_layer_keep_act", 8, 2),
        ("moe_layer_copy_grad", 8, 2),
        ("hf_eager", 8, 2),
        ("moe_layer", 64, 2),
    ]
    rows = []
    for dtype in ("float32", "bfloat16"):
        lin_act = lin_peak = ffn_peak = None
        for kind, E, k in configs:
            out = common.peak_memory_in_subprocess(
                "moe_framework.benchmarks.bench_moe_layer:mem_run",
                kind=kind,
                T=T,
                E=E,
                k=k,
                d=d,
                h=h,
                dtype=dtype,
                threads=1,
            )
            param_mb, peak_mb = out["extra"]["param_MB"], out["extra"]["peak_MB"]
            act = peak_mb - 2 * param_mb  # parameters + their gradients
            if kind == "dense_linear":
                lin_act, lin_peak = act, peak_mb
            if kind == "dense_ffn":
                ffn_peak = peak_mb
            rows.append(
                {
                    "layer": kind,
                    "T": T,
                    "E": E,
                    "k": k,
                    "d": d,
                    "h": h,
                    "dtype": dtype,
                    "param_MB": param_mb,
                    "peak_MB": peak_mb,
                    "act_MB": act,
                    "peak_vs_linear": peak_mb / lin_peak,
                    "act_vs_linear": act / lin_act,
                    "peak_vs_dense_ffn": peak_mb / ffn_peak if ffn_peak else float("nan"),
                }
            )
            print(rows[-1], flush=True)
    common.print_table(rows, title="fwd+bwd peak memory (fresh process per row)")
    return rows


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="only the peak-memory table")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    p.add_argument("--goal", action="store_true", help="only the interleaved goal comparison")
    p.add_argument("--goal-d", type=int, nargs="+", default=[256, 512, 1024], help="--goal widths")
    p.add_argument("--rounds", type=int, default=3, help="--goal interleaved rounds")
    args = p.parse_args()
    payload = {"machine": common.machine_info("cpu"), "transformers": transformers.__version__}
    if args.goal:
        payload["goal"] = goal(args)
        common.write_json("bench_moe_layer_goal", payload, out_dir=args.out)
        return
    if not args.memory:
        payload["speed"] = speed(args)
    if not args.no_memory:
        payload["memory"] = memory(args)
    common.write_json("bench_moe_layer", payload, out_dir=args.out)


if __name__ == "__main__":
    main()
