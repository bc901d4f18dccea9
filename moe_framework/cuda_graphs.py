"""CUDAGraphInference: capture a module's forward once, replay it with new inputs.

A CUDA graph records every kernel launch of one forward and replays them with a single launch,
which removes the per-op CPU overhead that dominates small-batch MoE inference. It works for our
MoE layers because their forward has no host sync and static shapes (the per-expert offsets stay
on the device and are read by the grouped GEMM kernel itself).

The recipe (PyTorch "CUDA Graphs" notes): copy the example inputs into static buffers, warm up on
a side stream (lazy initialisation, cuBLAS workspaces, autotuning must not happen during capture),
capture under ``torch.cuda.graph``, then for each call copy the new inputs into the static buffers
and replay. A graph is only valid for the shapes, dtypes and device it was captured with: any other
input is refused with a ``ValueError`` instead of silently reading past a buffer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch.utils import _pytree as pytree

__all__ = ["CUDAGraphInference"]


def _as_tuple(inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


class CUDAGraphInference:
    """Replays a captured CUDA graph of ``module(*example_inputs)`` under ``torch.no_grad``.

    Args:
        module: an ``nn.Module`` (or callable) whose forward has static shapes and no host sync.
            Put it in eval mode first if it has dropout.
        example_inputs: a CUDA tensor or a sequence of CUDA tensors. Their shapes, dtypes and
            device are the only ones the graph accepts.
        warmup_iters: forwards run on a side stream before capture (>= 1).
        clone_outputs: return copies of the outputs (default). With ``False`` the returned tensors
            are the graph's static output buffers, overwritten by the next call.

    Call: ``runner(*inputs)`` -> the module's output structure (tensors on the capture device).

    Raises:
        RuntimeError: at construction, when CUDA is not available or an input is not on CUDA
            (CUDA graphs need CUDA; on CPU use the module or ``torch.compile`` directly).
        ValueError: at call time, when an input's count, shape, dtype or device differs from the
            captured ones.
    """

    def __init__(
        self,
        module: Callable[..., Any],
        example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
        *,
        warmup_iters: int = 3,
        clone_outputs: bool = True,
    ) -> None:
        inputs = _as_tuple(example_inputs)
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise ValueError(
                "CUDAGraphInference: example_inputs must be a tensor or a non-empty sequence of "
                f"tensors, got {type(example_inputs).__name__}"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CUDAGraphInference: CUDA graphs need CUDA, but torch.cuda.is_available() is "
                "False on this machine; run the module (or torch.compile(module)) directly on CPU"
            )
        for i, x in enumerate(inputs):
            if x.device.type != "cuda":
                raise RuntimeError(
                    f"CUDAGraphInference: CUDA graphs need CUDA tensors; example_inputs[{i}] is "
                    f"on {x.device}. Move the module and the inputs to a CUDA device first"
                )
        if warmup_iters < 1:
            raise ValueError(f"CUDAGraphInference: warmup_iters must be >= 1, got {warmup_iters}")
        self.module = module
        self.clone_outputs = clone_outputs
        self.device = inputs[0].device
        self._specs = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        self.static_inputs = tuple(x.detach().clone() for x in inputs)

        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup_iters):
                    module(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.static_outputs = module(*self.static_inputs)
            torch.cuda.current_stream().synchronize()

    def _check(self, inputs: tuple) -> None:
        if len(inputs) != len(self._specs):
            raise ValueError(
                f"CUDAGraphInference: expected {len(self._specs)} input(s) (as captured), "
                f"got {len(inputs)}"
            )
        for i, (x, (shape, dtype, device)) in enumerate(zip(inputs, self._specs)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"CUDAGraphInference: input {i} must be a tensor, got {type(x)}")
            if tuple(x.shape) != shape or x.dtype != dtype or x.device != device:
                raise ValueError(
                    f"CUDAGraphInference: input {i} must match the captured shape {list(shape)}, "
                    f"dtype {dtype} and device {device}; got shape {list(x.shape)}, dtype "
                    f"{x.dtype}, device {x.device}. Capture another graph for other shapes "
                    "(or pad to the captured shape)"
                )

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self._check(inputs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        if not self.clone_outputs:
            return self.static_outputs
        return pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_outputs
        )
