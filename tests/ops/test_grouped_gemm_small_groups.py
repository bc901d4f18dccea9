"""grouped_gemm on small groups with a transposed weight (``trans_b``: Hugging Face's [E, out, in]
layout, and the da of the backward of ``a @ b[e]``), which on AVX2 CPUs runs the dot-product
kernel (csrc/cpu/grouped_gemm/dot_avx2.h), and bf16 groups past the old BLAS threshold: against
the float64 reference, and bitwise equal across thread counts."""

import pytest
import torch
from conftest import TOLERANCES

import moe_framework  # noqa: F401
from moe_framework.ops import grouped_gemm
from moe_framework.ops.reference import grouped_gemm_ref

TOL = TOLERANCES["gemm"]


def _offsets(counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    return off


def _runs(fn):
    """fn() under 1, 2 and again 1 threads."""
    threads = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            out.append(fn())
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_trans_b_small_groups_strided_match_reference_and_threads(seed, dtype):
    # Every row count of the 1x8 / 2x4 / 3x4 / 4x3 blocks and their remainders, a zero-row
    # expert; K with a tail of 8 lanes; N not a multiple of any block width; b rows with a padded
    # stride (b.stride(1) > K) and rows of a with a padded stride.
    counts = [1, 2, 3, 4, 5, 0, 7, 9, 13]
    off = _offsets(counts)
    E, M = len(counts), int(off[-1])
    K = int(torch.randint(17, 70, ()))
    N = int(torch.randint(9, 40, ()))
    a = torch.randn(M, K + 3).to(dtype)[:, 1 : 1 + K]
    b = torch.randn(E, N, K + 5).to(dtype)[:, :, 2 : 2 + K]
    assert b.stride(2) == 1 and b.stride(1) == K + 5
    outs = _runs(lambda: grouped_gemm(a, b, off, trans_b=True))
    want = grouped_gemm_ref(a.double(), b.double(), off, True)
    torch.testing.assert_close(outs[0].double(), want, **TOL[dtype])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    # The same product with the weight stored [E, K, N] (no transpose): the same values.
    b_in_out = b.transpose(1, 2).contiguous()
    other = grouped_gemm(a, b_in_out, off, trans_b=False)
    torch.testing.assert_close(other.double(), want, **TOL[dtype])


@pytest.mark.parametrize("trans_b", [False, True])
def test_bf16_groups_past_old_blas_threshold(seed, trans_b):
    # bf16 groups of >= 32 rows: on AVX2-only CPUs these went to torch's bf16 GEMM (seconds per
    # call there) and now run our converting kernels.
    counts = [32, 0, 45, 70]
    off = _offsets(counts)
    E, M, K, N = len(counts), int(off[-1]), 40, 56
    a = torch.randn(M, K).to(torch.bfloat16)
    b = torch.randn(*((E, N, K) if trans_b else (E, K, N))).to(torch.bfloat16)
    outs = _runs(lambda: grouped_gemm(a, b, off, trans_b=trans_b))
    want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
    torch.testing.assert_close(outs[0].double(), want, **TOL[torch.bfloat16])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
