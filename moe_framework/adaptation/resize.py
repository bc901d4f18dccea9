"""Split and merge experts of an :class:`~moe_framework.moe_layer.MoELayer` in place.

:func:`split_expert` and :func:`merge_experts` resize, in place, everything that has one entry per
expert: the :class:`~moe_framework.experts.ExpertBank` weights, the router (through an
:class:`~moe_framework.adaptation.router.AdaptiveRouter`), the dispatcher's expert count, and the
optimiser state of every resized parameter (``exp_avg`` / ``exp_avg_sq`` of AdamW follow their
rows; ``step`` is kept). Parameters keep their identity (``param.data`` is replaced), so an
optimiser's ``param_groups`` stay valid and a ``torch.compile``-d layer recompiles for the new
shapes on its next call (its guards on the parameters' sizes fail).

They run between training steps (they read the device), never inside a compiled region.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, cast

import torch
from torch import nn

from ..experts import CheckpointedExperts, ExpertBank
from ..routing.token_choice import TokenChoiceRouter
from .router import AdaptiveRouter

__all__ = ["make_adaptive", "split_expert", "merge_experts", "expert_bank", "prepare_load"]

RowOp = Callable[[torch.Tensor], torch.Tensor]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def make_adaptive(layer: nn.Module) -> AdaptiveRouter:
    """Wrap ``layer``'s router in an :class:`AdaptiveRouter` (once; returns the wrapper).

    The output is unchanged (no expert is split yet). The router's state-dict keys gain an
    ``inner.`` (``supervisor.inner.gate.weight``); parameters keep their identity, so an optimiser
    built before still updates them.
    """
    router = getattr(layer, "supervisor", None)
    if router is None:
        raise ValueError(f"make_adaptive: layer must be an MoELayer, got {type(layer).__name__}")
    if isinstance(router, AdaptiveRouter):
        return router
    wrapper = AdaptiveRouter(router)
    layer.supervisor = wrapper
    return wrapper


def expert_bank(layer: nn.Module) -> ExpertBank:
    """The layer's :class:`ExpertBank` (through a :class:`CheckpointedExperts`); ValueError for
    other experts, whose weights this package cannot resize."""
    experts = getattr(layer, "experts", None)
    if isinstance(experts, CheckpointedExperts):
        experts = experts.inner
    if not isinstance(experts, ExpertBank):
        raise ValueError(
            "adaptation: the layer's experts must be an ExpertBank (or CheckpointedExperts around "
            f"one), got {type(experts).__name__}"
        )
    return experts


def _bank_params(bank: ExpertBank) -> list:
    return [p for p in (bank.weight_in, bank.w_out, bank.bias_in, bank.b_out) if p is not None]


@torch.no_grad()
def _resize_param(p: nn.Parameter, op: RowOp, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """``p.data = op(p)`` and the same row operation on every optimiser state tensor shaped like
    ``p`` (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, momentum buffers); scalars such as
    ``step`` are kept. The stale gradient is dropped."""
    old_shape = p.shape
    for opt in optimizers:
        state = opt.state.get(p)
        if not state:
            continue
        for key, v in list(state.items()):
            if isinstance(v, torch.Tensor) and v.shape == old_shape and v.dim() > 0:
                state[key] = op(v).contiguous()
    _set_data(p, op(p.data).contiguous())
    p.grad = None


def _set_data(p: torch.Tensor, new: torch.Tensor) -> None:
    """``p.data = new`` for a new shape. Autograd caches each leaf's gradient accumulator, with the
    leaf's shape, for as long as an old graph keeps it alive (a loss kept from the last step), and
    ``set_data`` renews it only when the dtype or device changes: passing through another dtype
    first makes the next backward accumulate with the new shape instead of failing."""
    other = torch.float64 if new.dtype != torch.float64 else torch.float32
    p.data = new.to(other)
    p.data = new


def _set_num_experts(layer: Any, n: int) -> None:
    # Any: nn.Module types the plain int attributes set in __init__ as Tensor | Module.
    bank = expert_bank(layer)
    bank.num_experts = n
    experts: Any = layer.experts
    if experts is not bank:  # a CheckpointedExperts around the bank
        experts.num_experts = n
    layer.num_experts = n
    dispatcher: Any = getattr(layer, "dispatcher", None)
    if dispatcher is not None and hasattr(dispatcher, "num_experts"):
        dispatcher.num_experts = n


def _as_optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _check_expert(owner: str, name: str, e, n: int) -> int:
    if not _is_int(e) or not 0 <= e < n:
        raise ValueError(f"{owner}: {name} must be an int in [0, num_experts={n}), got {e!r}")
    return int(e)


@torch.no_grad()
def split_expert(
    layer: nn.Module,
    expert: int,
    *,
    tokens: Optional[torch.Tensor] = None,
    noise: float = 0.0,
    optimizer=None,
    generator: Optional[torch.Generator] = None,
) -> int:
    """Split physical expert ``expert`` of ``layer`` (an ``MoELayer`` with an ``ExpertBank``) in two.

    The new expert (id ``E``, appended) is a copy of ``expert``'s weights, plus Gaussian noise of
    ``noise`` times each tensor's std (0 = an exact copy: the layer's output is unchanged, bit for
    bit). Its sub-routing row is the sibling's plus a random unit direction ``r``, with the bias
    offset ``-median(tokens @ r)`` so ``expert``'s traffic divides in half; ``tokens`` ``[n, d]``
    are inputs recently routed to ``expert`` (None: offset 0, an even split for centred inputs).
    (When ``expert`` already has split siblings, the copy can also take a few of their tokens:
    the halves are of ``expert``'s tokens, the sibling choice is an argmax over all of them.)
    Arguments are checked before anything changes.
    The optimiser state of the copied rows is copied too (``step`` kept).

    Returns the new expert's id. Wraps the router in an :class:`AdaptiveRouter` first if needed.
    """
    if not isinstance(noise, numbers.Real) or isinstance(noise, bool) or not noise >= 0:
        raise ValueError(f"split_expert: noise must be a float >= 0, got {noise!r}")
    bank = expert_bank(layer)
    E = bank.num_experts
    e = _check_expert("split_expert", "expert", expert, E)
    d = bank.d_model
    if tokens is not None and (tokens.dim() != 2 or tokens.shape[1] != d):
        raise ValueError(
            f"split_expert: tokens must be [n, d_model={d}], got {tuple(tokens.shape)}"
        )
    router = make_adaptive(layer)
    opts = _as_optimizers(optimizer)
    dev = bank.w_out.device
    # Everything is checked: from here on the layer changes.
    r = torch.randn(d, generator=generator, device="cpu").to(dev)
    r = r / r.norm().clamp_min(1e-12)
    offset = 0.0
    if tokens is not None and tokens.shape[0] > 0:
        offset = -float((tokens.float().to(dev) @ r).median())

    def copy_row(t: torch.Tensor, with_noise: bool = False) -> torch.Tensor:
        row = t[e : e + 1].clone()
        if with_noise and noise > 0 and row.is_floating_point():
            std = row.float().std().clamp_min(1e-12)
            eps = torch.randn(row.shape, generator=generator, device="cpu").to(row.device)
            row = row + (noise * std * eps).to(row.dtype)
        return torch.cat([t, row], 0)

    for p in _bank_params(bank):
        # Noise on the weights only, never on the optimiser state.
        _resize_param(p, copy_row, opts)
        if noise > 0:
            p.data[E:] = copy_row(p.data[:E], with_noise=True)[E:]

    router.parent = torch.cat([router.parent, router.parent[e : e + 1]])
    router.split_dir = torch.cat([router.split_dir, (router.split_dir[e] + r).unsqueeze(0)])
    new_off = router.split_offset[e : e + 1] + offset
    router.split_offset = torch.cat([router.split_offset, new_off])
    router.num_experts = E + 1
    _set_num_experts(layer, E + 1)
    return E


def _merge_op(a: int, b: int, wa: float, wb: float) -> RowOp:
    def op(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        if t.is_floating_point():
            out[a] = (wa * t[a].double() + wb * t[b].double()).to(t.dtype)
        keep = [i for i in range(t.shape[0]) if i != b]
        return out[keep]

    return op


def _delete_op(b: int) -> RowOp:
    def op(t: torch.Tensor) -> torch.Tensor:
        return t[[i for i in range(t.shape[0]) if i != b]]

    return op


def _merge_logical(
    router: AdaptiveRouter, la: int, lb: int, wa: float, wb: float, opts: list
) -> None:
    inner = router.inner
    if not isinstance(inner, TokenChoiceRouter) or not hasattr(inner, "gate"):
        raise ValueError(
            "merge_experts: merging two experts of different logical parents resizes the inner "
            "router, which needs a token-choice router with a linear gate (topk, switch, ...), "
            f"got {type(inner).__name__}"
        )
    L = inner.num_experts
    if inner.n_group != 1:
        raise ValueError(
            f"merge_experts: the inner router must have n_group=1, got {inner.n_group}"
        )
    if inner.k > L - 1:
        raise ValueError(
            f"merge_experts: the router's k={inner.k} would exceed the {L - 1} experts left"
        )
    _resize_param(cast(nn.Parameter, inner.gate.weight), _merge_op(la, lb, wa, wb), opts)
    inner.gate.out_features = L - 1
    inner.selection_bias = _merge_op(la, lb, wa, wb)(inner.selection_bias)
    acc = inner.load_accumulator.clone()
    acc[la] += acc[lb]
    inner.load_accumulator = _delete_op(lb)(acc)
    stats_type = type(inner.stats)
    inner.stats = stats_type(L - 1).to(inner.selection_bias.device)
    inner.num_experts = L - 1


@torch.no_grad()
def merge_experts(
    layer: nn.Module,
    a: int,
    b: int,
    *,
    loads: Optional[Sequence[float]] = None,
    optimizer=None,
) -> int:
    """Merge physical expert ``b`` into ``a`` (load-weighted average); ``b`` is removed and the
    experts after it shift down by one.

    ``loads``: the per-expert loads that weight the average (``[E]``; default equal weights; two
    zero loads average equally). Expert weights and the optimiser state of their rows become the
    weighted average (``step`` kept). When ``a`` and ``b`` are children of the same logical expert
    (a split), ``b``'s sub-routing row is dropped and its tokens go to its siblings; otherwise
    each must be its logical expert's only child and the router's rows are merged too (gate rows
    and selection bias averaged with the same weights, load counters summed; the inner router's
    telemetry restarts for the new size). Returns the merged expert's new id.
    """
    bank = expert_bank(layer)
    E = bank.num_experts
    a = _check_expert("merge_experts", "a", a, E)
    b = _check_expert("merge_experts", "b", b, E)
    if a == b:
        raise ValueError(f"merge_experts: a and b must differ, got a=b={a}")
    if E < 2:
        raise ValueError("merge_experts: the layer needs at least 2 experts")
    wa, wb = 0.5, 0.5
    if loads is not None:
        if len(loads) != E:
            raise ValueError(
                f"merge_experts: loads must have num_experts={E} entries, got {len(loads)}"
            )
        la_, lb_ = float(loads[a]), float(loads[b])
        if not (0 <= la_ < math.inf and 0 <= lb_ < math.inf):
            raise ValueError(f"merge_experts: loads must be finite and >= 0, got {la_} and {lb_}")
        if la_ + lb_ > 0:
            wa, wb = la_ / (la_ + lb_), lb_ / (la_ + lb_)
    router = make_adaptive(layer)
    opts = _as_optimizers(optimizer)
    parent = router.parent.tolist()
    pa, pb = parent[a], parent[b]
    if pa != pb:
        if parent.count(pa) != 1 or parent.count(pb) != 1:
            raise ValueError(
                f"merge_experts: experts {a} and {b} have different logical parents and one of "
                "them was split: merge the split copies with their siblings first"
            )
        _merge_logical(router, pa, pb, wa, wb, opts)
    for p in _bank_params(bank):
        _resize_param(p, _merge_op(a, b, wa, wb), opts)
    new_parent = router.parent.clone()
    if pa != pb:
        new_parent = torch.where(new_parent > pb, new_parent - 1, new_parent)
    router.parent = _delete_op(b)(new_parent)
    router.split_dir = _delete_op(b)(router.split_dir)
    router.split_offset = _delete_op(b)(router.split_offset)
    router.num_experts = E - 1
    _set_num_experts(layer, E - 1)
    return a - 1 if b < a else a


@torch.no_grad()
def prepare_load(layer: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Give ``layer`` the adapted shapes stored in ``state_dict`` so that
    ``layer.load_state_dict(state_dict)`` then loads it.

    An adapted layer saves an ``AdaptiveRouter`` (``supervisor.parent`` ``[P]``,
    ``supervisor.inner.gate.weight`` ``[L, d]``) and P experts; a freshly built layer has the
    original sizes. This wraps the router, resizes the experts to P and the inner router to L
    (zeros, overwritten by the load). A state dict of a layer that was never adapted is left alone.
    ``prefix``: the layer's prefix in ``state_dict`` (``"layers.0.moe."``).
    """
    parent = state_dict.get(prefix + "supervisor.parent")
    if parent is None:
        return
    router = make_adaptive(layer)
    P = int(parent.shape[0])
    gate = state_dict.get(prefix + "supervisor.inner.gate.weight")
    inner = router.inner
    if gate is not None and gate.shape[0] != cast(Any, inner).num_experts:
        if not isinstance(inner, TokenChoiceRouter):
            raise ValueError(
                "prepare_load: resizing the inner router needs a token-choice router, got "
                f"{type(inner).__name__}"
            )
        L = int(gate.shape[0])
        _set_data(inner.gate.weight, inner.gate.weight.new_zeros(L, inner.gate.weight.shape[1]))
        inner.gate.out_features = L
        inner.selection_bias = inner.selection_bias.new_zeros(L)
        inner.load_accumulator = inner.load_accumulator.new_zeros(L)
        inner.stats = type(inner.stats)(L).to(inner.selection_bias.device)
        inner.num_experts = L
    bank = expert_bank(layer)
    for p in _bank_params(bank):
        _set_data(p, p.new_zeros((P, *p.shape[1:])))
        p.grad = None
    router.parent = router.parent.new_zeros(P)
    router.split_dir = router.split_dir.new_zeros(P, router.split_dir.shape[1])
    router.split_offset = router.split_offset.new_zeros(P)
    router.num_experts = P
    _set_num_experts(layer, P)
