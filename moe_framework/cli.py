"""Command line: ``python -m moe_framework {demo,bench,kg,info}`` (also the ``moe-framework`` script).

- ``demo``: train a small MoE next to a dense baseline on scikit-learn's digits, consolidate the
  experts' reports into a knowledge graph, query it, write plots + model + summary (docs/demo.md).
- ``bench``: run every benchmark script under ``benchmarks/`` (``--quick`` by default).
- ``kg``: inspect, query and export a knowledge-graph store.
- ``info``: versions, which kernels were built for which devices, thread settings.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


# ====================================================================== info


def _version(*dists: str) -> str:
    # Package metadata, not an import: importing transformers alone takes seconds.
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def info_dict() -> dict:
    """Everything ``info`` prints, as a JSON-able dict."""
    import torch

    import moe_framework
    from moe_framework import ops

    cuda = torch.cuda.is_available()
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    return {
        "versions": {
            "python": platform.python_version(),
            "moe_framework": moe_framework.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "numpy": _version("numpy"),
            "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
            "safetensors": _version("safetensors"),
            "scikit-learn": _version("scikit-learn"),
            "tqdm": _version("tqdm"),
            "matplotlib": _version("matplotlib"),
            "transformers": _version("transformers"),
        },
        "platform": platform.platform(),
        "extension": getattr(moe_framework._C, "__file__", "?"),
        "cuda_available": cuda,
        "cuda_devices": devices,
        "kernels": ops.registered_kernels(),
        "threads": {
            "torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads(),
            "os.cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }


def cmd_info(args: argparse.Namespace) -> int:
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print("moe_framework", d["versions"]["moe_framework"], "|", d["platform"])
    print("\nversions")
    for k, v in d["versions"].items():
        print(f"  {k:<14} {v}")
    print(f"\nextension: {d['extension']}")
    cuda = ", ".join(d["cuda_devices"]) or "none"
    print(f"CUDA available: {d['cuda_available']} (devices: {cuda})")
    print("\nkernels (dispatch keys with a registered kernel)")
    print(f"  {'op':<22} {'CPU':<4} {'CUDA':<5} {'Meta':<4}")
    for op, keys in d["kernels"].items():
        marks = ["yes" if k in keys else "-" for k in ("CPU", "CUDA", "Meta")]
        print(f"  {op:<22} {marks[0]:<4} {marks[1]:<5} {marks[2]:<4}")
    print("\nthreads")
    for k, v in d["threads"].items():
        print(f"  {k:<30} {v}")
    return 0


# ====================================================================== bench


def _benchmark_dir(explicit: Optional[str]) -> Optional[str]:
    if explicit:
        return explicit
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.getcwd(), "benchmarks"), os.path.join(here, "..", "benchmarks")):
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    return None


# Runs a benchmark as a module (the scripts import ``benchmarks.common``) with the folder holding
# benchmarks/ *appended* to sys.path: ``python -m`` would put the cwd first, and a source checkout
# would then shadow the installed moe_framework (whose compiled extension the checkout may lack).
_BENCH_RUNNER = (
    "import os, runpy, sys\n"
    "root, module = sys.argv[1], sys.argv[2]\n"
    "sys.path = [p for p in sys.path if p not in ('', os.getcwd(), root)] + [root]\n"
    "sys.argv = [module] + sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def find_benchmarks(bench_dir: str, pattern: Optional[str] = None) -> list:
    """Benchmark scripts in ``bench_dir``: every ``*.py`` except the shared harness and helpers
    (``common.py``, ``_*.py``), sorted; ``pattern`` keeps names containing it."""
    out = []
    for p in sorted(glob.glob(os.path.join(bench_dir, "*.py"))):
        name = os.path.basename(p)
        if name in ("common.py", "conftest.py") or name.startswith("_"):
            continue
        if pattern and pattern not in name:
            continue
        out.append(p)
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmark_dir(args.dir)
    if bench_dir is not None:
        bench_dir = os.path.abspath(bench_dir)
    if bench_dir is None or not os.path.isdir(bench_dir):
        print(
            "bench: no benchmarks/ folder found (run from the source checkout or pass --dir)",
            file=sys.stderr,
        )
        return 2
    scripts = find_benchmarks(bench_dir, args.only)
    if not scripts:
        print(f"bench: no benchmark scripts in {bench_dir}", file=sys.stderr)
        return 2
    extra = [] if args.full else ["--quick"]
    results = []
    for path in scripts:
        name = os.path.basename(path)
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        # Each prints its own table and writes JSON under bench_results/ (of the cwd).
        module = f"{os.path.basename(bench_dir)}.{os.path.splitext(name)[0]}"
        cmd = [sys.executable, "-c", _BENCH_RUNNER, os.path.dirname(bench_dir), module, *extra]
        rc = subprocess.call(cmd, cwd=os.path.dirname(bench_dir))
        results.append((name, rc, time.perf_counter() - t0))
    print("\nbenchmark suite")
    print(f"  {'script':<32} {'status':<8} {'seconds':>8}")
    for name, rc, sec in results:
        print(f"  {name:<32} {'ok' if rc == 0 else f'rc={rc}':<8} {sec:>8.1f}")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


# ====================================================================== kg


def _parse_vector(text: str):
    import numpy as np

    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"kg: --vector must be a JSON list of numbers ({exc})") from None
    return np.asarray(v, dtype=np.float32)


def cmd_kg(args: argparse.Namespace) -> int:
    if not os.path.exists(args.store):
        print(f"kg: {args.store} does not exist", file=sys.stderr)
        return 2
    import numpy as np

    from moe_framework.knowledge_graph import KnowledgeGraph

    with KnowledgeGraph.open(args.store, readonly=True) as kg:
        print(f"store: {args.store}")
        print(f"  nodes: {len(kg)}  edges: {kg.num_edges()}  dim: {kg.dim}")
        if args.list:
            for i, node in enumerate(kg.iter_nodes()):
                if i >= args.list:
                    break
                meta = json.dumps(node.metadata, sort_keys=True)
                print(f"  node {node.id:>5} {node.type:<10} merges={node.merge_count:<4} {meta}")
        query = None
        if args.like is not None:
            query = kg.get_node(args.like).embedding
            print(f"\nnodes most similar to node {args.like}:")
        elif args.vector is not None:
            query = _parse_vector(args.vector)
            print("\nnodes most similar to the given vector:")
        if query is not None:
            for hit in kg.find_similar_nodes(np.asarray(query), top_k=args.top_k):
                meta = json.dumps(hit.metadata, sort_keys=True)
                print(f"  node {hit.id:>5} cos={hit.score:+.3f} {hit.type:<10} {meta}")
        if args.where:
            key, _, value = args.where.partition("=")
            print(f"\nnodes with metadata {key} == {value!r}:")
            for node in kg.iter_nodes():
                if str(node.metadata.get(key)) == value:
                    print(f"  node {node.id:>5} {json.dumps(node.metadata, sort_keys=True)}")
        if args.export_json:
            kg.to_json(args.export_json, include_embeddings=not args.no_embeddings)
            print(f"wrote {args.export_json}")
        if args.export_graphml:
            kg.to_graphml(args.export_graphml)
            print(f"wrote {args.export_graphml}")
        if args.draw:
            import matplotlib

            matplotlib.use("Agg")
            kg.draw(args.draw, color_by=args.color_by)
            print(f"wrote {args.draw}")
    return 0


# ====================================================================== demo


def cmd_demo(args: argparse.Namespace) -> int:
    from moe_framework.demo import run_demo

    run_demo(
        out_dir=args.out,
        device=args.device,
        epochs=args.epochs,
        tiny=args.tiny,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads or None,
    )
    return 0


# ====================================================================== parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moe_framework",
        description="moe_framework: Mixture-of-Experts on our own C++/CUDA operators",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train MoE vs dense on digits, build and query the KG")
    d.add_argument("--out", default=os.path.join("outputs", "demo"), help="output folder")
    d.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 30)")
    d.add_argument("--tiny", action="store_true", help="a few seconds: for tests and smoke runs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the model is tiny; 0 = torch's default)",
    )
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run the benchmark suite in benchmarks/ and print tables")
    b.add_argument("--dir", default=None, help="benchmarks folder (default ./benchmarks)")
    b.add_argument("--only", default=None, help="run scripts whose name contains this")
    b.add_argument("--full", action="store_true", help="full sizes (default passes --quick)")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("kg", help="inspect, query and export a knowledge-graph store")
    k.add_argument("store", help="path of the SQLite store (e.g. outputs/demo/knowledge.sqlite)")
    k.add_argument("--list", type=int, default=20, metavar="N", help="print the first N nodes")
    k.add_argument("--like", type=int, default=None, metavar="ID", help="nodes similar to ID")
    k.add_argument("--vector", default=None, help="nodes similar to a JSON list of floats")
    k.add_argument("--where", default=None, metavar="KEY=VALUE", help="filter by metadata")
    k.add_argument("--top-k", type=int, default=5)
    k.add_argument("--export-json", default=None, metavar="PATH")
    k.add_argument("--no-embeddings", action="store_true", help="JSON export without embeddings")
    k.add_argument("--export-graphml", default=None, metavar="PATH")
    k.add_argument("--draw", default=None, metavar="PNG")
    k.add_argument("--color-by", default="expert", help="metadata field colouring --draw")
    k.set_defaults(func=cmd_kg)

    i = sub.add_parser("info", help="versions, built kernels per device, thread settings")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
