"""dedup / kg_search: against the plain-PyTorch references, exact threshold boundaries and ties,
edge sizes, opcheck, torch.compile, determinism and input validation (CPU; CUDA tests are marked
and skip without a GPU)."""

import math

import pytest
import torch
from torch.library import opcheck

import moe_framework  # noqa: F401
from moe_framework.ops import dedup, kg_search
from moe_framework.ops.reference import dedup_ref, kg_search_ref

ops = torch.ops.moe_framework
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Cosines are computed in fp32 (fp64 for fp64 inputs) from the same input values the float64
# reference sees: they differ by a few fp32 roundings of unit vectors' dot products.
SCORE_TOL = {
    torch.float32: 2e-6,
    torch.bfloat16: 2e-6,
    torch.float16: 2e-6,
    torch.float64: 1e-12,
}


def _cos64(a, b):
    a = a.double()
    b = b.double()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a @ b.t()).clamp(-1, 1)


def _clustered(n, d, dtype, spread=0.3, device="cpu"):
    """n rows around n//3 + 1 centres, so thresholds in (0, 1) find real duplicates."""
    centres = torch.randn(max(1, n // 3 + 1), d, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[0], (n,))
    x = centres[pick] + spread * torch.randn(n, d, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def _assert_dedup_valid(emb, threshold, keep, rep, tol):
    """keep/rep agree with the float64 reference except where a cosine lies within `tol` of the
    threshold or of the best earlier cosine (where fp32 rounding may legitimately decide)."""
    want_keep, want_rep = dedup_ref(emb, threshold)
    assert keep.dtype == torch.bool and rep.dtype == torch.long
    assert keep.shape == want_keep.shape and rep.shape == want_rep.shape
    if torch.equal(keep, want_keep) and torch.equal(rep, want_rep):
        return
    sim = _cos64(emb, emb)
    for j in range(emb.shape[0]):
        if bool(keep[j]) == bool(want_keep[j]) and int(rep[j]) == int(want_rep[j]):
            continue
        best = float(sim[j, :j].max()) if j > 0 else -math.inf
        if bool(keep[j]) != bool(want_keep[j]):
            assert abs(best - threshold) <= tol, f"row {j}: keep differs, best={best}"
        if not bool(keep[j]):
            r = int(rep[j])
            assert 0 <= r < j, f"row {j}: representative {r} is not an earlier row"
            assert float(sim[j, r]) >= best - tol, f"row {j}: representative {r} is not the best"
        else:
            assert int(rep[j]) == j


def _assert_search_valid(queries, bank, k, nv, scores, ids, tol):
    """Scores match the reference top-k values; every returned id really has its score; the
    order is best first; padding is (-inf, -1)."""
    want_s, want_i = kg_search_ref(queries, bank, k, nv)
    q = queries.shape[0]
    assert scores.shape == (q, k) and ids.shape == (q, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.long
    assert torch.equal(ids == -1, want_i == -1), "padding differs"
    pad = ids == -1
    assert torch.all(scores[pad] == -math.inf)
    torch.testing.assert_close(scores[~pad], want_s[~pad], atol=tol, rtol=0)
    if nv > 0 and q > 0:
        sim = _cos64(queries, bank[:nv]).float()
        got = torch.where(pad, 0.0, sim.gather(1, ids.clamp(min=0)))
        torch.testing.assert_close(got[~pad], scores[~pad], atol=tol, rtol=0)
    assert torch.all(scores[:, 1:] <= scores[:, :-1])
    for r in range(q):
        row = ids[r][ids[r] >= 0]
        assert row.unique().numel() == row.numel(), "an id is returned twice"
    if tol < 1e-9:  # fp64: no rounding ambiguity, ids must be exactly the reference's
        assert torch.equal(ids, want_i)


# ------------------------------------------------------------------------------------------------
# dedup against the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_dedup_matches_reference_on_random_clusters(seed, dtype):
    for n in (0, 1, 2, int(torch.randint(3, 90, ())), int(torch.randint(257, 700, ()))):
        d = int(torch.randint(1, 50, ()))
        emb = _clustered(n, d, dtype)
        for threshold in (-1.0, -0.3, 0.0, 0.5, float(torch.rand(())), 0.95, 1.0):
            keep, rep = dedup(emb, threshold)
            _assert_dedup_valid(emb, threshold, keep, rep, SCORE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dedup_matches_reference_across_many_blocks(seed, dtype):
    # d = 520 makes bank blocks ~100-190 rows and n spans several 256-row query blocks, so the
    # causal diagonal and the block seams are all exercised.
    n, d = int(torch.randint(600, 900, ())), 520
    emb = _clustered(n, d, dtype, spread=0.2)  # members of a cluster: cosine ~0.96
    for threshold in (0.2, 0.97, 0.9):
        keep, rep = dedup(emb, threshold)
        _assert_dedup_valid(emb, threshold, keep, rep, SCORE_TOL[dtype])
    assert (~keep).any() and keep.any(), "at 0.9 the clusters should hold duplicates"


def _boundary_rows(dtype):
    """Rows whose cosines are exact in any precision: e0 and v = (1,1,1,1)/2 have cosine 0.5;
    scaled copies keep it (the scales are powers of two or exact small integers)."""
    d = 6
    e0 = torch.zeros(d, dtype=torch.float64)
    e0[0] = 1
    v = torch.zeros(d, dtype=torch.float64)
    v[:4] = 1
    return torch.stack([3 * e0, 0.25 * v]).to(dtype), 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_dedup_threshold_is_strict_at_exact_boundary(dtype):
    emb, cos = _boundary_rows(dtype)
    at = dedup(emb, cos)
    assert at[0].tolist() == [True, True], "cosine == threshold is not a duplicate"
    below64 = math.nextafter(cos, -math.inf)
    above64 = math.nextafter(cos, math.inf)
    below32 = float(torch.tensor(cos, dtype=torch.float32).nextafter(torch.tensor(-2.0)))
    above32 = float(torch.tensor(cos, dtype=torch.float32).nextafter(torch.tensor(2.0)))
    for below in (below64, below32):
        keep, rep = dedup(emb, below)
        assert keep.tolist() == [True, False] and rep.tolist() == [0, 0]
    for above in (above64, above32):
        keep, rep = dedup(emb, above)
        assert keep.tolist() == [True, True] and rep.tolist() == [0, 1]
    # the reference agrees on every one of these thresholds
    for t in (cos, below64, above64, below32, above32):
        assert [x.tolist() for x in dedup(emb, t)] == [x.tolist() for x in dedup_ref(emb, t)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dedup_exact_copies_at_threshold_one_and_minus_one(dtype):
    x = torch.tensor([[1.0, -2.0, 0.0, 2.0]], dtype=torch.float64)  # norm 3: exact unit vector
    emb = torch.cat([x, 2 * x, -x]).to(dtype)
    # cosine(x, 2x) = 1 exactly: never above threshold 1 (scores are clamped to [-1, 1])
    assert dedup(emb, 1.0)[0].tolist() == [True, True, True]
    keep, rep = dedup(emb, math.nextafter(1.0, 0.0))
    assert keep.tolist() == [True, False, True] and rep.tolist() == [0, 0, 2]
    # with threshold -1 everything after row 0 that is not exactly opposite is a duplicate;
    # -x has cosine -1 with both earlier rows: not above -1
    keep, rep = dedup(emb, -1.0)
    assert keep.tolist() == [True, False, True] and rep.tolist() == [0, 0, 2]


def test_dedup_representative_is_lowest_index_among_equally_similar_earlier_rows():
    x = torch.tensor([[0.0, 3.0, 4.0]])  # norm 5
    y = torch.tensor([[4.0, 0.0, 3.0]])
    emb = torch.cat([y, x, 2 * x, x, 0.5 * x])
    keep, rep = dedup(emb, 0.9)
    assert keep.tolist() == [True, True, False, False, False]
    assert rep.tolist() == [0, 1, 1, 1, 1]


def test_dedup_representative_may_be_a_duplicate_itself():
    # b duplicates a (cos 0.96), c is closer to b (cos 0.96) than to a (cos 0.8432): c -> b.
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.96, 0.28, 0.0])
    c = torch.tensor([0.8432, 0.5376, 0.0])
    keep, rep = dedup(torch.stack([a, b, c]), 0.9)
    assert keep.tolist() == [True, False, False]
    assert rep.tolist() == [0, 0, 1]


def test_dedup_empty_and_single_row():
    keep, rep = dedup(torch.empty(0, 7), 0.5)
    assert keep.shape == (0,) and rep.shape == (0,) and keep.dtype == torch.bool
    keep, rep = dedup(torch.randn(1, 7), -1.0)
    assert keep.tolist() == [True] and rep.tolist() == [0]


def test_dedup_accepts_non_contiguous_rows(seed):
    base = _clustered(300, 24, torch.float32)
    strided = torch.randn(600, 48)[::2, ::2]  # row and column strides of 2
    strided.copy_(base)
    transposed = base.t().contiguous().t()  # column-major storage
    want = dedup(base.contiguous(), 0.8)
    for emb in (strided, transposed):
        got = dedup(emb, 0.8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_dedup_ignores_row_scale_even_at_fp32_overflow_and_underflow(seed):
    emb = _clustered(120, 16, torch.float64, spread=0.2)
    want = dedup(emb.float(), 0.9)
    scales = torch.tensor([1e-30, 1e30, 1.0, 1e-40])[torch.randint(0, 4, (120,))]
    got = dedup((emb * scales[:, None].double()).float(), 0.9)
    # 1e30^2 overflows fp32 and 1e-30^2 underflows it: norms are redone in fp64, directions kept
    sim = _cos64(emb, emb)
    for j in torch.nonzero(got[1] != want[1]).flatten().tolist():  # only rounding-level moves
        assert abs(float(sim[j, got[1][j]]) - float(sim[j, want[1][j]])) < 1e-5
    assert (got[0] != want[0]).sum() <= 1


# ------------------------------------------------------------------------------------------------
# kg_search against the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_kg_search_matches_reference_on_random_banks(seed, dtype):
    for _ in range(4):
        q = int(torch.randint(0, 40, ()))
        N = int(torch.randint(0, 400, ()))
        nv = int(torch.randint(0, N + 1, ()))
        d = int(torch.randint(1, 70, ()))
        k = int(torch.randint(1, 12, ()))
        queries = torch.randn(q, d).to(dtype)
        bank = torch.randn(N, d).to(dtype)
        scores, ids = kg_search(queries, bank, k, nv)
        _assert_search_valid(queries, bank, k, nv, scores, ids, SCORE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [1, 3, 300])
def test_kg_search_matches_reference_across_many_bank_blocks(seed, dtype, q):
    N, d = int(torch.randint(1500, 2500, ())), 400
    nv = N - int(torch.randint(0, 300, ()))
    queries = torch.randn(q, d, dtype=dtype)
    bank = torch.randn(N, d, dtype=dtype)
    bank[1::7] = bank[0::7][: bank[1::7].shape[0]] + 0.1 * torch.randn_like(bank[1::7])
    for k in (1, 10, 77):
        scores, ids = kg_search(queries, bank, k, nv)
        _assert_search_valid(queries, bank, k, nv, scores, ids, SCORE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kg_search_score_tiles_match_reference_on_ragged_shapes(seed, dtype):
    # The fp32 score tiles (AVX-512 build: 32 queries x 14 bank rows, 16-query half panels) at
    # shapes that leave every kind of remainder: q around the 16/32-lane panels, d odd or not a
    # multiple of 16, N and n_valid around the 14-row tiles and 256-row bank blocks, k > n_valid.
    for q, d, N, nv, k in (
        (5, 1, 20, 20, 3),
        (16, 15, 14, 14, 14),
        (17, 17, 29, 15, 20),
        (33, 33, 270, 257, 10),
        (70, 389, 600, 513, 7),
        (48, 384, 300, 3, 5),
    ):
        queries = torch.randn(q, d).to(dtype)
        bank = torch.randn(N, d).to(dtype)
        scores, ids = kg_search(queries, bank, k, nv)
        _assert_search_valid(queries, bank, k, nv, scores, ids, SCORE_TOL[dtype])


def test_kg_search_few_queries_on_a_bank_larger_than_the_caches_match_reference(seed):
    # A bank of >= 64 MiB: the few-query pass also prefetches rows ahead (AVX-512 build); the
    # prefetch must not change which rows are read: n_valid stops short, the tail is NaN.
    N, d = 44_000, 384
    bank = torch.randn(N, d)
    nv = N - 5
    bank[nv:] = float("nan")
    queries = torch.randn(3, d)
    queries[1] = bank[nv - 1]  # the last valid row is found
    scores, ids = kg_search(queries, bank, 10, nv)
    _assert_search_valid(queries, bank[:nv], 10, nv, scores, ids, SCORE_TOL[torch.float32])
    assert ids[1, 0] == nv - 1


def test_kg_search_score_tiles_handle_rows_whose_squares_leave_the_fp32_range(seed):
    # Such rows cannot be scaled after the product (their squared norm is not a normal fp32
    # number): their block is normalised first. Many queries: the score tiles / BLAS blocks.
    queries = torch.randn(40, 64)
    bank = torch.randn(700, 64)
    bank[3] *= 1e25
    bank[400] *= 1e-25
    queries[7] = bank[3]
    queries[8] = bank[400]
    scores, ids = kg_search(queries, bank, 5, 650)
    _assert_search_valid(queries, bank, 5, 650, scores, ids, SCORE_TOL[torch.float32])
    assert ids[7, 0] == 3 and ids[8, 0] == 400


def test_kg_search_pads_with_minus_one_when_k_exceeds_valid_rows(seed):
    queries = torch.randn(3, 5)
    bank = torch.randn(6, 5)
    scores, ids = kg_search(queries, bank, 9, 4)
    assert torch.all(ids[:, 4:] == -1) and torch.all(scores[:, 4:] == -math.inf)
    assert torch.equal(ids[:, :4].sort(dim=1).values, torch.arange(4).expand(3, 4))
    scores, ids = kg_search(queries, bank, 2, 0)
    assert torch.all(ids == -1) and torch.all(scores == -math.inf)


def test_kg_search_never_reads_rows_past_n_valid(seed):
    queries = torch.randn(4, 8)
    bank = torch.randn(50, 8)
    want = kg_search(queries, bank[:30].clone(), 5, 30)
    bank[30:] = float("nan")  # a preallocated bank's unused tail may hold anything
    bank[31] = 0.0
    got = kg_search(queries, bank, 5, torch.tensor(30))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kg_search_breaks_exact_ties_by_lower_id(dtype):
    e = torch.eye(4, dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # cos(v, e_i) = 0.5 exactly
    bank = torch.stack([e[1], 2 * v, e[0], 4 * e[0], 0.5 * v, e[0], -e[0]]).to(dtype)
    queries = torch.stack([e[0], v, -e[0]]).to(dtype)
    scores, ids = kg_search(queries, bank, 7, 7)
    assert ids[0].tolist() == [2, 3, 5, 1, 4, 0, 6]
    assert scores[0].tolist() == [1.0, 1.0, 1.0, 0.5, 0.5, 0.0, -1.0]
    assert ids[1].tolist() == [1, 4, 0, 2, 3, 5, 6]
    assert scores[1].tolist() == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, -0.5]
    assert ids[2].tolist() == [6, 0, 1, 4, 2, 3, 5]
    # the ties survive any split of the bank into blocks and segments: compare with k = 2
    assert kg_search(queries, bank, 2, 7)[1].tolist() == ids[:, :2].tolist()
    # 36 queries (the score tiles / BLAS blocks instead of the few-query pass): the same answers
    many_s, many_i = kg_search(queries.repeat(12, 1), bank, 7, 7)
    assert torch.equal(many_i, ids.repeat(12, 1)) and torch.equal(many_s, scores.repeat(12, 1))


def test_kg_search_ties_across_bank_blocks_pick_lowest_ids(seed):
    # 5000 exact copies (scaled by powers of two) span many bank blocks and segments.
    d = 256
    x = torch.zeros(d)
    x[:16] = 1.0  # norm 4: exact unit vector
    bank = torch.randn(5000, d)
    copies = torch.randperm(5000)[:900]
    bank[copies] = x * (2.0 ** torch.randint(-3, 4, (900, 1)).float())
    for q in (1, 6, 40):  # the fused few-query pass, then the score tiles (or BLAS blocks)
        scores, ids = kg_search(x.expand(q, d), bank, 50, 5000)
        for r in range(q):
            assert ids[r].tolist() == copies.sort().values[:50].tolist()
        assert torch.all(scores == 1.0)


def _tied_directions(d, gen, n_dirs=8):
    """Unit rows u_m = cos(0.25 m) a + sin(0.25 m) b in a random plane (a, b) of R^d, and unit
    queries at angles 0.06, 0.41, 0.83, 1.19, 1.52 in the same plane: every query's cosines with
    the n_dirs directions are at least ~0.005 apart (no near-ties between different directions), and
    every coordinate is non-zero, so the dot products really round. float64."""
    basis, _ = torch.linalg.qr(torch.randn(d, 2, dtype=torch.float64, generator=gen))
    a, b = basis[:, 0], basis[:, 1]

    def at(angles):
        t = torch.tensor(angles, dtype=torch.float64)[:, None]
        return torch.cos(t) * a + torch.sin(t) * b

    return at([0.25 * m for m in range(n_dirs)]), at([0.06, 0.41, 0.83, 1.19, 1.52])


def test_kg_search_ref_gives_copies_equal_scores_and_lowest_ids_first():
    # The reference used a GEMM, which rounds an entry by its place in the matrix: copies of one
    # row (here a stride-0 `expand` bank) got scores an ulp apart and the highest ids won.
    gen = torch.Generator().manual_seed(0)
    for N, d in ((257, 64), (1543, 256), (600, 384)):
        queries = torch.randn(5, d, generator=gen)
        bank = torch.randn(1, d, generator=gen).expand(N, d)
        scores, ids = kg_search_ref(queries, bank, 6, N)
        assert ids.tolist() == [list(range(6))] * 5
        assert torch.all(scores == scores[:, :1])


def _assert_copies_rank_by_lowest_id(scores, ids, group_of_row):
    """Within every query's results, rows of one copy group have bitwise equal scores, come in
    increasing id order and are the lowest ids of their group (below n_valid)."""
    for r in range(ids.shape[0]):
        returned = [int(i) for i in ids[r] if i >= 0]
        for g in set(group_of_row[i] for i in returned):
            mine = [j for j, i in enumerate(returned) if group_of_row[i] == g]
            got = [returned[j] for j in mine]
            assert got == sorted(got), f"query {r}: copies of group {g} out of order: {got}"
            assert len({float(scores[r, j]) for j in mine}) == 1, f"query {r}: group {g} scores"


def _check_tied_banks(dtype, q, device):
    """kg_search against the reference on one row expanded (stride 0) and on 8 directions copied
    all over the bank (some scaled by powers of two: the same unit row), with n_valid = N, < N and
    < k: the same ids, and copies in lowest-id order with equal scores."""
    gen = torch.Generator().manual_seed(q)
    N, d = 1543, 96  # 1543 rows: full bank blocks and a short last one
    dirs, query_dirs = _tied_directions(d, gen)
    queries = query_dirs.repeat(8, 1)[:q].to(dtype)
    group = torch.randint(0, dirs.shape[0], (N,), generator=gen)
    # x 1, 2 or 4 after the cast: exact in every dtype (fp16 would round a subnormal x / 4)
    scale = (2 ** torch.randint(0, 3, (N, 1), generator=gen)).to(dtype)
    banks = {
        "expand": (dirs[3:4].to(dtype).expand(N, d), [0] * N),
        "copies": (dirs[group].to(dtype) * scale, group.tolist()),
    }
    for name, (bank, group_of_row) in banks.items():
        for nv in (N, N - 100, 5):
            for k in (1, 7, 40):
                scores, ids = kg_search(queries.to(device), bank.to(device), k, nv)
                scores, ids = scores.cpu(), ids.cpu()
                want_s, want_i = kg_search_ref(queries, bank, k, nv)
                assert torch.equal(ids, want_i), f"{name}, n_valid={nv}, k={k}"
                torch.testing.assert_close(scores, want_s, atol=SCORE_TOL[dtype], rtol=0)
                _assert_copies_rank_by_lowest_id(scores, ids, group_of_row)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 3, 5, 40])
def test_kg_search_matches_reference_on_stride0_and_tied_banks(dtype, q):
    # q <= 4: the fused few-query pass; more: the AVX-512 score tiles or BLAS blocks, whose BLAS
    # scores could rank a later copy of a row first (their candidates are rescored in a fixed
    # order).
    _check_tied_banks(dtype, q, "cpu")


@pytest.mark.parametrize("data_seed", range(4))
def test_dedup_copies_anywhere_point_to_their_first_occurrence(data_seed):
    # dedup runs the same BLAS blocks: a copy's representative is the first copy of its row (the
    # lowest index among equally similar earlier rows), wherever the copies sit. (Before the
    # rescoring, copies in a short last block often won: GEMM rounding is positional.)
    gen = torch.Generator().manual_seed(data_seed)
    for n, d, n_dirs in ((1543, 256, 1), (1543, 256, 8), (1543, 384, 3), (2000, 96, 8)):
        dirs, _ = _tied_directions(d, gen, n_dirs)
        group = torch.randint(0, dirs.shape[0], (n,), generator=gen)
        emb = dirs[group].float()
        keep, rep = dedup(emb, 0.999)  # copies: cosine 1; different directions: <= cos(0.25)
        first = {}
        for j, g in enumerate(group.tolist()):
            first.setdefault(g, j)
        assert keep.tolist() == [first[g] == j for j, g in enumerate(group.tolist())]
        assert rep.tolist() == [first[g] for g in group.tolist()], (n, d, n_dirs)
    emb = torch.randn(1, 256, generator=gen).expand(1543, 256)
    assert dedup(emb, 0.5)[1].tolist() == [0] * 1543


def test_kg_search_accepts_int_and_tensor_n_valid_and_non_contiguous_inputs(seed):
    queries = torch.randn(20, 16)
    bank = torch.randn(100, 16)
    want = kg_search(queries, bank, 6, 77)
    q_t = queries.t().contiguous().t()
    b_strided = torch.zeros(200, 32)[::2, 1::2]
    b_strided.copy_(bank)
    for qq, bb, nv in (
        (q_t, bank, 77),
        (queries, b_strided, torch.tensor(77)),
        (q_t, b_strided, 77),
    ):
        got = kg_search(qq, bb, 6, nv)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kg_search_is_bitwise_deterministic_across_thread_counts(seed):
    queries = torch.randn(300, 96)
    bank = torch.randn(6000, 96)
    emb = _clustered(700, 96, torch.float32)
    prev = torch.get_num_threads()
    try:
        results = []
        for threads in sorted({1, prev}):
            torch.set_num_threads(threads)
            results.append((kg_search(queries, bank, 13, 5999), dedup(emb, 0.7)))
            results.append((kg_search(queries, bank, 13, 5999), dedup(emb, 0.7)))
    finally:
        torch.set_num_threads(prev)
    (s0, i0), (k0, r0) = results[0]
    for (s, i), (kk, r) in results[1:]:
        assert torch.equal(s, s0) and torch.equal(i, i0)
        assert torch.equal(kk, k0) and torch.equal(r, r0)


# The searches run under each build; the child and the parent make the same inputs from a seed.
_BUILD_CASES = """
import torch
def build_cases(seed):
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for q, d in ((1, 100), (4, 37), (9, 100), (40, 389)):
            bank = torch.randn(3000, d, generator=g).to(dtype)
            bank[5] *= 1e30 if dtype == torch.float64 else 1e25  # squares overflow fp32
            yield torch.randn(q, d, generator=g).to(dtype), bank
"""
_BUILD_SCRIPT = (
    _BUILD_CASES
    + """
import json, sys, moe_framework
from moe_framework.ops import kg_search
for queries, bank in build_cases(int(sys.argv[1])):
    s, i = kg_search(queries, bank, 7, 2990)
    print(json.dumps([s.tolist(), i.tolist()]))  # float reprs round-trip: bitwise comparisons
"""
)


def _build_results(isa, seed):
    import json

    from isa_builds import output_under

    out = output_under(isa, _BUILD_SCRIPT, str(seed)).decode().splitlines()
    return [tuple(torch.tensor(v) for v in json.loads(line)) for line in out]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "default"])
def test_kg_search_matches_reference_under_each_cpu_build(seed, isa):
    # Every clone the build can pick (baseline, AVX2, AVX-512 score tiles and FMA few-query pass),
    # checked against the reference on the inputs the child process searched.
    ns = {}
    exec(_BUILD_CASES, ns)
    results = _build_results(isa, seed)
    cases = list(ns["build_cases"](seed))
    assert len(results) == len(cases) == 12
    for (queries, bank), (scores, ids) in zip(cases, results):
        _assert_search_valid(queries, bank, 7, 2990, scores, ids, SCORE_TOL[queries.dtype])


def test_kg_search_baseline_and_avx2_builds_agree_bitwise(seed):
    # Neither build uses FMA in our code (the AVX-512 clones, which do, are off in both).
    baseline = _build_results("baseline", seed)
    avx2 = _build_results("avx2", seed)
    assert len(baseline) == len(avx2) == 12
    for (s0, i0), (s1, i1) in zip(baseline, avx2):
        assert torch.equal(s0, s1) and torch.equal(i0, i1)


# ------------------------------------------------------------------------------------------------
# bad input: clear errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_rows_without_a_direction_are_errors_naming_the_row(dtype, bad):
    value = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[bad]
    emb = torch.randn(10, 6).to(dtype)
    emb[7] = 0.0
    emb[7, 2] = value if bad != "zero" else 0.0
    with pytest.raises(RuntimeError, match=r"dedup: emb row 7 has a zero, NaN or Inf norm"):
        dedup(emb, 0.5)
    bank = torch.randn(10, 6).to(dtype)
    bank[4] = emb[7]
    with pytest.raises(RuntimeError, match=r"kg_search: bank row 4 .*zero, NaN or Inf norm"):
        kg_search(torch.randn(2, 6).to(dtype), bank, 3, 10)
    with pytest.raises(RuntimeError, match=r"kg_search: bank row 4 "):
        kg_search(torch.randn(0, 6).to(dtype), bank, 3, 10)  # even with no queries
    with pytest.raises(RuntimeError, match=r"kg_search: queries row 7 .*zero, NaN or Inf norm"):
        kg_search(emb, torch.randn(5, 6).to(dtype), 3, 5)
    # rows past n_valid are not part of the bank
    kg_search(torch.randn(2, 6).to(dtype), bank, 3, 4)


def test_cuda_wrapper_check_flags_the_rows_the_cpu_kernels_refuse(seed):
    # The eager CUDA check is plain torch, so its criterion is pinned here on CPU tensors.
    from moe_framework.ops.similarity import _first_bad_row

    for dtype in DTYPES:
        t = torch.randn(20000, 12).to(dtype)
        assert _first_bad_row(t) == -1
        t[19999] = 0.0
        assert _first_bad_row(t) == 19999
        assert _first_bad_row(t, n_rows=torch.tensor(19999)) == -1
        t[9001, 3] = float("inf")
        t[12000, 0] = float("nan")
        assert _first_bad_row(t) == 9001
        with pytest.raises(RuntimeError, match="row 9001 "):
            kg_search(t[:1].clone().fill_(1), t, 2, 20000)
    tiny = torch.full((2, 8), 1e-30)  # squares underflow fp32, not fp64: a valid row
    assert _first_bad_row(tiny) == -1


def test_bad_row_error_names_the_first_bad_row_of_a_large_bank(seed):
    bank = torch.randn(20000, 40)
    bank[15001] = float("nan")
    bank[19000] = 0.0
    with pytest.raises(RuntimeError, match=r"kg_search: bank row 15001 "):
        kg_search(torch.randn(3, 40), bank, 4, 20000)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4), 0.5), "dedup: emb must have 2 dimensions"),
        ((torch.randint(0, 3, (4, 3)), 0.5), "dedup: emb must have dtype in"),
        ((torch.randn(4, 0), 0.5), "dedup: emb must have d >= 1"),
        ((torch.randn(4, 3), 1.5), r"dedup: threshold must be a cosine in \[-1, 1\], got 1.5"),
        ((torch.randn(4, 3), -1.01), r"dedup: threshold must be a cosine in \[-1, 1\]"),
        ((torch.randn(4, 3), float("nan")), r"dedup: threshold must be a cosine in \[-1, 1\]"),
    ],
)
def test_dedup_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.dedup.default(*args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(3), torch.randn(5, 3), 2, 5), "kg_search: queries must have 2 dimensions"),
        ((torch.randn(2, 3), torch.randn(5, 4), 2, 5), "kg_search: queries must have d = 4"),
        ((torch.randn(2, 3), torch.randn(5, 3), 0, 5), "kg_search: k must be >= 1, got 0"),
        ((torch.randn(2, 3), torch.randn(5, 3), 2, 6), r"kg_search: n_valid must be in \[0, 5\]"),
        ((torch.randn(2, 3), torch.randn(5, 3), 2, -1), r"kg_search: n_valid must be in \[0, 5\]"),
        (
            (torch.randn(2, 3), torch.randn(5, 3).double(), 2, 5),
            "kg_search: queries must have the dtype of bank",
        ),
        (
            (torch.randn(2, 3), torch.randn(5, 3), 2, torch.tensor([5])),
            "kg_search: n_valid must have 0 dimensions",
        ),
        (
            (torch.randn(2, 3), torch.randn(5, 3), 2, torch.tensor(5, dtype=torch.int32)),
            "kg_search: n_valid must have dtype in",
        ),
        ((torch.randn(2, 0), torch.randn(5, 0), 2, 5), "kg_search: bank must have d >= 1"),
    ],
)
def test_kg_search_rejects_bad_arguments(args, match):
    q, b, k, nv = args
    if not isinstance(nv, torch.Tensor):
        nv = torch.tensor(nv)
    with pytest.raises(RuntimeError, match=match):
        ops.kg_search.default(q, b, k, nv)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def test_opcheck_dedup_and_kg_search(seed):
    emb = _clustered(40, 12, torch.float32)
    opcheck(ops.dedup.default, (emb, 0.8))
    opcheck(ops.dedup.default, (emb[:0], 0.8))
    opcheck(ops.dedup.default, (emb.double()[::2], -0.2))
    queries = torch.randn(5, 12)
    bank = torch.randn(30, 12)
    opcheck(ops.kg_search.default, (queries, bank, 4, torch.tensor(25)))
    opcheck(ops.kg_search.default, (queries, bank, 40, torch.tensor(30)))
    opcheck(ops.kg_search.default, (queries[:0], bank, 3, torch.tensor(0)))
    opcheck(ops.kg_search.default, (queries.bfloat16(), bank.bfloat16(), 2, torch.tensor(7)))


def _search_and_dedup(queries, bank, n_valid, emb):
    scores, ids = kg_search(queries, bank, 5, n_valid)
    keep, rep = dedup(emb, 0.75)
    return scores * 2, ids + 1, keep, rep


def test_compile_fullgraph_traces_both_ops_without_breaks(seed):
    queries = torch.randn(6, 20)
    bank = torch.randn(64, 20)
    emb = _clustered(33, 20, torch.float32)
    compiled = torch.compile(_search_and_dedup, fullgraph=True, backend="aot_eager")
    for nv in (64, 10, 0):  # n_valid is data, not a shape: one graph for all of them
        n_valid = torch.tensor(nv)
        got = compiled(queries, bank, n_valid, emb)
        want = _search_and_dedup(queries, bank, n_valid, emb)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_compile_inductor_fullgraph_matches_eager(seed):
    queries = torch.randn(6, 20)
    bank = torch.randn(64, 20)
    emb = _clustered(33, 20, torch.float32)
    compiled = torch.compile(_search_and_dedup, fullgraph=True)
    got = compiled(queries, bank, torch.tensor(50), emb)
    want = _search_and_dedup(queries, bank, torch.tensor(50), emb)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_outputs_are_marked_non_differentiable():
    emb = torch.randn(5, 3, requires_grad=True)
    keep, rep = dedup(emb, 0.5)
    for scores, ids in (kg_search(emb, emb.detach(), 2, 5), kg_search(emb.detach(), emb, 2, 5)):
        assert not scores.requires_grad and not ids.requires_grad
    assert not keep.requires_grad and not rep.requires_grad


# ------------------------------------------------------------------------------------------------
# CUDA: same answers as the CPU kernels


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kg_search_matches_reference(seed, dtype):
    for q, N, d, k in ((1, 1000, 64, 10), (70, 3000, 384, 17), (5, 40, 7, 100), (0, 10, 3, 2)):
        queries = torch.randn(q, d).to(dtype)
        bank = torch.randn(N, d).to(dtype)
        nv = N - 3 if N > 3 else N
        scores, ids = kg_search(queries.cuda(), bank.cuda(), k, nv)
        _assert_search_valid(queries, bank, k, nv, scores.cpu(), ids.cpu(), SCORE_TOL[dtype] * 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dedup_matches_reference(seed, dtype):
    for n, d in ((0, 4), (1, 4), (500, 33), (1100, 384)):
        emb = _clustered(n, d, dtype)
        for threshold in (-1.0, 0.3, 0.9, 1.0):
            keep, rep = dedup(emb.cuda(), threshold)
            _assert_dedup_valid(emb, threshold, keep.cpu(), rep.cpu(), SCORE_TOL[dtype] * 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_exact_boundaries_and_ties_match_cpu(dtype):
    emb, cos = _boundary_rows(dtype)
    for t in (cos, math.nextafter(cos, -1.0), math.nextafter(cos, 1.0)):
        got = dedup(emb.cuda(), t)
        want = dedup(emb, t)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    e = torch.eye(4, dtype=torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    bank = torch.stack([e[1], 2 * v, e[0], 4 * e[0], 0.5 * v, e[0], -e[0]]).to(dtype)
    queries = torch.stack([e[0], v, -e[0]]).to(dtype)
    got = kg_search(queries.cuda(), bank.cuda(), 7, 7)
    want = kg_search(queries, bank, 7, 7)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 40])
def test_cuda_kg_search_matches_reference_on_stride0_and_tied_banks(dtype, q):
    _check_tied_banks(dtype, q, "cuda")


@pytest.mark.cuda
def test_cuda_kg_search_reads_n_valid_on_device_and_captures_in_a_graph(seed):
    queries = torch.randn(8, 64, device="cuda")
    bank = torch.randn(500, 64, device="cuda")
    n_valid = torch.tensor(100, device="cuda")
    kg_search(queries, bank, 5, n_valid)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scores, ids = kg_search(queries, bank, 5, n_valid)
    for nv in (100, 500, 3):
        n_valid.fill_(nv)
        graph.replay()
        want = kg_search(queries.cpu(), bank.cpu(), 5, nv)
        torch.testing.assert_close(scores.cpu(), want[0], atol=1e-5, rtol=0)
        assert torch.all(ids.cpu() < nv)


@pytest.mark.cuda
def test_cuda_rows_without_a_direction_are_errors_in_eager_mode():
    emb = torch.randn(10, 6, device="cuda")
    emb[7] = float("nan")
    with pytest.raises(ValueError, match="dedup: emb row 7 has a zero, NaN or Inf norm"):
        dedup(emb, 0.5)
    with pytest.raises(ValueError, match="kg_search: bank row 7 "):
        kg_search(torch.randn(2, 6, device="cuda"), emb, 3, 10)
    kg_search(torch.randn(2, 6, device="cuda"), emb, 3, 7)  # row 7 is past n_valid


@pytest.mark.cuda
def test_cuda_opcheck(seed):
    emb = _clustered(40, 12, torch.float32, device="cuda")
    opcheck(ops.dedup.default, (emb, 0.8))
    opcheck(
        ops.kg_search.default,
        (torch.randn(5, 12, device="cuda"), emb, 4, torch.tensor(25, device="cuda")),
    )
