"""HNSW at scale (issue 19): build time (with the index's progress bar and log line), memory,
single-query p50/p99 and recall@10 against an exact brute force, for ``--n`` unit vectors of
``--d`` dimensions from the knowledge-graph benchmark's clustered mixture.

The index is the knowledge graph's own :class:`~moe_framework.kg.index.VectorIndex` with
``index_type="hnsw"`` (candidates re-scored exactly, from the vectors in memory here). The build
is fed in chunks of ``--chunk`` vectors; with ``--lock PATH`` the shared benchmark lock is taken
for each chunk and released between them (the build of 1M vectors takes many minutes on a
2-core CPU; other benchmarks may run between chunks), and only the time inside the chunks'
inserts is counted as build time.

    python -m moe_framework.benchmarks.bench_kg_hnsw --n 1000000 --lock /tmp/moe_bench.lock
    python -m moe_framework.benchmarks.bench_kg_hnsw --quick      # 20k x 64 (seconds)
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time

import faiss
import numpy as np
import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.benchmarks.bench_kg_merge import _locked
from moe_framework.benchmarks.bench_knowledge_graph import (
    Mixture,
    _latency,
    _recall,
    _threads,
    _unit,
)
from moe_framework.kg.index import VectorIndex, _Progress


def _rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _measure(args, idx, data, uq, n: int) -> dict:
    """p50/p99 and recall@10 (against a brute force over the ``n`` vectors inserted so far)."""

    def exact(cand, q):
        return np.einsum("ij,ij->i", data[cand - 1], q)

    with _locked(args.lock):
        load0 = os.getloadavg()
        lat = _latency(lambda q: idx.search(q[None], 10, exact), uq)
        _, found = idx.search(uq, 10, exact)
        truth = (torch.from_numpy(uq) @ torch.from_numpy(data[:n]).T).topk(10, dim=1).indices + 1
        rec = _recall(found, truth.numpy())
        return {**lat, "recall_at_10": rec, "loadavg_query": [load0, os.getloadavg()]}


def run(args, out: dict) -> list:
    """Build in locked chunks; at each checkpoint (``--checkpoints``, and at ``--n``) measure
    queries and write the JSON, so a build cut short by ``--max-s`` still reports. The first
    checkpoint's vectors go through ``VectorIndex.rebuild_from_chunks`` (its progress bar and
    log line), later ones through ``VectorIndex.add``."""
    _threads(args.threads)
    mix = Mixture(args.d, n_centers=max(100, args.n // 1000))
    data = _unit(mix.all(args.n))  # the exact vectors: brute force truth and re-scoring
    uq = _unit(mix.chunk(0, args.nq, stream=1))
    rss0 = _rss_mb()
    idx = VectorIndex(args.d, "hnsw", progress=args.progress or None)
    timing: dict = {"add_s": 0.0, "load": []}
    stops = sorted({c for c in args.checkpoints if 0 < c < args.n} | {args.n})
    t_start = time.perf_counter()

    def chunks(lo: int, hi: int):
        for s in range(lo, hi, args.chunk):
            m = min(args.chunk, hi - s)
            with _locked(args.lock):
                timing["load"].append(os.getloadavg()[0])
                t0 = time.perf_counter()
                yield np.arange(s + 1, s + m + 1, dtype=np.int64), data[s : s + m]
                timing["add_s"] += time.perf_counter() - t0

    results: list = []
    done = 0
    for stop in stops:
        if done == 0:
            idx.rebuild_from_chunks(chunks(0, stop), stop)
        else:
            bar = _Progress(bool(args.progress), stop - done, f"hnsw index: adding to {stop}")
            with bar:
                for ids, vecs in chunks(done, stop):
                    idx.add(ids, vecs)
                    bar.update(len(ids))
        done = stop
        res = {
            "n": done,
            "d": args.d,
            "threads": args.threads,
            "params": idx.params,
            "build_s": timing["add_s"],
            "build_rate_vec_per_s": done / timing["add_s"],
            "wall_s_incl_lock_waits": time.perf_counter() - t_start,
            "rss_index_mib": _rss_mb() - rss0,
            "bytes_per_vector_model": 4 * args.d
            + 4 * 2 * int(idx.params["M"]),  # level 0: 2M int32
            "loadavg_1min_per_chunk": list(timing["load"]),
            "nq": args.nq,
            **_measure(args, idx, data, uq, done),
        }
        results.append(res)
        print({k: v for k, v in res.items() if k != "loadavg_1min_per_chunk"}, flush=True)
        out["hnsw"] = results
        common.write_json("kg_hnsw", out, args.out)
        if args.max_s and time.perf_counter() - t_start > args.max_s:
            print(f"stopping after {done} vectors: --max-s {args.max_s} reached", flush=True)
            break
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--nq", type=int, default=200, help="queries timed and checked")
    p.add_argument("--chunk", type=int, default=50_000, help="vectors per locked build chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lock", default=None, help="take this flock file per chunk")
    p.add_argument("--progress", action="store_true", help="force the tqdm bar")
    p.add_argument(
        "--checkpoints", type=int, nargs="*", default=[100_000, 250_000, 500_000, 750_000]
    )
    p.add_argument("--max-s", type=float, default=0, help="stop at the next checkpoint after")
    p.add_argument("--quick", action="store_true", help="20k x 64 smoke run")
    p.add_argument("--out", default=None, help="folder for the JSON")
    args = p.parse_args()
    if args.quick:
        args.n, args.d, args.nq, args.chunk, args.checkpoints = 20_000, 64, 50, 5000, [10_000]
    logging.basicConfig(level=logging.INFO)
    out: dict = {"machine": common.machine_info(), "faiss": faiss.__version__}
    out["loadavg_start"] = os.getloadavg()
    res_all = run(args, out)
    out["loadavg_end"] = os.getloadavg()
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        {
            "index": f"hnsw M={res['params']['M']} efC={res['params']['ef_construction']} "
            f"efS={res['params']['ef_search']}",
            "threads": res["threads"],
            "nodes": res["n"],
            "build": f"{res['build_s']:.0f} s ({res['build_rate_vec_per_s']:,.0f} vec/s)",
            "RAM": f"{res['rss_index_mib']:,.0f} MiB",
            "query": f"p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms",
            "recall@10": f"{res['recall_at_10']:.3f}",
        }
        for res in res_all
    ]
    common.print_table(rows, list(rows[0]), title=f"HNSW, d={args.d}")
    print(f"load average: start {out['loadavg_start']}, end {out['loadavg_end']}")
    print(common.write_json("kg_hnsw", out, args.out))


if __name__ == "__main__":
    main()
