"""Checks shared by the fake (meta) kernels of every op family."""

from __future__ import annotations

import torch


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """``torch._check`` that every tensor argument of ``op`` lives on one device.

    Without it a fake kernel given, say, a meta ``x`` and a CPU ``ids`` would return tensors of
    mixed devices (CPU ones of uninitialised memory). The message is the one the C++ kernels give
    (``moe_framework::check_same_device`` in ``csrc/include/moe_framework/common.h``), listing
    each argument with its device: ``"permute: tensor arguments must be on the same device, got
    x on meta, ids on cpu"``.
    """
    devices = {t.device for t in tensors.values()}
    torch._check(
        len(devices) <= 1,
        lambda: (
            f"{op}: tensor arguments must be on the same device, got "
            + ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        ),
    )
