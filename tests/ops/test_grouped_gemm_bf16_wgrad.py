"""grouped_gemm_wgrad bf16 on the panel kernels (AVX512-BF16 CPUs, experts of >= 32 rows): every
row count / tile remainder against the float64 reference under each CPU build (the other builds
and the smaller experts take other paths and must agree with the reference too), strided inputs,
and bitwise equality across thread counts.

Tolerance: a and g are bf16, so every product is exact in float64; the kernels sum the rows in
fp32 and round the output to bf16 once (relative error <= 2^-8), plus fp32 rounding of the sums
(|out| ~ sqrt(rows) <= 46 for rows <= 2049, far below 1e-3 absolute).
"""

import pytest
import torch

import moe_framework  # noqa: F401
from moe_framework.ops.reference import grouped_gemm_wgrad_ref

ops = torch.ops.moe_framework
TOL = dict(rtol=4e-3, atol=1e-3)

# Panel geometry (csrc/cpu/grouped_gemm/wgrad.h, wgrad_strips_bf16): 6-row x 64-column register
# tiles over db[e], whole 64-column rows stored non-temporally (N a multiple of 32, full strip),
# row pairs (odd row counts pair the last row with zero), k blocks of 1024 rows (1025 and 2049
# rows: two and three blocks summed through fp32), x^T packed in 16 x 16 word blocks.
_WGRAD_SCRIPT = r"""
import sys
import torch
import moe_framework  # noqa: F401
from moe_framework.ops.reference import grouped_gemm_wgrad_ref as ref

ops = torch.ops.moe_framework
torch.manual_seed(int(sys.argv[1]))
TOL = dict(rtol=4e-3, atol=1e-3)




# Rows 1..20 (the small-group paths), around the 32-row switch, 127-129, 511-513, 1025 and 2049
# (k blocks), zero-row experts. K: odd and not a multiple of 6 or 16. N: strip remainders (1, 37),
# a full strip plus a half one (96: non-temporal then masked), several strips (128, 200).
COUNTS = list(range(0, 21)) + [31, 32, 33, 0, 63, 127, 128, 129]
CASES = [(COUNTS, 37, 96), (COUNTS, 70, 200), ([511, 0, 512, 513], 33, 128)]
CASES += [([1025, 2049, 40], 13, 65), ([32, 33], 1, 1), ([64, 35], 7, 37)]
checked = 0
for counts, K, N in CASES:
    E = len(counts)
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(off[-1]) + 3  # rows after offsets[E] are not read
    a = torch.randn(M, K).bfloat16()
    g = torch.randn(M, N).bfloat16()
    for trans_b in (False, True):
        out = ops.grouped_gemm_wgrad(a, g, off, trans_b)
        assert out.shape == ((E, N, K) if trans_b else (E, K, N))
        assert torch.equal(out, ops.grouped_gemm_wgrad(a, g, off, trans_b)), "not deterministic"
        torch.testing.assert_close(
            out.double(), ref(a, g, off, trans_b), **TOL, msg=f"{counts} {K} {N} {trans_b}"
        )
        checked += 1
# Strided inputs: rows padded with inf (read in place: a kernel that reads past a row or pairs
# the last row of an odd count with the next row instead of zero returns inf/nan), and
# transposed storage (copied).
counts = [40, 0, 129, 33]
E = len(counts)
off = torch.zeros(E + 1, dtype=torch.long)
off[1:] = torch.cumsum(torch.tensor(counts), 0)
M = int(off[-1])
K, N = 70, 130
for a, g in [
    (torch.full((M + 1, K + 5), float("inf")).bfloat16()[:M, 2 : 2 + K],
     torch.full((M + 1, N + 3), float("inf")).bfloat16()[:M, 1 : 1 + N]),
    (torch.randn(K, M).bfloat16().t(), torch.randn(N, M).bfloat16().t()),
]:
    if torch.isinf(a).any():
        a.copy_(torch.randn(M, K))
        g.copy_(torch.randn(M, N))
    for trans_b in (False, True):
        out = ops.grouped_gemm_wgrad(a, g, off, trans_b)
        torch.testing.assert_close(out.double(), ref(a, g, off, trans_b), **TOL, msg="strided")
        checked += 1
print("checked", checked)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "default"])
def test_bf16_wgrad_matches_reference_at_every_row_count_and_tile_remainder(seed, isa):
    from isa_builds import output_under

    out = output_under(isa, _WGRAD_SCRIPT, str(seed))
    assert out.decode().split() == ["checked", str(6 * 2 + 2 * 2)]


@pytest.mark.parametrize("trans_b", [False, True])
def test_bf16_wgrad_gives_bitwise_equal_results_on_1_and_2_threads(seed, trans_b):
    # 1100 rows: two k blocks; N = 700: strips split between the threads in the middle of an
    # expert; 33 rows: an odd pair. Each output element must not depend on the thread count.
    counts, K, N = [1100, 0, 150, 33, 64], 100, 700
    off = torch.zeros(len(counts) + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    a = torch.randn(int(off[-1]), K).bfloat16()
    g = torch.randn(int(off[-1]), N).bfloat16()
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(ops.grouped_gemm_wgrad(a, g, off, trans_b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])
    want = grouped_gemm_wgrad_ref(a, g, off, trans_b)
    torch.testing.assert_close(runs[0].double(), want, rtol=4e-3, atol=1e-3)
