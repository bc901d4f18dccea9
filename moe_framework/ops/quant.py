"""Weight-only INT8 / INT4 expert weights: the ``grouped_gemm_q`` op and its packing helpers.

``grouped_gemm_q(a, qweight, scales, offsets, bits, group_size, zeros=None)`` multiplies the rows
of each expert by that expert's quantised weight matrix, dequantised in registers by the kernel:
``out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ W[e].T`` with ``W[e]`` ``[N, K]``
(one row per output channel, the ``nn.Linear`` layout). Offsets stay on the device (no host sync,
static output shape). Inference only: asking for a gradient through it raises.

Storage (the contract of the C++ and CUDA kernels, ``csrc/include/moe_framework/grouped_gemm_q.h``):

``bits=8``
    ``qweight`` int8 ``[E, N, K]``, ``W = q * scale``; symmetric (``q`` in ``[-127, 127]``).
``bits=4``
    ``qweight`` uint8 ``[E, N, K/2]``, two weights per byte, ``W = (u - zero) * scale`` with ``u``
    in ``[0, 15]``; ``zero = 8`` (symmetric) or ``zeros[e, n, g]`` (asymmetric). Packed in blocks
    of 32 consecutive ``k``: byte ``16*b + i`` holds ``k = 32*b + i`` in its low nibble and
    ``k = 32*b + 16 + i`` in its high nibble. ``K`` and ``group_size`` must be multiples of 32.

``scales`` float32 ``[E, N, G]`` with ``G = K / group_size``; ``group_size=0`` is one group per
output channel (``G = 1``, the usual INT8 scheme). ``zeros`` uint8 ``[E, N, G]`` or ``None``.

Helpers: :func:`quantize_weight` (float ``[E, N, K]`` -> :class:`QuantizedWeight`),
:func:`dequantize_weight` (back to float32), :func:`pack_int4` / :func:`unpack_int4`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._checks import check_same_device

__all__ = [
    "QuantizedWeight",
    "grouped_gemm_q",
    "quantize_weight",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
    "quantize_activations",
]


class QuantizedWeight(NamedTuple):
    """One quantised stacked weight ``[E, N, K]`` (see the module docstring for the format)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int


def grouped_gemm_q(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    zeros: Optional[torch.Tensor] = None,
    act_bits: int = 0,
) -> torch.Tensor:
    """Grouped matrix product with weight-only quantised experts.

    Args:
        a: ``[M, K]`` float32, bfloat16 or float16 (any strides), rows sorted by expert.
        qweight: int8 ``[E, N, K]`` (``bits=8``) or packed uint8 ``[E, N, K/2]`` (``bits=4``).
        scales: float32 ``[E, N, K / group_size]`` (``[E, N, 1]`` for ``group_size=0``).
        offsets: ``[E+1]`` int64 on ``a``'s device, non-decreasing, ``offsets[E] <= M`` (checked
            on CPU; clamped into ``[0, M]`` on CUDA, where checking would need a host sync).
        bits: 8 or 4.
        group_size: weights per scale along ``K``; 0 = one group per output channel. INT4 needs
            a multiple of 32 (32, 64, 128 are the usual choices).
        zeros: uint8 ``[E, N, G]`` zero points of the asymmetric INT4 scheme, else ``None``.
        act_bits: 0 (default): weight-only, the activations are used in float32. 8: the
            activations are quantised to INT8 per (row, weight group) once per call --
            ``scale = max|a| / 127``, ``q = round(a / scale)`` (:func:`quantize_activations`) --
            and multiplied by the weights with integer dot products (the llama.cpp Q4_0 x Q8_0
            idea; AVX2 ``vpmaddubsw`` on the CPU), the scales applied once per group. Faster on
            the CPU, slightly less accurate: an explicit option (see docs/quantization.md).

    Returns:
        ``[M, N]`` in ``a``'s dtype, accumulated in float32; rows outside
        ``[offsets[0], offsets[E])`` are zero.

    Not differentiable: a backward through it raises ``RuntimeError`` (quantised experts are for
    inference; train the float model and quantise it).
    """
    return torch.ops.moe_framework.grouped_gemm_q.default(
        a, qweight, scales, zeros, offsets, bits, group_size, act_bits
    )


@torch.library.register_fake("moe_framework::grouped_gemm_q")
def _grouped_gemm_q_fake(a, qweight, scales, zeros, offsets, bits, group_size, act_bits=0):
    op = "grouped_gemm_q"
    # in argument order, as the C++ check lists them
    tensors = {"a": a, "qweight": qweight, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    tensors["offsets"] = offsets
    check_same_device(op, **tensors)
    torch._check(bits in (8, 4), lambda: f"{op}: bits must be 8 or 4, got {bits}")
    torch._check(
        act_bits in (0, 8),
        lambda: f"{op}: act_bits must be 0 (weight-only) or 8 (INT8 activations), got {act_bits}",
    )
    torch._check(a.dim() == 2, lambda: f"{op}: a must be [M, K], got {tuple(a.shape)}")
    torch._check(
        a.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"{op}: a must be float32, bfloat16 or float16, got {a.dtype}",
    )
    want = torch.int8 if bits == 8 else torch.uint8
    torch._check(
        qweight.dim() == 3 and qweight.dtype == want,
        lambda: (
            f"{op}: qweight must be {want} [E, N, K'], got {qweight.dtype} {tuple(qweight.shape)}"
        ),
    )
    k = a.shape[1]
    packed = k if bits == 8 else k // 2
    torch._check(
        qweight.shape[2] == packed,
        lambda: f"{op}: qweight must be [E, N, {packed}] for K={k}, got {tuple(qweight.shape)}",
    )
    torch._check(
        scales.dtype == torch.float32 and scales.dim() == 3,
        lambda: f"{op}: scales must be float32 [E, N, G], got {scales.dtype} {tuple(scales.shape)}",
    )
    torch._check(
        offsets.dim() == 1 and offsets.dtype == torch.int64,
        lambda: f"{op}: offsets must be int64 [E+1]",
    )
    torch._check(
        offsets.shape[0] == qweight.shape[0] + 1,
        lambda: f"{op}: offsets must have E+1 = {qweight.shape[0] + 1} entries",
    )
    return a.new_empty((a.shape[0], qweight.shape[1]))


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise RuntimeError(
        "grouped_gemm_q: quantised expert weights are inference-only; no gradient is defined. "
        "Run quantised models under torch.no_grad() / torch.inference_mode(), and train the "
        "float model (then quantise it)."
    )


torch.library.register_autograd(
    "moe_framework::grouped_gemm_q", _backward, setup_context=_setup_context
)


# ---- packing helpers (plain PyTorch) -------------------------------------------------------


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """``u`` uint8 ``[..., K]`` with values in ``[0, 15]``, ``K % 32 == 0`` -> ``[..., K/2]``
    in the kernels' block-of-32 nibble order (see the module docstring)."""
    if u.dtype != torch.uint8:
        raise ValueError(f"pack_int4: u must be uint8, got {u.dtype}")
    k = u.shape[-1]
    if k % 32:
        raise ValueError(f"pack_int4: the last dimension must be a multiple of 32, got {k}")
    blocks = u.reshape(*u.shape[:-1], k // 32, 2, 16)
    packed = (blocks[..., 0, :] & 0x0F) | ((blocks[..., 1, :] & 0x0F) << 4)
    return packed.reshape(*u.shape[:-1], k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` -> uint8 ``[..., K]`` in ``[0, 15]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    kh = packed.shape[-1]
    if kh % 16:
        raise ValueError(f"unpack_int4: the last dimension must be a multiple of 16, got {kh}")
    blocks = packed.reshape(*packed.shape[:-1], kh // 16, 16)
    u = torch.stack([blocks & 0x0F, blocks >> 4], dim=-2)
    return u.reshape(*packed.shape[:-1], kh * 2)


def _check_scheme(name: str, k: int, bits: int, group_size: int, symmetric: bool) -> int:
    if bits not in (8, 4):
        raise ValueError(f"{name}: bits must be 8 or 4, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise ValueError(
            f"{name}: group_size must be an int >= 0 (0 = per channel), got {group_size!r}"
        )
    gs = group_size or k
    if k % max(gs, 1):
        raise ValueError(f"{name}: group_size {group_size} must divide K = {k}")
    if bits == 4 and (k % 32 or gs % 32):
        raise ValueError(
            f"{name}: bits=4 needs K and group_size to be multiples of 32, got K={k}, "
            f"group_size={group_size}"
        )
    if bits == 8 and not symmetric:
        raise ValueError(f"{name}: INT8 is symmetric only (symmetric=False needs bits=4)")
    return gs


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor, bits: int = 8, group_size: int = 0, symmetric: bool = True
) -> QuantizedWeight:
    """Quantise stacked weights ``w`` ``[E, N, K]`` (rows = output channels) round-to-nearest.

    * INT8 (symmetric): ``scale = max|w| / 127`` per group, ``q = round(w / scale)``.
    * INT4 symmetric (llama.cpp Q4_0's rule): ``scale = m / -8`` with ``m`` the group's
      largest-magnitude value (signed), ``u = clamp(round(w / scale) + 8, 0, 15)``; the extreme
      value lands exactly on ``-8``.
    * INT4 asymmetric: ``scale = (max - min) / 15``, ``zero = clamp(round(-min / scale), 0, 15)``,
      ``u = clamp(round(w / scale) + zero, 0, 15)``.

    ``group_size=0`` means one group per output channel. Returns a :class:`QuantizedWeight` on
    ``w``'s device.
    """
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(
            f"quantize_weight: w must be a float [E, N, K] tensor, got {w.dtype} {tuple(w.shape)}"
        )
    E, N, K = w.shape
    gs = _check_scheme("quantize_weight", K, bits, group_size, symmetric)
    G = K // gs if K else 0
    x = w.detach().to(torch.float32).reshape(E, N, G, gs if K else 0)
    zeros = None
    if bits == 8:
        scale = x.abs().amax(-1) / 127.0 if K else x.new_zeros(E, N, 0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q.reshape(E, N, K), scale.contiguous(), None, 8, group_size)
    if symmetric:
        idx = x.abs().argmax(-1, keepdim=True)
        scale = x.gather(-1, idx).squeeze(-1) / -8.0
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        u = torch.round(x / safe.unsqueeze(-1)).add_(8).clamp_(0, 15)
    else:
        lo = x.amin(-1).clamp(max=0.0)
        hi = x.amax(-1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = torch.round(-lo / safe).clamp_(0, 15)
        u = torch.round(x / safe.unsqueeze(-1)).add_(z.unsqueeze(-1)).clamp_(0, 15)
        zeros = z.to(torch.uint8).contiguous()
    packed = pack_int4(u.to(torch.uint8).reshape(E, N, K))
    return QuantizedWeight(packed.contiguous(), scale.contiguous(), zeros, 4, group_size)


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    """The float32 ``[E, N, K]`` weights that ``q`` stands for (what the kernels multiply by)."""
    E, N = q.qweight.shape[:2]
    if q.bits == 8:
        vals = q.qweight.to(torch.float32)
        zero = None
    else:
        vals = unpack_int4(q.qweight).to(torch.float32)
        zero = q.zeros.to(torch.float32) if q.zeros is not None else torch.full_like(q.scales, 8.0)
    K = vals.shape[-1]
    G = q.scales.shape[-1]
    if K == 0 or G == 0:
        return vals
    vals = vals.reshape(E, N, G, K // G)
    if zero is not None:
        vals = vals - zero.unsqueeze(-1)
    return (vals * q.scales.unsqueeze(-1)).reshape(E, N, K)


def quantize_activations(a: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 activations as ``grouped_gemm_q(..., act_bits=8)`` forms them: ``a`` ``[M, K]``
    (float32 view of any float dtype) in groups of ``group_size`` consecutive ``k`` (0 = the whole
    row) -> ``(q int8 [M, K], scale float32 [M, G])`` with ``scale = max|a| / 127`` per group and
    ``q = round(a / scale)`` (round half to even; 0 where the group is all zero), so that
    ``a ~= q * scale``."""
    if a.dim() != 2 or not a.is_floating_point():
        raise ValueError(f"quantize_activations: a must be a float [M, K] tensor, got {a.dtype}")
    M, K = a.shape
    gs = group_size or K
    if gs <= 0 or K % gs:
        raise ValueError(f"quantize_activations: group_size {group_size} must divide K = {K}")
    x = a.to(torch.float32).reshape(M, K // gs, gs)
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(x / scale), torch.zeros_like(x)).clamp_(-127, 127)
    return q.to(torch.int8).reshape(M, K), scale.squeeze(-1)
