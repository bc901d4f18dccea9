"""KnowledgeGraph store and index benchmarks (d = 384 by default).

Three parts, one run:

* **store**: ingest into a fresh SQLite store (``add_nodes_batch``, 10k nodes per transaction,
  WAL + synchronous=FULL) until ``--store-n`` nodes or ``--budget`` seconds; then the filing rate
  of the merge rule (``add_or_update_batch``, 256 reports per batch, like a librarian); reopening
  time (validation + index rebuild) and single-query latency p50/p99 of ``find_similar_nodes``
  (FAISS search + SQLite fetch of the hits) for each index type, and recall@10 against the exact
  index on the same queries.
* **index**: the derived FAISS index alone (``VectorIndex``) at ``--index-n`` nodes (1M by
  default): build time, p50/p99 single-query latency, batched (q=64) throughput, recall@10.
* Baseline in the same run: exact search (``flat``) is the reference for every recall number;
  its own recall@10 is 1.0 by construction and checked against a numpy brute force.

Data: a mixture of Gaussians on the sphere (``n/1000`` centres, noise 0.35/sqrt(d) per
dimension), queries are fresh draws from the same mixture — uniform random vectors would make every
approximate index look bad and are not what expert reports look like.

    python -m moe_framework.benchmarks.bench_knowledge_graph            # full run (~15 min on 2 cores)
    python -m moe_framework.benchmarks.bench_knowledge_graph --quick    # smoke run (seconds)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import faiss
import numpy as np

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.kg.index import VectorIndex
from moe_framework.knowledge_graph import KnowledgeGraph


class Mixture:
    """Deterministic clustered embeddings: ``chunk(i, n)`` is the same array on every call."""

    def __init__(self, d: int, n_centers: int, noise: float = 0.35, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((n_centers, d))
        self.centers = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        self.d, self.noise, self.seed = d, noise / np.sqrt(d), seed

    def chunk(self, start: int, n: int, stream: int = 0) -> np.ndarray:
        rng = np.random.default_rng((self.seed, stream, start))
        idx = rng.integers(0, len(self.centers), n)
        x = self.centers[idx] + self.noise * rng.standard_normal((n, self.d), dtype=np.float32)
        return x.astype(np.float32)

    def all(self, n: int, step: int = 100_000) -> np.ndarray:
        out = np.empty((n, self.d), np.float32)
        for s in range(0, n, step):
            out[s : s + step] = self.chunk(s, min(step, n - s))
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _latency(fn, queries) -> dict:
    fn(queries[0])  # warm-up
    t = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        t.append(time.perf_counter() - t0)
    ms = np.asarray(t) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, exact)]))


# ------------------------------------------------------------------------------ store


def bench_store(args, mix: Mixture, queries: np.ndarray, rows: list, out: dict) -> None:
    folder = tempfile.mkdtemp(prefix="kg-bench-", dir=args.tmp)
    path = os.path.join(folder, "kg.sqlite")
    try:
        batch = 10_000 if not args.quick else 1000
        t0 = time.perf_counter()
        n = 0
        with KnowledgeGraph.open(path, dim=args.d, verify="none") as kg:
            while n < args.store_n and time.perf_counter() - t0 < args.budget:
                m = min(batch, args.store_n - n)
                x = mix.chunk(n, m)
                kg.add_nodes_batch(x, "report", [{"expert": (n + i) % 64} for i in range(m)])
                n += m
            ingest_s = time.perf_counter() - t0
            size = os.path.getsize(path) + os.path.getsize(path + "-wal")
            # Merge-rule filing: reports near existing nodes (merges) and fresh ones (inserts).
            n_batches, b = (5, 256) if not args.quick else (3, 64)
            t1 = time.perf_counter()
            merged = 0
            for i in range(n_batches):
                rep = mix.chunk(10**9 + i * b, b, stream=2)
                merged += sum(r.action == "merged" for r in kg.add_or_update_batch(rep))
            file_s = time.perf_counter() - t1
        print(f"store: ingested {n} nodes in {ingest_s:.1f} s", flush=True)
        out["store"] = {
            "nodes": n,
            "ingest_s": ingest_s,
            "ingest_nodes_per_s": n / ingest_s,
            "bytes_per_node": size / n,
            "file_reports_per_s": n_batches * b / file_s,
            "file_merged_fraction": merged / (n_batches * b),
        }
        rows.append(
            {
                "part": "store ingest (add_nodes_batch, 10k/txn)",
                "nodes": n,
                "rate": f"{n / ingest_s:,.0f} nodes/s",
                "notes": f"{size / n:,.0f} B/node on disk",
            }
        )
        rows.append(
            {
                "part": "merge-rule filing (add_or_update_batch, 256/txn)",
                "nodes": n,
                "rate": f"{n_batches * b / file_s:,.0f} reports/s",
                "notes": f"{merged / (n_batches * b):.0%} merged",
            }
        )

        exact_ids = None
        for itype in args.store_index:
            if itype == "hnsw" and n > args.hnsw_max:
                rows.append(
                    {
                        "part": "store query hnsw",
                        "nodes": n,
                        "rate": "skipped",
                        "notes": f"HNSW build above --hnsw-max={args.hnsw_max}",
                    }
                )
                continue
            t2 = time.perf_counter()
            with KnowledgeGraph.open(path, index_type=itype, readonly=True, verify="quick") as kg:
                open_s = time.perf_counter() - t2
                lat = _latency(lambda q: kg.find_similar_nodes(q, top_k=10), queries[: args.nq])
                _, ids = kg.search(queries, 10)
            if itype == "flat":
                exact_ids = ids
            rec = _recall(ids, exact_ids) if exact_ids is not None else float("nan")
            out.setdefault("store_query", {})[itype] = {
                "open_s": open_s,
                **lat,
                "recall_at_10": rec,
            }
            rows.append(
                {
                    "part": f"store query {itype} (find_similar_nodes, k=10)",
                    "nodes": n,
                    "rate": f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms",
                    "notes": f"recall@10 {rec:.3f}; open+rebuild {open_s:.1f} s",
                }
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ index only


def bench_index(args, mix: Mixture, queries: np.ndarray, rows: list, out: dict) -> None:
    n = args.index_n
    t0 = time.perf_counter()
    data = _unit(mix.all(n))
    out["index_data_gen_s"] = time.perf_counter() - t0
    uq = _unit(queries)
    truth: dict = {}  # size -> exact top-10 ids (from the flat index of that size)
    plan = [(t, n if t != "hnsw" else min(n, args.hnsw_max)) for t in args.index_types]
    for itype, size in sorted(plan, key=lambda p: (p[1], p[0] != "flat")):
        sub = data[:size]
        if itype != "flat" and size not in truth:
            flat = VectorIndex(args.d, "flat")
            flat.rebuild(np.arange(1, size + 1), sub)
            truth[size] = flat.search(uq, 10)[1]
            del flat
        idx = VectorIndex(args.d, itype)
        t1 = time.perf_counter()
        idx.rebuild(np.arange(1, size + 1, dtype=np.int64), sub)
        build_s = time.perf_counter() - t1

        # Approximate indexes re-score candidates against current embeddings (the store does
        # it from SQLite); here the data is in memory.
        def exact(cand, q, sub=sub):
            return np.einsum("ij,ij->i", sub[cand - 1], q)

        def one_query(q, idx=idx, ex=exact):
            return idx.search(q[None], 10, ex)

        def batch_of_64(idx=idx, ex=exact):
            return idx.search(uq[:64], 10, ex)

        lat = _latency(one_query, uq[: args.nq])
        t = common.timeit(batch_of_64, min_time=0.5, warmup=1)
        _, found = idx.search(uq, 10, exact)
        if itype == "flat":
            truth[size] = found
            # The exact path against a numpy brute force on a subset of queries.
            bf = np.argsort(-(uq[:20] @ sub.T), axis=1)[:, :10] + 1
            out.setdefault("flat_vs_bruteforce_recall", {})[size] = _recall(found[:20], bf)
        rec = _recall(found, truth[size])
        out.setdefault("index", {})[f"{itype}@{size}"] = {
            "nodes": size,
            "build_s": build_s,
            **lat,
            "batch64_qps": 64 / t["median_s"],
            "recall_at_10": rec,
        }
        rows.append(
            {
                "part": f"index {itype} (VectorIndex.search, k=10)",
                "nodes": size,
                "rate": f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms; "
                f"{64 / t['median_s']:,.0f} q/s at q=64",
                "notes": f"recall@10 {rec:.3f}; build {build_s:.1f} s",
            }
        )
        print(rows[-1], flush=True)
        del idx


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--store-n", type=int, default=1_000_000)
    p.add_argument("--budget", type=float, default=180.0, help="seconds of store ingest at most")
    p.add_argument("--index-n", type=int, default=1_000_000)
    p.add_argument("--hnsw-max", type=int, default=100_000, help="HNSW is built at min(N, this)")
    p.add_argument("--nq", type=int, default=200, help="single queries timed")
    p.add_argument("--store-index", nargs="*", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--index-types", nargs="*", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--skip-store", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--tmp", default=None, help="folder for the temporary store")
    args = p.parse_args()
    if args.quick:
        args.store_n, args.index_n, args.nq, args.d = 20_000, 30_000, 50, 64
    mix = Mixture(args.d, n_centers=max(100, max(args.store_n, args.index_n) // 1000))
    queries = mix.chunk(0, 1000 if not args.quick else 200, stream=1)
    info = common.machine_info()
    info["faiss"] = faiss.__version__
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    out = {"machine": info, "args": vars(args)}
    rows: list = []
    if not args.skip_store:
        bench_store(args, mix, queries, rows, out)
    if not args.skip_index:
        bench_index(args, mix, queries, rows, out)
    common.print_table(
        rows, ["part", "nodes", "rate", "notes"], title=f"knowledge graph, d={args.d}"
    )
    common.write_json("knowledge_graph", out, args.out)


if __name__ == "__main__":
    main()
