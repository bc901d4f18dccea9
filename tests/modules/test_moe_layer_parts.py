"""MoELayer is composed of parts (router -> dispatcher -> experts -> combine, + shared): toy
implementations of each protocol plug in and match a plain-PyTorch reference; the default parts
(LocalDispatcher, ExpertBank) agree with the toys; CheckpointedExperts recomputes only the
experts and keeps the state dict; parts that disagree are refused at construction; state dicts
saved before the layer was composed still load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_framework  # noqa: F401
from moe_framework import MoELayer, Supervisor
from moe_framework.dispatch import DispatchContext, LocalDispatcher
from moe_framework.experts import CheckpointedExperts, DenseFFN, ExpertBank, GatedSharedExperts
from moe_framework.supervisor import RoutingDecision

F64 = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# toy parts: each is what a user would write in one new file


class HashRouter(nn.Module):
    """Token t's slot j goes to expert (t + j) mod E; the gate weights come from a learned
    projection, so gradients reach the router. Padding (mask False) is routed nowhere."""

    def __init__(self, d_model: int, num_experts: int, k: int):
        super().__init__()
        self.d_model, self.num_experts, self.slots_per_token = d_model, num_experts, k
        self.proj = nn.Linear(d_model, k, bias=False, dtype=torch.float64)
        self.calls = 0

    def forward(self, x, mask=None, seq_len=None):
        T, k, E = x.shape[0], self.slots_per_token, self.num_experts
        t = torch.arange(T).unsqueeze(1)
        ids = ((t + torch.arange(k).unsqueeze(0)) % E).to(torch.int32)
        weights = torch.softmax(self.proj(x).float(), -1)
        if mask is not None:
            ids = torch.where(mask.unsqueeze(1), ids, torch.full_like(ids, -1))
            weights = torch.where(mask.unsqueeze(1), weights, torch.zeros_like(weights))
        key = torch.where(ids < 0, E, ids).long().reshape(-1)
        counts = torch.zeros(E + 1, dtype=torch.int32).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32)
        )[:E]
        self.calls += 1
        logits = x.new_zeros(T, E)
        return RoutingDecision(weights, ids, counts, logits, weights.new_zeros(()), {})

    def routing_stats(self) -> dict:
        return {"calls": self.calls}

    def reset_stats(self) -> None:
        self.calls = 0

    def update_bias(self, counts=None) -> None:
        pass


class ArgsortDispatcher:
    """A plain-PyTorch dispatcher (not even an nn.Module): stable argsort of the slots by expert,
    index_select, and a weighted sum back."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x, decision):
        T, k = decision.ids.shape
        key = decision.ids.reshape(-1).long()
        key = torch.where(key < 0, self.num_experts, key)  # dropped slots after every expert
        order = torch.sort(key, stable=True).indices  # sorted row -> slot
        x_sorted = x.index_select(0, order // k)
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long).scatter_add_(
            0, key, torch.ones_like(key)
        )[: self.num_experts]
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        row_of_slot = torch.empty_like(order).scatter_(0, order, torch.arange(T * k))
        return x_sorted, offsets, DispatchContext(row_of_slot, decision.weights)

    def combine(self, y_sorted, ctx):
        T, k = ctx.weights.shape
        per_slot = y_sorted.index_select(0, ctx.row_of_slot).reshape(T, k, -1)
        return (per_slot * ctx.weights.to(y_sorted.dtype).unsqueeze(-1)).sum(1)


class LoopExperts(nn.Module):
    """One nn.Linear per expert, run in a Python loop over the offsets (host reads: fine for a toy)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.linears = nn.ModuleList(
            nn.Linear(d_model, d_model, dtype=torch.float64) for _ in range(num_experts)
        )

    def forward(self, x_sorted, offsets):
        bounds = offsets.tolist()
        pieces = [
            torch.tanh(lin(x_sorted[lo:hi]))
            for lin, lo, hi in zip(self.linears, bounds[:-1], bounds[1:])
        ]
        pieces.append(x_sorted.new_zeros(x_sorted.shape[0] - bounds[-1], x_sorted.shape[1]))
        return torch.cat(pieces)


def _reference(router, experts, shared, x2, mask=None):
    """The layer's output by its definition: for every token and slot, the gate-weighted output of
    the slot's expert on that token, plus the shared experts."""
    dec = router(x2, mask)
    y = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(dec.ids.shape[1]):
            e = int(dec.ids[t, j])
            if e >= 0:
                out = torch.tanh(experts.linears[e](x2[t]))
                y[t] = y[t] + dec.weights[t, j].double() * out
    return y + shared(x2) if shared is not None else y


def _grads(module, x, y):
    return torch.autograd.grad(y.square().sum(), [x, *module.parameters()], allow_unused=True)


@pytest.mark.parametrize("masked", [False, True])
def test_toy_router_dispatcher_and_experts_plug_in_and_match_a_plain_reference(seed, masked):
    d, E, k, B, S = 6, 5, 2, 2, 7
    router = HashRouter(d, E, k)
    experts = LoopExperts(d, E)
    shared = DenseFFN(d_model=d, d_hidden=4, dtype=torch.float64)
    layer = MoELayer(router, experts, ArgsortDispatcher(E), shared, report_top_tokens=2)
    x = torch.randn(B, S, d, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, S) > 0.3 if masked else None
    y, info = layer(x, mask)
    want = _reference(
        router, experts, shared, x.reshape(-1, d), None if mask is None else mask.reshape(-1)
    )
    torch.testing.assert_close(y.reshape(-1, d), want, **F64)
    for g, w in zip(_grads(layer, x, y), _grads(layer, x, want.reshape(x.shape))):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **F64)
    assert info.ids.shape == (B * S, k) and info.reports.top_tokens.shape == (E, 2)
    assert int(info.reports.token_count.sum()) == int((info.ids >= 0).sum())
    # the layer's telemetry calls go straight to the router
    assert layer.routing_stats() == {"calls": router.calls}
    layer.reset_stats()
    assert router.calls == 0


def test_expert_bank_behind_the_toy_dispatcher_equals_the_local_dispatcher(seed):
    d, E, k = 8, 6, 3
    router = Supervisor(d, E, k, capacity_factor=0.8).double()  # capacity drops some slots
    bank = ExpertBank(d_model=d, d_hidden=10, num_experts=E, dtype=torch.float64)
    local = MoELayer(router, bank)
    toy = MoELayer(router, bank, dispatcher=ArgsortDispatcher(E))
    assert isinstance(local.dispatcher, LocalDispatcher)
    x = torch.randn(3, 11, d, dtype=torch.float64, requires_grad=True)
    y_local, info_local = local(x)
    y_toy, info_toy = toy(x)
    assert int((info_local.ids < 0).sum()) > 0  # the case covers dropped slots
    assert torch.equal(info_toy.ids, info_local.ids)
    torch.testing.assert_close(y_toy, y_local, **F64)
    for g, w in zip(_grads(toy, x, y_toy), _grads(local, x, y_local)):
        torch.testing.assert_close(g, w, **F64)
    # same stable order of the slots: the draft reports agree exactly on the tokens
    assert torch.equal(info_toy.reports.token_count, info_local.reports.token_count)
    assert torch.equal(info_toy.reports.top_tokens, info_local.reports.top_tokens)
    torch.testing.assert_close(info_toy.reports.mean_output, info_local.reports.mean_output)


def test_build_gives_the_same_layer_as_composing_the_default_parts(seed):
    torch.manual_seed(seed)
    built = MoELayer.build(d_model=8, d_hidden=12, num_experts=4, k=2, num_shared_experts=1)
    torch.manual_seed(seed)
    router = Supervisor(8, 4, 2)
    experts = ExpertBank(d_model=8, d_hidden=12, num_experts=4)
    shared = DenseFFN(d_model=8, d_hidden=12)
    composed = MoELayer(router, experts, shared=shared)
    assert list(built.state_dict()) == list(composed.state_dict())
    for a, b in zip(built.state_dict().values(), composed.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(5, 8)
    assert torch.equal(built(x)[0], composed(x)[0])


def test_layer_router_is_the_supervisor_and_keeps_the_state_dict_names():
    layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2, num_shared_experts=1)
    assert layer.router is layer.supervisor
    assert {k.split(".")[0] for k in layer.state_dict()} == {
        "supervisor",
        "experts",
        "shared_experts",
    }


# ------------------------------------------------------------------------------------------------
# activation checkpointing is a wrapper around any Experts


class _Counting(nn.Module):
    """Counts forward calls of the module it wraps (hooks are silent under checkpoint recompute,
    a wrapper module is not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_experts, self.d_model = inner, inner.num_experts, inner.d_model
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.inner(*args)


def test_checkpointed_experts_recompute_in_training_only_with_the_same_gradients(seed):
    def make(wrap):
        torch.manual_seed(seed)
        router = Supervisor(8, 4, 2, jitter_eps=0.1)  # jitter: noise_step counts router calls
        counted = _Counting(ExpertBank(d_model=8, d_hidden=12, num_experts=4))
        experts = CheckpointedExperts(counted) if wrap else counted
        return MoELayer(router, experts), counted

    x = torch.randn(2, 9, 8)
    results = []
    for wrap in (False, True):
        layer, counted = make(wrap)
        xg = x.clone().requires_grad_(True)
        y, _ = layer(xg)
        y.square().sum().backward()
        # the router ran once either way: its buffer updates must not happen twice
        assert int(layer.router.noise_step) == 1
        assert counted.calls == (2 if wrap else 1)
        results.append((y.detach(), xg.grad, [p.grad for p in layer.parameters()]))
        layer.eval()
        layer(x)
        assert counted.calls == (3 if wrap else 2)  # eval: no checkpoint, one call
        with torch.no_grad():
            layer.train()(x)
        assert counted.calls == (4 if wrap else 3)  # no grad: no checkpoint either
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for a, b in zip(gp0, gp1):
        assert torch.equal(a, b)


def test_checkpointed_experts_save_and_load_the_plain_state_dict(seed):
    plain = MoELayer.build(d_model=8, d_hidden=12, num_experts=4, k=2)
    ckpt = MoELayer.build(d_model=8, d_hidden=12, num_experts=4, k=2, checkpoint_experts=True)
    assert isinstance(ckpt.experts, CheckpointedExperts)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    ckpt.load_state_dict(plain.state_dict())
    assert torch.equal(ckpt.experts.inner.w_gate_up, plain.experts.w_gate_up)
    plain.load_state_dict(ckpt.state_dict())
    assert ckpt.experts.num_experts == 4 and ckpt.experts.d_model == 8


def test_checkpointed_experts_refuse_a_non_module():
    with pytest.raises(ValueError, match="CheckpointedExperts: experts must be an nn.Module"):
        CheckpointedExperts(lambda x, o: x)


# ------------------------------------------------------------------------------------------------
# shared experts: any module x -> y, the Qwen2-MoE gate as a wrapper


def test_gated_shared_experts_scale_the_ffn_by_a_sigmoid_gate(seed):
    ffn = DenseFFN(d_model=6, d_hidden=5, dtype=torch.float64)
    gate = nn.Linear(6, 1, bias=False, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(
        GatedSharedExperts(ffn, gate)(x), torch.sigmoid(gate(x)) * ffn(x), **F64
    )


def test_layer_loads_a_gated_state_dict_saved_before_the_layer_was_composed(seed):
    # Until issue 13 the Qwen2-MoE gate sat beside the shared experts: `shared_gate.weight` and
    # `shared_experts.w_in`; load_state_dict maps those names onto GatedSharedExperts.
    src = MoELayer.build(
        d_model=8, d_hidden=8, num_experts=4, k=2, num_shared_experts=1, shared_expert_gate=True
    )
    old = {}
    for key, value in src.state_dict().items():
        key = key.replace("shared_experts.gate.", "shared_gate.")
        old[key.replace("shared_experts.ffn.", "shared_experts.")] = value
    assert "shared_gate.weight" in old and "shared_experts.w_in" in old
    dst = MoELayer.build(
        d_model=8, d_hidden=8, num_experts=4, k=2, num_shared_experts=1, shared_expert_gate=True
    )
    dst.load_state_dict(old, strict=True)
    for a, b in zip(src.parameters(), dst.parameters()):
        assert torch.equal(a, b)
    # nested in a model too (the names carry the parent's prefix)
    outer = nn.Sequential(dst)
    outer.load_state_dict({f"0.{k}": v for k, v in old.items()}, strict=True)


# ------------------------------------------------------------------------------------------------
# construction: parts that disagree are refused, with the part named


def _parts(E=4, d=8, k=2):
    return Supervisor(d, E, k), ExpertBank(d_model=d, d_hidden=8, num_experts=E)


def test_layer_refuses_parts_that_disagree_on_experts_or_width():
    router, _ = _parts(E=4)
    with pytest.raises(ValueError, match=r"router.num_experts=4 must equal experts.num_experts=5"):
        MoELayer(router, ExpertBank(d_model=8, d_hidden=8, num_experts=5))
    with pytest.raises(ValueError, match=r"experts.d_model=16 must equal router.d_model=8"):
        MoELayer(router, ExpertBank(d_model=16, d_hidden=8, num_experts=4))
    router, experts = _parts()
    with pytest.raises(ValueError, match=r"shared.d_model=6 must equal router.d_model=8"):
        MoELayer(router, experts, shared=DenseFFN(d_model=6, d_hidden=4))
    with pytest.raises(ValueError, match=r"dispatcher.num_experts=3 must equal"):
        MoELayer(router, experts, dispatcher=LocalDispatcher(3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r, e: MoELayer(64, 128, 8, 2), r"router must be an nn.Module.*MoELayer.build"),
        (lambda r, e: MoELayer(r, "bank"), "experts must be an nn.Module"),
        (lambda r, e: MoELayer(r, e, shared=F.relu), "shared must be an nn.Module"),
        (lambda r, e: MoELayer(r, e, report_top_tokens=-1), "report_top_tokens must be None"),
        (lambda r, e: MoELayer(r, e, report_top_tokens=True), "report_top_tokens must be None"),
        (lambda r, e: LocalDispatcher(0), "LocalDispatcher: num_experts must be an int >= 1"),
        (
            lambda r, e: MoELayer.build(
                d_model=8, d_hidden=8, num_experts=4, router=r, strategy="switch"
            ),
            "cannot go with router=",
        ),
    ],
)
def test_layer_construction_errors_name_the_part_and_the_fix(make, match):
    router, experts = _parts()
    with pytest.raises(ValueError, match=match):
        make(router, experts)


def test_build_forwards_router_arguments_to_the_default_supervisor():
    layer = MoELayer.build(
        d_model=8, d_hidden=8, num_experts=4, k=1, strategy="switch", load_balance_coef=0.01
    )
    assert layer.router.strategy == "switch" and layer.router.load_balance_coef == 0.01
    with pytest.raises(TypeError):
        MoELayer.build(d_model=8, d_hidden=8, num_experts=4, activaton="gelu")


def test_layer_with_toy_parts_compiles_fullgraph_when_the_parts_are_graph_safe(seed):
    # The layer's calls into its parts are plain method calls: with graph-safe parts (the default
    # router and experts behind the plain-PyTorch dispatcher) nothing breaks the graph.
    torch._dynamo.reset()
    router, experts = _parts()
    layer = MoELayer(router, experts, dispatcher=ArgsortDispatcher(4))
    x = torch.randn(2, 5, 8)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], layer(x)[0])
