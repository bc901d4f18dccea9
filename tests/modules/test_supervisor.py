"""Supervisor: every routing strategy against a plain-PyTorch reference, capacity, balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_framework.supervisor import (
    STRATEGIES,
    Supervisor,
    apply_capacity,
    counter_normal,
    counter_uniform,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)

# ------------------------------------------------------------------------------------------------
# Plain-PyTorch references (written from the papers / reference code, independent of the module)
# ------------------------------------------------------------------------------------------------


def ref_softmax_topk(logits, k, renormalize):
    """Mixtral: softmax over all experts, top-k, optional renormalisation."""
    p = torch.softmax(logits.double(), -1)
    w, ids = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def ref_topk_then_softmax(logits, k):
    """Top-k of the logits, then softmax over the k selected logits only."""
    v, ids = torch.topk(logits.double(), k, dim=-1)
    return torch.softmax(v, -1), ids


def ref_deepseek_v3(logits, bias, k, n_group, topk_group, renormalize, scale):
    """DeepSeek-V3 Gate: sigmoid, bias for selection only, group score = sum of the group's top-2
    biased scores, unselected groups masked with -inf, weights from the unbiased scores."""
    T, E = logits.shape
    s = torch.sigmoid(logits.double())
    choice = s + bias.double()
    g = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
    gidx = g.topk(topk_group, dim=-1).indices
    gmask = torch.zeros_like(g).scatter(1, gidx, 1.0)
    emask = gmask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(emask == 0, float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, ids


def ref_expert_choice(probs, C, slots, mask=None):
    """Loop version: expert e takes the C real tokens with the highest probability for it; each
    token keeps its `slots` best-scoring experts among those that chose it."""
    T, E = probs.shape
    chosen = [[False] * E for _ in range(T)]
    for e in range(E):
        cand = [t for t in range(T) if mask is None or bool(mask[t])]
        cand.sort(key=lambda t: -float(probs[t, e]))
        for t in cand[:C]:
            chosen[t][e] = True
    ids = torch.full((T, slots), -1, dtype=torch.long)
    w = torch.zeros(T, slots, dtype=torch.float64)
    dropped = 0
    for t in range(T):
        es = [e for e in range(E) if chosen[t][e]]
        es.sort(key=lambda e: -float(probs[t, e]))
        dropped += max(0, len(es) - slots)
        for j, e in enumerate(es[:slots]):
            ids[t, j] = e
            w[t, j] = float(probs[t, e])
    return w, ids, dropped


def ref_capacity(ids, E, C):
    """Loop version of capacity: walk slots in token-major order, count per expert."""
    T, k = ids.shape
    seen = [0] * E
    out = ids.clone()
    pos = torch.full_like(ids, -1)
    dropped = 0
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            if seen[e] < C:
                pos[t, j] = seen[e]
            else:
                out[t, j] = -1
                dropped += 1
            seen[e] += 1
    return out, pos, dropped


def canon(weights, ids):
    """Order each row's slots by expert id (empty slots last) so slot order does not matter."""
    key = torch.where(ids < 0, torch.full_like(ids, 1 << 30), ids.long())
    order = key.argsort(dim=-1)
    return weights.double().gather(1, order), ids.long().gather(1, order)


def assert_same_routing(weights, ids, ref_w, ref_ids, atol=1e-5):
    w, i = canon(weights, ids)
    rw, ri = canon(ref_w, ref_ids)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, atol=atol, rtol=1e-5)


def make(strategy="topk", d=16, E=8, k=2, **kw):
    return Supervisor(d, E, k, strategy=strategy, **kw)


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.37])
def test_topk_matches_mixtral_softmax_then_topk(seed, renormalize, temperature):
    T, d, E, k = 23, 12, 7, 3
    sup = make("topk", d, E, k, renormalize=renormalize, temperature=temperature)
    x = torch.randn(T, d)
    dec = sup(x)
    logits = x.double() @ sup.gate.weight.double().t() / temperature
    torch.testing.assert_close(dec.logits.double(), logits, atol=1e-5, rtol=1e-5)
    rw, ri = ref_softmax_topk(logits, k, renormalize)
    assert_same_routing(dec.weights, dec.ids, rw, ri)
    assert dec.ids.dtype == torch.int32 and dec.weights.dtype == torch.float32
    assert dec.counts.tolist() == [int((ri == e).sum()) for e in range(E)]
    assert sup.slots_per_token == k


def test_topk_then_softmax_matches_softmax_over_selected_logits(seed):
    T, d, E, k = 19, 8, 6, 2
    sup = make("topk_then_softmax", d, E, k, temperature=2.0)
    x = torch.randn(T, d)
    dec = sup(x)
    rw, ri = ref_topk_then_softmax(x.double() @ sup.gate.weight.double().t() / 2.0, k)
    assert_same_routing(dec.weights, dec.ids, rw, ri)


def test_switch_routes_top1_with_probability_as_weight(seed):
    T, d, E = 21, 8, 5
    sup = make("switch", d, E, 1)
    x = torch.randn(T, d)
    dec = sup(x)
    p = torch.softmax(x.double() @ sup.gate.weight.double().t(), -1)
    w, i = p.max(-1)
    assert dec.ids.shape == (T, 1)
    assert torch.equal(dec.ids[:, 0].long(), i)
    torch.testing.assert_close(dec.weights[:, 0].double(), w, atol=1e-6, rtol=1e-5)


def test_switch_with_capacity_drops_overflow_in_token_order(seed):
    T, d, E = 16, 4, 4
    sup = make("switch", d, E, 1, capacity_factor=1.0)
    x = torch.randn(T, d)
    # Steer every token to expert 2 so capacity (ceil(16/4) = 4) overflows.
    with torch.no_grad():
        sup.gate.weight.zero_()
        sup.gate.weight[2] = 1.0
    x = x.abs() + 0.1
    dec = sup(x)
    assert dec.ids[:4, 0].tolist() == [2, 2, 2, 2]
    assert dec.ids[4:, 0].tolist() == [-1] * 12
    assert (dec.weights[4:] == 0).all()
    assert int(dec.stats["dropped"]) == 12
    assert dec.counts.tolist() == [0, 0, 4, 0]


def test_noisy_topk_without_training_is_the_clean_topk_then_softmax(seed):
    T, d, E, k = 17, 8, 6, 2
    sup = make("noisy_topk", d, E, k).eval()
    with torch.no_grad():
        sup.noise_gate.weight.normal_()
    x = torch.randn(T, d)
    dec = sup(x)
    rw, ri = ref_topk_then_softmax(x.double() @ sup.gate.weight.double().t(), k)
    assert_same_routing(dec.weights, dec.ids, rw, ri)
    assert int(sup.noise_step) == 0


def test_noisy_topk_training_adds_seeded_noise_times_learned_std(seed):
    T, d, E, k = 31, 8, 6, 2
    sup = make("noisy_topk", d, E, k, seed=seed % 1000, noise_eps=0.05).train()
    with torch.no_grad():
        sup.noise_gate.weight.normal_()
    x = torch.randn(T, d)
    step = sup.noise_step.clone()
    dec = sup(x)
    clean = x.double() @ sup.gate.weight.double().t()
    std = F.softplus(x.double() @ sup.noise_gate.weight.double().t()) + 0.05
    noise = counter_normal(seed % 1000, step, (T, E), 1).double()
    rw, ri = ref_topk_then_softmax(clean + noise * std, k)
    assert_same_routing(dec.weights, dec.ids, rw, ri, atol=1e-4)
    # The losses read the clean logits.
    torch.testing.assert_close(dec.logits.double(), clean, atol=1e-5, rtol=1e-5)
    assert int(sup.noise_step) == int(step) + 1


def test_noisy_topk_is_reproducible_from_seed_and_step(seed):
    T, d, E, k = 40, 8, 8, 2
    a = make("noisy_topk", d, E, k, seed=7).train()
    b = make("noisy_topk", d, E, k, seed=7).train()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.noise_gate.weight.fill_(1.0)
        b.noise_gate.weight.fill_(1.0)
    x = torch.randn(T, d)
    d1, d2 = a(x), b(x)
    assert torch.equal(d1.ids, d2.ids) and torch.equal(d1.weights, d2.weights)
    # The next step draws different noise.
    d3 = a(x)
    assert not torch.equal(d1.weights, d3.weights)
    c = make("noisy_topk", d, E, k, seed=8).train()
    c.load_state_dict(b.state_dict())
    with torch.no_grad():
        c.noise_gate.weight.fill_(1.0)
    c.noise_step.zero_()
    assert not torch.equal(c(x).weights, d1.weights)


def test_counter_noise_is_uniform_and_normal_in_distribution(seed):
    step = torch.tensor(seed % 10_000)
    u = counter_uniform(123, step, (512, 64))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    # Rows and columns are not copies of each other.
    assert float(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1]).__abs__() < 0.5
    n = counter_normal(123, step, (512, 64))
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1) < 0.02
    assert torch.equal(counter_uniform(123, step, (4, 4)), counter_uniform(123, step, (4, 4)))
    assert not torch.equal(counter_uniform(123, step, (4, 4)), counter_uniform(124, step, (4, 4)))


def test_jitter_scales_router_input_only_in_training(seed):
    T, d, E = 9, 8, 4
    sup = make("topk", d, E, 2, jitter_eps=0.1, seed=3)
    x = torch.randn(T, d)
    sup.eval()
    clean = sup(x).logits
    sup.train()
    u = counter_uniform(3, sup.noise_step.clone(), (T, d), 0)
    jit = sup(x).logits
    expect = (x * (1 + 0.1 * (2 * u - 1))) @ sup.gate.weight.t()
    torch.testing.assert_close(jit, expect, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(jit, clean)


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_sigmoid_matches_deepseek_v3_gate(seed, renormalize):
    T, d, E, k, G, TG = 29, 16, 16, 4, 4, 2
    sup = make("grouped_sigmoid", d, E, k, n_group=G, topk_group=TG,
               renormalize=renormalize, routed_scaling_factor=2.5)  # fmt: skip
    with torch.no_grad():
        sup.selection_bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(T, d)
    dec = sup(x)
    logits = x.double() @ sup.gate.weight.double().t()
    rw, ri = ref_deepseek_v3(logits, sup.selection_bias, k, G, TG, renormalize, 2.5)
    assert_same_routing(dec.weights, dec.ids, rw, ri)


def test_grouped_sigmoid_masks_unselected_groups_with_minus_inf():
    # Biased scores are negative everywhere: masking unselected groups with 0.0 (as some ports do)
    # would select experts 2 and 3 of the losing group; DeepSeek-V3's -inf keeps group 0.
    sup = make("grouped_sigmoid", 4, 4, 2, n_group=2, topk_group=1, renormalize=False)
    s = torch.tensor([0.5, 0.4, 0.6, 0.6])
    with torch.no_grad():
        sup.gate.weight.copy_(torch.diag(torch.log(s / (1 - s))))
        sup.selection_bias.copy_(torch.tensor([-1.0, -1.0, -1.5, -1.5]))
    dec = sup(torch.eye(4)[:1] * 1.0 + torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    assert sorted(dec.ids[0].tolist()) == [0, 1]
    # Weights come from the unbiased sigmoid scores.
    torch.testing.assert_close(dec.weights[0].sort().values, torch.tensor([0.4, 0.5]))


@pytest.mark.parametrize("with_mask", [False, True])
def test_expert_choice_matches_reference(seed, with_mask):
    T, d, E, k = 26, 8, 6, 2
    sup = make("expert_choice", d, E, k, capacity_factor=1.5, expert_choice_slots=3)
    x = torch.randn(T, d)
    mask = None
    if with_mask:
        mask = torch.rand(T) > 0.3
    dec = sup(x, mask)
    probs = torch.softmax(x.double() @ sup.gate.weight.detach().double().t(), -1)
    C = math.ceil(1.5 * T * k / E)
    rw, ri, rdrop = ref_expert_choice(probs, C, 3, mask)
    assert_same_routing(dec.weights, dec.ids, rw, ri)
    assert int(dec.stats["dropped"]) == rdrop
    assert dec.ids.shape == (T, 3) and sup.slots_per_token == 3
    if mask is not None:
        assert (dec.ids[~mask] == -1).all()


def test_expert_choice_every_expert_takes_exactly_capacity_tokens(seed):
    T, d, E, k = 40, 8, 8, 2
    sup = make("expert_choice", d, E, k, expert_choice_slots=E)
    dec = sup(torch.randn(T, d))
    C = expert_capacity(T, k, E, 1.0)
    assert C == 10
    assert dec.counts.tolist() == [C] * E
    assert int(dec.stats["dropped"]) == 0


def test_expert_choice_is_refused_for_causal_models():
    with pytest.raises(ValueError, match="expert_choice.*causal"):
        make("expert_choice", causal=True)
    make("topk", causal=True)  # causal token-choice strategies are fine


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_attention_logits_are_similarities_to_expert_embeddings(seed, score):
    T, d, E, k, a = 15, 12, 6, 2, 5
    sup = make("attention", d, E, k, attention_score=score, attention_dim=a, temperature=0.1)
    x = torch.randn(T, d)
    dec = sup(x)
    q = x.double() @ sup.query.weight.double().t()
    e = sup.expert_embeddings.double()
    if score == "cosine":
        sim = torch.stack(
            [
                torch.stack([(q[t] @ e[i]) / (q[t].norm() * e[i].norm()) for i in range(E)])
                for t in range(T)
            ]  # fmt: skip
        )
    else:
        sim = q @ e.t() / math.sqrt(a)
    torch.testing.assert_close(dec.logits.double(), sim / 0.1, atol=1e-4, rtol=1e-4)
    rw, ri = ref_softmax_topk(sim / 0.1, k, True)
    assert_same_routing(dec.weights, dec.ids, rw, ri)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_are_differentiable_for_every_strategy(seed, strategy):
    k = 1 if strategy == "switch" else 2
    kw = {"n_group": 2, "topk_group": 1} if strategy == "grouped_sigmoid" else {}
    sup = make(strategy, 8, 6, k, **kw).train()
    x = torch.randn(13, 8)
    dec = sup(x)
    (dec.weights * torch.randn_like(dec.weights)).sum().backward()
    grads = [p.grad for p in sup.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("strategy", ["topk", "grouped_sigmoid", "attention", "switch"])
def test_mask_gives_padding_empty_slots_and_no_counts(seed, strategy):
    k = 1 if strategy == "switch" else 2
    sup = make(strategy, 8, 4, k)
    x = torch.randn(10, 8)
    mask = torch.tensor([True, False] * 5)
    dec = sup(x, mask)
    assert (dec.ids[~mask] == -1).all() and (dec.weights[~mask] == 0).all()
    assert (dec.ids[mask] >= 0).all()
    assert dec.counts.tolist() == [int((dec.ids == e).sum()) for e in range(4)]
    assert int(dec.counts.sum()) == 5 * k


# ------------------------------------------------------------------------------------------------
# Capacity
# ------------------------------------------------------------------------------------------------


def test_capacity_hand_checked_positions_and_drops():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]], dtype=torch.int32)
    w = torch.full((4, 2), 0.5)
    res = apply_capacity(w, ids, num_experts=3, capacity=2)
    # Token-major walk: e0 gets t0, t1 (t2, t3 overflow); e1 gets t0, t2 (t3 overflows); e2 gets t1.
    assert res.ids.tolist() == [[0, 1], [0, 2], [-1, 1], [-1, -1]]
    assert res.position.tolist() == [[0, 0], [1, 0], [-1, 1], [-1, -1]]
    assert res.weights.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.5], [0.0, 0.0]]
    assert int(res.dropped) == 3
    # The dispatch mask [T, E, C] these positions describe.
    dispatch = torch.zeros(4, 3, 2, dtype=torch.int64)
    for t in range(4):
        for j in range(2):
            if res.ids[t, j] >= 0:
                dispatch[t, res.ids[t, j], res.position[t, j]] = 1
    expect = torch.zeros(4, 3, 2, dtype=torch.int64)
    expect[0, 0, 0] = expect[1, 0, 1] = expect[0, 1, 0] = expect[2, 1, 1] = expect[1, 2, 0] = 1
    assert torch.equal(dispatch, expect)


def test_capacity_keeps_already_empty_slots_and_does_not_count_them():
    ids = torch.tensor([[-1, 1], [1, -1], [1, 0]])
    res = apply_capacity(torch.ones(3, 2), ids, 2, 1)
    assert res.ids.tolist() == [[-1, 1], [-1, -1], [-1, 0]]
    assert int(res.dropped) == 2


def test_capacity_matches_loop_reference(seed):
    T, k, E = 37, 3, 5
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[torch.rand(T, k) < 0.1] = -1
    C = expert_capacity(T, k, E, 0.8)
    res = apply_capacity(torch.rand(T, k), ids, E, C)
    rids, rpos, rdrop = ref_capacity(ids, E, C)
    assert torch.equal(res.ids.long(), rids)
    assert torch.equal(res.position, rpos)
    assert int(res.dropped) == rdrop


def test_expert_capacity_formula():
    assert expert_capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(64, 2, 8, 1.0) == 16
    assert expert_capacity(3, 2, 2, 10.0) == 3  # never more than T
    assert expert_capacity(0, 2, 4, 1.0) == 0


def test_supervisor_capacity_counts_drops_and_caps_every_expert(seed):
    T, d, E, k = 50, 8, 4, 2
    sup = make("topk", d, E, k, capacity_factor=0.75)
    x = torch.randn(T, d) + 1.5  # skewed so some experts overflow
    dec = sup(x)
    C = expert_capacity(T, k, E, 0.75)
    _, ri = ref_softmax_topk(dec.logits.double(), k, True)
    want = [int((ri == e).sum()) for e in range(E)]
    assert dec.counts.tolist() == [min(c, C) for c in want]
    assert int(dec.stats["dropped"]) == sum(max(0, c - C) for c in want)
    assert int(dec.stats["dropped"]) > 0
    assert ((dec.ids == -1) == (dec.weights == 0)).all()


def test_dropless_is_the_default(seed):
    sup = make("topk", 8, 4, 2)
    dec = sup(torch.randn(30, 8) + 2.0)
    assert (dec.ids >= 0).all() and int(dec.stats["dropped"]) == 0


# ------------------------------------------------------------------------------------------------
# Balancing losses
# ------------------------------------------------------------------------------------------------


def _hf_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balance_loss_matches_transformers(seed, k):
    hf = _hf_load_balancing_loss()
    B, S, d, E = 3, 7, 8, 6
    sup = make("topk", d, E, k, load_balance_coef=0.01)
    x = torch.randn(B * S, d)
    dec = sup(x)
    ref = hf((dec.logits,), E, k)
    torch.testing.assert_close(dec.stats["load_loss"], ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.aux_loss, 0.01 * ref.float(), atol=1e-7, rtol=1e-5)


def test_load_balance_loss_with_padding_mask_matches_transformers(seed):
    hf = _hf_load_balancing_loss()
    B, S, d, E, k = 4, 6, 8, 5, 2
    sup = make("topk", d, E, k, load_balance_coef=1.0)
    attn = (torch.rand(B, S) > 0.3).long()
    attn[:, 0] = 1
    dec = sup(torch.randn(B * S, d), attn.reshape(-1).bool())
    ref = hf((dec.logits,), E, k, attention_mask=attn)
    torch.testing.assert_close(dec.stats["load_loss"], ref.float(), atol=1e-5, rtol=1e-5)


def test_load_balance_loss_formula_per_sequence_with_mask(seed):
    B, S, E, k = 3, 5, 4, 2
    logits = torch.randn(B * S, E)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(k, -1).indices
    mask = torch.rand(B * S) > 0.3
    mask[S : 2 * S] = False  # an all-padding sequence is left out of the average
    got = load_balancing_loss(probs, ids, mask, seq_len=S)
    losses = []
    for b in range(B):
        toks = [t for t in range(b * S, (b + 1) * S) if mask[t]]
        if not toks:
            continue
        f = [sum(int(e in ids[t].tolist()) for t in toks) / len(toks) for e in range(E)]
        P = [sum(float(probs[t, e]) for t in toks) / len(toks) for e in range(E)]
        losses.append(E * sum(fi * pi for fi, pi in zip(f, P)))
    assert float(got) == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_sequence_scope_needs_seq_len_and_uses_it(seed):
    sup = make("topk", 8, 4, 2, load_balance_coef=1.0, load_balance_scope="sequence")
    x = torch.randn(12, 8)
    with pytest.raises(ValueError, match="seq_len"):
        sup(x)
    dec = sup(x, seq_len=4)
    probs = torch.softmax(dec.logits, -1)
    expect = load_balancing_loss(probs, dec.ids, None, seq_len=4)
    torch.testing.assert_close(dec.aux_loss, expect)


def test_load_balance_loss_is_k_for_perfectly_balanced_uniform_router():
    E, k = 4, 2
    probs = torch.full((8, E), 1 / E)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert float(load_balancing_loss(probs, ids)) == pytest.approx(k)


def test_z_loss_matches_formula_and_is_in_aux_loss(seed):
    T, d, E = 11, 8, 5
    sup = make("topk", d, E, 2, z_loss_coef=0.1, load_balance_coef=0.0)
    x = torch.randn(T, d) * 3
    mask = torch.rand(T) > 0.3
    mask[0] = True
    dec = sup(x, mask)
    lg = dec.logits.detach().double()
    z = [math.log(sum(math.exp(float(v)) for v in lg[t])) ** 2 for t in range(T) if mask[t]]
    assert float(dec.stats["z_loss"]) == pytest.approx(sum(z) / len(z), rel=1e-5)
    torch.testing.assert_close(dec.aux_loss, 0.1 * dec.stats["z_loss"])
    assert float(router_z_loss(dec.logits.detach())) > 0
    dec.aux_loss.backward()
    assert sup.gate.weight.grad.abs().sum() > 0


def test_no_balancing_means_zero_aux_loss_and_no_loss_stats(seed):
    dec = make("topk")(torch.randn(5, 16))
    assert float(dec.aux_loss) == 0 and "load_loss" not in dec.stats and "z_loss" not in dec.stats


def test_grouped_sigmoid_aux_loss_reads_normalised_scores(seed):
    sup = make("grouped_sigmoid", 8, 8, 2, n_group=2, topk_group=1, load_balance_coef=1.0)
    dec = sup(torch.randn(9, 8))
    s = torch.sigmoid(dec.logits)
    expect = load_balancing_loss(s / s.sum(-1, keepdim=True), dec.ids)
    torch.testing.assert_close(dec.stats["load_loss"], expect)


# ------------------------------------------------------------------------------------------------
# Aux-loss-free balancing
# ------------------------------------------------------------------------------------------------


def test_update_bias_applies_sign_rule():
    sup = make("topk", 8, 4, 2, bias_update_rate=0.01)
    sup.update_bias(torch.tensor([10, 2, 4, 4], dtype=torch.int32))  # mean 5
    torch.testing.assert_close(sup.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    sup.update_bias(torch.tensor([5, 5, 5, 5]))
    torch.testing.assert_close(sup.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert "selection_bias" in sup.state_dict()


def test_update_bias_from_accumulated_training_loads(seed):
    sup = make("topk", 8, 4, 2, bias_update_rate=0.5).train()
    x = torch.randn(20, 8)
    d1, d2 = sup(x), sup(x)
    total = d1.counts.long() + d2.counts.long()
    assert torch.equal(sup.load_accumulator, total)
    sup.update_bias()
    load = total.float()
    torch.testing.assert_close(sup.selection_bias, 0.5 * torch.sign(load.mean() - load))
    assert int(sup.load_accumulator.sum()) == 0
    sup.eval()
    sup(x)
    assert int(sup.load_accumulator.sum()) == 0  # eval forwards do not count


def test_selection_bias_changes_selection_not_weights(seed):
    T, d, E, k = 12, 8, 4, 2
    sup = make("topk", d, E, k, bias_update_rate=0.1, renormalize=False)
    x = torch.randn(T, d)
    with torch.no_grad():
        sup.selection_bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    dec = sup(x)
    assert (dec.ids == 0).any(-1).all()  # expert 0 always selected
    p = torch.softmax(dec.logits, -1)
    torch.testing.assert_close(dec.weights, p.gather(1, dec.ids.long()))


def _cv(counts):
    c = counts.double()
    return float(c.std(unbiased=False) / c.mean())


@pytest.mark.parametrize("auto", [False, True])
def test_bias_update_reduces_load_cv_on_skewed_stream(seed, auto):
    T, d, E, k, steps = 256, 16, 8, 2, 150
    base = make("topk", d, E, k)
    w0 = base.gate.weight[0].detach()
    skew = w0 / w0.norm() ** 2 * 2.5  # every token's expert-0 logit is raised by 2.5

    def run(rate):
        sup = make("topk", d, E, k, bias_update_rate=rate, auto_update_bias=auto).train()
        sup.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(seed)  # the same input stream for both runs
        cvs = []
        for _ in range(steps):
            x = torch.randn(T, d, generator=gen) + skew
            with torch.no_grad():
                dec = sup(x)
            if rate > 0 and not auto:
                sup.update_bias()
            cvs.append(_cv(dec.counts))
        return cvs

    on, off = run(1e-2), run(0.0)
    print(f"cv with update {on[:3]} ... {on[-3:]}; without {off[:3]} ... {off[-3:]}")
    assert on[0] == off[0]  # same stream, same start
    skewed = sum(off) / steps
    assert skewed > 0.5  # the stream really is skewed, and stays so without the update
    assert sum(off[-10:]) / 10 > 0.8 * sum(off[:10]) / 10
    assert sum(on[-10:]) / 10 < 0.4 * skewed


# ------------------------------------------------------------------------------------------------
# No host sync: torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_compiles_fullgraph_in_training_with_capacity_and_stats(seed, strategy):
    k = 1 if strategy == "switch" else 2
    kw = {"n_group": 2, "topk_group": 1} if strategy == "grouped_sigmoid" else {}
    if strategy not in ("expert_choice",):
        kw["bias_update_rate"] = 1e-3
    sup = make(strategy, 8, 4, k, capacity_factor=1.0, load_balance_coef=0.01,
               z_loss_coef=1e-3, track_stats=True, **kw).train()  # fmt: skip
    ref = make(strategy, 8, 4, k, capacity_factor=1.0, load_balance_coef=0.01,
               z_loss_coef=1e-3, track_stats=True, **kw).train()  # fmt: skip
    ref.load_state_dict(sup.state_dict())
    x = torch.randn(14, 8)
    mask = torch.rand(14) > 0.2
    torch._dynamo.reset()
    compiled = torch.compile(sup, fullgraph=True, backend="aot_eager")
    got = compiled(x, mask)
    want = ref(x, mask)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    assert int(got.stats["dropped"]) == int(want.stats["dropped"])
    assert sup.routing_stats()["tokens_per_expert"] == ref.routing_stats()["tokens_per_expert"]
    got.aux_loss.backward()


def test_capacity_routing_compiles_with_inductor(seed):
    sup = make("topk", 8, 4, 2, capacity_factor=1.0, load_balance_coef=0.01, track_stats=True)
    x = torch.randn(16, 8)
    want = sup(x)
    torch._dynamo.reset()
    got = torch.compile(sup, fullgraph=True)(x)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights)
    assert int(got.stats["dropped"]) == int(want.stats["dropped"])


# ------------------------------------------------------------------------------------------------
# Bad configuration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"strategy": "nope"}, "strategy"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"k": 9}, "k"),
        ({"k": 0}, "k"),
        ({"strategy": "switch", "k": 2}, "k"),
        ({"strategy": "grouped_sigmoid", "n_group": 3}, "n_group"),
        ({"strategy": "grouped_sigmoid", "n_group": 4, "topk_group": 5}, "topk_group"),
        ({"strategy": "grouped_sigmoid", "n_group": 4, "topk_group": 0}, "topk_group"),
        ({"n_group": 4, "topk_group": 1, "k": 3}, "k"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"load_balance_coef": -1.0}, "load_balance_coef"),
        ({"z_loss_coef": float("nan")}, "z_loss_coef"),
        ({"bias_update_rate": -0.1}, "bias_update_rate"),
        ({"load_balance_scope": "token"}, "load_balance_scope"),
        ({"jitter_eps": 1.0}, "jitter_eps"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"strategy": "attention", "attention_score": "l2"}, "attention_score"),
        ({"strategy": "expert_choice", "expert_choice_slots": 9}, "expert_choice_slots"),
        ({"strategy": "expert_choice", "bias_update_rate": 0.1}, "bias_update_rate"),
        ({"strategy": "expert_choice", "causal": True}, "causal"),
        ({"expert_choice_slots": 2}, "expert_choice_slots"),
        ({"attention_dim": 4}, "attention_dim"),
        ({"strategy": "attention", "attention_dim": 0}, "attention_dim"),
        # bool is an int in Python and a str is truthy: each is refused, naming the argument
        ({"k": True}, "k must be an int"),
        ({"renormalize": "yes"}, "renormalize must be a bool"),
        ({"renormalize": 0}, "renormalize must be a bool"),
        ({"auto_update_bias": "no"}, "auto_update_bias must be a bool"),
        ({"causal": 1}, "causal must be a bool"),
        ({"track_stats": "True"}, "track_stats must be a bool"),
        ({"n_group": True}, "n_group must be an int"),
        ({"strategy": "grouped_sigmoid", "n_group": 2, "topk_group": True}, "topk_group"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"temperature": True}, "temperature must be a float"),
        ({"temperature": "1.0"}, "temperature must be a float"),
        ({"load_balance_coef": True}, "load_balance_coef must be a float"),
        ({"z_loss_coef": "0.1"}, "z_loss_coef must be a float"),
        ({"capacity_factor": True}, "capacity_factor"),
        ({"capacity_factor": "1.25"}, "capacity_factor"),
        ({"jitter_eps": "0.1"}, "jitter_eps must be a float"),
        ({"strategy": ["topk"]}, "strategy must be one of"),
        ({"strategy": "expert_choice", "expert_choice_slots": True}, "expert_choice_slots"),
        ({"strategy": "attention", "attention_dim": True}, "attention_dim"),
    ],
)
def test_bad_config_raises_value_error_naming_the_argument(kwargs, arg):
    kw = dict(kwargs)
    k = kw.pop("k", 2)
    with pytest.raises(ValueError, match=arg):
        Supervisor(16, 8, k, **kw)


@pytest.mark.parametrize("d_model, num_experts", [(True, 8), (16, True)])
def test_bool_sizes_are_refused_not_read_as_one(d_model, num_experts):
    with pytest.raises(ValueError, match="must be an int"):
        Supervisor(d_model, num_experts, 1)


def test_numpy_integer_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    sup = Supervisor(np.int64(8), np.int32(4), np.int64(2), temperature=np.float32(0.5))
    assert (sup.d_model, sup.num_experts, sup.k) == (8, 4, 2)


def test_routing_stats_never_tracked_is_an_error_not_all_experts_dead():
    sup = make("topk", 8, 4, 2)
    sup(torch.randn(5, 8))
    with pytest.raises(RuntimeError, match="not tracked.*track_stats=True"):
        sup.routing_stats()


def test_routing_stats_tracked_before_any_forward_reports_zero_steps():
    stats = make("topk", 8, 4, 2, track_stats=True).routing_stats()
    assert stats["steps"] == 0 and stats["tokens"] == 0


def test_bad_input_shapes_raise_value_error():
    sup = make("topk", 8, 4, 2)
    with pytest.raises(ValueError, match="x must be"):
        sup(torch.randn(3, 7))
    with pytest.raises(ValueError, match="mask"):
        sup(torch.randn(3, 8), torch.ones(4, dtype=torch.bool))


def test_zero_tokens_route_to_empty_decision():
    for strategy in ("topk", "expert_choice"):
        sup = make(strategy, 8, 4, 2, capacity_factor=1.0, track_stats=True)
        dec = sup(torch.randn(0, 8))
        assert dec.ids.shape == (0, sup.slots_per_token)
        assert dec.counts.tolist() == [0] * 4


def test_docs_routing_example_runs(capsys):
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "routing.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    exec(compile(code, str(doc), "exec"), {})
    assert "torch.Size([64, 2])" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_routing_matches_cpu(seed, strategy):
    k = 1 if strategy == "switch" else 2
    kw = {"n_group": 2, "topk_group": 1} if strategy == "grouped_sigmoid" else {}
    cpu = make(strategy, 16, 8, k, capacity_factor=1.0, load_balance_coef=0.01, z_loss_coef=1e-3,
               track_stats=True, **kw).train()  # fmt: skip
    gpu = make(strategy, 16, 8, k, capacity_factor=1.0, load_balance_coef=0.01, z_loss_coef=1e-3,
               track_stats=True, **kw).train()  # fmt: skip
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(37, 16)
    a, b = cpu(x), gpu(x.cuda())
    assert_same_routing(b.weights.cpu(), b.ids.cpu(), a.weights, a.ids, atol=1e-4)
    assert torch.equal(a.counts, b.counts.cpu())
    torch.testing.assert_close(a.aux_loss, b.aux_loss.cpu(), atol=1e-5, rtol=1e-4)
    assert int(a.stats["dropped"]) == int(b.stats["dropped"])
    assert cpu.routing_stats()["tokens_per_expert"] == gpu.routing_stats()["tokens_per_expert"]


@pytest.mark.cuda
def test_cuda_graph_capture_replays_routing_with_capacity_stats_and_bias(seed):
    sup = make("topk", 16, 8, 2, capacity_factor=1.0, load_balance_coef=0.01,
               bias_update_rate=1e-3, auto_update_bias=True, track_stats=True).cuda().train()  # fmt: skip
    static_x = torch.randn(64, 16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            sup(static_x)
    torch.cuda.current_stream().wait_stream(s)
    sup.reset_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = sup(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn(64, 16, device="cuda"))
        bias_before = sup.selection_bias.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref = make("topk", 16, 8, 2, capacity_factor=1.0).cuda()
        ref.gate.weight.data.copy_(sup.gate.weight.data)
        ref.selection_bias.copy_(bias_before)
        ref.bias_update_rate = 1e-3  # selection uses the bias, no update
        want = ref.eval()(static_x)
        assert torch.equal(out.ids, want.ids)
        assert int(out.stats["dropped"]) == int(want.stats["dropped"])
    assert sup.routing_stats()["steps"] == 3  # capture itself records nothing; 3 replays do


def test_bf16_module_keeps_fp32_bias_and_fp64_telemetry(seed):
    sup = make("topk", 8, 4, 2, bias_update_rate=1e-3, track_stats=True).to(torch.bfloat16)
    assert sup.gate.weight.dtype == torch.bfloat16
    assert sup.selection_bias.dtype == torch.float32
    assert sup.stats.entropy_sum.dtype == torch.float64
    with torch.no_grad():
        sup.selection_bias.fill_(0.5)
    for _ in range(5):
        sup.update_bias(torch.tensor([9, 1, 1, 1]))
    # In bf16, 0.5 + 0.001 rounds back to 0.5; in fp32 the five updates add up.
    torch.testing.assert_close(sup.selection_bias[1], torch.tensor(0.505))
    dec = sup.train()(torch.randn(6, 8, dtype=torch.bfloat16))
    assert dec.weights.dtype == torch.float32 and dec.logits.dtype == torch.float32
    assert sup.routing_stats()["tokens"] == 6


@pytest.mark.parametrize("seq_len", [None, 4])
def test_balancing_losses_gradcheck_float64(seed, seq_len):
    T, E, k = 8, 5, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    mask = torch.rand(T) > 0.25
    mask[0] = True

    def lb(lg):
        return load_balancing_loss(torch.softmax(lg, -1), ids, mask, seq_len)

    assert lb(logits).dtype == torch.float64
    torch.autograd.gradcheck(lb, (logits,))
    torch.autograd.gradcheck(lambda lg: router_z_loss(lg, mask), (logits,))


def test_track_stats_in_eval_matches_direct_computation(seed):
    T, d, E, k = 21, 8, 5, 2
    sup = make("topk", d, E, k, capacity_factor=0.8, track_stats=True).eval()
    xs = [torch.randn(T, d) for _ in range(3)]
    decs = [sup(x) for x in xs]
    out = sup.routing_stats()
    assert out["steps"] == 3 and out["tokens"] == 3 * T
    ids = torch.cat([dd.ids for dd in decs]).long()
    assert out["tokens_per_expert"] == [int((ids == e).sum()) for e in range(E)]
    assert out["dropped"] == sum(int(dd.stats["dropped"]) for dd in decs)
    p = torch.softmax(torch.cat([dd.logits.detach() for dd in decs]).double(), -1)
    assert out["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    lb = [float(dd.stats["load_loss"]) for dd in decs]
    assert out["load_loss"] == pytest.approx(sum(lb) / 3, rel=1e-6)
    sup.reset_stats()
    assert sup.routing_stats()["steps"] == 0


def test_resumed_noisy_router_draws_the_same_noise(seed):
    d, E, k = 8, 6, 2
    a = make("noisy_topk", d, E, k, seed=11).train()
    with torch.no_grad():
        a.noise_gate.weight.normal_()
    x = torch.randn(30, d)
    for _ in range(3):
        a(x)
    b = make("noisy_topk", d, E, k, seed=11).train()
    b.load_state_dict(a.state_dict())
    assert int(b.noise_step) == 3
    da, db = a(x), b(x)
    assert torch.equal(da.ids, db.ids) and torch.equal(da.weights, db.weights)


@pytest.mark.parametrize("strategy", ["topk", "expert_choice"])
def test_compiles_with_dynamic_token_count(seed, strategy):
    kw = {} if strategy == "expert_choice" else {"bias_update_rate": 1e-3}
    sup = make(strategy, 8, 4, 2, capacity_factor=1.0, load_balance_coef=0.01,
               z_loss_coef=0.1, track_stats=True, **kw).eval()  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(sup, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (16, 23, 40):
        x = torch.randn(T, 8)
        got, want = compiled(x), sup(x)
        assert torch.equal(got.ids, want.ids)
        assert int(got.stats["dropped"]) == int(want.stats["dropped"])
        torch.testing.assert_close(got.aux_loss, want.aux_loss)


def test_topk_matches_transformers_mixtral_router(seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    d, E, k = 16, 8, 2
    cfg = MixtralConfig(hidden_size=d, num_local_experts=E, num_experts_per_tok=k)
    hf = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(hf.weight)
    sup = make("topk", d, E, k)
    sup.gate.weight.data.copy_(hf.weight.data)
    x = torch.randn(25, d)
    with torch.no_grad():
        logits, w, ids = hf(x)
        dec = sup(x)
    torch.testing.assert_close(dec.logits, logits.float())
    assert_same_routing(dec.weights, dec.ids, w, ids)


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_sigmoid_matches_transformers_deepseek_v3_router(seed, norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    d, E, k, G, TG = 16, 16, 4, 4, 2
    cfg = DeepseekV3Config(hidden_size=d, n_routed_experts=E, num_experts_per_tok=k, n_group=G,
                           topk_group=TG, norm_topk_prob=norm, routed_scaling_factor=2.5)  # fmt: skip
    hf = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.copy_(torch.randn(E) * 0.2)
    sup = make("grouped_sigmoid", d, E, k, n_group=G, topk_group=TG, renormalize=norm,
               routed_scaling_factor=2.5)  # fmt: skip
    sup.gate.weight.data.copy_(hf.weight.data)
    sup.selection_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(33, d)
    with torch.no_grad():
        logits, w, ids = hf(x)
        dec = sup(x)
    torch.testing.assert_close(dec.logits, logits)
    assert_same_routing(dec.weights, dec.ids, w, ids)


def test_auto_bias_update_compiles_and_matches_eager(seed):
    sup = make("topk", 8, 4, 2, bias_update_rate=1e-2, auto_update_bias=True).train()
    ref = make("topk", 8, 4, 2, bias_update_rate=1e-2, auto_update_bias=True).train()
    ref.load_state_dict(sup.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(sup, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(20, 8) + 1.0
        assert torch.equal(compiled(x).ids, ref(x).ids)
    assert float(sup.selection_bias.abs().sum()) > 0
    torch.testing.assert_close(sup.selection_bias, ref.selection_bias)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_drives_a_moe_layer(seed, strategy):
    from moe_framework.constellation import MoELayer

    k = 1 if strategy == "switch" else 2
    kw = {"n_group": 2, "topk_group": 1} if strategy == "grouped_sigmoid" else {}
    sup = make(strategy, 16, 4, k, capacity_factor=1.0, load_balance_coef=0.01, **kw)
    assert sup.slots_per_token == k  # expert choice defaults to the top-k static shapes
    layer = MoELayer.build(d_model=16, d_hidden=32, num_experts=4, k=k, router=sup).train()
    x = torch.randn(2, 9, 16)
    y, info = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().mean() + info.aux_loss).backward()
