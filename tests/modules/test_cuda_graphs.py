import pytest
import torch
from torch import nn

from moe_framework.cuda_graphs import CUDAGraphInference


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_graphs_on_cpu_machine_raise_clear_error():
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA"):
        CUDAGraphInference(_mlp(), torch.randn(4, 16))


def test_cuda_graphs_reject_non_tensor_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        CUDAGraphInference(_mlp(), [])


@pytest.mark.cuda
def test_cuda_graphs_cpu_tensor_rejected_even_with_cuda():
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors"):
        CUDAGraphInference(_mlp(), torch.randn(4, 16))


@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager_for_new_inputs(seed):
    model = _mlp().cuda().eval()
    runner = CUDAGraphInference(model, torch.randn(4, 16, device="cuda"))
    for _ in range(3):
        x = torch.randn(4, 16, device="cuda")
        torch.testing.assert_close(runner(x), model(x))


@pytest.mark.cuda
def test_cuda_graph_refuses_shape_dtype_device_it_was_not_captured_for():
    model = _mlp().cuda().eval()
    runner = CUDAGraphInference(model, torch.randn(4, 16, device="cuda"))
    with pytest.raises(ValueError, match="captured shape"):
        runner(torch.randn(5, 16, device="cuda"))
    with pytest.raises(ValueError, match="dtype"):
        runner(torch.randn(4, 16, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        runner(torch.randn(4, 16))
    with pytest.raises(ValueError, match="expected 1 input"):
        runner(torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda"))


@pytest.mark.cuda
def test_cuda_graph_outputs_are_copies_unless_asked():
    model = _mlp().cuda().eval()
    x1, x2 = torch.randn(2, 4, 16, device="cuda")
    runner = CUDAGraphInference(model, x1)
    y1 = runner(x1)
    runner(x2)
    torch.testing.assert_close(y1, model(x1))
    shared = CUDAGraphInference(model, x1, clone_outputs=False)
    assert shared(x1) is shared(x2)
