"""Command line: ``python -m moe_framework {demo,bench,kg,info}`` (also the ``moe-framework`` script).

- ``demo``: train a small MoE next to a dense baseline on scikit-learn's digits, consolidate the
  experts' reports into a knowledge graph, query it, write plots + model + summary (docs/demo.md).
- ``bench``: run the benchmark suite shipped in ``moe_framework/benchmarks`` (``--quick`` by
  default), or the scripts of the folder ``--dir`` names.
- ``kg``: inspect, query and export a knowledge-graph store.
- ``info``: versions, which kernels were built for which devices, thread settings.
- ``bench-model``, ``tune-kernels``, ``tune``: :mod:`moe_framework.benchmark`,
  :mod:`moe_framework.kernel_tuning`, :mod:`moe_framework.tuning` (docs/benchmarking.md).

A bad argument or file is reported as one line on stderr with exit status 2, never a traceback.
Everything printed from a store (types, metadata) has its control characters escaped, so a store
cannot send escape sequences to the terminal.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import sqlite3
import stat
import subprocess
import sys
import time
import unicodedata
from typing import Callable, Optional, Sequence

from .kg.errors import KnowledgeGraphError

__all__ = ["main", "build_parser", "find_benchmarks", "info_dict", "packaged_benchmarks_dir"]

# Exit status of a bad argument or file (argparse's own, for consistency).
EXIT_USAGE = 2
# Node ids are SQLite INTEGERs (signed 64-bit).
MAX_NODE_ID = 2**63 - 1


class CLIError(Exception):
    """A bad argument or file: :func:`main` prints it as one line and exits with status 2."""


# ====================================================================== output safety

# Unicode categories that must not reach a terminal raw: control characters (ANSI/OSC escape
# sequences start with ESC or the C1 CSI), format characters (bidirectional overrides that reorder
# what is displayed, zero-width characters), line/paragraph separators and lone surrogates (which
# cannot even be encoded).
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def safe_text(text: object) -> str:
    """``str(text)`` with every control, format or separator character written as a Python
    escape (``\\x1b``, ``\\u202e``): safe to print to a terminal, and always one line."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _json(value: object) -> str:
    # ensure_ascii escapes every control and non-ASCII character inside strings and keys.
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


# ====================================================================== argument types


def _int_in(lo: int, hi: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if what:
            want += f" ({what})"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see <prog> --help)``."""

    def error(self, message: str):
        print(f"{self.prog}: error: {safe_text(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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
    kernels = ops.registered_kernels()
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
        "cuda_kernels": ops.cuda_kernel_status(kernels),
        "kernels": kernels,
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
    status = d["cuda_kernels"]
    usable = "yes" if status["usable"] else f"no ({status['reason']})"
    print(f"CUDA kernels: compiled: {status['compiled']}, usable: {usable}")
    # A CUDA kernel compiled into the extension is not one this process can run: say which.
    cuda_mark = "yes" if status["usable"] else "built"
    legend = "yes: registered" + (
        "" if status["usable"] else "; built: compiled in, not usable here"
    )
    print(f"\nkernels per op ({legend})")
    print(f"  {'op':<22} {'CPU':<4} {'CUDA':<5} {'Meta':<4}")
    for op, keys in d["kernels"].items():
        marks = [
            (cuda_mark if k == "CUDA" else "yes") if k in keys else "-"
            for k in ("CPU", "CUDA", "Meta")
        ]
        print(f"  {op:<22} {marks[0]:<4} {marks[1]:<5} {marks[2]:<4}")
    print("\nthreads")
    for k, v in d["threads"].items():
        print(f"  {k:<30} {v}")
    return 0


# ====================================================================== bench


def packaged_benchmarks_dir() -> str:
    """The folder of the benchmark suite shipped inside the package (``moe_framework/benchmarks``).

    Found next to this file, without importing it: the benchmarks are never imported by
    ``import moe_framework``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")


# Runs one benchmark module in a fresh interpreter. sys.path starts with the folder holding *this*
# moe_framework, so the child benchmarks the package the command was started with; the current
# directory is removed from sys.path (``python -m`` and ``-c`` put it first), so a source checkout
# or a stray ``benchmarks/`` folder there can shadow nothing; a ``--dir`` folder's parent comes
# last, only so its scripts import as ``<folder>.<script>``.
_BENCH_RUNNER = (
    "import os, runpy, sys\n"
    "pkg_root, dir_root, module = sys.argv[1:4]\n"
    "drop = {'', os.getcwd(), pkg_root, dir_root}\n"
    "sys.path = [pkg_root] + [p for p in sys.path if p not in drop] + ([dir_root] if dir_root else [])\n"
    "sys.argv = [module] + sys.argv[4:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def find_benchmarks(bench_dir: str, pattern: Optional[str] = None) -> list:
    """Benchmark scripts in ``bench_dir``: every ``*.py`` except the shared harness and helpers
    (``common.py``, ``conftest.py``, ``_*.py`` such as ``__init__.py``), sorted; ``pattern``
    keeps names containing it."""
    out = []
    for p in sorted(glob.glob(os.path.join(bench_dir, "*.py"))):
        name = os.path.basename(p)
        if name in ("common.py", "conftest.py") or name.startswith("_"):
            continue
        if pattern and pattern not in name:
            continue
        out.append(p)
    return out


def _bench_source(explicit: Optional[str]) -> tuple:
    """(folder, module package, parent folder to append to sys.path or "") of the suite to run:
    the packaged suite unless ``--dir`` names another folder."""
    if explicit is None:
        return packaged_benchmarks_dir(), "moe_framework.benchmarks", ""
    folder = os.path.abspath(explicit)
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise CLIError(f"--dir {explicit} {what}")
    name = os.path.basename(folder)
    if not name.isidentifier():
        raise CLIError(
            f"--dir {explicit}: the folder name must be a Python identifier (its scripts run as "
            f"modules <folder>.<script>), got {name!r}"
        )
    return folder, name, os.path.dirname(folder)


def cmd_bench(args: argparse.Namespace) -> int:
    bench_dir, package, dir_root = _bench_source(args.dir)
    scripts = find_benchmarks(bench_dir, args.only)
    if not scripts:
        only = f" matching --only {args.only!r}" if args.only else ""
        have = ", ".join(os.path.basename(p) for p in find_benchmarks(bench_dir)) or "none"
        raise CLIError(f"no benchmark scripts{only} in {bench_dir} (found: {have})")
    if args.list:
        for path in scripts:
            print(f"{package}.{os.path.splitext(os.path.basename(path))[0]}")
        return 0
    extra = [] if args.full else ["--quick"]
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for path in scripts:
        name = os.path.basename(path)
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        # Each prints its own table and writes JSON under bench_results/ of the current directory
        # (or $MOE_BENCH_RESULTS).
        module = f"{package}.{os.path.splitext(name)[0]}"
        cmd = [sys.executable, "-c", _BENCH_RUNNER, pkg_root, dir_root, module, *extra]
        rc = subprocess.call(cmd)
        results.append((name, rc, time.perf_counter() - t0))
    print("\nbenchmark suite")
    print(f"  {'script':<32} {'status':<8} {'seconds':>8}")
    for name, rc, sec in results:
        print(f"  {name:<32} {'ok' if rc == 0 else f'rc={rc}':<8} {sec:>8.1f}")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


# ====================================================================== kg


def _check_store_file(path: str) -> None:
    """A store argument must name an existing regular file (a FIFO would block the open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CLIError(f"{path} does not exist") from None
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        inside = os.path.join(path, "knowledge.sqlite")
        hint = f" (the store in it would be {inside})" if os.path.isfile(inside) else ""
        raise CLIError(f"{path} is a folder, not a knowledge-graph store file{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{path} is not a regular file (a store is a SQLite file)")


def _check_output_path(path: str, flag: str, store: str) -> None:
    """An export path must land in an existing folder and never on the store or its companions."""
    from .kg.paths import touches_store

    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path}: folder {folder} does not exist")
    if touches_store(path, store):
        raise CLIError(f"{flag} {path} would overwrite the store {store} (or its companion files)")


def _parse_vector(text: str, dim: int) -> list:
    """``--vector``: a JSON list of ``dim`` finite numbers."""
    want = f"a JSON list of {dim} numbers (the store's dim)"
    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--vector must be {want}: {exc}") from None
    if not isinstance(v, list):
        raise CLIError(f"--vector must be {want}, got a JSON {type(v).__name__}")
    if len(v) != dim:
        raise CLIError(f"--vector must be {want}, got {len(v)} values")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise CLIError(f"--vector must be {want}, value {i} is {safe_text(_json(x))}")
        if not math.isfinite(x):
            raise CLIError(f"--vector must be {want}, value {i} is {x}")
    if not any(v):
        raise CLIError("--vector must not be all zeros (cosine similarity needs a direction)")
    return v


def _parse_where(text: Optional[str]) -> Optional[tuple]:
    """``--where KEY=VALUE`` as (key, value); None when not given."""
    if text is None:
        return None
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise CLIError(f"--where must be KEY=VALUE with a non-empty KEY, got {text!r}")
    return key, value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _where_filters(where: Optional[tuple]) -> list:
    """The ``where=`` filters of the knowledge graph's own matching rule
    (:mod:`moe_framework.kg.filters`) that ``--where KEY=VALUE`` stands for: VALUE as the string
    written (matches string metadata), and, when it parses as another JSON value (``1``,
    ``true``, ``null``, ``[1, 2]``), that value too (``layer=1`` matches 1, ``done=true``
    matches true, never 1). A node's value is either a string or not, so no node passes both."""
    if where is None:
        return [None]
    key, value = where
    filters: list = [{key: value}]
    try:
        parsed = json.loads(value, parse_constant=_reject_constant)
    except ValueError:  # not JSON (json.JSONDecodeError is a ValueError), or NaN / Infinity
        return filters
    if not isinstance(parsed, str):
        filters.append({key: parsed})
    return filters


def _similar(kg, query, top_k: int, filters: list, exclude: int = -1) -> list:
    """The ``top_k`` nodes most similar to ``query`` that pass one of ``filters`` (the store's
    filtered search: exact over the nodes that pass), ``exclude`` left out, best first (ties:
    lower id first)."""
    hits = {}
    for flt in filters:
        for h in kg.find_similar_nodes(query, top_k=top_k + 1, where=flt):
            if h.id != exclude:
                hits[h.id] = h
    return sorted(hits.values(), key=lambda h: (-h.score, h.id))[:top_k]


def _node_line(node, extra: str = "") -> str:
    return f"  node {node.id:>5}{extra} {safe_text(node.type):<10} {_json(node.metadata)}"


def _kg_query(kg, args: argparse.Namespace) -> tuple:
    """(query vector or None, its heading, node id to leave out of the hits) of --like/--vector,
    checked against the store before anything is printed."""
    import numpy as np

    if args.like is not None:
        try:
            query = kg.get_node(args.like).embedding
        except KeyError:
            raise CLIError(
                f"--like {args.like}: no node with this id in {args.store} ({len(kg)} nodes)"
            ) from None
        return query, f"nodes most similar to node {args.like}", args.like
    if args.vector is not None:
        query = np.asarray(_parse_vector(args.vector, kg.dim), dtype=np.float32)
        return query, "nodes most similar to the given vector", -1
    return None, "", -1


def _print_matches(kg, filters: list, limit: int) -> None:
    """The first ``limit`` nodes (in id order) that pass one of ``filters``, then how many more
    there are."""
    shown = total = 0
    nodes = heapq.merge(*(kg.iter_nodes(where=f) for f in filters), key=lambda n: n.id)
    for node in nodes:
        total += 1
        if shown < limit:
            print(_node_line(node))
            shown += 1
    if total > shown:
        print(f"  ... {total - shown} more (raise --list to see them)")
    elif not total:
        print("  (none)")


def _kg_exports(kg, args: argparse.Namespace) -> None:
    if args.export_json:
        kg.to_json(args.export_json, include_embeddings=not args.no_embeddings)
        print(f"wrote {safe_text(args.export_json)}")
    if args.export_graphml:
        kg.to_graphml(args.export_graphml)
        print(f"wrote {safe_text(args.export_graphml)}")
    if args.draw:
        import matplotlib

        matplotlib.use("Agg")
        kg.draw(args.draw, color_by=args.color_by)
        print(f"wrote {safe_text(args.draw)}")


def cmd_kg(args: argparse.Namespace) -> int:
    from moe_framework.knowledge_graph import KnowledgeGraph

    _check_store_file(args.store)
    where = _parse_where(args.where)
    outputs = {"--export-json": args.export_json, "--export-graphml": args.export_graphml}
    outputs["--draw"] = args.draw
    for flag, path in outputs.items():
        if path is not None:
            _check_output_path(path, flag, args.store)
    if args.draw is not None and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--draw needs matplotlib (pip install matplotlib)")
    filters = _where_filters(where)
    limit = 20 if args.list is None else args.list
    filtered = f" where {safe_text(where[0])}={safe_text(where[1])}" if where else ""

    with KnowledgeGraph.open(args.store, readonly=True) as kg:
        query, title, exclude = _kg_query(kg, args)
        print(f"store: {safe_text(args.store)}")
        print(f"  nodes: {len(kg)}  edges: {kg.num_edges()}  dim: {kg.dim}")
        # The plain listing only when asked for, or when nothing else is.
        asked = query is not None or where or any(outputs.values())
        if not where and (args.list is not None or not asked):
            for node in itertools.islice(kg.iter_nodes(), limit):
                print(_node_line(node, f" merges={node.merge_count:<4}"))
        if query is not None:
            print(f"\n{title}{filtered}:")
            hits = _similar(kg, query, args.top_k, filters, exclude)
            for hit in hits:
                print(_node_line(hit, f" cos={hit.score:+.3f}"))
            if not hits:
                print("  (none)")
        elif where:
            print(f"\nnodes{filtered}:")
            _print_matches(kg, filters, limit)
        _kg_exports(kg, args)
    return 0


# ====================================================================== demo


def cmd_demo(args: argparse.Namespace) -> int:
    missing = [
        dist
        for module, dist in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise CLIError(
            f"needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            "(or the package's [demo] extra)"
        )
    from moe_framework.demo import check_demo_args, run_demo

    kwargs = dict(
        out_dir=args.out,
        device=args.device,
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads or None,
    )
    try:
        check_demo_args(**kwargs)
    except ValueError as exc:
        raise CLIError(str(exc).removeprefix("demo: ")) from None
    if args.ep is not None:  # issue 15: expert-parallel training (torchrun); docs/distributed.md
        if args.quantize is not None:
            raise CLIError("--quantize is not supported with --ep (quantise the exported model)")
        from moe_framework.distributed.demo import run_ep_demo

        out = args.out if args.out != os.path.join("outputs", "demo") else "outputs/demo_ep"
        run_ep_demo(
            args.ep,
            out,
            args.epochs,
            args.tiny,
            args.seed,
            threads=kwargs["threads"],
            mode=args.ep_mode,
        )
        return 0
    run_demo(tiny=args.tiny, progress=not args.no_progress, quantize=args.quantize, **kwargs)
    return 0


# ====================================================================== parser


def build_parser() -> argparse.ArgumentParser:
    from moe_framework.demo import MAX_EPOCHS, MAX_SEED, MAX_THREADS

    p = _Parser(
        prog="python -m moe_framework",
        description="moe_framework: Mixture-of-Experts on our own C++/CUDA operators",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,bench,kg,info,bench-model,tune-kernels,tune}",
    )

    d = sub.add_parser("demo", help="train MoE vs dense on digits, build and query the KG")
    d.add_argument("--out", default=os.path.join("outputs", "demo"), help="output folder")
    d.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    d.add_argument(
        "--epochs",
        type=_int_in(1, MAX_EPOCHS),
        default=None,
        help="training epochs (default 30; 2 with --tiny)",
    )
    d.add_argument("--tiny", action="store_true", help="a few seconds: for tests and smoke runs")
    d.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument(
        "--threads",
        type=_int_in(0, MAX_THREADS, "0 = torch's default"),
        default=1,
        help="torch threads (default 1: the model is tiny; 0 = torch's default)",
    )
    # issue 16: weight-only quantised experts (docs/quantization.md)
    d.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="also evaluate the trained model with INT8 / INT4 experts (accuracy before/after)",
    )
    # issue 15: expert parallelism (launch with torchrun --nproc-per-node N)
    d.add_argument(
        "--ep",
        type=_int_in(1, 1024),
        default=None,
        help="train the MoE expert-parallel over N processes (torchrun --nproc-per-node N ...); "
        "1 = the same loop in one process (docs/distributed.md)",
    )
    d.add_argument("--ep-mode", default="dropless", choices=("dropless", "capacity"))
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run the packaged benchmark suite and print tables")
    b.add_argument(
        "--dir",
        default=None,
        help="run the scripts of this folder instead of the suite shipped in the package",
    )
    b.add_argument("--only", default=None, help="run scripts whose name contains this")
    b.add_argument("--full", action="store_true", help="full sizes (default passes --quick)")
    b.add_argument("--list", action="store_true", help="print the benchmarks that would run")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("kg", help="inspect, query and export a knowledge-graph store")
    k.add_argument("store", help="path of the SQLite store (e.g. outputs/demo/knowledge.sqlite)")
    k.add_argument(
        "--list",
        type=_int_in(0),
        default=None,
        metavar="N",
        help="print the first N nodes (by default 20, when nothing else is asked); with --where, "
        "at most N matching nodes",
    )
    k.add_argument(
        "--like",
        type=_int_in(0, MAX_NODE_ID),
        default=None,
        metavar="ID",
        help="nodes similar to ID",
    )
    k.add_argument("--vector", default=None, help="nodes similar to a JSON list of floats")
    k.add_argument(
        "--where",
        default=None,
        metavar="KEY=VALUE",
        help="nodes whose metadata KEY equals VALUE; with --like/--vector, filters their hits",
    )
    k.add_argument("--top-k", type=_int_in(1), default=5, help="hits of --like/--vector")
    k.add_argument("--export-json", default=None, metavar="PATH")
    k.add_argument("--no-embeddings", action="store_true", help="JSON export without embeddings")
    k.add_argument("--export-graphml", default=None, metavar="PATH")
    k.add_argument("--draw", default=None, metavar="PNG")
    k.add_argument("--color-by", default="expert", help="metadata field colouring --draw")
    k.set_defaults(func=cmd_kg)

    i = sub.add_parser("info", help="versions, built kernels per device, thread settings")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    # ---- measuring and tuning (issue 18): each command's parser lives next to its code
    from moe_framework import benchmark, kernel_tuning, tuning

    benchmark.add_parser(sub)
    kernel_tuning.add_parser(sub)
    tuning.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2: a bad argument or file, printed as one
    line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: choose a command (see {parser.prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (CLIError, KnowledgeGraphError, OSError, sqlite3.Error) as exc:
        print(f"{parser.prog} {args.command}: error: {safe_text(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
