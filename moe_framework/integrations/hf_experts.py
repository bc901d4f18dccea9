"""``"moe_framework"`` in transformers' ``ExpertsInterface``: every decorated HF experts class on
our ops.

transformers 5.x runs the experts of its MoE families through
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` (an ``ExpertsInterface``): every experts
class decorated with ``use_experts_implementation`` calls
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden_states, top_k_index,
top_k_weights)``. :func:`register_experts_implementation` (run when
``moe_framework.integrations.transformers`` is imported) adds :func:`moe_framework_experts_forward`
under the name ``"moe_framework"``, so

>>> model.set_experts_implementation("moe_framework")  # doctest: +SKIP

(or ``from_pretrained(..., experts_implementation="moe_framework")``) runs the model's experts as
``ops.permute -> ops.grouped_gemm -> gate -> ops.grouped_gemm -> ops.unpermute`` on the module's
own parameters (no copy), or, for a few tokens without gradient (decode: ``T * k <= 4 E``), as the
single fused ``ops.moe_decode``.

Every flag of the decorator is honoured: ``is_transposed`` (weights ``[E, in, out]``: the grouped
GEMM without ``trans_b``), ``has_bias`` (per-expert biases added per row), ``has_gate=False``
(``up_proj`` and the model's ``act_fn``), ``is_concatenated`` (read by the model's own
``_apply_gate``), and a custom ``_apply_gate``: GPT-OSS's clamped SwiGLU (and its concatenated
copies in OpenAI-privacy-filter and MiniMax-M3-VL) runs the fused ``ops.clamped_swiglu``; the
default gate with SiLU runs the fused ``ops.swiglu``; any other gate runs the model's own function
on the grouped output. Expert parallelism (``_is_expert_parallel``, set by transformers' EP plan):
the module holds its rank's experts (DTensor parameters are read rank-locally) and the ids of
slots routed to other ranks' experts are sentinels ``>= E_local``, run as dropped slots.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from ..experts import _is_silu, _row_bias, expert_ffn, expert_of_row

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "CLAMPED_SWIGLU_GATES",
    "moe_framework_experts_forward",
    "register_experts_implementation",
]

# The name under which the implementation is registered in transformers' ExpertsInterface.
EXPERTS_IMPLEMENTATION = "moe_framework"

# Custom `_apply_gate` methods known to be the clamped SwiGLU of ops.clamped_swiglu, by qualified
# name: (attribute holding alpha, attribute holding limit, interleaved gate/up columns).
CLAMPED_SWIGLU_GATES: dict[str, tuple[str, str, bool]] = {
    "GptOssExperts._apply_gate": ("alpha", "limit", True),
    "OpenAIPrivacyFilterExperts._apply_gate": ("alpha", "limit", False),
    "MiniMaxM3VLExperts._apply_gate": ("swiglu_alpha", "swiglu_limit", False),
}


@torch._dynamo.assume_constant_result
def _gate_rule(cls: type) -> tuple:
    """What the `_apply_gate` of experts class `cls` is: ("default",) for transformers' default
    gate, ("clamped", alpha attribute, limit attribute, interleaved) for a known clamped SwiGLU,
    ("custom",) otherwise. A constant for torch.compile (read once per class when tracing)."""
    from transformers.integrations import moe as hf_moe

    gate_fn = getattr(cls, "_apply_gate", None)
    if gate_fn is None or gate_fn is getattr(hf_moe, "_default_apply_gate", None):
        return ("default",)
    spec = CLAMPED_SWIGLU_GATES.get(getattr(gate_fn, "__qualname__", ""))
    if spec is not None:
        return ("clamped", *spec)
    return ("custom",)


def _gate_of(module: nn.Module) -> tuple[str, Any]:
    """How to run the module's gate: ("silu", None) for the default gate with SiLU (fused swiglu),
    ("act", act_fn) for the default gate with another activation, ("clamped", (alpha, limit,
    interleaved)) for a known clamped SwiGLU, ("custom", None) for the module's own _apply_gate,
    ("none", act_fn) for non-gated experts."""
    if not getattr(module, "has_gate", True):
        return "none", module.act_fn
    rule = _gate_rule(type(module))
    if rule[0] == "default":
        act = getattr(module, "act_fn", None)
        if act is None:
            return "custom", None
        if _is_silu(act) or type(act).__name__ == "SiLUActivation":
            return "silu", None
        return "act", act
    if rule[0] == "clamped" and hasattr(module, rule[1]) and hasattr(module, rule[2]):
        return "clamped", (
            float(getattr(module, rule[1])),
            float(getattr(module, rule[2])),
            rule[3],
        )
    return "custom", None


def _cached_gate_of(module: nn.Module) -> tuple[str, Any]:
    """:func:`_gate_of`, remembered on the module (keyed by the activation object itself, the
    ``has_gate`` flag and the class, so swapping ``act_fn`` or a flag is seen); recomputed while
    torch.compile traces (no side effect in a graph)."""
    if torch.compiler.is_compiling():
        return _gate_of(module)
    act = getattr(module, "act_fn", None)
    has_gate = getattr(module, "has_gate", True)
    hit = module.__dict__.get("_moe_framework_gate")
    if hit is not None and hit[0] is act and hit[1] == has_gate and hit[2] is type(module):
        return hit[3]
    rule = _gate_of(module)
    if rule[0] != "clamped":  # alpha / limit are plain attributes that may change: not cached
        module.__dict__["_moe_framework_gate"] = (act, has_gate, type(module), rule)
    return rule


def _local(t: Any) -> Any:
    """The rank-local tensor of a DTensor parameter (transformers' expert-parallel sharding); any
    other tensor as it is."""
    if type(t) is nn.Parameter or type(t) is torch.Tensor:  # the common case, no attribute miss
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _add_row_bias(t: torch.Tensor, bias: torch.Tensor, rows_expert: torch.Tensor) -> torch.Tensor:
    """``t + bias[expert of row]``, in place into ``t`` (a fresh grouped GEMM output nothing else
    holds; its backward does not need it) when the dtypes agree: at prefill sizes a second
    [rows, N] buffer costs its page faults and a full extra write."""
    rb = _row_bias(bias, rows_expert)
    return t.add_(rb) if rb.dtype == t.dtype else t + rb


def moe_framework_experts_forward(
    self: Any,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"moe_framework"`` experts implementation (``ExpertsInterface`` signature).

    Args:
        self: the HF experts module (``gate_up_proj`` or ``up_proj``, ``down_proj``, optional
            ``*_bias``, the decorator's flags).
        hidden_states: ``[T, d]``.
        top_k_index: ``[T, k]`` expert ids in ``[0, E)``.
        top_k_weights: ``[T, k]`` gate weights.

    Returns:
        ``[T, d]`` in ``hidden_states``' dtype: ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``,
        the k outputs of a token summed in float32 in slot order.
    """
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    trans_b = not getattr(self, "is_transposed", False)
    w_in: torch.Tensor = _local(self.gate_up_proj if has_gate else self.up_proj)
    w_out: torch.Tensor = _local(self.down_proj)
    b_in: Optional[torch.Tensor] = None
    b_out: Optional[torch.Tensor] = None
    if has_bias:
        b_in = _local(self.gate_up_proj_bias if has_gate else self.up_proj_bias)
        b_out = _local(self.down_proj_bias)
    if hidden_states.dim() != 2 or top_k_index.dim() != 2:
        raise ValueError(
            "moe_framework experts implementation: hidden_states must be [T, d] and top_k_index "
            f"[T, k], got {tuple(hidden_states.shape)} and {tuple(top_k_index.shape)}"
        )
    num_experts = w_in.shape[0]
    if getattr(self, "_is_expert_parallel", False):
        # transformers' expert parallelism (RouterParallel) gives each rank the ids of its own
        # experts, in [0, E_local), and a sentinel >= E_local (weight 0) for slots routed to other
        # ranks; HF all-reduces the ranks' outputs afterwards. Sentinels become dropped slots
        # (-1): no GEMM rows, zero contribution.
        top_k_index = torch.where(top_k_index >= num_experts, -1, top_k_index)
    x = hidden_states if hidden_states.dtype == w_in.dtype else hidden_states.to(w_in.dtype)
    weights = top_k_weights
    if weights.dtype not in (torch.float32, x.dtype):
        weights = weights.float()
    kind, arg = _cached_gate_of(self)
    T, k = top_k_index.shape
    if (
        kind in ("silu", "clamped")
        and T * k <= ops.DECODE_SLOTS_PER_EXPERT.get(x.dtype, 1.0) * num_experts
        and not _needs_grad(x, weights, w_in, w_out, b_in, b_out)
    ):
        # The fused small-T step: SwiGLU, or GPT-OSS's clamped gate, with the biases.
        if kind == "clamped":
            alpha, limit, interleaved = arg
            gate_kw = dict(gate="clamped", alpha=alpha, limit=limit, interleaved=interleaved)
        else:
            gate_kw = {}
        y = ops.moe_decode(
            x, top_k_index, weights, w_in, w_out, trans_b, b_in=b_in, b_out=b_out, **gate_kw
        )
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)
    x_sorted, row_of_slot, offsets = ops.permute(x, top_k_index, num_experts)
    if kind == "silu":
        y_sorted = expert_ffn(
            x_sorted,
            offsets,
            w_in,
            w_out,
            layout="out_in" if trans_b else "in_out",
            b_in=b_in,
            b_out=b_out,
        )
    else:
        rows_expert = expert_of_row(offsets, x_sorted.shape[0]) if has_bias else None
        h = ops.grouped_gemm(x_sorted, w_in, offsets, trans_b=trans_b)
        if b_in is not None and rows_expert is not None:
            h = _add_row_bias(h, b_in, rows_expert)
        if kind == "clamped":
            alpha, limit, interleaved = arg
            a = ops.clamped_swiglu(h, alpha, limit, interleaved)
        elif kind == "act":
            half = h.shape[-1] // 2
            a = arg(h[..., :half]) * h[..., half:]
        elif kind == "none":
            a = arg(h)
        else:
            a = self._apply_gate(h)
        y_sorted = ops.grouped_gemm(a.to(w_out.dtype), w_out, offsets, trans_b=trans_b)
        if b_out is not None and rows_expert is not None:
            y_sorted = _add_row_bias(y_sorted, b_out, rows_expert)
    y = ops.unpermute(
        y_sorted,
        row_of_slot,
        weights.to(y_sorted.dtype)
        if weights.dtype not in (torch.float32, y_sorted.dtype)
        else weights,
    )
    return y.to(hidden_states.dtype)


def register_experts_implementation() -> None:
    """Register :func:`moe_framework_experts_forward` as ``"moe_framework"`` in transformers'
    ``ExpertsInterface`` (idempotent).

    Raises:
        ImportError: transformers is not installed, or has no ``ExpertsInterface`` (before 5.x).
    """
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError as e:
        raise ImportError(
            "moe_framework: the Hugging Face experts implementation needs transformers >= 5 "
            f"(transformers.integrations.moe); import failed: {e}"
        ) from e
    interface = getattr(hf_moe, "ALL_EXPERTS_FUNCTIONS", None)
    if interface is None or not hasattr(type(interface), "register"):
        raise ImportError(
            "moe_framework: the installed transformers has no ExpertsInterface "
            "(transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS); the experts implementation "
            "needs transformers >= 5. replace_moe_blocks works without it."
        )
    type(interface).register(EXPERTS_IMPLEMENTATION, moe_framework_experts_forward)
