"""Counter-based random numbers for router noise and jitter.

A stateless integer hash of ``(seed, step, stream, row, column)`` evaluated with tensor ops. Unlike
a ``torch.Generator`` it has no hidden state, so it traces under ``torch.compile``, gives the same
numbers on CPU and GPU, and a run resumed from a state dict (which holds the step counter)
reproduces the same noise.
"""

from __future__ import annotations

import math

import torch

__all__ = ["counter_uniform", "counter_normal"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for 0 <= x < 2^32 in int64. A multiplier >= 2^31 is replaced by c - 2^32
    # (same product mod 2^32), so |x * c| < 2^63: no int64 overflow on any backend.
    return (x * (c - (1 << 32) if c >= (1 << 31) else c)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit avalanche hash (xorshift-multiply "lowbias32" constants).
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _counter_bits(seed: int, step: torch.Tensor, shape, stream: int, device) -> torch.Tensor:
    rows, cols = shape
    base = _hash32(_hash32(torch.full((), seed & _M32, dtype=torch.int64, device=device)) ^ step)
    base = _hash32(base ^ (stream * 0x9E3779B9 & _M32))
    # Rows and columns are hashed separately (cheap: T + C hashes), then one hash per element.
    r = _hash32(torch.arange(rows, dtype=torch.int64, device=device) ^ base)[:, None]
    c = _hash32(torch.arange(cols, dtype=torch.int64, device=device) * 0x27D4EB2F + 0x165667B1)
    return _hash32(r ^ c[None, :])


def counter_uniform(seed: int, step: torch.Tensor, shape, stream: int = 0, device=None):
    """Uniform floats in (0, 1) of ``shape`` = (rows, cols), a pure function of
    (seed, step, stream, row, column).

    Args:
        seed: int >= 0.
        step: 0-dim int64 tensor (a step counter buffer such as a router's ``noise_step``).
        shape: ``(rows, cols)``.
        stream: independent streams for the same (seed, step).
        device: output device (default: the device of ``step``).

    Returns:
        ``[rows, cols]`` float32.
    """
    device = step.device if device is None else device
    bits = _counter_bits(seed, step.to(device=device, dtype=torch.int64), shape, stream, device)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_normal(seed: int, step: torch.Tensor, shape, stream: int = 0, device=None):
    """Standard normal floats of ``shape`` (Box-Muller over the two counter-based uniform streams
    ``2 * stream`` and ``2 * stream + 1``); arguments as :func:`counter_uniform`."""
    u1 = counter_uniform(seed, step, shape, 2 * stream, device)
    u2 = counter_uniform(seed, step, shape, 2 * stream + 1, device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
