"""``expert_parallel``: shard a ``MoELayer``'s experts over an expert-parallel group in place.

Also the helpers a training loop needs around it: :func:`reduce_gradients` (dense gradients
averaged over every data rank, expert gradients reduced over the data-parallel ranks only),
:func:`update_bias` (the aux-loss-free bias update on the global loads) and
:func:`global_counts`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Iterator, NamedTuple, Optional, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch import TokenDispatcher
from ..experts import CheckpointedExperts, ExpertBank
from ..moe_layer import MoELayer
from ..routing.base import Router
from ._comm import ExpertParallelError, all_reduce_sum, comm_device
from .dispatcher import AllToAllDispatcher

__all__ = [
    "ExpertParallelInfo",
    "config_hash",
    "expert_parallel",
    "expert_parallel_layers",
    "expert_parameters",
    "global_counts",
    "global_routing_stats",
    "info_of",
    "reduce_gradients",
    "resolve_groups",
    "update_bias",
]


class ExpertParallelInfo(NamedTuple):
    """How a layer is sharded (``layer.expert_parallel_info``).

    ep_group / ep / ep_rank: the expert-parallel group, its size and this rank in it.
    dp_group / dp: the data-parallel group over which expert gradients are reduced (``None`` / 1
        for a 1-D group).
    data_group / data_size: every rank that sees different tokens (``dp * ep`` ranks): dense
        gradients and global loads are reduced over it.
    num_global_experts: E. first_expert: the first global expert this rank owns (``ep_rank *
        E / ep``); it owns ``E / ep`` of them.
    """

    ep_group: dist.ProcessGroup
    ep: int
    ep_rank: int
    dp_group: Optional[dist.ProcessGroup]
    dp: int
    data_group: dist.ProcessGroup
    data_size: int
    num_global_experts: int
    first_expert: int


def resolve_groups(mesh_or_group):
    """``(ep_group, dp_group or None, data_group)`` of a 1-D group/mesh or a 2-D mesh with
    dimension names ``("dp", "ep")``."""
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise ExpertParallelError(
            "expert_parallel: torch.distributed is not initialised; call "
            "moe_framework.distributed.init_distributed() (or dist.init_process_group) first"
        )
    if mesh_or_group is None:
        world = dist.group.WORLD
        return world, None, world
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim == 1:
            g = mesh_or_group.get_group()
            return g, None, g
        names = mesh_or_group.mesh_dim_names
        if mesh_or_group.ndim != 2 or names is None or set(names) != {"dp", "ep"}:
            raise ValueError(
                "expert_parallel: mesh_or_group must be a process group, a 1-D DeviceMesh, or a "
                f"2-D DeviceMesh with mesh_dim_names ('dp', 'ep'); got ndim={mesh_or_group.ndim}, "
                f"mesh_dim_names={names!r}"
            )
        ep_g = mesh_or_group["ep"].get_group()
        dp_g = mesh_or_group["dp"].get_group()
        ranks = sorted(int(r) for r in mesh_or_group.mesh.flatten().tolist())
        if ranks == list(range(dist.get_world_size())):
            data_g = cast(dist.ProcessGroup, dist.group.WORLD)
        else:
            data_g = cast(dist.ProcessGroup, dist.new_group(ranks))
        return ep_g, dp_g, data_g
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group, None, mesh_or_group
    raise ValueError(
        "expert_parallel: mesh_or_group must be a ProcessGroup, a DeviceMesh or None (the world), "
        f"got {type(mesh_or_group).__name__}"
    )


def _bank_of(layer: MoELayer) -> ExpertBank:
    experts = layer.experts
    bank = experts.inner if isinstance(experts, CheckpointedExperts) else experts
    if not isinstance(bank, ExpertBank):
        raise ValueError(
            "expert_parallel: the layer's experts must be an ExpertBank (or CheckpointedExperts "
            f"around one), got {type(bank).__name__}"
        )
    return bank


def config_hash(
    layer: MoELayer,
    mode: str,
    capacity_factor: Optional[float],
    capacity_tokens: Optional[int] = None,
) -> int:
    """A 63-bit hash of what every rank of an expert-parallel layer must agree on: the parts'
    types, sizes, options and every parameter's name, shape and dtype (not the values)."""
    bank = _bank_of(layer)
    router = layer.router
    desc = {
        "layer": [type(layer.router).__name__, type(layer.experts).__name__],
        "sizes": [layer.num_experts, layer.k, layer.d_model, bank.d_hidden],
        "bank": [bank.activation, bank.layout, bank.recompute_activation],
        "router": {
            k: repr(getattr(router, k, None))
            for k in ("strategy", "capacity_factor", "bias_update_rate", "load_balance_coef")
        },
        "mode": [mode, capacity_factor, capacity_tokens],
        "params": [(n, list(p.shape), str(p.dtype)) for n, p in layer.named_parameters()],
        "shared": None if layer.shared_experts is None else type(layer.shared_experts).__name__,
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_same_config(h: int, group, what: str) -> None:
    dev = comm_device(group)
    mine = torch.tensor([h], dtype=torch.int64, device=dev)
    n = dist.get_world_size(group)
    got = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
    try:
        dist.all_gather(got, mine, group=group)
    except (RuntimeError, dist.DistError) as err:
        raise ExpertParallelError(
            f"expert_parallel: the setup all-gather of the config hash failed (a peer rank "
            f"raised, died or timed out): {err}"
        ) from err
    hashes = [int(t.item()) for t in got]
    if len(set(hashes)) > 1:
        groups: dict[int, list[int]] = {}
        for r, v in enumerate(hashes):
            groups.setdefault(v, []).append(r)
        raise ExpertParallelError(
            f"expert_parallel: the ranks of the {what} were built with different layer "
            f"configurations (config hash per rank: {hashes}; ranks agreeing: "
            f"{sorted(groups.values())}); build the same MoELayer on every rank"
        )


def expert_parallel(
    layer: MoELayer,
    mesh_or_group=None,
    *,
    mode: str = "dropless",
    capacity_factor: Optional[float] = None,
    capacity_tokens: Optional[int] = None,
) -> MoELayer:
    """Shard ``layer``'s experts over the expert-parallel ranks, in place, and give it an
    :class:`~moe_framework.distributed.AllToAllDispatcher`.

    Args:
        layer: a :class:`~moe_framework.moe_layer.MoELayer` whose experts are an ``ExpertBank``
            (or ``CheckpointedExperts`` around one), built identically on every rank (checked:
            an all-gathered config hash; a mismatch raises :class:`ExpertParallelError`).
        mesh_or_group: a process group or 1-D ``DeviceMesh`` (pure expert parallel; ``None`` =
            the world), or a 2-D ``DeviceMesh`` with ``mesh_dim_names=("dp", "ep")``: experts
            are sharded over ``ep`` and replicated over ``dp``.
        mode: ``"dropless"`` (default) or ``"capacity"``.
        capacity_factor: capacity mode: slots per expert per source rank ``ceil(cf * T * k /
            E)``; default the router's ``capacity_factor``.
        capacity_tokens: capacity mode: the T of that formula when the ranks' batches differ
            in size (every rank must size its buffers alike; see ``AllToAllDispatcher``).

    Rank ``r`` keeps global experts ``r*E/ep ... (r+1)*E/ep - 1`` (``E % ep == 0``, else a
    ``ValueError``); the other experts' weights are freed. Returns ``layer``.
    """
    if not isinstance(layer, MoELayer):
        raise ValueError(f"expert_parallel: layer must be a MoELayer, got {type(layer).__name__}")
    if info_of(layer) is not None:
        raise ValueError("expert_parallel: this layer is already expert-parallel")
    ep_group, dp_group, data_group = resolve_groups(mesh_or_group)
    if mode == "capacity" and capacity_factor is None:
        capacity_factor = getattr(layer.router, "capacity_factor", None)
        if capacity_factor is None:
            raise ValueError(
                "expert_parallel: mode='capacity' needs capacity_factor (or a router with one)"
            )
    bank = _bank_of(layer)
    if getattr(layer.router, "auto_update_bias", False):
        raise ValueError(
            "expert_parallel: the router has auto_update_bias=True, which updates the bias from "
            "each rank's own loads inside forward and would make the ranks' routers drift apart; "
            "build it with auto_update_bias=False and call moe_framework.distributed."
            "update_bias(model) after each optimizer step (global loads)"
        )
    E = layer.num_experts
    ep = dist.get_world_size(ep_group)
    if E % ep != 0:
        raise ValueError(
            f"expert_parallel: the layer's num_experts={E} must be divisible by the "
            f"expert-parallel size ep={ep}"
        )
    h = config_hash(layer, mode, capacity_factor, capacity_tokens)
    _check_same_config(h, data_group, "data group")
    dispatcher = AllToAllDispatcher(ep_group, E, mode, capacity_factor, capacity_tokens)
    lo, hi = dispatcher.expert_offset, dispatcher.expert_offset + dispatcher.num_experts
    for name, p in list(bank.named_parameters(recurse=False)):
        local = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
        setattr(bank, name, local)
    _set_plain(bank, "num_experts", hi - lo)
    if isinstance(layer.experts, CheckpointedExperts):
        _set_plain(layer.experts, "num_experts", hi - lo)
    # Its ctx is an EPContext, a superset of DispatchContext's fields (what the protocol needs).
    layer.dispatcher = cast(TokenDispatcher, dispatcher)
    dp = 1 if dp_group is None else dist.get_world_size(dp_group)
    info = ExpertParallelInfo(
        ep_group,
        ep,
        dispatcher.rank,
        dp_group,
        dp,
        data_group,
        dist.get_world_size(data_group),
        E,
        lo,
    )
    _set_plain(layer, "expert_parallel_info", info)
    return layer


def _set_plain(module: nn.Module, name: str, value) -> None:
    # A plain (non-tensor, non-module) attribute: nn.Module.__setattr__ is typed for tensors and
    # modules only, so the type checker would refuse `module.name = value`.
    setattr(module, name, value)


def info_of(layer: nn.Module) -> Optional[ExpertParallelInfo]:
    """``layer.expert_parallel_info``: how an expert-parallel layer is sharded (else ``None``)."""
    return cast(Optional[ExpertParallelInfo], getattr(layer, "expert_parallel_info", None))


def expert_parallel_layers(model: nn.Module) -> Iterator[MoELayer]:
    """Every expert-parallel ``MoELayer`` inside ``model`` (itself included)."""
    for m in model.modules():
        if isinstance(m, MoELayer) and info_of(m) is not None:
            yield m


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters of every expert-parallel layer in ``model``."""
    return [p for layer in expert_parallel_layers(model) for p in layer.experts.parameters()]


def _info(model: nn.Module) -> ExpertParallelInfo:
    infos = [info_of(layer) for layer in expert_parallel_layers(model)]
    if not infos:
        raise ValueError("the model has no expert-parallel MoELayer (call expert_parallel first)")
    info = infos[0]
    assert info is not None
    return info


@torch.no_grad()
def reduce_gradients(
    model: nn.Module,
    params: Optional[Sequence[nn.Parameter]] = None,
    *,
    loss_scaling: str = "mean",
) -> None:
    """Make every rank's gradients those of the global batch (the mean of the ranks' losses).

    Call it after ``loss.backward()``, before ``optimizer.step()``, with each rank's loss the
    mean over its own tokens (equal token counts per rank). Dense gradients (router, shared
    experts, everything not an expert) are averaged over the data group (``dp * ep`` ranks);
    parameters FSDP2 manages (``DTensor``) are left to FSDP, which already averaged them. Expert
    gradients already hold every ep rank's contribution (the all-to-all backward brought them):
    they are summed over ``dp`` and divided by ``dp * ep``.

    ``loss_scaling="sum"``: each rank's loss is already its share of the global loss (e.g. the
    sum over its rows divided by the GLOBAL batch size; right for uneven splits): gradients are
    summed, not averaged.
    """
    if loss_scaling not in ("mean", "sum"):
        raise ValueError(
            f"reduce_gradients: loss_scaling must be 'mean' or 'sum', got {loss_scaling!r}"
        )
    info = _info(model)
    experts = {id(p) for p in expert_parameters(model)}
    from torch.distributed.tensor import DTensor

    scale = 1.0 / info.data_size if loss_scaling == "mean" else 1.0
    for p in params if params is not None else model.parameters():
        if p.grad is None or isinstance(p.grad, DTensor) or isinstance(p, DTensor):
            continue
        if id(p) in experts:
            if info.dp_group is not None and info.dp > 1:
                all_reduce_sum(p.grad, info.dp_group, "the expert-gradient all-reduce")
        else:
            all_reduce_sum(p.grad, info.data_group, "the dense-gradient all-reduce")
        if scale != 1.0:
            p.grad.mul_(scale)


@torch.no_grad()
def global_counts(layer: MoELayer, counts: torch.Tensor) -> torch.Tensor:
    """``[E]`` per-expert counts summed over every data rank (a new tensor)."""
    info = info_of(layer)
    if info is None:
        raise ValueError("global_counts: the layer is not expert-parallel")
    total = counts.detach().to(torch.int64).clone()
    return all_reduce_sum(total, info.data_group, "the global-load all-reduce")


@torch.no_grad()
def global_routing_stats(layer: MoELayer) -> dict:
    """``layer.routing_stats()`` over every data rank's tokens: the router's accumulators (all
    sums: loads, tokens, drops, entropy, loss sums) are all-reduced in a copy, ``steps`` stays
    the per-rank step count. Collective: call it on every rank (each gets the same dict)."""
    info = info_of(layer)
    if info is None:
        raise ValueError("global_routing_stats: the layer is not expert-parallel")
    router = layer.router
    stats = getattr(router, "stats", None)
    if stats is None or not hasattr(stats, "routing_stats"):
        raise ValueError(
            f"global_routing_stats: the router ({type(router).__name__}) keeps no RoutingStats"
        )
    layer.routing_stats()  # raises, saying how to turn tracking on, when it is off
    total = copy.deepcopy(stats)
    for name, buf in total.named_buffers():
        all_reduce_sum(buf, info.data_group, f"the all-reduce of the routing statistic {name}")
    total.steps.div_(info.data_size, rounding_mode="floor")
    return total.routing_stats()


@torch.no_grad()
def update_bias(model: nn.Module) -> None:
    """The aux-loss-free bias update of every expert-parallel layer on the GLOBAL loads: the
    loads each router accumulated are all-reduced over the data group, then
    ``router.update_bias(global_loads)``: every rank's router stays identical. Call it where the
    single-process loop calls ``router.update_bias()`` (after ``optimizer.step()``)."""
    for layer in expert_parallel_layers(model):
        router = cast(Router, layer.router)
        acc = getattr(router, "load_accumulator", None)
        if acc is None or not getattr(router, "bias_update_rate", 0) > 0:
            continue
        loads = global_counts(layer, acc)
        acc.zero_()
        router.update_bias(loads)
