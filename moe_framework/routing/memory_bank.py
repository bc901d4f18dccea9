"""Memory-bank routing: each token retrieves its nearest neighbours from a device-resident memory
(a knowledge graph's :class:`~moe_framework.kg.bank.DeviceBank`, searched with ``ops.kg_search``)
and the neighbours' expert assignments and embeddings bias its routing. The memory is written and
re-read by the librarian off the hot path (:meth:`MemoryBankRouter.refresh_memory`)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from .. import ops
from ._checks import bad, check_bools, check_floats, is_int
from .common import Selection
from .token_choice import TokenChoiceRouter

__all__ = ["MemoryBankRouter", "MemoryReports"]


class MemoryReports(NamedTuple):
    """What a :class:`MemoryBankRouter` files into its memory (the fields a
    :class:`~moe_framework.librarian.Librarian` reads, as in ``DraftReports``): ``mean_output``
    ``[E, d]`` the mean router input of the tokens whose first choice was each expert (its
    centroid), ``confidence`` ``[E]`` their share of the tokens, ``token_count`` ``[E]`` int64,
    ``top_tokens`` ``[E, 0]`` int64 (none)."""

    mean_output: torch.Tensor
    confidence: torch.Tensor
    token_count: torch.Tensor
    top_tokens: torch.Tensor


class MemoryBankRouter(TokenChoiceRouter):
    """Top-k routing conditioned on retrieval from a memory of (embedding, expert) pairs.

    For each token ``x``: ``ops.kg_search(x, bank, memory_k, n_valid)`` returns its
    ``memory_k`` most cosine-similar memory rows (static shapes; ``n_valid`` lives on the device,
    so the search is graph-safe). With ``a = softmax(cos / memory_temperature)`` over the rows
    that belong to this router's memory:

        logits = gate(x) + memory_scale * sum_j a_j onehot(expert_j) + memory_gate(sum_j a_j m_j)

    (``m_j`` the neighbours' embeddings). ``memory_scale`` [E] (learned, starts at the given
    value) weighs the neighbours' votes; ``memory_gate`` (starts at zero) learns what their mean
    embedding says. Without a memory, or with no neighbour of this router's node type and layer,
    both terms are 0 and the router is :class:`~moe_framework.routing.topk.TopKRouter`.

    The memory: every training forward adds each token's router input to the centroid of its
    first-choice expert (fixed-shape device accumulators); :meth:`memory_reports` hands those
    centroids out, a :class:`~moe_framework.librarian.Librarian` files them into a
    :class:`~moe_framework.kg.KnowledgeGraph` (node type ``"routing_memory"``, metadata
    ``expert`` and ``layer``, merged with the graph's merge rule), and :meth:`attach_memory`
    points the router at the graph's :meth:`~moe_framework.kg.KnowledgeGraph.device_bank` and the
    expert of each of its rows. :meth:`refresh_memory` does the three, between steps.

    Args:
        d_model, num_experts, k: sizes (``1 <= k <= num_experts``).
        renormalize: divide the k selected probabilities by their sum.
        memory_k: neighbours per token (int >= 1).
        memory_temperature: of the softmax over the neighbours' cosines (> 0).
        memory_scale: starting weight of the neighbours' expert votes (a float).
        collect_memory: accumulate the centroids in training forwards.
        **options: the arguments of
            :class:`~moe_framework.routing.token_choice.TokenChoiceRouter` and
            :class:`~moe_framework.routing.common.BaseRouter`.

    State: ``gate.weight`` [E, d], ``memory_gate.weight`` [E, d], ``memory_scale`` [E]; the
    memory itself (``memory_experts``, the centroid accumulators) is not in the state dict: the
    graph is its store, :meth:`attach_memory` reloads it.
    """

    strategy = "memory_bank"
    memory_experts: torch.Tensor
    centroid_sum: torch.Tensor
    centroid_count: torch.Tensor

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        renormalize: bool = True,
        memory_k: int = 8,
        memory_temperature: float = 0.1,
        memory_scale: float = 1.0,
        collect_memory: bool = True,
        **options,
    ):
        super().__init__(d_model, num_experts, k, **options)
        owner = type(self).__name__
        check_bools(owner, renormalize=renormalize, collect_memory=collect_memory)
        check_floats(owner, memory_temperature=memory_temperature, memory_scale=memory_scale)
        if not is_int(memory_k) or memory_k < 1:
            bad(owner, "memory_k", "a positive int", memory_k)
        if not memory_temperature > 0:
            bad(owner, "memory_temperature", "a float > 0", memory_temperature)
        self.renormalize = renormalize
        self.memory_k = int(memory_k)
        self.memory_temperature = float(memory_temperature)
        self.collect_memory = collect_memory
        self.memory_gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.memory_gate.weight)
        self.memory_scale = nn.Parameter(torch.full((num_experts,), float(memory_scale)))
        self.memory: Optional[Any] = None  # a kg.bank.DeviceBank once attached
        self.memory_layer: Optional[int] = None
        self.memory_node_type = "routing_memory"
        self.register_buffer("memory_experts", torch.full((1,), -1, dtype=torch.int64), False)
        self.register_buffer("centroid_sum", torch.zeros(num_experts, d_model), False)
        self.register_buffer("centroid_count", torch.zeros(num_experts), False)

    # -- forward -------------------------------------------------------------------------------

    def retrieve(self, x: torch.Tensor):
        """The memory read of tokens ``x [T, d]``: ``(prior [T, E], neighbour_mean [T, d],
        found [T] bool)`` (float32; zeros and False without a memory). No host sync."""
        T, E = x.shape[0], self.num_experts
        bank = self.memory
        if bank is None:
            z = x.new_zeros(T, E, dtype=torch.float32)
            return z, x.new_zeros(T, self.d_model, dtype=torch.float32), z[:, 0] > 0
        q = x.detach().to(device=bank.bank.device, dtype=torch.float32)
        scores, rows = ops.kg_search(q, bank.bank, self.memory_k, bank.n_valid)
        n_map = self.memory_experts.shape[0]
        ok_row = (rows >= 0) & (rows < n_map)
        r = torch.where(ok_row, rows, torch.zeros_like(rows))
        expert = self.memory_experts[r]
        valid = ok_row & (expert >= 0)
        s = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        top = s.max(dim=1, keepdim=True).values
        found = top[:, 0] > float("-inf")
        safe_top = torch.where(found[:, None], top, torch.zeros_like(top))
        w = torch.where(valid, torch.exp((s - safe_top) / self.memory_temperature), 0.0)
        a = w / w.sum(dim=1, keepdim=True).clamp(min=1e-30)
        col = torch.where(valid, expert, torch.zeros_like(expert))
        prior = torch.zeros(T, E, dtype=torch.float32, device=q.device).scatter_add(1, col, a)
        emb = bank.bank.index_select(0, r.reshape(-1)).reshape(T, r.shape[1], bank.bank.shape[1])
        neighbour = (a.unsqueeze(-1) * emb).sum(dim=1)
        return prior.to(x.device), neighbour.to(x.device), found.to(x.device)

    def _raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x).float()
        if self.memory is None:
            return logits
        prior, neighbour, _ = self.retrieve(x)
        logits = logits + self.memory_scale.float() * prior
        return logits + self.memory_gate(neighbour.to(self.memory_gate.weight.dtype)).float()

    def _select(self, x, logits, bias):
        return self._gate(logits, "softmax", bias, self.renormalize)

    def _decide(self, x, logits, mask) -> Selection:
        sel = super()._decide(x, logits, mask)
        if self.training and self.collect_memory:
            with torch.no_grad():
                first = sel.selected[:, 0].long()
                onehot = (first[:, None] == torch.arange(self.num_experts, device=x.device)).to(
                    torch.float32
                )
                self.centroid_sum.add_(onehot.t() @ x.detach().float())
                self.centroid_count.add_(onehot.sum(dim=0))
        return sel

    # -- the memory (off the hot path) ---------------------------------------------------------

    @torch.no_grad()
    def memory_reports(self, clear: bool = True) -> MemoryReports:
        """The centroids gathered since the last call (experts without tokens: zeros, count 0),
        as the reports a :class:`~moe_framework.librarian.Librarian` files; clears them."""
        count = self.centroid_count.clone()
        mean = self.centroid_sum / count.clamp(min=1).unsqueeze(1)
        share = count / count.sum().clamp(min=1)
        top = torch.zeros(self.num_experts, 0, dtype=torch.int64, device=count.device)
        if clear:
            self.centroid_sum.zero_()
            self.centroid_count.zero_()
        return MemoryReports(mean, share, count.to(torch.int64), top)

    @torch.no_grad()
    def attach_memory(
        self,
        graph: Any,
        *,
        layer: Optional[int] = None,
        node_type: str = "routing_memory",
        capacity: Optional[int] = None,
    ) -> None:
        """Route with ``graph``'s device bank (on this router's device): rows whose node has type
        ``node_type`` (and metadata ``layer`` equal to ``layer`` when given) vote for the node's
        metadata ``expert``; other rows are ignored. Reads the graph on the host: call it between
        steps (a graph that holds only this memory keeps every neighbour useful)."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "MemoryBankRouter.attach_memory reads the graph: call it between steps"
            )
        if graph.dim != self.d_model:
            raise ValueError(
                f"MemoryBankRouter.attach_memory: graph dim={graph.dim} must equal "
                f"d_model={self.d_model}"
            )
        device = self.gate.weight.device
        bank = graph._bank
        if bank is None or bank.device != device or (capacity and bank.capacity < capacity):
            bank = graph.device_bank(device, capacity)
        where = None if layer is None else {"layer": int(layer)}
        expert_of = {
            n.id: int(n.metadata.get("expert", -1))
            for n in graph.iter_nodes(types=[node_type], where=where)
        }
        node_ids = bank.node_ids.cpu().numpy()
        experts = np.array([expert_of.get(int(i), -1) for i in node_ids], dtype=np.int64)
        experts[(experts < 0) | (experts >= self.num_experts)] = -1
        table = torch.from_numpy(experts).to(device)
        if table.shape == self.memory_experts.shape:
            self.memory_experts.copy_(table)  # in place: compiled code keeps its buffer
        else:
            self.memory_experts = table
        self.memory = bank
        self.memory_layer = layer
        self.memory_node_type = node_type

    def refresh_memory(self, librarian: Any, *, layer: int = 0, step: int = 0):
        """File :meth:`memory_reports` with ``librarian`` (its ``node_type`` names the memory
        nodes) and re-attach its graph's bank. Returns the librarian's ``FilingSummary``."""
        summary = librarian.file_reports(self.memory_reports(), layer=layer, step=step)
        self.attach_memory(librarian.graph, layer=layer, node_type=librarian.node_type)
        return summary
