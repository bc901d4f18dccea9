"""The experts stage of an MoE layer: the :class:`Experts` protocol and its implementations.

* :class:`ExpertBank`: E feed-forward experts with stacked weights, run on an expert-sorted buffer by
  two ``ops.grouped_gemm`` calls (no per-expert loop, no host sync).
* :class:`CheckpointedExperts`: any :class:`Experts`, recomputed in backward instead of keeping its
  activations (gradient checkpointing of the expert block).
* :class:`DenseFFN`: one always-on feed-forward expert (shared experts, the dense baseline), and
  :class:`GatedSharedExperts`, Qwen2-MoE's sigmoid-gated shared experts.
* :func:`expert_ffn`: the functional ``ExpertBank`` on tensors you pass in (the Hugging Face
  experts adapter uses it on the model's own parameters).

Weight layouts
--------------
Every projection is ONE stacked tensor (no per-expert modules), in one of two layouts:

``layout="in_out"`` (default, ``y = x @ W``)
    SwiGLU: ``w_gate_up [E, d, 2h]`` (columns ``[:h]`` = gate, ``[h:]`` = up), ``w_out [E, h, d]``.
    GELU:   ``w_in [E, d, h]``, ``w_out [E, h, d]``.
    The grouped GEMM reads ``b[e]`` as ``[K, N]`` (``trans_b=False``).

``layout="out_in"`` (``y = x @ W.T``, the ``nn.Linear`` and Hugging Face layout)
    SwiGLU: ``w_gate_up [E, 2h, d]`` (rows ``[:h]`` = gate, ``[h:]`` = up), ``w_out [E, d, h]``.
    GELU:   ``w_in [E, h, d]``, ``w_out [E, d, h]``.
    The grouped GEMM reads ``b[e]`` as ``[N, K]`` (``trans_b=True``). This is exactly the layout of
    ``gate_up_proj`` / ``down_proj`` in the Hugging Face (transformers 5.x) ``MixtralExperts``,
    ``Qwen2MoeExperts`` and ``Qwen3MoeExperts``, so those tensors are used as they are, without a
    copy (see ``moe_framework.integrations.transformers``).

Biases (``bias=True``): ``b_gate_up [E, 2h]`` / ``b_in [E, h]`` and ``b_out [E, d]`` in both layouts.

Initialisation
--------------
By default each expert's projection is initialised like the ``nn.Linear(fan_in, fan_out)`` it
replaces (PyTorch's default: weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), so swapping
a dense FFN built from ``nn.Linear`` for experts keeps activation scales. ``init_std=s`` instead
draws weights from ``N(0, s)`` and zeroes biases, the GPT-2 / Megatron / Hugging Face convention
(``initializer_range``, 0.02 for Mixtral and Qwen-MoE).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import ops

__all__ = [
    "ACTIVATIONS",
    "LAYOUTS",
    "Experts",
    "ExpertBank",
    "CheckpointedExperts",
    "DenseFFN",
    "GatedSharedExperts",
    "expert_ffn",
    "expert_of_row",
    "swiglu",
]

from .options import ACTIVATIONS, LAYOUTS


class Experts(Protocol):
    """The experts stage of an :class:`~moe_framework.moe_layer.MoELayer` (an ``nn.Module``).

    ``forward(x_sorted [M, d], offsets [E+1] int64) -> y_sorted [M, d]``: rows
    ``offsets[e]:offsets[e+1]`` of ``x_sorted`` are expert ``e``'s tokens (as the dispatcher
    sorted them) and ``y_sorted`` holds each row's output of its expert, same dtype. Rows from
    ``offsets[E]`` on are dropped slots: their outputs must be zeros (the combine gives them weight
    0, and ``0 * nan`` would not be 0). ``offsets`` stays on the device: an implementation that
    reads it on the host (``.tolist()``, a Python loop over experts) works but syncs and breaks
    ``torch.compile(fullgraph=True)``.

    Attribute ``num_experts``: E, the number of experts it runs (``offsets`` has ``E + 1``
    entries). An implementation may also have ``d_model``; ``MoELayer`` then checks it against the
    router's at construction.

    Implementations: :class:`ExpertBank`, :class:`CheckpointedExperts` (around any other),
    ``moe_framework.integrations.transformers.HFExperts`` (a Hugging Face experts module); a new
    kind (quantised, offloaded) is one new class with this ``forward`` and ``num_experts``.
    """

    num_experts: int

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor: ...


def expert_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert of each row of an expert-sorted buffer: ``[num_rows]`` int64 in ``[0, E]``.

    Row ``r`` belongs to expert ``e`` when ``offsets[e] <= r < offsets[e+1]``; rows at or after
    ``offsets[E]`` (dropped slots) get ``E``. Computed on the device (binary search over the
    ``E`` ends), so no host sync and a static shape.
    """
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)


def _row_bias(bias: torch.Tensor, rows_expert: torch.Tensor) -> torch.Tensor:
    # One zero row for the dropped slots (expert id E). F.embedding's backward is an ordered
    # reduction on both CPU and CUDA (sort-based on CUDA), so the bias gradient stays deterministic.
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])], 0)
    return F.embedding(rows_expert, padded)


def _is_silu(act_fn) -> bool:
    return act_fn is None or isinstance(act_fn, nn.SiLU) or act_fn is F.silu


def swiglu(h: torch.Tensor, act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """``act(h[..., :H]) * h[..., H:]`` for ``h [..., 2H]``.

    With ``act`` SiLU (the default) this is the fused :func:`moe_framework.ops.swiglu` op (one
    pass forward and backward, saves only ``h``); any other ``act_fn`` runs as plain PyTorch ops.
    """
    if act_fn is None or _is_silu(act_fn):
        return ops.swiglu(h)
    half = h.shape[-1] // 2
    return act_fn(h[..., :half]) * h[..., half:]


def _swiglu_owned(h: torch.Tensor, act_fn=None, inplace: bool = True) -> torch.Tensor:
    # swiglu() for the FFNs' own h: the SiLU path writes its gradient over h when `inplace`.
    if _is_silu(act_fn):
        return ops.swiglu_owned(h, inplace)
    return swiglu(h, act_fn)


def _is_int(v) -> bool:
    # bool is an int in Python: d_model=True must not build a width-1 layer.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_flags_and_std(owner: str, init_std, **flags) -> None:
    # A flag given as a string ("no") would be truthy: only real bools are accepted.
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{owner}: {name} must be a bool, got {v!r}")
    # numbers.Real guarantees only `<` and `<=`: "not < 0" is ">= 0" for every value but NaN,
    # which the "< inf" test then refuses.
    if init_std is not None and not (
        isinstance(init_std, numbers.Real)
        and not isinstance(init_std, bool)
        and not init_std < 0
        and init_std < math.inf
    ):
        raise ValueError(f"{owner}: init_std must be None or a finite float >= 0, got {init_std!r}")


def _check_layout(name: str, layout: str) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")


def expert_ffn(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    *,
    activation: str = "swiglu",
    layout: str = "in_out",
    b_in: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    recompute_activation: bool = True,
    inplace_backward: bool = True,
) -> torch.Tensor:
    """Run every expert on its rows of an expert-sorted buffer (the functional ``ExpertBank``).

    Args:
        x_sorted: ``[M, d]`` rows sorted by expert (as produced by ``ops.permute``).
        offsets: ``[E+1]`` int64 on the device; rows ``offsets[e]:offsets[e+1]`` go to expert ``e``,
            rows from ``offsets[E]`` on are dropped slots and give zero outputs.
        w_in: SwiGLU ``[E, d, 2h]`` (or ``[E, 2h, d]`` in ``"out_in"``), gate columns (rows) first;
            GELU ``[E, d, h]`` (or ``[E, h, d]``).
        w_out: ``[E, h, d]`` (or ``[E, d, h]`` in ``"out_in"``).
        activation: ``"swiglu"`` (``act(gate) * up``) or ``"gelu"`` (exact erf GELU).
        layout: ``"in_out"`` or ``"out_in"`` (see the module docstring).
        b_in, b_out: optional ``[E, 2h | h]`` and ``[E, d]`` biases.
        act_fn: the gate nonlinearity of SwiGLU (default ``F.silu``); lets an integration reuse
            the exact activation module of the model it wraps.
        recompute_activation: SwiGLU with SiLU only: keep ``h`` but not the ``[M, h]`` SwiGLU
            output between forward and backward, recomputing it in backward (a third less
            activation memory in the experts; about 3% slower forward+backward on CPU at the
            benchmark shape, docs/performance.md). ``False`` keeps it.
        inplace_backward: SwiGLU with SiLU only: the backward writes the gradient of ``h`` over
            ``h`` itself (which it no longer needs) instead of a fresh ``[M, 2h]`` buffer, the
            largest of the layer's backward. The graph can then be backpropagated only once: a
            second backward through it (``retain_graph=True``, ``gradcheck``) raises a
            ``RuntimeError`` saying so; pass ``False`` for those. Double backward
            (``create_graph=True``) is unaffected.

    Returns:
        ``[M, d]``, dtype of ``x_sorted``.
    """
    trans_b = layout == "out_in"
    rows_expert = None
    if b_in is not None or b_out is not None:
        rows_expert = expert_of_row(offsets, x_sorted.shape[0])
    h = ops.grouped_gemm(x_sorted, w_in, offsets, trans_b=trans_b)
    if b_in is not None and rows_expert is not None:
        h = h + _row_bias(b_in, rows_expert)
    if activation == "swiglu" and _is_silu(act_fn) and recompute_activation:
        y = ops.swiglu_down_proj(h, w_out, offsets, trans_b, inplace_backward)
    else:
        h = _swiglu_owned(h, act_fn, inplace_backward) if activation == "swiglu" else F.gelu(h)
        y = ops.grouped_gemm(h, w_out, offsets, trans_b=trans_b)
    if b_out is not None and rows_expert is not None:
        y = y + _row_bias(b_out, rows_expert)
    return y


def _init_(w: torch.Tensor, fan_in: int, std: Optional[float]) -> None:
    if std is None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(w, -bound, bound)
    else:
        nn.init.normal_(w, 0.0, std)


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights, run on an expert-sorted buffer (an
    :class:`Experts`).

    Args (keyword-only):
        d_model: ``d >= 1``, the token width.
        d_hidden: ``h >= 1``, each expert's hidden width.
        num_experts: ``E >= 1``.
        activation: ``"swiglu"`` (default; Mixtral / Qwen / DeepSeek experts) or ``"gelu"``.
        bias: add per-expert biases to both projections.
        layout: ``"in_out"`` (default, ``x @ W``) or ``"out_in"`` (``nn.Linear`` / Hugging Face).
        init_std: ``None`` for ``nn.Linear``'s default init, else ``N(0, init_std)`` weights.
        recompute_activation: recompute the SwiGLU output in backward instead of keeping it
            (see :func:`expert_ffn`; default True).
        inplace_backward: write the SwiGLU gradient over the saved activation (see
            :func:`expert_ffn`; default True; False allows a second backward through one graph).
        dtype, device: of the parameters.

    Parameters (see the module docstring for both layouts): ``w_gate_up`` (SwiGLU) or ``w_in``
    (GELU), ``w_out``, and ``b_gate_up`` / ``b_in``, ``b_out`` with ``bias=True``.

    ``forward(x_sorted [M, d], offsets [E+1] int64) -> [M, d]``: rows ``offsets[e]:offsets[e+1]``
    through expert ``e`` with two ``ops.grouped_gemm`` calls (no per-expert Python loop, no host
    sync); rows from ``offsets[E]`` on (dropped slots) give zeros (with biases too).
    """

    # Parameters with fixed names, declared for type checkers; the first projection's name
    # depends on the activation (see weight_in / bias_in).
    w_out: nn.Parameter
    b_out: Optional[nn.Parameter]

    def __init__(
        self,
        *,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        activation: str = "swiglu",
        bias: bool = False,
        layout: str = "in_out",
        init_std: Optional[float] = None,
        recompute_activation: bool = True,
        inplace_backward: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"ExpertBank: {name} must be an int >= 1, got {v!r}")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"ExpertBank: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        _check_layout("ExpertBank", layout)
        _check_flags_and_std(
            "ExpertBank",
            bias=bias,
            recompute_activation=recompute_activation,
            inplace_backward=inplace_backward,
            init_std=init_std,
        )
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.activation = activation
        self.layout = layout
        self.init_std = init_std
        self.recompute_activation = bool(recompute_activation)
        self.inplace_backward = bool(inplace_backward)
        kw = {"dtype": dtype, "device": device}
        E, d, h = num_experts, d_model, d_hidden
        n_in = 2 * h if activation == "swiglu" else h
        in_shape = (E, d, n_in) if layout == "in_out" else (E, n_in, d)
        out_shape = (E, h, d) if layout == "in_out" else (E, d, h)
        self._in_name = "w_gate_up" if activation == "swiglu" else "w_in"
        self._b_in_name = "b_gate_up" if activation == "swiglu" else "b_in"
        self.register_parameter(self._in_name, nn.Parameter(torch.empty(in_shape, **kw)))
        self.w_out = nn.Parameter(torch.empty(out_shape, **kw))
        if bias:
            self.register_parameter(self._b_in_name, nn.Parameter(torch.empty(E, n_in, **kw)))
            self.b_out = nn.Parameter(torch.empty(E, d, **kw))
        else:
            self.register_parameter(self._b_in_name, None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    @property
    def weight_in(self) -> torch.Tensor:
        """The first projection: ``w_gate_up`` (SwiGLU) or ``w_in`` (GELU)."""
        return getattr(self, self._in_name)

    @property
    def bias_in(self) -> Optional[torch.Tensor]:
        return getattr(self, self._b_in_name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, h = self.d_model, self.d_hidden
        _init_(self.weight_in, d, self.init_std)
        _init_(self.w_out, h, self.init_std)
        for b, fan_in in ((self.bias_in, d), (self.b_out, h)):
            if b is not None:
                if self.init_std is None:
                    _init_(b, fan_in, None)
                else:
                    b.zero_()

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted ``[M, d]`` (expert-sorted), offsets ``[E+1]`` int64 -> ``[M, d]``.

        Under ``torch.autocast`` the grouped GEMMs run in the autocast dtype, as ``nn.Linear``
        would: inputs and weights are cast (differentiably, so the float32 parameters get float32
        gradients). Our ops have no autocast rule of their own because the autocast dtype on CUDA
        may be float16 or bfloat16."""
        # Typed as tensors: under autocast they are replaced by casted copies (not Parameters).
        w_in: torch.Tensor = self.weight_in
        w_out: torch.Tensor = self.w_out
        b_in: Optional[torch.Tensor] = self.bias_in
        b_out: Optional[torch.Tensor] = self.b_out
        device_type = x_sorted.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            x_sorted, w_in, w_out = x_sorted.to(dt), w_in.to(dt), w_out.to(dt)
            b_in = None if b_in is None else b_in.to(dt)
            b_out = None if b_out is None else b_out.to(dt)
        return expert_ffn(
            x_sorted,
            offsets,
            w_in,
            w_out,
            activation=self.activation,
            layout=self.layout,
            b_in=b_in,
            b_out=b_out,
            recompute_activation=self.recompute_activation,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bias={self.b_out is not None}, layout={self.layout!r}"
        )


def _strip_inner_keys(module, state_dict, prefix, local_metadata) -> None:
    # The wrapper adds no state of its own: its entries read as the wrapped module's would, so a
    # checkpointed model and a plain one save and load the same state dict.
    inner = prefix + "inner."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_inner_keys(module, state_dict, prefix, *args) -> None:
    inner = prefix + "inner."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class CheckpointedExperts(nn.Module):
    """Gradient checkpointing of any :class:`Experts`: in training (with grad enabled) the
    experts' activations are not kept for backward but recomputed there
    (``torch.utils.checkpoint``, non-reentrant); in eval or under ``no_grad`` it runs the wrapped
    experts as they are.

    Only the experts are checkpointed, on purpose: a router updates buffers in forward (noise
    step, bias-balancing loads), and recomputing it would apply those updates twice and could
    route differently.

    The wrapped module is ``self.inner``. The state dict is the wrapped module's own (same keys,
    no ``inner.`` prefix), so checkpointed and plain layers load each other's weights and saved
    models do not depend on the setting; ``named_parameters`` names go through ``inner.``.
    ``num_experts`` (and ``d_model`` when the wrapped experts have it) are the wrapped module's.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        if not isinstance(experts, nn.Module):
            raise ValueError(
                "CheckpointedExperts: experts must be an nn.Module implementing the Experts "
                f"protocol, got {type(experts).__name__}"
            )
        self.inner = experts
        self.num_experts = experts.num_experts
        d_model = getattr(experts, "d_model", None)
        if d_model is not None:
            self.d_model = d_model
        self.register_state_dict_post_hook(_strip_inner_keys)
        self.register_load_state_dict_pre_hook(_add_inner_keys)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """As the wrapped experts: ``x_sorted [M, d]``, ``offsets [E+1]`` -> ``[M, d]``."""
        if self.training and torch.is_grad_enabled():
            return _checkpoint(self.inner, x_sorted, offsets, use_reentrant=False)
        return self.inner(x_sorted, offsets)


class DenseFFN(nn.Module):
    """One always-on feed-forward expert (shared experts; the dense baseline).

    Args (keyword-only): ``d_model``, ``d_hidden`` (``>= 1``), ``activation``, ``bias``,
    ``init_std``, ``inplace_backward``, ``dtype``, ``device``, as for :class:`ExpertBank`.

    Same activations, layout (``"in_out"``: ``w_gate_up [d, 2h]`` / ``w_in [d, h]``, ``w_out [h, d]``)
    and initialisation as one expert of :class:`ExpertBank`, run with plain dense matmuls.
    ``inplace_backward`` as in :func:`expert_ffn` (SwiGLU: the backward writes the gradient of the
    first projection's output over it; ``False`` allows a second backward through one graph).

    ``forward(x [..., d]) -> [..., d]``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        d_hidden: int,
        activation: str = "swiglu",
        bias: bool = False,
        init_std: Optional[float] = None,
        inplace_backward: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"DenseFFN: {name} must be an int >= 1, got {v!r}")
        _check_flags_and_std(
            "DenseFFN", bias=bias, inplace_backward=inplace_backward, init_std=init_std
        )
        self.inplace_backward = inplace_backward
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"DenseFFN: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        self.d_model, self.d_hidden, self.activation, self.init_std = (
            d_model,
            d_hidden,
            activation,
            init_std,
        )
        kw = {"dtype": dtype, "device": device}
        n_in = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(d_model, n_in, **kw))
        self.w_out = nn.Parameter(torch.empty(d_hidden, d_model, **kw))
        self.b_in = nn.Parameter(torch.empty(n_in, **kw)) if bias else None
        self.b_out = nn.Parameter(torch.empty(d_model, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _init_(self.w_in, self.d_model, self.init_std)
        _init_(self.w_out, self.d_hidden, self.init_std)
        for b, fan_in in ((self.b_in, self.d_model), (self.b_out, self.d_hidden)):
            if b is not None:
                if self.init_std is None:
                    _init_(b, fan_in, None)
                else:
                    b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in
        if self.b_in is not None:
            h = h + self.b_in
        if self.activation == "swiglu":
            h = _swiglu_owned(h, None, self.inplace_backward)
        else:
            h = F.gelu(h)
        y = h @ self.w_out
        if self.b_out is not None:
            y = y + self.b_out
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
            f"bias={self.b_out is not None}"
        )


class GatedSharedExperts(nn.Module):
    """Shared experts scaled by a per-token sigmoid gate: ``sigmoid(gate(x)) * ffn(x)``.

    Qwen2-MoE's ``shared_expert`` / ``shared_expert_gate``: ``ffn`` maps ``x [..., d]`` to
    ``[..., d]`` (a :class:`DenseFFN`), ``gate`` maps it to ``[..., 1]`` (an ``nn.Linear(d, 1)``).
    The shared part of an :class:`~moe_framework.moe_layer.MoELayer` is any module ``x -> y``; this
    one keeps the gate out of the layer itself.
    """

    def __init__(self, ffn: nn.Module, gate: nn.Module):
        super().__init__()
        self.ffn = ffn
        self.gate = gate
        d_model = getattr(ffn, "d_model", None)
        if d_model is not None:
            self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ffn(x)
        return torch.sigmoid(self.gate(x)) * out
