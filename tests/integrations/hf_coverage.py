"""Enumeration and tiny configs of every transformers experts class decorated with
``use_experts_implementation`` (shared by the coverage test and the docs' support table).

Nothing here names a model family: the classes are found by scanning the installed transformers'
modeling files for the decorator and importing those modules; each class's config is found among
the config classes of its model package and shrunk generically (ints that name a width, an expert
count or a top-k are made small).
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Optional

import torch
from torch import nn

HIDDEN = 32
INTERMEDIATE = 24
EXPERTS = 6
TOP_K = 2


def decorated_experts_classes() -> list[type]:
    """Every class decorated with ``use_experts_implementation`` in the installed transformers."""
    import transformers.models as models
    from transformers.integrations import moe as hf_moe

    root = os.path.dirname(models.__file__)
    found: list[type] = []
    for pkg in sorted(os.listdir(root)):
        d = os.path.join(root, pkg)
        if not os.path.isdir(d):
            continue
        for fn in sorted(os.listdir(d)):
            if not (fn.startswith("modeling_") and fn.endswith(".py")):
                continue
            with open(os.path.join(d, fn), encoding="utf-8") as f:
                if "@use_experts_implementation" not in f.read():
                    continue
            mod = importlib.import_module(f"transformers.models.{pkg}.{fn[:-3]}")
            for obj in vars(mod).values():
                fwd = inspect.isclass(obj) and obj.__module__ == mod.__name__
                fwd = fwd and obj.__dict__.get("forward")
                code = getattr(fwd, "__code__", None)
                if code is not None and os.path.samefile(code.co_filename, hf_moe.__file__):
                    found.append(obj)
    return found


def _small(key: str, v: Any) -> Any:
    # The small value for config attribute `key` (current value v), or v when it is no size.
    low = key.lower()
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return [_small(key, i) for i in v]
    if isinstance(v, bool) or not (v is None or isinstance(v, int)) or key.startswith("_"):
        return v
    if low in ("hidden_size", "d_model", "n_embd", "hidden_dim"):
        return HIDDEN if v is not None else v
    if "intermediate" in low or low in ("ffn_hidden_size", "expert_hidden_size"):
        return INTERMEDIATE
    if "per_tok" in low or "top_k" in low or low in ("moe_topk", "moe_k"):
        return TOP_K if v is None else min(v, TOP_K)
    if "experts" in low and "shared" not in low and "group" not in low:
        return EXPERTS if v is None else min(v, EXPERTS)
    if low in ("n_group", "num_expert_group", "topk_group"):
        return 1 if v is not None else v
    return v


def _shrink(cfg: Any) -> None:
    for key, v in list(vars(cfg).items()):
        new = _small(key, v)
        if new is not v:
            setattr(cfg, key, new)


def _config_classes(experts_cls: type) -> list[type]:
    from transformers import PreTrainedConfig

    pkg = experts_cls.__module__.rsplit(".", 1)[0]
    out: list[type] = []
    for name in sorted(os.listdir(os.path.dirname(importlib.import_module(pkg).__file__))):
        if name.startswith("configuration_") and name.endswith(".py"):
            mod = importlib.import_module(f"{pkg}.{name[:-3]}")
            for obj in vars(mod).values():
                if inspect.isclass(obj) and issubclass(obj, PreTrainedConfig):
                    if obj.__module__ == mod.__name__ and obj not in out:
                        out.append(obj)
    # Text configs first: a multimodal model's experts live in its text stack.
    out.sort(key=lambda c: ("Text" not in c.__name__, c.__name__))
    return out


def build_tiny_experts(experts_cls: type) -> tuple[nn.Module, Any]:
    """A tiny instance of ``experts_cls`` and its shrunk config, or raises RuntimeError."""
    errors = []
    for cfg_cls in _config_classes(experts_cls):
        try:
            cfg = cfg_cls()
            _shrink(cfg)
            # Sizes the constructor takes besides the config (Ernie-VL's per-modality width).
            params = list(inspect.signature(experts_cls.__init__).parameters)[2:]
            extra = {p: INTERMEDIATE for p in params if "intermediate" in p}
            module = experts_cls(cfg, **extra)
        except Exception as e:  # noqa: BLE001 - try the next config class
            errors.append(f"{cfg_cls.__name__}: {type(e).__name__}: {e}")
            continue
        if any(p.dim() == 3 for p in module.parameters()):
            return module, cfg
        errors.append(f"{cfg_cls.__name__}: no [E, ., .] parameter")
    raise RuntimeError("; ".join(errors) or "no config class found")


def expert_weight(module: nn.Module) -> torch.Tensor:
    return module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj


def run_experts(
    module: nn.Module,
    impl: str,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    grad_out: Optional[torch.Tensor],
):
    """Output and gradients (x, weights, every parameter) of ``module`` under ``impl``."""
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(grad_out is not None)
    wi = weights.detach().clone().requires_grad_(grad_out is not None)
    y = module(xi, ids, wi)
    grads: dict[str, torch.Tensor] = {}
    if grad_out is not None:
        (y.float() * grad_out).sum().backward()
        grads = {"x": xi.grad, "weights": wi.grad}
        for n, p in module.named_parameters():
            grads[n] = p.grad if p.grad is not None else torch.zeros_like(p)
    return y.detach(), grads
