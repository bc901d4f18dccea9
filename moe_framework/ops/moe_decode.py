"""Wrapper and fake kernel of ``moe_decode``: a whole SwiGLU experts step for a few tokens.

At decode (one or a few tokens per step) the general path, ``permute -> grouped_gemm -> swiglu ->
grouped_gemm -> unpermute``, pays fixed per-call costs (five ops and their allocations, thread-pool
wake-ups, panel packing for one row) that dominate the few weight rows it actually needs.
``moe_decode`` is one op: slots grouped by expert, each selected expert's weights read once for all
its tokens, the hidden activation kept in float32, the k outputs of a token combined in slot order.
Inference only (no autograd): :func:`moe_framework.integrations.hf_experts.moe_framework_experts_forward`
takes it when ``T * k <= DECODE_SLOTS_PER_EXPERT[dtype] * E`` (at most one row per expert on
average in float32, a quarter in bfloat16 / float16) and no gradient is needed.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device

__all__ = ["DECODE_SLOTS_PER_EXPERT", "moe_decode", "moe_decode_reference"]

# Callers prefer moe_decode over the general path while T*k <= DECODE_SLOTS_PER_EXPERT[dtype] * E
# (other dtypes: the float32 value). Measured with the whole experts implementation forced onto
# each path (`bench_hf --stages --tokens 1 2 4 8 16 32 --dtypes fp32 bf16`, d = 512, 1 thread,
# Zen 3, two runs; docs/huggingface.md): since the AVX2 small-group grouped GEMM kernels the
# general path / moe_decode time ratio crosses 1 near one slot per expert in float32 (Mixtral
# 1.02-0.76 at 1, 0.74-0.84 at 2; Qwen3-MoE 1.11-1.20 at 1, 0.90-1.02 at 2) and near a quarter of
# a slot in bfloat16 (Qwen3-MoE 1.01-1.11 at 1/4, 0.74-0.93 at 1/2; Mixtral 0.94-1.35 at 1/4).
# (Before those kernels moe_decode won up to 4-8 slots per expert.)
DECODE_SLOTS_PER_EXPERT: dict = {
    torch.float32: 1.0,
    torch.float64: 1.0,
    torch.bfloat16: 0.25,
    torch.float16: 0.25,
}


def moe_decode(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    trans_b: bool = True,
) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))``, ``e = ids[t, j]``.

    Args:
        x: ``[T, d]`` float32, bfloat16, float16 or float64.
        ids: ``[T, k]`` int32 or int64 in ``[0, E)``, or ``-1`` for a dropped slot (other values
            raise on CPU and are dropped on CUDA).
        weights: ``[T, k]`` float32 or ``x``'s dtype.
        w_in: ``[E, 2h, d]`` with ``trans_b`` (Hugging Face's ``gate_up_proj``, gate rows first),
            else ``[E, d, 2h]`` (gate columns first); dtype of ``x``.
        w_out: ``[E, d, h]`` with ``trans_b`` (``down_proj``), else ``[E, h, d]``.
        trans_b: the weight layout.

    Returns:
        ``[T, d]``, dtype of ``x``. Products accumulate in float32 (float64 for float64); the
        hidden activation is not rounded to ``x``'s dtype between the projections.

    Not differentiable: use the general path when a gradient is needed.
    """
    return torch.ops.moe_framework.moe_decode.default(x, ids, weights, w_in, w_out, bool(trans_b))


def moe_decode_reference(x, ids, weights, w_in, w_out, trans_b: bool = True) -> torch.Tensor:
    """:func:`moe_decode` in plain PyTorch (float64 math), for tests."""
    T, k = ids.shape
    xd = x.double()
    y = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            wi = w_in[e].double()
            hh = wi @ xd[t] if trans_b else xd[t] @ wi
            g, u = hh.chunk(2)
            a = torch.nn.functional.silu(g) * u
            wo = w_out[e].double()
            y[t] += float(weights[t, j]) * (wo @ a if trans_b else a @ wo)
    return y.to(x.dtype)


@torch.library.register_fake("moe_framework::moe_decode")
def _moe_decode_fake(x, ids, weights, w_in, w_out, trans_b):
    check_same_device("moe_decode", x=x, ids=ids, weights=weights, w_in=w_in, w_out=w_out)
    torch._check(x.dim() == 2, lambda: f"moe_decode: x must be [T, d], got {tuple(x.shape)}")
    torch._check(
        ids.dim() == 2 and ids.shape[0] == x.shape[0],
        lambda: f"moe_decode: ids must be [T, k] with T = {x.shape[0]}, got {tuple(ids.shape)}",
    )
    torch._check(
        tuple(weights.shape) == tuple(ids.shape),
        lambda: f"moe_decode: weights must be {tuple(ids.shape)}, got {tuple(weights.shape)}",
    )
    torch._check(
        w_in.dim() == 3 and w_out.dim() == 3,
        lambda: "moe_decode: w_in and w_out must be 3-D",
    )
    torch._check(
        w_in.dtype == x.dtype and w_out.dtype == x.dtype,
        lambda: f"moe_decode: w_in and w_out must have x's dtype {x.dtype}",
    )
    return x.new_empty(x.shape)
