"""moe_framework/benchmarks/fma_peak.c (the cores' arithmetic peak in the benchmarks' roofline) and
its Python wrapper moe_framework/benchmarks/common.py:cpu_compute_peak. These check what it reports
and how it fails, not how fast the machine is."""

import importlib.util
import json
import os
import platform
import subprocess

import pytest
from golden_isa import cpu_flags as _cpu_flags

import moe_framework.benchmarks as _bench

# The suite ships inside the package: test the installed copy of fma_peak.c.
BENCH_DIR = os.path.dirname(os.path.abspath(_bench.__file__))


def _common():
    """A fresh copy of moe_framework/benchmarks/common.py (its caches start empty)."""
    spec = importlib.util.spec_from_file_location(
        "bench_common", os.path.join(BENCH_DIR, "common.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_COMMON = _common()
SRC, CC = _COMMON.FMA_PEAK_SRC, _COMMON.c_compiler()

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler (cc, gcc or $CC)")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fma_peak") / "fma_peak")
    build = subprocess.run(
        [CC, "-O2", "-Wall", "-Wextra", "-pthread", SRC, "-o", out], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    return out


def _run(exe, *args, env=None):
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def _expected_isa(flags, allow_avx512=True):
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    if allow_avx512 and "avx512f" in flags:
        return "avx512f"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return None


@pytest.mark.parametrize("threads", [1, 2])
def test_reports_the_widest_fma_isa_and_bf16_only_where_the_cpu_has_it(exe, threads):
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare the detected ISA with")
    run = _run(exe, str(threads), "0.01")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["threads"] == threads
    isa = _expected_isa(flags)
    assert out["fp32_isa"] == isa
    if isa is None:
        assert out["fp32_gflops"] is None
    else:
        assert out["fp32_gflops"] > 0
    has_bf16 = isa == "avx512f" and "avx512_bf16" in flags
    assert (out["bf16_gflops"] is not None) == has_bf16
    if has_bf16:
        assert out["bf16_gflops"] > 0


def test_no_avx512_switch_measures_the_avx2_kernels(exe):
    flags = _cpu_flags()
    if flags is None or "avx512f" not in flags:
        pytest.skip("needs an AVX-512 CPU for the switch to change anything")
    run = _run(exe, "1", "0.01", env={"MOE_FRAMEWORK_CPU_NO_AVX512": "1"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["fp32_isa"] == _expected_isa(flags, allow_avx512=False)
    assert out["bf16_gflops"] is None


@pytest.mark.parametrize(
    "args, needle",
    [
        ((), "usage"),
        (("0",), "THREADS must be an integer in [1, 4096], got '0'"),
        (("two",), "THREADS must be an integer in [1, 4096], got 'two'"),
        (("1", "-1"), "SECONDS_PER_REPETITION must be in (0, 60], got '-1'"),
        (("1", "fast"), "SECONDS_PER_REPETITION must be in (0, 60], got 'fast'"),
        (("1", "1", "extra"), "usage"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(exe, args, needle):
    run = _run(exe, *args)
    assert run.returncode == 2
    assert needle in run.stderr
    assert run.stdout == ""


def test_cpu_compute_peak_builds_and_runs_the_program():
    common = _common()
    out = common.cpu_compute_peak(1, seconds=0.01)
    assert out["threads"] == 1
    assert "error" not in out
    if out["fp32_isa"] is not None:
        assert out["fp32_gflops"] > 0


def test_cpu_compute_peak_without_a_compiler_says_why(monkeypatch, capsys):
    common = _common()
    monkeypatch.setenv("CC", os.path.join(BENCH_DIR, "no-such-compiler"))
    out = common.cpu_compute_peak(1, seconds=0.01)
    assert out["fp32_gflops"] is None and out["bf16_gflops"] is None
    assert "no-such-compiler" in out["error"]
    assert "no measured compute peak" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        common.cpu_compute_peak(0)
