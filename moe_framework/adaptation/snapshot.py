"""A snapshot of a module and its optimiser state that restores bit for bit, even after the
module was resized (a split or merge changes parameter shapes, buffers and submodules)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from .resize import _set_data

__all__ = ["Snapshot"]

_PLAIN = (int, float, bool, str, type(None), tuple, frozenset)
_SKIP = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


class Snapshot:
    """Copies of everything ``module`` holds and of its parameters' optimiser state.

    ``Snapshot(module, optimizers)`` records, for every submodule object: its parameters (the
    Parameter objects and clones of their values), its buffers (clones), its child modules and its
    plain attributes (ints, floats, strings: ``num_experts`` and the like); and, per optimiser, a
    deep copy of the state of the module's parameters. :meth:`restore` puts it all back: the same
    Parameter objects get their old values (``param.data``; optimiser ``param_groups`` stay
    valid), gradients are dropped, replaced submodules and buffers come back. Memory: one copy of
    the module's parameters, buffers and optimiser state.
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()):
        self.module = module
        self.optimizers = list(optimizers)
        self._entries: list[dict[str, Any]] = []
        for m in module.modules():
            params = {n: (p, p.detach().clone()) for n, p in m._parameters.items() if p is not None}
            entry: dict[str, Any] = {
                "module": m,
                "param_slots": dict(m._parameters),
                "params": params,
                "buffers": {n: None if b is None else b.clone() for n, b in m._buffers.items()},
                "non_persistent": set(m._non_persistent_buffers_set),
                "children": dict(m._modules),
                "attrs": {
                    k: copy.copy(v)
                    for k, v in vars(m).items()
                    if k not in _SKIP and isinstance(v, _PLAIN)
                },
            }
            self._entries.append(entry)
        self._params = [p for e in self._entries for p, _ in e["params"].values()]
        self._opt_state = []
        for opt in self.optimizers:
            saved = {}
            for p in self._params:
                if p in opt.state:
                    saved[p] = {
                        k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in opt.state[p].items()
                    }
            self._opt_state.append(saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the module and the optimiser state back as they were (bitwise)."""
        for e in self._entries:
            m = e["module"]
            m._parameters.clear()
            m._parameters.update(e["param_slots"])
            for p, value in e["params"].values():
                _set_data(p, value.clone())
                p.grad = None
            m._buffers.clear()
            m._buffers.update(
                {n: None if b is None else b.clone() for n, b in e["buffers"].items()}
            )
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(e["non_persistent"])
            m._modules.clear()
            m._modules.update(e["children"])
            for k in [k for k, v in vars(m).items() if k not in _SKIP and isinstance(v, _PLAIN)]:
                if k not in e["attrs"]:
                    delattr(m, k)
            m.__dict__.update(copy.copy(e["attrs"]))
        for opt, saved in zip(self.optimizers, self._opt_state):
            for p in self._params:
                if p in saved:
                    opt.state[p] = {
                        k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in saved[p].items()
                    }
                else:
                    opt.state.pop(p, None)
