"""Which CPU builds run here, for the golden records (tests/data/golden): our AVX-512 clones use
FMA and sum in their own order (cpu_isa.h: deterministic per CPU and build, close across
builds), and torch picks its own vectorised kernels by CPU capability, so on an AVX-512 CPU a
few outputs and gradients differ in their last bits from the records, which were made on an
AVX2 CPU. Those tensors are recorded again per tag under tests/data/golden/<tag>/
(``python tests/make_golden.py --isa-overrides`` on such a machine)."""

from __future__ import annotations

import os
from typing import Optional


def cpu_flags() -> Optional[set]:
    """The CPU's flags from /proc/cpuinfo, None where it cannot be read (also used by
    tests/ops/test_fma_peak.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _ours() -> str:
    """``"avx512"`` when our AVX-512 clones run (the test of cpu_isa.h's use_avx512(): AVX2,
    F16C, FMA and AVX-512 F/BW/VL/DQ, neither MOE_FRAMEWORK_CPU_BASELINE nor
    MOE_FRAMEWORK_CPU_NO_AVX512 set), else ``"base"``."""
    if os.environ.get("MOE_FRAMEWORK_CPU_BASELINE") or os.environ.get(
        "MOE_FRAMEWORK_CPU_NO_AVX512"
    ):
        return "base"
    need = {"avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    return "avx512" if need <= (cpu_flags() or set()) else "base"


def kernel_isa_tag() -> str:
    """``"base"`` for the records' own platform (our AVX2 / baseline build, torch's AVX2
    kernels), else ``"<ours>-torch-<torch's capability>"``, e.g. ``"avx512-torch-avx512"``."""
    import torch

    ours, cap = _ours(), torch.backends.cpu.get_cpu_capability().lower()
    return "base" if ours == "base" and cap == "avx2" else f"{ours}-torch-{cap}"
