"""Collectives of the expert-parallel dispatcher, with clear errors when a peer fails.

The token exchange is ``all_to_all_single`` from ``torch.distributed._functional_collectives``
(``all_to_all_single_autograd``: its backward is the reverse all-to-all), so autograd and
``torch.compile`` see it as one traceable op. In eager mode every collective is waited on inside a
``try`` so that a failure (a peer raised and left, died, or did not answer within the process
group's timeout) surfaces as an :class:`ExpertParallelError` naming the step and the rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

__all__ = [
    "ExpertParallelError",
    "all_to_all",
    "all_to_all_counts",
    "all_reduce_sum",
    "comm_device",
]


def comm_device(group) -> torch.device:
    """Where a small tensor must live for a collective on ``group``: the current CUDA device for
    NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed: a peer rank raised and left, died, or
    did not answer within the process group's timeout; or the ranks were set up differently."""


def _fail(what: str, group, err: BaseException) -> ExpertParallelError:
    rank = dist.get_rank(group) if dist.is_initialized() else -1
    return ExpertParallelError(
        f"expert parallel: {what} failed on rank {rank} of the expert-parallel group (a peer rank "
        f"raised, died, or did not answer within the process group's timeout): "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


def all_to_all(
    x: torch.Tensor,
    out_splits: Optional[list[int]],
    in_splits: Optional[list[int]],
    group,
    what: str,
) -> torch.Tensor:
    """Autograd-aware ``all_to_all_single`` of the rows of ``x`` (``None`` splits: equal)."""
    if torch.compiler.is_compiling():
        return fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
    try:
        y = fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
        return fc.wait_tensor(y)
    except (RuntimeError, dist.DistError) as err:
        raise _fail(what, group, err) from err


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """``[ep * n]`` int64 -> ``[ep * n]``: block ``j`` of the input goes to rank ``j`` (no grad)."""
    out = torch.empty_like(counts)
    try:
        dist.all_to_all_single(out, counts.contiguous(), group=group)
    except (RuntimeError, dist.DistError) as err:
        raise _fail("the all-to-all of the per-expert counts", group, err) from err
    return out


def all_reduce_sum(t: torch.Tensor, group, what: str) -> torch.Tensor:
    """In-place sum over the group (no grad), with the same clear error."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except (RuntimeError, dist.DistError) as err:
        raise _fail(what, group, err) from err
    return t
