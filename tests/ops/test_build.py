"""The built extension registers what it should: a CUDA kernel for every op unless the build was
intentionally CPU-only (MOE_FRAMEWORK_CUDA=0), so a CI build that silently lost its CUDA kernels
fails here."""

from __future__ import annotations

import os

import pytest

from moe_framework import ops

cpu_only_build = pytest.mark.skipif(
    os.environ.get("MOE_FRAMEWORK_CUDA") == "0",
    reason="MOE_FRAMEWORK_CUDA=0: intentionally CPU-only build",
)


@cpu_only_build
def test_every_op_has_cuda_kernel_registered():
    kernels = ops.registered_kernels()
    missing = sorted(op for op, keys in kernels.items() if "CUDA" not in keys)
    assert not missing, f"ops without a CUDA kernel in this build: {missing}"


@cpu_only_build
def test_route_has_cuda_kernel_registered():
    kernels = ops.registered_kernels()
    assert "CUDA" in kernels["route"] and "CUDA" in kernels["route_backward"]
