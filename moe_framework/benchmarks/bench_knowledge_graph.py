"""KnowledgeGraph at scale: ingest, merge-rule filing, the default index, concurrent readers.

Parts (``--parts``, all by default, run in this order), on one store of ``--n`` nodes x ``--d`` (1M x 384):

* **ingest**: plain inserts, ``add_nodes_batch`` 10k nodes per transaction (WAL +
  synchronous=FULL; the time inside the calls), ``index_type="auto"`` (``--ingest-index``) (exact until 50k nodes, then IVF-SQ8, retrained as
  the store grows: those builds are inside the measured time), until ``--n`` nodes.
* **merge**: the merge rule, ``add_or_update_batch`` of ``--batch`` reports per transaction:
  (a) into an empty store with the exact (flat) index, ``--merge-n`` random reports (the
  issue's baseline: 70k, batches of 10k, measured 435 reports/s on main); (b) into the
  ``--n``-node store with the auto index, a few batches of which 10% repeat stored nodes.
  Per thread count (``--threads``, default 1 and 2: torch and FAISS threads).
* **query**: open the store readonly with the auto index (the build time at open, with its
  log line), single-query ``find_similar_nodes`` p50/p99 and recall@10 against an exact brute
  force of the same queries (torch GEMM over the same vectors); per thread count. Also
  ``ivfpq`` and ``ivf`` at ``--small-n`` (20k) for recall, ``hnsw`` at ``--hnsw-n``.
* **readers**: queries/s with 1, 2, 4 reader threads (``find_similar_nodes`` on the writer's
  handle) while one writer thread ingests 10k-node batches, and the writer's rate meanwhile.

Data: a mixture of Gaussians on the sphere (``n/1000`` centres, noise 0.35/sqrt(d) per
dimension); queries are fresh draws from the same mixture (uniform random vectors would make
every approximate index look bad and are not what expert reports look like).

    python -m moe_framework.benchmarks.bench_knowledge_graph            # 1M x 384 (minutes)
    python -m moe_framework.benchmarks.bench_knowledge_graph --quick    # smoke run (seconds)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

import faiss
import numpy as np
import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.kg.index import VectorIndex
from moe_framework.knowledge_graph import KnowledgeGraph

_BATCH = 10_000


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

    def all(self, n: int, step: int = _BATCH) -> np.ndarray:
        out = np.empty((n, self.d), np.float32)
        for s in range(0, n, step):
            out[s : s + step] = self.chunk(s, min(step, n - s))
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _latency(fn, queries) -> dict:
    """Wall-clock p50/p99 and the p50 of the calling thread's CPU time (on a shared machine the
    wall time includes waiting for a core; the CPU time is what the query itself costs)."""
    fn(queries[0])  # warm-up
    t, c = [], []
    for q in queries:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(q)
        t.append(time.perf_counter() - t0)
        c.append(time.thread_time() - c0)
    ms = np.asarray(t) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_p50_ms": float(np.percentile(np.asarray(c) * 1e3, 50)),
    }


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, exact)]))


def _threads(t: int) -> None:
    torch.set_num_threads(t)
    faiss.omp_set_num_threads(t)


def _exact_top10(mix: Mixture, n: int, uq: np.ndarray) -> np.ndarray:
    """Exact top-10 ids (row + 1) of unit queries over the first ``n`` vectors, by torch GEMM."""
    q = torch.from_numpy(uq)
    best_s = torch.full((len(uq), 10), -torch.inf)
    best_i = torch.full((len(uq), 10), -1, dtype=torch.int64)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        parts = [mix.chunk(c, min(_BATCH, n - c)) for c in range(s, s + m, _BATCH)]
        x = torch.from_numpy(_unit(np.concatenate(parts)))
        sc = q @ x.T
        cs = torch.cat([best_s, sc], 1)
        ci = torch.cat([best_i, torch.arange(s + 1, s + m + 1).expand(len(uq), m)], 1)
        top = cs.topk(10, dim=1)
        best_s, best_i = top.values, ci.gather(1, top.indices)
    return best_i.numpy()


# ------------------------------------------------------------------------------ parts


def part_ingest(args, mix: Mixture, path: str, rows: list, out: dict) -> None:
    ingest_s = 0.0  # inside add_nodes_batch only (not generating the data)
    n = 0
    with KnowledgeGraph.open(path, dim=args.d, verify="none", index_type=args.ingest_index) as kg:
        while n < args.n:
            m = min(_BATCH, args.n - n)
            x = mix.chunk(n, m)
            meta = [{"expert": (n + i) % 64} for i in range(m)]
            t0 = time.perf_counter()
            kg.add_nodes_batch(x, "report", meta)
            ingest_s += time.perf_counter() - t0
            n += m
    size = os.path.getsize(path) + (
        os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    )
    out["ingest"] = {
        "nodes": n,
        "seconds": ingest_s,
        "nodes_per_s": n / ingest_s,
        "bytes_per_node": size / n,
    }
    rows.append(
        {
            "part": f"ingest add_nodes_batch (10k/txn, {args.ingest_index} index)",
            "threads": "-",
            "nodes": n,
            "result": f"{n / ingest_s:,.0f} nodes/s",
            "notes": f"{size / n:,.0f} B/node on disk; index builds included",
        }
    )
    print(rows[-1], flush=True)


def part_merge(args, mix: Mixture, path: str, rows: list, out: dict) -> None:
    for t in args.thread_list:
        _threads(t)
        # (a) the baseline: random reports into an empty store, exact index.
        folder = tempfile.mkdtemp(prefix="kg-merge-", dir=args.tmp)
        try:
            rng = np.random.default_rng(1)
            t0 = time.perf_counter()
            with KnowledgeGraph.open(os.path.join(folder, "kg.sqlite"), dim=args.d) as kg:
                for s in range(0, args.merge_n, args.batch):
                    x = rng.standard_normal((min(args.batch, args.merge_n - s), args.d))
                    kg.add_or_update_batch(x.astype(np.float32), "report")
            dt = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        out.setdefault("merge_empty_flat", {})[t] = {
            "reports": args.merge_n,
            "reports_per_s": args.merge_n / dt,
        }
        rows.append(
            {
                "part": f"merge rule, {args.merge_n // 1000}k random reports, empty store, flat",
                "threads": t,
                "nodes": args.merge_n,
                "result": f"{args.merge_n / dt:,.0f} reports/s",
                "notes": f"batches of {args.batch}; exact search (ops.kg_search)",
            }
        )
        print(rows[-1], flush=True)
    if not os.path.exists(path):
        return
    # (b) into the big store with the auto index: 10% of each batch repeats stored nodes.
    with KnowledgeGraph.open(path, verify="none", index_type="auto") as kg:
        n0 = len(kg)
        for t in args.thread_list:
            _threads(t)
            done = merged = 0
            t0 = time.perf_counter()
            for b in range(args.merge_batches):
                x = mix.chunk(10**9 + 10**6 * t + b * args.batch, args.batch, stream=2)
                # Every 10th report repeats a stored node (the ingest's chunks are reproducible).
                start = (b * 7919) % max(1, n0 // _BATCH) * _BATCH
                old = mix.chunk(start, min(_BATCH, n0 - start))[: args.batch : 10]
                x[: 10 * len(old) : 10] = old * 1.0001
                res = kg.add_or_update_batch(x, "report")
                merged += sum(r.action == "merged" for r in res)
                done += len(res)
            dt = time.perf_counter() - t0
            out.setdefault("merge_store_auto", {})[t] = {
                "store_nodes": n0,
                "reports": done,
                "reports_per_s": done / dt,
                "merged_fraction": merged / done,
            }
            rows.append(
                {
                    "part": "merge rule into the store, auto index",
                    "threads": t,
                    "nodes": n0,
                    "result": f"{done / dt:,.0f} reports/s",
                    "notes": f"{merged / done:.0%} merged; batches of {args.batch}",
                }
            )
            print(rows[-1], flush=True)
        if "readers" in args.parts:  # on the same handle: the store is built once
            _readers(args, mix, kg, rows, out)


class _LogTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


def part_query(args, mix: Mixture, path: str, rows: list, out: dict) -> None:
    queries = mix.chunk(0, args.nq, stream=1)
    uq = _unit(queries)
    if os.path.exists(path):
        n = None
        logger = logging.getLogger("moe_framework.knowledge_graph")
        handler = _LogTimes()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            _threads(max(args.thread_list))
            t0 = time.perf_counter()
            kg = KnowledgeGraph.open(path, readonly=True, verify="none", index_type="auto")
            open_s = time.perf_counter() - t0
        finally:
            logger.removeHandler(handler)
        with kg:
            n = min(len(kg), args.n)  # run before "merge" / "readers", which add nodes
            truth = _exact_top10(mix, n, uq)
            for t in args.thread_list:
                _threads(t)
                lat = _latency(lambda q: kg.find_similar_nodes(q, top_k=10), queries)
                _, ids = kg.search(queries, 10)
                rec = _recall(ids, truth)
                out.setdefault("query_auto", {})[t] = {
                    "nodes": n,
                    "open_build_s": open_s,
                    "build_log": handler.lines,
                    **lat,
                    "recall_at_10": rec,
                }
                rows.append(
                    {
                        "part": "query auto index (find_similar_nodes, k=10)",
                        "threads": t,
                        "nodes": n,
                        "result": f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms",
                        "notes": f"recall@10 {rec:.3f}; CPU p50 {lat['cpu_p50_ms']:.2f} ms; "
                        f"open + build {open_s:.1f} s",
                    }
                )
                print(rows[-1], flush=True)
    # Index types on their own (VectorIndex, exact re-scoring from memory) at small sizes.
    _threads(max(args.thread_list))
    for itype, size in (("ivfpq", args.small_n), ("ivf", args.small_n), ("hnsw", args.hnsw_n)):
        if size <= 0:
            continue
        data = _unit(mix.all(size))
        truth = np.argsort(-(uq @ data.T), axis=1)[:, :10] + 1
        idx = VectorIndex(
            args.d, itype, {"train_min": min(size, 20000)} if itype != "hnsw" else None
        )
        t1 = time.perf_counter()
        idx.rebuild(np.arange(1, size + 1, dtype=np.int64), data)
        build_s = time.perf_counter() - t1

        def exact(cand, q, data=data):
            return np.einsum("ij,ij->i", data[cand - 1], q)

        lat = _latency(lambda q, idx=idx, ex=exact: idx.search(q[None], 10, ex), uq)
        _, found = idx.search(uq, 10, exact)
        rec = _recall(found, truth)
        out.setdefault("index_small", {})[f"{itype}@{size}"] = {
            "build_s": build_s,
            **lat,
            "recall_at_10": rec,
        }
        rows.append(
            {
                "part": f"index {itype} alone (VectorIndex, re-scored)",
                "threads": max(args.thread_list),
                "nodes": size,
                "result": f"p50 {lat['p50_ms']:.2f} ms (CPU {lat['cpu_p50_ms']:.2f} ms)",
                "notes": f"recall@10 {rec:.3f}; build {build_s:.1f} s",
            }
        )
        print(rows[-1], flush=True)


def part_readers(args, mix: Mixture, path: str, rows: list, out: dict) -> None:
    if "readers" in out or not os.path.exists(path):
        return  # done by "merge" on its handle
    with KnowledgeGraph.open(path, verify="none", index_type="auto") as kg:
        _readers(args, mix, kg, rows, out)


def _readers(args, mix: Mixture, kg: KnowledgeGraph, rows: list, out: dict) -> None:
    queries = mix.chunk(0, 256, stream=1)
    _threads(1)  # one core for the writer, the other for the readers
    for n_readers in (1, 2, 4):
        stop = threading.Event()
        counts = [0] * n_readers
        errors: list = []

        def reader(r: int, stop=stop, counts=counts, errors=errors, n_readers=n_readers) -> None:
            try:
                i = r
                while not stop.is_set():
                    kg.find_similar_nodes(queries[i % len(queries)], top_k=10)
                    counts[r] += 1
                    i += n_readers
            except Exception as exc:  # reported in the JSON, never hidden
                errors.append(repr(exc))

        threads = [threading.Thread(target=reader, args=(r,)) for r in range(n_readers)]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        written = 0
        while time.perf_counter() - t0 < args.reader_s:
            x = mix.chunk(2 * 10**9 + n_readers * 10**7 + written, _BATCH // 2, stream=3)
            kg.add_nodes_batch(x, "report")
            written += len(x)
        dt = time.perf_counter() - t0
        stop.set()
        for th in threads:
            th.join()
        qps = sum(counts) / dt
        out.setdefault("readers", {})[n_readers] = {
            "queries_per_s": qps,
            "writer_nodes_per_s": written / dt,
            "seconds": dt,
            "errors": errors,
        }
        rows.append(
            {
                "part": f"{n_readers} reader thread(s) + 1 writer",
                "threads": n_readers + 1,
                "nodes": len(kg),
                "result": f"{qps:,.0f} queries/s",
                "notes": f"writer {written / dt:,.0f} nodes/s meanwhile; errors {len(errors)}",
            }
        )
        print(rows[-1], flush=True)


PARTS = {"ingest": part_ingest, "query": part_query, "merge": part_merge, "readers": part_readers}


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--n", type=int, default=1_000_000, help="nodes in the store")
    p.add_argument("--batch", type=int, default=_BATCH, help="reports per add_or_update_batch")
    p.add_argument("--merge-n", type=int, default=70_000, help="reports into the empty store")
    p.add_argument("--merge-batches", type=int, default=2, help="merge batches into the store")
    p.add_argument("--nq", type=int, default=200, help="single queries timed")
    p.add_argument("--small-n", type=int, default=20_000, help="ivfpq / ivf alone at this N")
    p.add_argument("--hnsw-n", type=int, default=20_000, help="hnsw alone at this N (0: skip)")
    p.add_argument("--reader-s", type=float, default=8.0, help="seconds per reader config")
    p.add_argument("--ingest-index", default="auto", help="index_type while ingesting")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--store", default=None, help="keep the store here (reused when it exists)")
    p.add_argument("--tmp", default=None, help="folder for the temporary store")
    args = p.parse_args()
    if args.quick:
        args.n, args.d, args.merge_n, args.batch, args.nq = 60_000, 64, 6000, 2000, 50
        args.small_n, args.hnsw_n, args.reader_s, args.merge_batches = 20_000, 5000, 1.0, 1
    args.thread_list = common.thread_counts(args.threads or [1, 2])
    mix = Mixture(args.d, n_centers=max(100, args.n // 1000))
    info = common.machine_info()
    info["faiss"] = faiss.__version__
    out: dict = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    out["loadavg_start"] = os.getloadavg()
    folder = None
    if args.store:
        path = args.store
    else:
        folder = tempfile.mkdtemp(prefix="kg-bench-", dir=args.tmp)
        path = os.path.join(folder, "kg.sqlite")
    rows: list = []
    try:
        for name in args.parts:
            if name == "ingest" and os.path.exists(path):
                print(f"ingest: reusing {path}", flush=True)
                continue
            t0 = time.perf_counter()
            PARTS[name](args, mix, path, rows, out)
            out.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
            out["loadavg_end"] = os.getloadavg()
            common.write_json("knowledge_graph", out, args.out)  # after each part
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    common.print_table(
        rows, ["part", "threads", "nodes", "result", "notes"], title=f"knowledge graph, d={args.d}"
    )
    print(f"load average: start {out['loadavg_start']}, end {out['loadavg_end']}")
    common.write_json("knowledge_graph", out, args.out)


if __name__ == "__main__":
    main()
