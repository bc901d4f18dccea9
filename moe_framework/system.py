"""MixtureOfExpertsSystem: input -> N MoE blocks (supervisor -> constellation) -> head, plus the
knowledge-graph side: draft reports collected on the device, consolidated by the librarian.

The forward pass is graph-safe: no host sync, static shapes, so it compiles with
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph. Each MoE layer's draft
reports are added into fixed-shape device accumulators inside forward; :meth:`consolidate` reads
them (off the hot path), runs the :class:`~moe_framework.librarian.Librarian` and writes the
:class:`~moe_framework.knowledge_graph.KnowledgeGraph`. Training goes through
:meth:`training_step` (AMP, balancing losses, clipping, checkpointing, automatic consolidation).
Persistence (:meth:`save` / :meth:`load`): safetensors weights, JSON config, the SQLite store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import stat
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig, fsync_dir, open_regular_file, parse_config_json, read_config_text
from .kg.paths import same_file, store_companions, touches_store
from .moe_layer import MoELayer
from .supervisor import Supervisor

__all__ = ["MixtureOfExpertsSystem", "SystemOutput", "StepResult"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_KG = "knowledge.sqlite"
_FORMAT = "moe_framework.MixtureOfExpertsSystem/1"
_LOAD = "MixtureOfExpertsSystem.load"
# Default bound of load(max_parameters=...): elements of the model state (2^32, 16 GiB in fp32).
MAX_PARAMETERS = 1 << 32


class SystemOutput(NamedTuple):
    """What :meth:`MixtureOfExpertsSystem.forward` returns (all device tensors).

    output:   [..., output_dim] logits (float32 unless run under autocast).
    aux_loss: 0-dim float32, the sum over layers of the weighted balancing losses (aux + z).
    routing:  tuple of one ``RoutingInfo`` per MoE layer (weights, ids, counts, aux_loss, stats,
        reports).
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    routing: tuple


class StepResult(NamedTuple):
    """What :meth:`MixtureOfExpertsSystem.training_step` returns (plain Python values).

    loss: task loss + balancing losses of the step. task_loss, aux_loss: its two parts.
    grad_norm: total gradient norm before clipping (None when clipping is off).
    stats: routing telemetry: ``load`` [layers][E] slots per expert, ``dropped`` per layer,
        ``consolidated`` (True when this step ran the librarian).
    """

    loss: float
    task_loss: float
    aux_loss: float
    grad_norm: Optional[float]
    stats: dict


class _Block(nn.Module):
    """Pre-norm residual MoE block: ``x + dropout(moe(norm(x)))``."""

    def __init__(self, cfg: MoEConfig, layer_index: int):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = _make_moe_layer(cfg, layer_index)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor):
        # under AMP the experts' grouped GEMMs run in the autocast dtype (see ExpertBank.forward)
        y, info = self.moe(self.norm(x))
        return x + self.dropout(y), info


def _make_supervisor(cfg: MoEConfig, layer_index: int) -> Supervisor:
    kw: dict = dict(
        strategy=cfg.routing_strategy,
        temperature=cfg.router_temperature,
        capacity_factor=cfg.capacity_factor,
        load_balance_coef=cfg.aux_loss_weight,
        z_loss_coef=cfg.z_loss_weight,
        bias_update_rate=cfg.bias_update_rate,
        n_group=cfg.num_groups,
        topk_group=cfg.topk_groups,
        routed_scaling_factor=cfg.routed_scaling_factor,
        jitter_eps=cfg.router_jitter,
        # Distinct noise streams per layer, reproducible from the config's seed.
        seed=cfg.seed * 1000 + layer_index,
        causal=cfg.causal,
        track_stats=cfg.track_stats,
    )
    if cfg.router_noise_eps is not None:
        kw["noise_eps"] = cfg.router_noise_eps
    return Supervisor(cfg.d_model, cfg.num_experts, cfg.top_k, **kw)


def _make_moe_layer(cfg: MoEConfig, layer_index: int) -> MoELayer:
    # gradient_checkpointing recomputes the experts only (CheckpointedExperts): the router updates
    # buffers in forward, and a recompute would apply those updates twice.
    return MoELayer.build(
        d_model=cfg.d_model,
        d_hidden=cfg.d_hidden,
        num_experts=cfg.num_experts,
        k=cfg.top_k,
        router=_make_supervisor(cfg, layer_index),
        activation=cfg.activation,
        num_shared_experts=cfg.num_shared_experts,
        checkpoint_experts=cfg.gradient_checkpointing,
    )


class MixtureOfExpertsSystem(nn.Module):
    """The whole hierarchical MoE model described by a :class:`MoEConfig`.

    Input ``x``: dense features ``[B, input_dim]`` / ``[B, S, input_dim]`` (``input_dim`` set),
    token ids ``[B]`` / ``[B, S]`` int64 (``vocab_size`` set), or ``[..., d_model]`` features
    (neither set). ``forward(x)`` returns a :class:`SystemOutput` with ``output [..., output_dim]``.

    The knowledge graph is opened lazily at ``config.kg_path`` on first use (one writer per store:
    call :meth:`close` or use the system as a context manager to release it).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(
                f"MixtureOfExpertsSystem: config must be a MoEConfig, got {type(config)}"
            )
        self.config = cfg = config
        if cfg.vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(cfg.vocab_size, cfg.d_model)
        elif cfg.input_dim is not None:
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        else:
            self.embed = nn.Identity()
        self.blocks = nn.ModuleList(_Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim)

        L, E, d = cfg.num_layers, cfg.num_experts, cfg.d_model
        # Draft-report accumulators (device, fixed shape, not model state): token-weighted sums
        # of each expert's mean output and gate confidence, and its routed-slot count.
        self.register_buffer("report_output_sum", torch.zeros(L, E, d), persistent=False)
        self.register_buffer("report_confidence_sum", torch.zeros(L, E), persistent=False)
        self.register_buffer("report_tokens", torch.zeros(L, E, dtype=torch.int64), False)
        # Each expert's most confident tokens of the interval: gate weight (-1 = empty) and
        # position in the stream of tokens the layer saw since the last consolidation.
        R = self.blocks[0].moe.report_top_tokens if L else 0
        self.register_buffer("report_top_weight", torch.full((L, E, R), -1.0), persistent=False)
        self.register_buffer(
            "report_top_index", torch.full((L, E, R), -1, dtype=torch.int64), persistent=False
        )
        self.register_buffer("report_seen", torch.zeros(L, dtype=torch.int64), persistent=False)
        self.collect_reports = True
        self.step = 0
        self._kg = None
        self._librarian = None
        self._scaler = None
        self._compiled = None
        self._graphs: dict = {}

    # ================================================================== forward

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.vocab_size is not None:
            if x.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"MixtureOfExpertsSystem: token ids must be int32/int64, got {x.dtype}"
                )
            return self.embed(x)
        want = cfg.input_dim if cfg.input_dim is not None else cfg.d_model
        if x.dim() < 1 or x.shape[-1] != want or not x.is_floating_point():
            raise ValueError(
                f"MixtureOfExpertsSystem: x must be a float tensor [..., {want}], got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> SystemOutput:
        """x -> :class:`SystemOutput`. No host sync: safe under ``torch.compile(fullgraph=True)``
        and CUDA-graph capture. Adds each layer's draft reports into the device accumulators
        while ``collect_reports`` is True (consolidate with :meth:`consolidate`)."""
        h = self._embed(x)
        aux = h.new_zeros((), dtype=torch.float32)
        infos = []
        for i, block in enumerate(self.blocks):
            h, info = block(h)
            aux = aux + info.aux_loss.float()
            if self.collect_reports:
                self._collect(i, info)
            infos.append(info)
        out = self.head(self.final_norm(h))
        return SystemOutput(out, aux, tuple(infos))

    @torch.no_grad()
    def _collect(self, layer: int, info) -> None:
        reports = info.reports
        n = reports.token_count.to(torch.int64)
        nf = n.to(torch.float32)
        self.report_output_sum[layer] += reports.mean_output.detach().float() * nf[:, None]
        self.report_confidence_sum[layer] += reports.confidence.detach().float() * nf
        self.report_tokens[layer] += n
        self._collect_top_tokens(layer, reports.top_tokens, info.ids, info.weights)

    def _collect_top_tokens(self, layer: int, top, ids, weights) -> None:
        """Merge this forward's top tokens ``[E, r]`` into the interval's ``[E, R]``: highest
        gate weight first, ties to the earlier token (fixed shapes, no host sync)."""
        E, T = top.shape[0], ids.shape[0]
        valid = top >= 0
        t = top.clamp_min(0)
        # The gate weight of token t's slot on expert e (a token has at most one slot per expert).
        mine = ids[t].long() == torch.arange(E, device=top.device)[:, None, None]
        w = (weights[t].float() * mine).sum(-1)
        w = torch.where(valid, w, torch.full_like(w, -1.0))
        pos = torch.where(valid, t + self.report_seen[layer], torch.full_like(t, -1))
        # Earlier tokens come first in the concatenation: the stable sort keeps them first on ties.
        cand_w = torch.cat([self.report_top_weight[layer], w], 1)
        cand_i = torch.cat([self.report_top_index[layer], pos], 1)
        R = self.report_top_index.shape[-1]
        order = torch.sort(-cand_w, dim=1, stable=True).indices[:, :R]
        self.report_top_weight[layer] = cand_w.gather(1, order)
        self.report_top_index[layer] = cand_i.gather(1, order)
        self.report_seen[layer] += T

    # ================================================================== training

    def _autocast(self, device: torch.device):
        amp = self.config.amp_dtype
        if amp == "none":
            return torch.autocast(device.type, enabled=False)
        if device.type == "cuda":
            dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        else:
            # CPU autocast runs in bfloat16 (float16 matmuls are slow or missing on CPUs).
            dtype = torch.bfloat16
        return torch.autocast(device.type, dtype=dtype)

    def _grad_scaler(self, device: torch.device):
        # A loss scaler is needed only for float16 (its narrow exponent underflows gradients).
        if self.config.amp_dtype == "fp16" and device.type == "cuda":
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler("cuda")
            return self._scaler
        return None

    def training_step(
        self,
        batch: Union[Sequence[torch.Tensor], dict],
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> StepResult:
        """One optimisation step on ``batch = (inputs, targets)`` (or ``{"inputs", "targets"}``).

        Runs forward under AMP when ``config.amp_dtype`` is set (bf16 on CPU; fp16 with a
        GradScaler or bf16 on CUDA), adds the balancing losses to ``loss_fn(output, targets)``
        (computed in float32; for outputs [B, S, C] and targets [B, S] both are flattened),
        clips gradients to ``config.grad_clip_norm``, steps, applies the aux-loss-free bias
        update, and frees gradients (``zero_grad(set_to_none=True)``). Every
        ``config.consolidation_interval`` steps it runs :meth:`consolidate` and every
        ``config.kg_checkpoint_interval`` steps it snapshots the knowledge graph.
        """
        if isinstance(batch, dict):
            inputs, targets = batch["inputs"], batch["targets"]
        else:
            inputs, targets = batch
        cfg = self.config
        self.train()
        optimizer.zero_grad(set_to_none=True)
        device = inputs.device
        with self._autocast(device):
            out = self(inputs)
        logits = out.output.float()
        if targets.shape != logits.shape and logits.dim() > 2:
            # Per-position class targets [B, S] for logits [B, S, C]: the layout losses expect.
            logits = logits.reshape(-1, logits.shape[-1])
            targets = targets.reshape(-1)
        task = loss_fn(logits, targets)
        loss = task + out.aux_loss
        scaler = self._grad_scaler(device)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = None
        if cfg.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update_rate > 0:
            for block in self.blocks:
                sup = getattr(block.moe, "supervisor", None)
                if sup is not None and getattr(sup, "uses_selection_bias", False):
                    sup.update_bias()
        self.step += 1

        consolidated = False
        if cfg.consolidation_interval and self.step % cfg.consolidation_interval == 0:
            self.consolidate()
            consolidated = True
        if cfg.kg_checkpoint_interval and self.step % cfg.kg_checkpoint_interval == 0:
            self.knowledge_graph.checkpoint()

        # One device read for every number this step reports.
        E = cfg.num_experts
        parts = [loss.detach().float().reshape(1), task.detach().float().reshape(1)]
        parts.append(out.aux_loss.detach().float().reshape(1))
        parts.append(
            grad_norm.detach().float().reshape(1)
            if grad_norm is not None
            else torch.zeros(1, device=loss.device)
        )
        for info in out.routing:
            parts.append(info.counts.detach().float().reshape(E))
            dropped = info.stats.get("dropped")
            parts.append(
                dropped.detach().float().reshape(1)
                if dropped is not None
                else torch.zeros(1, device=loss.device)
            )
        vals = torch.cat([p.to(loss.device) for p in parts]).tolist()
        load, drops = [], []
        pos = 4
        for _ in out.routing:
            load.append([int(v) for v in vals[pos : pos + E]])
            drops.append(int(vals[pos + E]))
            pos += E + 1
        stats = {"load": load, "dropped": drops, "consolidated": consolidated, "step": self.step}
        return StepResult(
            vals[0], vals[1], vals[2], vals[3] if grad_norm is not None else None, stats
        )

    # ================================================================== inference

    def compiled(self, mode: Optional[str] = None) -> Callable:
        """``torch.compile(self, fullgraph=True)`` with ``mode`` or ``config.compile_mode``
        (cached; "none" returns the module itself)."""
        mode = mode or self.config.compile_mode
        if mode == "none":
            return self
        if self._compiled is None or self._compiled[0] != mode:
            fn = torch.compile(self, mode=None if mode == "default" else mode, fullgraph=True)
            self._compiled = (mode, fn)
        return self._compiled[1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: eval mode, no grad, the configured fast path; returns ``[..., output_dim]``.

        With ``config.cuda_graphs`` and a CUDA input, a graph is captured once per input shape
        (batches are padded by the caller to a few fixed sizes, up to ``max_batch_size``);
        otherwise ``config.compile_mode`` picks the ``torch.compile`` mode.
        """
        self.eval()
        if self.config.cuda_graphs and x.is_cuda:
            from .cuda_graphs import CUDAGraphInference

            key = (tuple(x.shape), x.dtype, x.device)
            if key not in self._graphs:
                if x.shape[0] > self.config.max_batch_size:
                    raise ValueError(
                        f"MixtureOfExpertsSystem.predict: batch {x.shape[0]} exceeds "
                        f"config.max_batch_size={self.config.max_batch_size}"
                    )
                self._graphs[key] = CUDAGraphInference(lambda t: self(t).output, x)
            return self._graphs[key](x)
        return self.compiled()(x).output

    # ================================================================== knowledge graph

    @property
    def knowledge_graph(self):
        """The :class:`KnowledgeGraph` at ``config.kg_path`` (opened on first use)."""
        if self._kg is None:
            if self.config.kg_path is None:
                raise ValueError(
                    "MixtureOfExpertsSystem: config.kg_path is not set, there is no knowledge graph"
                )
            from .knowledge_graph import KnowledgeGraph

            cfg = self.config
            self._kg = KnowledgeGraph.open(
                cfg.kg_path,
                dim=cfg.d_model,
                merge_threshold=cfg.kg_merge_threshold,
                index_type=cfg.kg_index_type,
                keep_checkpoints=cfg.kg_snapshots_kept,
            )
        return self._kg

    @property
    def librarian(self):
        if self._librarian is None:
            from .librarian import Librarian

            self._librarian = Librarian(
                self.knowledge_graph, dedup_threshold=self.config.dedup_threshold
            )
        return self._librarian

    def pending_reports(self) -> list:
        """Per layer, the accumulated draft reports as ``DraftReports`` (reads nothing from the
        device: shapes [E, ...]). ``top_tokens [E, r]`` are each expert's most confident tokens of
        the whole interval (highest gate weight first, ties to the earlier token) as positions in
        the stream of tokens the model saw since the last consolidation: batch after batch, each
        flattened like ``x[..., d]``; -1 padded."""
        from .moe_layer import DraftReports

        out = []
        for layer in range(self.config.num_layers):
            n = self.report_tokens[layer]
            nf = n.clamp_min(1).to(torch.float32)
            out.append(
                DraftReports(
                    mean_output=self.report_output_sum[layer] / nf[:, None],
                    confidence=self.report_confidence_sum[layer] / nf,
                    token_count=n.clone(),
                    top_tokens=self.report_top_index[layer].clone(),
                )
            )
        return out

    @torch.no_grad()
    def consolidate(self) -> list:
        """Run the librarian over the reports accumulated since the last consolidation and write
        them into the knowledge graph (outside any compiled region: this reads the device).
        Experts that saw no token are skipped. Each node's ``top_tokens`` are the expert's most
        confident tokens of the interval (see :meth:`pending_reports`). Clears the accumulators.
        Returns the librarian's result per layer."""
        names = self.config.expert_names
        results = []
        for layer, reports in enumerate(self.pending_reports()):
            results.append(
                self.librarian.file_reports(
                    reports, layer=layer, step=self.step, expert_names=list(names)
                )
            )
        self.report_output_sum.zero_()
        self.report_confidence_sum.zero_()
        self.report_tokens.zero_()
        self.report_top_weight.fill_(-1.0)
        self.report_top_index.fill_(-1)
        self.report_seen.zero_()
        return results

    def query_knowledge_graph(
        self,
        query: Any,
        top_k: int = 5,
        *,
        from_inputs: bool = False,
        layer: int = -1,
        types: Optional[Sequence[str]] = None,
        where: Optional[dict] = None,
    ) -> list:
        """Nodes of the knowledge graph most similar to ``query``, best first.

        query: an embedding ``[d_model]`` or ``[q, d_model]`` (tensor or array), or, with
            ``from_inputs=True``, model inputs whose embedding is the mean MoE output of
            ``layer`` over all their tokens (the same space the experts' reports live in).
        types: keep only nodes of these types (e.g. ``("expert_report",)``).
        where: keep only nodes whose metadata has these key/value pairs (e.g. ``{"layer": 1}``;
            compared as JSON values, see :meth:`KnowledgeGraph.find_similar_nodes`).
        Returns, per query (a flat list for a single query), dicts ``{"id", "similarity",
        "type", "metadata"}``.
        """
        import numpy as np

        if from_inputs:
            q = self.embed_inputs(query, layer=layer)[None]
        else:
            q = torch.as_tensor(
                np.asarray(query.detach().cpu() if torch.is_tensor(query) else query)
            )
        single = q.dim() == 1
        q = q.reshape(-1, q.shape[-1]).float().cpu().numpy()
        if q.shape[1] != self.config.d_model:
            raise ValueError(
                f"query_knowledge_graph: query must be [..., d_model={self.config.d_model}], got "
                f"last dim {q.shape[1]} (pass from_inputs=True for model inputs)"
            )
        kg = self.knowledge_graph
        out = []
        for row in q:
            hits = kg.find_similar_nodes(row, top_k=top_k, types=types, where=where)
            out.append(
                [
                    {"id": h.id, "similarity": h.score, "type": h.type, "metadata": h.metadata}
                    for h in hits
                ]
            )
        return out[0] if single or from_inputs else out

    @torch.no_grad()
    def embed_inputs(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Mean MoE-layer output ``[d_model]`` of ``layer`` over every token of ``x`` (eval mode,
        reports not collected): the query embedding matching the experts' reports."""
        was_training, was_collecting = self.training, self.collect_reports
        self.eval()
        self.collect_reports = False
        try:
            h = self._embed(x)
            n = len(self.blocks)
            target = layer % n
            for i, block in enumerate(self.blocks):
                y, _ = block.moe(block.norm(h))
                if i == target:
                    return y.reshape(-1, y.shape[-1]).float().mean(0)
                h = h + y
        finally:
            self.train(was_training)
            self.collect_reports = was_collecting
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the knowledge graph (releases its write lock). Idempotent."""
        if self._kg is not None:
            self._kg.close()
            self._kg = None
            self._librarian = None

    def __enter__(self) -> MixtureOfExpertsSystem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ================================================================== persistence

    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``model.safetensors`` (weights + buffers of the model state), ``config.json``
        and, when a knowledge graph exists, a consistent copy of it as ``knowledge.sqlite``
        (SQLite's online backup). No pickle anywhere.

        Each file is replaced atomically (temporary file, fsync, rename, directory fsync) with the
        usual permissions (``0o666`` minus the umask), so a crash mid-save leaves every file
        complete, old or new. When ``knowledge.sqlite`` in ``directory`` *is* the live store (the
        directory the model was loaded from, under any spelling: a symlinked directory, a hard
        link), nothing is copied over it: its committed transactions are folded from the WAL into
        the file instead. A destination that is one of the store's own files is refused.
        """
        d = os.fspath(directory)
        os.makedirs(d, exist_ok=True)
        weights, config, dst = (os.path.join(d, n) for n in (_WEIGHTS, _CONFIG, _KG))
        store = self._store_path()
        if store is not None:
            for path in (weights, config):
                if touches_store(path, store):
                    raise ValueError(
                        f"MixtureOfExpertsSystem.save: writing {path} would overwrite the live "
                        f"knowledge-graph store {store} (or one of its files); save elsewhere"
                    )
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _write_safetensors(weights, state, {"format": _FORMAT, "step": str(self.step)})
        self.config.to_json(config)
        if store is not None:
            self._save_store(store, dst)

    def _store_path(self) -> Optional[str]:
        """The live store's path as its writer spells it (None when there is no store yet)."""
        if self._kg is not None:
            return self._kg.path
        src = self.config.kg_path
        return src if src is not None and os.path.exists(src) else None

    def _save_store(self, store: str, dst: str) -> None:
        if touches_store(dst, store):
            if not same_file(dst, store):
                raise ValueError(
                    f"MixtureOfExpertsSystem.save: {dst} is one of the files of the live store "
                    f"{store} (its WAL, journal or lock); refusing to overwrite it"
                )
            # The live store is already here: copying it onto itself would replace the file under
            # its open writer (and corrupt it). Every write is a committed transaction already;
            # fold them from the WAL into the file so the directory holds them by itself.
            _fold_wal(store)
            return
        if os.path.islink(dst):
            os.unlink(dst)  # a copy replaces the link itself, never writes through it
        # the store's own backup: one consistent snapshot, fsynced, renamed into place
        if self._kg is not None:
            self._kg.backup(dst)
        else:
            from .knowledge_graph import KnowledgeGraph

            with KnowledgeGraph.open(store, readonly=True) as kg:
                kg.backup(dst)

    @classmethod
    def load(
        cls,
        directory: Union[str, os.PathLike],
        *,
        map_location: Union[str, torch.device] = "cpu",
        kg_path: Optional[str] = None,
        allow_nonfinite: bool = False,
        max_parameters: int = MAX_PARAMETERS,
    ) -> MixtureOfExpertsSystem:
        """Rebuild a system written by :meth:`save`. The knowledge graph is the saved copy in
        ``directory`` unless ``kg_path`` is given.

        Nothing in ``directory`` is trusted: the files must be regular files (a FIFO is refused,
        never waited on) and may be symlinks only to files inside ``directory``. The weights are
        read with our own safetensors reader, never unpickled, and only after their header was
        checked against the model ``config.json`` describes: the same tensor names, shapes and
        dtypes (integer tensors exactly; floating-point ones any of F32, F16, BF16, F64) and a
        data length that matches the file, so a small file cannot make ``load`` allocate a huge
        model. ``max_parameters`` bounds the number of elements of the model state (raise it for
        bigger models). Weights with NaN or Inf are refused unless ``allow_nonfinite=True``; the
        ``step`` metadata must be a non-negative integer.
        """
        d = os.fspath(directory)
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"{_LOAD}: {d} is not a directory (expected one written by save())"
            )
        if not (_is_int(max_parameters) and max_parameters >= 1):
            raise ValueError(f"{_LOAD}: max_parameters must be an int >= 1, got {max_parameters!r}")
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"{_LOAD}: allow_nonfinite must be a bool, got {allow_nonfinite!r}")
        config_path = _model_file(d, _CONFIG)
        cfg = MoEConfig.from_dict(parse_config_json(read_config_text(config_path, _LOAD), _LOAD))
        if kg_path is not None:
            cfg = cfg.replace(kg_path=os.fspath(kg_path))
        elif _saved_store(d) is not None:
            cfg = cfg.replace(kg_path=os.path.join(d, _KG))
        else:
            cfg = cfg.replace(kg_path=None, consolidation_interval=0, kg_checkpoint_interval=0)
        expected = _expected_state(cls, cfg, max_parameters)
        weights = _model_file(d, _WEIGHTS)
        with open_regular_file(weights, _LOAD) as f:
            header = _SafetensorsHeader.read(f, weights)
            header.check_saved_system()
            step = header.step()
            header.check_against(expected)
            # Only now, with every shape known to match a file of this size, is memory allocated.
            model = cls(cfg)
            header.read_into(f, model.state_dict(), allow_nonfinite)
        model.step = step
        return model.to(map_location)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.num_layers}, d_model={c.d_model}, experts={c.num_experts}, "
            f"top_k={c.top_k}, strategy={c.routing_strategy!r}"
        )


# ====================================================================== save / load helpers

# The JSON header of a safetensors file; the safetensors library caps it at the same size.
_MAX_HEADER_BYTES = 100_000_000
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _model_file(d: str, name: str) -> str:
    """``d/name``, which must exist and stay inside ``d`` (a symlink may point only inside)."""
    path = os.path.join(d, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"{_LOAD}: {path} is missing (expected a directory written by save())"
        )
    _check_stays_inside(d, path)
    return path


def _check_stays_inside(d: str, path: str) -> None:
    if not _inside(d, path):
        raise ValueError(
            f"{_LOAD}: {path} is a symlink to {os.path.realpath(path)}, outside the model "
            f"directory {os.path.realpath(d)}; refusing to follow it"
        )


def _saved_store(d: str) -> Optional[str]:
    """The saved ``knowledge.sqlite`` of ``d``, or None. It and every file SQLite and the store
    would open or create beside it (WAL, shared memory, journal, lock, snapshots) must stay inside
    ``d``: a planted symlink would make the model write somewhere else. The store and its
    existing companions must be regular files (a FIFO would hang the first query)."""
    path = os.path.join(d, _KG)
    if not os.path.lexists(path):
        return None
    for p in store_companions(path) + [path + ".checkpoints"]:
        if os.path.lexists(p):
            _check_stays_inside(d, p)
    for p in store_companions(path):
        if os.path.exists(p) and not stat.S_ISREG(os.stat(p).st_mode):
            raise ValueError(f"{_LOAD}: {p} is not a regular file")
    return path


def _expected_state(cls, cfg: MoEConfig, max_parameters: int) -> dict:
    """``name -> (shape, dtype)`` of the model state ``cfg`` describes, from a model built on
    the meta device (no memory), checked against ``max_parameters``."""
    with torch.device("meta"):
        skeleton = cls(
            cfg.replace(kg_path=None, consolidation_interval=0, kg_checkpoint_interval=0)
        )
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    total = sum(math.prod(shape) for shape, _ in expected.values())
    if total > max_parameters:
        raise ValueError(
            f"{_LOAD}: config.json describes a model state of {total} elements, more than "
            f"max_parameters={max_parameters}; pass a larger max_parameters to load it"
        )
    return expected


class _SafetensorsHeader:
    """The header of a safetensors file, read and checked before any tensor is allocated.

    Layout: 8-byte little-endian header length n, n bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
    the data; offsets are relative to the data, which the tensors tile with no gap or overlap.
    """

    def __init__(self, path: str, tensors: dict, meta: dict, data_start: int, data_len: int):
        self.path, self.tensors, self.meta = path, tensors, meta
        self.data_start, self.data_len = data_start, data_len

    @classmethod
    def read(cls, f, path: str) -> _SafetensorsHeader:
        size = os.fstat(f.fileno()).st_size
        raw = _read_exact(f, 8, path) if size >= 8 else b""
        if len(raw) < 8:
            raise ValueError(f"{_LOAD}: {path} is too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{_LOAD}: {path} has a header length of {n} bytes, the file has {size} "
                "(not a safetensors file, or a truncated one)"
            )

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                raise ValueError(f"{_LOAD}: {path} header has duplicate keys")
            return dict(pairs)

        try:
            header = json.loads(_read_exact(f, n, path), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{_LOAD}: {path} header is not valid JSON ({exc!r})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{_LOAD}: {path} header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError(f"{_LOAD}: {path} __metadata__ must map strings to strings")
        return cls(path, header, meta, 8 + n, size - 8 - n)

    def check_saved_system(self) -> None:
        fmt = self.meta.get("format")
        if fmt != _FORMAT:
            raise ValueError(
                f"{_LOAD}: {self.path} is not a saved system (format {fmt!r}, expected {_FORMAT!r})"
            )

    def step(self) -> int:
        s = self.meta.get("step", "0")
        if not re.fullmatch(r"[0-9]{1,18}", s):
            raise ValueError(
                f"{_LOAD}: {self.path} metadata 'step' must be a non-negative integer, got {s!r}"
            )
        return int(s)

    def check_against(self, expected: dict) -> None:
        """Names, dtypes, shapes and byte ranges against the state the config implies."""
        where = f"{_LOAD}: {self.path}"
        missing = sorted(set(expected) - set(self.tensors))
        unexpected = sorted(set(self.tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{where} does not match config.json: missing tensors {missing[:5]}, unexpected "
                f"tensors {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)"
            )
        spans = []
        for name, (shape, dtype) in expected.items():
            entry = self.tensors[name]
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: tensor {name!r} entry is not an object")
            code, got_shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
            want = _ST_CODES[dtype]
            if dtype.is_floating_point:
                if code not in _FLOAT_CODES:
                    raise ValueError(
                        f"{where}: tensor {name!r} has dtype {code!r}, expected a floating-point "
                        f"dtype {_FLOAT_CODES} (saved as {want})"
                    )
            elif code != want:
                raise ValueError(f"{where}: tensor {name!r} has dtype {code!r}, expected {want!r}")
            if not (isinstance(got_shape, list) and all(_is_int(v) for v in got_shape)):
                raise ValueError(
                    f"{where}: tensor {name!r} shape {got_shape!r} is not a list of ints"
                )
            if tuple(got_shape) != shape:
                raise ValueError(
                    f"{where}: tensor {name!r} has shape {tuple(got_shape)}, config.json implies "
                    f"{shape} (the weights and the config do not belong together)"
                )
            if not (
                isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_int(v) and v >= 0 for v in offsets)
            ):
                raise ValueError(f"{where}: tensor {name!r} data_offsets {offsets!r} are invalid")
            nbytes = math.prod(shape) * _ST_DTYPES[code].itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(
                    f"{where}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its dtype "
                    f"and shape need {nbytes}"
                )
            spans.append((offsets[0], offsets[1], name))
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise ValueError(
                    f"{where}: tensor {name!r} starts at byte {begin} of the data, expected {pos} "
                    "(tensors must tile the data with no gap or overlap)"
                )
            pos = end
        if pos != self.data_len:
            raise ValueError(
                f"{where}: the header describes {pos} bytes of data, the file holds "
                f"{self.data_len} (truncated or padded)"
            )

    def read_into(self, f, state: dict, allow_nonfinite: bool) -> None:
        """Read every tensor (one at a time) into the matching tensor of ``state``."""
        if sys.byteorder != "little":
            raise RuntimeError(f"{_LOAD}: loading needs a little-endian machine")
        with torch.no_grad():
            for name, dst in state.items():
                entry = self.tensors[name]
                t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
                if t.numel():
                    f.seek(self.data_start + entry["data_offsets"][0])
                    _read_exact_into(f, t.reshape(-1).view(torch.uint8).numpy(), self.path)
                if not allow_nonfinite and t.is_floating_point() and not bool(t.isfinite().all()):
                    raise ValueError(
                        f"{_LOAD}: tensor {name!r} in {self.path} has NaN or Inf values; pass "
                        "allow_nonfinite=True to load it anyway"
                    )
                dst.copy_(t)


def _read_exact(f, n: int, path: str) -> bytes:
    buf = bytearray(n)
    _read_exact_into(f, buf, path)
    return bytes(buf)


def _read_exact_into(f, buf, path: str) -> None:
    view = memoryview(buf).cast("B")
    pos = 0
    while pos < len(view):
        got = f.readinto(view[pos:])
        if not got:
            raise ValueError(f"{_LOAD}: {path} ended early (truncated)")
        pos += got


def _write_safetensors(path: str, state: dict, metadata: dict) -> None:
    """safetensors' ``save_file``, made atomic, durable and umask-respecting: it writes a file
    of mode 0600 (its own temporary file); we give it the mode a fresh file gets here, fsync it,
    rename it into place and fsync the directory."""
    from safetensors.torch import save_file

    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 minus the umask (or a default ACL)
    finally:
        os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def _fold_wal(store: str) -> None:
    """Copy the store's committed WAL frames into its file, so the file alone holds every
    transaction (committed data is durable either way). PASSIVE: it never waits on the writer
    or on readers. Opened through the store's own path: SQLite finds the WAL by name, and a hard
    link has another."""
    from urllib.parse import quote

    uri = "file:" + quote(os.path.abspath(store), safe="/") + "?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # the checkpoint fsyncs the file
            _, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        reason = repr(exc)
    else:
        if done >= log:
            return
        reason = f"{done} of {log} WAL frames copied: a reader holds an older snapshot"
    warnings.warn(
        f"MixtureOfExpertsSystem.save: could not fold the WAL of {store} into the file "
        f"({reason}); the committed data is safe in {store}-wal, keep it with the store",
        RuntimeWarning,
        stacklevel=3,
    )
