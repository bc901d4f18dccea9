"""Resharding checkpoints of expert-parallel models with ``torch.distributed.checkpoint`` (DCP).

The state dict DCP sees stores each expert under its own key: the stacked parameter
``<layer>.experts.w_out`` ``[E_l, ...]`` of a rank becomes ``<layer>.experts.w_out::expert<e>``
for each GLOBAL expert ``e`` it owns (views of the parameter, so loading writes in place). A
checkpoint written at one ``ep`` therefore loads at any other ``ep`` that divides E (and in a
single process, ``ep = 1``), bitwise: every rank asks DCP for exactly the experts it owns.
Dense parameters are saved once (DCP deduplicates replicated tensors) and FSDP2's ``DTensor``
shards are resharded by DCP itself.

:func:`export_system` turns such a checkpoint of a
:class:`~moe_framework.system.MixtureOfExpertsSystem` into the single-process safetensors
directory that ``MixtureOfExpertsSystem.load`` reads.
"""

from __future__ import annotations

import os
from typing import Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..experts import CheckpointedExperts, ExpertBank
from ..moe_layer import MoELayer
from .sharding import info_of

__all__ = ["EXPERT_KEY", "expert_split_state_dict", "export_system", "load", "save"]

EXPERT_KEY = "{key}::expert{e}"


def _banks(model: nn.Module):
    """(state-dict prefix of the bank's parameters, bank, first global expert) per MoE layer."""
    for name, m in model.named_modules():
        if not isinstance(m, MoELayer):
            continue
        experts = m.experts
        bank = experts.inner if isinstance(experts, CheckpointedExperts) else experts
        if not isinstance(bank, ExpertBank):
            continue
        info = info_of(m)
        first = 0 if info is None else info.first_expert
        # CheckpointedExperts keeps the wrapped bank's keys (no "inner."): same prefix.
        yield (f"{name}." if name else "") + "experts.", bank, first


def expert_split_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every expert bank split into one entry per global expert
    (views that share storage with the parameters: DCP loads into them in place)."""
    sd = model.state_dict()
    for prefix, bank, first in _banks(model):
        for pname, _ in bank.named_parameters(recurse=False):
            key = prefix + pname
            if key not in sd:
                raise RuntimeError(f"expert checkpoint: {key} is missing from the state dict")
            local = sd.pop(key)
            for i in range(local.shape[0]):
                sd[EXPERT_KEY.format(key=key, e=first + i)] = local[i]
    return sd


def save(model: nn.Module, checkpoint_dir: Union[str, os.PathLike]) -> None:
    """Collective: every rank of the model's process groups calls it. Writes a DCP checkpoint
    of ``model`` (expert-parallel or not, FSDP2 or not) to ``checkpoint_dir``."""
    dcp.save(
        expert_split_state_dict(model),
        checkpoint_id=os.fspath(checkpoint_dir),
        no_dist=not dist.is_initialized(),
    )


def load(model: nn.Module, checkpoint_dir: Union[str, os.PathLike]) -> None:
    """Collective (or single-process when no process group is initialised): load a checkpoint
    written by :func:`save` at any expert-parallel size into ``model``, in place. Every key the
    model needs must be in the checkpoint (DCP raises naming the missing one)."""
    sd = expert_split_state_dict(model)
    # Non-expert tensors DCP may hand back as new objects (it loads in place where it can).
    before = {k: v for k, v in sd.items()}
    dcp.load(sd, checkpoint_id=os.fspath(checkpoint_dir), no_dist=not dist.is_initialized())
    with torch.no_grad():
        full = model.state_dict()
        for k, v in sd.items():
            if v is not before[k] and k in full:
                full[k].copy_(v)


def export_system(
    config, checkpoint_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]
) -> None:
    """Write the single-process ``MixtureOfExpertsSystem`` directory (``model.safetensors`` +
    ``config.json``) of a DCP checkpoint saved by :func:`save` from an expert-parallel system
    built from ``config`` (an ``MoEConfig``). Runs in one process; when a process group is
    initialised, call it on one rank only, after every rank finished :func:`save`."""
    from ..system import MixtureOfExpertsSystem

    model = MixtureOfExpertsSystem(config)
    sd = expert_split_state_dict(model)
    before = dict(sd)
    dcp.load(sd, checkpoint_id=os.fspath(checkpoint_dir), no_dist=True)
    with torch.no_grad():
        full = model.state_dict()
        for k, v in sd.items():
            if v is not before[k] and k in full:
                full[k].copy_(v)
    model.save(out_dir)
