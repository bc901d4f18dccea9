"""Run the sparse MoE blocks of a Hugging Face model on moe_framework's ops, sharing the weights.

>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> from moe_framework.integrations.transformers import replace_moe_blocks
>>> model = MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=96,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> replace_moe_blocks(model)
2

``replace_moe_blocks`` swaps, in place, every supported sparse MoE block for a
:class:`HFMoEBlock`: a thin module with HF's forward signature around a
:class:`~moe_framework.moe_layer.MoELayer` composed of adapters, :class:`HFRouter` (the block's
``gate`` as a ``Router``) and :class:`HFExperts` (its ``experts`` as an ``Experts``), plus
Qwen2-MoE's gated shared expert. The block keeps its children under their names (``gate``,
``experts``, and ``shared_expert`` / ``shared_expert_gate`` for Qwen2-MoE); the adapters read
them without registering them again, so

* no tensor is copied: the HF ``Parameter`` objects are the ones the grouped GEMM reads;
  ``experts.gate_up_proj [E, 2h, d]`` and ``experts.down_proj [E, d, h]`` are ExpertBank's
  ``"out_in"`` layout (``trans_b=True``), gate rows first;
* ``state_dict`` keys, optimisers, ``save_pretrained`` and ``.to()`` see the same parameters;
* routing is the model's own router module (softmax, top-k, ``norm_topk_prob``, dtype casts), so
  routing matches HF exactly and ``output_router_logits`` (the load-balancing loss) keeps working;
* the adapter returns what the HF block returned (the ``[B, S, d]`` hidden states), so the rest of
  the model runs unchanged.

What changes is the expert computation: ``ops.permute`` -> two ``ops.grouped_gemm`` ->
``ops.unpermute`` instead of HF's per-expert Python loop (eager) or sort + ``grouped_mm``: no host
sync, deterministic, one graph under ``torch.compile``. The weighted combine sums a token's k
expert outputs in float32 (HF's eager loop accumulates them in the model dtype), so bf16 results
differ from HF's at bf16 rounding level; fp32 matches to float32 rounding.

Supported blocks (transformers 5.x): ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Protocol, cast

import torch
from torch import nn

from ..experts import GatedSharedExperts, expert_ffn
from ..moe_layer import MoELayer, RoutingInfo
from ..supervisor import RoutingDecision

__all__ = [
    "HFExperts",
    "HFExpertsModule",
    "HFGateModule",
    "HFMoEBlock",
    "HFRouter",
    "replace_moe_blocks",
    "restore_moe_blocks",
    "supported_block_classes",
]

# (module, block class) of the HF sparse MoE blocks whose forward this adapter reproduces.
_SUPPORTED = (
    ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
)


class HFGateModule(Protocol):
    """What :class:`HFRouter` uses of a Hugging Face router module (``block.gate``, e.g.
    ``MixtralTopKRouter``): ``top_k``, and ``gate(x [T, d]) -> (logits [T, E], weights [T, k],
    ids [T, k])``."""

    top_k: int

    def __call__(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class HFExpertsModule(Protocol):
    """What :class:`HFExperts` uses of a Hugging Face experts module (``block.experts``, e.g.
    ``MixtralExperts``): ``gate_up_proj [E, 2h, d]`` (gate rows first), ``down_proj [E, d, h]``
    and the activation module ``act_fn``."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]


class _HFSparseMoeBlock(Protocol):
    # A supported HF sparse MoE block, as HFMoEBlock reads it.
    gate: HFGateModule
    experts: HFExpertsModule


def supported_block_classes() -> tuple:
    """The HF block classes :func:`replace_moe_blocks` swaps (those importable here)."""
    out = []
    for mod, name in _SUPPORTED:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _check_experts(block: nn.Module) -> None:
    ex = getattr(block, "experts", None)
    name = type(block).__name__
    if ex is None or not hasattr(ex, "gate_up_proj") or not hasattr(ex, "down_proj"):
        raise ValueError(f"replace_moe_blocks: {name}.experts has no gate_up_proj/down_proj")
    # The HF experts decorator describes the weight layout; we reproduce the default one only.
    layout = {
        "is_transposed": getattr(ex, "is_transposed", False),
        "is_concatenated": getattr(ex, "is_concatenated", True),
        "has_bias": getattr(ex, "has_bias", False),
        "has_gate": getattr(ex, "has_gate", True),
    }
    if layout != {
        "is_transposed": False,
        "is_concatenated": True,
        "has_bias": False,
        "has_gate": True,
    }:
        raise ValueError(
            f"replace_moe_blocks: {name}.experts layout must be concatenated [gate; up], "
            f"not transposed, without bias; got {layout}"
        )
    E, two_h, d = ex.gate_up_proj.shape
    if tuple(ex.down_proj.shape) != (E, d, two_h // 2):
        raise ValueError(
            f"replace_moe_blocks: {name}.experts.down_proj must be [E, d, h] = "
            f"{(E, d, two_h // 2)}, got {tuple(ex.down_proj.shape)}"
        )


def _borrow(adapter: nn.Module, name: str, module: object) -> None:
    # A reference that is not a child: the HF module stays registered under its own name in the
    # HFMoEBlock (state_dict keys, named_parameters, .to() and save_pretrained as before), and an
    # adapter that registered it too would list every HF parameter a second time.
    object.__setattr__(adapter, name, module)


class HFRouter(nn.Module):
    """A Hugging Face MoE router (``block.gate``) as a ``Router``: the model's own module routes
    (softmax, top-k, ``norm_topk_prob``, dtype casts exactly as HF does them), so its output hooks
    (``output_router_logits``, the load-balancing loss) still fire.

    ``forward(x [T, d], mask=None, seq_len=None) -> RoutingDecision`` with the gate's
    ``(logits, weights, ids)``, per-expert counts and a zero ``aux_loss`` (HF computes its
    balancing loss from the router logits itself). HF routers route every token: a ``mask`` is
    refused. They keep no statistics and have no selection bias: :meth:`routing_stats` and
    :meth:`update_bias` raise, :meth:`reset_stats` does nothing.
    """

    gate: HFGateModule  # borrowed, not a child (see _borrow)

    def __init__(self, gate: HFGateModule, num_experts: int):
        super().__init__()
        _borrow(self, "gate", gate)
        self.num_experts = num_experts
        self.slots_per_token = gate.top_k

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, seq_len: Optional[int] = None
    ) -> RoutingDecision:
        if mask is not None:
            raise ValueError(
                "HFRouter: Hugging Face MoE blocks route every token; mask must be None"
            )
        logits, weights, ids = self.gate(x)
        flat = ids.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return RoutingDecision(
            weights, ids, counts, logits, logits.new_zeros((), dtype=torch.float32), {}
        )

    def routing_stats(self) -> dict:
        raise RuntimeError(
            "HFRouter: a Hugging Face router tracks no routing statistics; set "
            "block.keep_routing_info = True and read block.last_routing_info (counts, ids) instead"
        )

    def reset_stats(self) -> None:
        """Nothing to reset: no statistics are kept."""

    def update_bias(self, counts: Optional[torch.Tensor] = None) -> None:
        raise RuntimeError(
            "HFRouter: Hugging Face routers have no selection bias; update_bias does not apply"
        )

    def extra_repr(self) -> str:
        return f"gate={type(self.gate).__name__}, num_experts={self.num_experts}, k={self.slots_per_token}"


class HFExperts(nn.Module):
    """A Hugging Face experts module (``block.experts``) as :class:`~moe_framework.experts.Experts`.

    Reads the model's own ``gate_up_proj [E, 2h, d]`` (gate rows first) and ``down_proj
    [E, d, h]`` at every call, no copy: they are ``ExpertBank``'s ``"out_in"`` layout, run by
    ``expert_ffn`` (two ``ops.grouped_gemm`` with ``trans_b=True``, the fused SwiGLU). The model's
    activation module is used as the gate nonlinearity (SiLU takes the fused path).
    ``inplace_backward``: as in :func:`moe_framework.experts.expert_ffn`.
    """

    hf_experts: HFExpertsModule  # borrowed, not a child (see _borrow)

    def __init__(self, experts: HFExpertsModule, *, inplace_backward: bool = True):
        super().__init__()
        if not isinstance(inplace_backward, bool):
            raise ValueError(
                f"HFExperts: inplace_backward must be a bool, got {inplace_backward!r}"
            )
        _borrow(self, "hf_experts", experts)
        self.num_experts, _, self.d_model = experts.gate_up_proj.shape
        self.inplace_backward = inplace_backward

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ex = self.hf_experts
        # HF's SiLUActivation is F.silu: take swiglu's fused path; any other activation is called.
        act: Optional[Callable[[torch.Tensor], torch.Tensor]] = ex.act_fn
        if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
            act = None
        return expert_ffn(
            x_sorted,
            offsets,
            ex.gate_up_proj,
            ex.down_proj,
            activation="swiglu",
            layout="out_in",
            act_fn=act,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return f"hf_experts={type(self.hf_experts).__name__}, num_experts={self.num_experts}"


class _HFModule(nn.Module):
    """Calls a borrowed HF module (the shared expert, its gate) without registering it."""

    module: nn.Module  # borrowed, not a child (see _borrow)

    def __init__(self, module: nn.Module):
        super().__init__()
        _borrow(self, "module", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def extra_repr(self) -> str:
        return type(self.module).__name__


class HFMoEBlock(nn.Module):
    """A Hugging Face sparse MoE block running as a :class:`MoELayer` on its own weights.

    Built by :func:`replace_moe_blocks`. Keeps the block's ``gate``, ``experts`` and, for
    Qwen2-MoE, ``shared_expert`` / ``shared_expert_gate`` modules themselves under their names
    (same objects), and ``moe = MoELayer(HFRouter(gate), HFExperts(experts),
    shared=sigmoid-gated shared expert)``, whose adapters read those modules without owning them.

    ``forward(hidden_states [B, S, d]) -> [B, S, d]`` like the HF block (Mixtral's training-time
    jitter included). With ``keep_routing_info=True`` the last call's :class:`RoutingInfo` (with
    draft reports when ``report_top_tokens`` is an int) is kept in ``last_routing_info``.
    """

    # The block's own modules, registered here as children under their HF names.
    gate: HFGateModule
    experts: HFExpertsModule

    def __init__(
        self,
        block: nn.Module,
        *,
        report_top_tokens: Optional[int] = None,
        inplace_backward: bool = True,
    ):
        super().__init__()
        _check_experts(block)
        # A supported block (its experts were checked just above), seen through what we read of it.
        hf = cast(_HFSparseMoeBlock, block)
        self.gate = hf.gate
        self.experts = hf.experts
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.num_experts = hf.experts.gate_up_proj.shape[0]
        self.top_k = hf.gate.top_k
        shared: Optional[nn.Module] = None
        if self.shared_expert is not None:
            shared = _HFModule(self.shared_expert)
            if self.shared_expert_gate is not None:
                shared = GatedSharedExperts(shared, _HFModule(self.shared_expert_gate))
        self.moe = MoELayer(
            HFRouter(hf.gate, self.num_experts),
            HFExperts(hf.experts, inplace_backward=inplace_backward),
            shared=shared,
            report_top_tokens=report_top_tokens,
        )
        self.keep_routing_info = False
        self.last_routing_info: Optional[RoutingInfo] = None
        # Not a child module (its children are ours already): lets restore_moe_blocks undo the swap.
        object.__setattr__(self, "_hf_block", block)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            # Same in-place jitter as MixtralSparseMoeBlock (same RNG draws).
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        y, info = self.moe(hidden_states)
        if self.keep_routing_info:
            self.last_routing_info = info
        return y

    def extra_repr(self) -> str:
        return f"hf_block={type(self._hf_block).__name__}"


def _swap(model: nn.Module, match, make) -> int:
    targets = [(name, m) for name, m in model.named_modules() if name and match(m)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(m))
    return len(targets)


def replace_moe_blocks(
    model: nn.Module,
    *,
    report_top_tokens: Optional[int] = None,
    inplace_backward: bool = True,
) -> int:
    """Swap every supported HF sparse MoE block of ``model`` for an :class:`HFMoEBlock`, in place.

    Parameters are shared, not copied. Returns the number of blocks replaced (0 when the model has
    none). ``report_top_tokens``: r of each block's draft reports (``None``, the default, computes
    none: the HF model does not consume them). ``inplace_backward=False`` lets one graph be
    backpropagated more than once (``retain_graph=True``, ``gradcheck``; see
    :func:`moe_framework.experts.expert_ffn`).
    """
    classes = supported_block_classes()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"replace_moe_blocks: model must be an nn.Module, got {type(model).__name__}"
        )
    return _swap(
        model,
        lambda m: type(m) in classes,
        lambda m: HFMoEBlock(
            m, report_top_tokens=report_top_tokens, inplace_backward=inplace_backward
        ),
    )


def restore_moe_blocks(model: nn.Module) -> int:
    """Undo :func:`replace_moe_blocks`: put the original HF blocks back (they share the same
    parameters, so training done meanwhile is kept). Returns the number of blocks restored."""
    return _swap(model, lambda m: isinstance(m, HFMoEBlock), lambda m: m._hf_block)


# ---- The other two doors (issue 14): "moe_framework" in transformers' ExpertsInterface, and the
# router swap. Importing this module registers the experts implementation (idempotent); with a
# transformers that has no ExpertsInterface the error is kept and raised by
# register_experts_implementation(), while replace_moe_blocks keeps working.
from .hf_experts import (  # noqa: E402
    EXPERTS_IMPLEMENTATION,
    moe_framework_experts_forward,
    register_experts_implementation,
)
from .hf_routers import RouterSwapReport, replace_routers, restore_routers  # noqa: E402

EXPERTS_INTERFACE_ERROR: Optional[ImportError] = None
try:
    register_experts_implementation()
except ImportError as _e:  # pragma: no cover - transformers < 5
    EXPERTS_INTERFACE_ERROR = _e

__all__ += [
    "EXPERTS_IMPLEMENTATION",
    "RouterSwapReport",
    "moe_framework_experts_forward",
    "register_experts_implementation",
    "replace_routers",
    "restore_routers",
]
