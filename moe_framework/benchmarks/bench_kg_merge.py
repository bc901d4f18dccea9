"""Merge-rule ingest at scale (issue 19): ``add_or_update_batch`` of ``--batch`` reports into a
store of N nodes with the default (``auto``) index, where the time goes per batch, the limits
that bind, and how often the approximate path decides as the exact rule does.

* **rate**: per thread count (``--threads``) and report mix (``--modes``), one batch each,
  with the per-phase times of the call (``KnowledgeGraph._last_merge_times``: candidate search
  (one FAISS call), confirming candidates on the stored vectors, the batch's causal GEMM, the
  per-report decisions, the SQL writes, the COMMIT and index update). Modes: ``none`` (uniform
  random reports: every one inserts), ``all`` (near-copies of stored nodes: every one merges),
  ``mix`` (a third each of near-copies, fresh draws from the store's mixture — cosine about
  0.9 to their neighbours, at the threshold — and random reports).
* **search** (``--search``): the candidate search alone on one batch, FAISS's IVF search vs the
  list GEMMs (``kg/ivf_batch.py``), same lists and k.
* **limits**: the SQLite write rate of those rows (rows written / seconds in ``executemany`` +
  COMMIT) and the FAISS candidate search alone, each as a ceiling in reports/s; with
  ``--sqlite-rows``, raw SQLite's own insert rate for node-shaped rows (the store's settings,
  nothing of ours in the loop).
* **agreement**: ``--agree-n`` ``mix`` reports decided (no write) by the approximate path, for
  each ``--merge-nprobe``, and by the exact rule (a CPU device bank: exact ``ops.kg_search``);
  the fraction of reports with the same action and node.

The store is ``--store`` (modified: reports are filed into it; ``--base`` copies a pristine
store there first) or, without it, a fresh store of ``--n`` nodes of the knowledge-graph
benchmark's mixture (``bench_knowledge_graph.Mixture``, node id = row + 1).

    python -m moe_framework.benchmarks.bench_kg_merge --store /scratch/kg1m.sqlite --base /scratch/kg1m.base.sqlite
    python -m moe_framework.benchmarks.bench_kg_merge --n 100000 --modes --agree-n 2000
    python -m moe_framework.benchmarks.bench_kg_merge --quick      # 60k x 64 (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time

import numpy as np

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.benchmarks.bench_knowledge_graph import Mixture, _threads
from moe_framework.kg import schema as _s
from moe_framework.kg.merge_plan import MergePlan
from moe_framework.knowledge_graph import KnowledgeGraph

_CHUNK = 10_000  # the mixture's chunk (rows of one reproducible draw)


@contextlib.contextmanager
def _locked(path):
    """Hold the flock file ``path`` (nothing when None)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _near_copies(mix: Mixture, n_nodes: int, m: int, rng) -> np.ndarray:
    """``m`` stored nodes (from ten random chunks of the store's mixture) plus noise of relative
    size 0.02 (cosine ~0.9998 with the node they copy)."""
    n_chunks = max(1, n_nodes // _CHUNK)
    picks = rng.choice(n_chunks, min(10, n_chunks), replace=False)
    parts = []
    for k, c in enumerate(picks):
        take = m // len(picks) + (1 if k < m % len(picks) else 0)
        rows = mix.chunk(int(c) * _CHUNK, min(_CHUNK, n_nodes - int(c) * _CHUNK))
        parts.append(rows[rng.choice(len(rows), min(take, len(rows)), replace=False)])
    x = np.concatenate(parts)[:m]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return (
        x + 0.02 * np.linalg.norm(x, axis=1, keepdims=True) * noise / np.sqrt(x.shape[1])
    ).astype(np.float32)


def reports(mode: str, mix: Mixture, n_nodes: int, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = mix.d
    if mode == "none":
        return rng.standard_normal((m, d)).astype(np.float32)
    if mode == "all":
        return _near_copies(mix, n_nodes, m, rng)
    a, b = m // 3, m // 3
    x = np.concatenate(
        [
            _near_copies(mix, n_nodes, a, rng),
            mix.chunk(10**9 + seed, b, stream=3),  # fresh draws: at the threshold
            rng.standard_normal((m - a - b, d)).astype(np.float32),
        ]
    )
    return x[rng.permutation(m)]


def _build_store(path: str, mix: Mixture, n: int) -> None:
    with KnowledgeGraph.open(path, dim=mix.d, verify="none", index_type="flat") as kg:
        for s in range(0, n, _CHUNK):
            kg.add_nodes_batch(mix.chunk(s, min(_CHUNK, n - s)), "report")


def part_rate(args, kg, mix, n0, rows: list, out: dict) -> None:
    for t in args.thread_list:
        _threads(t)
        for b, mode in enumerate(args.modes):
            x = reports(mode, mix, n0, args.batch, seed=100 * t + b)
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            res = kg.add_or_update_batch(x, "report")
            dt = time.perf_counter() - t0
            # No phase times from a checkout without them (a baseline run of older code).
            ph = dict(getattr(kg, "_last_merge_times", None) or {})
            merged = sum(r.action == "merged" for r in res)
            sql_s = ph.get("sql_writes", np.nan) + ph.get("commit_and_index", np.nan)
            rec = {
                "threads": t,
                "mode": mode,
                "store_nodes": len(kg),
                "reports": len(x),
                "seconds": dt,
                "reports_per_s": len(x) / dt,
                "merged_fraction": merged / len(x),
                "phases_s": ph,
                "sqlite_rows_per_s": ph.get("rows_written", np.nan) / sql_s,
                "ceiling_sqlite_reports_per_s": len(x) / sql_s,
                "ceiling_search_reports_per_s": len(x) / ph.get("candidates", np.nan),
                "loadavg": [load0, os.getloadavg()],
            }
            out.setdefault("rate", []).append(rec)
            phases = ", ".join(
                f"{k} {ph[k]:.2f}"
                for k in (
                    "candidates",
                    "confirm",
                    "batch_gemm",
                    "decide",
                    "sql_writes",
                    "commit_and_index",
                )
                if k in ph
            )
            rows.append(
                {
                    "part": f"merge rule, {mode}",
                    "threads": t,
                    "nodes": n0,
                    "result": f"{len(x) / dt:,.0f} reports/s",
                    "notes": f"{merged / len(x):.0%} merged; s: {phases}; SQLite "
                    f"{rec['sqlite_rows_per_s']:,.0f} rows/s",
                }
            )
            print(rows[-1], flush=True)


def part_search(args, kg, mix, n0, rows: list, out: dict) -> None:
    """The candidate search alone, one batch of ``mix`` reports: FAISS's IVF search vs the
    list GEMMs (``kg/ivf_batch.py``), same lists probed, same k; per thread count."""
    import faiss

    from moe_framework.kg.index import merge_nprobe
    from moe_framework.kg.ivf_batch import search_by_lists

    index = kg._index
    if not index.approximate or index._trained_kind not in ("ivf", "auto"):
        return
    q = _s.normalize(reports("mix", mix, n0, args.batch, seed=11))
    nprobe = int(index.params.get("merge_nprobe") or merge_nprobe(index._nprobe))
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    for t in args.thread_list:
        _threads(t)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        _, ids_f = index._index.search(q, 4, params=params)
        faiss_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ids_l = search_by_lists(index._index, q, 4, nprobe)
        lists_s = time.perf_counter() - t0
        rec = {
            "threads": t,
            "queries": len(q),
            "nprobe": nprobe,
            "faiss_s": faiss_s,
            "lists_s": lists_s,
            "speedup": faiss_s / lists_s,
            "same_first_candidate": float((ids_f[:, 0] == ids_l[:, 0]).mean()),
            "loadavg": [load0, os.getloadavg()],
        }
        out.setdefault("search", []).append(rec)
        rows.append(
            {
                "part": f"candidate search, {len(q)} reports, k=4, nprobe={nprobe}",
                "threads": t,
                "nodes": n0,
                "result": f"lists {lists_s:.2f} s vs FAISS {faiss_s:.2f} s "
                f"({faiss_s / lists_s:.1f}x)",
                "notes": f"same first candidate for {rec['same_first_candidate']:.4f}",
            }
        )
        print(rows[-1], flush=True)


def part_sqlite(args, rows: list, out: dict) -> None:
    """Raw SQLite's insert rate for rows shaped like the store's nodes (a ``dim * 4``-byte
    embedding blob, a short type and metadata), the store's own settings (``schema.PAGE_SIZE``
    pages, WAL, ``synchronous=FULL``), ``--batch`` rows per transaction with ``executemany``:
    the ceiling a single SQLite writer puts on ingest on this disk. Best of three runs of
    ``--sqlite-rows`` rows into a fresh file each."""
    import sqlite3

    folder = tempfile.mkdtemp(prefix="kg-sqlite-", dir=args.tmp)
    blobs = _s.to_blobs(np.random.default_rng(0).standard_normal((args.batch, args.d)))
    runs = []
    try:
        for r in range(3):
            path = os.path.join(folder, f"raw{r}.sqlite")
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute(f"PRAGMA page_size={_s.PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(
                "CREATE TABLE nodes (id INTEGER PRIMARY KEY, type TEXT NOT NULL, embedding BLOB "
                "NOT NULL, metadata TEXT NOT NULL, merge_count INTEGER NOT NULL, created_at REAL "
                "NOT NULL, updated_at REAL NOT NULL)"
            )
            nid, load0 = 1, os.getloadavg()
            t0 = time.perf_counter()
            while nid <= args.sqlite_rows:
                m = min(args.batch, args.sqlite_rows - nid + 1)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO nodes VALUES (?, 'report', ?, '{}', 1, 0.0, 0.0)",
                    zip(range(nid, nid + m), blobs[:m]),
                )
                conn.execute("COMMIT")
                nid += m
            dt = time.perf_counter() - t0
            conn.close()
            runs.append({"rows_per_s": args.sqlite_rows / dt, "loadavg": [load0, os.getloadavg()]})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    best = max(r["rows_per_s"] for r in runs)
    out["sqlite_ceiling"] = {"rows": args.sqlite_rows, "batch": args.batch, "runs": runs}
    rows.append(
        {
            "part": f"raw SQLite inserts, {4 * args.d} B blobs, {args.batch}/txn, WAL + FULL",
            "threads": 1,
            "nodes": args.sqlite_rows,
            "result": f"{best:,.0f} rows/s",
            "notes": "best of 3; runs " + ", ".join(f"{r['rows_per_s']:,.0f}" for r in runs),
        }
    )
    print(rows[-1], flush=True)


def _default_nprobe(index) -> str:
    try:  # absent from a checkout before issue 19's merge_nprobe (a baseline run)
        from moe_framework.kg.index import merge_nprobe
    except ImportError:
        return "index nprobe"
    return str(merge_nprobe(index._nprobe))


def _decide(kg, x: np.ndarray) -> tuple:
    """The merge rule's decisions for ``x`` against the store as it is (nothing written)."""
    with kg._wlock:
        plan = MergePlan(kg, kg._own_conn(), x, _s.normalize(x), [{} for _ in range(len(x))])
        t0 = time.perf_counter()
        plan.run()
        return plan.merged.copy(), plan.node.copy(), time.perf_counter() - t0


def part_agree(args, kg, mix, n0, rows: list, out: dict) -> None:
    _threads(max(args.thread_list))
    x = reports("mix", mix, n0, args.agree_n, seed=7)
    index = kg._index
    ann = {}
    for nprobe in args.merge_nprobe:
        index.params["merge_nprobe"] = nprobe or None
        ann[nprobe] = _decide(kg, x)
    index.params["merge_nprobe"] = None
    t0 = time.perf_counter()
    kg.device_bank("cpu")  # exact: ops.kg_search over every node
    bank_s = time.perf_counter() - t0
    try:
        merged_x, node_x, exact_s = _decide(kg, x)
    finally:
        kg._bank = None
    for nprobe, (merged, node, dt) in ann.items():
        same = (merged == merged_x) & (node == node_x)
        rec = {
            "store_nodes": n0,
            "reports": len(x),
            "merge_nprobe": nprobe or f"default ({_default_nprobe(index)})",
            "agreement": float(same.mean()),
            "exact_merged_fraction": float(merged_x.mean()),
            "missed_merges": int((merged_x & ~merged).sum()),
            "other_node": int((merged_x & merged & (node != node_x)).sum()),
            "ann_decide_s": dt,
            "exact_decide_s": exact_s,
            "bank_build_s": bank_s,
        }
        out.setdefault("agreement", []).append(rec)
        rows.append(
            {
                "part": f"agreement vs exact, merge_nprobe={rec['merge_nprobe']}",
                "threads": max(args.thread_list),
                "nodes": n0,
                "result": f"{rec['agreement']:.4f}",
                "notes": f"{len(x)} mix reports, {rec['exact_merged_fraction']:.0%} merge; "
                f"missed merges {rec['missed_merges']}, other node {rec['other_node']}; "
                f"decide {dt:.2f} s vs exact {exact_s:.1f} s",
            }
        )
        print(rows[-1], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="the store to file into (modified)")
    p.add_argument("--base", default=None, help="copy this pristine store to --store first")
    p.add_argument("--n", type=int, default=100_000, help="nodes of the fresh store (no --store)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--modes", nargs="*", default=["none", "all", "mix"])
    p.add_argument("--threads", type=int, nargs="*", default=None)
    p.add_argument("--agree-n", type=int, default=0, help="reports for the agreement (0: skip)")
    p.add_argument("--merge-nprobe", type=int, nargs="*", default=[0], help="0: the default")
    p.add_argument("--quick", action="store_true", help="60k x 64 smoke run")
    p.add_argument("--search", action="store_true", help="time the candidate search alone")
    p.add_argument("--lock", default=None, help="hold this flock file while timing batches")
    p.add_argument(
        "--sqlite-rows",
        type=int,
        default=0,
        help="also time raw SQLite inserts of this many node-shaped rows (0: skip)",
    )
    p.add_argument("--tmp", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.store, args.n, args.d, args.batch, args.agree_n = None, 60_000, 64, 2000, 500
        args.search, args.sqlite_rows = True, args.sqlite_rows or 10_000
    args.thread_list = common.thread_counts(args.threads or [1, 2])
    logging.basicConfig(level=logging.INFO)
    out: dict = {"machine": common.machine_info(), "args": dict(vars(args))}
    out["loadavg_start"] = os.getloadavg()
    folder = None
    if args.store:
        path = args.store
        if args.base:
            for suffix in ("-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            shutil.copyfile(args.base, path)
    else:
        folder = tempfile.mkdtemp(prefix="kg-merge-", dir=args.tmp)
        path = os.path.join(folder, "kg.sqlite")
    rows: list = []
    if args.sqlite_rows:
        with _locked(args.lock):
            part_sqlite(args, rows, out)
    try:
        if not os.path.exists(path):
            mix = Mixture(args.d, n_centers=max(100, args.n // 1000))
            _build_store(path, mix, args.n)
        t0 = time.perf_counter()
        with KnowledgeGraph.open(path, verify="none", index_type="auto") as kg:
            out["open_build_s"] = time.perf_counter() - t0
            n0 = len(kg)
            mix = Mixture(kg.dim, n_centers=max(100, n0 // 1000))
            print(f"store {path}: {n0} nodes, open + index {out['open_build_s']:.1f} s", flush=True)
            if args.agree_n:
                part_agree(args, kg, mix, n0, rows, out)
            if args.modes:
                with _locked(args.lock):  # only the timed batches hold the shared lock
                    part_rate(args, kg, mix, n0, rows, out)
            if args.search:
                with _locked(args.lock):
                    part_search(args, kg, mix, n0, rows, out)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    common.print_table(
        rows, ["part", "threads", "nodes", "result", "notes"], title="merge rule at scale"
    )
    print(f"load average: start {out['loadavg_start']}, end {out['loadavg_end']}")
    common.write_json("kg_merge", out, args.out)


if __name__ == "__main__":
    main()
