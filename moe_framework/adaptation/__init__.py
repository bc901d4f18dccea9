"""Online adaptation of an MoE layer while it trains (docs/adaptive.md).

* :class:`ExpertWindowStats`: device-side sliding-window per-expert statistics (load, mean gate
  weight, output norm, drops), updated with no host sync.
* :func:`split_expert` / :func:`merge_experts`: resize an ``MoELayer`` in place (ExpertBank,
  router through an :class:`AdaptiveRouter`, dispatcher, optimiser state).
* :func:`js_divergence`, :func:`kl_divergence`, :class:`DriftDetector`: routing drift between
  consecutive windows.
* :func:`prepare_load`: give a freshly built layer an adapted state dict's shapes before loading.
* :class:`Snapshot`: bitwise rollback of a layer and its optimiser state.
* :class:`AdaptationController`: runs between steps and decides (split / merge / rollback).
"""

from .controller import AdaptationController
from .resize import expert_bank, make_adaptive, merge_experts, prepare_load, split_expert
from .router import AdaptiveRouter
from .snapshot import Snapshot
from .stats import DriftDetector, ExpertWindowStats, js_divergence, kl_divergence

__all__ = [
    "AdaptationController",
    "AdaptiveRouter",
    "DriftDetector",
    "ExpertWindowStats",
    "Snapshot",
    "expert_bank",
    "js_divergence",
    "kl_divergence",
    "make_adaptive",
    "merge_experts",
    "prepare_load",
    "split_expert",
]
