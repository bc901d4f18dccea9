"""Tests of the fused router op ``moe_framework.ops.route`` (CPU; CUDA tests are marked)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_framework.ops import route
from moe_framework.ops.reference import route_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (n_group, topk_group) for E = 16: no groups, 4 groups keep 2, 8 groups keep 3
GROUPINGS = [(1, 1), (4, 2), (8, 3)]


def _assert_same_routing(got, want, *, rtol=2e-6, atol=1e-6):
    w, ids, counts = got
    rw, rids, rcounts = want
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert w.dtype == rw.dtype
    torch.testing.assert_close(ids, rids, rtol=0, atol=0)
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    torch.testing.assert_close(w, rw, rtol=rtol, atol=atol, equal_nan=True)


def _distinct_in_range(ids: torch.Tensor, E: int) -> bool:
    if ids.numel() == 0:
        return True
    srt = torch.sort(ids.long(), dim=1).values
    return bool((srt[:, 1:] != srt[:, :-1]).all()) and bool(((ids >= 0) & (ids < E)).all())


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_reference_for_every_option(
    seed, scoring, with_bias, grouping, renormalize, dtype
):
    n_group, topk_group = grouping
    E, T = 16, 37
    logits = (torch.randn(T, E) * 2).to(dtype)
    bias = torch.randn(E) * 0.2 if with_bias else None
    for k in (1, 3, topk_group * (E // n_group)):
        kwargs = dict(
            scoring=scoring,
            correction_bias=bias,
            n_group=n_group,
            topk_group=topk_group,
            renormalize=renormalize,
            scaling_factor=2.5,
        )
        got = route(logits, k, **kwargs)
        _assert_same_routing(got, route_ref(logits, k, **kwargs))
        assert _distinct_in_range(got[1], E)
        assert int(got[2].sum()) == T * k


@pytest.mark.parametrize("E,k", [(1, 1), (7, 7), (64, 8), (256, 8), (300, 5)])
def test_route_matches_reference_at_odd_and_large_expert_counts(seed, E, k):
    logits = torch.randn(129, E)
    for scoring in ("softmax", "sigmoid"):
        for renormalize in (True, False):
            kw = dict(scoring=scoring, renormalize=renormalize)
            _assert_same_routing(route(logits, k, **kw), route_ref(logits, k, **kw))


def test_route_float64_logits_give_float64_weights(seed):
    logits = torch.randn(9, 12, dtype=torch.float64)
    got = route(logits, 3, scoring="sigmoid", renormalize=True)
    assert got[0].dtype == torch.float64
    _assert_same_routing(got, route_ref(logits, 3, scoring="sigmoid"), rtol=1e-12, atol=1e-12)


def test_route_weights_are_the_renormalised_scores_of_the_selected_experts(seed):
    # Independent of route_ref: softmax -> topk -> renormalise -> scale, as Mixtral writes it.
    logits = torch.randn(50, 8)
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, 2, dim=-1)
    w, ids, counts = route(logits, 2, scaling_factor=3.0)
    torch.testing.assert_close(ids.long(), idx)
    torch.testing.assert_close(w, 3.0 * top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(counts.long(), torch.bincount(idx.reshape(-1), minlength=8))


# ------------------------------------------------------------------ Hugging Face gates


def _hf_or_skip(module: str):
    return pytest.importorskip(f"transformers.models.{module}")


def _rows_agree_or_near_tie(ids, hf_ids, key64, tol=1e-5):
    """Rows whose expert sets agree; rows that differ must be float-rounding near ties (their sets
    have the same total selection key within tol). Returns the mask of agreeing rows."""
    a = torch.sort(ids.long(), 1).values
    b = torch.sort(hf_ids.long(), 1).values
    same = (a == b).all(1)
    for r in torch.nonzero(~same).flatten().tolist():
        diff = (key64[r, a[r]].sum() - key64[r, b[r]].sum()).abs()
        assert diff < tol, f"row {r}: {a[r].tolist()} vs HF {b[r].tolist()} (key gap {diff})"
    assert same.float().mean() >= 0.99
    return same


def _gather_by_sorted_ids(w, ids):
    order = torch.argsort(ids.long(), dim=1)
    return w.gather(1, order), ids.long().gather(1, order)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_hf_mixtral_router(seed, dtype):
    mixtral = _hf_or_skip("mixtral.modeling_mixtral")
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    gate = mixtral.MixtralTopKRouter(cfg)
    torch.nn.init.normal_(gate.weight, std=0.3)
    gate = gate.to(dtype)
    hidden = torch.randn(257, 32, dtype=dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = gate(hidden)
    assert logits.dtype == dtype  # Mixtral scores logits of the model dtype (softmax in fp32)
    w, ids, counts = route(logits, 2, scoring="softmax", renormalize=True)
    same = _rows_agree_or_near_tie(ids, hf_ids, logits.double())
    ws, _ = _gather_by_sorted_ids(w, ids)
    hws, _ = _gather_by_sorted_ids(hf_w.float(), hf_ids)
    torch.testing.assert_close(ws[same], hws[same])
    torch.testing.assert_close(counts.long(), torch.bincount(ids.reshape(-1), minlength=8))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_hf_deepseek_v3_router(seed, dtype, norm_topk_prob):
    ds = _hf_or_skip("deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
    )
    gate = ds.DeepseekV3TopkRouter(cfg)
    assert gate.num_experts == 32 and gate.num_group == 4 and gate.topk_group == 2
    torch.nn.init.normal_(gate.weight, std=0.3)
    gate.e_score_correction_bias.copy_(torch.randn(32) * 0.1)
    hidden = torch.randn(257, 32, dtype=dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = gate(hidden)
    w, ids, _ = route(
        logits.to(dtype),  # exercise the kernel's dtype path: logits rounded to the model dtype
        4,
        scoring="sigmoid",
        correction_bias=gate.e_score_correction_bias,
        n_group=4,
        topk_group=2,
        renormalize=norm_topk_prob,
        scaling_factor=2.5,
    )
    if dtype != torch.float32:
        # HF scores the fp32 logits; compare the same rounded logits through HF's formula instead.
        with torch.no_grad():
            gate.weight.zero_()
        return _compare_deepseek_formula(logits.to(dtype).float(), gate, w, ids, norm_topk_prob)
    key64 = torch.sigmoid(logits.double()) + gate.e_score_correction_bias.double()
    same = _rows_agree_or_near_tie(ids, hf_ids, key64)
    ws, _ = _gather_by_sorted_ids(w, ids)
    hws, _ = _gather_by_sorted_ids(hf_w, hf_ids)
    torch.testing.assert_close(ws[same], hws[same])


def _compare_deepseek_formula(logits32, gate, w, ids, norm_topk_prob):
    # Feed HF's router forward the exact logits by routing an identity through F.linear.
    E = gate.num_experts
    gate.hidden_dim = E
    gate.weight = torch.nn.Parameter(torch.eye(E))
    with torch.no_grad():
        _, hf_w, hf_ids = gate(logits32)
    key64 = torch.sigmoid(logits32.double()) + gate.e_score_correction_bias.double()
    same = _rows_agree_or_near_tie(ids, hf_ids, key64)
    ws, _ = _gather_by_sorted_ids(w, ids)
    hws, _ = _gather_by_sorted_ids(hf_w, hf_ids)
    torch.testing.assert_close(ws[same], hws[same])


# ------------------------------------------------------------------ layouts and sizes


def test_route_accepts_non_contiguous_logits(seed):
    base = torch.randn(16, 40)
    transposed = base.t()  # [40, 16], column stride 40
    sliced = torch.randn(40, 48)[:, 5:21]  # row stride 48
    for logits in (transposed, sliced):
        assert not logits.is_contiguous()
        _assert_same_routing(
            route(logits, 3, scoring="sigmoid"),
            route(logits.contiguous(), 3, scoring="sigmoid"),
            rtol=0,
            atol=0,
        )


def test_route_with_zero_tokens_returns_empty_outputs_and_zero_counts():
    w, ids, counts = route(torch.empty(0, 8), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and counts.shape == (8,)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert int(counts.abs().sum()) == 0


def test_route_is_bitwise_identical_for_any_thread_count(seed):
    logits = torch.randn(3000, 64)
    bias = torch.randn(64) * 0.1
    kw = dict(scoring="sigmoid", correction_bias=bias, n_group=8, topk_group=4)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = route(logits, 8, **kw)
        torch.set_num_threads(2)
        two = route(logits, 8, **kw)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


_ISA_SCRIPT = """
import sys, torch, moe_framework
from moe_framework.ops import route
g = torch.Generator().manual_seed(int(sys.argv[1]))
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for E, k, kw in ((8, 2, {}), (64, 8, dict(scoring="sigmoid", n_group=8, topk_group=4)),
                     (256, 8, dict(renormalize=False)), (300, 5, dict(scoring="sigmoid"))):
        x = (torch.randn(101, E, generator=g) * 3).to(dtype)
        b = torch.randn(E, generator=g) * 0.1
        out += list(route(x, k, correction_bias=b, **kw)) + list(route(x, k, **kw))
sys.stdout.buffer.write(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in out))
"""


def test_route_cpu_avx2_and_baseline_builds_give_identical_bits(seed):
    from isa_builds import outputs_of_both_builds

    baseline, default = outputs_of_both_builds(_ISA_SCRIPT, str(seed))
    assert len(baseline) > 0 and baseline == default


# With AVX-512 the CPU kernel routes blocks of 16 rows with one vector lane per row (k <= 8,
# E <= 256, fp32 / bf16 / fp16) and single rows otherwise; MOE_FRAMEWORK_ROUTE_ROW_KERNEL=1 forces
# the row path, as do the baseline and AVX2 builds. Every path under every build must give the
# same bits: the child prints, per case, a hash of the outputs by default and one with the row
# path forced.
_PATHS_SCRIPT = """
import hashlib, itertools, os, sys, torch, moe_framework
from moe_framework.ops import route
g = torch.Generator().manual_seed(int(sys.argv[1]))
inf, nan = float("inf"), float("nan")

def logits(T, E, dtype, strided):
    x = torch.randn(T, E + 5 * strided, generator=g) * 3
    x = x[:, 2 : 2 + E] if strided else x  # row stride E + 5: not contiguous
    for r, fill in ((3, "nan1"), (5, "nan"), (9, "-inf"), (12, "inf1"), (16, "zeros"),
                    (20, "signed0"), (30, "ties"), (33, "-inf1")):
        if r >= T:
            continue
        if fill == "nan1": x[r, E // 2] = nan
        if fill == "nan": x[r] = nan
        if fill == "-inf": x[r] = -inf
        if fill == "-inf1": x[r, 0] = -inf
        if fill == "inf1": x[r, E - 1] = inf
        if fill == "zeros": x[r] = 0.0
        if fill == "signed0": x[r] = 0.0; x[r, ::2] = -0.0
        if fill == "ties": x[r] = x[r].round()
    return x.to(dtype)

def digest(ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

groupings = {8: [(1, 1), (4, 2)], 12: [(1, 1), (4, 2)], 37: [(1, 1)], 48: [(1, 1), (4, 2)],
             100: [(1, 1), (4, 3)], 256: [(1, 1), (8, 4)]}
for E, (n_group, topk_group) in ((E, gr) for E, grs in groupings.items() for gr in grs):
    for T, k, scoring, renorm, with_bias, dtype in itertools.product(
            (1, 17, 35, 45), (1, 2, 3, 8, 9), ("softmax", "sigmoid"), (True, False), (False, True),
            (torch.float32, torch.bfloat16, torch.float16)):
        if k > topk_group * (E // n_group) or (dtype != torch.float32 and T != 45):
            continue
        if T == 35 and (k not in (2, 8) or renorm):
            continue
        x = logits(T, E, dtype, strided=(T == 45 and E % 2 == 0))
        b = torch.randn(E, generator=g) * 0.5 if with_bias else None
        kw = dict(scoring=scoring, correction_bias=b, n_group=n_group, topk_group=topk_group,
                  renormalize=renorm, scaling_factor=-0.0 if k == 3 else 2.5)
        os.environ.pop("MOE_FRAMEWORK_ROUTE_ROW_KERNEL", None)
        block = route(x, k, **kw)
        os.environ["MOE_FRAMEWORK_ROUTE_ROW_KERNEL"] = "1"
        row = route(x, k, **kw)
        case = f"E={E} groups={n_group}/{topk_group} T={T} k={k} {scoring} renorm={renorm} "
        case += f"bias={with_bias} {dtype}"
        print(case, digest(block), digest(row))
"""


def test_route_row_block_path_gives_the_row_path_bits_under_each_build(seed):
    from isa_builds import ISAS, output_under

    per_isa = {isa: output_under(isa, _PATHS_SCRIPT, str(seed)).decode() for isa in ISAS}
    for isa, out in per_isa.items():
        lines = out.splitlines()
        assert len(lines) > 1000
        differ = [line for line in lines if line.split()[-1] != line.split()[-2]]
        assert not differ, f"{isa}: {len(differ)} cases differ, first: {differ[:5]}"
    baseline = per_isa["baseline"].splitlines()
    for isa in ISAS[1:]:
        differ = [(a, b) for a, b in zip(baseline, per_isa[isa].splitlines()) if a != b]
        assert not differ, f"baseline vs {isa}: {len(differ)} cases differ, first: {differ[:3]}"


def test_route_row_block_path_matches_reference_with_partial_blocks(seed):
    # T = 45: two full blocks of 16 rows and a partial one (T = 35: a tail of 3 rows, routed
    # one by one); E = 12 is not a multiple of any vector width; the counts must not include the
    # padding lanes.
    cases = ((8, 2, 1, 1), (12, 3, 1, 1), (12, 4, 4, 2), (256, 2, 1, 1))
    for (E, k, n_group, topk_group), T in itertools.product(cases, (35, 45)):
        x = torch.randn(T, E) * 2
        bias = torch.randn(E) * 0.3
        for scoring, b in (("softmax", None), ("sigmoid", bias)):
            kw = dict(scoring=scoring, correction_bias=b, n_group=n_group, topk_group=topk_group)
            got = route(x, k, **kw)
            _assert_same_routing(got, route_ref(x, k, **kw))
            assert torch.equal(got[2], torch.bincount(got[1].flatten().long(), minlength=E).int())


def test_route_signed_zeros_tie_like_equal_keys():
    # -0 == +0: the lowest id wins, in a full block of rows and in a single row.
    for T in (1, 32):
        x = torch.full((T, 6), -1.0)
        x[:, 1] = -0.0
        x[:, 3] = 0.0
        x[:, 4] = -0.0
        _, ids, _ = route(x, 2)
        assert ids.tolist() == [[1, 3]] * T


# ------------------------------------------------------------------ ties and non-finite rows


def test_route_ties_go_to_the_lowest_expert_id():
    logits = torch.zeros(3, 10)
    logits[1, [2, 5, 7]] = 1.0  # three-way tie at the top, k = 2
    logits[2, [9, 4]] = 2.0
    _, ids, _ = route(logits, 2)
    assert ids.tolist() == [[0, 1], [2, 5], [4, 9]]


def test_route_group_ties_go_to_the_lowest_group_id():
    logits = torch.zeros(2, 8)  # 4 groups of 2, all groups tie: groups 0 and 1 win
    _, ids, _ = route(
        logits, 2, scoring="sigmoid", correction_bias=torch.zeros(8), n_group=4, topk_group=2
    )
    assert ids.tolist() == [[0, 1], [0, 1]]


def test_route_ranks_saturated_sigmoid_logits_by_the_logit():
    # sigmoid(20) == sigmoid(30) == 1.0 in fp32; without a bias the larger logit still wins.
    logits = torch.tensor([[20.0, 30.0, 0.0]])
    w, ids, _ = route(logits, 1, scoring="sigmoid", renormalize=False)
    assert ids.tolist() == [[1]]
    assert w.item() == 1.0


def test_route_nan_rows_still_pick_distinct_experts_and_get_nan_weights():
    logits = torch.randn(4, 6)
    logits[0, 2] = float("nan")
    logits[1] = float("nan")
    for scoring in ("softmax", "sigmoid"):
        for bias in (None, torch.zeros(6)):
            w, ids, counts = route(logits, 3, scoring=scoring, correction_bias=bias)
            assert _distinct_in_range(ids, 6)
            assert torch.isnan(w[:2]).all() and torch.isfinite(w[2:]).all()
            assert 2 not in ids[0].tolist()  # NaN ranks last: 5 other experts are available
            assert ids[1].tolist() == [0, 1, 2]  # all NaN: lowest ids
            assert int(counts.sum()) == 12


def test_route_infinite_logits_follow_the_limits():
    inf = float("inf")
    logits = torch.tensor(
        [
            [inf, 0.0, inf, 1.0],  # softmax mass shared by the +inf experts
            [-inf, -inf, -inf, -inf],  # everything masked: zero weights
            [-inf, 2.0, -inf, 1.0],  # -inf experts have zero probability
        ]
    )
    w, ids, _ = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2], [0, 1], [1, 3]]
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(w, torch.stack([torch.tensor([0.5, 0.5]), torch.zeros(2), p]))
    w, ids, _ = route(logits, 3, renormalize=True)
    assert _distinct_in_range(ids, 4) and torch.isfinite(w).all()
    torch.testing.assert_close(w[1], torch.zeros(3))
    w, ids, _ = route(logits, 2, scoring="sigmoid", renormalize=False)
    torch.testing.assert_close(w[0], torch.ones(2))
    torch.testing.assert_close(w[1], torch.zeros(2))
    w, _, _ = route(logits, 2, scoring="sigmoid", renormalize=True)
    torch.testing.assert_close(w[1], torch.zeros(2))


def _tied_and_non_finite_rows(T_each, E, gen):
    """Rows of every kind of tie: all zeros, all NaN, all -inf, all +inf, values from {0, 1, 2}
    (partial ties at the top), zeros with a few ones, and random rows with NaN / +-inf / ties
    sprinkled in."""
    nan, inf = float("nan"), float("inf")
    rows = [
        torch.zeros(T_each, E),
        torch.full((T_each, E), nan),
        torch.full((T_each, E), -inf),
        torch.full((T_each, E), inf),
        torch.randint(0, 3, (T_each, E), generator=gen).float(),
    ]
    sparse = torch.zeros(T_each, E)
    sparse[torch.rand(T_each, E, generator=gen) < 4.0 / E] = 1.0  # fewer ones than k, mostly
    rows.append(sparse)
    mixed = torch.randn(T_each, E, generator=gen).round()  # many exact ties
    pick = torch.rand(T_each, E, generator=gen)
    mixed[pick < 0.2] = nan
    mixed[(pick >= 0.2) & (pick < 0.4)] = -inf
    mixed[(pick >= 0.4) & (pick < 0.41)] = inf
    rows.append(mixed)
    return torch.cat(rows)


@pytest.mark.parametrize("E", [257, 1024, 4096])
def test_route_tied_nan_and_minus_inf_rows_match_reference_at_large_expert_counts(seed, E):
    # Above 256 experts the row path ranks the survivors of a segment floor; tied keys (a
    # zero-initialised router, NaN or -inf rows) must keep the reference's order exactly: key
    # descending, NaN as -inf, lowest id first.
    gen = torch.Generator().manual_seed(seed)
    logits = _tied_and_non_finite_rows(3, E, gen)
    for k in (1, 3, 9, 65, E // 2 + 1):
        for scoring in ("softmax", "sigmoid"):
            kw = dict(scoring=scoring)
            got = route(logits, k, **kw)
            _assert_same_routing(got, route_ref(logits, k, **kw))
            assert _distinct_in_range(got[1], E)
    # biased selection, the keys still tied
    for bias in (torch.zeros(E), (torch.randn(E, generator=gen) * 0.1).round(decimals=1)):
        kw = dict(scoring="sigmoid", correction_bias=bias)
        _assert_same_routing(route(logits, 7, **kw), route_ref(logits, 7, **kw))


@pytest.mark.parametrize(
    "E,n_group,topk_group,k",
    [(257, 257, 3, 3), (1024, 8, 3, 9), (1024, 1024, 5, 5), (4096, 64, 7, 33), (4096, 4096, 9, 9)],
)
def test_route_grouped_top_k_of_tied_rows_matches_reference(seed, E, n_group, topk_group, k):
    # Group scores tie too (lowest group id first), thousands of groups included.
    gen = torch.Generator().manual_seed(seed)
    logits = _tied_and_non_finite_rows(2, E, gen)
    for scoring, bias in (("sigmoid", None), ("sigmoid", torch.zeros(E)), ("softmax", None)):
        kw = dict(scoring=scoring, correction_bias=bias, n_group=n_group, topk_group=topk_group)
        got = route(logits, k, **kw)
        _assert_same_routing(got, route_ref(logits, k, **kw))
        assert _distinct_in_range(got[1], E)


_TIED_ROUTE_SCRIPT = """
import torch, moe_framework
from moe_framework.ops import route
torch.set_num_threads(1)
T, E = 1024, 16384
for fill in (0.0, float("nan"), float("-inf")):
    x = torch.full((T, E), fill)
    ids = route(x, 8)[1]
    assert ids.tolist() == [list(range(8))] * T, fill
x = torch.zeros(T, E)
route(x, 8, scoring="sigmoid", n_group=E, topk_group=8)  # 16384 tied groups
route(x[:16], E // 2)  # half the experts from one tie
print("ok")
"""


def test_route_of_tied_rows_is_not_quadratic_in_the_expert_count():
    # Zero-initialised routers, NaN and -inf rows tie every key. Ranking all E tied candidates
    # pairwise took ~60 ms per row at E = 16384 (these 3 x 1024 rows: minutes); a row now costs
    # about what a random one does (a few seconds for the whole script, interpreter start
    # included). The generous bound only proves "not quadratic".
    import os
    import subprocess
    import sys

    import moe_framework

    proc = subprocess.run(
        [sys.executable, "-c", _TIED_ROUTE_SCRIPT],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(moe_framework.__file__)),
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.strip() == b"ok"


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda x: dict(k=0), "k"),
        (lambda x: dict(k=9), "k must be in"),
        (lambda x: dict(k=2.0), "k must be an int"),
        (lambda x: dict(k=2, scoring="relu"), "scoring"),
        (lambda x: dict(k=2, n_group=3), "n_group must divide"),
        (lambda x: dict(k=2, n_group=0), "n_group"),
        (lambda x: dict(k=2, n_group=4, topk_group=5), "topk_group"),
        (lambda x: dict(k=2, n_group=4, topk_group=0), "topk_group"),
        (lambda x: dict(k=5, n_group=4, topk_group=2), "k must be <= topk_group"),
        (lambda x: dict(k=2, correction_bias=torch.zeros(7)), "correction_bias"),
        (lambda x: dict(k=2, correction_bias=torch.zeros(1, 8)), "correction_bias"),
        (lambda x: dict(k=2, correction_bias=torch.zeros(8, dtype=torch.int64)), "correction_bias"),
        (lambda x: dict(k=2, scaling_factor=float("nan")), "scaling_factor"),
        (lambda x: dict(k=2, renormalize=1), "renormalize"),
    ],
)
def test_route_rejects_bad_arguments_naming_them(make_args, match):
    logits = torch.randn(4, 8)
    args = make_args(logits)
    k = args.pop("k")
    with pytest.raises((ValueError, RuntimeError), match=match):
        route(logits, k, **args)


@pytest.mark.parametrize(
    "logits,match",
    [
        (torch.randn(8), "logits must have 2 dimensions"),
        (torch.randn(2, 4, 8), "logits must have 2 dimensions"),
        (torch.randint(0, 5, (4, 8)), "logits must have dtype"),
        (torch.randn(4, 0), "logits"),
    ],
)
def test_route_rejects_bad_logits_naming_them(logits, match):
    with pytest.raises(RuntimeError, match=match):
        route(logits, 1)


def test_route_rejects_bias_on_another_device():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="correction_bias must be on the same device"):
        route(logits, 2, correction_bias=torch.zeros(8, device="meta"))


def test_route_backward_rejects_out_of_range_ids():
    logits = torch.randn(2, 4)
    ids = torch.tensor([[0, 4], [1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="route_backward: ids must be in"):
        torch.ops.moe_framework.route_backward(torch.ones(2, 2), logits, ids, "softmax", True, 1.0)


# ------------------------------------------------------------------ autograd


def _separated_logits(T, E, dtype=torch.float64):
    # Distinct values spaced far apart: finite differences never flip the selection.
    return (
        torch.stack([torch.randperm(E) for _ in range(T)]).to(dtype) * 0.25
        + torch.rand(T, E, dtype=dtype) * 0.05
    )


@pytest.mark.parametrize(
    "scoring,renormalize,grouped",
    list(itertools.product(["softmax", "sigmoid"], [True, False], [False, True])),
)
def test_route_gradcheck_float64(seed, scoring, renormalize, grouped):
    logits = _separated_logits(5, 8).requires_grad_()
    kw = dict(scoring=scoring, renormalize=renormalize, scaling_factor=1.7)
    if grouped:
        kw.update(
            correction_bias=torch.rand(8, dtype=torch.float64) * 0.01, n_group=4, topk_group=2
        )
    assert torch.autograd.gradcheck(lambda x: route(x, 3, **kw)[0], (logits,))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_gradient_matches_reference_autograd(seed, scoring, renormalize):
    logits = torch.randn(33, 16)
    g = torch.randn(33, 4)
    kw = dict(scoring=scoring, renormalize=renormalize, scaling_factor=2.0)
    x1 = logits.clone().requires_grad_()
    (route(x1, 4, **kw)[0] * g).sum().backward()
    x2 = logits.clone().requires_grad_()
    (route_ref(x2, 4, **kw)[0] * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_route_gradient_flows_to_bf16_logits(seed):
    x = torch.randn(8, 16).to(torch.bfloat16).requires_grad_()
    route(x, 2)[0].sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_route_opcheck(seed):
    logits = torch.randn(11, 16)
    bias = torch.randn(16) * 0.1
    for args in (
        (logits, 2, "softmax", None, 1, 1, True, 1.0),
        (logits, 4, "sigmoid", bias, 4, 2, True, 2.5),
        (logits.to(torch.bfloat16), 3, "softmax", None, 2, 1, False, 1.0),
        (_separated_logits(6, 16).requires_grad_(), 3, "sigmoid", None, 1, 1, False, 1.0),
        (torch.empty(0, 16), 2, "softmax", None, 1, 1, True, 1.0),
    ):
        torch.library.opcheck(torch.ops.moe_framework.route.default, args)
    w, ids, _ = route(logits, 3)
    torch.library.opcheck(
        torch.ops.moe_framework.route_backward.default,
        (torch.randn_like(w), logits, ids, "softmax", False, 1.5),
    )


# ------------------------------------------------------------------ torch.compile


def test_route_compiles_fullgraph_dynamic_without_graph_breaks(seed):
    torch._dynamo.reset()

    def gate(x, bias):
        w, ids, counts = route(
            x,
            4,
            scoring="sigmoid",
            correction_bias=bias,
            n_group=4,
            topk_group=2,
            scaling_factor=2.5,
        )
        return w * 2, ids, counts

    bias = torch.randn(16) * 0.1
    for T in (5, 17):
        x = torch.randn(T, 16)
        explanation = torch._dynamo.explain(gate)(x, bias)
        assert explanation.graph_break_count == 0
        assert explanation.graph_count == 1
    compiled = torch.compile(gate, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (5, 17, 64):
        x = torch.randn(T, 16)
        for a, b in zip(compiled(x, bias), gate(x, bias)):
            assert torch.equal(a, b)


def test_route_compiles_with_inductor_and_backpropagates(seed):
    torch._dynamo.reset()

    def loss(x):
        w, _, _ = route(x, 2)
        return (w * w).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    x = torch.randn(19, 8, requires_grad=True)
    compiled(x).backward()
    y = x.detach().clone().requires_grad_()
    loss(y).backward()
    torch.testing.assert_close(x.grad, y.grad)


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_cuda_matches_cpu(seed, dtype, scoring, grouping, renormalize):
    n_group, topk_group = grouping
    E = 16
    logits = _separated_logits(1000, E, torch.float32).to(dtype)
    for bias in (None, torch.rand(E) * 0.01):
        if bias is None and n_group > 1:
            continue
        kw = dict(
            scoring=scoring,
            correction_bias=bias,
            n_group=n_group,
            topk_group=topk_group,
            renormalize=renormalize,
            scaling_factor=2.5,
        )
        cpu = route(logits, 4, **kw)
        gpu = route(
            logits.cuda(), 4, **{**kw, "correction_bias": None if bias is None else bias.cuda()}
        )
        _assert_same_routing(tuple(t.cpu() for t in gpu), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_route_cuda_handles_ties_nan_inf_and_zero_tokens():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [[0.0] * 8, [nan] * 8, [inf, 0, inf, 1, 2, 3, 4, 5], [-inf] * 8, [1, nan, 3, 2, 0, 0, 0, 0]]
    )
    for scoring in ("softmax", "sigmoid"):
        for renormalize in (True, False):
            cpu = route(logits, 3, scoring=scoring, renormalize=renormalize)
            gpu = route(logits.cuda(), 3, scoring=scoring, renormalize=renormalize)
            _assert_same_routing(tuple(t.cpu() for t in gpu), cpu, rtol=1e-5, atol=1e-6)
    w, ids, counts = route(torch.empty(0, 8, device="cuda"), 2)
    assert w.shape == (0, 2) and counts.tolist() == [0] * 8


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_cuda_backward_matches_cpu(seed, scoring, renormalize):
    logits = _separated_logits(300, 64, torch.float32)
    g = torch.randn(300, 8)
    grads = []
    for dev in ("cpu", "cuda"):
        x = logits.to(dev).requires_grad_()
        w, _, _ = route(x, 8, scoring=scoring, renormalize=renormalize)
        (w * g.to(dev)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_route_cuda_opcheck_and_large_expert_count(seed):
    logits = torch.randn(513, 300, device="cuda")
    torch.library.opcheck(
        torch.ops.moe_framework.route.default, (logits, 6, "softmax", None, 1, 1, True, 1.0)
    )
    _assert_same_routing(
        tuple(t.cpu() for t in route(logits, 6, scoring="sigmoid")),
        route(logits.cpu(), 6, scoring="sigmoid"),
        rtol=1e-5,
        atol=1e-6,
    )
