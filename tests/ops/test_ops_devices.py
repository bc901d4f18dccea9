"""Every op refuses tensor arguments on different devices, with one message naming the op, each
argument and its device: in the fake (meta) kernels, which used to return tensors of mixed
devices (CPU ones of uninitialised memory), and in the real kernels (the CPU kernel reached by
redispatch here; CUDA with a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

import moe_framework  # noqa: F401
from moe_framework import ops

lib = torch.ops.moe_framework
CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _cases():
    """op name -> (arguments on CPU, the names of its tensor arguments by position)."""
    ids = torch.tensor([[0, 2], [1, 0], [3, 3], [2, 1]], dtype=torch.int32)
    row_of_slot = torch.randperm(8)
    offsets4 = torch.tensor([0, 2, 4, 6, 8])
    return {
        "route": (
            (torch.randn(4, 8), 2, "softmax", torch.zeros(8), 1, 1, True, 1.0),
            {0: "logits", 3: "correction_bias"},
        ),
        "route_backward": (
            (torch.randn(4, 2), torch.randn(4, 8), ids, "softmax", True, 1.0),
            {0: "grad_weights", 1: "logits", 2: "ids"},
        ),
        "permute": ((torch.randn(4, 3), ids, 4), {0: "x", 1: "ids"}),
        "permute_backward": (
            (torch.randn(8, 3), row_of_slot, offsets4, 2),
            {0: "grad_x_sorted", 1: "row_of_slot", 2: "offsets"},
        ),
        "unpermute": (
            (torch.randn(8, 3), row_of_slot, torch.rand(4, 2)),
            {0: "y_sorted", 1: "row_of_slot", 2: "weights"},
        ),
        "unpermute_backward": (
            (torch.randn(4, 3), torch.randn(8, 3), row_of_slot, torch.rand(4, 2)),
            {0: "grad_y", 1: "y_sorted", 2: "row_of_slot", 3: "weights"},
        ),
        "grouped_gemm": (
            (torch.randn(8, 3), torch.randn(4, 3, 5), offsets4, False),
            {0: "a", 1: "b", 2: "offsets"},
        ),
        "grouped_gemm_wgrad": (
            (torch.randn(8, 3), torch.randn(8, 5), offsets4, False),
            {0: "a", 1: "grad_out", 2: "offsets"},
        ),
        "grouped_gemm_q": (
            (
                torch.randn(8, 64),
                torch.zeros(4, 5, 32, dtype=torch.uint8),
                torch.ones(4, 5, 2),
                torch.zeros(4, 5, 2, dtype=torch.uint8),
                offsets4,
                4,
                32,
            ),
            {0: "a", 1: "qweight", 2: "scales", 3: "zeros", 4: "offsets"},
        ),
        "swiglu_backward": ((torch.randn(4, 3), torch.randn(4, 6)), {0: "grad", 1: "h"}),
        "swiglu_backward_": ((torch.randn(4, 3), torch.randn(4, 6)), {0: "grad", 1: "h"}),
        "kg_search": (
            (torch.randn(2, 4), torch.randn(6, 4), 3, torch.tensor(5)),
            {0: "queries", 1: "bank", 3: "n_valid"},
        ),
    }


# Ops with a single tensor argument cannot mix devices.
SINGLE_TENSOR_OPS = {"swiglu", "dedup"}
MIXES = [(op, pos) for op, (_, names) in _cases().items() for pos in names]


def test_every_op_with_several_tensor_arguments_is_covered():
    assert set(_cases()) | SINGLE_TENSOR_OPS == set(ops.OPS)


def _moved(args, pos, device):
    return tuple(a.to(device) if i == pos else a for i, a in enumerate(args))


def _message(op, args, names, pos, device):
    listed = ", ".join(
        f"{name} on {device if i == pos else 'cpu'}" for i, name in sorted(names.items())
    )
    return f"{op}: tensor arguments must be on the same device, got {listed}"


@pytest.mark.parametrize("op,pos", MIXES)
def test_fake_kernel_rejects_a_meta_argument_among_cpu_ones(op, pos):
    args, names = _cases()[op]
    with pytest.raises(RuntimeError, match=re.escape(_message(op, args, names, pos, "meta"))):
        getattr(lib, op).default(*_moved(args, pos, "meta"))


@pytest.mark.parametrize("op,pos", MIXES)
def test_cpu_kernel_rejects_a_meta_argument_among_cpu_ones(op, pos):
    # The dispatcher sends a meta + CPU mix to the fake kernel; redispatching to the CPU key runs
    # the C++ kernel's own check (the one a CUDA + CPU mix meets in the CUDA kernel).
    args, names = _cases()[op]
    with pytest.raises(RuntimeError, match=re.escape(_message(op, args, names, pos, "meta"))):
        getattr(lib, op).default.redispatch(CPU_KERNEL, *_moved(args, pos, "meta"))


@pytest.mark.parametrize("op", sorted(_cases()))
def test_all_meta_arguments_still_give_meta_outputs(op):
    args, _ = _cases()[op]
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(lib, op).default(*meta)
    outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
    assert all(t.device.type == "meta" for t in outs)


def test_wrappers_reject_the_issue_mixes():
    ids = torch.randint(0, 4, (6, 2), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="permute: tensor arguments must be on the same device"):
        ops.permute(torch.randn(6, 4, device="meta"), ids, 4)
    with pytest.raises(RuntimeError, match="weights on meta"):
        ops.unpermute(torch.randn(12, 4), torch.randperm(12), torch.rand(6, 2, device="meta"))
    with pytest.raises(RuntimeError, match="b on meta"):
        ops.grouped_gemm(
            torch.randn(8, 3), torch.randn(2, 3, 5, device="meta"), torch.tensor([0, 4, 8])
        )
    with pytest.raises(RuntimeError, match="queries on meta, bank on cpu, n_valid on cpu"):
        ops.kg_search(torch.randn(2, 4, device="meta"), torch.randn(6, 4), 3, 6)


@pytest.mark.cuda
@pytest.mark.parametrize("op,pos", MIXES)
def test_cuda_kernel_rejects_a_cpu_argument_among_cuda_ones(op, pos):
    args, names = _cases()[op]
    on_cuda = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    listed = ", ".join(
        f"{name} on {'cpu' if i == pos else 'cuda:0'}" for i, name in sorted(names.items())
    )
    want = f"{op}: tensor arguments must be on the same device, got {listed}"
    with pytest.raises(RuntimeError, match=re.escape(want)):
        getattr(lib, op).default(*_moved(on_cuda, pos, "cpu"))
