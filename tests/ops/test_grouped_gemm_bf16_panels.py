"""grouped_gemm bf16 on the panel kernels (AVX512-BF16 CPUs: ``a @ b[e]`` tiles of any row count
but 7-8, ``b[e]^T`` groups of 20+ rows): every tile remainder against the float64 reference,
under each CPU build (the other builds take other paths and must agree with the reference too),
strided operands, and bitwise equality across thread counts.

Tolerance: a and b are bf16, so every product is exact in float64; the kernels sum in fp32 and
round the output to bf16 once (relative error <= 2^-8), plus fp32 rounding of the sums (|out| ~
sqrt(K), K <= 2049 terms of |products| ~ 1: < 1e-3 absolute).
"""

import pytest
import torch

import moe_framework  # noqa: F401
from moe_framework.ops import grouped_gemm
from moe_framework.ops.reference import grouped_gemm_ref

ops = torch.ops.moe_framework
TOL = dict(rtol=4e-3, atol=1e-3)

# Panel kernel geometry (csrc/cpu/grouped_gemm/bf16.h, tuning.h): 6-row x 64-column register
# tiles, k blocks of 1024, row ranges of up to 512 rows of one expert, column blocks of <= 256 KiB
# panels.
_PANEL_SCRIPT = r"""
import sys
import torch
import moe_framework  # noqa: F401
from moe_framework.ops.reference import grouped_gemm_ref

ops = torch.ops.moe_framework
torch.manual_seed(int(sys.argv[1]))
TOL = dict(rtol=4e-3, atol=1e-3)
# Rows: one row block (1-6), the direct kernel (7-8), panels again (9+), the b^T dot/panel
# boundary (19/20), 6-row tile remainders (row blocks 6, and 4 + 4 for a last 8), 128 and the
# 512-row range boundary (1025: ranges 512 + 512 + 1), zero-row experts. N: 64-column strip remainders (1..63) and several
# column blocks (1100). K: odd (a pair half empty), 1 and 3, and 2049 (three k blocks).
COUNTS = [0, 1, 2, 5, 6, 7, 8, 9, 12, 16, 17, 19, 20, 21, 23, 26, 0, 127, 128, 129]
CASES = [(COUNTS, 37, 100), (COUNTS, 2049, 65), ([0, 511, 512, 513], 64, 129)]
CASES += [([1025, 0, 30], 33, 1100), ([40, 18], 1, 63), ([22, 0, 64], 3, 17), ([130], 1024, 1)]
checked = 0
for counts, K, N in CASES:
    E = len(counts)
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(off[-1]) + 2  # two rows after offsets[E]
    for trans_b in (False, True):
        a = torch.randn(M, K).bfloat16()
        b = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).bfloat16()
        out = ops.grouped_gemm(a, b, off, trans_b)
        assert torch.equal(out, ops.grouped_gemm(a, b, off, trans_b)), "not deterministic"
        want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
        torch.testing.assert_close(out.double(), want, **TOL, msg=f"{counts} {K} {N} {trans_b}")
        checked += 1
# Strided operands: a with padded rows (even K: read in place; odd K: copied), a transposed
# (copied), b[e] with a padded row stride, b^T stored row-major as [E, K, N] (the a @ b path),
# and b^T with a padded row stride (transposed pair panels). Padding holds inf: a kernel that
# pairs the last k of an odd K with the element after it instead of a zero returns inf/nan.
counts = [40, 0, 130, 18, 21]
E = len(counts)
off = torch.zeros(E + 1, dtype=torch.long)
off[1:] = torch.cumsum(torch.tensor(counts), 0)
M = int(off[-1])


def padded(shape, dim, lo, hi):
    # randn of `shape` with `dim` grown by lo + hi inf entries, returned as the randn view
    full = list(shape)
    full[dim] += lo + hi
    t = torch.full(full, float("inf"), dtype=torch.bfloat16)
    view = t.narrow(dim, lo, shape[dim])
    view.copy_(torch.randn(shape))
    return view


for K in (96, 97):
    N = 75
    for a, b, trans_b in [
        (padded((M, K), 1, 2, 4), padded((E, K, N), 2, 3, 2), False),
        (torch.randn(K, M).bfloat16().t(), padded((E, K, N), 1, 0, 1), False),
        (torch.randn(M, K).bfloat16(), padded((E, K, N), 1, 0, 1).transpose(1, 2), True),
        (padded((M, K), 1, 0, 3), padded((E, N, K), 2, 1, 3), True),
    ]:
        assert a.dtype == b.dtype == torch.bfloat16
        out = ops.grouped_gemm(a, b, off, trans_b)
        want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
        torch.testing.assert_close(out.double(), want, **TOL, msg=f"strided K={K} {trans_b}")
        checked += 1
print("checked", checked)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "default"])
def test_bf16_panel_kernels_match_reference_at_every_tile_remainder(seed, isa):
    from isa_builds import output_under

    out = output_under(isa, _PANEL_SCRIPT, str(seed))
    assert out.decode().split() == ["checked", str(7 * 2 + 2 * 4)]


@pytest.mark.parametrize("trans_b", [False, True])
def test_bf16_panel_kernels_give_bitwise_equal_results_on_1_and_2_threads(seed, trans_b):
    # 600 rows: two row ranges of one expert; N = 700: several column tiles whose split depends
    # on the thread count; K = 1100: two k blocks. Each output element must not depend on it.
    counts, K, N = [600, 0, 150, 40], 1100, 700
    off = torch.zeros(len(counts) + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    a = torch.randn(int(off[-1]), K).bfloat16()
    shape = (len(counts), N, K) if trans_b else (len(counts), K, N)
    b = (torch.randn(shape) / K**0.5).bfloat16()
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(grouped_gemm(a, b, off, trans_b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])
    want = grouped_gemm_ref(a.double(), b.double(), off, trans_b)
    torch.testing.assert_close(runs[0].double(), want, rtol=4e-3, atol=1e-3)
