"""Wrappers of the CPU kernels' run-time tuning knobs (``csrc/include/moe_framework/cpu_tuning.h``).

The grouped GEMM and kg_search / dedup CPU kernels choose kernels and tile sizes by instruction
set and shape with built-in constants; the ones that decide which kernel runs or how the work is
cut are *knobs* that start at those defaults and may be set for this machine. The auto-tuner
(:mod:`moe_framework.kernel_tuning`, ``python -m moe_framework tune-kernels``) times candidate
values and writes a cache that :func:`moe_framework.kernel_tuning.apply_cache` loads. Knobs are
process-wide: set them between calls, never while an op runs in another thread. They do not
change what an op computes, only how (results stay within the ops' tolerances; for one set of
values the bits are the same every run).

These ops take no tensors and are not meant for compiled graphs.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["tuning_names", "get_tuning", "set_tuning", "tuning_values", "reset_tuning"]


def tuning_names() -> list:
    """The knob names, in the order of ``cpu_tuning.h``."""
    return list(torch.ops.moe_framework.tuning_names())


def get_tuning(name: str, initial: bool = False) -> int:
    """The current value of knob ``name`` (its built-in default with ``initial=True``).
    An unknown name raises ``RuntimeError`` listing the known ones."""
    return int(torch.ops.moe_framework.tuning_get(name, initial))


def set_tuning(name: str, value: Optional[int]) -> int:
    """Set knob ``name`` to ``value`` (``None``: back to the default); returns the previous value.
    A value outside the knob's range raises ``RuntimeError`` naming the range."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"set_tuning: value must be an int or None, got {value!r}")
    return int(torch.ops.moe_framework.tuning_set(name, value))


def tuning_values(initial: bool = False) -> dict:
    """``{name: value}`` of every knob (the defaults with ``initial=True``)."""
    return {n: get_tuning(n, initial) for n in tuning_names()}


def reset_tuning() -> None:
    """Every knob back to its built-in default."""
    for n in tuning_names():
        set_tuning(n, None)
