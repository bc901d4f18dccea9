"""moe_framework.routing: one class per strategy, the Router protocol and the Supervisor factory.

The strategies' numerics are pinned in tests/test_supervisor.py (against plain-PyTorch
references) and tests/test_golden.py (bitwise); here: each router class built directly is the
factory's router, bit for bit; the factory refuses arguments that do not apply; a router written
outside the package satisfies the protocol."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_framework.supervisor as old_home
from moe_framework import routing
from moe_framework.routing import (
    ROUTERS,
    STRATEGIES,
    AttentionRouter,
    BaseRouter,
    ExpertChoiceRouter,
    GroupedSigmoidRouter,
    NoisyTopKRouter,
    Router,
    RoutingDecision,
    Supervisor,
    SwitchRouter,
    TopKRouter,
    TopKThenSoftmaxRouter,
    router_arguments,
)

# strategy -> (class, k, the options exercised: every class-specific argument at a non-default)
CASES = {
    "topk": (TopKRouter, 2, dict(renormalize=False, capacity_factor=1.0, load_balance_coef=0.01,
                                 z_loss_coef=1e-3, bias_update_rate=1e-2, track_stats=True)),
    "topk_then_softmax": (TopKThenSoftmaxRouter, 2, dict(temperature=0.5, jitter_eps=0.1,
                                                         seed=4, load_balance_coef=0.1)),
    "switch": (SwitchRouter, 1, dict(capacity_factor=0.8, load_balance_coef=0.01)),
    "noisy_topk": (NoisyTopKRouter, 2, dict(noise_eps=0.2, seed=3, z_loss_coef=0.1)),
    "grouped_sigmoid": (GroupedSigmoidRouter, 2, dict(n_group=2, topk_group=1,
                                                      routed_scaling_factor=2.5, renormalize=False,
                                                      bias_update_rate=1e-2,
                                                      auto_update_bias=True)),
    "expert_choice": (ExpertChoiceRouter, 2, dict(expert_choice_slots=3, capacity_factor=1.5,
                                                  load_balance_coef=0.01, track_stats=True)),
    "attention": (AttentionRouter, 2, dict(attention_score="dot", attention_dim=5,
                                           temperature=0.3, renormalize=False)),
}  # fmt: skip
D, E = 12, 6


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), what


def _run(router: nn.Module, steps: int = 3) -> list:
    """Training steps with padding, then an eval step: decisions, gradients and state."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for step in range(steps + 1):
        router.train(step < steps)
        x = torch.randn(12, D, generator=gen, requires_grad=True)
        mask = torch.rand(12, generator=gen) > 0.25 if step == 1 else None
        dec = router(x, mask, seq_len=4)
        (dec.weights.square().sum() + dec.aux_loss + 1e-3 * dec.logits.sum()).backward()
        rec = {f: getattr(dec, f) for f in ("weights", "ids", "counts", "logits", "aux_loss")}
        rec.update({f"stats.{k}": v for k, v in dec.stats.items()})
        rec["x.grad"] = x.grad
        for name, p in router.named_parameters():
            if p.grad is not None:
                rec[f"grad.{name}"] = p.grad.clone()
                p.grad = None
        rec.update({f"state.{k}": v.clone() for k, v in router.state_dict().items()})
        out.append(rec)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_router_class_built_directly_equals_the_factory_bitwise(strategy):
    cls, k, options = CASES[strategy]
    torch.manual_seed(1234)
    made = Supervisor(D, E, k, strategy=strategy, **options)
    torch.manual_seed(1234)
    direct = cls(D, E, k, **options)
    assert type(made) is cls and cls.strategy == strategy and ROUTERS[strategy] is cls
    # same state dict keys, in the same order, initialised from the same random draws
    assert list(made.state_dict()) == list(direct.state_dict())
    assert [n for n, _ in made.named_parameters()] == [n for n, _ in direct.named_parameters()]
    for name, t in made.state_dict().items():
        _assert_bitwise(t, direct.state_dict()[name], name)
    for step, (a, b) in enumerate(zip(_run(made), _run(direct))):
        assert a.keys() == b.keys()
        for name in a:
            _assert_bitwise(a[name], b[name], f"step {step}: {name}")
    if options.get("track_stats"):
        assert made.routing_stats() == direct.routing_stats()


def test_every_strategy_is_tested_here():
    assert set(CASES) == set(STRATEGIES) == set(ROUTERS)
    assert STRATEGIES == tuple(ROUTERS)


@pytest.mark.parametrize(
    "strategy, arg, value",
    [
        ("switch", "renormalize", False),
        ("topk_then_softmax", "renormalize", False),
        ("noisy_topk", "renormalize", False),
        ("expert_choice", "renormalize", False),
        ("topk", "noise_eps", 0.5),
        ("grouped_sigmoid", "noise_eps", 0.0),
        ("topk", "attention_score", "dot"),
        ("grouped_sigmoid", "attention_dim", 4),
        ("attention", "expert_choice_slots", 2),
        ("expert_choice", "routed_scaling_factor", 2.5),
        ("expert_choice", "auto_update_bias", True),
        ("expert_choice", "n_group", 2),
        ("expert_choice", "bias_update_rate", 0.1),
        # the default's value but not its type still counts as given
        ("expert_choice", "n_group", 1.0),
    ],
)
def test_supervisor_refuses_an_argument_that_does_not_apply_to_the_strategy(strategy, arg, value):
    with pytest.raises(ValueError, match=f"{arg} does not apply to strategy='{strategy}'"):
        Supervisor(8, 4, 1 if strategy == "switch" else 2, strategy=strategy, **{arg: value})


def test_supervisor_accepts_every_argument_at_its_default_for_every_strategy():
    # MixtureOfExpertsSystem passes the group, scaling and bias arguments whatever the strategy.
    every = dict(renormalize=True, temperature=1.0, capacity_factor=None, load_balance_coef=0.0,
                 load_balance_scope="batch", z_loss_coef=0.0, bias_update_rate=0.0,
                 auto_update_bias=False, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                 noise_eps=1e-2, jitter_eps=0.0, seed=0, causal=False, expert_choice_slots=None,
                 attention_score="cosine", attention_dim=None, track_stats=False)  # fmt: skip
    assert set(every) | {"strategy"} == set(inspect.signature(Supervisor).parameters) - {
        "d_model",
        "num_experts",
        "k",
    }
    for strategy in STRATEGIES:
        k = 1 if strategy == "switch" else 2
        router = Supervisor(8, 4, k, strategy=strategy, **every)
        assert type(router) is ROUTERS[strategy] and router.slots_per_token == k


def test_causal_is_accepted_by_token_choice_and_refused_by_expert_choice():
    for strategy in STRATEGIES:
        if strategy != "expert_choice":
            Supervisor(8, 4, 1 if strategy == "switch" else 2, strategy=strategy, causal=True)
    with pytest.raises(ValueError, match="causal must be a bool"):
        Supervisor(8, 4, 1, strategy="switch", causal=1)
    with pytest.raises(ValueError, match="expert_choice.*causal"):
        ExpertChoiceRouter(8, 4, 2, causal=True)


def test_factory_errors_name_the_factory_and_the_router_class():
    with pytest.raises(ValueError, match=r"Supervisor\(strategy='topk'\) -> TopKRouter: k must"):
        Supervisor(8, 4, 9)
    with pytest.raises(ValueError, match=r"^SwitchRouter: k must be 1"):
        SwitchRouter(8, 4, 2)


@pytest.mark.parametrize(
    "cls, arg",
    [
        (SwitchRouter, "renormalize"),
        (TopKRouter, "noise_eps"),
        (ExpertChoiceRouter, "n_group"),
        (ExpertChoiceRouter, "bias_update_rate"),
        (GroupedSigmoidRouter, "attention_dim"),
    ],
)
def test_router_classes_take_only_their_own_arguments(cls, arg):
    assert arg not in router_arguments(cls)
    with pytest.raises(TypeError, match=arg):
        cls(8, 4, 1 if cls is SwitchRouter else 2, **{arg: 1})


def test_router_arguments_cover_the_factory_signature():
    factory = set(inspect.signature(Supervisor).parameters) - {
        "d_model",
        "num_experts",
        "k",
        "strategy",
    }
    accepted = set().union(*(router_arguments(cls) for cls in ROUTERS.values()))
    assert accepted == factory
    common = set(inspect.signature(BaseRouter).parameters) - {"d_model", "num_experts", "k"}
    for cls in ROUTERS.values():
        assert common <= router_arguments(cls)
    assert router_arguments(ExpertChoiceRouter) == common | {"causal", "expert_choice_slots"}
    assert router_arguments(TopKThenSoftmaxRouter) == router_arguments(SwitchRouter)
    assert router_arguments(NoisyTopKRouter) - router_arguments(SwitchRouter) == {"noise_eps"}


class HashRouter(nn.Module):
    """A router written outside the package: token t goes to experts (t + j) % E with weight
    1/S. No parameters, no statistics."""

    def __init__(self, num_experts: int, slots: int):
        super().__init__()
        self.num_experts = num_experts
        self.slots_per_token = slots

    def forward(self, x, mask=None, seq_len=None) -> RoutingDecision:
        T, E, S = x.shape[0], self.num_experts, self.slots_per_token
        t = torch.arange(T, device=x.device)[:, None]
        ids = ((t + torch.arange(S, device=x.device)[None, :]) % E).to(torch.int32)
        weights = torch.full((T, S), 1.0 / S, device=x.device)
        if mask is not None:
            ids = torch.where(mask[:, None], ids, torch.full_like(ids, -1))
            weights = torch.where(mask[:, None], weights, torch.zeros_like(weights))
        counts = routing.expert_counts(ids, E)
        logits = torch.zeros(T, E, device=x.device)
        zero = torch.zeros((), device=x.device)
        return RoutingDecision(weights, ids, counts, logits, zero, {"dropped": zero.long()})

    def update_bias(self, counts=None) -> None:
        """No selection bias."""

    def routing_stats(self) -> dict:
        raise RuntimeError("HashRouter.routing_stats: this router keeps no statistics")

    def reset_stats(self) -> None:
        raise RuntimeError("HashRouter.reset_stats: this router keeps no statistics")


def test_a_router_written_outside_the_package_satisfies_the_protocol():
    toy = HashRouter(num_experts=5, slots=2)
    assert isinstance(toy, Router)
    assert not isinstance(toy, Supervisor)  # only the package's own routers are Supervisors
    mask = torch.tensor([True, True, False, True, True, True, True])
    dec = toy(torch.randn(7, 3), mask, seq_len=7)
    assert isinstance(dec, RoutingDecision)
    assert dec.ids.shape == dec.weights.shape == (7, toy.slots_per_token)
    assert dec.ids.dtype == torch.int32 and dec.weights.dtype == torch.float32
    assert dec.ids[2].tolist() == [-1, -1] and dec.ids[0].tolist() == [0, 1]
    assert dec.counts.tolist() == [int((dec.ids == e).sum()) for e in range(5)]
    assert int(dec.counts.sum()) == 12
    toy.update_bias(dec.counts)
    with pytest.raises(RuntimeError, match="keeps no statistics"):
        toy.routing_stats()


def test_an_object_missing_a_protocol_member_is_not_a_router():
    class NoBiasHook(nn.Module):
        num_experts = 4
        slots_per_token = 1

        def forward(self, x, mask=None, seq_len=None):
            raise AssertionError("not called")

        def routing_stats(self):
            return {}

        def reset_stats(self):
            pass

    assert not isinstance(NoBiasHook(), Router)  # no update_bias
    assert not isinstance(nn.Linear(4, 4), Router)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_router_of_the_package_is_a_router_and_a_supervisor(strategy):
    router = Supervisor(8, 4, 1 if strategy == "switch" else 2, strategy=strategy)
    assert isinstance(router, Router) and isinstance(router, Supervisor)
    assert isinstance(router, BaseRouter) and isinstance(router, nn.Module)
    assert issubclass(ROUTERS[strategy], Supervisor)


def test_supervisor_is_a_factory_that_cannot_be_subclassed():
    with pytest.raises(TypeError, match="factory"):

        class Mine(Supervisor):  # noqa: F841
            pass


def test_update_bias_is_a_no_op_without_a_selection_bias():
    router = ExpertChoiceRouter(8, 4, 2).train()
    router(torch.randn(10, 8))
    before = {k: v.clone() for k, v in router.state_dict().items()}
    router.update_bias()
    router.update_bias(torch.tensor([9, 0, 0, 1]))
    assert not router.uses_selection_bias
    for name, t in router.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_routing_stats_error_names_the_router_class():
    with pytest.raises(RuntimeError, match=r"NoisyTopKRouter.routing_stats: .*not tracked"):
        NoisyTopKRouter(8, 4, 2).routing_stats()


def test_old_module_paths_re_export_the_same_objects():
    for name in (
        "RoutingDecision",
        "Supervisor",
        "STRATEGIES",
        "CapacityResult",
        "expert_capacity",
        "apply_capacity",
        "load_balancing_loss",
        "router_z_loss",
        "router_entropy",
        "expert_counts",
        "counter_uniform",
        "counter_normal",
    ):
        assert getattr(old_home, name) is getattr(routing, name), name
    import moe_framework

    assert moe_framework.Supervisor is Supervisor
    assert moe_framework.RoutingDecision is RoutingDecision


def test_no_class_in_the_routing_package_exceeds_400_lines():
    folder = Path(routing.__file__).parent
    sizes = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert sizes and "topk.py:TopKRouter" in sizes
    too_long = {name: n for name, n in sizes.items() if n > 400}
    assert not too_long, too_long


def test_docs_routing_examples_run_and_print_what_they_say(capsys):
    doc = Path(__file__).resolve().parents[2] / "docs" / "routing.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 3  # the runnable example and the two ways of writing a router
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([64, 2])" in out
    assert "[[0, 1], [1, 2], [2, 3]]" in out
    assert "torch.Size([8, 2]) True" in out
