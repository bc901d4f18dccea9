"""Multimodal MoE: ModalityRouter and MultimodalMoELayer against per-token plain-PyTorch
references (restricted and biased routing, per-modality balance losses, shared experts),
per-modality telemetry, errors and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

from moe_framework.multimodal import ModalityRouter, MultimodalMoELayer

D = 8
POOLS, SHARED = [2, 3], 1  # modality 0: experts 0-1, modality 1: experts 2-4, shared: 5


def _allowed(m, mode):
    own = list(range(0, 2)) if m == 0 else list(range(2, 5))
    return own + [5] if mode == "restrict" else list(range(6))


def _bias(m, mode, beta):
    own = range(0, 2) if m == 0 else range(2, 5)
    b = torch.zeros(6, dtype=torch.float64)
    if mode == "bias":
        b[list(own)] = beta
    return b


@pytest.mark.parametrize("mode", ["restrict", "bias"])
def test_modality_router_matches_a_per_token_reference(seed, mode):
    r = ModalityRouter(D, POOLS, SHARED, k=2, mode=mode, modality_bias=1.5, load_balance_coef=0.1)
    T = 29
    x = torch.randn(T, D)
    mod = torch.randint(0, 2, (T,))
    dec = r(x, mod)
    W = r.gate.weight.detach().double()
    probs_all = []
    for t in range(T):
        m = int(mod[t])
        logit = W @ x[t].double() + _bias(m, mode, 1.5)
        cols = _allowed(m, mode)
        p = torch.softmax(logit[cols], 0)
        top = torch.topk(p, 2)
        ref = {cols[int(i)]: float(v / top.values.sum()) for i, v in zip(top.indices, top.values)}
        got = {int(i): float(w) for i, w in zip(dec.ids[t], dec.weights[t].detach())}
        assert got.keys() == ref.keys()
        assert all(abs(got[i] - ref[i]) < 1e-5 for i in ref)
        full = torch.zeros(6, dtype=torch.float64)
        full[cols] = p  # restricted: probability 0 outside the allowed experts
        probs_all.append(full)
    # per-modality Switch loss over its own pool + the shared expert: n * sum_i f_i P_i
    probs = torch.stack(probs_all)
    losses = []
    for m in range(2):
        cols = list(range(0, 2)) + [5] if m == 0 else list(range(2, 6))
        sel = mod == m
        n = int(sel.sum())
        f = torch.tensor([float((dec.ids[sel] == c).sum()) / max(n, 1) for c in cols])
        P = probs[sel][:, cols].sum(0) / max(n, 1)
        losses.append(len(cols) * float((f * P).sum()) if n else 0.0)
    got = dec.stats["modality_load_loss"].tolist()
    assert all(abs(a - b) < 1e-5 for a, b in zip(got, losses)), (got, losses)
    present = [m for m in range(2) if bool((mod == m).any())]
    ref_aux = 0.1 * sum(losses[m] for m in present) / len(present)
    assert abs(float(dec.aux_loss.detach()) - ref_aux) < 1e-5
    assert dec.stats["modality_counts"].sum(0).tolist() == dec.counts.tolist()


def _expert(bank, e, x):
    gate, up = (x @ bank.weight_in[e]).chunk(2, -1)
    return (F.silu(gate) * up) @ bank.w_out[e]


def test_multimodal_layer_matches_reference_with_shared_experts_and_mask(seed):
    layer = MultimodalMoELayer(
        d_model=D,
        d_hidden=6,
        experts_per_modality=POOLS,
        num_shared_routed=SHARED,
        k=2,
        num_shared_experts=1,
    )
    x = torch.randn(3, 7, D)
    mod = torch.randint(0, 2, (3, 7))
    mask = torch.rand(3, 7) > 0.25
    y, info = layer(x, mod, mask)
    x2, m2 = x.reshape(-1, D), mask.reshape(-1)
    ref = layer.shared_experts(x2).detach().clone()
    with torch.no_grad():
        for t in range(x2.shape[0]):
            for j in range(2):
                e = int(info.ids[t, j])
                if e >= 0:
                    ref[t] += info.weights[t, j] * _expert(layer.experts, e, x2[t])
    torch.testing.assert_close(y.detach().reshape(-1, D), ref, **TOLERANCES["layer"][torch.float32])
    assert bool((info.ids[~m2] == -1).all())
    stats = layer.routing_stats()["modalities"]
    # restricted routing: a modality never reaches another modality's pool
    assert all(s["other_pools"] == 0.0 for s in stats)
    real = mod.reshape(-1)[m2]
    assert [sum(s["load"]) for s in stats] == [2 * int((real == m).sum()) for m in range(2)]
    (y.sum() + info.aux_loss).backward()
    assert layer.router.gate.weight.grad is not None


def test_multimodal_errors():
    with pytest.raises(ValueError, match="k=3 exceeds the 2 experts"):
        ModalityRouter(D, [1, 3], 1, k=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        ModalityRouter(D, POOLS, SHARED, mode="mix")
    with pytest.raises(ValueError, match="num_modalities must be an int"):
        ModalityRouter(D, 2, 0)
    layer = MultimodalMoELayer(d_model=D, d_hidden=4, experts_per_modality=2, num_modalities=3)
    assert layer.num_experts == 6
    with pytest.raises(ValueError, match=r"modality_ids must have shape \(5,\)"):
        layer(torch.randn(5, D), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.randn(5, D), torch.zeros(5))
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 3\), got \[3, -1\]"):
        layer(torch.randn(5, D), torch.tensor([0, 3, 1, -1, 2]))


def test_multimodal_layer_compiles_fullgraph(seed):
    layer = MultimodalMoELayer(
        d_model=D, d_hidden=6, experts_per_modality=POOLS, num_shared_routed=SHARED, mode="bias"
    )
    x = torch.randn(17, D)
    mod = torch.randint(0, 2, (17,))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc, ic = compiled(x, mod)
    ye, ie = layer(x, mod)
    torch.testing.assert_close(yc, ye, **TOLERANCES["layer"][torch.float32])
    assert torch.equal(ic.ids, ie.ids)


@pytest.mark.cuda
def test_multimodal_layer_cuda_matches_cpu(seed):
    layer = MultimodalMoELayer(
        d_model=D, d_hidden=6, experts_per_modality=POOLS, num_shared_routed=SHARED, mode="bias"
    )
    x = torch.randn(19, D)
    mod = torch.randint(0, 2, (19,))
    want, _ = layer(x, mod)
    got, info = layer.cuda()(x.cuda(), mod.cuda())
    assert info.ids.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES["layer"][torch.float32])
