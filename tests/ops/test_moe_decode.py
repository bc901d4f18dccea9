"""moe_decode (the fused small-T experts step): against a float64 plain-PyTorch reference and the
general permute -> grouped_gemm -> swiglu -> grouped_gemm -> unpermute path, both weight layouts,
repeated and dropped experts, odd sizes, non-contiguous weights, opcheck, torch.compile, bad input
and CUDA."""

import pytest
import torch
from conftest import TOLERANCES
from torch.library import opcheck

from moe_framework import ops
from moe_framework.experts import expert_ffn
from moe_framework.ops.moe_decode import moe_decode_reference

OPS = torch.ops.moe_framework
TOL = TOLERANCES["layer"]


def _problem(g, T, k, E, d, h, dtype, trans_b):
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.int()
    w = torch.rand(T, k, generator=g).softmax(-1)
    shape_in = (E, 2 * h, d) if trans_b else (E, d, 2 * h)
    shape_out = (E, d, h) if trans_b else (E, h, d)
    w_in = (torch.randn(shape_in, generator=g) / d**0.5).to(dtype)
    w_out = (torch.randn(shape_out, generator=g) / h**0.5).to(dtype)
    return x, ids, w, w_in, w_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("trans_b", [True, False])
def test_moe_decode_matches_reference_and_general_path(seed, dtype, trans_b):
    g = torch.Generator().manual_seed(seed)
    for T, k, E, d, h in [(1, 8, 64, 40, 24), (8, 8, 16, 33, 70), (3, 2, 5, 7, 3), (5, 1, 1, 9, 5)]:
        x, ids, w, w_in, w_out = _problem(g, T, k, E, d, h, dtype, trans_b)
        got = ops.moe_decode(x, ids, w, w_in, w_out, trans_b)
        want = moe_decode_reference(x, ids, w, w_in, w_out, trans_b)
        torch.testing.assert_close(got, want, **TOL[dtype])
        xs, ros, off = ops.permute(x, ids, E)
        layout = "out_in" if trans_b else "in_out"
        general = ops.unpermute(expert_ffn(xs, off, w_in, w_out, layout=layout), ros, w)
        torch.testing.assert_close(got, general, **TOL[dtype])


def test_moe_decode_dropped_slots_repeats_zero_size_and_strides(seed):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 4, 3, 6, 10, 8, torch.float32, True)
    ids[1, 0] = -1
    ids[2] = torch.tensor([5, 5, 5], dtype=ids.dtype)  # one expert for every slot of a token
    got = ops.moe_decode(x, ids, w, w_in, w_out, True)
    torch.testing.assert_close(
        got, moe_decode_reference(x, ids, w, w_in, w_out, True), **TOL[torch.float32]
    )
    # Non-contiguous weights (a transposed view) and int64 ids give the same result.
    w_in_t = w_in.transpose(1, 2).contiguous().transpose(1, 2)
    got2 = ops.moe_decode(x, ids.long(), w, w_in_t, w_out, True)
    torch.testing.assert_close(got2, got)
    assert ops.moe_decode(x[:0], ids[:0], w[:0], w_in, w_out, True).shape == (0, 10)
    ids[:] = -1
    assert torch.equal(ops.moe_decode(x, ids, w, w_in, w_out, True), torch.zeros(4, 10))


def test_moe_decode_is_deterministic_across_thread_counts(seed):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 8, 8, 16, 64, 48, torch.float32, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.moe_decode(x, ids, w, w_in, w_out, True)
        torch.set_num_threads(2)
        b = ops.moe_decode(x, ids, w, w_in, w_out, True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


def test_moe_decode_opcheck_and_compile(seed):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 2, 2, 4, 8, 6, torch.float32, True)
    opcheck(
        OPS.moe_decode.default,
        (x, ids, w, w_in, w_out, True),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    f = torch.compile(lambda *a: ops.moe_decode(*a, True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, ids, w, w_in, w_out), ops.moe_decode(x, ids, w, w_in, w_out))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ids=torch.tensor([[0, 9]])), r"ids must be in \[0, 4\)"),
        (dict(weights=torch.rand(1, 3)), "weights must be"),
        (dict(w_out=torch.randn(4, 8, 5)), "w_out must be"),
        (dict(w_in=torch.randn(4, 12, 7)), "w_in must be"),
        (dict(x=torch.randn(1, 8).double()), "dtype"),
    ],
)
def test_moe_decode_bad_input_raises_clear_error(change, match):
    args = dict(
        x=torch.randn(1, 8),
        ids=torch.tensor([[0, 1]]),
        weights=torch.rand(1, 2),
        w_in=torch.randn(4, 12, 8),
        w_out=torch.randn(4, 8, 6),
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.moe_decode(args["x"], args["ids"], args["weights"], args["w_in"], args["w_out"], True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trans_b", [True, False])
def test_cuda_moe_decode_matches_cpu(seed, dtype, trans_b):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 8, 8, 16, 33, 70, dtype, trans_b)
    ids[0, 0] = -1
    got = ops.moe_decode(x.cuda(), ids.cuda(), w.cuda(), w_in.cuda(), w_out.cuda(), trans_b)
    torch.testing.assert_close(
        got.cpu(), ops.moe_decode(x, ids, w, w_in, w_out, trans_b), **TOL[dtype]
    )
