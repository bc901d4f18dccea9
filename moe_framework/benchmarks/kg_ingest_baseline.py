"""Knowledge-graph ingest through the public API only, to compare two checkouts in one run.

Plain inserts (``add_nodes_batch``, 10k nodes per transaction, ``flat`` index) of ``N`` vectors,
then the merge rule on 70k random reports in batches of 10k into an empty ``flat`` store (the
baseline of issue 19). Only ``KnowledgeGraph`` is used, so the same file measures any checkout:

    flock /tmp/moe_bench.lock sh -c '
      PYTHONPATH=/path/to/main python -m moe_framework.benchmarks.kg_ingest_baseline 200000
      PYTHONPATH=.             python -m moe_framework.benchmarks.kg_ingest_baseline 200000'

(with ``PYTHONPATH`` pointing at another checkout, run the file by path instead of ``-m``).
Prints one JSON line with the rates, the code's folder and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

import moe_framework
from moe_framework.knowledge_graph import KnowledgeGraph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=200_000, help="plain inserts (default 200k)")
    ap.add_argument("--quick", action="store_true", help="20k inserts (smoke run)")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.n
    if n <= 0 or n % 10_000:
        ap.error(f"n must be a positive multiple of 10000, got {n}")
    d, b = 384, 10_000
    out: dict = {"code": os.path.dirname(moe_framework.__file__), "load_start": os.getloadavg()}
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp(prefix="kg-baseline-")
    try:
        x = rng.standard_normal((b, d), dtype=np.float32)
        with KnowledgeGraph.open(os.path.join(folder, "a.sqlite"), dim=d, verify="none") as kg:
            t = time.perf_counter()
            for s in range(0, n, b):
                kg.add_nodes_batch(x + s, "report", [{"expert": i % 64} for i in range(b)])
            out["insert_nodes_per_s"] = n / (time.perf_counter() - t)
        with KnowledgeGraph.open(os.path.join(folder, "b.sqlite"), dim=d) as kg:
            t = time.perf_counter()
            for _ in range(0, 70_000, b):
                kg.add_or_update_batch(rng.standard_normal((b, d)).astype(np.float32), "report")
            out["merge_rule_reports_per_s"] = 70_000 / (time.perf_counter() - t)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out["load_end"] = os.getloadavg()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
