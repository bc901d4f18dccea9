"""grouped_gemm_q (weight-only INT8 / INT4 grouped GEMM) and its packing helpers: against the
plain-PyTorch reference (dequantise element by element from the format's definition, float64
matmul), opcheck, torch.compile, the gradient refusal, determinism, the baseline (scalar) build,
input validation (CPU; the CUDA test is marked and skips without a GPU)."""

import json

import pytest
import torch
from isa_builds import output_under
from torch.library import opcheck

import moe_framework  # noqa: F401
from moe_framework.ops import (
    QuantizedWeight,
    dequantize_weight,
    grouped_gemm_q,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from moe_framework.ops import tuning as knobs
from moe_framework.ops.reference import dequantize_ref, grouped_gemm_q_ref

OPS = torch.ops.moe_framework
# (bits, group_size, symmetric)
SCHEMES = [(8, 0, True), (8, 16, True), (4, 32, True), (4, 64, False), (4, 128, True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _offsets(M, E, gaps=False):
    """[E+1] int64: random non-decreasing split of M rows (a sub-range of them with `gaps`),
    some experts empty."""
    lo = int(torch.randint(0, M // 3 + 1, ())) if gaps and M > 2 else 0
    hi = int(torch.randint(lo, M + 1, ())) if gaps else M
    cuts = torch.sort(torch.randint(lo, hi + 1, (E - 1,))).values
    return torch.cat([torch.tensor([lo]), cuts, torch.tensor([hi])]).long()


def _qweight(E, N, K, bits, group_size, symmetric):
    gs = group_size or K
    if bits == 8:
        q = torch.randint(-127, 128, (E, N, K), dtype=torch.int8)
        zeros = None
    else:
        q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.int16).to(torch.uint8)
        zeros = None if symmetric else torch.randint(0, 16, (E, N, K // gs), dtype=torch.uint8)
    scales = torch.rand(E, N, K // gs) * 0.1 + 0.01
    return q, scales, zeros


def _tol(dtype, K):
    # fp32 accumulation of K products (|w| <= ~1.6, |a| ~ 1) vs a float64 reference, plus one
    # rounding of the output to bf16/fp16 (|out| ~ sqrt(K)).
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-6 * K)
    return dict(rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-2)


# INT8 weight-only on AVX2: a work tile of columns per kernel call (knob ggq_wo_column_tiles = 1,
# the default) and one column per call (0): per channel with K = 1000 (several 16 KiB column
# tiles at N = 40; the 8-wide and scalar tails) and groups of 48 and 40 (groups starting off a
# 64-byte boundary, where the tile kernel's prefetch must still advance), every row count 1-4.
@pytest.mark.parametrize("knob", [0, 1])
@pytest.mark.parametrize("gs,K", [(0, 1000), (48, 144), (40, 200)])
def test_grouped_gemm_q_int8_column_tiles(seed, knob, gs, K):
    q, scales, _ = _qweight(3, 40, K, 8, gs, True)
    a = torch.randn(11, K)
    prev = knobs.set_tuning("ggq_wo_column_tiles", knob)
    try:
        for off in ([0, 5, 6, 11], [0, 2, 5, 11]):  # rows 4+1, 1, 4+1; 2, 3, 4+2
            off = torch.tensor(off)
            out = grouped_gemm_q(a, q, scales, off, 8, gs)
            want = grouped_gemm_q_ref(a, q, scales, off, 8, gs)
            torch.testing.assert_close(out, want, **_tol(a.dtype, K))
    finally:
        knobs.set_tuning("ggq_wo_column_tiles", prev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"b{s[0]}g{s[1]}{'s' if s[2] else 'a'}")
def test_grouped_gemm_q_matches_reference(seed, scheme, dtype):
    bits, group_size, symmetric = scheme
    for E, M in ((1, 0), (3, 1), (5, int(torch.randint(2, 40, ()))), (33, 9)):
        K = 128 if group_size == 128 else 64 * int(torch.randint(1, 4, ()))
        N = int(torch.randint(1, 40, ()))
        q, scales, zeros = _qweight(E, N, K, bits, group_size, symmetric)
        off = _offsets(M, E, gaps=E == 5)
        a = torch.randn(M, K).to(dtype)
        out = grouped_gemm_q(a, q, scales, off, bits, group_size, zeros)
        ref = grouped_gemm_q_ref(a, q, scales, off, bits, group_size, zeros)
        assert out.dtype == dtype and out.shape == (M, N)
        torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype, K))
        # rows outside [offsets[0], offsets[E]) are exactly zero
        assert not out[: off[0]].any() and not out[off[-1] :].any()


def test_grouped_gemm_q_non_contiguous_and_odd_int8_sizes(seed):
    E, M, N, K = 4, 11, 7, 37  # INT8 per channel: any K (tails of the 8-wide loop)
    q, scales, _ = _qweight(E, N, K, 8, 0, True)
    a = torch.randn(K, M).t()  # non-contiguous
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    off = _offsets(M, E)
    out = grouped_gemm_q(a, qt, scales, off, 8, 0)
    torch.testing.assert_close(out, grouped_gemm_q_ref(a, q, scales, off, 8, 0), **_tol(a.dtype, K))


def test_quantize_dequantize_round_trip(seed):
    w = torch.randn(3, 5, 128) * torch.rand(3, 5, 1) * 3
    w[0, 0] = 0.0  # an all-zero channel (scale 0)
    for bits, gs, sym in SCHEMES:
        q = quantize_weight(w, bits, gs, sym)
        deq = dequantize_weight(q)
        # the helper's dequantisation is the format's (reference written independently)
        torch.testing.assert_close(deq, dequantize_ref(q.qweight, q.scales, q.zeros, bits, gs))
        step = q.scales.abs().repeat_interleave(gs or 128, dim=-1)
        # round to nearest: within half a step, except INT4 symmetric's clamped +8 (one step)
        bound = step * (1.0 if bits == 4 and sym else 0.5) + 1e-6
        assert ((deq - w).abs() <= bound).all(), (bits, gs, sym)
        assert not deq[0, 0].any()
    u = torch.randint(0, 16, (2, 3, 96), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (2, 3, 48) and torch.equal(unpack_int4(packed), u)
    # the documented nibble order: byte 16 b + i = k (32 b + i) low, (32 b + 16 + i) high
    assert int(packed[0, 0, 17]) == int(u[0, 0, 33]) | (int(u[0, 0, 49]) << 4)


def test_grouped_gemm_q_opcheck_and_compile(seed):
    E, M, K, N = 3, 6, 64, 9
    a = torch.randn(M, K)
    off = torch.tensor([0, 2, 2, 5])
    # opcheck with the optional zeros given (INT4 asymmetric) and absent (INT8)
    q8, s8, _ = _qweight(E, N, K, 8, 0, True)
    opcheck(OPS.grouped_gemm_q.default, (a, q8, s8, None, off, 8, 0), test_utils="test_schema")
    for bits, gs, sym in ((4, 32, False),):
        q, scales, zeros = _qweight(E, N, K, bits, gs, sym)
        opcheck(OPS.grouped_gemm_q.default, (a, q, scales, zeros, off, bits, gs))
        fn = torch.compile(
            lambda a, off, q=q, s=scales, b=bits, g=gs, z=zeros: (
                grouped_gemm_q(a, q, s, off, b, g, z) * 2
            ),
            fullgraph=True,
        )
        torch.testing.assert_close(
            fn(a, off), grouped_gemm_q(a, q, scales, off, bits, gs, zeros) * 2
        )
    meta = OPS.grouped_gemm_q(
        a.to("meta"), q.to("meta"), scales.to("meta"), None, off.to("meta"), 4, 32
    )
    assert meta.shape == (M, N) and meta.device.type == "meta"


def test_grouped_gemm_q_refuses_a_gradient(seed):
    q, scales, _ = _qweight(2, 4, 32, 8, 0, True)
    a = torch.randn(3, 32, requires_grad=True)
    out = grouped_gemm_q(a, q, scales, torch.tensor([0, 1, 3]), 8, 0)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_grouped_gemm_q_deterministic_across_thread_counts(seed):
    q, scales, zeros = _qweight(6, 70, 256, 4, 64, False)
    a = torch.randn(40, 256).to(torch.bfloat16)
    off = _offsets(40, 6)
    outs = []
    n0 = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(grouped_gemm_q(a, q, scales, off, 4, 64, zeros))
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(outs[0], outs[1])


# The AVX-512 kernels (knob ggq_avx512 = 1, the default; on CPUs without AVX-512 both values run
# the AVX2 kernels) and the AVX2 ones (0): 4 columns per pass for up to 2 rows and 2 for more, the
# rest one by one (N = 7, 70), several column tiles (N = 300 INT8 columns of 128 bytes), rows in
# chunks of 4 then 1..3; INT8 groups of 16, 24 (masked last steps inside a column), per channel
# with K = 37 (one masked step); INT4 groups of 32, 64 (asymmetric) and per channel.
@pytest.mark.parametrize("knob", [0, 1])
@pytest.mark.parametrize(
    "bits,gs,K,sym",
    [(8, 16, 128, True), (8, 24, 96, True), (8, 0, 37, True), (8, 0, 128, True)]
    + [(4, 32, 96, True), (4, 64, 192, False), (4, 0, 128, False)],
)
def test_grouped_gemm_q_avx512_knob(seed, bits, gs, K, sym, knob):
    from moe_framework.ops import tuning as knobs

    prev = knobs.set_tuning("ggq_avx512", knob)
    try:
        for E, M, N in ((3, 13, 7), (2, 11, 70), (1, 6, 300)):
            q, scales, zeros = _qweight(E, N, K, bits, gs, sym)
            off = _offsets(M, E, gaps=True)
            for dtype in (torch.float32, torch.bfloat16):
                a = torch.randn(M, K).to(dtype)
                out = grouped_gemm_q(a, q, scales, off, bits, gs, zeros)
                ref = grouped_gemm_q_ref(a, q, scales, off, bits, gs, zeros)
                torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype, K))
                assert not out[: off[0]].any() and not out[off[-1] :].any()
    finally:
        knobs.set_tuning("ggq_avx512", prev)


_BASELINE_SCRIPT = """
import json, sys, torch, moe_framework
from moe_framework.ops import grouped_gemm_q, quantize_weight
from moe_framework.ops.reference import grouped_gemm_q_ref
torch.manual_seed(int(sys.argv[1]))
a = torch.randn(9, 128)
off = torch.tensor([0, 4, 4, 9])
worst = 0.0
for bits, gs, sym in ((8, 0, True), (8, 48, True), (4, 32, True), (4, 64, False), (4, 128, True)):
    for act in (0, 8):  # weight-only and INT8 activations (integer dot products)
        q = quantize_weight(torch.randn(3, 5, 96 if gs == 48 else 128), bits, gs, sym)
        x = a[:, : q.qweight.shape[2] * (1 if bits == 8 else 2)]
        out = grouped_gemm_q(x, q.qweight, q.scales, off, bits, gs, q.zeros, act)
        ref = grouped_gemm_q_ref(x, q.qweight, q.scales, off, bits, gs, q.zeros, act)
        worst = max(worst, float((out - ref).abs().max()))
print(json.dumps(worst))
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "default"])
def test_grouped_gemm_q_each_build_matches_reference(seed, isa):
    # Each build, weight-only and act_bits=8, against the reference: the scalar kernels
    # (MOE_FRAMEWORK_CPU_BASELINE=1), the AVX2 ones (MOE_FRAMEWORK_CPU_NO_AVX512=1) and the best this
    # CPU runs (the AVX-512 / VNNI kernels where it has them): fp32 sums of 128 products of
    # |out| ~ 10.
    worst = json.loads(output_under(isa, _BASELINE_SCRIPT, str(seed)).decode())
    assert worst < 1e-4, worst


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(bits=5), "bits must be 8 or 4"),
        (dict(q=torch.zeros(2, 3, 64, dtype=torch.uint8)), "qweight must have dtype"),
        (dict(scales=torch.ones(2, 3, 3)), r"scales must be \[E, N, G\]"),
        (dict(offsets=torch.tensor([0, 1])), "offsets must have E\\+1"),
        (dict(offsets=torch.tensor([0, 3, 1])), "non-decreasing"),
        (dict(offsets=torch.tensor([0, 1, 9])), "offsets\\[E\\] must be <= M"),
        (dict(group_size=24), "must divide K"),
        (dict(zeros=torch.zeros(2, 3, 2, dtype=torch.uint8)), "only supported with bits=4"),
        (dict(a=torch.randn(4, 64, dtype=torch.float64)), "a must have dtype"),
        (dict(a=torch.randn(4, 60)), "qweight must be"),
    ],
)
def test_grouped_gemm_q_bad_inputs(change, match):
    args = dict(
        a=torch.randn(4, 64),
        q=torch.zeros(2, 3, 64, dtype=torch.int8),
        scales=torch.ones(2, 3, 2),
        zeros=None,
        offsets=torch.tensor([0, 1, 4]),
        bits=8,
        group_size=32,
    )
    args.update(change)
    with pytest.raises((RuntimeError, ValueError), match=match):
        OPS.grouped_gemm_q(
            args["a"],
            args["q"],
            args["scales"],
            args["zeros"],
            args["offsets"],
            args["bits"],
            args["group_size"],
        )


def test_int4_needs_multiples_of_32():
    with pytest.raises(RuntimeError, match="multiples of 32"):
        OPS.grouped_gemm_q(
            torch.randn(2, 48),
            torch.zeros(1, 3, 24, dtype=torch.uint8),
            torch.ones(1, 3, 3),
            None,
            torch.tensor([0, 2]),
            4,
            16,
        )
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_weight(torch.randn(1, 2, 48), 4, 16)
    with pytest.raises(ValueError, match="INT8 is symmetric"):
        quantize_weight(torch.randn(1, 2, 64), 8, 0, symmetric=False)
    assert isinstance(quantize_weight(torch.randn(1, 2, 64), 4, 32), QuantizedWeight)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"b{s[0]}g{s[1]}{'s' if s[2] else 'a'}")
def test_grouped_gemm_q_cuda_matches_reference(seed, scheme):
    bits, gs, sym = scheme
    for dtype in DTYPES:
        E, M, K, N = 9, 37, 256, 70
        q, scales, zeros = _qweight(E, N, K, bits, gs, sym)
        off = _offsets(M, E, gaps=True)
        a = torch.randn(M, K).to(dtype)
        ref = grouped_gemm_q_ref(a, q, scales, off, bits, gs, zeros)
        dev = [t.cuda() if t is not None else None for t in (a, q, scales, zeros, off)]
        out = grouped_gemm_q(dev[0], dev[1], dev[2], dev[4], bits, gs, dev[3])
        torch.testing.assert_close(out.cpu().float(), ref.float(), **_tol(dtype, K))
