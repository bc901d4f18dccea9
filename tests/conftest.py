import os

import pytest
import torch

# The suite tests the kernels' built-in defaults: a kernel-tuning cache of this machine (written
# by `python -m moe_framework tune-kernels`) is not loaded; tests of the cache load their own.
os.environ.setdefault("MOE_FRAMEWORK_TUNING_CACHE", "off")

import moe_framework  # noqa: E402,F401  (registers the ops)

# Tolerances against the plain-PyTorch references, shared by every test file (`from conftest import
# TOLERANCES`). They depend on how much rounding a result accumulates, so there is one table per
# kind of computation: elementwise math rounds once; a gather-combine sums k weighted rows; a GEMM
# reduces over K; a layer chains route, two GEMMs and a combine; a whole Hugging Face model chains
# layers.
TOLERANCES = {
    "elementwise": {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=2e-6, atol=2e-6),
        torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
        torch.float16: dict(rtol=1e-3, atol=1e-3),
    },
    "gather": {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
        torch.float16: dict(rtol=2e-3, atol=1e-3),
    },
    "gemm": {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    },
    "layer": {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=2e-5),
        torch.bfloat16: dict(rtol=5e-2, atol=3e-2),
    },
    "hf_model": {
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    },
}

# Tests use at most the machine's cores for torch's pool; never oversubscribe.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be reproduced: rerun the test with
    MOE_TEST_SEED=<printed seed>."""
    fixed = os.environ.get("MOE_TEST_SEED")
    s = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)
    return s
