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


def _decode_args(**change):
    """Valid moe_decode arguments in schema order (E 4, d 8, h 6, one token, k 2), then change."""
    args = dict(
        x=torch.randn(1, 8),
        ids=torch.tensor([[0, 1]]),
        weights=torch.rand(1, 2),
        w_in=torch.randn(4, 12, 8),
        w_out=torch.randn(4, 8, 6),
        trans_b=True,
        b_in=None,
        b_out=None,
        gate="silu",
        alpha=1.702,
        limit=7.0,
        interleaved=False,
    )
    args.update(change)
    return args


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
    args = _decode_args(**change)
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


def _general_gated(x, ids, w, w_in, w_out, trans_b, b_in, b_out, gate, alpha, limit, inter):
    """The general path with biases and either gate: permute -> grouped_gemm (+ b_in) -> gate ->
    grouped_gemm (+ b_out) -> unpermute."""
    E = w_in.shape[0]
    xs, ros, off = ops.permute(x, ids, E)
    rows_e = torch.repeat_interleave(torch.arange(E), off.diff()) if xs.shape[0] else off[:0]
    hh = ops.grouped_gemm(xs, w_in, off, trans_b=trans_b)
    if b_in is not None:
        hh = hh + b_in[rows_e]
    if gate == "clamped":
        a = ops.clamped_swiglu(hh, alpha, limit, inter)
    else:
        g, u = (hh[..., 0::2], hh[..., 1::2]) if inter else hh.chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) * u
    y = ops.grouped_gemm(a.contiguous(), w_out, off, trans_b=trans_b)
    if b_out is not None:
        y = y + b_out[rows_e]
    return ops.unpermute(y, ros, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize(
    "gate, interleaved, bias",
    [
        ("clamped", True, True),
        ("clamped", False, False),
        ("silu", True, True),
        ("silu", False, True),
    ],
)
def test_moe_decode_gates_and_biases_match_reference_and_general_path(
    seed, dtype, trans_b, gate, interleaved, bias
):
    """GPT-OSS's decode step (clamped SwiGLU, interleaved gate/up, biases) and the other
    combinations: against the float64 reference and the general path. The inputs are scaled so
    the clamp binds for some columns (limit 0.8)."""
    g = torch.Generator().manual_seed(seed)
    alpha, limit = 1.702, 0.8
    for T, k, E, d, h in [(1, 4, 32, 40, 24), (6, 3, 8, 33, 70), (2, 2, 3, 7, 3)]:
        x, ids, w, w_in, w_out = _problem(g, T, k, E, d, h, dtype, trans_b)
        x = x * 2
        b_in = (torch.randn(E, 2 * h, generator=g) * 0.5).to(dtype) if bias else None
        b_out = (torch.randn(E, d, generator=g) * 0.5).to(dtype) if bias else None
        kw = dict(b_in=b_in, b_out=b_out, gate=gate, alpha=alpha, limit=limit)
        got = ops.moe_decode(x, ids, w, w_in, w_out, trans_b, interleaved=interleaved, **kw)
        want = moe_decode_reference(x, ids, w, w_in, w_out, trans_b, interleaved=interleaved, **kw)
        torch.testing.assert_close(got, want, **TOL[dtype])
        general = _general_gated(
            x, ids, w, w_in, w_out, trans_b, b_in, b_out, gate, alpha, limit, interleaved
        )
        torch.testing.assert_close(got, general, **TOL[dtype])
    if gate == "clamped":  # the clamp changed something: not the same as an unclamped gate
        loose = moe_decode_reference(
            x, ids, w, w_in, w_out, trans_b, interleaved=interleaved, **{**kw, "limit": 1e9}
        )
        assert not torch.allclose(got.double(), loose.double(), rtol=1e-3, atol=1e-3)


def test_moe_decode_bias_only_when_h_is_zero_and_dropped_slots(seed):
    """h = 0: every expert's output is its b_out row; dropped slots contribute nothing."""
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 3, 2, 4, 5, 0, torch.float32, True)
    ids[0, 1] = -1
    b_out = torch.randn(4, 5, generator=g)
    got = ops.moe_decode(x, ids, w, w_in, w_out, True, b_out=b_out, gate="clamped")
    want = torch.zeros(3, 5)
    for t in range(3):
        for j in range(2):
            if ids[t, j] >= 0:
                want[t] += w[t, j] * b_out[ids[t, j]]
    torch.testing.assert_close(got, want)


def test_moe_decode_gated_opcheck_and_compile(seed):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 2, 2, 4, 8, 6, torch.float32, False)
    b_in, b_out = torch.randn(4, 12, generator=g), torch.randn(4, 8, generator=g)
    opcheck(
        OPS.moe_decode.default,
        (x, ids, w, w_in, w_out, False, b_in, b_out, "clamped", 1.5, 0.7, True),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )

    def step(*a):
        return ops.moe_decode(
            *a, False, b_in=b_in, b_out=b_out, gate="clamped", limit=0.7, interleaved=True
        )

    f = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, ids, w, w_in, w_out), step(x, ids, w, w_in, w_out))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(b_in=torch.randn(4, 11)), r"b_in must be \[E, 2h\] = \[4, 12\]"),
        (dict(b_out=torch.randn(3, 8)), r"b_out must be \[E, d\] = \[4, 8\]"),
        (dict(b_out=torch.randn(4, 8).double()), "b_out must have x's dtype"),
        (dict(gate="gelu"), 'gate must be "silu" or "clamped"'),
    ],
)
def test_moe_decode_bad_gate_arguments_raise_clear_error(change, match):
    args = _decode_args(**change)
    with pytest.raises(RuntimeError, match=match):
        OPS.moe_decode.default(*args.values())
    if "gate" in change:
        with pytest.raises(ValueError, match=match):
            ops.moe_decode(*list(args.values())[:6], gate=change["gate"])


@pytest.mark.cuda
@pytest.mark.parametrize("trans_b", [True, False])
def test_cuda_moe_decode_clamped_biased_matches_cpu(seed, trans_b):
    g = torch.Generator().manual_seed(seed)
    x, ids, w, w_in, w_out = _problem(g, 8, 4, 16, 33, 70, torch.float32, trans_b)
    ids[0, 0] = -1
    b_in, b_out = torch.randn(16, 140, generator=g), torch.randn(16, 33, generator=g)
    kw = dict(gate="clamped", limit=0.8, interleaved=True)
    got = ops.moe_decode(
        *(t.cuda() for t in (x, ids, w, w_in, w_out)),
        trans_b,
        b_in=b_in.cuda(),
        b_out=b_out.cuda(),
        **kw,
    )
    want = ops.moe_decode(x, ids, w, w_in, w_out, trans_b, b_in=b_in, b_out=b_out, **kw)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])
