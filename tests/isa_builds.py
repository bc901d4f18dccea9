"""Run a script under both CPU builds of our kernels (baseline x86-64 and the AVX2 clones).

The kernels pick their AVX2 clones at run time unless MOE_FRAMEWORK_CPU_BASELINE=1, and both
builds are meant to give identical bits; the tests compare what a script prints under each.
"""

import os
import subprocess
import sys

import moe_framework


def outputs_of_both_builds(script: str, *args: str) -> tuple:
    """stdout (bytes) of ``python -c script *args`` with the baseline build, then the default one.

    One OpenMP thread; the child imports the same moe_framework as the tests (its parent folder is
    the child's working directory)."""
    outs = []
    for baseline in (True, False):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("MOE_FRAMEWORK_CPU_BASELINE", None)
        if baseline:
            env["MOE_FRAMEWORK_CPU_BASELINE"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            env=env,
            capture_output=True,
            cwd=os.path.dirname(os.path.dirname(moe_framework.__file__)),
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        outs.append(proc.stdout)
    return outs[0], outs[1]
