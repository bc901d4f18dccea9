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

from typing import Optional

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
    *,
    b_in: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    gate: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    interleaved: bool = False,
) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * down_e(act(gate_e(x[t]), up_e(x[t])))``, ``e = ids[t, j]``.

    ``act(g, u)`` is ``silu(g) * u`` (``gate="silu"``) or GPT-OSS's clamped SwiGLU
    (``gate="clamped"``: ``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with
    ``g' = min(g, limit)``, as :func:`clamped_swiglu`); ``b_in`` is added to ``w_in``'s output
    before the gate and ``b_out`` to each expert's output.

    Args:
        x: ``[T, d]`` float32, bfloat16, float16 or float64.
        ids: ``[T, k]`` int32 or int64 in ``[0, E)``, or ``-1`` for a dropped slot (other values
            raise on CPU and are dropped on CUDA).
        weights: ``[T, k]`` float32 or ``x``'s dtype.
        w_in: ``[E, 2h, d]`` with ``trans_b`` (Hugging Face's ``gate_up_proj``, gate rows first),
            else ``[E, d, 2h]`` (gate columns first); dtype of ``x``.
        w_out: ``[E, d, h]`` with ``trans_b`` (``down_proj``), else ``[E, h, d]``.
        trans_b: the weight layout.
        b_in: optional ``[E, 2h]`` bias of ``w_in``'s output (Hugging Face's
            ``gate_up_proj_bias``), in ``w_in``'s column order.
        b_out: optional ``[E, d]`` bias of the output (``down_proj_bias``).
        gate: ``"silu"`` or ``"clamped"``.
        alpha, limit: the clamped gate's constants (ignored for ``"silu"``).
        interleaved: gate and up halves interleaved (gate at even columns of ``w_in``'s output,
            GPT-OSS) instead of concatenated (gate first).

    Returns:
        ``[T, d]``, dtype of ``x``. Products accumulate in float32 (float64 for float64); the
        hidden activation is not rounded to ``x``'s dtype between the projections.

    Not differentiable: use the general path when a gradient is needed.
    """
    if gate not in ("silu", "clamped"):
        raise ValueError(f'moe_decode: gate must be "silu" or "clamped", got {gate!r}')
    return torch.ops.moe_framework.moe_decode.default(
        x,
        ids,
        weights,
        w_in,
        w_out,
        bool(trans_b),
        b_in,
        b_out,
        gate,
        float(alpha),
        float(limit),
        bool(interleaved),
    )


def moe_decode_reference(
    x,
    ids,
    weights,
    w_in,
    w_out,
    trans_b: bool = True,
    *,
    b_in=None,
    b_out=None,
    gate: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    interleaved: bool = False,
) -> torch.Tensor:
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
            if b_in is not None:
                hh = hh + b_in[e].double()
            g, u = (hh[0::2], hh[1::2]) if interleaved else hh.chunk(2)
            if gate == "clamped":
                g = g.clamp(max=limit)
                u = u.clamp(min=-limit, max=limit)
                a = (u + 1) * (g * torch.sigmoid(alpha * g))
            else:
                a = torch.nn.functional.silu(g) * u
            wo = w_out[e].double()
            ye = wo @ a if trans_b else a @ wo
            if b_out is not None:
                ye = ye + b_out[e].double()
            y[t] += float(weights[t, j]) * ye
    return y.to(x.dtype)


@torch.library.register_fake("moe_framework::moe_decode")
def _moe_decode_fake(
    x,
    ids,
    weights,
    w_in,
    w_out,
    trans_b,
    b_in=None,
    b_out=None,
    gate="silu",
    alpha=1.702,
    limit=7.0,
    interleaved=False,
):
    check_same_device("moe_decode", x=x, ids=ids, weights=weights, w_in=w_in, w_out=w_out)
    torch._check(
        gate in ("silu", "clamped"),
        lambda: f'moe_decode: gate must be "silu" or "clamped", got "{gate}"',
    )
    for name, b in (("b_in", b_in), ("b_out", b_out)):
        if b is not None:
            msg = f"moe_decode: {name} must be 2-D with x's dtype {x.dtype} and device"
            torch._check(
                b.dim() == 2 and b.dtype == x.dtype and b.device == x.device,
                lambda msg=msg: msg,  # type: ignore[misc]
            )
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
