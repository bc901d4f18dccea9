"""Kernel auto-tuner: time the CPU kernels' knobs on this machine, cache the winners, load them.

The CPU grouped GEMM and kg_search kernels pick kernels and tiles with built-in constants, tuned on
other CPUs. The ones that decide which kernel runs or how work is cut are run-time knobs
(:mod:`moe_framework.ops.tuning`). :func:`tune_kernels` (``python -m moe_framework tune-kernels``)
times candidate values on the shape buckets that matter (rows per expert, K, N, dtype at the
current thread count for the grouped GEMM; queries, bank rows, d for kg_search) and writes a JSON
cache keyed by this machine (CPU model, ISA flags, GPU) and library version (moe_framework, torch,
the knob names).

Importing :mod:`moe_framework` calls :func:`load_at_import`: the cache at
``$MOE_FRAMEWORK_TUNING_CACHE`` (``off`` disables it), else
``$XDG_CACHE_HOME/moe_framework/kernel_tuning.json`` (``~/.cache/...``), is applied when it exists
and matches this machine and version; a stale, foreign or unreadable cache is ignored with a
warning and the defaults stay. Without a cache nothing changes.

How a knob is chosen:
  * thresholds (``gg_blas_rows_fp32``, ``gg_blas_rows_bf16``: from how many rows per expert a group
    goes to torch's BLAS): each rows bucket is timed once with our tiles and once with BLAS, and
    the threshold that minimises the summed bucket times (each normalised by the default's) wins;
  * tile knobs: coordinate search, one knob at a time over its candidates, keeping a value only
    when the geometric mean of the bucket times improves by more than ``min_gain`` (noise);
  * finally defaults and tuned values are timed again on every bucket, alternating, and the
    speedups are reported (``gain``).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops import tuning as knobs

__all__ = [
    "CACHE_FORMAT",
    "cache_key",
    "default_cache_path",
    "load_cache",
    "apply_cache",
    "load_at_import",
    "tune_kernels",
]

CACHE_FORMAT = 1
ENV_CACHE = "MOE_FRAMEWORK_TUNING_CACHE"
_OFF = ("off", "0", "none", "")


def default_cache_path() -> str:
    """``$MOE_FRAMEWORK_TUNING_CACHE`` when set, else ``$XDG_CACHE_HOME/moe_framework/
    kernel_tuning.json`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    env = os.environ.get(ENV_CACHE)
    if env is not None and env.strip().lower() not in _OFF:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe_framework", "kernel_tuning.json")


def cache_key(init_cuda: bool = False) -> dict:
    """What a cache is valid for: this CPU (model and ISA flags), GPU (how many; the name of the
    current one when CUDA is initialised or ``init_cuda``), and library versions. Loading a
    cache at import never initialises CUDA (which would break forked workers later)."""
    from . import __version__
    from .benchmarks.common import machine_info

    info = machine_info("cpu")
    gpu = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and (init_cuda or torch.cuda.is_initialized()):
        try:
            gpu = torch.cuda.get_device_name()
        except RuntimeError:
            gpu = None
    return {
        "cpu": info["cpu"],
        "isa": info["isa"],
        "gpu_count": count,
        "gpu": gpu,
        "moe_framework": __version__,
        "torch": torch.__version__,
        "knobs": knobs.tuning_names(),
    }


def _warn(msg: str) -> None:
    warnings.warn(f"moe_framework kernel tuning: {msg}; using the built-in defaults", stacklevel=3)


def load_cache(path: Optional[str] = None) -> Optional[dict]:
    """The tuned knob values of the cache at ``path`` (default :func:`default_cache_path`) when it
    exists and was written for this machine and version, else None. A cache that cannot be read,
    has another format, another key (``stale``: another library version; ``foreign``: another
    CPU / ISA / GPU) or a value outside a knob's range is ignored with a ``UserWarning``."""
    path = path or default_cache_path()
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        _warn(f"cannot read the cache {path!r} ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        _warn(f"the cache {path!r} is not a format-{CACHE_FORMAT} tuning cache")
        return None
    want, have = cache_key(), data.get("key")
    if not isinstance(have, dict):
        _warn(f"the cache {path!r} has no key")
        return None
    for field in ("cpu", "isa", "gpu_count", "gpu"):
        if field == "gpu" and (want["gpu"] is None or have.get("gpu") is None):
            continue  # a name is compared when both sides know it (see cache_key)
        if have.get(field) != want[field]:
            _warn(
                f"the cache {path!r} is foreign: written for {field}={have.get(field)!r}, this "
                f"machine has {want[field]!r}"
            )
            return None
    for field in ("moe_framework", "torch", "knobs"):
        if have.get(field) != want[field]:
            _warn(
                f"the cache {path!r} is stale: written for {field}={have.get(field)!r}, this "
                f"library has {want[field]!r}"
            )
            return None
    values = data.get("knobs")
    names = set(want["knobs"])
    if not isinstance(values, dict) or not all(
        n in names and isinstance(v, int) and not isinstance(v, bool) for n, v in values.items()
    ):
        _warn(f"the cache {path!r} has malformed knob values")
        return None
    return dict(values)


def apply_cache(path: Optional[str] = None) -> Optional[dict]:
    """Load the cache (see :func:`load_cache`) and set its knobs (others back to their defaults);
    returns the values applied, or None (the defaults stay) when there is no valid cache."""
    values = load_cache(path)
    if values is None:
        return None
    previous = knobs.tuning_values()
    try:
        knobs.reset_tuning()
        for name, value in values.items():
            knobs.set_tuning(name, value)
    except RuntimeError as exc:  # a value outside the knob's range
        for name, value in previous.items():
            knobs.set_tuning(name, value)
        _warn(f"the cache {path or default_cache_path()!r} has a bad value ({exc})")
        return None
    return values


def load_at_import() -> None:
    """Called when :mod:`moe_framework` is imported: apply the default cache unless
    ``$MOE_FRAMEWORK_TUNING_CACHE`` is ``off``. Never raises (a broken cache only warns)."""
    env = os.environ.get(ENV_CACHE)
    if env is not None and env.strip().lower() in _OFF:
        return
    try:
        apply_cache()
    except Exception as exc:  # noqa: BLE001 - importing the package must not fail on a cache
        _warn(f"loading the cache failed ({type(exc).__name__}: {exc})")


# ====================================================================== workloads


@dataclass(frozen=True)
class Bucket:
    """One shape bucket: a name, the op family it times and its sizes."""

    family: str  # "gg" (grouped_gemm) or "sim" (kg_search)
    dtype: str
    rows: int  # rows per expert (gg) or queries (sim)
    k: int  # K (gg) or d (sim)
    n: int  # N (gg) or bank rows (sim)
    experts: int = 8

    @property
    def name(self) -> str:
        if self.family == "gg":
            return f"gg {self.dtype} E{self.experts} rows{self.rows} K{self.k} N{self.n}"
        return f"kg_search {self.dtype} q{self.rows} d{self.k} bank{self.n}"


def gg_buckets(quick: bool) -> list:
    rows = (4, 32, 128, 256) if quick else (2, 8, 32, 64, 128, 256, 512)
    shapes = ((256, 512),) if quick else ((256, 512), (512, 256), (1024, 1024))
    out = [Bucket("gg", "float32", r, k, n) for k, n in shapes for r in rows]
    out += [Bucket("gg", "bfloat16", r, 256, 512) for r in ((8, 64) if quick else (8, 16, 32, 64))]
    return out


def sim_buckets(quick: bool) -> list:
    qs = (1, 64) if quick else (1, 16, 256)
    bank = 20000 if quick else 100000
    return [Bucket("sim", "float32", q, 128, bank) for q in qs]


def make_call(bucket: Bucket, seed: int = 0) -> Callable[[], object]:
    """A closure running ``bucket``'s op on fixed random inputs."""
    from . import ops

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, bucket.dtype)
    if bucket.family == "gg":
        E = bucket.experts
        a = torch.randn(E * bucket.rows, bucket.k, generator=g).to(dtype)
        b = (torch.randn(E, bucket.k, bucket.n, generator=g) / math.sqrt(bucket.k)).to(dtype)
        off = torch.arange(E + 1, dtype=torch.int64) * bucket.rows
        return lambda: ops.grouped_gemm(a, b, off)
    q = torch.randn(bucket.rows, bucket.k, generator=g).to(dtype)
    bank = torch.randn(bucket.n, bucket.k, generator=g).to(dtype)
    nv = torch.tensor(bucket.n)
    return lambda: ops.kg_search(q, bank, 10, nv)


def _time(call, quick: bool) -> float:
    from .benchmarks.common import timeit

    return timeit(call, warmup=1, min_reps=3 if quick else 5, min_time=0.03 if quick else 0.15)[
        "median_s"
    ]


def _with(values: dict, calls: list, quick: bool) -> float:
    """Geometric mean of the median times of ``calls`` with the knobs ``values`` set (the knobs
    are restored afterwards)."""
    saved = knobs.tuning_values()
    try:
        for n, v in values.items():
            knobs.set_tuning(n, v)
        return _geomean(_time(c, quick) for c in calls)
    finally:
        for n, v in saved.items():
            knobs.set_tuning(n, v)


def _geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 1.0


# Candidate values of the tile knobs (the default is always a candidate).
TILE_CANDIDATES = {
    "gg_stream_rows": (0, 4, 8, 16, 32),
    "gg_direct_rows_avx2": (8, 16, 32, 64),
    "gg_row_tile": (32, 64, 128),
    "gg_max_col_block": (480, 1056, 2112),
    "gg_tiles_per_thread": (1, 2, 4, 8),
    "sim_query_block": (64, 128, 256, 512),
    "sim_bank_block_bytes": (128 * 1024, 384 * 1024, 1024 * 1024),
    "sim_tasks_per_thread": (1, 2, 4, 8),
    "sim_min_task_work": (1 << 20, 1 << 22, 1 << 24),
}
THRESHOLDS = {"gg_blas_rows_fp32": "float32", "gg_blas_rows_bf16": "bfloat16"}
_NEVER = 1 << 40  # a threshold no group reaches: every group runs our tiles


def _rounds(quick: bool) -> int:
    return 2 if quick else 3


def _tune_threshold(name, dtype, buckets, calls, quick, log) -> tuple:
    """Per rows bucket: our tiles vs BLAS; the threshold minimising the normalised sum (None
    when that is the default)."""
    mine = [b for b in buckets if b.family == "gg" and b.dtype == dtype]
    if not mine:
        return None, []
    ours = {b: math.inf for b in mine}
    blas = {b: math.inf for b in mine}
    for _ in range(_rounds(quick)):  # interleaved rounds, best of each: robust to drift
        for b in mine:
            ours[b] = min(ours[b], _with({name: _NEVER}, [calls[b]], quick))
            blas[b] = min(blas[b], _with({name: 1}, [calls[b]], quick))
    default = knobs.get_tuning(name, initial=True)
    if default == 0:  # gg_blas_rows_bf16: 0 = the ISA's default, 8 or 32
        default = 8 if "avx512_bf16" in cache_key()["isa"] else 32

    def cost(t):
        return sum(
            (blas[b] if b.rows >= t else ours[b]) / (blas[b] if b.rows >= default else ours[b])
            for b in mine
        )

    candidates = sorted({default, _NEVER, *(b.rows for b in mine)})
    best = min(candidates, key=lambda t: (round(cost(t), 3), t != default))
    rows = [
        {"knob": name, "bucket": b.name, "ours_ms": ours[b] * 1e3, "blas_ms": blas[b] * 1e3}
        for b in mine
    ]
    log(f"{name}: default {default}, best {best} (cost {cost(best):.3f} vs {cost(default):.3f})")
    return (None if best == default else best), rows


def tune_kernels(
    *,
    quick: bool = False,
    families: tuple = ("gg", "sim"),
    min_gain: float = 0.03,
    threads: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time the knobs on this machine at ``threads`` torch threads (default: the current count);
    returns the cache dict (``format``, ``key``, ``knobs``: the tuned values that differ from the
    defaults, ``threads``, ``measurements``, ``gain``: per bucket the default / tuned median
    time, alternating runs, and their geometric mean)."""
    from .benchmarks.common import machine_info

    saved, saved_threads = knobs.tuning_values(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    knobs.reset_tuning()
    try:
        return _tune(quick, families, min_gain, log, machine_info)
    finally:
        torch.set_num_threads(saved_threads)
        for name, value in saved.items():
            knobs.set_tuning(name, value)


def _tune(quick, families, min_gain, log, machine_info) -> dict:
    buckets = (gg_buckets(quick) if "gg" in families else []) + (
        sim_buckets(quick) if "sim" in families else []
    )
    calls = {b: make_call(b) for b in buckets}
    tuned: dict = {}
    measurements: list = []
    for name, dtype in THRESHOLDS.items():
        if "gg" not in families:
            break
        best, rows = _tune_threshold(name, dtype, buckets, calls, quick, log)
        measurements += rows
        if best is not None:
            tuned[name] = best
    for name, cands in TILE_CANDIDATES.items():
        fam = name.split("_", 1)[0]
        mine = [b for b in buckets if b.family == fam]
        if not mine:
            continue
        score: dict = {v: math.inf for v in cands}
        for _ in range(_rounds(quick)):  # interleaved rounds, best of each
            for v in cands:
                t = _with({**tuned, name: v}, [calls[b] for b in mine], quick)
                score[v] = min(score[v], t)
        for v in cands:
            measurements.append({"knob": name, "value": v, "geomean_ms": score[v] * 1e3})
        current = tuned.get(name, knobs.get_tuning(name, initial=True))
        best = min(score, key=lambda v: score[v])
        if best != current and score[best] < score.get(current, math.inf) * (1 - min_gain):
            tuned[name] = best
        log(f"{name}: " + ", ".join(f"{v}: {s * 1e3:.3f} ms" for v, s in score.items()))
    gain = compare(buckets, calls, tuned, quick)
    if tuned and gain["geomean_speedup"] < 1 + min_gain:
        # Not clearly faster over all buckets (noise picked the values, e.g. on a shared
        # machine): keep the defaults rather than cache a guess.
        log(
            f"tuned values not faster overall ({gain['geomean_speedup']:.3f}x < "
            f"{1 + min_gain:.2f}x): keeping the defaults"
        )
        gain["rejected_knobs"] = tuned
        tuned = {}
    return {
        "format": CACHE_FORMAT,
        "key": cache_key(init_cuda=True),
        "knobs": tuned,
        "defaults": knobs.tuning_values(initial=True),
        "machine": machine_info("cpu"),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "measurements": measurements,
        "gain": gain,
    }


def compare(buckets, calls, tuned: dict, quick: bool, rounds: int = 3) -> dict:
    """Defaults vs ``tuned`` on every bucket, alternating (rounds x (default, tuned)); the best
    median of each side. Returns per-bucket rows and the geometric mean speedup."""
    rows = []
    for b in buckets:
        d, t = math.inf, math.inf
        for _ in range(rounds):
            d = min(d, _with({}, [calls[b]], quick))
            t = min(t, _with(tuned, [calls[b]], quick))
        rows.append(
            {"bucket": b.name, "default_ms": d * 1e3, "tuned_ms": t * 1e3, "speedup": d / t}
        )
    return {"buckets": rows, "geomean_speedup": _geomean(r["speedup"] for r in rows)}


def write_cache(cache: dict, path: Optional[str] = None) -> str:
    """Write ``cache`` atomically (temporary file + rename) to ``path``; returns the path."""
    path = path or default_cache_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ====================================================================== command line


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune-kernels", help="time the CPU kernels' knobs on this machine and cache the best"
    )
    p.add_argument("--quick", action="store_true", help="few buckets and short timings")
    p.add_argument("--out", default=None, help=f"cache path (default {default_cache_path()})")
    p.add_argument(
        "--only", choices=("gg", "sim"), default=None, help="tune one op family (gg or sim)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the result, write no cache")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads to tune for (0: the current count)"
    )
    p.set_defaults(func=cmd_tune_kernels)


def cmd_tune_kernels(args) -> int:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    fams = (args.only,) if args.only else ("gg", "sim")
    if args.threads < 0 or args.threads > (os.cpu_count() or 1):
        from .cli import CLIError

        raise CLIError(f"--threads must be in [0, {os.cpu_count()}], got {args.threads}")
    cache = tune_kernels(quick=args.quick, families=fams, threads=args.threads or None)
    cache["loadavg_start"], cache["loadavg_end"] = list(load0), list(os.getloadavg())
    cache["seconds"] = time.perf_counter() - t0
    from .benchmarks.common import print_table

    print_table(cache["gain"]["buckets"], title="defaults vs tuned (median, best of 3 rounds)")
    print(f"tuned knobs: {cache['knobs'] or 'none (the defaults won)'}")
    print(f"geometric-mean speedup over the defaults: {cache['gain']['geomean_speedup']:.3f}x")
    if not args.dry_run:
        print(f"wrote {write_cache(cache, args.out)}")
    return 0
