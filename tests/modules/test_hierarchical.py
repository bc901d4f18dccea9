"""Hierarchical MoE: HierarchicalRouter (a Router composed of routers) and HierarchicalMoELayer
(members that are MoE layers) against per-token plain-PyTorch references, telemetry per level,
masks, errors and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES

from moe_framework import MoELayer
from moe_framework.hierarchical import HierarchicalMoELayer, HierarchicalRouter
from moe_framework.routing import TopKRouter

D = 10


def _topk_reference(logits: torch.Tensor, k: int):
    """Softmax over all, the k best, renormalised (TopKRouter's rule): {id: weight}."""
    p = torch.softmax(logits.double(), -1)
    top = torch.topk(p, k)
    w = top.values / top.values.sum()
    return {int(i): float(v) for i, v in zip(top.indices, w)}


def test_hierarchical_router_matches_a_per_token_reference(seed):
    sizes = (4, 3, 5)
    group = TopKRouter(D, 3, 2)
    experts = [TopKRouter(D, n, 2) for n in sizes]
    router = HierarchicalRouter(group, experts)
    assert router.num_experts == 12 and router.slots_per_token == 4
    T = 23
    x = torch.randn(T, D)
    dec = router(x)
    starts = [0, 4, 7]
    with torch.no_grad():
        for t in range(T):
            ref: dict = {}
            for g, wg in _topk_reference(group.gate.weight @ x[t], 2).items():
                for i, we in _topk_reference(experts[g].gate.weight @ x[t], 2).items():
                    ref[starts[g] + i] = wg * we
            got = {int(i): float(w) for i, w in zip(dec.ids[t], dec.weights[t])}
            assert got.keys() == ref.keys()
            for i in ref:
                assert abs(got[i] - ref[i]) < 1e-5
    ref_counts = torch.bincount(dec.ids.reshape(-1).long(), minlength=12)
    assert torch.equal(dec.counts.long(), ref_counts)
    # joint log-probabilities: a distribution over the 12 experts
    torch.testing.assert_close(dec.logits.exp().sum(1), torch.ones(T), rtol=1e-5, atol=1e-5)
    stats = router.routing_stats()
    assert sum(stats["level0"]["load"]) == T * 2
    assert [sum(s["load"]) for s in stats["level1"]] == [
        2 * int(c) for c in dec.stats["group_counts"]
    ]


def test_hierarchical_router_in_a_plain_moe_layer_with_mask(seed):
    router = HierarchicalRouter(TopKRouter(D, 2, 1), [TopKRouter(D, 3, 2), TopKRouter(D, 3, 2)])
    layer = MoELayer.build(d_model=D, d_hidden=8, num_experts=6, k=2, router=router)
    x = torch.randn(3, 7, D)
    mask = torch.rand(3, 7) > 0.3
    y, info = layer(x, mask)
    pad = ~mask.reshape(-1)
    assert bool((info.ids[pad] == -1).all()) and bool((y.reshape(-1, D)[pad] == 0).all())
    assert int(info.counts.sum()) == 2 * int(mask.sum())
    y.sum().backward()
    assert router.expert_routers[1].gate.weight.grad is not None


def _member(E):
    return MoELayer.build(d_model=D, d_hidden=8, num_experts=E, k=2, load_balance_coef=0.01)


def test_hierarchical_layer_matches_a_per_token_reference_and_reports_both_levels(seed):
    group = TopKRouter(D, 3, 2, load_balance_coef=0.01)
    members = [_member(E) for E in (2, 4, 3)]
    layer = HierarchicalMoELayer(group, members)
    x = torch.randn(2, 9, D)
    y, info = layer(x)
    x2 = x.reshape(-1, D)
    ref = torch.zeros_like(x2)
    with torch.no_grad():
        for t in range(x2.shape[0]):
            for g, wg in _topk_reference(group.gate.weight @ x2[t], 2).items():
                ref[t] += wg * members[g](x2[t : t + 1])[0][0]
    torch.testing.assert_close(y.detach().reshape(-1, D), ref, **TOLERANCES["layer"][torch.float32])
    assert len(info.members) == 3 and float(info.aux_loss.detach()) > 0
    stats = layer.routing_stats()
    assert stats["level0"]["load"] == info.group.counts.tolist()
    for g, s in enumerate(stats["level1"]):
        assert s["load"] == info.members[g].counts.tolist()
        assert sum(s["load"]) == 2 * int(info.group.counts[g])


def test_hierarchical_errors():
    with pytest.raises(ValueError, match="one router per group"):
        HierarchicalRouter(TopKRouter(D, 3, 1), [TopKRouter(D, 2, 1)] * 2)
    with pytest.raises(ValueError, match="same slots_per_token"):
        HierarchicalRouter(TopKRouter(D, 2, 1), [TopKRouter(D, 3, 1), TopKRouter(D, 3, 2)])
    with pytest.raises(ValueError, match="d_model"):
        HierarchicalRouter(TopKRouter(D, 2, 1), [TopKRouter(D, 3, 1), TopKRouter(D + 1, 3, 1)])
    with pytest.raises(ValueError, match="one layer per group"):
        HierarchicalMoELayer(TopKRouter(D, 2, 1), [_member(2)])
    layer = HierarchicalMoELayer(TopKRouter(D, 2, 1), [_member(2), _member(2)])
    with pytest.raises(ValueError, match="last dimension d_model=10"):
        layer(torch.randn(4, D + 2))


def test_hierarchical_layer_compiles_fullgraph(seed):
    layer = HierarchicalMoELayer(TopKRouter(D, 2, 1), [_member(2), _member(3)])
    x = torch.randn(13, D)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc, ic = compiled(x)
    layer.reset_stats()
    ye, ie = layer(x)
    torch.testing.assert_close(yc, ye, **TOLERANCES["layer"][torch.float32])
    assert torch.equal(ic.group.ids, ie.group.ids)
    yc.sum().backward()
    assert layer.members[1].experts.w_out.grad is not None


@pytest.mark.cuda
def test_hierarchical_layer_cuda_matches_cpu(seed):
    layer = HierarchicalMoELayer(TopKRouter(D, 2, 1), [_member(2), _member(3)])
    x = torch.randn(21, D)
    want, _ = layer(x)
    got, info = layer.cuda()(x.cuda())
    assert info.group.ids.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES["layer"][torch.float32])


def test_hierarchical_layers_nest(seed):
    inner = HierarchicalMoELayer(TopKRouter(D, 2, 1), [_member(2), _member(3)])
    outer = HierarchicalMoELayer(TopKRouter(D, 2, 1), [inner, _member(4)])
    assert inner.num_experts == 5 and outer.num_experts == 9
    x = torch.randn(15, D)
    y, info = outer(x)
    x2 = x
    ref = torch.zeros_like(x2)
    with torch.no_grad():
        for t in range(x2.shape[0]):
            for g, wg in _topk_reference(outer.group_router.gate.weight @ x2[t], 1).items():
                ref[t] += wg * outer.members[g](x2[t : t + 1])[0][0]
    torch.testing.assert_close(y.detach(), ref, **TOLERANCES["layer"][torch.float32])
    assert info.counts.shape == (9,) and int(info.counts[:5].sum()) == int(
        info.members[0].counts.sum()
    )
    assert len(outer.routing_stats()["level1"]) == 2
