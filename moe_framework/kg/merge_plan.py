"""The merge rule for a whole batch, vectorised: what each report does (merge into which node, or
insert), decided exactly as if the reports were filed one by one, with the expensive parts done
for the whole batch at once.

A report's best match is the best of three sets, each kept so that one report costs a few
Python operations, not a search:

* **pre-batch nodes not touched by the batch**: one batched search of every report against the
  store before the batch (the device bank through ``ops.kg_search`` when the handle has one — an
  exact GEMM + top-k on the bank's device —, else the flat index: exact, ``_K`` candidates
  each; else the approximate index: ``_K_ANN`` candidates each from one call,
  ``VectorIndex.search_candidates``, every one then confirmed — re-scored — on its stored
  vector, so a report's decision is the exact rule's whenever its best unmoved pre-batch node is
  among its candidates); a report skips the candidates the batch already moved (and searches
  again, wider, in the rare case all of them were moved).
* **nodes inserted by earlier reports of the batch and not moved since**: their embedding is the
  report's own, so the best of them is a causal (lower-triangular) maximum over the batch's
  report-by-report cosines, computed in blocks of one GEMM each (at most 64 MiB of scores),
  *assuming* every earlier report inserts, and kept ranked: each report's ``_TOP + 1`` best
  earlier rows. A report takes the first ranked row that is still such a node (a row dies when
  it merged, or a later report merged into it); only when all of them died does it take the
  maximum of its row of the block over the rows still alive (a masked max, no product).
* **nodes the batch moved** (merge targets): scored by one GEMM per block of ``_MV_BLOCK``
  reports against the nodes moved before the block, ranked the same way (a node the block moves
  again is skipped); the nodes the block itself moves are re-scored per report (at most
  ``_MV_BLOCK`` rows), so a batch where every report merges costs ``n · moved · d / 2`` in
  GEMMs, not a matrix-vector product over every moved node per report.

So the per-report work is a few Python operations in the common case; everything of size
``n`` or ``d`` per report is a GEMM row computed for the whole block.

Ties go to the lower node id in every set and between them, as in the one-by-one rule. The SQL
writes are collected and applied with ``executemany`` (one INSERT per new node with its final
embedding, one UPDATE per moved pre-batch node, one provenance row per report).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from . import schema as _s
from .index import sort_rows
from .records import CHUNK as _CHUNK
from .records import FilingResult

__all__ = ["MergePlan"]

_K = 8  # pre-batch candidates per report: only the best one the batch has not moved is needed
# Candidates per report from an approximate index (one FAISS call for the batch), each confirmed
# on its stored vector; while the index holds stale entries (old entries of moved nodes), twice
# as many entries are fetched and the best _K_ANN distinct nodes among them confirmed.
_K_ANN = 4
_MV_BLOCK = 256  # reports per GEMM of the batch against the nodes it moved
# Ranked alternatives kept per report from each GEMM (the batch's earlier reports; the nodes moved
# before the report's block): the report takes the first one still eligible, and scores every
# eligible row only when all of them were taken (merged, moved) since the GEMM.
_TOP = 16
_GEMM_ELEMENTS = 1 << 24  # rows x columns of one block of batch cosines (64 MiB of float32)


class MergePlan:
    """The decisions for one batch (``run``), then the rows to write (``rows``), the index update
    (``index_update``) and the results (``results``). Built inside the write transaction."""

    def __init__(self, kg: Any, conn: Any, x: np.ndarray, unit: np.ndarray, metas: list) -> None:
        self.kg, self.conn, self.x, self.unit, self.metas = kg, conn, x, unit, metas
        n, d = x.shape
        self.n = n
        # Seconds per phase of ``run`` (read by the benchmarks): candidate search, confirming
        # candidates on stored vectors, the batch's causal GEMM, the per-report decisions.
        self.times: dict = {}
        self.first_id = self.next_id = kg._next_node_id(conn)
        self.node = np.zeros(n, np.int64)  # node each report was filed into
        self.merged = np.zeros(n, bool)
        self.sim: list = [None] * n
        # Batch rows that inserted a node: its id.
        self.row_node = np.full(n, -1, np.int64)
        self.id_row: dict = {}  # node id inserted by the batch -> its row
        # Rows that count for the causal maximum of later reports.
        self.alive = np.zeros(n, bool)  # rows that inserted a node the batch has not moved
        # The block of the batch's causal cosines holding the current report (``_causal_block``).
        self.c_b0 = self.c_b1 = 0
        self.c_block = np.zeros((0, 0), np.float32)
        # Moved nodes (merge targets): current raw / unit embedding, metadata, merges.
        self.slot: dict = {}
        self.pre_rows: dict = {}  # prefetched (embedding, metadata) of likely merge targets
        self.mv_ids = np.zeros(n, np.int64)
        self.mv_unit = np.zeros((n, d), np.float32)
        self.mv_raw: list = []
        self.mv_meta: list = []
        self.mv_count: list = []
        # Block scores against the moved nodes (``_score_moved_block``) and the nodes moved since.
        self.mv_block = np.zeros((0, 0), np.float32)
        self.mv_m0 = self.mv_j0 = 0
        self.mv_dirty = np.zeros(n, bool)
        self.mv_dirty_list: list = []
        # The nodes moved inside the current block, contiguous: current unit vector and id.
        self.d_pos: dict = {}  # slot -> position
        self.d_unit = np.zeros((min(n, _MV_BLOCK), d), np.float32)
        self.d_ids = np.zeros(min(n, _MV_BLOCK), np.int64)
        # Ranked block scores against the moved nodes: per report of the block, ``_TOP + 1``
        # (score, slot, id) in descending score and ascending id, and how many are usable.
        self.mv_top: list = []

    # ------------------------------------------------------------------ decisions

    def run(self) -> None:
        n = self.n
        if n == 0:
            return
        kg = self.kg
        thr, rate = kg.merge_threshold, kg.ema_rate
        n_before = self._n_before()
        cs: Optional[list] = None
        ci: Optional[list] = None
        t = self.times
        t0 = time.perf_counter()
        if n_before:
            approx = self.kg._bank is None and self.kg._index.approximate
            s, i = self._search(self.unit, min(n_before, _K_ANN if approx else _K))
            cs, ci = s.tolist(), i.tolist()
            # Stored rows of every candidate above the threshold, in one query per CHUNK ids.
            self._prefetch(np.unique(i[(s > thr) & (i >= 0)]).tolist())
        t1 = time.perf_counter()
        t["candidates"] = t1 - t0 - t.get("confirm", 0.0)
        t["batch_gemm"] = 0.0
        for j in range(n):
            if j % _MV_BLOCK == 0:
                self._score_moved_block(j)
            if j == self.c_b1:
                self._causal_block(j)
            best_s, best_id = -np.inf, None
            if ci is not None and cs is not None:
                pre = self._pre_best(j, cs[j], ci[j])
                if pre is not None:
                    best_s, best_id = pre
            s_b, r = self._batch_best(j)
            if r >= 0:
                id_b = int(self.row_node[r])
                if _better(s_b, id_b, best_s, best_id):
                    best_s, best_id = s_b, id_b
            if self.mv_raw:
                s_m, id_m = self._moved_best(j)
                if _better(s_m, id_m, best_s, best_id):
                    best_s, best_id = s_m, id_m
            if best_id is not None:
                self.sim[j] = float(best_s)
            if best_id is not None and best_s > thr:
                self._merge(j, best_id, rate)
            else:
                self.node[j] = self.row_node[j] = self.next_id
                self.id_row[self.next_id] = j
                self.next_id += 1
                self.alive[j] = True
        # Per-report decisions and merges (wider searches included).
        t["decide"] = time.perf_counter() - t1 - t["batch_gemm"]

    def _score_moved_block(self, j0: int) -> None:
        """Scores of reports ``j0 .. j0 + _MV_BLOCK`` against the nodes moved so far, one GEMM,
        ranked (``_TOP + 1`` per report); nodes the block moves again (or moves first) are
        re-scored per report (``_moved_best``)."""
        import torch

        for s in self.mv_dirty_list:
            self.mv_dirty[s] = False
        self.mv_dirty_list = []
        self.d_pos = {}
        m0 = self.mv_m0 = len(self.mv_raw)
        self.mv_j0 = j0
        if m0:
            u = torch.from_numpy(self.unit[j0 : j0 + _MV_BLOCK])
            g = u @ torch.from_numpy(self.mv_unit[:m0]).T
            self.mv_block = g.numpy()
            kk = min(_TOP + 1, m0)
            v, slot = g.topk(kk, dim=1)
            slot_np = slot.numpy()
            vals, ids, slots, use = _ranked(v.numpy(), self.mv_ids[slot_np], kk == m0, slot_np)
            self.mv_top = list(zip(vals, ids, slots, use))

    def _moved_best(self, j: int) -> tuple:
        """(score, id) of the best node the batch moved, for report ``j`` (ties: lower id)."""
        best_s, best_id = -np.inf, -1
        m0 = self.mv_m0
        if m0:
            r = j - self.mv_j0
            vals, ids, slots, use = self.mv_top[r]
            dirty = self.mv_dirty
            for e in range(use):
                if not dirty[slots[e]]:
                    best_s, best_id = vals[e], ids[e]
                    break
            else:  # every ranked node moved again since the GEMM: all of its row
                row = self.mv_block[r]
                if self.mv_dirty_list:
                    row = np.where(dirty[:m0], -np.inf, row)
                top = row.max()
                if top > -np.inf:
                    best_s, best_id = float(top), int(self.mv_ids[:m0][row == top].min())
        nd = len(self.mv_dirty_list)
        if nd:
            sc = np.einsum("ij,j->i", self.d_unit[:nd], self.unit[j])  # no BLAS threads
            top = sc.max()
            id_d = int(self.d_ids[:nd][sc == top].min())
            if _better(float(top), id_d, best_s, best_id):
                best_s, best_id = float(top), id_d
        return best_s, best_id

    def _prefetch(self, ids: list) -> None:
        ids = [i for i in ids if i not in self.pre_rows]
        for c in range(0, len(ids), _CHUNK):
            part = ids[c : c + _CHUNK]
            q = f"SELECT id, embedding, metadata FROM nodes WHERE id IN ({','.join('?' * len(part))})"
            self.pre_rows.update((r[0], r[1:]) for r in self.conn.execute(q, part))

    def _n_before(self) -> int:
        bank = self.kg._bank
        return len(bank) if bank is not None else len(self.kg._index)

    def _search(self, q: np.ndarray, k: int) -> tuple:
        """Top-``k`` pre-batch nodes of unit ``q [m, d]``: ``(scores, ids)`` numpy arrays."""
        bank = self.kg._bank
        if bank is not None:  # exact, on the bank's device
            import torch

            s, i = bank.search(torch.from_numpy(np.ascontiguousarray(q)).to(bank.device), k)
            return s.cpu().numpy(), i.cpu().numpy()
        index = self.kg._index
        if not index.approximate:  # exact
            return index.search(q, k)
        # Approximate: one FAISS call for the batch, then every candidate confirmed (re-scored)
        # on its stored vector, so the decision is the exact rule's whenever the report's true
        # best node is among the candidates.
        s, i = index.search_candidates(q, 2 * k if index.has_stale else k)
        if index.has_stale:
            # Twice as many entries, of which the best k distinct nodes are confirmed: a moved
            # node's stale entry and its current one would otherwise take two of the k.
            s, i = _distinct(s, i, k)
        t0 = time.perf_counter()
        s, i = index.rescore(q, s, i, self._exact_scores)
        self.times["confirm"] = self.times.get("confirm", 0.0) + time.perf_counter() - t0
        return sort_rows(s, i, k)

    def _exact_scores(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Cosine of each stored node ``ids[r]`` with unit ``q[r]``; the rows read are kept for
        the merges (``pre_rows``)."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        self._prefetch(uniq.tolist())
        have = np.fromiter((i in self.pre_rows for i in uniq.tolist()), bool, len(uniq))
        out = np.full(len(ids), np.nan, np.float32)
        if have.any():
            slot = np.cumsum(have) - 1
            got = uniq[have]
            vecs = self.kg._unit_rows(got, [self.pre_rows[i][0] for i in got.tolist()])
            present = have[inverse]
            out[present] = np.einsum("ij,ij->i", vecs[slot[inverse[present]]], q[present])
        return out

    def _pre_best(self, j: int, row_s: list, row_i: list) -> Optional[tuple]:
        """Best pre-batch node the batch has not moved, for report ``j``."""
        while True:
            for s, i in zip(row_s, row_i):
                if i < 0:
                    return None  # fewer nodes than candidates: every one was seen
                if i not in self.slot:
                    return float(s), int(i)
            n_before = self._n_before()
            if len(row_i) >= n_before:
                return None  # every pre-batch node was moved by this batch
            s2, i2 = self._search(self.unit[j : j + 1], min(n_before, 2 * len(row_i)))
            row_s, row_i = s2[0].tolist(), i2[0].tolist()

    def _causal_block(self, b0: int) -> None:
        """Reports ``b0 .. b1`` against every earlier report of the batch, one GEMM: for each,
        its earlier reports ranked by cosine (descending, ties to the lower row), the first
        ``_TOP + 1`` (``b_val``, ``b_row``; ``b_use``: how many lead the ranking for certain, see
        ``_ranked``), and the block itself for when they all died (``_batch_best``)."""
        import torch

        t0 = time.perf_counter()
        n = self.n
        b1 = self.c_b1 = min(n, b0 + max(64, _GEMM_ELEMENTS // max(n, 1)))
        self.c_b0 = b0
        bank = self.kg._bank
        device = bank.device if bank is not None else torch.device("cpu")
        if b0 == 0:
            self.b_val: list = [[]] * n
            self.b_row: list = [[]] * n
            self.b_use: list = [0] * n
            self.c_u = torch.from_numpy(self.unit).to(device)
        u = self.c_u
        if b1 > 1:
            g = u[b0:b1] @ u[: b1 - 1].T  # rows b0..b1-1 against rows 0..b1-2
            # Row b0 + r sees rows < b0 + r: mask the upper triangle of the last columns only.
            mask = torch.ones(b1 - b0, b1 - 1 - b0, dtype=torch.bool, device=device).triu_()
            g[:, b0:].masked_fill_(mask, -torch.inf)
            kk = min(_TOP + 1, b1 - 1)
            v, r = g.topk(kk, dim=1)
            vals, rows, use = _ranked(v.cpu().numpy(), r.cpu().numpy(), kk == b1 - 1)
            self.b_val[b0:b1], self.b_row[b0:b1], self.b_use[b0:b1] = vals, rows, use
            self.c_block = g.cpu().numpy()
        self.times["batch_gemm"] += time.perf_counter() - t0

    def _kill(self, row: int) -> None:
        """Row ``row`` is no longer an unmoved node of the batch (it merged, or a later report
        merged into it). Later reports ranking it first take their next row (``_batch_best``)."""
        self.alive[row] = False

    def _batch_best(self, j: int) -> tuple:
        """(score, row) of the best unmoved node inserted by an earlier report (row -1: none)."""
        vals, rows, alive = self.b_val[j], self.b_row[j], self.alive
        for e in range(self.b_use[j]):
            if alive[rows[e]]:
                return vals[e], rows[e]  # the best earlier row that is still such a node
        if j == 0:
            return -np.inf, -1
        # Every ranked row died: the best of the block's row over the rows still alive.
        g = np.where(self.alive[:j], self.c_block[j - self.c_b0, :j], -np.inf)
        top = g.max()
        if top == -np.inf:
            return -np.inf, -1
        return float(top), int(np.argmax(g == top))  # the lowest row among equal maxima

    def _merge(self, j: int, target: int, rate: float) -> None:
        s = self.slot.get(target)
        if s is None:
            r = self.id_row.get(target)
            if r is not None:  # inserted by an earlier report of this batch
                old, old_meta = self.x[r], dict(self.metas[r])
                self._kill(r)
            else:  # a pre-batch node
                kg = self.kg
                row = self.pre_rows.get(target)
                if row is None:
                    row = self.conn.execute(
                        "SELECT embedding, metadata FROM nodes WHERE id = ?", (target,)
                    ).fetchone()
                old = _s.from_blob(row[0], kg.dim, kg.path)
                old_meta = _s.loads_json(row[1], f"{kg.path}: node {target} metadata")
            s = self.slot[target] = len(self.mv_raw)
            self.mv_ids[s] = target
            self.mv_raw.append(old)
            self.mv_meta.append(old_meta)
            self.mv_count.append(0)
        new = (
            (1.0 - rate) * self.mv_raw[s].astype(np.float64) + rate * self.x[j].astype(np.float64)
        ).astype(np.float32)
        self.mv_raw[s] = new
        self.mv_unit[s] = _s.normalize(new[None])[0]
        self.mv_meta[s] = {**self.mv_meta[s], **self.metas[j]}
        self.mv_count[s] += 1
        if not self.mv_dirty[s]:
            self.mv_dirty[s] = True
            self.d_pos[s] = len(self.mv_dirty_list)
            self.d_ids[len(self.mv_dirty_list)] = target
            self.mv_dirty_list.append(s)
        self.d_unit[self.d_pos[s]] = self.mv_unit[s]
        self.node[j] = target
        self.merged[j] = True
        self._kill(j)

    # ------------------------------------------------------------------ outputs

    def rows(self, types: list, meta_json: list, blobs: list, provs: list, now: float) -> tuple:
        """``(node inserts, node updates, provenance rows)`` for ``executemany``."""
        moved_meta = _s.dumps_json_list(self.mv_meta, "metadata")
        inserts = []
        for j in np.nonzero(~self.merged)[0].tolist():
            nid = int(self.row_node[j])
            s = self.slot.get(nid)
            if s is None:
                inserts.append((nid, types[j], blobs[j], meta_json[j], 1, now, now))
            else:
                blob = _s.to_blob(self.mv_raw[s])
                inserts.append((nid, types[j], blob, moved_meta[s], 1 + self.mv_count[s], now, now))
        updates = [
            (_s.to_blob(self.mv_raw[s]), moved_meta[s], self.mv_count[s], now, nid)
            for nid, s in self.slot.items()
            if nid not in self.id_row
        ]
        prov = [
            (
                int(self.node[j]),
                "merge" if self.merged[j] else "insert",
                self.sim[j],
                provs[j],
                meta_json[j],
                blobs[j],
                now,
            )
            for j in range(self.n)
        ]
        return inserts, updates, prov

    def index_update(self) -> tuple:
        """``(add_ids, add_vecs, upd_ids, upd_vecs)`` for the search index and bank."""
        rows = np.nonzero(~self.merged)[0]
        add_ids = self.row_node[rows]
        add_vecs = self.unit[rows].copy()
        for k, nid in enumerate(add_ids.tolist()):
            s = self.slot.get(nid)
            if s is not None:
                add_vecs[k] = self.mv_unit[s]
        upd = [(nid, s) for nid, s in self.slot.items() if nid not in self.id_row]
        upd_ids = np.asarray([u[0] for u in upd], np.int64)
        upd_vecs = self.mv_unit[[u[1] for u in upd]] if upd else None
        return add_ids, (add_vecs if len(rows) else None), upd_ids, upd_vecs

    def results(self) -> list:
        return [
            FilingResult(int(self.node[j]), "merged" if self.merged[j] else "inserted", self.sim[j])
            for j in range(self.n)
        ]


def _better(s: float, i: int, best_s: float, best_id: Optional[int]) -> bool:
    """Score ``s`` of node ``i`` beats the best so far (ties: the lower id)."""
    return s > best_s or (s == best_s and (best_id is None or i < best_id))


def _ranked(v: np.ndarray, key: np.ndarray, complete: bool, *extra: np.ndarray) -> tuple:
    """Top-k rows ``v [m, k]`` (``topk``'s, any order among ties) with their tie-break keys
    ``key [m, k]`` (row or node id; ties go to the lower), sorted by descending score then
    ascending key, as lists, and per row how many leading entries are certainly its best in that
    order: those above the row's k-th score (a tie at it may continue outside the k), or every
    finite one when ``complete`` (the k are all the columns; -inf marks a masked one). ``extra``
    arrays are permuted alike and returned after the keys, before the counts."""
    order = np.lexsort((key, -v), axis=-1)
    v = np.take_along_axis(v, order, 1)
    usable = np.isfinite(v) if complete else v > v[:, -1:]
    out = [v.tolist(), np.take_along_axis(key, order, 1).tolist()]
    out += [np.take_along_axis(e, order, 1).tolist() for e in extra]
    return (*out, usable.sum(1).tolist())


def _distinct(s: np.ndarray, i: np.ndarray, k: int) -> tuple:
    """The first ``k`` distinct ids of each row of ``(scores, ids)`` (in the rows' order: best
    first), -inf / -1 where a row has fewer."""
    drop = i < 0
    for c in range(1, i.shape[1]):
        drop[:, c] |= (i[:, c : c + 1] == i[:, :c]).any(1)
    s, i = np.where(drop, -np.inf, s), np.where(drop, -1, i)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept entries first, in order
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
