"""moe_framework.huge_pages: copies onto 2 MiB-aligned, MADV_HUGEPAGE-advised memory keep dtype,
shape and values, stay alive after the source is gone, are advised (the mapping's VmFlags carry
"hg" in /proc/self/smaps), leave small / non-CPU tensors alone, and a module moved onto them still
trains and keeps tied weights tied; QuantizedExperts keeps its packed weights there."""

import gc

import pytest
import torch
from torch import nn

import moe_framework.huge_pages as hp
from moe_framework.huge_pages import (
    HUGE_PAGE_BYTES,
    empty_huge_pages,
    huge_pages_available,
    to_huge_pages,
    use_huge_pages,
)
from moe_framework.quantization import QuantizedExperts

needs_thp = pytest.mark.skipif(
    not huge_pages_available(), reason="transparent huge pages off or not Linux"
)


def _mapping_flags(ptr: int) -> set:
    """VmFlags of the mapping of /proc/self/smaps that holds address ptr."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.uint8])
def test_copy_is_advised_aligned_and_equal(seed, dtype):
    rows = int(torch.randint(4100, 5000, ()))  # >= 4 MiB (the default min_bytes) at 1 byte
    src = (torch.randn(rows, 1031) * 50).to(dtype)
    out = to_huge_pages(src)
    assert out is not src and out.data_ptr() != src.data_ptr()
    assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous()
    assert out.data_ptr() % HUGE_PAGE_BYTES == 0
    assert torch.equal(out, src)
    assert "hg" in _mapping_flags(out.data_ptr())
    assert "hg" not in _mapping_flags(src.data_ptr())


@needs_thp
def test_copy_outlives_source_and_non_contiguous_source(seed):
    src = torch.randn(1024, 3000).t()  # non-contiguous, 12 MB
    expect = src.contiguous().clone()
    out = to_huge_pages(src)
    assert out.is_contiguous() and torch.equal(out, expect)
    del src
    gc.collect()
    junk = [torch.randn(1 << 20) for _ in range(8)]  # reuse freed memory
    assert torch.equal(out, expect)
    out.mul_(2)  # writable
    assert torch.equal(out, expect * 2)
    del junk


def test_small_and_non_cpu_tensors_are_left_alone():
    small = torch.randn(100)
    assert to_huge_pages(small) is small
    meta = torch.empty(4 << 20, device="meta")
    assert to_huge_pages(meta) is meta
    empty = torch.empty(0)
    assert to_huge_pages(empty, min_bytes=0) is empty


def test_without_huge_pages_the_tensor_is_returned(monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hp, "_THP_ENABLED", str(mode))
    assert not huge_pages_available()
    big = torch.randn(3 << 20)
    assert to_huge_pages(big) is big
    mode.write_text("always [madvise] never\n")
    assert huge_pages_available() == hasattr(__import__("mmap"), "MADV_HUGEPAGE")


def test_bad_arguments():
    with pytest.raises(TypeError, match="to_huge_pages: t must be a torch.Tensor, got list"):
        to_huge_pages([1, 2])
    with pytest.raises(ValueError, match="min_bytes must be an int >= 0, got -1"):
        to_huge_pages(torch.zeros(4), min_bytes=-1)
    with pytest.raises(TypeError, match="use_huge_pages: module must be an nn.Module"):
        use_huge_pages(torch.zeros(4))


def test_empty_huge_pages_shape_and_dtype():
    t = empty_huge_pages((3, 5, 7), torch.float16)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float16 and t.is_contiguous()
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * 105


@needs_thp
def test_module_moves_trains_and_keeps_ties(seed):
    lin = nn.Linear(1024, 1536)
    head = nn.Linear(1536, 1024)
    model = nn.Sequential(lin, nn.ReLU(), head, nn.Linear(1024, 1536))
    model[3].weight = lin.weight  # tied
    model.register_buffer("table", torch.randn(2048, 1024))
    small_bias = lin.bias
    x = torch.randn(5, 1024)
    before = model[3](model[2](model[1](lin(x))))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_huge_pages(model) is model
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad
    assert model[3].weight is lin.weight  # still tied: one tensor
    assert lin.weight.data_ptr() % HUGE_PAGE_BYTES == 0
    assert "hg" in _mapping_flags(lin.weight.data_ptr())
    assert "hg" in _mapping_flags(model.table.data_ptr())
    assert lin.bias is small_bias and "hg" not in _mapping_flags(lin.bias.data_ptr())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    after = model[3](model[2](model[1](lin(x))))
    assert torch.equal(before, after)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    after.square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    w_before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(lin.weight.detach(), w_before)
    assert "hg" in _mapping_flags(lin.weight.data_ptr())  # updated in place


@needs_thp
def test_quantized_experts_keep_packed_weights_on_huge_pages(seed, tmp_path):
    from moe_framework.quantization import load_quantized, save_quantized

    E, d, h = 24, 512, 384  # both packed projections >= 4 MiB
    w_in, w_out = torch.randn(E, 2 * h, d) * 0.02, torch.randn(E, d, h) * 0.02
    m = QuantizedExperts.from_float(w_in, w_out, bits=8)
    assert "hg" in _mapping_flags(m.qweight_in.data_ptr())
    assert "hg" in _mapping_flags(m.qweight_out.data_ptr())
    x = torch.randn(6, d)
    off = torch.tensor([0, 2, 2, 3, 3, 3, 5, 6] + [6] * 17)
    y = m(x, off)
    path = tmp_path / "q.safetensors"
    save_quantized(m, path)
    m2 = QuantizedExperts.from_float(torch.zeros_like(w_in), torch.zeros_like(w_out), bits=8)
    load_quantized(m2, path)
    assert torch.equal(m2.qweight_in, m.qweight_in)
    assert "hg" in _mapping_flags(m2.qweight_in.data_ptr())  # loaded into the advised buffers
    assert torch.equal(m2(x, off), y)
