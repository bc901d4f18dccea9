"""ExpertBank and MoELayer: against a plain-PyTorch "loop over experts" reference (forward and
backward), draft reports against a direct computation, edge cases (T=0, T=1, empty experts,
dropped slots), torch.compile(fullgraph=True), determinism and constructor validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch import nn

import moe_framework  # noqa: F401
from moe_framework.experts import DenseFFN, ExpertBank, GatedSharedExperts, expert_ffn, swiglu
from moe_framework.moe_layer import DraftReports, MoELayer, RoutingInfo
from moe_framework.supervisor import RoutingDecision

# Compared with a float64 reference of the same parameters. fp32: both sides round products and
# sums at float32 (grouped GEMM, combine); bf16: one bf16 rounding of every stored intermediate.
TOL = TOLERANCES["layer"]


# ------------------------------------------------------------------------------------------------
# plain-PyTorch reference: route, then loop over experts and slots


def _expert_weights(bank: ExpertBank):
    w_in, w_out = bank.weight_in, bank.w_out
    if bank.layout == "out_in":
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return w_in, w_out, bank.bias_in, bank.b_out


def _ffn_ref(x, w_in, w_out, b_in, b_out, activation):
    h = x @ w_in
    if b_in is not None:
        h = h + b_in
    if activation == "swiglu":
        half = h.shape[-1] // 2
        h = F.silu(h[..., :half]) * h[..., half:]
    else:
        h = F.gelu(h)
    y = h @ w_out
    return y + b_out if b_out is not None else y


def expert_output_ref(layer: MoELayer, x2: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e applied densely to every row of x2 (float64)."""
    w_in, w_out, b_in, b_out = _expert_weights(layer.experts)
    return _ffn_ref(
        x2.double(),
        w_in[e].double(),
        w_out[e].double(),
        None if b_in is None else b_in[e].double(),
        None if b_out is None else b_out[e].double(),
        layer.experts.activation,
    )


def moe_loop_ref(layer: MoELayer, x: torch.Tensor):
    """Reference MoE forward in float64: for each expert and slot, gather its tokens, run the
    expert, add the gate-weighted output with index_add. Returns (y, decision)."""
    x2 = x.reshape(-1, x.shape[-1])
    dec = layer.router(x2)
    T, k = dec.ids.shape
    y = torch.zeros(T, x.shape[-1], dtype=torch.float64)
    for e in range(layer.num_experts):
        for j in range(k):
            tok = (dec.ids[:, j] == e).nonzero().flatten()
            if tok.numel() == 0:
                continue
            out = expert_output_ref(layer, x2[tok], e)
            y = y.index_add(0, tok, dec.weights[tok, j, None].double() * out)
    if layer.shared_experts is not None:
        s, gate = layer.shared_experts, None
        if isinstance(s, GatedSharedExperts):
            s, gate = s.ffn, s.gate
        sh = _ffn_ref(
            x2.double(),
            s.w_in.double(),
            s.w_out.double(),
            None if s.b_in is None else s.b_in.double(),
            None if s.b_out is None else s.b_out.double(),
            s.activation,
        )
        if gate is not None:
            sh = torch.sigmoid(x2.double() @ gate.weight.double().t()) * sh
        y = y + sh
    return y.reshape(x.shape), dec


class FixedSupervisor(nn.Module):
    """Returns a given decision whatever the input (exercises empty experts and dropped slots);
    the weights still depend on x so gradients flow through them."""

    def __init__(self, ids: torch.Tensor, num_experts: int, d_model: int):
        super().__init__()
        self.register_buffer("ids", ids.to(torch.int32))
        self.num_experts = num_experts
        self.proj = nn.Linear(d_model, ids.shape[1], bias=False)

    @property
    def slots_per_token(self):
        return self.ids.shape[1]

    def forward(self, x, mask=None, seq_len=None):
        w = torch.softmax(self.proj(x).float(), -1)
        w = torch.where(self.ids >= 0, w, torch.zeros_like(w))
        flat = self.ids.reshape(-1).long()
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int32)
        counts = counts.scatter_add_(
            0,
            torch.where(flat < 0, self.num_experts, flat),
            torch.ones_like(flat, dtype=torch.int32),
        )[:-1]
        return RoutingDecision(
            w, self.ids, counts, x.new_zeros(x.shape[0], self.num_experts), w.new_zeros(()), {}
        )


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def _check_against_reference(layer, x, dtype):
    tol = TOL[dtype]
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    y, info = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    gy = torch.randn_like(y)
    y.backward(gy)
    got = _grads(layer, x)

    layer.zero_grad()
    x_ref = x.detach().requires_grad_(True)
    y_ref, dec = moe_loop_ref(layer, x_ref)
    y_ref.backward(gy.double())
    want = _grads(layer, x_ref)

    assert torch.equal(info.ids, dec.ids)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            # Gradients sum over tokens: scale the tolerance by the largest entry.
            scale = max(1.0, float(w.abs().max()))
            torch.testing.assert_close(
                g.double(), w.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name
            )


# ------------------------------------------------------------------------------------------------
# MoELayer == loop over experts


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moe_layer_forward_backward_match_loop_over_experts(seed, activation, bias, layout, dtype):
    E = int(torch.randint(1, 12, ()))
    k = int(torch.randint(1, min(E, 4) + 1, ()))
    d, h = int(torch.randint(3, 33, ())), int(torch.randint(2, 41, ()))
    layer = MoELayer.build(
        d_model=d,
        d_hidden=h,
        num_experts=E,
        k=k,
        activation=activation,
        bias=bias,
        layout=layout,
        dtype=dtype,
    )
    x = torch.randn(3, int(torch.randint(1, 30, ())), d, dtype=dtype)
    _check_against_reference(layer, x, dtype)


@pytest.mark.parametrize("gated", [False, True])
def test_moe_layer_shared_experts_add_a_dense_ffn_optionally_sigmoid_gated(seed, gated):
    layer = MoELayer.build(
        d_model=16,
        d_hidden=24,
        num_experts=6,
        k=2,
        num_shared_experts=2,
        shared_hidden=8,
        shared_expert_gate=gated,
        dtype=torch.float64,
    )
    ffn = layer.shared_experts.ffn if gated else layer.shared_experts
    assert ffn.d_hidden == 16
    assert isinstance(layer.shared_experts, GatedSharedExperts) == gated
    _check_against_reference(layer, torch.randn(2, 9, 16, dtype=torch.float64), torch.float64)


def test_moe_layer_bf16_matches_float64_reference_within_bf16_rounding(seed):
    layer = MoELayer.build(d_model=32, d_hidden=48, num_experts=8, k=2, dtype=torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    y, info = layer(x)
    y_ref, dec = moe_loop_ref(layer, x)
    assert y.dtype == torch.bfloat16
    # Routing reads the same bf16 logits on both sides, so it cannot flip.
    assert torch.equal(info.ids, dec.ids)
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.bfloat16])


def test_moe_layer_accepts_non_contiguous_input(seed):
    layer = MoELayer.build(d_model=12, d_hidden=20, num_experts=5, k=2, dtype=torch.float64)
    x = torch.randn(12, 7, 3, dtype=torch.float64).permute(2, 1, 0)  # [3, 7, 12], not contiguous
    assert not x.is_contiguous()
    _check_against_reference(layer, x, torch.float64)


# ------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10), (1, 10), (1, 1, 10)])
def test_moe_layer_handles_zero_and_one_token(seed, shape):
    layer = MoELayer.build(
        d_model=10, d_hidden=14, num_experts=4, k=2, num_shared_experts=1, dtype=torch.float64
    )
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y, info = layer(x)
    assert y.shape == x.shape
    T = math.prod(shape[:-1])
    assert info.weights.shape == (T, 2) and info.ids.shape == (T, 2)
    assert info.reports.token_count.sum() == 2 * T
    y.sum().backward()
    assert x.grad.shape == x.shape
    if T == 0:
        assert int(info.counts.sum()) == 0
        assert torch.equal(info.reports.top_tokens, torch.full((4, 4), -1))
        assert torch.equal(info.reports.mean_output, torch.zeros(4, 10))
    else:
        _check_against_reference(layer, x.detach(), torch.float64)


def test_moe_layer_experts_without_tokens_get_zero_weight_gradient(seed):
    E, T, d = 8, 11, 6
    ids = torch.stack([torch.full((T,), 2), torch.full((T,), 5)], 1)  # only experts 2 and 5
    layer = MoELayer.build(
        d_model=d,
        d_hidden=10,
        num_experts=E,
        k=2,
        router=FixedSupervisor(ids, E, d).double(),
        dtype=torch.float64,
    )
    _check_against_reference(layer, torch.randn(T, d, dtype=torch.float64), torch.float64)
    idle = [e for e in range(E) if e not in (2, 5)]
    assert torch.count_nonzero(layer.experts.w_gate_up.grad[idle]) == 0
    assert torch.count_nonzero(layer.experts.w_gate_up.grad[[2, 5]]) > 0


@pytest.mark.parametrize("bias", [False, True])
def test_moe_layer_dropped_slots_contribute_nothing(seed, bias):
    E, T, k, d = 5, 13, 3, 8
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[torch.rand(T, k) < 0.35] = -1
    ids[0] = -1  # one token with every slot dropped: its routed output is exactly 0
    layer = MoELayer.build(
        d_model=d,
        d_hidden=12,
        num_experts=E,
        k=k,
        bias=bias,
        router=FixedSupervisor(ids, E, d).double(),
        dtype=torch.float64,
    )
    x = torch.randn(T, d, dtype=torch.float64)
    _check_against_reference(layer, x, torch.float64)
    y, info = layer(x)
    assert torch.equal(y[0], torch.zeros(d, dtype=torch.float64))
    assert int(info.reports.token_count.sum()) == int((ids >= 0).sum())


def test_expert_bank_rows_after_offsets_are_zero_with_biases(seed):
    bank = ExpertBank(
        d_model=5, d_hidden=7, num_experts=3, activation="gelu", bias=True, dtype=torch.float64
    )
    with torch.no_grad():
        bank.b_in.fill_(1.0)
        bank.b_out.fill_(2.0)
    x = torch.randn(9, 5, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 2, 6])  # rows 6..8 are dropped slots
    y = bank(x, offsets)
    assert torch.equal(y[6:], torch.zeros(3, 5, dtype=torch.float64))
    w_in, w_out, b_in, b_out = _expert_weights(bank)
    for e, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 6)]):
        want = _ffn_ref(x[lo:hi], w_in[e], w_out[e], b_in[e], b_out[e], "gelu")
        torch.testing.assert_close(y[lo:hi], want, **TOL[torch.float64])


def test_expert_bank_out_in_layout_equals_in_out_on_transposed_weights(seed):
    a = ExpertBank(d_model=6, d_hidden=10, num_experts=4, dtype=torch.float64)
    b = ExpertBank(d_model=6, d_hidden=10, num_experts=4, layout="out_in", dtype=torch.float64)
    assert b.w_gate_up.shape == (4, 20, 6) and b.w_out.shape == (4, 6, 10)
    with torch.no_grad():
        b.w_gate_up.copy_(a.w_gate_up.transpose(1, 2))
        b.w_out.copy_(a.w_out.transpose(1, 2))
    x = torch.randn(15, 6, dtype=torch.float64)
    offsets = torch.tensor([0, 3, 3, 10, 15])
    torch.testing.assert_close(a(x, offsets), b(x, offsets), **TOL[torch.float64])


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_bank_parameter_shapes_and_default_init_follow_nn_linear(seed, activation):
    E, d, h = 16, 64, 96
    bank = ExpertBank(d_model=d, d_hidden=h, num_experts=E, activation=activation, bias=True)
    n_in = 2 * h if activation == "swiglu" else h
    assert bank.weight_in.shape == (E, d, n_in) and bank.w_out.shape == (E, h, d)
    assert bank.bias_in.shape == (E, n_in) and bank.b_out.shape == (E, d)
    for w, fan_in in ((bank.weight_in, d), (bank.w_out, h), (bank.bias_in, d), (bank.b_out, h)):
        bound = 1 / math.sqrt(fan_in)
        w = w.detach()
        assert float(w.abs().max()) <= bound
        # U(-b, b) has std b/sqrt(3); tens of thousands of draws land within a few percent.
        if w.numel() > 10_000:
            assert abs(float(w.std()) / (bound / math.sqrt(3)) - 1) < 0.05
    std_bank = ExpertBank(
        d_model=d, d_hidden=h, num_experts=E, activation=activation, bias=True, init_std=0.02
    )
    assert abs(float(std_bank.w_out.detach().std()) / 0.02 - 1) < 0.05
    assert torch.count_nonzero(std_bank.b_out) == 0


def test_swiglu_gradients_match_autograd_of_the_plain_formula(seed):
    h = torch.randn(7, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    assert torch.autograd.gradgradcheck(swiglu, (h,))
    g = torch.randn(7, 5, dtype=torch.float64)
    (got,) = torch.autograd.grad(swiglu(h), h, g)
    (want,) = torch.autograd.grad(F.silu(h[:, :5]) * h[:, 5:], h, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Another gate activation takes the plain path.
    torch.testing.assert_close(swiglu(h, F.gelu), F.gelu(h[:, :5]) * h[:, 5:])


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_expert_ffn_swiglu_down_projection_gradients_match_plain_formula(seed, layout):
    # The SwiGLU + down projection runs as one autograd node that recomputes the SwiGLU output in
    # backward. Gradients (first and second order) must equal autograd of the plain formula.
    # gradcheck backpropagates one graph many times: it needs inplace_backward=False (the default
    # path is compared with the plain formula directly).
    E, d, hid = 3, 5, 4
    offsets = torch.tensor([0, 2, 2, 7], dtype=torch.int64)
    x = torch.randn(7, d, dtype=torch.float64, requires_grad=True)
    shape_in, shape_out = ((E, d, 2 * hid), (E, hid, d))
    if layout == "out_in":
        shape_in, shape_out = (E, 2 * hid, d), (E, d, hid)
    w_in = torch.randn(shape_in, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(shape_out, dtype=torch.float64, requires_grad=True)

    def ours(x, w_in, w_out, inplace_backward=True):
        return expert_ffn(x, offsets, w_in, w_out, layout=layout, inplace_backward=inplace_backward)

    def ours_reusable(x, w_in, w_out):
        return ours(x, w_in, w_out, inplace_backward=False)

    def plain(x, w_in, w_out):
        wi = w_in.transpose(1, 2) if layout == "out_in" else w_in
        wo = w_out.transpose(1, 2) if layout == "out_in" else w_out
        rows = []
        for e in range(E):
            xe = x[offsets[e] : offsets[e + 1]]
            h = xe @ wi[e]
            rows.append((F.silu(h[:, :hid]) * h[:, hid:]) @ wo[e])
        return torch.cat(rows)

    g = torch.randn(7, d, dtype=torch.float64)
    got = torch.autograd.grad(ours(x, w_in, w_out), (x, w_in, w_out), g)
    want = torch.autograd.grad(plain(x, w_in, w_out), (x, w_in, w_out), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(ours_reusable, (x, w_in, w_out))
    assert torch.autograd.gradgradcheck(ours_reusable, (x, w_in, w_out))


def test_expert_ffn_keeps_no_swiglu_output_alive_between_forward_and_backward(seed):
    # Memory contract: between forward and backward the expert FFN holds x_sorted [M, d] and the
    # first projection h [M, 2H] (plus weights and offsets), not the [M, H] SwiGLU output.
    M, d, hid, E = 9, 6, 11, 2
    offsets = torch.tensor([0, 4, 9], dtype=torch.int64)
    x = torch.randn(M, d, requires_grad=True)
    w_in = torch.randn(E, d, 2 * hid, requires_grad=True)
    w_out = torch.randn(E, hid, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = expert_ffn(x, offsets, w_in, w_out)
    assert (M, hid) not in saved, saved
    assert (M, 2 * hid) in saved
    y.sum().backward()
    assert x.grad is not None and w_in.grad is not None and w_out.grad is not None
    # recompute_activation=False keeps the SwiGLU output (faster backward) and gives the same
    # gradients.
    grads = [t.grad.clone() for t in (x, w_in, w_out)]
    for t in (x, w_in, w_out):
        t.grad = None
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = expert_ffn(x, offsets, w_in, w_out, recompute_activation=False)
    assert (M, hid) in saved, saved
    y.sum().backward()
    for t, g in zip((x, w_in, w_out), grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# draft reports


def test_draft_reports_match_direct_computation(seed):
    E, d, r = 7, 10, 3
    layer = MoELayer.build(
        d_model=d, d_hidden=16, num_experts=E, k=2, report_top_tokens=r, dtype=torch.float64
    )
    x = torch.randn(4, 9, d, dtype=torch.float64)
    y, info = layer(x)
    rep = info.reports
    assert isinstance(info, RoutingInfo) and isinstance(rep, DraftReports)
    x2 = x.reshape(-1, d)
    ids, w = info.ids, info.weights
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        assert int(rep.token_count[e]) == tok.numel() == int(info.counts[e])
        if tok.numel() == 0:
            assert float(rep.confidence[e]) == 0.0
            assert torch.count_nonzero(rep.mean_output[e]) == 0
            assert torch.equal(rep.top_tokens[e], torch.full((r,), -1))
            continue
        out = expert_output_ref(layer, x2[tok], e)
        torch.testing.assert_close(rep.mean_output[e].double(), out.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            rep.confidence[e].double(), w[tok, slot].double().mean(), rtol=1e-6, atol=1e-7
        )
        ranked = sorted(zip((-w[tok, slot]).tolist(), tok.tolist()))[:r]
        want = [t for _, t in ranked] + [-1] * (r - len(ranked))
        assert rep.top_tokens[e].tolist() == want
    assert rep.mean_output.shape == (E, d) and rep.mean_output.dtype == torch.float32
    assert rep.confidence.shape == (E,) and rep.token_count.dtype == torch.int64
    assert rep.top_tokens.shape == (E, r) and rep.top_tokens.dtype == torch.int64
    assert not any(t.requires_grad for t in rep)


def test_draft_reports_break_confidence_ties_by_lower_token_index(seed):
    E, T, d = 3, 8, 4
    ids = torch.tensor([[1, 0]] * T)  # every token: experts 1 and 0 ...
    sup = FixedSupervisor(ids, E, d)
    with torch.no_grad():
        sup.proj.weight.zero_()  # ... with equal weights 0.5 everywhere: all ties
    layer = MoELayer.build(
        d_model=d, d_hidden=6, num_experts=E, k=2, router=sup, report_top_tokens=5
    )
    _, info = layer(torch.randn(T, d))
    assert info.reports.top_tokens.tolist() == [[0, 1, 2, 3, 4]] * 2 + [[-1] * 5]
    assert info.reports.confidence.tolist() == [0.5, 0.5, 0.0]


def test_moe_layer_without_report_top_tokens_computes_no_draft_reports(seed):
    layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2, report_top_tokens=None)
    _, info = layer(torch.randn(5, 8))
    assert info.reports is None


# ------------------------------------------------------------------------------------------------
# torch.compile and determinism


class TwoLayerModel(nn.Module):
    def __init__(self, d=16, E=6, **kw):
        super().__init__()
        self.a = MoELayer.build(
            d_model=d,
            d_hidden=24,
            num_experts=E,
            k=2,
            num_shared_experts=1,
            shared_expert_gate=True,
            **kw,
        )
        self.b = MoELayer.build(
            d_model=d, d_hidden=20, num_experts=E, k=3, activation="gelu", bias=True, **kw
        )

    def forward(self, x):
        y, ia = self.a(x)
        x = x + y
        y, ib = self.b(x)
        return x + y, ia.aux_loss + ib.aux_loss, ia.reports.top_tokens, ib.counts


def _run(model, fn, x, gy):
    model.zero_grad()
    x = x.detach().requires_grad_(True)
    y, aux, top, counts = fn(x)
    (y * gy).sum().backward()
    return [y, aux, top, counts, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_two_moe_layers_compile_fullgraph_without_breaks_and_match_eager(seed, backend):
    torch._dynamo.reset()
    model = TwoLayerModel()
    x = torch.randn(2, 13, 16)
    gy = torch.randn(2, 13, 16)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    want = _run(model, model, x, gy)
    got = _run(model, compiled, x, gy)
    for g, w in zip(got, want):
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, w)


def test_moe_layer_is_bitwise_deterministic(seed):
    model = TwoLayerModel()
    x = torch.randn(3, 40, 16)
    gy = torch.randn(3, 40, 16)
    first = _run(model, model, x, gy)
    second = _run(model, model, x, gy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0), "d_model"),
        (dict(d_hidden=-1), "d_hidden"),
        (dict(num_experts=0), "num_experts"),
        (dict(k=0), "k must be"),
        (dict(k=5), "k must be"),
        (dict(activation="relu"), "activation"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(num_shared_experts=1, shared_hidden=0), "shared_hidden"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(report_top_tokens=-1), "report_top_tokens"),
        (dict(layout="kn"), "layout"),
        # bool is an int in Python and a str is truthy: neither may pass for an int or a bool
        (dict(d_model=True), "d_model"),
        (dict(num_experts=True, k=1), "num_experts"),
        (dict(k=True), "k must be"),
        (dict(num_shared_experts=True), "num_shared_experts"),
        (dict(report_top_tokens=False), "report_top_tokens"),
        (dict(bias="no"), "bias must be a bool"),
        (dict(report_top_tokens="4"), "report_top_tokens must be None"),
        (dict(checkpoint_experts="yes"), "checkpoint_experts must be a bool"),
        (dict(recompute_activation="False"), "recompute_activation must be a bool"),
        (dict(inplace_backward=1), "inplace_backward must be a bool"),
        (dict(init_std="0.02"), "init_std"),
        (dict(init_std=True), "init_std"),
        (dict(init_std=float("inf")), "init_std"),
    ],
)
def test_moe_layer_rejects_bad_constructor_args(kwargs, match):
    args = dict(d_model=8, d_hidden=8, num_experts=4, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoELayer.build(**args)


def test_moe_layer_build_rejects_router_that_disagrees_on_k_or_experts():
    from moe_framework.supervisor import Supervisor

    with pytest.raises(ValueError, match="slots_per_token"):
        MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2, router=Supervisor(8, 4, 3))
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2, router=Supervisor(8, 5, 2))


def test_moe_layer_build_rejects_router_of_another_width_at_construction():
    from moe_framework.supervisor import Supervisor

    with pytest.raises(ValueError, match="router.d_model must equal d_model=8, got 16"):
        MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2, router=Supervisor(16, 4, 2))


def test_moe_layer_routing_stats_without_tracking_is_an_error_saying_how_to_turn_it_on():
    layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2)
    layer(torch.randn(6, 8))
    with pytest.raises(RuntimeError, match="track_stats=True"):
        layer.routing_stats()
    # turned on later: from then on the statistics are real
    layer.router.track_stats = True
    layer(torch.randn(6, 8))
    stats = layer.routing_stats()
    assert stats["tokens"] == 6 and sum(stats["tokens_per_expert"]) == 12
    # turned off again: what was tracked stays readable
    layer.router.track_stats = False
    assert layer.routing_stats()["tokens"] == 6


def test_moe_layer_rejects_input_of_wrong_width():
    with pytest.raises(ValueError, match="d_model=8"):
        MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2)(torch.randn(3, 7))


_BANK = dict(d_model=4, d_hidden=4, num_experts=2)
_FFN = dict(d_model=4, d_hidden=4)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (ExpertBank, dict(_BANK, num_experts=0), "num_experts"),
        (ExpertBank, dict(_BANK, activation="tanh"), "activation"),
        (DenseFFN, dict(_FFN, d_hidden=0), "d_hidden"),
        (DenseFFN, dict(_FFN, activation="tanh"), "activation"),
        (ExpertBank, dict(_BANK, num_experts=True), "num_experts"),
        (ExpertBank, dict(_BANK, d_model=True), "d_model"),
        (ExpertBank, dict(_BANK, bias="no"), "bias must be a bool"),
        (DenseFFN, dict(_FFN, d_hidden=True), "d_hidden"),
        (DenseFFN, dict(_FFN, bias="yes"), "bias must be a bool"),
    ],
)
def test_expert_modules_reject_bad_args(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_expert_modules_take_sizes_by_keyword_only():
    # One order everywhere (d_model, d_hidden, num_experts): positional sizes were (num_experts,
    # d_model, d_hidden) for ExpertBank before and must not silently swap meaning.
    with pytest.raises(TypeError):
        ExpertBank(4, 8, 16)
    with pytest.raises(TypeError):
        DenseFFN(8, 16)
    with pytest.raises(TypeError):
        MoELayer.build(8, 16, 4, 2)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_cuda_matches_cpu(seed, dtype):
    cpu = MoELayer.build(
        d_model=64,
        d_hidden=96,
        num_experts=16,
        k=4,
        num_shared_experts=1,
        shared_expert_gate=True,
        dtype=dtype,
    )
    gpu = MoELayer.build(
        d_model=64,
        d_hidden=96,
        num_experts=16,
        k=4,
        num_shared_experts=1,
        shared_expert_gate=True,
        dtype=dtype,
    )
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(3, 50, 64, dtype=dtype)
    y_cpu, info_cpu = cpu(x)
    y_gpu, info_gpu = gpu(x.cuda())
    # Routing reads the router logits, whose GEMM may round differently on the GPU: compare the
    # outputs of the tokens routed identically on both devices.
    same = (info_gpu.ids.cpu() == info_cpu.ids).all(1)
    assert same.float().mean() > 0.9
    tol = TOL[torch.float32] if dtype == torch.float32 else TOL[torch.bfloat16]
    torch.testing.assert_close(
        y_gpu.reshape(-1, 64).cpu()[same].float(), y_cpu.reshape(-1, 64)[same].float(), **tol
    )


@pytest.mark.cuda
def test_moe_layer_forward_is_cuda_graph_capturable(seed):
    layer = MoELayer.build(d_model=32, d_hidden=48, num_experts=8, k=2).cuda().eval()
    x = torch.randn(64, 32, device="cuda")
    with torch.no_grad():
        want, _ = layer(x)  # warm up (kernels loaded, allocator primed)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, info = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want)


def test_moe_layer_mask_routes_padding_nowhere_and_passes_seq_len(seed):
    from moe_framework.supervisor import Supervisor, load_balancing_loss

    d, E, k, B, S = 16, 4, 2, 3, 5
    sup = Supervisor(
        d, E, k, load_balance_coef=1.0, load_balance_scope="sequence", track_stats=True
    )
    layer = MoELayer.build(d_model=d, d_hidden=24, num_experts=E, k=k, router=sup)
    x = torch.randn(B, S, d)
    mask = torch.rand(B, S) > 0.3
    mask[:, 0] = True  # every sequence has a real token
    y, info = layer(x, mask)
    flat = mask.reshape(-1)
    # padding tokens: no slot, zero weight, zero routed output
    assert (info.ids[~flat] == -1).all() and (info.weights[~flat] == 0).all()
    assert (y.reshape(-1, d)[~flat] == 0).all()
    assert int(info.counts.sum()) == int(flat.sum()) * k
    # the aux loss is the per-sequence loss over real tokens only
    probs = torch.softmax(sup.router_logits(x.reshape(-1, d)).float(), -1)
    expected = load_balancing_loss(probs, info.ids, mask=flat, seq_len=S)
    torch.testing.assert_close(info.aux_loss, expected.to(info.aux_loss.dtype))
    stats = layer.routing_stats()
    assert sum(stats["tokens_per_expert"]) == int(flat.sum()) * k
    layer.reset_stats()
    assert sum(layer.routing_stats()["tokens_per_expert"]) == 0


def test_moe_layer_rejects_a_mask_of_the_wrong_shape():
    layer = MoELayer.build(d_model=8, d_hidden=16, num_experts=4, k=2)
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(torch.randn(2, 3, 8), torch.ones(3, 2, dtype=torch.bool))


def test_moe_layer_runs_under_cpu_autocast_with_bf16_matmuls_and_fp32_grads(seed):
    layer = MoELayer.build(d_model=32, d_hidden=48, num_experts=4, k=2, num_shared_experts=1)
    x = torch.randn(2, 7, 32)
    ref, ref_info = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = layer(x)
    assert y.dtype == torch.bfloat16
    # The router runs in bf16 too, so a token whose top-2 scores are within bf16 rounding of each
    # other may pick another expert than in fp32: compare the tokens routed the same way (sets of
    # experts), and require that near-ties are rare.
    same = (info.ids.sort(-1).values == ref_info.ids.sort(-1).values).all(-1).reshape(2, 7)
    assert int(same.sum()) >= 11, same
    torch.testing.assert_close(y.float()[same], ref[same], rtol=5e-2, atol=5e-2)
    y.float().square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
