"""Run a script under the CPU builds of our kernels (baseline x86-64, AVX2 clones, AVX-512 clones).

The kernels pick their clones at run time: MOE_FRAMEWORK_CPU_BASELINE=1 forces the baseline,
MOE_FRAMEWORK_CPU_NO_AVX512=1 stops at AVX2. Row kernels (route, permute) are meant to give
identical bits under every build; kernels with an FMA/AVX-512 clone (grouped_gemm, kg_search: its
score tiles and its few-query pass) are deterministic per build and compared with the reference
under each build instead (kg_search's baseline and AVX2 builds still agree bitwise).
"""

import os
import subprocess
import sys

import moe_framework

ISAS = ("baseline", "avx2", "default")


def output_under(isa: str, script: str, *args: str) -> bytes:
    """stdout (bytes) of ``python -c script *args`` with the given build forced.

    ``isa``: "baseline", "avx2" (AVX-512 clones off) or "default" (the best this CPU runs). One
    OpenMP thread; the child imports the same moe_framework as the tests (its parent folder is the
    child's working directory)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOE_FRAMEWORK_CPU_BASELINE", None)
    env.pop("MOE_FRAMEWORK_CPU_NO_AVX512", None)
    if isa == "baseline":
        env["MOE_FRAMEWORK_CPU_BASELINE"] = "1"
    elif isa == "avx2":
        env["MOE_FRAMEWORK_CPU_NO_AVX512"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        cwd=os.path.dirname(os.path.dirname(moe_framework.__file__)),
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def outputs_of_both_builds(script: str, *args: str) -> tuple:
    """stdout (bytes) of ``python -c script *args`` with the baseline build, then the default one."""
    return output_under("baseline", script, *args), output_under("default", script, *args)
