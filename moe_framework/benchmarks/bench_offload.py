"""Offloaded experts (``moe_framework.offload``) against the fully resident model: peak memory and
tokens/s, prefetch on and off.

The model: ``L`` pre-norm residual ``MoELayer`` blocks (SwiGLU ``ExpertBank`` experts, top-k
routing), fp32. Its experts are written once to per-layer safetensors files (by this process,
which is not measured). Each configuration then runs in its own fresh process
(``common.peak_memory_in_subprocess``: ``ru_maxrss``, and its growth after imports):

* ``resident``      the model built in memory (same seed, same weights), every expert resident.
* ``offload``       routers built in memory, experts ``OffloadedExperts.open`` on the files
                    (memory-mapped), ``cache_slots`` = 25% of each layer's experts, router-driven
                    prefetch (``enable_prefetch``: this layer's picked experts and the next
                    layer's predicted ones on a background thread).
* ``offload_no_pf`` the same without prefetch: every miss is loaded by the forward itself.

Each process runs the same inputs: ``--steps`` forward passes of ``T`` tokens (after warm-up
steps), under ``torch.no_grad``; tokens/s, the cache's hit rate, bytes moved per token and the
stall time are reported. Two input streams: ``random`` (i.i.d. Gaussian tokens: routing spreads
over all experts, the worst case for a cache) and ``clustered`` (tokens near one of 4 centres,
as text with topical locality: routing concentrates). The files are in the page cache (they were
just written): loads are copies from host memory through the mapping, not disk reads.

    flock /tmp/moe_bench.lock python -m moe_framework.benchmarks.bench_offload           # ~3 min
    python -m moe_framework.benchmarks.bench_offload --quick                            # smoke run

Peak RSS ratio = offload / resident, both of the whole process (``rss``) and of its growth after
imports (``delta``, the model plus activations; the issue's goal: <= 35% for the delta).
``hwm_delta_MB`` cross-checks ``delta`` with the process's own ``VmHWM`` (/proc/self/status).
The files are written by a separate process, so the measuring parent never holds the model (Linux
carries a parent's peak over fork + exec into the child's ``ru_maxrss``).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_framework import MoELayer, Supervisor
from moe_framework.benchmarks import common
from moe_framework.offload import (
    OffloadedExperts,
    close_offloaded,
    enable_prefetch,
    offload_metrics,
)
from moe_framework.offload_storage import write_expert_file


class _Model(nn.Module):
    """Pre-norm residual MoE blocks: ``x + moe(norm(x))``."""

    def __init__(self, layers):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(layer.d_model) for layer in layers)
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))[0]
        return x


def _resident(shape: dict, seed: int) -> _Model:
    torch.manual_seed(seed)
    layers = [
        MoELayer.build(
            d_model=shape["d"],
            d_hidden=shape["h"],
            num_experts=shape["E"],
            k=shape["k"],
            report_top_tokens=None,
        )
        for _ in range(shape["L"])
    ]
    return _Model(layers)


def _router_state(model: _Model) -> dict:
    return {
        f"{i}.{k}": v.detach().clone()
        for i, layer in enumerate(model.layers)
        for k, v in cast(nn.Module, layer.supervisor).state_dict().items()
    }


def _inputs(shape: dict, stream: str, seed: int) -> list:
    g = torch.Generator().manual_seed(seed + 1)
    n = shape["warmup"] + shape["steps"]
    T, d = shape["T"], shape["d"]
    if stream == "random":
        return [torch.randn(T, d, generator=g) for _ in range(n)]
    centres = torch.randn(4, d, generator=g) * 2
    out = []
    for _ in range(n):
        which = torch.randint(0, 4, (T,), generator=g)
        out.append(centres[which] + 0.5 * torch.randn(T, d, generator=g))
    return out


def _run(model: nn.Module, inputs: list, warmup: int) -> dict:
    with torch.no_grad():
        for x in inputs[:warmup]:
            model(x)
        for m in model.modules():
            if isinstance(m, OffloadedExperts):
                m.reset_metrics()
        t0 = time.perf_counter()
        for x in inputs[warmup:]:
            model(x)
        dt = time.perf_counter() - t0
    tokens = sum(x.shape[0] for x in inputs[warmup:])
    return {"tokens_per_s": tokens / dt, "seconds": dt, "tokens": tokens}


def write_files(shape: dict, folder: str, seed: int) -> dict:
    """Build the model and write its expert files and router weights (run in its own process:
    Linux carries a process's peak RSS over ``fork`` + ``exec`` into ``ru_maxrss`` of the child,
    so the parent that spawns the measured configurations must never hold the model)."""
    model = _resident(shape, seed)
    for i, layer in enumerate(model.layers):
        write_expert_file(layer.experts, os.path.join(folder, f"experts_{i}.safetensors"))
    save_file(_router_state(model), os.path.join(folder, "routers.safetensors"))
    return {
        "expert_mb": sum(p.numel() * p.element_size() for p in model.layers.parameters()) / 2**20
    }


def _vm_hwm_mb() -> float:
    # The peak RSS of this process's own address space (not inherited over exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_config(kind: str, shape: dict, folder: str, stream: str, seed: int, threads: int) -> dict:
    """One configuration, meant to run in a fresh process (``peak_memory_in_subprocess``)."""
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    hwm0 = _vm_hwm_mb()
    inputs = _inputs(shape, stream, seed)
    if kind == "resident":
        model: nn.Module = _resident(shape, seed)
    else:
        routers = load_file(os.path.join(folder, "routers.safetensors"))
        layers = []
        for i in range(shape["L"]):
            router = Supervisor(shape["d"], shape["E"], shape["k"])
            router.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in routers.items() if k.startswith(f"{i}.")}
            )
            experts = OffloadedExperts.open(
                os.path.join(folder, f"experts_{i}.safetensors"), cache_slots=shape["slots"]
            )
            layers.append(MoELayer(router, experts, report_top_tokens=None))
        torch.manual_seed(seed)  # the norms are the default LayerNorm init in both
        model = _Model(layers)
        if kind == "offload":
            enable_prefetch(model)
    out = _run(model, inputs, shape["warmup"])
    # a checksum of the last output: the offloaded runs must reproduce the resident one bitwise
    with torch.no_grad():
        out["checksum"] = float(model(inputs[-1]).double().sum())
    if kind != "resident":
        m = offload_metrics(model)
        out.update(
            hit_rate=m["hit_rate"],
            bytes_per_token=m["bytes_moved"] / out["tokens"],
            stall_s=m["stall_s"],
            prefetch_loads=m["prefetch_loads"],
            prefetch_unused=m["prefetch_unused"],
            misses=m["misses"],
            requests=m["requests"],
        )
        close_offloaded(model)
    out["load_start"], out["load_end"] = load0, os.getloadavg()[0]
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["vm_hwm_mb"], out["vm_hwm_start_mb"] = _vm_hwm_mb(), hwm0
    return out


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", default=None, help="where to write the expert files (temp dir)")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_offload: CPU only (the CUDA path has not been run)")
    threads = (args.threads or [1])[0]
    if args.quick:
        shape = dict(L=2, E=16, k=2, d=128, h=256, T=8, steps=10, warmup=2)
    else:
        shape = dict(L=4, E=32, k=2, d=512, h=1024, T=8, steps=30, warmup=4)
    shape["slots"] = shape["E"] // 4
    folder = args.folder or tempfile.mkdtemp(prefix="bench_offload_")
    os.makedirs(folder, exist_ok=True)
    t_load0 = os.getloadavg()
    try:
        written = common.peak_memory_in_subprocess(
            "moe_framework.benchmarks.bench_offload:write_files",
            shape=shape,
            folder=folder,
            seed=args.seed,
        )
        expert_mb = written["extra"]["expert_mb"]
        rows = []
        for stream in ("random", "clustered"):
            res = {}
            for kind in ("resident", "offload", "offload_no_pf"):
                r = common.peak_memory_in_subprocess(
                    "moe_framework.benchmarks.bench_offload:run_config",
                    kind=kind,
                    shape=shape,
                    folder=folder,
                    stream=stream,
                    seed=args.seed,
                    threads=threads,
                )
                res[kind] = r
            base = res["resident"]
            for kind, r in res.items():
                x = r["extra"]
                rows.append(
                    {
                        "stream": stream,
                        "config": kind,
                        "tok_per_s": x["tokens_per_s"],
                        "vs_resident": x["tokens_per_s"] / base["extra"]["tokens_per_s"],
                        "hit_rate": x.get("hit_rate", 1.0),
                        "MB_per_tok": x.get("bytes_per_token", 0.0) / 2**20,
                        "stall_s": x.get("stall_s", 0.0),
                        "peak_rss_MB": r["peak_rss_mb"],
                        "rss_ratio": r["peak_rss_mb"] / base["peak_rss_mb"],
                        "delta_MB": r["delta_rss_mb"],
                        "delta_ratio": r["delta_rss_mb"] / base["delta_rss_mb"],
                        "hwm_delta_MB": x["vm_hwm_mb"] - x["vm_hwm_start_mb"],
                        "bitwise": x["checksum"] == base["extra"]["checksum"],
                        "load": f"{x['load_start']:.1f}->{x['load_end']:.1f}",
                    }
                )
        title = (
            f"offloaded experts vs resident: L={shape['L']} E={shape['E']} k={shape['k']} "
            f"d={shape['d']} h={shape['h']} fp32 SwiGLU ({expert_mb:.0f} MB of experts), "
            f"cache {shape['slots']}/{shape['E']} slots per layer, T={shape['T']} tokens/step, "
            f"{threads} compute thread(s)"
        )
        table = common.print_table(rows, title=title)
        common.write_json(
            "bench_offload" + ("_quick" if args.quick else ""),
            {
                "shape": shape,
                "expert_mb": expert_mb,
                "threads": threads,
                "rows": rows,
                "table": table,
                "loadavg_start": t_load0,
                "loadavg_end": os.getloadavg(),
                "machine": common.machine_info(),
            },
            args.out,
        )
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
