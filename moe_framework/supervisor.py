"""Supervisors: the router that decides which experts see which tokens.

One :class:`Supervisor` module covers every routing strategy the package ships (``strategy=``),
opt-in capacity limits, the load-balancing losses (Switch/GShard aux loss, ST-MoE z-loss) and
DeepSeek-V3's aux-loss-free bias balancing. Everything runs on the device: no ``.item()``, no
``nonzero``, no data-dependent shape, so a supervisor traces under ``torch.compile(fullgraph=True)``
and can be captured in a CUDA graph.

The output is always a :class:`RoutingDecision` with a static number of slots per token
(``supervisor.slots_per_token``); a slot whose id is -1 is empty (dropped by capacity, padding, or
an unused expert-choice slot) and has weight 0. See ``docs/routing.md`` for the formulas.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .metrics import RoutingStats

__all__ = [
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
]

STRATEGIES = (
    "topk",
    "topk_then_softmax",
    "switch",
    "noisy_topk",
    "grouped_sigmoid",
    "expert_choice",
    "attention",
)


class RoutingDecision(NamedTuple):
    """What a supervisor decides for a batch of T tokens (all device tensors, no host sync).

    weights: [T, k] float32 gate weight of each slot (0 for a dropped slot).
    ids:     [T, k] int32 expert of each slot (-1 for a dropped slot).
    counts:  [E] int32 slots actually routed to each expert.
    logits:  [T, E] float32 router logits (what the balancing losses read).
    aux_loss: 0-dim float32, the weighted sum of the enabled balancing losses (0 when none).
    stats:   dict of 0-dim or [E] device tensors (e.g. "dropped", "z_loss", "load_loss").
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict


# ------------------------------------------------------------------------------------------------
# Functional pieces (public: usable without the module, and what the tests pin)
# ------------------------------------------------------------------------------------------------


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert: ids [T, k] int (-1 ignored) -> counts [E] int32 (no host sync)."""
    flat = ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    bins = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    bins = bins.scatter_add(0, key, torch.ones_like(key))
    return bins[:num_experts].to(torch.int32)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert may take: ``ceil(capacity_factor * T * k / E)``, at most T, at least 0.

    Static for a static T (it only reads shapes), so buffers sized by it are CUDA-graph safe.
    """
    cap = math.ceil(capacity_factor * num_tokens * k / num_experts)
    return max(0, min(cap, num_tokens))


class CapacityResult(NamedTuple):
    """Output of :func:`apply_capacity` (all [T, k] except ``dropped``).

    weights:  float, 0 where the slot overflowed.
    ids:      int32, -1 where the slot overflowed (or was already -1).
    position: int64 position of the slot inside its expert's buffer (its rank among the slots routed
              to that expert, in token order); -1 for dropped/empty slots.
    dropped:  0-dim int64, number of slots that had an expert but overflowed its capacity.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    position: torch.Tensor
    dropped: torch.Tensor


def apply_capacity(
    weights: torch.Tensor, ids: torch.Tensor, num_experts: int, capacity: int
) -> CapacityResult:
    """Keep at most ``capacity`` slots per expert, first come first served in token order.

    Slots are ranked in the flattened token-major order ``s = t*k + j`` (the order ``ops.permute``
    uses): the stable counting sort of ``ops.permute`` (run on a zero-width ``[T, 0]`` input, so
    nothing but the order is computed) gives each slot its row ``row_of_slot[s]`` in the
    expert-sorted layout, and ``position = row_of_slot[s] - offsets[expert]``: no [T*k, E] one-hot,
    no comparison sort (torch's stable int64 CPU sort is ~300x slower), no host sync. Slots at
    position >= capacity get id -1 and weight 0 and are counted in ``dropped``.

    weights [T, k] float, ids [T, k] int (-1 = already empty) -> :class:`CapacityResult`.
    """
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    empty = torch.empty(T, 0, dtype=torch.float32, device=ids.device)
    _, row_of_slot, offsets = ops.permute(empty, ids, num_experts)
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    position = row_of_slot - offsets[key]
    routed = flat >= 0
    keep = routed & (position < capacity)
    dropped = (routed & ~keep).sum()
    new_ids = torch.where(keep, flat, torch.full_like(flat, -1)).to(torch.int32).reshape(T, k)
    new_w = torch.where(keep.reshape(T, k), weights, torch.zeros_like(weights))
    position = torch.where(keep, position, torch.full_like(position, -1)).reshape(T, k)
    return CapacityResult(new_w, new_ids, position, dropped)


def _token_weights(mask: Optional[torch.Tensor], T: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(T, dtype=torch.float32, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_i f_i * P_i`` (0-dim float32, differentiable in probs).

    probs [T, E] float: router probabilities (rows sum to 1). ids [T, k] int: the experts each token
    selected (-1 ignored). ``f_i`` is the number of slots on expert i per token (it sums to k over
    experts, as in Hugging Face's ``load_balancing_loss_func``; a perfectly balanced router scores
    k), ``P_i`` the mean probability of expert i. mask [T] bool (True = real token) excludes
    padding from both means. With ``seq_len`` the tokens are read as [T / seq_len, seq_len]
    sequences, the loss is computed per sequence and averaged over sequences that have at least
    one real token.
    """
    T, E = probs.shape
    # float32 at least; float64 stays float64 (gradcheck).
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    w = _token_weights(mask, T, probs.device).to(p.dtype)
    k = ids.shape[1]
    # f from a weighted bincount of the slots (O(T*k), no [T, E] one-hot); P as a mat-vec.
    e = ids.reshape(-1).long()
    slot_w = w.repeat_interleave(k) if k > 1 else w
    if seq_len is None:
        n = w.sum().clamp_min(1.0)
        key = torch.where(e < 0, torch.full_like(e, E), e)
        f = torch.zeros(E + 1, dtype=p.dtype, device=p.device).scatter_add(0, key, slot_w)[:E]
        P = w @ p
        return E * (f * P).sum() / (n * n)
    if seq_len <= 0 or T % seq_len != 0:
        raise ValueError(
            f"load_balancing_loss: seq_len must divide the number of tokens T={T}, got {seq_len}"
        )
    B = T // seq_len
    n_seq = w.reshape(B, seq_len).sum(1)
    n = n_seq.clamp_min(1.0)
    seq = torch.arange(T, device=p.device).repeat_interleave(k) // seq_len
    key = torch.where(e < 0, torch.full_like(e, B * (E + 1) - 1), seq * (E + 1) + e)
    f = torch.zeros(B * (E + 1), dtype=p.dtype, device=p.device).scatter_add(0, key, slot_w)
    f = f.reshape(B, E + 1)[:, :E]
    P = torch.bmm(w.reshape(B, 1, seq_len), p.reshape(B, seq_len, E)).reshape(B, E)
    per_seq = E * (f * P).sum(-1) / (n * n)
    has_tokens = (n_seq > 0).to(p.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens (0-dim float32)."""
    T = logits.shape[0]
    w = _token_weights(mask, T, logits.device)
    lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    w = w.to(lse.dtype)
    return (lse.square() * w).sum() / w.sum().clamp_min(1.0)


def router_entropy(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over real tokens of the entropy (nats) of each token's router distribution (0-dim f32)."""
    T = probs.shape[0]
    w = _token_weights(mask, T, probs.device)
    p = probs.float()
    ent = -(p * torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
    return (ent * w).sum()


# Counter-based noise: a stateless integer hash of (seed, step, row, column) evaluated with tensor
# ops. Unlike a torch.Generator it has no hidden state, so it traces under torch.compile, gives the
# same numbers on CPU and GPU, and a run resumed from a state dict (which holds the step counter)
# reproduces the same noise.
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for 0 <= x < 2^32 in int64. A multiplier >= 2^31 is replaced by c - 2^32
    # (same product mod 2^32), so |x * c| < 2^63: no int64 overflow on any backend.
    return (x * (c - (1 << 32) if c >= (1 << 31) else c)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit avalanche hash (xorshift-multiply "lowbias32" constants).
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _counter_bits(seed: int, step: torch.Tensor, shape, stream: int, device) -> torch.Tensor:
    rows, cols = shape
    base = _hash32(_hash32(torch.full((), seed & _M32, dtype=torch.int64, device=device)) ^ step)
    base = _hash32(base ^ (stream * 0x9E3779B9 & _M32))
    # Rows and columns are hashed separately (cheap: T + C hashes), then one hash per element.
    r = _hash32(torch.arange(rows, dtype=torch.int64, device=device) ^ base)[:, None]
    c = _hash32(torch.arange(cols, dtype=torch.int64, device=device) * 0x27D4EB2F + 0x165667B1)
    return _hash32(r ^ c[None, :])


def counter_uniform(seed: int, step: torch.Tensor, shape, stream: int = 0, device=None):
    """Uniform floats in (0, 1) of ``shape`` = (rows, cols), a pure function of
    (seed, step, stream, row, column). step: 0-dim int64 tensor (a step counter buffer)."""
    device = step.device if device is None else device
    bits = _counter_bits(seed, step.to(device=device, dtype=torch.int64), shape, stream, device)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_normal(seed: int, step: torch.Tensor, shape, stream: int = 0, device=None):
    """Standard normal floats of ``shape`` (Box-Muller over two counter-based uniform streams)."""
    u1 = counter_uniform(seed, step, shape, 2 * stream, device)
    u2 = counter_uniform(seed, step, shape, 2 * stream + 1, device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    # numpy and torch integer scalars count; bool does not (True would be a silent 1).
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _route(logits, k, scoring, correction_bias, n_group, topk_group, renormalize, scaling_factor):
    return ops.route(
        logits,
        k,
        scoring=scoring,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        renormalize=renormalize,
        scaling_factor=scaling_factor,
    )


class Supervisor(nn.Module):
    """Router: x [T, d_model] float -> :class:`RoutingDecision` with ``slots_per_token`` slots.

    Args (all keyword-only after ``k``):
        strategy: one of :data:`STRATEGIES` (default "topk", Mixtral).
        renormalize: "topk"/"grouped_sigmoid": divide the k selected weights by their sum.
        temperature: logits are divided by it before scoring (all strategies; > 0).
        capacity_factor: None = dropless (default). A float > 0 enables capacity mode: each expert
            takes at most ``ceil(capacity_factor * T * k / E)`` slots in token order, overflow
            slots become id -1 / weight 0 and are counted in ``stats["dropped"]``. For
            "expert_choice" it sets the tokens each expert picks (default 1.0).
        load_balance_coef: weight of the Switch/GShard aux loss in ``aux_loss`` (0 = off).
        load_balance_scope: "batch" or "sequence" (then pass ``seq_len`` to forward).
        z_loss_coef: weight of the ST-MoE router z-loss in ``aux_loss`` (0 = off).
        bias_update_rate: u of the aux-loss-free balancing ``b_i += u * sign(mean_load - load_i)``
            (0 = off). The bias only shifts which experts are selected, never the weights.
        auto_update_bias: update the bias inside every training forward from that step's load
            instead of waiting for :meth:`update_bias`.
        n_group, topk_group: group-limited routing (experts in n_group groups; each token picks
            experts only from its topk_group best groups).
        routed_scaling_factor: multiplies the weights ("grouped_sigmoid", DeepSeek-V3 uses 2.5).
        noise_eps: "noisy_topk": floor added to the learned noise std.
        jitter_eps: multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` in training (Switch).
        seed: seed of the counter-based noise (noise is a function of seed, step, token, expert).
        causal: the model is autoregressive; refuses "expert_choice" (it looks at future tokens).
        expert_choice_slots: static slots per token for "expert_choice" (default k: the static
            shapes of top-k routing; picks beyond it are dropped and counted).
        attention_score: "cosine" or "dot" for the "attention" strategy; attention_dim its width.
        track_stats: update ``self.stats`` (a :class:`~moe_framework.metrics.RoutingStats`) in
            every forward, training or eval.
    """

    def __init__(
        self,
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
    ):
        super().__init__()

        def bad(arg, expected, got):
            raise ValueError(f"Supervisor: {arg} must be {expected}, got {got!r}")

        # bool is an int and a str is truthy in Python: every argument is checked for its type
        # first, so d_model=True or renormalize="no" is an error, not a silent 1 or True.
        for name, v in (
            ("renormalize", renormalize),
            ("auto_update_bias", auto_update_bias),
            ("causal", causal),
            ("track_stats", track_stats),
        ):
            if not isinstance(v, bool):
                bad(name, "a bool", v)
        for name, v in (
            ("d_model", d_model),
            ("num_experts", num_experts),
            ("k", k),
            ("n_group", n_group),
            ("topk_group", topk_group),
            ("seed", seed),
        ):
            if not _is_int(v):
                bad(name, "an int", v)
        for name, v in (
            ("temperature", temperature),
            ("load_balance_coef", load_balance_coef),
            ("z_loss_coef", z_loss_coef),
            ("bias_update_rate", bias_update_rate),
            ("routed_scaling_factor", routed_scaling_factor),
            ("noise_eps", noise_eps),
            ("jitter_eps", jitter_eps),
        ):
            if not _is_real(v):
                bad(name, "a float", v)
        for name, v, allowed in (
            ("strategy", strategy, STRATEGIES),
            ("load_balance_scope", load_balance_scope, ("batch", "sequence")),
            ("attention_score", attention_score, ("cosine", "dot")),
        ):
            if not isinstance(v, str) or v not in allowed:
                bad(name, f"one of {allowed}", v)
        if d_model < 1:
            bad("d_model", "a positive int", d_model)
        if num_experts < 1:
            bad("num_experts", "a positive int", num_experts)
        if not 1 <= k <= num_experts:
            bad("k", f"in [1, num_experts={num_experts}]", k)
        if strategy == "switch" and k != 1:
            bad("k", "1 for strategy='switch' (top-1 routing)", k)
        if seed < 0:
            bad("seed", "an int >= 0", seed)
        if not (temperature > 0 and math.isfinite(temperature)):
            bad("temperature", "a finite float > 0", temperature)
        if capacity_factor is not None and not (
            _is_real(capacity_factor) and capacity_factor > 0 and math.isfinite(capacity_factor)
        ):
            bad("capacity_factor", "None (dropless) or a finite float > 0", capacity_factor)
        for name, val in (
            ("load_balance_coef", load_balance_coef),
            ("z_loss_coef", z_loss_coef),
            ("bias_update_rate", bias_update_rate),
            ("noise_eps", noise_eps),
        ):
            if not (val >= 0 and math.isfinite(val)):
                bad(name, "a finite float >= 0", val)
        if not (0 <= jitter_eps < 1):
            bad("jitter_eps", "in [0, 1)", jitter_eps)
        if not (routed_scaling_factor > 0 and math.isfinite(routed_scaling_factor)):
            bad("routed_scaling_factor", "a finite float > 0", routed_scaling_factor)
        if n_group < 1 or num_experts % n_group != 0:
            bad("n_group", f"a positive divisor of num_experts={num_experts}", n_group)
        if not 1 <= topk_group <= n_group:
            bad("topk_group", f"in [1, n_group={n_group}]", topk_group)
        if k > topk_group * (num_experts // n_group):
            bad(
                "k",
                f"<= topk_group * experts per group = {topk_group * (num_experts // n_group)}",
                k,
            )
        if n_group > 1 and strategy in ("expert_choice",):
            bad("n_group", "1 for strategy='expert_choice'", n_group)
        if strategy == "expert_choice":
            if causal:
                raise ValueError(
                    "Supervisor: strategy='expert_choice' is not causal (each expert ranks all "
                    "tokens of the batch, future ones included); it cannot be used with causal=True"
                )
            if bias_update_rate > 0:
                bad("bias_update_rate", "0 for strategy='expert_choice' (balanced by design)", 0)
        if expert_choice_slots is not None and not (
            _is_int(expert_choice_slots) and 1 <= expert_choice_slots <= num_experts
        ):
            bad("expert_choice_slots", f"None or an int in [1, {num_experts}]", expert_choice_slots)
        if expert_choice_slots is not None and strategy != "expert_choice":
            bad("expert_choice_slots", "None unless strategy='expert_choice'", expert_choice_slots)
        if attention_dim is not None and strategy != "attention":
            bad("attention_dim", "None unless strategy='attention'", attention_dim)
        if attention_dim is not None and (not _is_int(attention_dim) or attention_dim < 1):
            bad("attention_dim", "None or a positive int", attention_dim)

        self.d_model = int(d_model)
        self.num_experts = int(num_experts)
        self.k = int(k)
        self.strategy = strategy
        self.renormalize = renormalize
        self.temperature = float(temperature)
        self.capacity_factor = capacity_factor
        self.load_balance_coef = float(load_balance_coef)
        self.load_balance_scope = load_balance_scope
        self.z_loss_coef = float(z_loss_coef)
        self.bias_update_rate = float(bias_update_rate)
        self.auto_update_bias = auto_update_bias
        self.n_group = int(n_group)
        self.topk_group = int(topk_group)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.noise_eps = float(noise_eps)
        self.jitter_eps = float(jitter_eps)
        self.seed = int(seed)
        self.causal = causal
        self.attention_score = attention_score
        self.track_stats = track_stats
        if strategy == "expert_choice":
            self._slots = int(expert_choice_slots or k)
        else:
            self._slots = k

        if strategy == "attention":
            a = attention_dim or d_model
            self.query = nn.Linear(d_model, a, bias=False)
            self.expert_embeddings = nn.Parameter(torch.randn(num_experts, a) / math.sqrt(a))
        else:
            self.gate = nn.Linear(d_model, num_experts, bias=False)
        if strategy == "noisy_topk":
            # Shazeer et al. 2017: std = softplus(x W_noise); zero init = std log(2) at the start.
            self.noise_gate = nn.Linear(d_model, num_experts, bias=False)
            nn.init.zeros_(self.noise_gate.weight)
        # Selection bias (aux-loss-free balancing; DeepSeek-V3's e_score_correction_bias). Kept in
        # the state dict so a resumed run and a loaded DeepSeek checkpoint select the same experts.
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
        if new.dtype != torch.float32:
            self._buffers["selection_bias"] = old.to(device=new.device)
        return self

    @property
    def slots_per_token(self) -> int:
        """Static number of slots per token in the decisions this supervisor returns."""
        return self._slots

    @property
    def uses_selection_bias(self) -> bool:
        """Whether ``selection_bias`` shifts expert selection (grouped_sigmoid or bias balancing)."""
        return self.strategy == "grouped_sigmoid" or self.bias_update_rate > 0

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity={self.capacity_factor}"
        return (
            f"strategy={self.strategy}, num_experts={self.num_experts}, k={self.k}, "
            f"slots_per_token={self._slots}, {cap}, temperature={self.temperature}"
        )

    # -- logits --------------------------------------------------------------------------------

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_model] -> router logits [T, E] float32, temperature applied, no noise."""
        if self.strategy == "attention":
            q = self.query(x).float()
            e = self.expert_embeddings.float()
            if self.attention_score == "cosine":
                logits = F.normalize(q, dim=-1) @ F.normalize(e, dim=-1).t()
            else:
                logits = (q @ e.t()) / math.sqrt(q.shape[-1])
        else:
            logits = self.gate(x).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        # What the aux loss and the entropy read: softmax probabilities, or for sigmoid scoring
        # the scores normalised per token (DeepSeek-V3's sequence-wise balance loss).
        if self.strategy == "grouped_sigmoid":
            s = torch.sigmoid(logits)
            return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        return torch.softmax(logits, dim=-1)

    # -- strategies ----------------------------------------------------------------------------

    def _expert_choice(self, logits: torch.Tensor, mask: Optional[torch.Tensor]):
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)
        cf = 1.0 if self.capacity_factor is None else self.capacity_factor
        C = expert_capacity(T, self.k, E, cf)
        score = probs
        if mask is not None:
            score = torch.where(mask.reshape(T, 1), probs, torch.full_like(probs, -1.0))
        # Each expert ranks all tokens of the batch: this is what makes expert choice non-causal.
        top_val, top_tok = torch.topk(score.t(), C, dim=1)  # [E, C]
        chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device)
        chosen = chosen.scatter(1, top_tok, top_val >= 0).t()  # [T, E]; padding never chosen
        # Each token keeps at most `slots` of the experts that chose it, its highest-scoring ones.
        masked = torch.where(chosen, probs, torch.full_like(probs, -1.0))
        val, ids = torch.topk(masked, self._slots, dim=1)
        valid = val >= 0
        ids = torch.where(valid, ids, torch.full_like(ids, -1)).to(torch.int32)
        weights = torch.where(valid, val, torch.zeros_like(val))
        dropped = chosen.sum() - valid.sum()
        return weights, ids, dropped

    def _select(self, x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor]):
        s = self.strategy
        if s == "topk":
            return _route(logits, self.k, "softmax", bias, self.n_group, self.topk_group,
                          self.renormalize, self.routed_scaling_factor)  # fmt: skip
        if s == "topk_then_softmax":
            # softmax over the k largest logits == the renormalised top-k of the full softmax.
            return _route(logits, self.k, "softmax", bias, self.n_group, self.topk_group,
                          True, self.routed_scaling_factor)  # fmt: skip
        if s == "switch":
            # The top-1 weight stays the probability itself (renormalising would make it 1).
            return _route(logits, 1, "softmax", bias, self.n_group, self.topk_group, False,
                          self.routed_scaling_factor)  # fmt: skip
        if s == "noisy_topk":
            sel = logits
            if self.training:
                std = F.softplus(self.noise_gate(x).float()) + self.noise_eps
                noise = counter_normal(self.seed, self.noise_step, tuple(logits.shape), 1)
                sel = logits + noise * std / self.temperature
            return _route(sel, self.k, "softmax", bias, self.n_group, self.topk_group, True,
                          self.routed_scaling_factor)  # fmt: skip
        if s == "grouped_sigmoid":
            return _route(logits, self.k, "sigmoid", bias, self.n_group, self.topk_group,
                          self.renormalize, self.routed_scaling_factor)  # fmt: skip
        if s == "attention":
            return _route(logits, self.k, "softmax", bias, self.n_group, self.topk_group,
                          self.renormalize, self.routed_scaling_factor)  # fmt: skip
        raise AssertionError(s)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, seq_len: Optional[int] = None
    ) -> RoutingDecision:
        """Route T tokens.

        x: [T, d_model] float. mask: optional [T] bool, True for real tokens; padding tokens get
        empty slots (id -1, weight 0), use no capacity and are left out of losses and telemetry.
        seq_len: tokens per sequence (T must be a multiple), needed by
        ``load_balance_scope="sequence"``.
        Returns a :class:`RoutingDecision` with ``slots_per_token`` slots per token.
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"Supervisor: x must be [T, d_model={self.d_model}], got {tuple(x.shape)}"
            )
        if mask is not None and (mask.dim() != 1 or mask.shape[0] != x.shape[0]):
            raise ValueError(f"Supervisor: mask must be [T={x.shape[0]}] bool, got {mask.shape}")
        if self.load_balance_scope == "sequence" and self.load_balance_coef > 0 and seq_len is None:
            raise ValueError("Supervisor: load_balance_scope='sequence' needs seq_len in forward")
        T = x.shape[0]
        E = self.num_experts
        if mask is not None:
            mask = mask.to(torch.bool)
        noisy = self.training and (self.jitter_eps > 0 or self.strategy == "noisy_topk")

        x_r = x
        if self.training and self.jitter_eps > 0:
            u = counter_uniform(self.seed, self.noise_step, (T, self.d_model), 0)
            x_r = x * (1.0 + self.jitter_eps * (2.0 * u - 1.0)).to(x.dtype)
        logits = self.router_logits(x_r)

        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if self.strategy == "expert_choice":
            weights, ids, dropped = self._expert_choice(logits, mask)
            selected = ids
            counts = expert_counts(ids, E)
        else:
            bias = None
            if self.uses_selection_bias:
                # A copy, so an in-forward bias update cannot alias a tensor autograd may hold.
                bias = self.selection_bias.clone() if self.auto_update_bias else self.selection_bias
            weights, ids, counts = self._select(x_r, logits, bias)
            if mask is not None:
                keep = mask[:, None]
                ids = torch.where(keep, ids, torch.full_like(ids, -1))
                weights = torch.where(keep, weights, torch.zeros_like(weights))
            selected = ids
            if self.capacity_factor is not None:
                cap = expert_capacity(T, self.k, E, self.capacity_factor)
                weights, ids, _, dropped = apply_capacity(weights, ids, E, cap)
            if mask is not None or self.capacity_factor is not None:
                counts = expert_counts(ids, E)

        stats: dict = {"dropped": dropped}
        aux = logits.new_zeros(())
        want_stats = self.track_stats
        probs = None
        lb_on, z_on = self.load_balance_coef > 0, self.z_loss_coef > 0
        if lb_on or want_stats:
            scope_len = seq_len if self.load_balance_scope == "sequence" else None
            if lb_on:
                probs = self._probs(logits)
                lb = load_balancing_loss(probs, selected, mask, scope_len)
                aux = aux + self.load_balance_coef * lb
            else:  # telemetry only: no autograd graph
                with torch.no_grad():
                    probs = self._probs(logits)
                    lb = load_balancing_loss(probs, selected, mask, scope_len)
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
            with torch.no_grad():
                stats["entropy_sum"] = router_entropy(probs.detach(), mask)
                stats["tokens"] = (
                    torch.full((), T, dtype=torch.int64, device=x.device)
                    if mask is None
                    else mask.sum()
                )

        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                sel_counts = expert_counts(selected, E)
                if self.auto_update_bias:
                    self.update_bias(sel_counts)
                else:
                    self.load_accumulator.add_(sel_counts.long())
        if noisy:
            with torch.no_grad():
                self.noise_step.add_(1)

        decision = RoutingDecision(weights, ids, counts, logits, aux, stats)
        if want_stats:
            self.stats.update(decision)
        return decision

    # -- balancing -----------------------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing step: ``b_i += u * sign(mean(load) - load_i)`` (no host sync).

        counts: [E] tokens per expert of the step just taken (e.g. ``decision.counts`` summed over
        micro-batches). None uses the loads accumulated by the training forwards since the last
        call and clears them. Call it after ``optimizer.step()`` (or set ``auto_update_bias``).
        """
        if counts is None:
            load = self.load_accumulator.to(torch.float32)
            self.load_accumulator.zero_()
        else:
            load = counts.to(device=self.selection_bias.device, dtype=torch.float32)
        self.selection_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))

    # -- telemetry -----------------------------------------------------------------------------

    def routing_stats(self) -> dict:
        """Telemetry accumulated since the last reset, as a plain dict (reads the device once).

        Raises ``RuntimeError`` when statistics were never tracked (``track_stats=False`` and no
        forward was ever recorded): zeros would read as "every expert is dead"."""
        if not self.track_stats and int(self.stats.steps) == 0:
            raise RuntimeError(
                "Supervisor.routing_stats: routing statistics are not tracked; build the "
                "supervisor with Supervisor(..., track_stats=True) (MoEConfig(track_stats=True) "
                "for a MixtureOfExpertsSystem), or set supervisor.track_stats = True, then run "
                "forward passes"
            )
        return self.stats.routing_stats()

    def reset_stats(self) -> None:
        """Clear the telemetry accumulators."""
        self.stats.reset()
