"""Inference fast paths: torch.compile(fullgraph=True) everywhere, CUDA graphs on a GPU.

    python examples/compile_and_cuda_graphs.py [--backend aot_eager|inductor] [--batch 32]

The MoE forward has no host sync and static shapes, so it compiles to one graph (no breaks) and,
on CUDA, can be captured once and replayed. On a machine without CUDA the CUDA-graph part says so
and is skipped.
"""

import argparse
import time

import torch

from moe_framework.config import MoEConfig
from moe_framework.cuda_graphs import CUDAGraphInference
from moe_framework.system import MixtureOfExpertsSystem


def bench(fn, x, iters=20):
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="inductor", choices=("aot_eager", "inductor"))
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MoEConfig(input_dim=32, output_dim=8, d_model=32, d_hidden=64, num_experts=4, k=2)
    model = MixtureOfExpertsSystem(cfg).eval()
    x = torch.randn(args.batch, 32)

    explanation = torch._dynamo.explain(model)(x)
    print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=args.backend, fullgraph=True)
    with torch.no_grad():
        eager_out = model(x).output
        comp_out = compiled(x).output
    print(f"compiled vs eager max |diff|: {(comp_out - eager_out).abs().max().item():.2e}")
    with torch.no_grad():
        print(f"eager    {bench(lambda t: model(t).output, x):7.3f} ms/batch")
        print(f"compiled {bench(lambda t: compiled(t).output, x):7.3f} ms/batch ({args.backend})")

    if not torch.cuda.is_available():
        try:
            CUDAGraphInference(model, x)
        except RuntimeError as exc:
            print(f"CUDA graphs skipped: {exc}")
        return
    model = model.cuda()
    xc = x.cuda()
    runner = CUDAGraphInference(lambda t: model(t).output, xc)
    with torch.no_grad():
        ref = model(xc).output
    print(f"graph replay vs eager max |diff|: {(runner(xc) - ref).abs().max().item():.2e}")
    with torch.no_grad():
        print(f"eager cuda  {bench(lambda t: model(t).output, xc):7.3f} ms/batch")
    print(f"cuda graph  {bench(runner, xc):7.3f} ms/batch")


if __name__ == "__main__":
    main()
