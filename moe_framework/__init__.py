"""moe_framework: Mixture-of-Experts for PyTorch on our own C++/CUDA operators.

Importing the package loads the compiled extension ``moe_framework._C``, which registers the
operators in torch's ``moe_framework`` op namespace; ``moe_framework.ops`` holds their Python
wrappers, the only code that calls them directly.
"""

import torch  # noqa: F401  (libtorch must be loaded before our extension)

try:
    from . import _C  # type: ignore[attr-defined]  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # a source checkout that was never built, or a torch ABI mismatch
    from ._extension_error import extension_error

    raise ImportError(extension_error(exc)) from None
from . import ops
from .config import MoEConfig
from .cuda_graphs import CUDAGraphInference
from .dispatch import LocalDispatcher, TokenDispatcher
from .experts import CheckpointedExperts, DenseFFN, ExpertBank, Experts, GatedSharedExperts
from .kernel_tuning import load_at_import as _load_kernel_tuning
from .knowledge_graph import KnowledgeGraph, KnowledgeGraphError
from .librarian import Librarian
from .metrics import RoutingStats
from .moe_layer import DraftReports, MoELayer, RoutingInfo
from .routing import ROUTERS, Router, RoutingDecision, Supervisor
from .system import MixtureOfExpertsSystem

__version__ = "0.1.0"

# The kernel auto-tuner's cache for this machine, when there is one (docs/benchmarking.md).
_load_kernel_tuning()

__all__ = [
    "CUDAGraphInference",
    "CheckpointedExperts",
    "DenseFFN",
    "DraftReports",
    "ExpertBank",
    "Experts",
    "GatedSharedExperts",
    "LocalDispatcher",
    "ROUTERS",
    "Router",
    "TokenDispatcher",
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "Librarian",
    "MixtureOfExpertsSystem",
    "MoEConfig",
    "MoELayer",
    "RoutingDecision",
    "RoutingInfo",
    "RoutingStats",
    "Supervisor",
    "__version__",
    "ops",
]
