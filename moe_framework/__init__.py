"""moe_framework: Mixture-of-Experts for PyTorch on our own C++/CUDA operators.

Importing the package loads the compiled extension ``moe_framework._C``, which registers the
operators under ``torch.ops.moe_framework``; ``moe_framework.ops`` holds their Python wrappers.
"""

import torch  # noqa: F401  (libtorch must be loaded before our extension)

from . import (
    _C,  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    ops,
)
from .config import MoEConfig  # noqa: F401
from .constellation import DraftReports, ExpertBank, MoELayer, RoutingInfo  # noqa: F401
from .cuda_graphs import CUDAGraphInference  # noqa: F401
from .librarian import KnowledgeGraph, KnowledgeGraphError, Librarian  # noqa: F401
from .supervisor import RoutingDecision, RoutingStats, Supervisor  # noqa: F401
from .system import MixtureOfExpertsSystem  # noqa: F401

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
