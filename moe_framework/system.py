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

import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .config import MoEConfig
from .constellation import MoELayer
from .supervisor import Supervisor

__all__ = ["MixtureOfExpertsSystem", "SystemOutput", "StepResult"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_KG = "knowledge.sqlite"
_FORMAT = "moe_framework.MixtureOfExpertsSystem/1"


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
    )
    if cfg.router_noise_eps is not None:
        kw["noise_eps"] = cfg.router_noise_eps
    return Supervisor(cfg.d_model, cfg.num_experts, cfg.top_k, **kw)


class _CheckpointedMoELayer(MoELayer):
    """MoELayer whose expert computation (the two grouped GEMMs and the activation) is recomputed
    in backward instead of kept: gradient checkpointing of the expert block only. The router is
    not checkpointed on purpose: it updates buffers (noise step, bias-balancing loads) in forward,
    and a recompute would apply those updates twice and route differently."""

    def _run_experts(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return _checkpoint(self.experts, x_sorted, offsets, use_reentrant=False)
        return self.experts(x_sorted, offsets)


def _make_moe_layer(cfg: MoEConfig, layer_index: int) -> nn.Module:
    cls = _CheckpointedMoELayer if cfg.gradient_checkpointing else MoELayer
    return cls(
        cfg.d_model,
        cfg.d_hidden,
        cfg.num_experts,
        cfg.top_k,
        supervisor=_make_supervisor(cfg, layer_index),
        activation=cfg.activation,
        num_shared_experts=cfg.num_shared_experts,
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
                self._collect(i, info.reports)
            infos.append(info)
        out = self.head(self.final_norm(h))
        return SystemOutput(out, aux, tuple(infos))

    @torch.no_grad()
    def _collect(self, layer: int, reports) -> None:
        n = reports.token_count.to(torch.int64)
        nf = n.to(torch.float32)
        self.report_output_sum[layer] += reports.mean_output.detach().float() * nf[:, None]
        self.report_confidence_sum[layer] += reports.confidence.detach().float() * nf
        self.report_tokens[layer] += n

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
        device: shapes [E, ...])."""
        from .constellation import DraftReports

        out = []
        E = self.config.num_experts
        for layer in range(self.config.num_layers):
            n = self.report_tokens[layer]
            nf = n.clamp_min(1).to(torch.float32)
            out.append(
                DraftReports(
                    mean_output=self.report_output_sum[layer] / nf[:, None],
                    confidence=self.report_confidence_sum[layer] / nf,
                    token_count=n.clone(),
                    top_tokens=torch.full((E, 1), -1, dtype=torch.int64, device=n.device),
                )
            )
        return out

    @torch.no_grad()
    def consolidate(self) -> list:
        """Run the librarian over the reports accumulated since the last consolidation and write
        them into the knowledge graph (outside any compiled region: this reads the device).
        Experts that saw no token are skipped. Clears the accumulators. Returns the librarian's
        result per layer."""
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
        (SQLite's online backup). No pickle anywhere."""
        from safetensors.torch import save_file

        d = os.fspath(directory)
        os.makedirs(d, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": _FORMAT, "step": str(self.step)}
        save_file(state, os.path.join(d, _WEIGHTS), metadata=meta)
        self.config.to_json(os.path.join(d, _CONFIG))
        src = self.config.kg_path
        if src is not None and os.path.exists(src):
            dst = os.path.join(d, _KG)
            if os.path.abspath(dst) != os.path.abspath(src):
                # the store's own backup: one consistent snapshot, fsynced, renamed into place
                if self._kg is not None:
                    self._kg.backup(dst)
                else:
                    from .knowledge_graph import KnowledgeGraph

                    with KnowledgeGraph.open(src, readonly=True) as kg:
                        kg.backup(dst)

    @classmethod
    def load(
        cls,
        directory: Union[str, os.PathLike],
        *,
        map_location: Union[str, torch.device] = "cpu",
        kg_path: Optional[str] = None,
    ) -> MixtureOfExpertsSystem:
        """Rebuild a system written by :meth:`save`. The knowledge graph is the saved copy in
        ``directory`` unless ``kg_path`` is given. Weights are read with safetensors (no
        unpickling); a missing or unexpected tensor is an error."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        d = os.fspath(directory)
        cfg = MoEConfig.from_json(os.path.join(d, _CONFIG))
        saved_kg = os.path.join(d, _KG)
        if kg_path is not None:
            cfg = cfg.replace(kg_path=os.fspath(kg_path))
        elif os.path.exists(saved_kg):
            cfg = cfg.replace(kg_path=saved_kg)
        else:
            cfg = cfg.replace(kg_path=None, consolidation_interval=0, kg_checkpoint_interval=0)
        weights = os.path.join(d, _WEIGHTS)
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"MixtureOfExpertsSystem.load: {weights} is not a saved system (format "
                f"{meta.get('format')!r}, expected {_FORMAT!r})"
            )
        model = cls(cfg)
        model.load_state_dict(load_file(weights, device=str(map_location)), strict=True)
        model.step = int(meta.get("step", "0"))
        return model.to(map_location)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.num_layers}, d_model={c.d_model}, experts={c.num_experts}, "
            f"top_k={c.top_k}, strategy={c.routing_strategy!r}"
        )
