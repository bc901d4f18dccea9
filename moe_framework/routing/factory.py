"""The strategy registry (:data:`ROUTERS`, :data:`STRATEGIES`) and the :class:`Supervisor`
factory, which builds the router of a strategy from today's flat keyword arguments."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Type

from ..options import STRATEGIES
from ._checks import check_bools, check_choice, is_int, is_real
from .attention import AttentionRouter
from .common import BaseRouter
from .context import ContextRouter
from .dense import DenseRouter
from .expert_choice import ExpertChoiceRouter
from .grouped_sigmoid import GroupedSigmoidRouter
from .memory_bank import MemoryBankRouter
from .mlp import MLPRouter
from .noisy_topk import NoisyTopKRouter
from .switch import SwitchRouter
from .topk import TopKRouter
from .topk_then_softmax import TopKThenSoftmaxRouter

__all__ = ["ROUTERS", "ROUTER_KINDS", "STRATEGIES", "Supervisor", "make_router", "router_arguments"]

#: strategy name -> router class (the one place a strategy is registered).
ROUTERS: Dict[str, Type[BaseRouter]] = {
    cls.strategy: cls
    for cls in (
        TopKRouter,
        TopKThenSoftmaxRouter,
        SwitchRouter,
        NoisyTopKRouter,
        GroupedSigmoidRouter,
        ExpertChoiceRouter,
        AttentionRouter,
    )
}

# The strategy names are defined once, in moe_framework.options; each router class carries its own
# and the registry must list exactly those, in that order.
if tuple(ROUTERS) != STRATEGIES:
    raise ImportError(
        f"routing: ROUTERS {tuple(ROUTERS)} do not match options.STRATEGIES {STRATEGIES}"
    )


# ---- issue 17: router kinds built directly (not MoEConfig strategies) ----------------------
#: kind name -> router class: every strategy of :data:`ROUTERS` plus the routers whose options
#: are not config fields (docs/adaptive_routing.md). Build them with :func:`make_router` or the
#: class itself.
ROUTER_KINDS: Dict[str, Type[BaseRouter]] = {
    **ROUTERS,
    **{cls.strategy: cls for cls in (MLPRouter, ContextRouter, DenseRouter, MemoryBankRouter)},
}


def make_router(
    kind: str, d_model: int, num_experts: int, k: Optional[int] = 2, **options: Any
) -> BaseRouter:
    """The router of ``kind`` (a key of :data:`ROUTER_KINDS`) built with ``options`` (its class's
    own keyword arguments; a ``TypeError`` names one it does not take). ``k`` is ignored by
    ``"dense"`` (all experts)."""
    check_choice("make_router", "kind", kind, tuple(ROUTER_KINDS))
    cls = ROUTER_KINDS[kind]
    if cls is DenseRouter:
        return DenseRouter(d_model, num_experts, None, **options)
    if k is None:
        raise ValueError(f"make_router: k must be an int for kind={kind!r}, got None")
    return cls(d_model, num_experts, k, **options)


# ---- end issue 17 ----------------------------------------------------------------------------


def router_arguments(cls: type) -> FrozenSet[str]:
    """The keyword arguments a router class accepts: the keyword-only parameters of its
    ``__init__`` and of the ``__init__`` s it forwards ``**options`` to, up the class chain."""
    names: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names)


def _is_default(value, default) -> bool:
    # Equal to the default and of the same kind, so n_group=1.0 or renormalize=1 still count as
    # given (and are refused) where the argument does not apply.
    if default is None or isinstance(default, (bool, str)):
        return value is default or (type(value) is type(default) and value == default)
    if isinstance(default, int):
        return is_int(value) and value == default
    return is_real(value) and value == default


class _SupervisorFactory(type):
    """Metaclass of :class:`Supervisor`: calling the class builds the router of ``strategy``,
    and ``isinstance(obj, Supervisor)`` is true of every router of this package."""

    def __call__(
        cls,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        strategy: str = "topk",
        renormalize: bool = True,
        temperature: float = 1.0,
        capacity_factor: Optional[float] = None,
        load_balance_coef: float = 0.0,
        load_balance_scope: str = "batch",
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        auto_update_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        noise_eps: float = 1e-2,
        jitter_eps: float = 0.0,
        seed: int = 0,
        causal: bool = False,
        expert_choice_slots: Optional[int] = None,
        attention_score: str = "cosine",
        attention_dim: Optional[int] = None,
        track_stats: bool = False,
    ) -> BaseRouter:
        given = dict(locals())  # the keyword arguments, before any other local is bound
        for name in ("cls", "d_model", "num_experts", "k", "strategy"):
            del given[name]
        check_choice("Supervisor", "strategy", strategy, STRATEGIES)
        router = ROUTERS[strategy]
        accepted = router_arguments(router)
        kwargs = {}
        for name, value in given.items():
            if name in accepted:
                kwargs[name] = value
            elif name == "causal":
                # A property of the model, not of the router: every strategy but expert choice
                # is causal, so it is only checked (and expert choice refuses True).
                check_bools("Supervisor", causal=value)
            elif not _is_default(value, _DEFAULTS[name]):
                raise ValueError(
                    f"Supervisor: {name} does not apply to strategy={strategy!r} "
                    f"({router.__name__} takes {', '.join(sorted(accepted))}); leave it at its "
                    f"default {_DEFAULTS[name]!r}, got {value!r}"
                )
        try:
            return router(d_model, num_experts, k, **kwargs)
        except ValueError as exc:
            raise ValueError(f"Supervisor(strategy={strategy!r}) -> {exc}") from None

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, BaseRouter)

    def __subclasscheck__(cls, sub) -> bool:
        return isinstance(sub, type) and issubclass(sub, BaseRouter)


if TYPE_CHECKING:
    # Type checkers do not read a metaclass __call__: they see Supervisor as what its calls
    # return and what isinstance(router, Supervisor) accepts at run time, a router class.
    class Supervisor(BaseRouter):
        def __init__(
            self,
            d_model: int,
            num_experts: int,
            k: int = 2,
            *,
            strategy: str = "topk",
            **options: Any,
        ) -> None: ...


# The factory's keyword arguments and their defaults (the one-class Supervisor's signature).
_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(_SupervisorFactory.__call__).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "strategy"
}


class Supervisor(metaclass=_SupervisorFactory):  # type: ignore[no-redef]
    """Router factory: ``Supervisor(d_model, num_experts, k, strategy=..., **options)`` returns
    the router class of ``strategy`` (:data:`ROUTERS`) built with the options that apply to it.

    Every keyword argument the one-class ``Supervisor`` accepted is accepted, so existing code
    and configs run unchanged. An argument that does not apply to the chosen strategy must stay
    at its default (a ``ValueError`` names it otherwise); ``causal`` is accepted by every
    strategy and refused as True only by "expert_choice". ``isinstance(router, Supervisor)`` is
    true of every router of :mod:`moe_framework.routing`; new code should build the router
    classes directly and type against the :class:`~moe_framework.routing.base.Router` protocol.

    Args (all keyword-only after ``k``):
        strategy: one of :data:`STRATEGIES` (default "topk", Mixtral): "topk"
            (:class:`TopKRouter`), "topk_then_softmax" (:class:`TopKThenSoftmaxRouter`),
            "switch" (:class:`SwitchRouter`), "noisy_topk" (:class:`NoisyTopKRouter`),
            "grouped_sigmoid" (:class:`GroupedSigmoidRouter`), "expert_choice"
            (:class:`ExpertChoiceRouter`), "attention" (:class:`AttentionRouter`).
        renormalize: "topk"/"grouped_sigmoid"/"attention": divide the k selected weights by their
            sum.
        temperature: logits are divided by it before scoring (all strategies; > 0).
        capacity_factor: None = dropless (default). A float > 0 enables capacity mode: each expert
            takes at most ``ceil(capacity_factor * T * k / E)`` slots in token order, overflow
            slots become id -1 / weight 0 and are counted in ``stats["dropped"]``. For
            "expert_choice" it sets the tokens each expert picks (default 1.0).
        load_balance_coef: weight of the Switch/GShard aux loss in ``aux_loss`` (0 = off).
        load_balance_scope: "batch" or "sequence" (then pass ``seq_len`` to forward).
        z_loss_coef: weight of the ST-MoE router z-loss in ``aux_loss`` (0 = off).
        bias_update_rate: u of the aux-loss-free balancing ``b_i += u * sign(mean_load - load_i)``
            (0 = off; token-choice strategies). The bias only shifts which experts are selected.
        auto_update_bias: update the bias inside every training forward from that step's load
            instead of waiting for ``update_bias()``.
        n_group, topk_group: group-limited routing (token-choice strategies).
        routed_scaling_factor: multiplies the weights (token-choice; DeepSeek-V3 uses 2.5).
        noise_eps: "noisy_topk": floor added to the learned noise std.
        jitter_eps: multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` in training (Switch).
        seed: seed of the counter-based noise (noise is a function of seed, step, token, expert).
        causal: the model is autoregressive; refuses "expert_choice" (it looks at future tokens).
        expert_choice_slots: static slots per token for "expert_choice" (default k).
        attention_score: "cosine" or "dot" for "attention"; attention_dim its width.
        track_stats: update ``router.stats`` (a :class:`~moe_framework.metrics.RoutingStats`) in
            every forward, training or eval.

    Returns:
        A :class:`~moe_framework.routing.common.BaseRouter` subclass instance (an ``nn.Module``
        implementing :class:`~moe_framework.routing.base.Router`).
    """

    def __init_subclass__(cls, **kwargs):
        raise TypeError(
            "Supervisor is a factory and cannot be subclassed; subclass "
            "moe_framework.routing.BaseRouter (or TokenChoiceRouter, or one of the router "
            "classes) instead"
        )
