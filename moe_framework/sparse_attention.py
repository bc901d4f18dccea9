"""Sparse expert attention (Mixture of Attention heads / SwitchHead): each token's query and output
projections are experts chosen per token; keys and values are shared.

For tokens ``x [B, S, d]``, E attention experts each own ``W_q[e] [d, h]`` and ``W_o[e] [h, d]``;
one shared ``W_k``, ``W_v`` ``[d, h]``. A router picks k experts per token with gate weights g::

    K, V = x W_k, x W_v                                  [B, S, h]   (shared by all experts)
    q_{t,j} = x_t W_q[e_{t,j}]                           slot j of token t is one "head"
    a_{t,j} = softmax(q_{t,j} K^T / sqrt(h)) V           causal over the sequence
    y_t = sum_j g_{t,j} a_{t,j} W_o[e_{t,j}]

built from the framework's parts: the router (any :class:`~moe_framework.routing.base.Router`),
``ops.permute`` (slots sorted by expert), ``ops.grouped_gemm`` for the per-expert projections,
``torch.nn.functional.scaled_dot_product_attention`` with the k slots as k heads over shared K/V,
and ``ops.unpermute`` (gate-weighted combine). Shapes are static and nothing syncs with the host,
so it compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .routing.base import RoutingDecision
from .routing.topk import TopKRouter

__all__ = ["SparseExpertAttention", "attention_flops_per_token"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SparseExpertAttention(nn.Module):
    """Attention whose query and output projections are k of E experts chosen per token.

    Args:
        d_model: token width d.
        num_experts: E attention experts.
        k: experts (heads) per token.
        head_dim: h, the width of each expert's query and of the shared keys and values
            (default ``d_model // k``).
        causal: causal attention (a language model) or full attention.
        router: the router (default ``TopKRouter(d_model, num_experts, k, **router_kw)``); its
            ``slots_per_token`` is the number of heads per token.
        **router_kw: arguments of the default :class:`~moe_framework.routing.topk.TopKRouter`
            (``load_balance_coef=``, ``capacity_factor=``...), only without ``router``.

    ``forward(x [B, S, d]) -> (y [B, S, d], RoutingDecision)``: add ``decision.aux_loss`` to the
    loss when the router has balancing losses. A slot the router dropped (id -1) contributes
    nothing. Parameters: ``w_q [E, d, h]``, ``w_o [E, h, d]``, ``w_kv`` (Linear d -> 2h, no
    bias), the router's under ``router.``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        head_dim: Optional[int] = None,
        causal: bool = True,
        router: Optional[nn.Module] = None,
        **router_kw,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts), ("k", k)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"SparseExpertAttention: {name} must be an int >= 1, got {v!r}")
        if k > num_experts:
            raise ValueError(
                f"SparseExpertAttention: k must be <= num_experts={num_experts}, got {k}"
            )
        if head_dim is None:
            head_dim = max(1, d_model // k)
        if not _is_int(head_dim) or head_dim < 1:
            raise ValueError(
                f"SparseExpertAttention: head_dim must be None or an int >= 1, got {head_dim!r}"
            )
        if not isinstance(causal, bool):
            raise ValueError(f"SparseExpertAttention: causal must be a bool, got {causal!r}")
        if router is None:
            router = TopKRouter(d_model, num_experts, k, **router_kw)
        elif router_kw:
            raise ValueError(
                f"SparseExpertAttention: router arguments {sorted(router_kw)} configure the "
                "default router and cannot go with router=..."
            )
        if router.num_experts != num_experts or router.slots_per_token != k:
            raise ValueError(
                f"SparseExpertAttention: router must route to num_experts={num_experts} with "
                f"slots_per_token=k={k}, got {router.num_experts} and {router.slots_per_token}"
            )
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.head_dim, self.causal = head_dim, causal
        self.router = router
        h = head_dim
        self.w_q = nn.Parameter(torch.randn(num_experts, d_model, h) / math.sqrt(d_model))
        self.w_o = nn.Parameter(torch.randn(num_experts, h, d_model) / math.sqrt(h * k))
        self.w_kv = nn.Linear(d_model, 2 * h, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, RoutingDecision]:
        """``x [B, S, d]`` -> ``(y [B, S, d], decision)`` (class docstring)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"SparseExpertAttention: x must be [B, S, d_model={self.d_model}], got "
                f"{tuple(x.shape)}"
            )
        B, S, d = x.shape
        T, k, h, E = B * S, self.k, self.head_dim, self.num_experts
        x2 = x.reshape(T, d)
        dec = self.router(x2, None, seq_len=S)
        x_sorted, row_of_slot, offsets = ops.permute(x2, dec.ids, E)
        q_sorted = ops.grouped_gemm(x_sorted, self.w_q.to(x.dtype), offsets)  # [T*k, h]
        q = q_sorted.index_select(0, row_of_slot).reshape(B, S, k, h).transpose(1, 2)
        kv = self.w_kv(x)
        key, value = kv[..., :h], kv[..., h:]
        key = key.unsqueeze(1).expand(B, k, S, h)
        value = value.unsqueeze(1).expand(B, k, S, h)
        a = F.scaled_dot_product_attention(q, key, value, is_causal=self.causal)  # [B, k, S, h]
        a_slots = a.transpose(1, 2).reshape(T * k, h)
        a_sorted = a_slots.new_zeros(T * k, h).index_copy(0, row_of_slot, a_slots)
        o_sorted = ops.grouped_gemm(a_sorted, self.w_o.to(x.dtype), offsets)  # [T*k, d]
        y = ops.unpermute(o_sorted, row_of_slot, dec.weights)
        return y.reshape(B, S, d), dec

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"head_dim={self.head_dim}, causal={self.causal}"
        )


def attention_flops_per_token(
    *,
    d_model: int,
    head_dim: int,
    heads: int,
    seq_len: int,
    num_experts: Optional[int] = None,
    causal: bool = True,
) -> int:
    """Forward multiply-add FLOPs (2 per MAC) per token of an attention layer.

    Dense multi-head (``num_experts=None``): q, k, v, o projections of ``heads`` heads
    (``8 d h heads``) plus the scores and the weighted sum (``4 L h heads``, L the mean attended
    length: ``(seq_len + 1) / 2`` causal). Sparse expert attention with ``heads = k`` active
    experts: q and o of the k experts (``4 d h k``), the shared k and v (``4 d h``), the router
    (``2 d E``), and the same attention term."""
    L = (seq_len + 1) / 2 if causal else seq_len
    attn = 4 * L * head_dim * heads
    if num_experts is None:
        return int(8 * d_model * head_dim * heads + attn)
    return int(
        4 * d_model * head_dim * heads + 4 * d_model * head_dim + 2 * d_model * num_experts + attn
    )
