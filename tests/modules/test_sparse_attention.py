"""Issue 17 item 5: SparseExpertAttention against a plain-PyTorch reference (a loop over tokens
and their k expert heads with an explicit softmax), gradients, dropped slots,
torch.compile(fullgraph=True) and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe_framework.routing import TopKRouter
from moe_framework.sparse_attention import SparseExpertAttention, attention_flops_per_token


def _reference(m: SparseExpertAttention, x: torch.Tensor, dec) -> torch.Tensor:
    B, S, d = x.shape
    h, k = m.head_dim, m.k
    kv = x @ m.w_kv.weight.t()
    K, V = kv[..., :h], kv[..., h:]
    y = torch.zeros_like(x)
    ids = dec.ids.reshape(B, S, k)
    g = dec.weights.reshape(B, S, k).to(x.dtype)
    for b in range(B):
        for t in range(S):
            n = t + 1 if m.causal else S
            for j in range(k):
                e = int(ids[b, t, j])
                if e < 0:
                    continue
                q = x[b, t] @ m.w_q[e]
                att = torch.softmax(K[b, :n] @ q / math.sqrt(h), dim=0)
                y[b, t] = y[b, t] + g[b, t, j] * ((att @ V[b, :n]) @ m.w_o[e])
    return y


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, S, E, k, h", [(2, 5, 4, 2, 3), (1, 7, 5, 3, 4), (3, 1, 3, 1, 2)])
def test_sparse_expert_attention_matches_the_per_token_reference(seed, causal, B, S, E, k, h):
    d = 6
    m = SparseExpertAttention(d, E, k, head_dim=h, causal=causal).double()
    x = torch.randn(B, S, 2 * d, dtype=torch.float64)[..., ::2].requires_grad_(True)
    y, dec = m(x)
    ref = _reference(m, x, dec)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # gradients of x and of every parameter (the gate weights through the router too)
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *params], retain_graph=True)
    g2 = torch.autograd.grad((ref * torch.cos(ref)).sum(), [x, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dropped_slots_contribute_nothing(seed):
    router = TopKRouter(8, 4, 2, capacity_factor=0.5).double()
    m = SparseExpertAttention(8, 4, 2, head_dim=4, router=router).double()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    y, dec = m(x)
    assert int(dec.stats["dropped"]) > 0
    torch.testing.assert_close(y, _reference(m, x, dec), rtol=1e-10, atol=1e-10)


def test_zero_tokens_and_compile_fullgraph(seed):
    m = SparseExpertAttention(8, 4, 2, head_dim=4)
    y, _ = m(torch.randn(2, 0, 8))
    assert y.shape == (2, 0, 8)
    x = torch.randn(2, 6, 8)
    want, _ = m(x)
    got, _ = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_arguments_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="k must be <= num_experts=2"):
        SparseExpertAttention(8, 2, 3)
    with pytest.raises(ValueError, match="head_dim must be None or an int >= 1"):
        SparseExpertAttention(8, 4, 2, head_dim=0)
    with pytest.raises(ValueError, match="slots_per_token=k=2"):
        SparseExpertAttention(8, 4, 2, router=TopKRouter(8, 4, 1))
    with pytest.raises(ValueError, match=r"x must be \[B, S, d_model=8\]"):
        SparseExpertAttention(8, 4, 2)(torch.randn(3, 8))


def test_flop_count_of_dense_and_sparse_attention():
    # dense: 8 d h H + 4 L h H; sparse: 4 d h k + 4 d h + 2 d E + 4 L h k
    assert attention_flops_per_token(d_model=64, head_dim=16, heads=2, seq_len=7) == (
        8 * 64 * 16 * 2 + 4 * 4 * 16 * 2
    )
    assert attention_flops_per_token(
        d_model=64, head_dim=16, heads=3, seq_len=7, num_experts=8
    ) == (4 * 64 * 16 * 3 + 4 * 64 * 16 + 2 * 64 * 8 + 4 * 4 * 16 * 3)


@pytest.mark.cuda
def test_sparse_expert_attention_on_cuda_matches_cpu(seed):
    m = SparseExpertAttention(16, 4, 2, head_dim=8)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = m(x)
    y.square().sum().backward()
    mc = SparseExpertAttention(16, 4, 2, head_dim=8).cuda()
    mc.load_state_dict(m.state_dict())
    xc = x.detach().cuda().requires_grad_(True)
    yc, _ = mc(xc)
    yc.square().sum().backward()
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
