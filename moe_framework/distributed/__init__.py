"""Expert parallelism (and data parallelism) on ``torch.distributed``.

* :func:`expert_parallel` shards a :class:`~moe_framework.moe_layer.MoELayer`'s experts over an
  expert-parallel group in place and gives it an :class:`AllToAllDispatcher` (dropless or
  fixed-capacity all-to-all; autograd through the functional collectives).
* :func:`reduce_gradients`, :func:`update_bias`, :func:`global_counts`: the training-loop side
  (dense gradients averaged over the data ranks, expert gradients over ``dp``; the
  aux-loss-free bias update on the global loads).
* :func:`init_distributed`, :func:`launch_local`: process-group setup from the ``torchrun``
  environment with a bounded timeout, and a local launcher.

See docs/distributed.md.
"""

from . import checkpoint
from ._comm import ExpertParallelError
from .dispatcher import MODES, AllToAllDispatcher, EPContext
from .launch import RankResult, free_port, init_distributed, launch_local
from .sharding import (
    ExpertParallelInfo,
    config_hash,
    expert_parallel,
    expert_parallel_layers,
    expert_parameters,
    global_counts,
    global_routing_stats,
    info_of,
    reduce_gradients,
    resolve_groups,
    update_bias,
)

__all__ = [
    "MODES",
    "AllToAllDispatcher",
    "EPContext",
    "ExpertParallelError",
    "ExpertParallelInfo",
    "RankResult",
    "checkpoint",
    "config_hash",
    "expert_parallel",
    "expert_parallel_layers",
    "expert_parameters",
    "free_port",
    "global_counts",
    "global_routing_stats",
    "info_of",
    "init_distributed",
    "launch_local",
    "reduce_gradients",
    "resolve_groups",
    "update_bias",
]
