"""``replace_routers(model)``: Hugging Face MoE routers on the fused ``ops.route`` op.

A standard HF router computes ``logits = x @ W.T`` and then, in 4-8 eager ops, its routing:
softmax -> top-k (-> renormalise), as in Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS (top-k of the logits
then softmax of the k: the same thing), or sigmoid (+ correction bias for selection) -> best groups
-> top-k -> renormalise -> scale, as in DeepSeek-V3, Kimi, GLM4-MoE, dots1. ``replace_routers``
replaces, for every router module it recognises, that chain by one ``ops.route`` call:

* the module itself stays (same object, same parameters and buffers, same ``state_dict`` keys,
  hooks still fire); only its ``forward`` is replaced, on the instance, by one that computes the
  logits exactly as before and routes with ``ops.route``; :func:`restore_routers` undoes it;
* before swapping, the new forward is run on a random probe batch next to the original one: the
  router is swapped only when both select the same experts for every token and their weights agree
  to float rounding (same dtypes, same logits). Anything else (an unknown routing rule, jitter,
  a router whose output differs in any way) is left alone and listed in the report.

Recognised settings (read from the module's attributes): ``top_k``; softmax with
``norm_topk_prob`` (absent means renormalised: Mixtral) and an optional logit ``bias``
(GPT-OSS); sigmoid when the module has ``e_score_correction_bias``, with ``n_group`` /
``num_group``, ``topk_group``, ``norm_topk_prob`` and ``routed_scaling_factor``.
Selected experts come best first (HF's DeepSeek-style routers return them unsorted: compare sets).
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["RouterSwapReport", "replace_routers", "restore_routers"]


class RouterSwapReport(NamedTuple):
    """What :func:`replace_routers` did: ``swapped`` module names, ``skipped`` ``{name: reason}``."""

    swapped: list[str]
    skipped: dict[str, str]


def _attr(module: nn.Module, *names: str, default: Any = None) -> Any:
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    return default


def _spec_of(module: nn.Module) -> Optional[dict]:
    weight = getattr(module, "weight", None)
    top_k = _attr(module, "top_k", "num_experts_per_tok")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(top_k, int):
        return None
    if "router" not in type(module).__name__.lower():
        return None
    bias = getattr(module, "bias", None)
    corr = getattr(module, "e_score_correction_bias", None)
    if isinstance(corr, torch.Tensor):
        return {
            "scoring": "sigmoid",
            "k": top_k,
            "n_group": int(_attr(module, "n_group", "num_group", default=1) or 1),
            "topk_group": int(_attr(module, "topk_group", default=1) or 1),
            "renormalize": bool(_attr(module, "norm_topk_prob", default=True)),
            "scaling_factor": float(_attr(module, "routed_scaling_factor", default=1.0) or 1.0),
            "fp32_logits": True,
            "bias": False,
        }
    return {
        "scoring": "softmax",
        "k": top_k,
        "n_group": 1,
        "topk_group": 1,
        "renormalize": bool(_attr(module, "norm_topk_prob", default=True)),
        "scaling_factor": 1.0,
        "fp32_logits": False,
        "bias": isinstance(bias, torch.Tensor),
    }


def _fused_forward(self: Any, hidden_states: torch.Tensor):
    # self: the HF router module (weight, optional bias / e_score_correction_bias, the spec).
    spec = self._moe_framework_route
    x = hidden_states.reshape(-1, self.weight.shape[1])
    if spec["fp32_logits"]:
        logits = F.linear(x.float(), self.weight.float())
    else:
        logits = F.linear(x, self.weight, self.bias if spec["bias"] else None)
    corr = self.e_score_correction_bias if spec["scoring"] == "sigmoid" else None
    weights, ids, _ = ops.route(
        logits,
        spec["k"],
        scoring=spec["scoring"],
        correction_bias=corr.float() if corr is not None else None,
        n_group=spec["n_group"],
        topk_group=spec["topk_group"],
        renormalize=spec["renormalize"],
        scaling_factor=spec["scaling_factor"],
    )
    return logits, weights.to(spec["weights_dtype"] or logits.dtype), ids.long()


def _same_routing(ref, new, dtype: torch.dtype) -> Optional[str]:
    if not (isinstance(ref, tuple) and len(ref) == 3):
        return "the router does not return (logits, weights, ids)"
    (l0, w0, i0), (l1, w1, i1) = ref, new
    if l0.shape != l1.shape or not torch.equal(l0, l1):
        return "its logits differ from ours"
    if w0.dtype != w1.dtype or i0.shape != i1.shape:
        return f"its outputs are {w0.dtype} {tuple(i0.shape)}, ours {w1.dtype} {tuple(i1.shape)}"
    s0, o0 = i0.sort(-1)
    s1, o1 = i1.sort(-1)
    if not torch.equal(s0, s1):
        return "it selects other experts than ops.route"
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    a, b = w0.gather(-1, o0).float(), w1.gather(-1, o1).float()
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        return f"its weights differ (max {float((a - b).abs().max()):.3g})"
    return None


def _probe(module: Any, spec: dict) -> Optional[str]:
    w = module.weight
    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(32, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = module(x)
            if not (isinstance(ref, tuple) and len(ref) == 3):
                return "the router does not return (logits, weights, ids)"
            spec["weights_dtype"] = ref[1].dtype
            module._moe_framework_route = spec
            new = _fused_forward(module, x)
    except Exception as e:  # noqa: BLE001 - any failure means "not a router we reproduce"
        return f"probe failed: {type(e).__name__}: {e}"
    finally:
        module.train(was_training)
    return _same_routing(ref, new, w.dtype)


def replace_routers(model: nn.Module) -> RouterSwapReport:
    """Put ``ops.route`` in every standard HF router of ``model`` (in place; see the module doc).

    Returns a :class:`RouterSwapReport`: the names of the swapped routers and, for every router-like
    module left alone, why. Calling it again is harmless (swapped routers are skipped).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"replace_routers: model must be an nn.Module, got {type(model).__name__}")
    swapped: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if "_moe_framework_route" in module.__dict__ and "forward" in module.__dict__:
            continue
        spec = _spec_of(module)
        if spec is None:
            continue
        reason = _probe(module, spec)
        if reason is not None:
            module.__dict__.pop("_moe_framework_route", None)
            skipped[name] = reason
            continue
        module.forward = types.MethodType(_fused_forward, module)
        swapped.append(name)
    return RouterSwapReport(swapped, skipped)


def restore_routers(model: nn.Module) -> int:
    """Undo :func:`replace_routers`; returns the number of routers restored."""
    n = 0
    for module in model.modules():
        if "_moe_framework_route" in module.__dict__:
            module.__dict__.pop("forward", None)
            del module.__dict__["_moe_framework_route"]
            n += 1
    return n
