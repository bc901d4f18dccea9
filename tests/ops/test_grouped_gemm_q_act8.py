"""grouped_gemm_q with INT8 activations (act_bits=8: activations quantised per row and weight group,
integer dot products): against the plain-PyTorch reference (activations quantised element by element
in float32, weights dequantised, float64 matmul), odd sizes, zero-size, non-contiguous, all-zero
groups, long groups (int16 flushes), opcheck, torch.compile, determinism across thread counts,
input validation, and the module option (QuantizedExperts act_quant="int8"). The scalar build is
checked in test_grouped_gemm_q.py's baseline test; the CUDA test is marked and skips without a
GPU."""

import pytest
import torch
from torch.library import opcheck

import moe_framework  # noqa: F401
from moe_framework.experts import ExpertBank
from moe_framework.ops import grouped_gemm_q, quantize_activations
from moe_framework.ops import tuning as knobs
from moe_framework.ops.reference import grouped_gemm_q_ref, quantize_activations_ref
from moe_framework.quantization import QuantizedExperts, quantize_experts, set_act_quant

OPS = torch.ops.moe_framework
# (bits, group_size, symmetric, K): INT8 per channel with a K that is no multiple of 32 (scalar
# tails), INT8 groups of 48, INT4 with 5 and 6 groups (the AVX2 kernel takes groups 4 at a time,
# then the rest one by one), odd block counts per group (96 = 3 blocks) and groups over 256
# weights (K = 608 per channel: 19 blocks, int16 sums flushed after 8, 16, then 3)
SCHEMES = [
    (8, 0, True, 101),
    (8, 48, True, 144),
    (4, 32, True, 160),
    (4, 32, False, 192),
    (4, 96, False, 192),
    (4, 128, True, 256),
]


def _qweight(E, N, K, bits, group_size, symmetric):
    gs = group_size or K
    if bits == 8:
        q = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)  # -128 too (vpsignb edge)
        zeros = None
    else:
        q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.int16).to(torch.uint8)
        zeros = None if symmetric else torch.randint(0, 16, (E, N, K // gs), dtype=torch.uint8)
    return q, torch.rand(E, N, K // gs) * 0.1 + 0.01, zeros


def _offsets(M, E):
    lo = int(torch.randint(0, M // 3 + 1, ())) if M > 2 else 0
    hi = int(torch.randint(lo, M + 1, ()))
    cuts = torch.sort(torch.randint(lo, hi + 1, (E - 1,))).values
    return torch.cat([torch.tensor([lo]), cuts, torch.tensor([hi])]).long()


def _check(a, q, scales, off, bits, gs, zeros):
    out = grouped_gemm_q(a, q, scales, off, bits, gs, zeros, act_bits=8)
    ref = grouped_gemm_q_ref(a, q, scales, off, bits, gs, zeros, act_bits=8)
    assert out.dtype == a.dtype and out.shape == ref.shape
    # the integer dot products are exact: only the per-group fp32 scaling (and the output
    # rounding for bf16: the fp32 sum and the float64 reference may round to neighbouring bf16
    # values, one bf16 ulp = at most 2**-7 relative) differ from the float64 reference
    rtol = 1e-5 if a.dtype == torch.float32 else 2**-7
    tol = dict(rtol=rtol, atol=1e-5 * a.shape[1])
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    assert not out[: off[0]].any() and not out[off[-1] :].any()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"b{s[0]}g{s[1]}k{s[3]}")
def test_act8_matches_reference(seed, scheme, dtype):
    bits, gs, sym, K = scheme
    if bits == 4 and gs == 128 and dtype == torch.float32:
        K = 608  # one INT4 group per channel of 19 blocks: the int16 flush path
        gs = 0
    for E, M in ((1, 0), (3, 1), (4, int(torch.randint(2, 12, ()))), (9, 5)):
        N = int(torch.randint(1, 20, ()))
        q, scales, zeros = _qweight(E, N, K, bits, gs, sym)
        a = (torch.randn(M, K) * torch.rand(M, 1) * 4).to(dtype)
        if M > 1:
            a[1, : gs or K] = 0  # an all-zero group: scale 0, q 0
        _check(a, q, scales, _offsets(M, E), bits, gs, zeros)


def test_act8_non_contiguous_and_against_float(seed):
    E, M, N, K = 3, 7, 9, 128
    w = torch.randn(E, N, K)
    from moe_framework.ops import quantize_weight

    qw = quantize_weight(w, 4, 64)
    a = torch.randn(K, M).t()  # non-contiguous
    off = torch.tensor([0, 3, 3, 7])
    out = _check(a, qw.qweight, qw.scales, off, 4, 64, None)
    wo = grouped_gemm_q(a, qw.qweight, qw.scales, off, 4, 64, None)
    # INT8 activations of Gaussian rows: about 1% relative change against weight-only
    rel = float((out - wo).norm() / wo.norm())
    assert 0 < rel < 0.03, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,gs,K", [(8, 0, 256), (8, 32, 96), (4, 64, 192), (4, 32, 160)])
def test_act8_row_strided_input(seed, dtype, bits, gs, K):
    # The activations are quantised straight from the input (no fp32 copy): rows with a stride
    # longer than K (a column slice of a wider tensor) and rows before offsets[0] / after
    # offsets[E] give the bits of the same call on a contiguous copy, and match the reference.
    E, M, N = 3, 9, 21
    q, scales, zeros = _qweight(E, N, K, bits, gs, True)
    wide = (torch.randn(M, K + 37) * 3).to(dtype)
    a = wide[:, 5 : 5 + K]
    assert a.stride() == (K + 37, 1)
    off = torch.tensor([2, 4, 4, 8])
    out = _check(a, q, scales, off, bits, gs, zeros)
    dense = grouped_gemm_q(a.contiguous(), q, scales, off, bits, gs, zeros, act_bits=8)
    assert torch.equal(out, dense)


def test_act8_int4_several_column_tiles(seed):
    # N = 300 columns of 64 packed bytes: two column tiles per expert (16 KiB each), the AVX2
    # kernel runs a tile's columns per call; rows in chunks of 4 and 1
    q, scales, zeros = _qweight(2, 300, 128, 4, 64, False)
    a = torch.randn(7, 128)
    _check(a, q, scales, torch.tensor([0, 5, 7]), 4, 64, zeros)


# The AVX2 group kernels (knob ggq_a8_group_kernels = 1, the default: INT4 groups of a multiple of
# 64 weights, INT8 of 32) and the general kernels (0) against the reference: INT4 groups of 64, 128
# and 256 (chunk counts fixed at compile time), 192, 320 (5 chunks: int16 sums flushed after 4) and
# one group of 448 per channel, asymmetric and symmetric; INT8 groups of 64 and per channel; every
# row count 1-4 of a chunk, several column tiles (N = 70).
@pytest.mark.parametrize("knob", [0, 1])
@pytest.mark.parametrize(
    "bits,gs,K",
    [(4, 64, 192), (4, 128, 384), (4, 256, 512), (4, 192, 384), (4, 320, 640), (4, 0, 448)]
    + [(8, 64, 192), (8, 0, 256)],
)
def test_act8_group_kernels(seed, bits, gs, K, knob):
    q, scales, zeros = _qweight(3, 70, K, bits, gs, gs == 128)
    a = torch.randn(11, K) * 2
    a[2, : gs or K] = 0  # an all-zero group
    prev = knobs.set_tuning("ggq_a8_group_kernels", knob)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for off in ([0, 5, 6, 11], [0, 2, 5, 11]):  # rows 4+1, 1, 4+1; 2, 3, 4+2
                _check(a.to(dtype), q, scales, torch.tensor(off), bits, gs, zeros)
    finally:
        knobs.set_tuning("ggq_a8_group_kernels", prev)


# The AVX512-VNNI kernels (knob ggq_avx512 = 2: INT8 and INT4 weights; 1, the default: INT4 only,
# INT8 x INT8 stays on AVX2; CPUs without AVX512-VNNI run the AVX2 kernels for every value) and the
# AVX2 ones (0): INT8 per channel with K = 101 (a masked last
# step), groups of 48 (masked steps inside a column) and 64, K = 1024 per channel (16 steps); INT4
# groups of 64, 128, 192, 256 and one of 448 per channel (the VNNI kernel), 32 and 96 (not a
# multiple of 64: the AVX2 kernels either way), asymmetric and symmetric; 4 columns per pass for up
# to 2 rows, 2 for more, the rest one by one (N = 7, 70), several column tiles (N = 300), rows in
# chunks of 4 then 1..3, an all-zero group.
@pytest.mark.parametrize("knob", [0, 1, 2])
@pytest.mark.parametrize(
    "bits,gs,K",
    [(8, 0, 101), (8, 48, 144), (8, 64, 192), (8, 0, 1024)]
    + [(4, 64, 192), (4, 128, 256), (4, 192, 384), (4, 256, 512), (4, 0, 448)]
    + [(4, 32, 96), (4, 96, 192)],
)
def test_act8_avx512_knob(seed, bits, gs, K, knob):
    prev = knobs.set_tuning("ggq_avx512", knob)
    try:
        for E, M, N in ((3, 13, 7), (2, 11, 70), (1, 6, 300)):
            q, scales, zeros = _qweight(E, N, K, bits, gs, gs != 128)
            a = torch.randn(M, K) * 2
            a[2, : gs or K] = 0  # an all-zero group
            off = _offsets(M, E)
            for dtype in (torch.float32, torch.bfloat16):
                _check(a.to(dtype), q, scales, off, bits, gs, zeros)
    finally:
        knobs.set_tuning("ggq_avx512", prev)


@pytest.mark.parametrize("K", [200, 256])
def test_act8_activation_quantisation_is_exact(seed, K):
    # identity INT8 weights (scale 1, one group per channel): out[r, n] = q[r, n] * scale_r, the
    # op's own quantisation (vectorised on AVX2, scalar tails) against quantize_activations'
    a = torch.randn(6, K) * 3
    a[0, :8] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 0.5, -126.5, 1e-30])  # halves: to even
    a[1] = 0  # all zero: scale 0, q 0
    q = torch.eye(K, dtype=torch.int8).unsqueeze(0)
    out = grouped_gemm_q(a, q, torch.ones(1, K, 1), torch.tensor([0, 6]), 8, 0, None, act_bits=8)
    want_q, want_scale = quantize_activations(a, 0)
    assert torch.equal(out, want_q.float() * want_scale)


def test_quantize_activations_helper(seed):
    a = torch.randn(5, 96) * 3
    a[2, 32:64] = 0
    q, scale = quantize_activations(a, 32)
    assert q.dtype == torch.int8 and scale.shape == (5, 3)
    assert int(q.abs().max()) == 127 and not q[2, 32:64].any() and scale[2, 1] == 0
    deq = (q.double().reshape(5, 3, 32) * scale.double().unsqueeze(-1)).reshape(5, 96)
    torch.testing.assert_close(deq, quantize_activations_ref(a, 32), rtol=0, atol=0)
    # round to nearest: within half a step of the input
    assert bool(((deq - a).abs() <= scale.repeat_interleave(32, 1) / 2 * 1.0001).all())
    with pytest.raises(ValueError, match="must divide K"):
        quantize_activations(a, 40)


def test_act8_opcheck_compile_and_threads(seed):
    E, M, K, N = 3, 6, 64, 9
    a = torch.randn(M, K)
    off = torch.tensor([0, 2, 2, 5])
    q, scales, zeros = _qweight(E, N, K, 4, 32, False)
    opcheck(OPS.grouped_gemm_q.default, (a, q, scales, zeros, off, 4, 32, 8))
    fn = torch.compile(
        lambda a, off: grouped_gemm_q(a, q, scales, off, 4, 32, zeros, act_bits=8) * 2,
        fullgraph=True,
    )
    want = grouped_gemm_q(a, q, scales, off, 4, 32, zeros, act_bits=8) * 2
    torch.testing.assert_close(fn(a, off), want)
    # every output element is one thread's fixed-order sum: 1 and 2 threads bitwise equal
    q8, s8, _ = _qweight(6, 70, 256, 8, 0, True)
    q4, s4, z4 = _qweight(3, 50, 256, 4, 64, False)
    big = torch.randn(40, 256).to(torch.bfloat16)
    off6 = _offsets(40, 6)
    outs = []
    n0 = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(
                (
                    grouped_gemm_q(big, q4, s4, torch.tensor([0, 10, 20, 40]), 4, 64, z4, 8),
                    grouped_gemm_q(big, q8, s8, off6, 8, 0, None, act_bits=8),
                )
            )
    finally:
        torch.set_num_threads(n0)
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_act8_bad_act_bits():
    with pytest.raises(RuntimeError, match="act_bits must be 0 .* or 8"):
        OPS.grouped_gemm_q(
            torch.randn(2, 64),
            torch.zeros(1, 3, 64, dtype=torch.int8),
            torch.ones(1, 3, 1),
            None,
            torch.tensor([0, 2]),
            8,
            0,
            4,
        )


def test_quantized_experts_act_quant_option(seed):
    torch.manual_seed(seed)
    bank = ExpertBank(d_model=64, d_hidden=96, num_experts=4, init_std=0.05)
    x = torch.randn(10, 64)
    off = torch.tensor([0, 3, 3, 8, 10])
    with torch.no_grad():
        want = bank(x, off)
        qe = quantize_experts(bank, bits=4, group_size=32)
        assert isinstance(qe, QuantizedExperts) and qe.act_quant is None
        wo = qe(x, off)
        set_act_quant(qe, "int8")
        a8 = qe(x, off)
        direct = quantize_experts(bank, bits=4, group_size=32, act_quant="int8")(x, off)
    assert torch.equal(a8, direct) and not torch.equal(a8, wo)
    err_wo = float((wo - want).norm() / want.norm())
    err_a8 = float((a8 - want).norm() / want.norm())
    # INT8 activations add a little to the INT4 weights' error, no more
    # (random Gaussian weights: INT4 g32 round-to-nearest is ~14% off; trained weights do better)
    assert err_wo < 0.2 and err_a8 < err_wo + 0.03, (err_wo, err_a8)
    assert "act_quant='int8'" in repr(qe)
    with pytest.raises(ValueError, match="act_quant must be None .* or 'int8'"):
        quantize_experts(bank, bits=8, act_quant="int4")
    with pytest.raises(ValueError, match="holds no QuantizedExperts"):
        set_act_quant(bank, "int8")


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"b{s[0]}g{s[1]}k{s[3]}")
def test_act8_cuda_matches_reference(seed, scheme):
    bits, gs, sym, K = scheme
    E, M, N = 5, 23, 40
    q, scales, zeros = _qweight(E, N, K, bits, gs, sym)
    off = _offsets(M, E)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(M, K).to(dtype)
        ref = grouped_gemm_q_ref(a, q, scales, off, bits, gs, zeros, act_bits=8)
        dev = [t.cuda() if t is not None else None for t in (a, q, scales, zeros, off)]
        out = grouped_gemm_q(dev[0], dev[1], dev[2], dev[4], bits, gs, dev[3], act_bits=8)
        # bf16: within one bf16 ulp (2**-7 relative) of the reference, as in _check
        rtol = 1e-4 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=rtol, atol=1e-4 * K)
