"""Plain-PyTorch reference implementations of every operator.

They define the semantics the C++/CUDA kernels must match and are what the tests compare against.
They are written for clarity, not speed (loops over experts, full similarity matrices).
"""

from __future__ import annotations

import torch

__all__ = [
    "route_ref",
    "permute_ref",
    "unpermute_ref",
    "grouped_gemm_ref",
    "grouped_gemm_wgrad_ref",
    "dequantize_ref",
    "grouped_gemm_q_ref",
    "quantize_activations_ref",
    "swiglu_ref",
    "swiglu_backward_ref",
    "dedup_ref",
    "kg_search_ref",
]


def _softmax_with_limits(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with the limits route documents: +inf logits share all the mass,
    an all -inf row has none (zeros). NaN is ignored here (the caller marks NaN rows)."""
    inf = float("inf")
    m = torch.where(x.isnan(), -inf, x).amax(-1, keepdim=True)
    shift = torch.where(
        m == inf,
        torch.where(x == inf, 0.0, -inf),
        torch.where(m == -inf, -inf, x - m),
    )
    num = shift.exp()
    den = num.sum(-1, keepdim=True)
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def route_ref(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    correction_bias=None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling_factor: float = 1.0,
):
    """Eager chain of ``ops.route``: scores -> (+ bias) -> group mask -> top-k -> renormalise ->
    scale -> bincount. Returns (weights [T, k] f32 (f64 for f64 logits), ids [T, k] i32,
    counts [E] i32); ids are ordered best first (key descending, lowest id first on ties)."""
    inf = float("inf")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    T, E = x.shape
    nan_row = x.isnan().any(-1, keepdim=True)
    scores = _softmax_with_limits(x) if scoring == "softmax" else torch.sigmoid(x)
    if correction_bias is None and n_group == 1:
        key = x  # both scorings are monotone in the logit
    else:
        key = scores if correction_bias is None else scores + correction_bias.to(acc)
    key = torch.where(key.isnan(), -inf, key)
    allowed = torch.ones(T, E, dtype=torch.bool, device=x.device)
    if n_group > 1:
        gs = E // n_group
        grouped = torch.sort(key.view(T, n_group, gs), dim=-1, descending=True).values
        gscore = grouped[..., 0] + grouped[..., 1] if gs >= 2 else grouped[..., 0]
        gscore = torch.where(gscore.isnan(), -inf, gscore)
        gorder = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        gmask = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
        gmask.scatter_(1, gorder, True)
        allowed = gmask.repeat_interleave(gs, dim=1)
    # Lexicographic (allowed, key desc, id asc) by two stable sorts.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = order.gather(
        1,
        torch.sort(
            allowed.gather(1, order).to(torch.int8), dim=-1, descending=True, stable=True
        ).indices,
    )
    ids = order[:, :k]
    x_sel = x.gather(1, ids)
    if scoring == "softmax":
        w = _softmax_with_limits(x_sel) if renormalize else scores.gather(1, ids)
    else:
        w = torch.sigmoid(x_sel)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling_factor
    w = torch.where(nan_row, float("nan"), w)
    counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int32)
    return w, ids.to(torch.int32), counts


def permute_ref(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """x [T, d], ids [T, k] (-1 = dropped) -> (x_sorted [T*k, d], row_of_slot [T*k], offsets [E+1]).

    Slots are flattened as s = t*k + j and stably sorted by expert id; dropped slots (-1) go last,
    after offsets[E], and their rows of x_sorted are zero.
    """
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    slot_of_row = torch.sort(key, stable=True).indices
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(T * k, device=ids.device)
    x_sorted = x[slot_of_row // max(k, 1)] if T * k > 0 else x.new_zeros(0, x.shape[1])
    x_sorted = x_sorted * (key[slot_of_row] < num_experts).unsqueeze(1).to(x.dtype)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return x_sorted, row_of_slot, offsets


def unpermute_ref(y_sorted: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor):
    """y[t] = sum_j weights[t, j] * y_sorted[row_of_slot[t*k + j]] (summed in j order)."""
    T, k = weights.shape
    gathered = y_sorted[row_of_slot].reshape(T, k, y_sorted.shape[1])
    out = torch.zeros(T, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    for j in range(k):
        out = out + weights[:, j : j + 1].to(y_sorted.dtype) * gathered[:, j]
    return out


def grouped_gemm_ref(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
):
    """out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ (b[e].T if trans_b else b[e]).

    Rows outside [offsets[0], offsets[E]) are zero. Accumulates in float32 for half types.
    """
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = torch.zeros(a.shape[0], N, dtype=acc, device=a.device)
    offs = offsets.tolist()
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            w = b[e].t() if trans_b else b[e]
            out[lo:hi] = a[lo:hi].to(acc) @ w.to(acc)
    return out.to(a.dtype)


def grouped_gemm_wgrad_ref(
    a: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
):
    """db[e] = a_e^T @ grad_e ([E, K, N]), or grad_e^T @ a_e ([E, N, K]) with trans_b, over the rows
    offsets[e]:offsets[e+1]; zero for experts without rows. In float64 (exact products)."""
    offs = offsets.tolist()
    E, K, N = len(offs) - 1, a.shape[1], grad_out.shape[1]
    out = torch.zeros((E, N, K) if trans_b else (E, K, N), dtype=torch.float64, device=a.device)
    for e in range(E):
        ae, ge = a[offs[e] : offs[e + 1]].double(), grad_out[offs[e] : offs[e + 1]].double()
        out[e] = ge.t() @ ae if trans_b else ae.t() @ ge
    return out


def dequantize_ref(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """float32 ``[E, N, K]`` weights of grouped_gemm_q's storage, element by element from the
    format's definition (csrc/include/moe_framework/grouped_gemm_q.h): INT8 ``q * scale``; INT4
    ``(u - zero) * scale`` with ``k = 32 b + i`` in byte ``16 b + i % 16``, low nibble for
    ``i < 16``; ``zero = 8`` without zeros."""
    if bits == 8:
        K = qweight.shape[2]
        vals = qweight.to(torch.float32)
    else:
        K = 2 * qweight.shape[2]
        k = torch.arange(K, device=qweight.device)
        byte = 16 * (k // 32) + (k % 16)
        shift = torch.where((k % 32) < 16, 0, 4)
        vals = ((qweight.long()[..., byte] >> shift) & 15).to(torch.float32)
    gs = group_size or K
    g = torch.arange(K, device=qweight.device) // max(gs, 1)
    scale = scales[..., g]
    if bits == 4:
        zero = zeros[..., g].to(torch.float32) if zeros is not None else 8.0
        vals = vals - zero
    return vals * scale


def quantize_activations_ref(a, group_size: int) -> torch.Tensor:
    """The float64 activations ``q * scale`` that ``grouped_gemm_q(..., act_bits=8)`` multiplies
    by: per row and group of ``group_size`` (0 = the row), ``scale = max|a| / 127`` in float32,
    ``q = round(a / scale)`` (half to even), computed element by element in float32."""
    a32 = a.to(torch.float32)
    M, K = a32.shape
    gs = group_size or K
    out = torch.zeros(M, K, dtype=torch.float64, device=a.device)
    for g0 in range(0, K, max(gs, 1)):
        x = a32[:, g0 : g0 + gs]
        scale = x.abs().amax(-1, keepdim=True) / 127.0
        q = torch.where(scale > 0, torch.round(x / scale), torch.zeros_like(x))
        out[:, g0 : g0 + gs] = q.double() * scale.double()
    return out


def grouped_gemm_q_ref(
    a, qweight, scales, offsets, bits: int, group_size: int, zeros=None, act_bits: int = 0
):
    """grouped_gemm_ref of ``a`` with the dequantised weights (``[E, N, K]``, used as ``b^T``),
    accumulated in float64 and rounded once to ``a``'s dtype. ``act_bits=8``: ``a`` is first
    replaced by its INT8 quantisation (:func:`quantize_activations_ref`) with the weights'
    group size."""
    w = dequantize_ref(qweight, scales, zeros, bits, group_size).double()
    if act_bits == 8 and a.shape[0] and a.shape[1]:
        a_used = quantize_activations_ref(a, group_size)
    else:
        a_used = a.double()
    offs = offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64, device=a.device)
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = a_used[lo:hi] @ w[e].t()
    return out.to(a.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def swiglu_ref(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` along the last dimension, in float32 (float64
    for float64) and rounded once to ``h``'s dtype."""
    gate, up = h.to(_acc_dtype(h.dtype)).chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(h.dtype)


def swiglu_backward_ref(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_ref` with respect to ``h``, by autograd in the accumulation type."""
    x = h.detach().to(_acc_dtype(h.dtype)).requires_grad_(True)
    gate, up = x.chunk(2, dim=-1)
    (gx,) = torch.autograd.grad(gate * torch.sigmoid(gate) * up, x, grad.to(x.dtype))
    return gx.to(h.dtype)


def dedup_ref(emb: torch.Tensor, threshold: float):
    """keep[j] = no earlier i < j has cosine(i, j) > threshold; representative[j] = argmax over
    those earlier items (lowest index on ties), or j itself when kept.

    Cosines are clamped to [-1, 1] (rounding can step outside), as the kernels do.
    """
    n = emb.shape[0]
    e = emb.double()
    e = e / e.norm(dim=1, keepdim=True)
    sim = (e @ e.t()).clamp(-1.0, 1.0)
    keep = torch.ones(n, dtype=torch.bool)
    rep = torch.arange(n, dtype=torch.long)
    for j in range(n):
        if j == 0:
            continue
        s = sim[j, :j]
        best = int(torch.argmax(s))  # first maximum = lowest index on ties
        if s[best] > threshold:
            keep[j] = False
            rep[j] = best
    return keep, rep


def _rowwise_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` ([n, d] x [m, d] -> [n, m]) summed column by column in index order, so every
    entry is the same sequence of elementwise operations: equal rows give bitwise equal dots. (A
    GEMM rounds entries differently by their position in its blocks, and a stride-0 ``expand``
    bank takes yet another path, so it would break exact ties.)"""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    for c in range(a.shape[1]):
        out += a[:, c : c + 1] * b[:, c]
    return out


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, the norm summed in index order (equal rows stay equal)."""
    sq = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    for c in range(x.shape[1]):
        sq += x[:, c : c + 1] * x[:, c : c + 1]
    return x / sq.sqrt()


def kg_search_ref(queries: torch.Tensor, bank: torch.Tensor, k: int, n_valid: int):
    """Cosine top-k of each query over bank[:n_valid]: (scores [q, k] f32, ids [q, k] i64).

    Ties go to the lower id; missing entries (k > n_valid) have id -1 and score -inf. Cosines are
    clamped to [-1, 1], as the kernels do. Equal bank rows (copies, a stride-0 ``expand`` bank)
    get bitwise equal cosines, so they tie exactly as in the kernels.
    """
    qn = _unit_rows(queries.double())
    bn = _unit_rows(bank[:n_valid].double())
    sim = _rowwise_dots(qn, bn).clamp(-1.0, 1.0)
    scores = torch.full((qn.shape[0], k), float("-inf"), dtype=torch.float64)
    ids = torch.full((qn.shape[0], k), -1, dtype=torch.long)
    for i in range(qn.shape[0]):
        # stable sort by descending score keeps lower ids first among equal scores
        order = torch.sort(-sim[i], stable=True).indices[:k]
        scores[i, : order.numel()] = sim[i, order]
        ids[i, : order.numel()] = order
    return scores.float(), ids
