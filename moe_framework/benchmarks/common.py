"""Shared benchmark harness: machine description, timing, measured roofline, tables and JSON.

Every benchmark in this folder:
  * states the machine it ran on (``machine_info``),
  * compares against baselines in the same run,
  * reports achieved rates against the *measured* peak of this machine (``roofline``: what torch's
    GEMM reaches, DRAM bandwidth, and the cores' FMA / bf16 dot-product peak from fma_peak.c),
  * prints a table (``print_table``) and writes JSON (``write_json``).

Benchmarks are not tests: they never assert speed. Threads: ``thread_counts`` never returns more
threads than cores, and torch's pool is the only one we use (our kernels run on it), so OpenMP x
BLAS never exceeds the core count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cache
from typing import Callable, Iterable, Optional, Sequence

import torch

RESULTS_DIR = os.environ.get("MOE_BENCH_RESULTS", "bench_results")


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [
                        x
                        for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                        if x in flags
                    ]
    except OSError:
        pass
    return []


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on: CPU, cores, ISA flags, torch, threads, BLAS, GPU."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "isa": _cpu_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def thread_counts(requested: Optional[Iterable[int]] = None) -> list:
    """Thread counts to sweep, capped at the core count (never oversubscribe)."""
    cores = os.cpu_count() or 1
    req = list(requested) if requested else sorted({1, cores})
    return [t for t in req if 1 <= t <= cores] or [1]


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], object],
    *,
    device: str = "cpu",
    warmup: int = 2,
    min_reps: int = 5,
    min_time: float = 0.2,
    max_reps: int = 1000,
) -> dict:
    """Time ``fn`` (already bound to its inputs): median, min, mean and stdev in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        time.perf_counter() - start < min_time and len(times) < max_reps
    ):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "reps": len(times),
    }


# --------------------------------------------------------------------------- roofline


@cache
def _measure_gemm_flops(threads: int, dtype: torch.dtype, device: str, n: int) -> float:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        t = timeit(lambda: torch.mm(a, b), device=device, min_time=0.5)
        return 2.0 * n**3 / t["min_s"]
    finally:
        torch.set_num_threads(prev)


@cache
def _measure_bandwidth(threads: int, device: str, numel: int, huge_pages: bool = False) -> float:
    """Triad bytes/s at ``threads`` threads over three float32 arrays of ``numel``; on the CPU with
    ``huge_pages`` the arrays sit on 2 MiB pages (moe_framework.huge_pages), else on whatever the
    allocator gives (4 KiB pages unless THP is ``always``)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if huge_pages and device == "cpu":
            from moe_framework.huge_pages import empty_huge_pages

            a, b, c = (empty_huge_pages((numel,), torch.float32) for _ in range(3))
            a.uniform_()
            b.uniform_()
            c.zero_()
        else:
            a = torch.rand(numel, device=device)
            b = torch.rand(numel, device=device)
            c = torch.empty(numel, device=device)
        # triad c = a + s*b: reads 2 arrays, writes 1
        t = timeit(lambda: torch.add(a, b, alpha=1.5, out=c), device=device, min_time=0.5)
        return 3.0 * numel * 4 / t["min_s"]
    finally:
        torch.set_num_threads(prev)


FMA_PEAK_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")


def c_compiler() -> Optional[str]:
    """The C compiler that builds fma_peak.c: ``$CC``, else ``cc`` or ``gcc`` on PATH (or None)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@cache
def cpu_compute_peak(threads: int, seconds: float = 0.2) -> dict:
    """The arithmetic peak of ``threads`` cores running at once, measured by ``fma_peak.c``
    (built with ``c_compiler()``; best of 5 repetitions of ``seconds``): ``fp32_gflops`` (fused
    multiply-adds on the widest vectors the CPU has) and ``bf16_gflops`` (AVX512-BF16 dot
    products; None without them). This is the bound no GEMM can pass, where ``gemm_*_gflops`` of
    ``roofline`` is what torch's BLAS reaches. Without a compiler or on a CPU the program does not
    know, both are None and ``error`` says why (printed once)."""
    if threads < 1:
        raise ValueError(f"cpu_compute_peak: threads must be >= 1, got {threads}")
    cc = c_compiler()
    none = {"threads": threads, "fp32_isa": None, "fp32_gflops": None, "bf16_gflops": None}
    if cc is None:
        out = {
            **none,
            "error": "no C compiler (cc, gcc or $CC) to build the benchmarks' fma_peak.c",
        }
    else:
        with tempfile.TemporaryDirectory(prefix="moe_fma_peak_") as tmp:
            exe = os.path.join(tmp, "fma_peak")
            try:
                subprocess.run(
                    [cc, "-O2", "-pthread", FMA_PEAK_SRC, "-o", exe],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                run = subprocess.run(
                    [exe, str(threads), str(seconds)],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                out = json.loads(run.stdout)
            except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
                detail = getattr(exc, "stderr", None) or str(exc)
                out = {**none, "error": f"fma_peak.c: {type(exc).__name__}: {detail.strip()}"}
    if out.get("error"):
        print(f"benchmarks: no measured compute peak: {out['error']}", file=sys.stderr)
    return out


def roofline(threads: Optional[int] = None, device: str = "cpu", quick: bool = False) -> dict:
    """Measured peak of this machine at ``threads``: fp32 and bf16 GEMM FLOP/s (large square
    torch.mm), DRAM bandwidth (triad on arrays far larger than the caches), in GFLOP/s, GB/s, and
    on CPU the cores' arithmetic peak (``fma_fp32_gflops``, ``dot_bf16_gflops``: see
    ``cpu_compute_peak``; None where it cannot be measured)."""
    threads = threads or torch.get_num_threads()
    n = 1024 if quick else 2048
    numel = (16 if quick else 64) * 1024 * 1024
    roof = {
        "threads": threads,
        "gemm_fp32_gflops": _measure_gemm_flops(threads, torch.float32, device, n) / 1e9,
        "gemm_bf16_gflops": _measure_gemm_flops(threads, torch.bfloat16, device, n) / 1e9,
        "triad_gbs": _measure_bandwidth(threads, device, numel) / 1e9,
    }
    if device == "cpu":
        peak = cpu_compute_peak(threads)
        roof["fma_fp32_gflops"] = peak["fp32_gflops"]
        roof["dot_bf16_gflops"] = peak["bf16_gflops"]
    return roof


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int | None:
    """``field`` (``"VmHWM"``, ``"VmRSS"``) of /proc/self/status in KiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(conn, target: str, kwargs: dict) -> None:
    try:
        module_name, func_name = target.split(":")
        __import__(module_name)
        func = getattr(sys.modules[module_name], func_name)
        # ru_maxrss is kept across fork + exec: a spawned child starts with its parent's peak, so
        # it over-reports whenever the parent had grown larger. VmHWM belongs to the child's own
        # address space; resetting it after the imports makes the delta the call's growth alone.
        hwm = _proc_status_kb("VmHWM") is not None and _reset_peak_rss()
        base = (
            _proc_status_kb("VmRSS") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        extra = func(**kwargs)
        peak = (
            _proc_status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        assert base is not None and peak is not None
        conn.send(
            {
                "peak_rss_mb": peak / 1024,
                "delta_rss_mb": (peak - base) / 1024,
                "peak_source": "VmHWM" if hwm else "ru_maxrss",
                "extra": extra,
            }
        )
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def touch_memory(mb: int) -> dict:
    """Allocate and touch ``mb`` MiB, then free it: a calibration target for
    :func:`peak_memory_in_subprocess` (its ``delta_rss_mb`` should read about ``mb``)."""
    buf = bytearray(mb * 2**20)
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))
    del buf
    return {"mb": mb}


def peak_memory_in_subprocess(target: str, timeout: float = 600.0, **kwargs) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh spawned process and report its peak RSS.

    The peak is the child's own ``VmHWM`` (reset after its imports; ``peak_source`` says so), not
    ``ru_maxrss``, which Linux carries from the parent over fork + exec. Without /proc the
    fallback is ``ru_maxrss``. ``delta_rss_mb`` is the growth of the peak during the call, after
    imports; the function should
    import what it needs at module level so imports are not counted. One process per
    configuration, so peaks of earlier configurations never hide later ones.

    The child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every large tensor is
    then its own mapping, returned to the OS when freed, so the RSS peak is the peak of live
    tensors. (With glibc's default *dynamic* threshold, freeing one large block raises the
    threshold to up to 32 MiB and later blocks come from the heap, whose freed space is kept: the
    RSS peak then depends on the allocation history and over-counts by up to tens of MB.)
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, target, kwargs))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's glibc at start-up
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        proc.join()
        raise TimeoutError(f"peak_memory_in_subprocess: {target} took longer than {timeout}s")
    out = parent.recv()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"peak_memory_in_subprocess: {target} failed: {out['error']}")
    return out


# --------------------------------------------------------------------------- output


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3e}"
    return str(v)


def print_table(
    rows: Sequence[dict], columns: Optional[Sequence[str]] = None, title: str = ""
) -> str:
    """Print rows (dicts) as an aligned markdown table; returns the text."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict, out_dir: Optional[str] = None) -> str:
    """Write ``payload`` (plus a timestamp) to ``<out_dir>/<name>.json``; returns the path."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    payload = dict(payload)
    payload.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}", flush=True)
    return path


def add_tuning_arg(p: argparse.ArgumentParser) -> None:
    """``--tuning KNOB=VALUE ...``: CPU kernel knobs to set before timing (an A/B of one knob)."""
    p.add_argument(
        "--tuning",
        nargs="*",
        default=[],
        metavar="KNOB=VALUE",
        help="set CPU kernel knobs first (ops.set_tuning), e.g. gg_direct_rows_avx2=8 for an A/B",
    )


def parse_tuning(p: argparse.ArgumentParser, items: list) -> dict:
    """``KNOB=VALUE`` items as a dict (a clear argparse error for a malformed item)."""
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            p.error(f"--tuning expects KNOB=INTEGER, got {item!r}")
        values[name] = int(value)
    return values


def apply_tuning(p: argparse.ArgumentParser, items: list) -> dict:
    """Sets the ``--tuning`` knobs (a clear argparse error for a malformed item; an unknown knob
    or an out-of-range value raises the op's own error naming it); returns them as a dict."""
    from moe_framework.ops.tuning import set_tuning

    values = parse_tuning(p, items)
    for name, value in values.items():
        set_tuning(name, value)
    return values


def base_parser(description: str) -> argparse.ArgumentParser:
    """Common flags: --quick (small sizes, few reps), --threads, --device, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke run)")
    p.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts to sweep")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help=f"JSON output folder (default {RESULTS_DIR})")
    return p
