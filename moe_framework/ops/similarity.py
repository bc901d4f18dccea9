"""Wrappers and fake kernels of the similarity op family: ``dedup`` and ``kg_search``.

Both rank by cosine similarity with one total order: higher score first, lower index first among
equal scores. Cosines are computed from unit-normalised rows in float32 (float64 for float64
inputs) and clamped to ``[-1, 1]``. A row with a zero, NaN or Inf norm has no direction, so its
cosine is undefined: it is an error (never a NaN in the output).

Neither op is differentiable (they return masks, indices and ranked scores): their autograd
registration marks every output non-differentiable, so inputs that require grad give outputs that
do not (no graph is recorded through them).

Errors for rows without a direction: the CPU kernels check every row they use and raise. The
CUDA kernels cannot raise without a host sync, so in eager mode the wrappers run one cheap
validity reduction first (a single sync; these ops run off the hot path). Under
``torch.compile`` or CUDA-graph capture the check is skipped and the kernels fall back to a
defined result: such bank rows are never returned, such query rows return ``(-inf, -1)`` and such
``dedup`` rows are kept and never chosen as a representative.
"""

from __future__ import annotations

from typing import Union

import torch

from ._checks import check_same_device

__all__ = ["dedup", "kg_search"]


# Rows per chunk of the eager CUDA check: bounds its fp64 temporary to ~chunk * d * 8 bytes.
_CHECK_CHUNK_ROWS = 8192


def _first_bad_row(t: torch.Tensor, n_rows=None) -> int:
    """Index of the first row of ``t`` (among the first ``n_rows``) whose fp64 sum of squares is
    not finite and positive (the kernels' criterion), or -1. One host sync; chunks of rows."""
    rows = t.shape[0]
    bad = torch.empty(rows, dtype=torch.bool, device=t.device)
    for start in range(0, rows, _CHECK_CHUNK_ROWS):
        ss = t[start : start + _CHECK_CHUNK_ROWS].double().square().sum(dim=1)
        bad[start : start + _CHECK_CHUNK_ROWS] = ~(torch.isfinite(ss) & (ss > 0))
    if n_rows is not None:
        bad &= torch.arange(rows, device=t.device) < n_rows
    if rows == 0 or not bool(bad.any()):
        return -1
    return int(torch.argmax(bad.to(torch.uint8)))


def _eager_cuda_check(t: torch.Tensor, op: str, arg: str, n_rows=None) -> None:
    """Raise if a row of ``t`` (the first ``n_rows``) has a zero, NaN or Inf norm: CUDA tensors
    in eager mode only (CPU kernels check for themselves; compiled graphs cannot sync)."""
    if not t.is_cuda or t.shape[0] == 0:
        return
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return
    row = _first_bad_row(t, n_rows)
    if row >= 0:
        where = " (within the first n_valid rows)" if n_rows is not None else ""
        raise ValueError(
            f"{op}: {arg} row {row}{where} has a zero, NaN or Inf norm: "
            "cosine similarity is undefined"
        )


def dedup(emb: torch.Tensor, threshold: float):
    """Mark near-duplicate rows: item ``j`` duplicates an earlier item ``i < j`` when
    ``cosine(emb[i], emb[j]) > threshold``.

    Blocked pairwise cosine: memory ``O(n * block)``, never the ``n x n x d`` broadcast (nor an
    ``n x n`` matrix).

    Args:
        emb: ``[n, d]`` float32, bfloat16, float16 or float64 (any strides), ``d >= 1``. Every row
            needs a finite, non-zero norm (else an error).
        threshold: a cosine in ``[-1, 1]``; the comparison is strict (``>``).

    Returns:
        ``(keep, representative)``:

        - ``keep`` ``[n]`` bool: ``True`` when no earlier row is more similar than ``threshold``.
        - ``representative`` ``[n]`` int64: for a duplicate, the most similar earlier row (lowest
          index on ties; it may itself be a duplicate); for a kept row, its own index.

    Not differentiable.
    """
    _eager_cuda_check(emb, "dedup", "emb")
    return torch.ops.moe_framework.dedup.default(emb, float(threshold))


@torch.library.register_fake("moe_framework::dedup")
def _dedup_fake(emb, threshold):
    # Lets torch.compile trace dedup: both outputs have one entry per row of emb.
    torch._check(emb.dim() == 2, lambda: f"dedup: emb must be [n, d], got {tuple(emb.shape)}")
    torch._check(
        -1.0 <= threshold <= 1.0,
        lambda: f"dedup: threshold must be a cosine in [-1, 1], got {threshold}",
    )
    n = emb.shape[0]
    return emb.new_empty((n,), dtype=torch.bool), emb.new_empty((n,), dtype=torch.long)


def kg_search(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    n_valid: Union[torch.Tensor, int],
):
    """Cosine top-``k`` of each query among the first ``n_valid`` rows of a preallocated bank.

    A blocked GEMM with a running top-k per query: no ``[q, N]`` score matrix. ``n_valid`` may be
    a device tensor, so a growing device-resident bank is searched without a host sync (CUDA-graph
    and ``torch.compile(fullgraph=True)`` safe).

    Args:
        queries: ``[q, d]`` float32, bfloat16, float16 or float64 (any strides).
        bank: ``[N, d]``, same dtype and device as ``queries``. Rows ``[0, n_valid)`` need a
            finite, non-zero norm (else an error); later rows are never read.
        k: results per query, ``k >= 1`` (may exceed ``n_valid``).
        n_valid: number of valid bank rows, in ``[0, N]``: a 0-dim int64 tensor on ``bank``'s
            device, or a Python int. (On CUDA a tensor value outside ``[0, N]`` is clamped: it
            cannot be checked without a sync.)

    Returns:
        ``(scores, ids)``: ``scores`` ``[q, k]`` float32 cosines, best first (lower id first on
        equal scores); ``ids`` ``[q, k]`` int64 bank rows. Where fewer than ``k`` rows are valid
        the missing entries have score ``-inf`` and id ``-1``.

    Not differentiable.
    """
    if not isinstance(n_valid, torch.Tensor):
        n_valid = torch.tensor(int(n_valid), dtype=torch.long, device=bank.device)
    _eager_cuda_check(queries, "kg_search", "queries")
    _eager_cuda_check(bank, "kg_search", "bank", n_rows=n_valid)
    return torch.ops.moe_framework.kg_search.default(queries, bank, int(k), n_valid)


@torch.library.register_fake("moe_framework::kg_search")
def _kg_search_fake(queries, bank, k, n_valid):
    # Lets torch.compile trace kg_search: [q, k] outputs whatever n_valid holds.
    check_same_device("kg_search", queries=queries, bank=bank, n_valid=n_valid)
    torch._check(
        queries.dim() == 2, lambda: f"kg_search: queries must be [q, d], got {tuple(queries.shape)}"
    )
    torch._check(
        bank.dim() == 2, lambda: f"kg_search: bank must be [N, d], got {tuple(bank.shape)}"
    )
    torch._check(
        queries.shape[1] == bank.shape[1],
        lambda: f"kg_search: queries must have d = {bank.shape[1]} columns like bank",
    )
    torch._check(n_valid.dim() == 0, lambda: "kg_search: n_valid must be a 0-dim int64 tensor")
    torch._check(k >= 1, lambda: f"kg_search: k must be >= 1, got {k}")
    q = queries.shape[0]
    return (
        queries.new_empty((q, k), dtype=torch.float32),
        queries.new_empty((q, k), dtype=torch.long),
    )


# Not differentiable: the autograd kernel only marks the outputs as such (instead of the default
# fallback, which would attach a grad_fn that warns at backward time).
def _mark_outputs_non_differentiable(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("dedup and kg_search are not differentiable")


torch.library.register_autograd(
    "moe_framework::dedup", _no_backward, setup_context=_mark_outputs_non_differentiable
)
torch.library.register_autograd(
    "moe_framework::kg_search", _no_backward, setup_context=_mark_outputs_non_differentiable
)
