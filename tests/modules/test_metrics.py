"""Routing telemetry (moe_framework.metrics) against direct computations."""

import math

import pytest
import torch

from moe_framework.metrics import RoutingStats, load_summary, specialisation
from moe_framework.supervisor import RoutingDecision


def _decision(ids, logits, dropped=0, stats_extra=None):
    E = logits.shape[1]
    counts = torch.zeros(E, dtype=torch.int32)
    for e in ids.reshape(-1).tolist():
        if e >= 0:
            counts[e] += 1
    stats = {"dropped": torch.tensor(dropped)}
    stats.update(stats_extra or {})
    w = torch.where(ids >= 0, torch.full(ids.shape, 0.5), torch.zeros(ids.shape))
    aux = sum(v for k, v in stats.items() if k in ("load_loss", "z_loss")) * 0.1
    return RoutingDecision(w, ids.to(torch.int32), counts, logits, torch.as_tensor(aux), stats)


def _gini_pairwise(x):
    # Independent definition: mean absolute difference over all ordered pairs / (2 * mean).
    n = len(x)
    mean = sum(x) / n
    return sum(abs(a - b) for a in x for b in x) / (2 * n * n * mean)


def test_load_summary_matches_direct_formulas(seed):
    load = torch.randint(0, 50, (13,)).tolist()
    load[3] = 0
    s = load_summary(load)
    n = len(load)
    mean = sum(load) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in load) / n)
    assert s["cv"] == pytest.approx(std / mean)
    assert s["gini"] == pytest.approx(_gini_pairwise(load))
    assert s["max_over_mean"] == pytest.approx(max(load) / mean)
    assert s["dead_experts"] == [i for i, v in enumerate(load) if v == 0]
    assert s["utilisation"] == pytest.approx([v / mean for v in load])


def test_load_summary_extremes_balanced_and_one_hot():
    bal = load_summary([5, 5, 5, 5])
    assert bal["cv"] == 0 and bal["gini"] == 0 and bal["max_over_mean"] == 1
    one = load_summary([0, 0, 12, 0])
    assert one["gini"] == pytest.approx(3 / 4)
    assert one["max_over_mean"] == pytest.approx(4.0)
    assert one["dead_experts"] == [0, 1, 3]
    empty = load_summary([0, 0, 0])
    assert empty["cv"] == 0 and empty["dead_experts"] == [0, 1, 2]


def test_routing_stats_accumulate_counts_entropy_drops_over_steps(seed):
    E, T, k = 6, 17, 2
    st = RoutingStats(E)
    all_ids, all_logits, total_drop = [], [], 0
    for step in range(3):
        logits = torch.randn(T, E)
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        ids[0, 1] = -1
        st.update(_decision(ids, logits, dropped=step + 1))
        all_ids.append(ids)
        all_logits.append(logits)
        total_drop += step + 1
    out = st.routing_stats()
    ids = torch.cat(all_ids)
    expect = [int((ids == e).sum()) for e in range(E)]
    assert out["tokens_per_expert"] == expect
    assert out["steps"] == 3 and out["tokens"] == 3 * T
    assert out["dropped"] == total_drop
    assert out["routed"] == sum(expect)
    assert out["drop_rate"] == pytest.approx(total_drop / (sum(expect) + total_drop))
    p = torch.softmax(torch.cat(all_logits).double(), -1)
    ent = float(-(p * p.log()).sum(-1).mean())
    assert out["entropy"] == pytest.approx(ent, rel=1e-5)
    assert out["normalized_entropy"] == pytest.approx(ent / math.log(E), rel=1e-5)
    assert out["load_fraction"] == pytest.approx([v / sum(expect) for v in expect])
    assert out["load_loss"] is None and out["z_loss"] is None


def test_routing_stats_entropy_excludes_masked_tokens(seed):
    E, T = 4, 9
    logits = torch.randn(T, E)
    mask = torch.rand(T) > 0.4
    mask[0] = True
    st = RoutingStats(E)
    st.update(_decision(torch.zeros(T, 1, dtype=torch.long), logits), mask=mask)
    p = torch.softmax(logits[mask].double(), -1)
    assert st.routing_stats()["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()))
    assert st.routing_stats()["tokens"] == int(mask.sum())


def test_routing_stats_loss_means_and_reset(seed):
    E = 4
    st = RoutingStats(E)
    vals = [(1.5, 3.0), (2.5, 5.0)]
    for lb, z in vals:
        d = _decision(
            torch.zeros(3, 1, dtype=torch.long),
            torch.randn(3, E),
            stats_extra={"load_loss": torch.tensor(lb), "z_loss": torch.tensor(z)},
        )
        st.update(d)
    out = st.routing_stats()
    assert out["load_loss"] == pytest.approx(2.0)
    assert out["z_loss"] == pytest.approx(4.0)
    assert out["aux_loss"] == pytest.approx(0.1 * (4.5 + 7.5) / 2)
    st.reset()
    out = st.routing_stats()
    assert out["steps"] == 0 and out["tokens_per_expert"] == [0] * E and out["load_loss"] is None


def test_routing_stats_buffers_are_not_in_state_dict():
    assert len(RoutingStats(4).state_dict()) == 0


def test_routing_stats_update_compiles_without_graph_breaks(seed):
    E, T = 5, 11
    st = RoutingStats(E)

    def step(ids, logits):
        d = _decision_device(ids, logits, E)
        st.update(d)
        return d.counts

    ids = torch.randint(-1, E, (T, 2))
    logits = torch.randn(T, E)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(ids, logits)
    compiled(ids, logits)
    out = st.routing_stats()
    assert out["steps"] == 2
    assert out["tokens_per_expert"] == [2 * int((ids == e).sum()) for e in range(E)]


def _decision_device(ids, logits, E):
    # Same as _decision but with tensor ops only (usable under torch.compile).
    flat = ids.reshape(-1)
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)
    counts = torch.zeros(E + 1, dtype=torch.int64).scatter_add(0, key, torch.ones_like(key))[:E]
    w = (ids >= 0).float()
    stats = {"dropped": (ids < 0).sum()}
    return RoutingDecision(w, ids.int(), counts.int(), logits, logits.new_zeros(()), stats)


def test_specialisation_matches_loop_and_finds_dominant_label(seed):
    E, L, T, k = 5, 3, 40, 2
    ids = torch.randint(-1, E, (T, k))
    labels = torch.randint(-1, L, (T,))
    # expert 4 only ever sees label 2
    ids[:, 1] = torch.where(labels == 2, torch.full_like(ids[:, 1], 4), ids[:, 1])
    ids[:, 0] = torch.where(ids[:, 0] == 4, torch.full_like(ids[:, 0], -1), ids[:, 0])
    ids[:, 1] = torch.where((ids[:, 1] == 4) & (labels != 2), -1, ids[:, 1])
    sp = specialisation(ids, labels, E, L)
    counts = torch.zeros(L, E, dtype=torch.long)
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= 0 and labels[t] >= 0:
                counts[labels[t], ids[t, j]] += 1
    assert torch.equal(sp.counts, counts)
    for lab in range(L):
        tot = counts[lab].sum().item()
        exp = (counts[lab].float() / tot) if tot else torch.zeros(E)
        torch.testing.assert_close(sp.distribution[lab], exp)
    for e in range(E):
        col = counts[:, e].tolist()
        if sum(col) == 0:
            assert sp.dominant_label[e] == -1 and sp.dominant_share[e] == 0
        else:
            best = max(range(L), key=lambda i: (col[i], -i))
            assert sp.dominant_label[e] == best
            assert sp.dominant_share[e] == pytest.approx(col[best] / sum(col))
    if (labels == 2).any():
        assert sp.dominant_label[4] == 2 and sp.dominant_share[4] == 1.0


def test_routing_stats_accumulates_label_counts():
    st = RoutingStats(3, num_labels=2)
    ids = torch.tensor([[0, 1], [2, -1], [0, 2]])
    d = _decision(ids, torch.zeros(3, 3))
    st.update(d, labels=torch.tensor([0, 1, 0]))
    st.update(d, labels=torch.tensor([1, 1, -1]))
    sp = st.routing_stats()["specialisation"]
    # label 0: t0 -> {0, 1}, t2 -> {0, 2}; label 1: t1 -> {2}, then t0 -> {0, 1}, t1 -> {2}
    assert sp["counts"] == [[2, 1, 1], [1, 1, 2]]
    assert sp["dominant_label"] == [0, 0, 1]  # expert 1 is a tie: the lower label wins
    assert sp["dominant_share"] == pytest.approx([2 / 3, 0.5, 2 / 3])


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_experts"):
        RoutingStats(0)
    with pytest.raises(ValueError, match="num_labels"):
        RoutingStats(3, num_labels=0)
    with pytest.raises(ValueError, match="labels"):
        RoutingStats(3).update(_decision(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3)),
                               labels=torch.zeros(2, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="specialisation"):
        specialisation(torch.zeros(3, 2, dtype=torch.long), torch.zeros(4), 2, 2)
