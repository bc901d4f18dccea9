"""Issue 17 item 6: the MLP, context-aware and dense routers, overflow re-routing with a dynamic
capacity factor, router / expert dropout and the training-step options, each against a plain
PyTorch reference (loops over tokens and slots, written from the definitions in
docs/adaptive_routing.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_framework import MoELayer
from moe_framework.experts import ExpertBank
from moe_framework.routing import (
    ROUTER_KINDS,
    ContextRouter,
    DenseRouter,
    MLPRouter,
    OverflowRouter,
    TopKRouter,
    make_router,
)
from moe_framework.training_options import (
    TrainingOptions,
    apply_training_options,
    expert_diversity_loss,
    parameter_groups,
)


def _topk_ref(logits: torch.Tensor, k: int, renormalize: bool = True):
    p = torch.softmax(logits.double(), dim=-1)
    w, i = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, i


def _check_topk(dec, logits_ref, k, renormalize=True):
    w_ref, i_ref = _topk_ref(logits_ref, k, renormalize)
    torch.testing.assert_close(dec.logits.double(), logits_ref.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(dec.ids.long(), i_ref)
    torch.testing.assert_close(dec.weights.double(), w_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ router kinds


@pytest.mark.parametrize("T", [0, 1, 13])
def test_mlp_router_is_softmax_topk_of_a_two_layer_perceptron(seed, T):
    d, E, k = 7, 5, 2
    r = MLPRouter(d, E, k, mlp_hidden=11)
    x = torch.randn(T, d * 2)[:, ::2]  # non-contiguous
    l1, l2 = r.mlp[0], r.mlp[2]
    ref = F.gelu(x.double() @ l1.weight.double().t() + l1.bias.double()) @ l2.weight.double().t()
    _check_topk(r(x), ref, k)


def test_context_router_adds_the_context_gate_and_matches_topk_without_context(seed):
    d, E, k, c, T = 6, 4, 2, 3, 11
    r = ContextRouter(d, E, k, context_dim=c)
    assert torch.count_nonzero(r.context_gate.weight) == 0  # starts neutral
    torch.nn.init.normal_(r.context_gate.weight)
    x, ctx = torch.randn(T, d), torch.randn(T, c)
    ref = (
        x.double() @ r.gate.weight.double().t() + ctx.double() @ r.context_gate.weight.double().t()
    )
    _check_topk(r(x, context=ctx), ref, k)
    # one context row for every token
    ref1 = (
        x.double() @ r.gate.weight.double().t()
        + ctx[0].double() @ r.context_gate.weight.double().t()
    )
    _check_topk(r(x, context=ctx[0]), ref1, k)
    # no context: top-k on the gate alone, bit for bit TopKRouter with the same gate
    plain = TopKRouter(d, E, k)
    plain.gate.weight.data.copy_(r.gate.weight)
    a, b = r(x), plain(x)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    with pytest.raises(ValueError, match=r"context must be \[T=11, context_dim=3\]"):
        r(x, context=torch.randn(T, c + 1))
    with pytest.raises(ValueError, match="context_dim must be a positive int"):
        ContextRouter(d, E, k, context_dim=0)
    with pytest.raises(ValueError, match="takes no context"):
        TopKRouter(d, E, k).router_logits(x, torch.randn(T, c))


def test_moe_layer_passes_a_context_shaped_like_x_to_the_router(seed):
    d, E, k, c = 8, 4, 2, 3
    router = ContextRouter(d, E, k, context_dim=c)
    torch.nn.init.normal_(router.context_gate.weight)
    layer = MoELayer.build(d_model=d, d_hidden=8, num_experts=E, k=k, router=router)
    x, ctx = torch.randn(2, 5, d), torch.randn(2, 5, c)
    y, info = layer(x, context=ctx)
    dec = router(x.reshape(-1, d), context=ctx.reshape(-1, c))
    assert torch.equal(info.ids, dec.ids)
    y0, info0 = layer(x)
    assert not torch.equal(info0.weights, info.weights)
    with pytest.raises(ValueError, match=r"context must have shape \(2, 5\)"):
        layer(x, context=torch.randn(10, c))


def _swiglu_expert(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x.double() @ bank.w_gate_up[e].double()
    g, u = h.chunk(2, dim=-1)
    return (F.silu(g) * u) @ bank.w_out[e].double()


def test_dense_router_mixes_every_expert_by_its_softmax_weight(seed):
    d, E, T = 8, 3, 9
    router = DenseRouter(d, E)
    assert router.slots_per_token == E
    layer = MoELayer.build(d_model=d, d_hidden=6, num_experts=E, k=E, router=router)
    x = torch.randn(T, d)
    mask = torch.rand(T) > 0.3
    y, info = layer(x, mask)
    p = torch.softmax(x.double() @ router.gate.weight.double().t(), dim=-1)
    ref = sum(p[:, e : e + 1] * _swiglu_expert(layer.experts, e, x) for e in range(E))
    ref = torch.where(mask[:, None], ref, torch.zeros_like(ref))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(info.counts, torch.full((E,), int(mask.sum()), dtype=torch.int32))
    with pytest.raises(ValueError, match="k must be None or num_experts=3"):
        DenseRouter(d, E, 2)
    with pytest.raises(ValueError, match="capacity_factor must be None"):
        DenseRouter(d, E, capacity_factor=1.0)


def test_make_router_builds_every_kind_and_refuses_an_unknown_one():
    extra = dict(context=dict(context_dim=2))
    for kind, cls in ROUTER_KINDS.items():
        k = 1 if kind == "switch" else 2
        r = make_router(kind, 8, 4, k, **extra.get(kind, {}))
        assert type(r) is cls
        assert r(torch.randn(3, 8)).ids.shape == (3, r.slots_per_token)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_router("nope", 8, 4)


# ------------------------------------------------------------------------------ overflow


def _overflow_ref(ids, weights, logits, cap, rounds, E):
    """Capacity then re-routing, by the definition, in plain Python."""
    T, k = ids.shape
    ids = ids.tolist()
    w = weights.tolist()
    out_ids = [[-1] * k for _ in range(T)]
    out_w = [[0.0] * k for _ in range(T)]
    load = [0] * E
    pending = []
    for t in range(T):
        for j in range(k):
            e = ids[t][j]
            if e < 0:
                continue
            if load[e] < cap:
                load[e] += 1
                out_ids[t][j], out_w[t][j] = e, w[t][j]
            else:
                pending.append((t, j))
    before = len(pending)
    used = [set(e for e in ids[t] if e >= 0) for t in range(T)]
    for _ in range(rounds):
        room = [cap - load[e] for e in range(E)]
        offers = {}
        for t in range(T):
            mine = sorted(j for (tt, j) in pending if tt == t)
            if not mine:
                continue
            open_ = [e for e in range(E) if e not in used[t] and room[e] > 0]
            if open_:
                best = max(open_, key=lambda e: (logits[t, e].item(), -e))
                offers[t] = (mine[0], best)
        taken = [0] * E
        for t in sorted(offers):
            j, e = offers[t]
            if taken[e] < room[e]:
                taken[e] += 1
                load[e] += 1
                out_ids[t][j], out_w[t][j] = e, w[t][j]
                used[t].add(e)
                pending.remove((t, j))
    return torch.tensor(out_ids), torch.tensor(out_w), before, len(pending)


@pytest.mark.parametrize("T, k, E, cf", [(23, 2, 5, 0.8), (16, 1, 4, 1.0), (9, 3, 6, 0.5)])
def test_overflow_rerouting_moves_overflow_to_the_next_best_expert_with_room(seed, T, k, E, cf):
    inner = TopKRouter(6, E, k)
    # skewed logits so some experts overflow
    inner.gate.weight.data[0] += 2.0
    r = OverflowRouter(inner, cf, reroute_rounds=E - k if E > k else 1)
    x = torch.randn(T, 6)
    dec = r(x)
    base = inner(x)
    cap = min(T, math.ceil(cf * T * k / E))
    ref_ids, ref_w, before, after = _overflow_ref(
        base.ids, base.weights, base.logits, cap, r.reroute_rounds, E
    )
    assert torch.equal(dec.ids.long(), ref_ids)
    torch.testing.assert_close(dec.weights, ref_w.float())
    assert int(dec.stats["dropped_before_reroute"]) == before
    assert int(dec.stats["dropped"]) == after <= before
    assert int(dec.stats["rerouted"]) == before - after
    assert int(dec.stats["capacity"]) == cap
    assert int(dec.counts.max()) <= cap
    # no token holds an expert twice
    for row in dec.ids.tolist():
        got = [e for e in row if e >= 0]
        assert len(got) == len(set(got))


def test_overflow_without_rerouting_drops_like_the_routers_own_capacity(seed):
    x = torch.randn(40, 6)
    own = TopKRouter(6, 4, 2, capacity_factor=0.75)
    inner = TopKRouter(6, 4, 2)
    inner.load_state_dict(own.state_dict())
    wrapped = OverflowRouter(inner, 0.75, reroute=False)
    a, b = own(x), wrapped(x)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    assert (
        int(a.stats["dropped"]) == int(b.stats["dropped"]) == int(b.stats["dropped_before_reroute"])
    )
    with pytest.raises(ValueError, match="router.capacity_factor must be None"):
        OverflowRouter(own, 1.0)


def test_dynamic_capacity_factor_follows_the_observed_load(seed):
    E, k, T, m = 4, 2, 32, 0.5
    inner = TopKRouter(6, E, k)
    inner.gate.weight.data[1] += 1.5
    r = OverflowRouter(inner, 1.0, dynamic=True, momentum=m, max_capacity_factor=3.0).train()
    ema = 1.0
    for _ in range(3):
        x = torch.randn(T, 6)
        dec = r(x)
        f_used = min(max(ema, 1.0), 3.0)
        assert float(dec.stats["capacity_factor"]) == pytest.approx(f_used, rel=1e-6)
        assert int(dec.stats["capacity"]) == min(T, math.ceil(f_used * T * k / E))
        load = inner(x).counts.max().item()
        ema = m * ema + (1 - m) * load * E / (T * k)
        assert float(r.capacity_ema) == pytest.approx(ema, rel=1e-5)
    before = r.capacity_ema.clone()
    r(torch.randn(T, 6), torch.zeros(T, dtype=torch.bool))  # padding only: no load observed
    r(torch.randn(0, 6))
    assert torch.equal(r.capacity_ema, before)
    r.eval()
    r(torch.randn(T, 6))
    assert torch.equal(r.capacity_ema, before)  # eval forwards do not move it


# ------------------------------------------------------------------------------ dropouts


def test_router_and_expert_dropout_act_in_training_only_and_follow_the_counter_rng(seed):
    from moe_framework.routing.rng import counter_uniform

    T, d, E, k = 400, 8, 4, 2
    r = TopKRouter(d, E, k, seed=3)
    x = torch.randn(T, d)
    clean = r(x)
    r.router_dropout, r.expert_dropout = 0.25, 0.5
    r.eval()
    ev = r(x)
    assert torch.equal(ev.ids, clean.ids) and torch.equal(ev.weights, clean.weights)
    r.train()
    step = r.noise_step.clone()
    dec = r(x)
    assert int(r.noise_step) == int(step) + 1
    # reference: the documented masks drawn from the counter RNG
    u_in = counter_uniform(3, step, (T, d), 8)
    x_drop = torch.where(u_in >= 0.25, x / 0.75, torch.zeros_like(x))
    logits = x_drop.double() @ r.gate.weight.double().t()
    w_ref, i_ref = _topk_ref(logits, k)
    u_slot = counter_uniform(3, step, (T, k), 9)
    drop = u_slot < 0.5
    ids_ref = torch.where(drop, torch.full_like(i_ref, -1), i_ref)
    w_ref = torch.where(drop, torch.zeros_like(w_ref), w_ref / 0.5)
    assert torch.equal(dec.ids.long(), ids_ref)
    torch.testing.assert_close(dec.weights.double(), w_ref, rtol=1e-5, atol=1e-6)
    assert int(dec.stats["expert_dropout"]) == int(drop.sum())
    assert 0.4 < drop.float().mean() < 0.6
    assert torch.equal(dec.counts, torch.bincount(ids_ref[ids_ref >= 0], minlength=E).int())


def test_routers_compile_fullgraph_with_dropout_context_and_overflow(seed):
    x, ctx = torch.randn(12, 8), torch.randn(12, 3)
    cases = [
        (MLPRouter(8, 4, 2), {}),
        (ContextRouter(8, 4, 2, context_dim=3), {"context": ctx}),
        (DenseRouter(8, 4), {}),
        (OverflowRouter(TopKRouter(8, 4, 2), 0.6, dynamic=True), {}),
    ]
    for router, kw in cases:
        for m in router.modules():
            if hasattr(m, "expert_dropout"):
                m.router_dropout, m.expert_dropout = 0.1, 0.2
        router.train()
        eager_state = {k: v.clone() for k, v in router.state_dict().items()}
        # no_grad: the forward is what must trace; gradients are checked eagerly above
        with torch.no_grad():
            want = router(x, **kw)
            router.load_state_dict(eager_state)
            got = torch.compile(router, fullgraph=True, backend="aot_eager")(x, **kw)
        assert torch.equal(got.ids, want.ids), type(router).__name__
        torch.testing.assert_close(got.weights, want.weights)


# ------------------------------------------------------------------------------ training options


def _system():
    from moe_framework import MixtureOfExpertsSystem, MoEConfig

    cfg = MoEConfig(input_dim=6, output_dim=3, d_model=8, d_hidden=8, num_layers=2,
                    num_experts=4, k=2, num_shared_experts=1, consolidation_interval=0,
                    kg_path=None)  # fmt: skip
    return MixtureOfExpertsSystem(cfg)


def test_parameter_groups_partition_the_parameters_with_their_multipliers():
    model = _system()
    opts = TrainingOptions(router_lr_mult=0.1, expert_lr_mult=2.0, shared_lr_mult=0.5)
    groups = parameter_groups(model, 1e-3, opts)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"router", "experts", "shared", "other"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    want = {"router": 1e-4, "experts": 2e-3, "shared": 5e-4, "other": 1e-3}
    for name, g in by_name.items():
        assert g["lr"] == pytest.approx(want[name])
    blocks = model._blocks()
    assert {id(p) for p in by_name["router"]["params"]} == {
        id(p) for b in blocks for p in b.moe.supervisor.parameters()
    }
    assert {id(p) for p in by_name["shared"]["params"]} == {
        id(p) for b in blocks for p in b.moe.shared_experts.parameters()
    }
    torch.optim.AdamW(groups)  # a valid optimiser argument
    with pytest.raises(ValueError, match="router_dropout must be a float in"):
        TrainingOptions(router_dropout=1.0)
    with pytest.raises(ValueError, match="expert_lr_mult must be a finite float >= 0"):
        TrainingOptions(expert_lr_mult=-1)


def test_expert_diversity_loss_is_the_mean_squared_pairwise_cosine(seed):
    model = _system()
    ref = []
    for b in model._blocks():
        bank = b.moe.experts
        E = bank.num_experts
        w = torch.cat([p.reshape(E, -1) for p in bank.parameters()], 1).double()
        vals = [
            (F.cosine_similarity(w[i], w[j], dim=0) ** 2).item()
            for i in range(E)
            for j in range(E)
            if i != j
        ]
        ref.append(sum(vals) / len(vals))
    loss = expert_diversity_loss(model)
    assert loss.item() == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    # descending it makes the experts more diverse
    bank0 = model._blocks()[0].moe.experts
    with torch.no_grad():
        bank0.w_out[1].copy_(bank0.w_out[0])
        bank0.w_gate_up[1].copy_(bank0.w_gate_up[0])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    start = expert_diversity_loss(model)
    for _ in range(5):
        opt.zero_grad()
        expert_diversity_loss(model).backward()
        opt.step()
    assert expert_diversity_loss(model) < start


def test_training_step_applies_the_dropouts_and_adds_the_diversity_loss(seed):
    model = _system()
    opts = TrainingOptions(router_dropout=0.2, expert_dropout=0.1, diversity_loss_coef=0.5)
    assert apply_training_options(model, TrainingOptions()) == 2
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    div = expert_diversity_loss(model).item()
    opt = torch.optim.SGD(parameter_groups(model, 1e-2, opts))
    res = model.training_step(batch, opt, options=opts)
    assert all(r.router_dropout == 0.2 and r.expert_dropout == 0.1 for r in model.routers())
    assert res.loss == pytest.approx(res.task_loss + res.aux_loss + 0.5 * div, rel=1e-5)


def test_docs_adaptive_routing_examples_run_and_print_what_they_say(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "adaptive_routing.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 3
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["torch.Size([64, 16]) True", "torch.Size([2, 5, 16])"]
    assert out[2] == "4 (5, 4) True"
    assert out[3] == "['router', 'experts', 'other'] True"
