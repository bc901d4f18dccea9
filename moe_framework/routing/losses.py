"""Balancing losses and router entropy: plain differentiable functions of the router's output."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["load_balancing_loss", "router_z_loss", "router_entropy"]


def _token_weights(mask: Optional[torch.Tensor], T: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(T, dtype=torch.float32, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_i f_i * P_i`` (0-dim float32, differentiable in probs).

    probs [T, E] float: router probabilities (rows sum to 1). ids [T, k] int: the experts each token
    selected (-1 ignored). ``f_i`` is the number of slots on expert i per token (it sums to k over
    experts, as in Hugging Face's ``load_balancing_loss_func``; a perfectly balanced router scores
    k), ``P_i`` the mean probability of expert i. mask [T] bool (True = real token) excludes
    padding from both means. With ``seq_len`` the tokens are read as [T / seq_len, seq_len]
    sequences, the loss is computed per sequence and averaged over sequences that have at least
    one real token.
    """
    T, E = probs.shape
    # float32 at least; float64 stays float64 (gradcheck).
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    w = _token_weights(mask, T, probs.device).to(p.dtype)
    k = ids.shape[1]
    # f from a weighted bincount of the slots (O(T*k), no [T, E] one-hot); P as a mat-vec.
    e = ids.reshape(-1).long()
    slot_w = w.repeat_interleave(k) if k > 1 else w
    if seq_len is None:
        n = w.sum().clamp_min(1.0)
        key = torch.where(e < 0, torch.full_like(e, E), e)
        f = torch.zeros(E + 1, dtype=p.dtype, device=p.device).scatter_add(0, key, slot_w)[:E]
        P = w @ p
        return E * (f * P).sum() / (n * n)
    if seq_len <= 0 or T % seq_len != 0:
        raise ValueError(
            f"load_balancing_loss: seq_len must divide the number of tokens T={T}, got {seq_len}"
        )
    B = T // seq_len
    n_seq = w.reshape(B, seq_len).sum(1)
    n = n_seq.clamp_min(1.0)
    seq = torch.arange(T, device=p.device).repeat_interleave(k) // seq_len
    key = torch.where(e < 0, torch.full_like(e, B * (E + 1) - 1), seq * (E + 1) + e)
    f = torch.zeros(B * (E + 1), dtype=p.dtype, device=p.device).scatter_add(0, key, slot_w)
    f = f.reshape(B, E + 1)[:, :E]
    P = torch.bmm(w.reshape(B, 1, seq_len), p.reshape(B, seq_len, E)).reshape(B, E)
    per_seq = E * (f * P).sum(-1) / (n * n)
    has_tokens = (n_seq > 0).to(p.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens (0-dim float32)."""
    T = logits.shape[0]
    w = _token_weights(mask, T, logits.device)
    lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    w = w.to(lse.dtype)
    return (lse.square() * w).sum() / w.sum().clamp_min(1.0)


def router_entropy(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over real tokens of the entropy (nats) of each token's router distribution (0-dim f32)."""
    T = probs.shape[0]
    w = _token_weights(mask, T, probs.device)
    p = probs.float()
    ent = -(p * torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
    return (ent * w).sum()
