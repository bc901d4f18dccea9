"""A batch of queries against an IVF index as GEMMs, list by list (the merge rule's candidate
search: thousands of reports per call).

FAISS scans an inverted list once per query that probes it, one vector at a time (SIMD over the
dimensions, not BLAS). With a batch of ``q`` queries and ``nprobe`` probes each, a list of the
``nlist`` is probed by about ``q · nprobe / nlist`` of them, so the same work is one small GEMM
per list: decode the list's codes once (FAISS's own scalar-quantiser ``decode``, plus the list's
centroid when the codes are residuals), multiply by the queries that probe it, keep each query's
top ``k`` of the list, then the top ``k`` of its ``nprobe`` lists. The scores are the ones FAISS
computes (inner products with the decoded vectors) up to float rounding; which lists a query
probes is decided the same way (its ``nprobe`` nearest centroids by inner product).
Measured at 1M x 384 (1,000 lists, 8 probes, 10k queries): see docs/knowledge_graph_scale.md.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

__all__ = ["search_by_lists"]


def _centroids(ivf: Any) -> np.ndarray:
    quantizer = faiss.downcast_index(ivf.quantizer)
    n, d = ivf.nlist, ivf.d
    if hasattr(quantizer, "get_xb"):
        return faiss.rev_swig_ptr(quantizer.get_xb(), n * d).reshape(n, d)
    return quantizer.reconstruct_n(0, n)


def search_by_lists(index: Any, queries: np.ndarray, k: int, nprobe: int) -> tuple:
    """Top-``k`` of unit ``queries [q, d]`` in ``index`` (an ``IndexIDMap`` around an
    inner-product ``IndexIVFScalarQuantizer``) probing ``nprobe`` lists each: ``(scores [q, k]
    float32, ids [q, k] int64)`` in descending score, -inf / -1 where a query's lists hold fewer
    than ``k`` entries. The caller holds the index's read lock."""
    ivf: Any = faiss.downcast_index(index.index)
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("search_by_lists: the index must use the inner product")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq, nlist = q.shape[0], ivf.nlist
    nprobe = max(1, min(int(nprobe), nlist))
    out_s = np.full((nq, nprobe * k), -np.inf, np.float32)
    out_i = np.full((nq, nprobe * k), -1, np.int64)
    if nq == 0 or k == 0 or index.ntotal == 0:
        return out_s[:, :k], out_i[:, :k]
    cent = _centroids(ivf)
    qt = torch.from_numpy(q)
    probe = (qt @ torch.from_numpy(cent).T).topk(nprobe, dim=1).indices.numpy()
    # (query, list) pairs grouped by list; pair f = query * nprobe + p fills columns p*k ...
    flat = probe.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
    id_map = faiss.vector_to_array(index.id_map)
    invlists, code_size, residual = ivf.invlists, ivf.code_size, bool(ivf.by_residual)
    for lst in np.nonzero(np.diff(bounds))[0].tolist():
        size = invlists.list_size(lst)
        if size == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * code_size)
        vecs = ivf.sq.decode(codes.reshape(size, code_size))
        if residual:
            vecs += cent[lst]
        inner = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
        pairs = order[bounds[lst] : bounds[lst + 1]]
        rows = pairs // nprobe
        kk = min(k, size)
        top = (qt[rows] @ torch.from_numpy(vecs).T).topk(kk, dim=1)
        cols = (pairs % nprobe)[:, None] * k + np.arange(kk)
        out_s[rows[:, None], cols] = top.values.numpy()
        out_i[rows[:, None], cols] = id_map[inner[top.indices.numpy()]]
    if nprobe > 1:
        best = torch.from_numpy(out_s).topk(k, dim=1).indices.numpy()
        return np.take_along_axis(out_s, best, 1), np.take_along_axis(out_i, best, 1)
    order_k = np.argsort(-out_s, axis=1, kind="stable")
    return np.take_along_axis(out_s, order_k, 1), np.take_along_axis(out_i, order_k, 1)
