"""The machinery every router of this package shares: a linear gate, temperature, input jitter,
capacity, the balancing losses, telemetry and the noise step. Strategies extend
:class:`BaseRouter` (expert choice) or :class:`~moe_framework.routing.token_choice.TokenChoiceRouter`
(every token picks its experts) and add only their own arguments."""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import nn

from ..metrics import RoutingStats
from ._checks import (
    bad,
    check_bools,
    check_choice,
    check_floats,
    check_ints,
    check_non_negative,
    is_real,
)
from .base import RoutingDecision
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .regularizers import expert_slot_dropout, router_input_dropout
from .rng import counter_uniform

__all__ = ["BaseRouter", "Selection"]

from ..options import LOAD_BALANCE_SCOPES


class Selection(NamedTuple):
    """What a strategy selected for T tokens, before losses and telemetry.

    weights [T, S] float32 and ids [T, S] int32 (-1 = empty slot) after masking and capacity;
    selected [T, S] the ids before capacity drops (what the aux loss and the bias balancing
    count: the router is charged for what it asked for); counts [E] int32 slots per expert of
    ``ids``; dropped 0-dim int64 slots dropped by capacity.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    selected: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


class BaseRouter(nn.Module):
    """Shared base of the routers: x [T, d_model] float -> :class:`RoutingDecision`.

    Implements the :class:`~moe_framework.routing.base.Router` protocol. A subclass sets
    ``strategy`` and implements ``_decide``; everything else (logits, jitter, losses, telemetry,
    state) is here.

    Args (the arguments every router takes; keyword-only after ``k``):
        d_model: width of the tokens.
        num_experts: E.
        k: experts per token (token choice) or the average per token (expert choice).
        temperature: logits are divided by it before scoring (> 0).
        capacity_factor: None = dropless (default). A float > 0 enables capacity mode: each expert
            takes at most ``ceil(capacity_factor * T * k / E)`` slots in token order, overflow
            slots become id -1 / weight 0 and are counted in ``stats["dropped"]``.
        load_balance_coef: weight of the Switch/GShard aux loss in ``aux_loss`` (0 = off).
        load_balance_scope: "batch" or "sequence" (then pass ``seq_len`` to forward).
        z_loss_coef: weight of the ST-MoE router z-loss in ``aux_loss`` (0 = off).
        jitter_eps: multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` in training (Switch).
        seed: seed of the counter-based noise (noise is a function of seed, step, token, column).
        track_stats: update ``self.stats`` (a :class:`~moe_framework.metrics.RoutingStats`) in
            every forward, training or eval.

    State (the names are the state-dict keys): ``gate.weight`` [E, d_model] (routers scoring with
    a linear gate), ``selection_bias`` [E] float32 (kept float32 under ``.to(bf16)``),
    ``load_accumulator`` [E] int64, ``noise_step`` 0-dim int64 (advanced by each training forward
    that draws noise, so a resumed run draws the same noise).
    """

    strategy: ClassVar[str] = ""
    selection_bias: torch.Tensor
    load_accumulator: torch.Tensor
    noise_step: torch.Tensor
    stats: RoutingStats
    # Whether logits come from a linear gate `gate` [E, d_model] (attention scores differently).
    _gate_logits: ClassVar[bool] = True
    # Whether training forwards draw noise besides the input jitter (noisy top-k).
    _draws_noise: ClassVar[bool] = False
    # Training-time regularisers, set by moe_framework.training.apply_training_options (or by
    # hand); 0 = off. Plain attributes, not constructor arguments: they are options of the
    # training step, not of the router (docs/adaptive_routing.md).
    router_dropout: float = 0.0
    expert_dropout: float = 0.0

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        temperature: float = 1.0,
        capacity_factor: Optional[float] = None,
        load_balance_coef: float = 0.0,
        load_balance_scope: str = "batch",
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        seed: int = 0,
        track_stats: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        check_bools(owner, track_stats=track_stats)
        check_ints(owner, d_model=d_model, num_experts=num_experts, k=k, seed=seed)
        check_floats(
            owner,
            temperature=temperature,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        check_choice(owner, "load_balance_scope", load_balance_scope, LOAD_BALANCE_SCOPES)
        if d_model < 1:
            bad(owner, "d_model", "a positive int", d_model)
        if num_experts < 1:
            bad(owner, "num_experts", "a positive int", num_experts)
        if not 1 <= k <= num_experts:
            bad(owner, "k", f"in [1, num_experts={num_experts}]", k)
        if seed < 0:
            bad(owner, "seed", "an int >= 0", seed)
        if not (temperature > 0 and math.isfinite(temperature)):
            bad(owner, "temperature", "a finite float > 0", temperature)
        if capacity_factor is not None and not (
            is_real(capacity_factor) and capacity_factor > 0 and math.isfinite(capacity_factor)
        ):
            bad(owner, "capacity_factor", "None (dropless) or a finite float > 0", capacity_factor)
        check_non_negative(owner, load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef)
        if not (0 <= jitter_eps < 1):
            bad(owner, "jitter_eps", "in [0, 1)", jitter_eps)

        self.d_model = int(d_model)
        self.num_experts = int(num_experts)
        self.k = int(k)
        self.temperature = float(temperature)
        self.capacity_factor = capacity_factor
        self.load_balance_coef = float(load_balance_coef)
        self.load_balance_scope = load_balance_scope
        self.z_loss_coef = float(z_loss_coef)
        self.jitter_eps = float(jitter_eps)
        self.seed = int(seed)
        self.track_stats = track_stats
        self._slots = self.k
        if self._gate_logits:
            self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Selection bias (aux-loss-free balancing; DeepSeek-V3's e_score_correction_bias). Kept in
        # the state dict so a resumed run and a loaded DeepSeek checkpoint select the same experts.
        # Every router has the three buffers, so state dicts have the same keys for every strategy.
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load_accumulator", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.int64))
        self.stats = RoutingStats(num_experts)

    def _apply(self, fn, recurse=True):
        # The selection bias stays float32 under module.to(torch.bfloat16): updates of u = 1e-3
        # would vanish in bf16's 8-bit mantissa (DeepSeek-V3 keeps it in fp32 too).
        old = self._buffers["selection_bias"]
        super()._apply(fn, recurse)
        new = self._buffers["selection_bias"]
        assert old is not None and new is not None
        if new.dtype != torch.float32:
            self._buffers["selection_bias"] = old.to(device=new.device)
        return self

    @property
    def slots_per_token(self) -> int:
        """Static number of slots per token in the decisions this router returns."""
        return self._slots

    @property
    def uses_selection_bias(self) -> bool:
        """Whether ``selection_bias`` shifts expert selection (False unless a strategy uses it)."""
        return False

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity={self.capacity_factor}"
        return (
            f"strategy={self.strategy}, num_experts={self.num_experts}, k={self.k}, "
            f"slots_per_token={self._slots}, {cap}, temperature={self.temperature}"
        )

    # -- logits --------------------------------------------------------------------------------

    def router_logits(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x [T, d_model] -> router logits [T, E] float32, temperature applied, no noise.
        ``context`` (routers that take one): added through :meth:`_context_logits`."""
        logits = self._raw_logits(x)
        if context is not None:
            logits = logits + self._context_logits(context)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def _raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x).float()

    def _context_logits(self, context: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__}: this router takes no context")

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        # What the aux loss and the entropy read (softmax; sigmoid scoring overrides it).
        return torch.softmax(logits, dim=-1)

    # -- forward -------------------------------------------------------------------------------

    def _decide(
        self, x: torch.Tensor, logits: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} must implement _decide")

    def _record_training_load(self, selected: torch.Tensor) -> None:
        """Called by each training forward with the selected ids (routers with a selection bias
        accumulate or apply the load here)."""

    def _check_inputs(self, x, mask, seq_len) -> None:
        owner = type(self).__name__
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"{owner}: x must be [T, d_model={self.d_model}], got {tuple(x.shape)}"
            )
        if mask is not None and (mask.dim() != 1 or mask.shape[0] != x.shape[0]):
            raise ValueError(f"{owner}: mask must be [T={x.shape[0]}] bool, got {mask.shape}")
        if self.load_balance_scope == "sequence" and self.load_balance_coef > 0 and seq_len is None:
            raise ValueError(f"{owner}: load_balance_scope='sequence' needs seq_len in forward")

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
    ) -> RoutingDecision:
        """Route T tokens.

        x: [T, d_model] float. mask: optional [T] bool, True for real tokens; padding tokens get
        empty slots (id -1, weight 0), use no capacity and are left out of losses and telemetry.
        seq_len: tokens per sequence (T must be a multiple), needed by
        ``load_balance_scope="sequence"``.
        Returns a :class:`RoutingDecision` with ``slots_per_token`` slots per token.
        """
        return self._route(x, mask, seq_len, None)

    def _route(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        seq_len: Optional[int],
        context: Optional[torch.Tensor],
    ) -> RoutingDecision:
        self._check_inputs(x, mask, seq_len)
        T = x.shape[0]
        if mask is not None:
            mask = mask.to(torch.bool)
        r_drop = self.training and self.router_dropout > 0
        e_drop = self.training and self.expert_dropout > 0
        noisy = self.training and (self.jitter_eps > 0 or self._draws_noise or r_drop or e_drop)

        x_r = x
        if self.training and self.jitter_eps > 0:
            u = counter_uniform(self.seed, self.noise_step, (T, self.d_model), 0)
            x_r = x * (1.0 + self.jitter_eps * (2.0 * u - 1.0)).to(x.dtype)
        if r_drop:
            x_r = router_input_dropout(x_r, self.router_dropout, self.seed, self.noise_step)
        logits = self.router_logits(x_r, context)
        sel = self._decide(x_r, logits, mask)
        aux, stats = self._losses(logits, sel, mask, seq_len)
        if e_drop:
            sel, stats["expert_dropout"] = expert_slot_dropout(
                sel, self.expert_dropout, self.num_experts, self.seed, self.noise_step
            )

        if self.training:
            self._record_training_load(sel.selected)
        if noisy:
            with torch.no_grad():
                self.noise_step.add_(1)

        decision = RoutingDecision(sel.weights, sel.ids, sel.counts, logits, aux, stats)
        if self.track_stats:
            self.stats.update(decision)
        return decision

    def _losses(self, logits, sel: Selection, mask, seq_len):
        """aux_loss (the enabled balancing losses, weighted) and the stats dict of a decision."""
        stats: dict = {"dropped": sel.dropped}
        aux = logits.new_zeros(())
        want_stats = self.track_stats
        probs = None
        lb_on, z_on = self.load_balance_coef > 0, self.z_loss_coef > 0
        if lb_on or want_stats:
            scope_len = seq_len if self.load_balance_scope == "sequence" else None
            if lb_on:
                probs = self._probs(logits)
                lb = load_balancing_loss(probs, sel.selected, mask, scope_len)
                aux = aux + self.load_balance_coef * lb
            else:  # telemetry only: no autograd graph
                with torch.no_grad():
                    probs = self._probs(logits)
                    lb = load_balancing_loss(probs, sel.selected, mask, scope_len)
            stats["load_loss"] = lb.detach()
        if z_on or want_stats:
            if z_on:
                z = router_z_loss(logits, mask)
                aux = aux + self.z_loss_coef * z
            else:
                with torch.no_grad():
                    z = router_z_loss(logits, mask)
            stats["z_loss"] = z.detach()
        if want_stats:
            assert probs is not None  # computed with the load loss above
            with torch.no_grad():
                stats["entropy_sum"] = router_entropy(probs.detach(), mask)
                T = logits.shape[0]
                stats["tokens"] = (
                    torch.full((), T, dtype=torch.int64, device=logits.device)
                    if mask is None
                    else mask.sum()
                )
        return aux, stats

    # -- balancing -----------------------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing hook of the :class:`~moe_framework.routing.base.Router`
        protocol: a no-op here (this router has no selection bias to update)."""

    # -- telemetry -----------------------------------------------------------------------------

    def routing_stats(self) -> dict:
        """Telemetry accumulated since the last reset, as a plain dict (reads the device once).

        Raises ``RuntimeError`` when statistics were never tracked (``track_stats=False`` and no
        forward was ever recorded): zeros would read as "every expert is dead"."""
        if not self.track_stats and int(self.stats.get_buffer("steps")) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.routing_stats: routing statistics are not tracked; build "
                "the router with track_stats=True (Supervisor(..., track_stats=True); "
                "MoEConfig(track_stats=True) for a MixtureOfExpertsSystem), or set "
                "router.track_stats = True, then run forward passes"
            )
        return self.stats.routing_stats()

    def reset_stats(self) -> None:
        """Clear the telemetry accumulators."""
        self.stats.reset()
