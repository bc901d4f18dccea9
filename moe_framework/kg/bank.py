"""Device-resident embedding bank searched with ``ops.kg_search``: static shapes, no host sync.

The bank is preallocated (``capacity`` rows); ``n_valid`` is a 0-dim int64 device tensor, so a
search captured in a CUDA graph or compiled with ``fullgraph=True`` keeps working as nodes are
added, as long as the bank does not outgrow its capacity (growing reallocates the tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class DeviceBank:
    """``bank [capacity, d]`` float32 unit rows (rows >= n_valid are zero), ``node_ids
    [capacity]`` int64 (the node id of each row, -1 past n_valid), ``n_valid`` 0-dim int64."""

    def __init__(self, dim: int, capacity: int, device: Any = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"DeviceBank: capacity must be >= 1, got {capacity}")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.bank = torch.zeros(capacity, dim, dtype=torch.float32, device=self.device)
        self.node_ids = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.n_valid = torch.zeros((), dtype=torch.int64, device=self.device)
        self._count = 0  # host mirror of n_valid (writes happen on the host anyway)
        self._row: dict = {}

    @property
    def capacity(self) -> int:
        return self.bank.shape[0]

    def __len__(self) -> int:
        return self._count

    def reset(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self.bank.zero_()
        self.node_ids.fill_(-1)
        self.n_valid.zero_()
        self._count = 0
        self._row = {}
        self.add(ids, vecs)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        bank = torch.zeros(cap, self.dim, dtype=torch.float32, device=self.device)
        bank[: self._count] = self.bank[: self._count]
        ids = torch.full((cap,), -1, dtype=torch.int64, device=self.device)
        ids[: self._count] = self.node_ids[: self._count]
        self.bank, self.node_ids = bank, ids

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        if self._count + n > self.capacity:
            self._grow(self._count + n)
        lo, hi = self._count, self._count + n
        self.bank[lo:hi] = torch.from_numpy(np.ascontiguousarray(vecs, np.float32)).to(self.device)
        self.node_ids[lo:hi] = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        self._row.update(zip(np.asarray(ids).tolist(), range(lo, hi)))
        self._count = hi
        self.n_valid.fill_(hi)

    def update(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        rows = torch.tensor([self._row[int(i)] for i in ids], dtype=torch.int64, device=self.device)
        src = torch.from_numpy(np.ascontiguousarray(vecs, np.float32)).to(self.device)
        self.bank.index_copy_(0, rows, src)

    def search(self, queries: torch.Tensor, k: int) -> tuple:
        """Cosine top-``k`` of ``queries [q, d]`` (on the bank's device): ``(scores [q, k] f32,
        node_ids [q, k] int64)``, -1 where fewer than ``k`` nodes exist. Static shapes, no host
        sync: safe inside ``torch.compile(fullgraph=True)`` and CUDA graphs."""
        from .. import ops

        scores, rows = ops.kg_search(queries, self.bank, k, self.n_valid)
        node = self.node_ids.index_select(0, rows.clamp(min=0).reshape(-1)).reshape(rows.shape)
        return scores, torch.where(rows >= 0, node, torch.full_like(node, -1))
