"""Weight-only INT8 / INT4 experts for inference: :class:`QuantizedExperts`,
:func:`quantize_experts`, and safetensors save / load of the quantised weights.

``quantize_experts(module, bits=8|4, group_size=...)`` replaces every float experts stage it finds
(:class:`~moe_framework.experts.ExpertBank`, a :class:`~moe_framework.experts.CheckpointedExperts`
around one, and the Hugging Face adapter ``HFExperts``) inside ``module`` (an ``ExpertBank``, a
``MoELayer``, a ``MixtureOfExpertsSystem``, a Hugging Face model after ``replace_moe_blocks``) by a
:class:`QuantizedExperts` holding the packed weights, and returns the module. The experts then run
on ``ops.grouped_gemm_q`` (weights dequantised in registers, fp32 accumulation, no host sync).
Storage format and kernels: ``moe_framework/ops/quant.py``; accuracy and speed:
``docs/quantization.md``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .experts import CheckpointedExperts, ExpertBank, _is_silu, _row_bias, expert_of_row
from .huge_pages import to_huge_pages
from .ops.quant import QuantizedWeight, quantize_weight

__all__ = [
    "QuantizedExperts",
    "quantize_experts",
    "save_quantized",
    "load_quantized",
    "quantization_scheme",
    "set_act_quant",
    "quantized_ffn",
]

_ACT_QUANT = (None, "int8")


def _check_act_quant(name: str, act_quant) -> None:
    if act_quant not in _ACT_QUANT:
        raise ValueError(
            f"{name}: act_quant must be None (weight-only) or 'int8', got {act_quant!r}"
        )


_META_KEY = "moe_framework.quantization"


def _effective_group_size(name: str, k: int, bits: int, group_size: int) -> int:
    """The group size used for a projection with inner dimension ``k``: ``group_size`` (0 = per
    output channel), capped at ``k``; it must divide ``k`` (and, for INT4, be a multiple of 32)."""
    if group_size == 0:
        if bits == 4:
            raise ValueError(f"{name}: bits=4 needs a group_size (32, 64 or 128), got 0")
        return 0
    gs = min(group_size, k)
    if k % gs or (bits == 4 and gs % 32):
        raise ValueError(
            f"{name}: group_size {group_size} does not fit the inner dimension K={k} "
            f"(it must divide K{', and be a multiple of 32 for INT4' if bits == 4 else ''}); "
            "pass a smaller group_size"
        )
    return gs


def quantized_ffn(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    proj_in: tuple,
    proj_out: tuple,
    *,
    bits: int,
    activation: str = "swiglu",
    b_in: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    act_bits: int = 0,
) -> torch.Tensor:
    """The experts stage over quantised weights: ``proj_in`` / ``proj_out`` are
    ``(qweight, scales, zeros, group_size)`` of the two projections (``[E, ...]``, rows of each
    expert ``offsets[e]:offsets[e+1]``); what :class:`QuantizedExperts` and quantised
    ``OffloadedExperts`` (over their cache slots) run."""
    rows_expert = None
    if b_in is not None or b_out is not None:
        rows_expert = expert_of_row(offsets, x_sorted.shape[0])
    qw, sc, zp, gs = proj_in
    h = ops.grouped_gemm_q(x_sorted, qw, sc, offsets, bits, gs, zp, act_bits)
    if b_in is not None and rows_expert is not None:
        h = h + _row_bias(b_in.to(h.dtype), rows_expert)
    if activation == "swiglu":
        if act_fn is None:
            h = ops.swiglu(h)
        else:
            half = h.shape[-1] // 2
            h = act_fn(h[..., :half]) * h[..., half:]
    else:
        h = F.gelu(h)
    qw, sc, zp, gs = proj_out
    y = ops.grouped_gemm_q(h, qw, sc, offsets, bits, gs, zp, act_bits)
    if b_out is not None and rows_expert is not None:
        y = y + _row_bias(b_out.to(y.dtype), rows_expert)
    return y


class QuantizedExperts(nn.Module):
    """E feed-forward experts with weight-only INT8 / INT4 weights (an
    :class:`~moe_framework.experts.Experts`; inference only).

    Build it with :meth:`from_float` (or :func:`quantize_experts`). Weights are kept in the
    ``nn.Linear`` layout (``[E, N, K]``, one row per output channel) as buffers:
    ``qweight_in`` / ``scales_in`` (/ ``zeros_in``) for the first projection (``[E, 2h, d]`` SwiGLU,
    gate rows first; ``[E, h, d]`` GELU), ``qweight_out`` / ``scales_out`` (/ ``zeros_out``) for
    ``[E, d, h]``, float32 ``b_in`` / ``b_out`` when the experts have biases, and
    ``quant_scheme`` (int64 ``[3]``: bits, group size, symmetric) which a state dict must match to
    load (a clear ``ValueError`` otherwise).

    ``forward(x_sorted [M, d], offsets [E+1]) -> [M, d]`` in ``x_sorted``'s dtype (float32,
    bfloat16, float16): two ``ops.grouped_gemm_q`` around the activation; dropped rows give zeros.
    A backward through it raises.

    ``act_quant`` (attribute, also a keyword of the constructor, :meth:`from_float`,
    :func:`quantize_experts` and :func:`set_act_quant`): ``None`` (default) keeps the activations
    in float (weight-only); ``"int8"`` quantises them per row and weight group once per call and
    uses integer dot products (``grouped_gemm_q(..., act_bits=8)``): faster on the CPU, a little
    less accurate (docs/quantization.md). It does not change the stored weights, so it is not
    part of the saved scheme.
    """

    qweight_in: torch.Tensor
    scales_in: torch.Tensor
    zeros_in: Optional[torch.Tensor]
    qweight_out: torch.Tensor
    scales_out: torch.Tensor
    zeros_out: Optional[torch.Tensor]
    b_in: Optional[torch.Tensor]
    b_out: Optional[torch.Tensor]
    quant_scheme: torch.Tensor

    def __init__(
        self,
        w_in: QuantizedWeight,
        w_out: QuantizedWeight,
        *,
        activation: str = "swiglu",
        symmetric: bool = True,
        group_size: int = 0,
        b_in: Optional[torch.Tensor] = None,
        b_out: Optional[torch.Tensor] = None,
        act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        act_quant: Optional[str] = None,
    ):
        super().__init__()
        _check_act_quant("QuantizedExperts", act_quant)
        self.act_quant = act_quant
        if activation not in ("swiglu", "gelu"):
            raise ValueError(
                f"QuantizedExperts: activation must be 'swiglu' or 'gelu', got {activation!r}"
            )
        if w_in.bits != w_out.bits:
            raise ValueError("QuantizedExperts: both projections must have the same bits")
        E, n_in, packed = w_in.qweight.shape
        d = packed if w_in.bits == 8 else 2 * packed
        self.num_experts = E
        self.d_model = d
        self.d_hidden = n_in // 2 if activation == "swiglu" else n_in
        self.activation = activation
        self.bits = w_in.bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.group_size_in = w_in.group_size
        self.group_size_out = w_out.group_size
        self.act_fn = None if _is_silu(act_fn) else act_fn
        # The packed weights are what a decode step streams from DRAM: 2 MiB pages make that
        # stream ~15% faster (moe_framework.huge_pages); a no-op off Linux / for small experts.
        self.register_buffer("qweight_in", to_huge_pages(w_in.qweight))
        self.register_buffer("scales_in", w_in.scales)
        self.register_buffer("zeros_in", w_in.zeros)
        self.register_buffer("qweight_out", to_huge_pages(w_out.qweight))
        self.register_buffer("scales_out", w_out.scales)
        self.register_buffer("zeros_out", w_out.zeros)
        self.register_buffer("b_in", None if b_in is None else b_in.detach().float().clone())
        self.register_buffer("b_out", None if b_out is None else b_out.detach().float().clone())
        self.register_buffer(
            "quant_scheme", torch.tensor([self.bits, group_size, int(symmetric)], dtype=torch.int64)
        )

    @classmethod
    def from_float(
        cls,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        *,
        bits: int = 8,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        activation: str = "swiglu",
        b_in: Optional[torch.Tensor] = None,
        b_out: Optional[torch.Tensor] = None,
        act_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        act_quant: Optional[str] = None,
    ) -> QuantizedExperts:
        """Quantise float weights in the ``"out_in"`` layout: ``w_in [E, 2h | h, d]``,
        ``w_out [E, d, h]``. ``group_size=None``: per output channel for INT8, 128 for INT4 (each
        capped at the projection's inner dimension)."""
        if bits not in (8, 4):
            raise ValueError(f"quantize_experts: bits must be 8 or 4, got {bits!r}")
        if group_size is None:
            group_size = 0 if bits == 8 else 128
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
            raise ValueError(
                f"quantize_experts: group_size must be an int >= 0, got {group_size!r}"
            )
        if not isinstance(symmetric, bool) or (bits == 8 and not symmetric):
            raise ValueError(
                f"quantize_experts: symmetric must be a bool (True for INT8), got {symmetric!r}"
            )
        gs_in = _effective_group_size(
            "quantize_experts (first projection)", w_in.shape[2], bits, group_size
        )
        gs_out = _effective_group_size(
            "quantize_experts (second projection)", w_out.shape[2], bits, group_size
        )
        q_in = quantize_weight(w_in, bits, gs_in, symmetric)
        q_out = quantize_weight(w_out, bits, gs_out, symmetric)
        return cls(
            q_in,
            q_out,
            activation=activation,
            symmetric=symmetric,
            group_size=group_size,
            b_in=b_in,
            b_out=b_out,
            act_fn=act_fn,
            act_quant=act_quant,
        )

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return quantized_ffn(
            x_sorted,
            offsets,
            (self.qweight_in, self.scales_in, self.zeros_in, self.group_size_in),
            (self.qweight_out, self.scales_out, self.zeros_out, self.group_size_out),
            bits=self.bits,
            activation=self.activation,
            b_in=self.b_in,
            b_out=self.b_out,
            act_fn=self.act_fn,
            act_bits=8 if self.act_quant == "int8" else 0,
        )

    _FLOAT32_BUFFERS = ("scales_in", "scales_out", "b_in", "b_out")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not round the scales (or biases): they stay
        # float32 (the kernels read float32 scales) and only follow device moves.
        keep = {n: t for n in self._FLOAT32_BUFFERS if (t := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def scheme(self) -> dict:
        """``{"bits", "group_size", "symmetric"}`` of this module."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def weight_bytes(self) -> int:
        """Bytes of the quantised weights, scales and zero points (biases excluded)."""
        names = ("qweight_in", "scales_in", "zeros_in", "qweight_out", "scales_out", "zeros_out")
        return sum(
            t.numel() * t.element_size() for n in names if (t := getattr(self, n)) is not None
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        key = prefix + "quant_scheme"
        if key in state_dict:
            saved = [int(v) for v in state_dict[key].tolist()]
            own = [int(v) for v in self.quant_scheme.tolist()]
            if saved != own:
                raise ValueError(
                    f"QuantizedExperts {prefix or '(root)'}: the state dict was saved with scheme "
                    f"{_scheme_text(saved)} but this module is {_scheme_text(own)}; quantise the "
                    "model with the saved scheme (or load the float weights and quantise again)"
                )
        for name in ("zeros_in", "zeros_out"):
            has_saved, has_own = prefix + name in state_dict, getattr(self, name) is not None
            if has_saved != has_own:
                raise ValueError(
                    f"QuantizedExperts {prefix or '(root)'}: {name} is "
                    f"{'present' if has_saved else 'absent'} in the state dict but "
                    f"{'present' if has_own else 'absent'} here (symmetric vs asymmetric scheme)"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bits={self.bits}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, act_quant={self.act_quant!r}"
        )


def _scheme_text(s) -> str:
    return f"(bits={s[0]}, group_size={s[1]}, symmetric={bool(s[2])})"


def _from_expert_bank(bank: ExpertBank, **kw) -> QuantizedExperts:
    w_in, w_out = bank.weight_in.detach(), bank.w_out.detach()
    if bank.layout == "in_out":
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return QuantizedExperts.from_float(
        w_in, w_out, activation=bank.activation, b_in=bank.bias_in, b_out=bank.b_out, **kw
    )


def _from_hf_experts(adapter: nn.Module, **kw) -> QuantizedExperts:
    ex: Any = adapter.hf_experts
    act = ex.act_fn
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        act = None
    return QuantizedExperts.from_float(
        ex.gate_up_proj.detach(), ex.down_proj.detach(), activation="swiglu", act_fn=act, **kw
    )


def _converter(m: nn.Module):
    if isinstance(m, ExpertBank):
        return _from_expert_bank
    if isinstance(m, CheckpointedExperts) and isinstance(m.inner, ExpertBank):
        return lambda c, **kw: _from_expert_bank(c.inner, **kw)
    if type(m).__name__ == "HFExperts" and hasattr(m, "hf_experts"):
        return _from_hf_experts
    return None


@torch.no_grad()
def quantize_experts(
    module: nn.Module,
    bits: int = 8,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    act_quant: Optional[str] = None,
) -> nn.Module:
    """Quantise every float experts stage in ``module`` to weight-only INT8 / INT4, in place.

    Args:
        module: an ``ExpertBank`` (returns its :class:`QuantizedExperts`), or any module holding
            experts stages (``MoELayer``, ``MixtureOfExpertsSystem``, a Hugging Face model after
            ``replace_moe_blocks``): they are replaced and ``module`` is returned.
        bits: 8 (per-output-channel scales by default) or 4 (group-wise).
        group_size: weights per scale along the inner dimension; ``None`` = per channel for
            INT8, 128 for INT4; capped at each projection's inner dimension. INT4 needs a
            multiple of 32.
        symmetric: INT4 only: ``False`` stores a zero point per group (asymmetric).
        act_quant: ``None`` (weight-only, the default) or ``"int8"`` (INT8 activations, integer
            dot products; see :class:`QuantizedExperts`).

    Raises ``ValueError`` when ``module`` holds no experts stage to quantise. The quantised
    model is for inference (a backward through its experts raises). For Hugging Face models the
    float experts stay registered in the HF block (its state dict is unchanged); the adapter runs
    the quantised copy.
    """
    _check_act_quant("quantize_experts", act_quant)
    kw = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "act_quant": act_quant}
    conv = _converter(module)
    if conv is not None:
        return conv(module, **kw)
    targets = [(name, m, c) for name, m in module.named_modules() if name and (c := _converter(m))]
    # Outermost first; a CheckpointedExperts' inner bank goes with it.
    done: list[str] = []
    for name, m, c in targets:
        if any(name.startswith(p + ".") for p in done):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, c(m, **kw))
        done.append(name)
    if not done:
        raise ValueError(
            f"quantize_experts: {type(module).__name__} holds no ExpertBank or HFExperts to quantise"
        )
    return module


def set_act_quant(module: nn.Module, act_quant: Optional[str]) -> nn.Module:
    """Set ``act_quant`` (``None`` or ``"int8"``) on every :class:`QuantizedExperts` (and
    quantised ``OffloadedExperts``) in ``module`` (including ``module`` itself) and return
    ``module``; ``ValueError`` if it holds none."""
    _check_act_quant("set_act_quant", act_quant)
    from .offload import OffloadedExperts

    found = [
        m
        for m in module.modules()
        if isinstance(m, QuantizedExperts)
        or (isinstance(m, OffloadedExperts) and m.quant is not None)
    ]
    if not found:
        raise ValueError(f"set_act_quant: {type(module).__name__} holds no QuantizedExperts")
    for m in found:
        m.act_quant = act_quant
    return module


def quantization_scheme(module: nn.Module) -> Optional[dict]:
    """The scheme of the :class:`QuantizedExperts` in ``module`` (``None`` if it has none);
    ``ValueError`` if they differ."""
    schemes = {json.dumps(m.scheme()) for m in module.modules() if isinstance(m, QuantizedExperts)}
    if len(schemes) > 1:
        raise ValueError(f"quantization_scheme: the experts use several schemes: {sorted(schemes)}")
    return json.loads(schemes.pop()) if schemes else None


def save_quantized(module: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``module``'s state dict (packed weights, scales, zero points, everything else) to one
    safetensors file, atomically, with the scheme in its metadata. No pickle."""
    from .persistence import _write_safetensors

    scheme = quantization_scheme(module)
    if scheme is None:
        raise ValueError(
            "save_quantized: module holds no QuantizedExperts (call quantize_experts first)"
        )
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    _write_safetensors(os.fspath(path), state, {_META_KEY: json.dumps(scheme)})


def load_quantized(
    module: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True
) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``module`` and return it.

    A ``module`` that still has float experts is quantised first with the file's scheme (so a
    freshly built float model loads a quantised checkpoint); one already quantised must have the
    same scheme, else ``ValueError`` names both schemes. A file without the scheme metadata is
    refused.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(
            f"load_quantized: {path} has no {_META_KEY!r} metadata (not written by save_quantized)"
        )
    saved = json.loads(meta[_META_KEY])
    own = quantization_scheme(module)
    if own is None:
        module = quantize_experts(module, saved["bits"], saved["group_size"], saved["symmetric"])
    elif own != saved:
        raise ValueError(
            f"load_quantized: {path} holds scheme {saved} but the module is quantised with {own}"
        )
    state = load_file(path, device="cpu")
    module.load_state_dict(state, strict=strict)
    return module
