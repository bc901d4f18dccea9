"""Python wrappers of the ``torch.ops.moe_framework`` operators.

Each module holds one op family: the wrapper that calls ``torch.ops.moe_framework.<op>.default``,
the fake (meta) kernel that lets ``torch.compile`` trace it, and its autograd formula.
``reference`` holds plain-PyTorch implementations of every op, used by the tests.
"""

import torch

from . import grouped_gemm as _grouped_gemm
from . import permute as _permute
from . import route as _route
from . import similarity as _similarity
from . import swiglu as _swiglu
from .grouped_gemm import *  # noqa: F401,F403
from .permute import *  # noqa: F401,F403
from .route import *  # noqa: F401,F403
from .similarity import *  # noqa: F401,F403
from .swiglu import *  # noqa: F401,F403

OPS = (
    "route",
    "route_backward",
    "permute",
    "permute_backward",
    "unpermute",
    "unpermute_backward",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu",
    "swiglu_backward",
    "swiglu_backward_",
    "dedup",
    "kg_search",
)

__all__ = (
    list(_route.__all__)
    + list(_permute.__all__)
    + list(_grouped_gemm.__all__)
    + list(_similarity.__all__)
    + list(_swiglu.__all__)
    + ["OPS", "registered_kernels"]
)


def registered_kernels() -> dict:
    """Which dispatch keys (CPU, CUDA, Meta) have a kernel for each op: ``{op: [keys]}``.

    Asks the dispatcher, so it reflects what this build of the extension actually registered.
    """
    out = {}
    for name in OPS:
        qualname = f"moe_framework::{name}"
        keys = []
        for key in ("CPU", "CUDA", "Meta"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                    keys.append(key)
            except RuntimeError:
                pass
        out[name] = keys
    return out
