"""Python wrappers of the ``torch.ops.moe_framework`` operators.

Each module holds one op family: the wrapper that calls ``torch.ops.moe_framework.<op>.default``,
the fake (meta) kernel that lets ``torch.compile`` trace it, and its autograd formula.
``fused_ffn`` holds the autograd nodes that fuse SwiGLU with the expert FFN around it.
``reference`` holds plain-PyTorch implementations of every op, used by the tests. This package is
the only place that calls ``torch.ops.moe_framework``: the rest of the library goes through it.
"""

from typing import Optional

import torch

from . import fused_ffn as _fused_ffn
from . import grouped_gemm as _grouped_gemm
from . import permute as _permute
from . import quant as _quant
from . import route as _route
from . import similarity as _similarity
from . import swiglu as _swiglu
from .fused_ffn import *  # noqa: F401,F403
from .grouped_gemm import *  # noqa: F401,F403
from .permute import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
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
    "grouped_gemm_q",
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
    + list(_quant.__all__)
    + list(_similarity.__all__)
    + list(_swiglu.__all__)
    + list(_fused_ffn.__all__)
    + ["OPS", "cuda_kernel_status", "registered_kernels"]
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


def cuda_kernel_status(kernels: Optional[dict] = None) -> dict:
    """Whether this build's CUDA kernels exist and whether this process can run them.

    ``compiled`` is ``"yes"``, ``"no"`` or ``"partly (n of m ops)"`` (from ``kernels``, default
    :func:`registered_kernels`); ``usable`` is True only when they are compiled and torch sees a
    CUDA device; ``reason`` says why not (empty when usable). A kernel registered for CUDA is not
    one that can run: a CUDA build on a machine without a GPU has the first and not the second.
    """
    kernels = registered_kernels() if kernels is None else kernels
    n_cuda = sum("CUDA" in keys for keys in kernels.values())
    if n_cuda == len(kernels) and n_cuda:
        compiled = "yes"
    elif n_cuda:
        compiled = f"partly ({n_cuda} of {len(kernels)} ops)"
    else:
        compiled = "no"
    if torch.version.cuda is None:
        device = "this torch is built without CUDA"
    elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        device = "no CUDA device"
    else:
        device = ""
    missing = [op for op, keys in kernels.items() if "CUDA" not in keys]
    if n_cuda == 0:
        reason = "this build of the extension is CPU-only"
        if device:
            reason += f"; {device}"
        else:
            reason += " (rebuild with nvcc on the PATH to use the GPU: docs/troubleshooting.md)"
    elif missing:
        reason = "; ".join(filter(None, [device, f"no CUDA kernel for {', '.join(missing)}"]))
    else:
        reason = device
    return {"compiled": compiled, "usable": not reason, "reason": reason}
