"""Transparent huge pages for large, read-mostly CPU tensors (expert weights at decode).

A decode step streams each selected expert's weights from DRAM once. With 4 KiB pages every 4 KiB
of that stream is a new TLB entry (a page walk), and the hardware prefetchers stop at each page
boundary; with 2 MiB pages neither happens. Measured on the 2-core Zen 4 of docs/performance.md
(``grouped_gemm_q`` INT8 x INT8, d 1024, h 768, E 32, top-2, weights from DRAM, 1 thread, the same
layers with and without the advice, interleaved): 21.0 -> 24.2 GB/s at T = 1, 21.9 -> 25.2 GB/s at
T = 8 (+15%).

Linux backs an anonymous mapping with huge pages when it is 2 MiB aligned and advised
``MADV_HUGEPAGE`` *before* its pages are first touched (``/sys/kernel/mm/transparent_hugepage/
enabled`` = ``madvise`` or ``always``). PyTorch's CPU allocator gives neither, so
:func:`to_huge_pages` copies a tensor into a fresh, 2 MiB-aligned anonymous mapping advised first,
and :func:`use_huge_pages` does that for every large parameter and buffer of a module.
:class:`~moe_framework.quantization.QuantizedExperts` does it for its packed weights by default.

The advice is advisory: where THP is off (``never``), the machine is not Linux or the kernel
cannot find a free 2 MiB page, the copy is backed by ordinary pages and is otherwise the same
tensor. Only CPU tensors of at least ``min_bytes`` (default 4 MiB) are moved; the copy has the
same dtype, shape, strides (contiguous) and values. ``module.to(...)`` or ``load_state_dict`` into
*new* tensors allocates ordinary memory again: call :func:`use_huge_pages` after them
(``load_state_dict`` copies into the existing tensors and keeps them).

    import moe_framework
    from moe_framework.huge_pages import use_huge_pages
    bank = moe_framework.ExpertBank(d_model=1024, d_hidden=768, num_experts=32).to(torch.bfloat16)
    use_huge_pages(bank)          # 2 MiB pages under bank.weight_in / bank.w_out
"""

from __future__ import annotations

import mmap
import sys

import torch
from torch import nn

__all__ = [
    "HUGE_PAGE_BYTES",
    "empty_huge_pages",
    "huge_pages_available",
    "to_huge_pages",
    "use_huge_pages",
]

HUGE_PAGE_BYTES = 2 << 20
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
    """True on Linux when transparent huge pages are not switched off (``[always]`` or
    ``[madvise]`` in /sys/kernel/mm/transparent_hugepage/enabled) and Python exposes
    ``MADV_HUGEPAGE``."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_ENABLED) as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def empty_huge_pages(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor in a fresh anonymous mapping, 2 MiB aligned and advised
    ``MADV_HUGEPAGE`` before anything touches it (ordinary pages where the kernel declines). The
    tensor's storage holds the mapping alive."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
    # Over-allocate by one huge page so that a 2 MiB-aligned start exists inside the mapping.
    size = nbytes + HUGE_PAGE_BYTES
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the storage keeps a reference to buf
    start = (-raw.data_ptr()) % HUGE_PAGE_BYTES
    if hasattr(mmap, "MADV_HUGEPAGE"):
        length = size - start
        buf.madvise(mmap.MADV_HUGEPAGE, start, length - length % mmap.PAGESIZE)
    return raw[start : start + nbytes].view(dtype).view(shape)


def to_huge_pages(t: torch.Tensor, min_bytes: int = 2 * HUGE_PAGE_BYTES) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in huge-page-advised memory (:func:`empty_huge_pages`);
    ``t`` itself when it is smaller than ``min_bytes``, not a dense CPU tensor, or huge pages are
    unavailable (:func:`huge_pages_available`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"to_huge_pages: t must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0:
        raise ValueError(f"to_huge_pages: min_bytes must be an int >= 0, got {min_bytes!r}")
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or t.layout != torch.strided or nbytes == 0 or nbytes < min_bytes:
        return t
    if not huge_pages_available():
        return t
    out = empty_huge_pages(t.shape, t.dtype)
    with torch.no_grad():
        out.copy_(t)
    return out


def use_huge_pages(module: nn.Module, min_bytes: int = 2 * HUGE_PAGE_BYTES) -> nn.Module:
    """Move every CPU parameter and buffer of ``module`` (recursively) of at least ``min_bytes``
    onto huge-page-backed memory (:func:`to_huge_pages`), in place (``param.data`` / the buffer is
    replaced; autograd state and the module's structure are kept). Returns ``module``. Tensors
    shared by several modules (tied weights) are moved once and stay shared."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"use_huge_pages: module must be an nn.Module, got {type(module).__name__}")
    moved: dict = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in moved:
            moved[key] = to_huge_pages(t, min_bytes)
        return moved[key]

    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and (new := move(p.data)).data_ptr() != p.data_ptr():
                p.data = new
        for name, b in list(sub._buffers.items()):
            if b is not None and (new := move(b)).data_ptr() != b.data_ptr():
                sub._buffers[name] = new
    return module
