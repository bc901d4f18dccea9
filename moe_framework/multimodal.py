"""Multimodal MoE: tokens carry ``modality_ids``; each modality has its own pool of experts, a pool
of routed experts is shared by all modalities, and optional always-on shared experts run on every
token (LIMoE, modality-specific experts).

:class:`ModalityRouter` routes with a linear gate whose logits are restricted (``mode="restrict"``:
a token can only pick its modality's pool and the shared pool) or biased (``mode="bias"``: its
modality's pool gets ``+modality_bias``) by modality, and computes one load-balancing loss per
modality over the experts that modality may use. :class:`MultimodalMoELayer` is router ->
``LocalDispatcher`` -> ``ExpertBank`` (+ ``DenseFFN`` shared experts) with per-modality telemetry.
Everything is device tensors with static shapes: ``torch.compile(fullgraph=True)`` works.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .dispatch import LocalDispatcher
from .experts import DenseFFN, ExpertBank
from .metrics import load_summary
from .routing.base import RoutingDecision
from .routing.counts import expert_counts
from .routing.losses import load_balancing_loss, router_z_loss

__all__ = ["ModalityRouter", "MultimodalMoELayer", "MultimodalRoutingInfo", "MODALITY_MODES"]

MODALITY_MODES = ("restrict", "bias")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _tracing() -> bool:
    """Whether a host check is impossible: torch.compile tracing or CUDA graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _pools(experts_per_modality, num_modalities) -> List[int]:
    if _is_int(experts_per_modality):
        pools = [int(experts_per_modality)] * num_modalities
    else:
        pools = list(experts_per_modality)
    if len(pools) != num_modalities or not all(_is_int(n) and n >= 0 for n in pools):
        raise ValueError(
            "experts_per_modality must be an int >= 0 or one int >= 0 per modality "
            f"(num_modalities={num_modalities}), got {experts_per_modality!r}"
        )
    return [int(n) for n in pools]


class ModalityRouter(nn.Module):
    """Top-k routing restricted or biased by each token's modality, with per-modality balancing.

    Args:
        d_model: token width.
        experts_per_modality: M pool sizes (an int: the same for every modality; needs
            ``num_modalities``).
        num_shared_routed: experts every modality may route to (after the pools).
        k: experts per token.
        num_modalities: M (when ``experts_per_modality`` is an int).
        mode: ``"restrict"`` (other modalities' pools are masked out) or ``"bias"`` (every
            expert allowed; the token's own pool gets ``+modality_bias`` on its logits).
        modality_bias: the logit bonus of ``mode="bias"``.
        load_balance_coef: weight of the mean per-modality Switch loss in ``aux_loss``.
        z_loss_coef: weight of the router z-loss (over the gate's raw logits).

    Experts are numbered pool by pool: modality m owns ``[start_m, start_m + E_m)``, the shared
    routed experts come last. ``allowed`` [M, N] bool (buffer) says which experts each modality may
    use. ``forward(x [T, d], modality_ids [T] int, mask=None) -> RoutingDecision`` with ``stats``:
    (an id outside ``[0, M)`` is a ``ValueError`` in eager mode, which reads the ids on the host
    once; under ``torch.compile`` or CUDA graph capture, where it cannot, such a token routes
    nowhere)
    ``"dropped"``, ``"load_loss"`` (their mean over the modalities present),
    ``"modality_load_loss"`` [M] (each modality's Switch loss over its own pool and the shared
    routed experts, 0 for a modality absent from the batch) and ``"modality_counts"`` [M, N].
    """

    allowed: torch.Tensor
    logit_bias: torch.Tensor
    local_col: torch.Tensor

    def __init__(
        self,
        d_model: int,
        experts_per_modality: Union[int, Sequence[int]],
        num_shared_routed: int = 0,
        k: int = 2,
        *,
        num_modalities: Optional[int] = None,
        mode: str = "restrict",
        modality_bias: float = 2.0,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ):
        super().__init__()
        owner = "ModalityRouter"
        if _is_int(experts_per_modality):
            if not _is_int(num_modalities) or num_modalities < 1:  # type: ignore[operator]
                raise ValueError(
                    f"{owner}: num_modalities must be an int >= 1 when experts_per_modality is "
                    f"an int, got {num_modalities!r}"
                )
            M = int(num_modalities)  # type: ignore[arg-type]
        else:
            M = len(list(experts_per_modality))  # type: ignore[arg-type]
        try:
            pools = _pools(experts_per_modality, M)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        for name, v in (("d_model", d_model), ("k", k)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{owner}: {name} must be an int >= 1, got {v!r}")
        if not _is_int(num_shared_routed) or num_shared_routed < 0:
            raise ValueError(
                f"{owner}: num_shared_routed must be an int >= 0, got {num_shared_routed!r}"
            )
        if mode not in MODALITY_MODES:
            raise ValueError(f"{owner}: mode must be one of {MODALITY_MODES}, got {mode!r}")
        for name, c in (("load_balance_coef", load_balance_coef), ("z_loss_coef", z_loss_coef)):
            if not isinstance(c, numbers.Real) or isinstance(c, bool) or not float(c) >= 0:
                raise ValueError(f"{owner}: {name} must be a float >= 0, got {c!r}")
        N = sum(pools) + num_shared_routed
        starts = [sum(pools[:m]) for m in range(M)]
        allowed = torch.zeros(M, N, dtype=torch.bool)
        bias = torch.zeros(M, N)
        for m in range(M):
            own = slice(starts[m], starts[m] + pools[m])
            allowed[m, own] = True
            allowed[m, sum(pools) :] = True
            bias[m, own] = float(modality_bias)
        if mode == "restrict":
            smallest = int(allowed.sum(1).min())
            if k > smallest:
                raise ValueError(
                    f"{owner}: k={k} exceeds the {smallest} experts the smallest modality may use "
                    "(its pool plus the shared routed experts)"
                )
            bias = torch.where(
                allowed, torch.zeros_like(bias), torch.full_like(bias, -float("inf"))
            )
        else:
            if k > N:
                raise ValueError(f"{owner}: k={k} exceeds num_experts={N}")
            allowed.fill_(True)
        self.d_model, self.k, self.mode = int(d_model), int(k), mode
        self.num_modalities, self.pools, self.starts = M, pools, starts
        self.num_shared_routed = int(num_shared_routed)
        self.num_experts = N
        self.load_balance_coef, self.z_loss_coef = float(load_balance_coef), float(z_loss_coef)
        self.gate = nn.Linear(d_model, N, bias=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("logit_bias", bias, persistent=False)
        # Per modality: the experts its balancing loss spreads its tokens over, its own pool and
        # the shared routed experts (in "bias" mode a slot elsewhere counts as outside the loss).
        self._cols = [
            list(range(starts[m], starts[m] + pools[m])) + list(range(sum(pools), N))
            for m in range(M)
        ]
        local = torch.full((M, N + 1), -1, dtype=torch.int64)
        for m, cols in enumerate(self._cols):
            local[m, cols] = torch.arange(len(cols))
        self.register_buffer("local_col", local, persistent=False)

    @property
    def slots_per_token(self) -> int:
        return self.k

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> RoutingDecision:
        T, M, N = x.shape[0], self.num_modalities, self.num_experts
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"ModalityRouter: x must be [T, d_model={self.d_model}], got {tuple(x.shape)}"
            )
        if modality_ids.shape != (T,):
            raise ValueError(
                f"ModalityRouter: modality_ids must be [T={T}], got {tuple(modality_ids.shape)}"
            )
        valid = (modality_ids >= 0) & (modality_ids < M)
        if not _tracing() and not bool(valid.all()):
            bad = modality_ids[~valid][:5].tolist()
            raise ValueError(f"ModalityRouter: modality_ids must be in [0, {M}), got {bad}")
        # Traced or captured (no host check possible): an out-of-range id routes nowhere.
        mask = valid if mask is None else mask.to(torch.bool) & valid
        mod = modality_ids.long().clamp(0, M - 1)
        raw = self.gate(x).float()
        logits = raw + self.logit_bias[mod]
        weights, ids, counts = ops.route(logits, self.k, scoring="softmax", renormalize=True)
        keep = mask.to(torch.bool)
        ids = torch.where(keep[:, None], ids, torch.full_like(ids, -1))
        weights = torch.where(keep[:, None], weights, torch.zeros_like(weights))
        counts = expert_counts(ids, N)
        probs = torch.softmax(logits, -1)
        losses = []
        per_mod_counts = []
        for m in range(M):
            sel = (mod == m) & keep
            local = self.local_col[m][torch.where(ids < 0, torch.full_like(ids, N), ids).long()]
            losses.append(load_balancing_loss(probs[:, self._cols[m]], local, sel))
            keep_ids = torch.where(sel[:, None], ids, torch.full_like(ids, -1))
            per_mod_counts.append(expert_counts(keep_ids, N))
        mod_loss = torch.stack(losses)
        present = torch.stack([((mod == m) & keep).any() for m in range(M)]).to(mod_loss.dtype)
        lb = (mod_loss * present).sum() / present.sum().clamp_min(1.0)
        aux = self.load_balance_coef * lb if self.load_balance_coef > 0 else raw.new_zeros(())
        if self.z_loss_coef > 0:
            aux = aux + self.z_loss_coef * router_z_loss(raw, keep)
        stats = {
            "dropped": torch.zeros((), dtype=torch.int64, device=x.device),
            "load_loss": lb.detach(),
            "modality_load_loss": mod_loss.detach(),
            "modality_counts": torch.stack(per_mod_counts),
        }
        # The bias of "restrict" is -inf outside the allowed experts: report the raw gate logits.
        return RoutingDecision(weights, ids, counts, raw, aux, stats)

    def extra_repr(self) -> str:
        return (
            f"pools={self.pools}, num_shared_routed={self.num_shared_routed}, k={self.k}, "
            f"mode={self.mode!r}"
        )


class MultimodalRoutingInfo(NamedTuple):
    """Routing of one :class:`MultimodalMoELayer` forward (device tensors).

    weights / ids ``[T, k]``, counts ``[N]``, aux_loss (0-dim), stats (the router's, with
    ``modality_counts`` ``[M, N]`` and ``modality_load_loss`` ``[M]``).
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict


class MultimodalMoELayer(nn.Module):
    """MoE feed-forward layer with per-modality expert pools, shared routed experts and optional
    always-on shared experts.

    Args (keyword-only): ``d_model``, ``d_hidden`` (each routed expert), ``experts_per_modality``
    (int or one per modality), ``num_modalities`` (with an int pool size), ``num_shared_routed``,
    ``k``, ``mode``, ``modality_bias``, ``load_balance_coef``, ``z_loss_coef`` (of the
    :class:`ModalityRouter`), ``num_shared_experts`` (always-on experts: one ``DenseFFN`` of hidden
    width ``num_shared_experts * d_hidden``), ``activation``, ``dtype``, ``device``.

    ``forward(x [..., d], modality_ids [...] int, mask=None) -> (y [..., d],
    MultimodalRoutingInfo)``. Telemetry: ``modality_counts`` [M, N] int64 (device buffer) summed
    over forwards; :meth:`routing_stats` reads it.
    """

    modality_counts: torch.Tensor

    def __init__(
        self,
        *,
        d_model: int,
        d_hidden: int,
        experts_per_modality: Union[int, Sequence[int]],
        num_modalities: Optional[int] = None,
        num_shared_routed: int = 0,
        k: int = 2,
        mode: str = "restrict",
        modality_bias: float = 2.0,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        activation: str = "swiglu",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if not _is_int(num_shared_experts) or num_shared_experts < 0:
            raise ValueError(
                f"MultimodalMoELayer: num_shared_experts must be an int >= 0, got {num_shared_experts!r}"
            )
        self.router = ModalityRouter(
            d_model,
            experts_per_modality,
            num_shared_routed,
            k,
            num_modalities=num_modalities,
            mode=mode,
            modality_bias=modality_bias,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
        ).to(device=device, dtype=dtype)
        N = self.router.num_experts
        self.num_experts = N
        self.num_modalities = self.router.num_modalities
        self.d_model = d_model
        kw = dict(activation=activation, dtype=dtype, device=device)
        self.experts = ExpertBank(d_model=d_model, d_hidden=d_hidden, num_experts=N, **kw)
        self.dispatcher = LocalDispatcher(N)
        self.shared_experts: Optional[nn.Module] = None
        if num_shared_experts > 0:
            self.shared_experts = DenseFFN(
                d_model=d_model, d_hidden=num_shared_experts * d_hidden, **kw
            )
        self.register_buffer(
            "modality_counts",
            torch.zeros(self.num_modalities, N, dtype=torch.int64, device=device),
            persistent=False,
        )

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ):
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"MultimodalMoELayer: x must have last dimension d_model={self.d_model}, got "
                f"{tuple(x.shape)}"
            )
        if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MultimodalMoELayer: modality_ids must have shape {tuple(x.shape[:-1])} (x "
                f"without its last dimension), got {tuple(modality_ids.shape)}"
            )
        if modality_ids.is_floating_point() or modality_ids.dtype == torch.bool:
            raise ValueError(
                f"MultimodalMoELayer: modality_ids must be an integer tensor, got {modality_ids.dtype}"
            )
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MultimodalMoELayer: mask must have shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}"
            )
        x2 = x.reshape(-1, x.shape[-1])
        dec = self.router(x2, modality_ids.reshape(-1), None if mask is None else mask.reshape(-1))
        x_sorted, offsets, ctx = self.dispatcher.dispatch(x2, dec)
        y = self.dispatcher.combine(self.experts(x_sorted, offsets), ctx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        with torch.no_grad():
            self.modality_counts.add_(dec.stats["modality_counts"].to(torch.int64))
        info = MultimodalRoutingInfo(dec.weights, dec.ids, dec.counts, dec.aux_loss, dec.stats)
        return y.reshape(x.shape), info

    def routing_stats(self) -> dict:
        """Per modality (reads the device once): ``load`` (slots per expert), ``own_pool``,
        ``shared_pool`` and ``other_pools`` (fractions of the modality's slots), and the
        :func:`~moe_framework.metrics.load_summary` of its own pool."""
        counts = self.modality_counts.tolist()
        r = self.router
        shared0 = sum(r.pools)
        out = []
        for m, row in enumerate(counts):
            total = sum(row) or 1
            own = row[r.starts[m] : r.starts[m] + r.pools[m]]
            shared = row[shared0:]
            entry = dict(load_summary(own), load=row)
            entry["own_pool"] = sum(own) / total
            entry["shared_pool"] = sum(shared) / total
            entry["other_pools"] = (sum(row) - sum(own) - sum(shared)) / total
            out.append(entry)
        return {"modalities": out}

    def reset_stats(self) -> None:
        self.modality_counts.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_modalities={self.num_modalities}"
