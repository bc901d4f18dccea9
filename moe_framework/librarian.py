"""Librarian: deduplicate the experts' draft reports and file them into a KnowledgeGraph.

Runs off the hot path (every N steps or on demand), never inside a compiled forward: it moves the
reports to the CPU once, drops duplicates with ``ops.dedup``, files the rest with the graph's
merge rule and links each filed node to its most similar neighbours.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from . import ops
from .kg import KnowledgeGraph, KnowledgeGraphError

__all__ = ["Librarian", "FilingSummary", "KnowledgeGraph", "KnowledgeGraphError"]


class FilingSummary(NamedTuple):
    """What one ``file_reports`` call did.

    ``node_ids`` has one entry per expert: the node its report was filed into (for a dropped
    duplicate, the node of its representative), -1 when the report was skipped.
    """

    filed: int  # reports written to the graph (inserted + merged)
    inserted: int  # of which became new nodes
    merged: int  # of which were merged into an existing node
    duplicates_dropped: int  # dropped by dedup (kept as provenance of their representative)
    skipped_empty: int  # experts that saw no token (token_count == 0)
    skipped_zero: int  # experts whose mean output is exactly zero (cosine undefined)
    edges_added: int  # similarity edges written or re-weighted
    node_ids: list


class Librarian:
    """Files MoE draft reports into a :class:`KnowledgeGraph`.

    Args:
        graph: the graph, open for writing.
        dedup_threshold: a report whose cosine with an earlier report of the same batch is
            greater than this is a duplicate and is not filed on its own.
        similarity_edge_threshold: after filing, each filed node gets a ``edge_type`` edge to
            each of its ``neighbors`` most similar other nodes whose cosine is greater than this
            (edge weight = that cosine).
        neighbors: how many similarity edges per filed node at most.
        node_type / edge_type: the types written to the graph.
        every_n_steps: :meth:`maybe_file_reports` files on steps divisible by this.
    """

    def __init__(
        self,
        graph: KnowledgeGraph,
        dedup_threshold: float = 0.95,
        similarity_edge_threshold: float = 0.5,
        neighbors: int = 5,
        node_type: str = "expert_report",
        edge_type: str = "similar",
        every_n_steps: int = 1,
    ) -> None:
        if not isinstance(graph, KnowledgeGraph):
            raise ValueError(
                f"Librarian: graph must be a KnowledgeGraph, got {type(graph).__name__}"
            )
        for name, v in (
            ("dedup_threshold", dedup_threshold),
            ("similarity_edge_threshold", similarity_edge_threshold),
        ):
            if not (isinstance(v, (int, float)) and -1.0 <= float(v) <= 1.0):
                raise ValueError(f"Librarian: {name} must be a number in [-1, 1], got {v!r}")
        if not isinstance(neighbors, int) or neighbors < 0:
            raise ValueError(f"Librarian: neighbors must be a non-negative int, got {neighbors!r}")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"Librarian: every_n_steps must be a positive int, got {every_n_steps!r}"
            )
        self.graph = graph
        self.dedup_threshold = float(dedup_threshold)
        self.similarity_edge_threshold = float(similarity_edge_threshold)
        self.neighbors = neighbors
        self.node_type = node_type
        self.edge_type = edge_type
        self.every_n_steps = every_n_steps

    def maybe_file_reports(
        self, reports: Any, layer: int = 0, step: int = 0, expert_names=None
    ) -> Optional[FilingSummary]:
        """:meth:`file_reports` on steps divisible by ``every_n_steps``; None otherwise."""
        if step % self.every_n_steps:
            return None
        return self.file_reports(reports, layer=layer, step=step, expert_names=expert_names)

    def file_reports(
        self,
        reports: Any,
        layer: int = 0,
        step: int = 0,
        expert_names: Optional[Sequence[str]] = None,
    ) -> FilingSummary:
        """Deduplicate and file one layer's draft reports.

        Args:
            reports: a ``DraftReports`` (or any object with these attributes), tensors on any
                device: ``mean_output [E, d]`` float, ``confidence [E]`` float,
                ``token_count [E]`` integer, ``top_tokens [E, r]`` integer (-1 padded).
                ``d`` must equal the graph's ``dim``.
            layer, step: recorded in each node's metadata and provenance.
            expert_names: optional ``E`` names, recorded as ``expert_name``.

        Experts with ``token_count == 0`` or an all-zero mean output are skipped; a non-finite
        mean output is an error (it means the model diverged). Each filing step (nodes,
        duplicate provenance, edges) is one transaction.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "Librarian.file_reports moves reports to the host: call it outside the compiled "
                "forward (it runs off the hot path)"
            )
        mean, conf, count, top = self._to_cpu(reports)
        E, d = mean.shape
        if expert_names is not None and len(expert_names) != E:
            raise ValueError(
                f"Librarian.file_reports: expert_names has {len(expert_names)} names for {E} experts"
            )
        if not np.isfinite(mean).all():
            bad = int(np.nonzero(~np.isfinite(mean).all(axis=1))[0][0])
            raise ValueError(f"Librarian.file_reports: expert {bad} mean_output has NaN or Inf")
        active = count > 0
        nonzero = np.any(mean != 0, axis=1)
        skipped_empty = int((~active).sum())
        skipped_zero = int((active & ~nonzero).sum())
        experts = np.nonzero(active & nonzero)[0]
        node_ids = [-1] * E
        if len(experts) == 0:
            return FilingSummary(0, 0, 0, 0, skipped_empty, skipped_zero, 0, node_ids)

        emb = mean[experts]
        keep_t, rep_t = ops.dedup(torch.from_numpy(emb), self.dedup_threshold)
        keep, rep = keep_t.numpy(), rep_t.numpy()
        kept = np.nonzero(keep)[0]

        def meta(j):
            e = int(experts[j])
            m = {
                "expert": e,
                "layer": int(layer),
                "step": int(step),
                "confidence": float(conf[e]),
                "token_count": int(count[e]),
                "top_tokens": [int(t) for t in top[e] if t >= 0],
            }
            if expert_names is not None:
                m["expert_name"] = str(expert_names[e])
            return m

        source = {"by": "librarian", "layer": int(layer), "step": int(step)}
        results = self.graph.add_or_update_batch(
            emb[kept],
            self.node_type,
            [meta(j) for j in kept],
            [{**source, "expert": int(experts[j])} for j in kept],
        )
        node_of = {}
        for j, r in zip(kept.tolist(), results):
            node_of[j] = r.node_id
            node_ids[int(experts[j])] = r.node_id

        # Duplicates are not filed as nodes, but nothing is lost: each becomes a provenance row of
        # the node its representative was filed into.
        unit = emb / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
        dup_rows = []
        for j in np.nonzero(~keep)[0].tolist():
            r = int(rep[j])
            while not keep[r]:  # a representative may itself be a duplicate of an earlier report
                r = int(rep[r])
            node = node_of[r]
            node_ids[int(experts[j])] = node
            sim = float(unit[j] @ unit[int(rep[j])])
            dup_rows.append(
                (node, "duplicate", emb[j], meta(j), {**source, "expert": int(experts[j])}, sim)
            )
        self.graph.record_provenance_batch(dup_rows)

        edges_added = self._link(sorted(set(node_of.values())))
        inserted = sum(r.action == "inserted" for r in results)
        return FilingSummary(
            filed=len(results),
            inserted=inserted,
            merged=len(results) - inserted,
            duplicates_dropped=len(dup_rows),
            skipped_empty=skipped_empty,
            skipped_zero=skipped_zero,
            edges_added=edges_added,
            node_ids=node_ids,
        )

    def _link(self, nodes: list) -> int:
        """Edges from each filed node to its top-``neighbors`` others above the threshold."""
        if not nodes or self.neighbors == 0:
            return 0
        emb = np.stack([self.graph.get_node(n).embedding for n in nodes])
        scores, ids = self.graph.search(emb, self.neighbors + 1)
        edges = []
        for n, srow, irow in zip(nodes, scores, ids):
            picked = 0
            for s, i in zip(srow, irow):
                if i < 0 or picked == self.neighbors:
                    break
                if int(i) == n:
                    continue
                if s > self.similarity_edge_threshold:
                    edges.append((n, int(i), self.edge_type, float(s)))
                picked += 1
        return self.graph.add_edges_batch(edges)

    def _to_cpu(self, reports: Any) -> tuple:
        names = ("mean_output", "confidence", "token_count", "top_tokens")
        missing = [n for n in names if not hasattr(reports, n)]
        if missing:
            raise ValueError(
                f"Librarian.file_reports: reports must have {names}; missing {missing} "
                f"(got {type(reports).__name__})"
            )
        with torch.no_grad():
            mean, conf, count, top = (
                torch.as_tensor(getattr(reports, n)).detach().cpu() for n in names
            )
        if mean.dim() != 2 or not mean.is_floating_point():
            raise ValueError(
                f"Librarian.file_reports: mean_output must be a float [E, d] tensor, got {tuple(mean.shape)} {mean.dtype}"
            )
        E, d = mean.shape
        if d != self.graph.dim:
            raise ValueError(
                f"Librarian.file_reports: mean_output has d={d}, the graph has dim={self.graph.dim}"
            )
        if tuple(conf.shape) != (E,) or tuple(count.shape) != (E,):
            raise ValueError(
                f"Librarian.file_reports: confidence and token_count must be [{E}], got "
                f"{tuple(conf.shape)} and {tuple(count.shape)}"
            )
        if count.is_floating_point() or count.dtype == torch.bool:
            raise ValueError(
                f"Librarian.file_reports: token_count must be an integer tensor, got {count.dtype}"
            )
        if top.dim() != 2 or top.shape[0] != E or top.is_floating_point():
            raise ValueError(
                f"Librarian.file_reports: top_tokens must be an integer [{E}, r] tensor, got {tuple(top.shape)} {top.dtype}"
            )
        return (
            mean.to(torch.float32).numpy(),
            conf.to(torch.float64).numpy(),
            count.to(torch.int64).numpy(),
            top.to(torch.int64).numpy(),
        )
