"""MixtureOfExpertsSystem: input -> N MoE blocks (supervisor -> constellation) -> head, plus the
knowledge-graph side: draft reports collected on the device, consolidated by the librarian.

The forward pass is graph-safe: no host sync, static shapes, so it compiles with
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph. Each MoE layer's draft
reports are added into fixed-shape device accumulators inside forward; :meth:`consolidate` reads
them (off the hot path), runs the :class:`~moe_framework.librarian.Librarian` and writes the
:class:`~moe_framework.knowledge_graph.KnowledgeGraph`. Training goes through
:meth:`training_step`, which runs :mod:`moe_framework.training` (AMP, balancing losses, clipping,
bias update, automatic consolidation). Persistence (:meth:`save` / :meth:`load`, implemented in
:mod:`moe_framework.persistence`): safetensors weights, JSON config, the SQLite store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import training
from .config import MoEConfig
from .moe_layer import MoELayer
from .persistence import MAX_PARAMETERS, load_system, save_system
from .routing.factory import ROUTERS, router_arguments
from .run_metrics import RunMetrics, stage
from .supervisor import Supervisor
from .training import StepResult

if TYPE_CHECKING:
    # Imported on first use at run time (the store pulls in SQLite and FAISS).
    from .knowledge_graph import KnowledgeGraph
    from .librarian import Librarian

__all__ = ["MixtureOfExpertsSystem", "SystemOutput", "StepResult"]


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


def _num_tokens(inputs: torch.Tensor, cfg: MoEConfig) -> int:
    """Tokens in a batch of inputs: every position (token ids: all dims; features: all but the
    last)."""
    shape = inputs.shape if cfg.vocab_size is not None else inputs.shape[:-1]
    return int(math.prod(shape))


class _Block(nn.Module):
    """Pre-norm residual MoE block: ``x + dropout(moe(norm(x)))``."""

    norm: nn.LayerNorm
    moe: MoELayer
    dropout: nn.Dropout

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
        strategy=cfg.strategy,
        temperature=cfg.temperature,
        capacity_factor=cfg.capacity_factor,
        load_balance_coef=cfg.load_balance_coef,
        z_loss_coef=cfg.z_loss_coef,
        bias_update_rate=cfg.bias_update_rate,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor,
        jitter_eps=cfg.jitter_eps,
        # Distinct noise streams per layer, reproducible from the config's seed.
        seed=cfg.seed * 1000 + layer_index,
        causal=cfg.causal,
        track_stats=cfg.track_stats,
    )
    if cfg.noise_eps is not None:
        kw["noise_eps"] = cfg.noise_eps
    # A config is flat, so it carries every strategy's options; the router gets only its own. One
    # set to a non-default value for a strategy that has no use for it is ignored, as it always
    # was, but said (the Supervisor factory itself refuses such arguments).
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    own = router_arguments(ROUTERS[cfg.strategy])
    for name in [n for n in kw if n != "strategy" and n not in own]:
        value = kw.pop(name)
        if layer_index == 0 and name in defaults and value != defaults[name]:
            warnings.warn(
                f"MoEConfig: {name}={value!r} does not apply to strategy={cfg.strategy!r} and is "
                "ignored",
                UserWarning,
                stacklevel=4,
            )
    return Supervisor(cfg.d_model, cfg.num_experts, cfg.k, **kw)


def _make_moe_layer(cfg: MoEConfig, layer_index: int) -> MoELayer:
    # gradient_checkpointing recomputes the experts only (CheckpointedExperts): the router updates
    # buffers in forward, and a recompute would apply those updates twice.
    return MoELayer.build(
        d_model=cfg.d_model,
        d_hidden=cfg.d_hidden,
        num_experts=cfg.num_experts,
        k=cfg.k,
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

    # Draft-report accumulators, declared for type checkers (register_buffer creates them).
    report_output_sum: torch.Tensor
    report_confidence_sum: torch.Tensor
    report_tokens: torch.Tensor
    report_top_weight: torch.Tensor
    report_top_index: torch.Tensor
    report_seen: torch.Tensor

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
        R = (self._blocks()[0].moe.report_top_tokens or 0) if L else 0
        self.register_buffer("report_top_weight", torch.full((L, E, R), -1.0), persistent=False)
        self.register_buffer(
            "report_top_index", torch.full((L, E, R), -1, dtype=torch.int64), persistent=False
        )
        self.register_buffer("report_seen", torch.zeros(L, dtype=torch.int64), persistent=False)
        self.collect_reports = True
        self.step = 0
        self._kg: Optional[KnowledgeGraph] = None
        self._librarian: Optional[Librarian] = None
        self._scaler: Optional[torch.amp.GradScaler] = None
        self._compiled: Optional[tuple[str, Callable]] = None
        self._graphs: dict = {}
        self._run_metrics: Optional[RunMetrics] = None

    def _blocks(self) -> list[_Block]:
        # The blocks with their type: nn.ModuleList types its items as plain nn.Module.
        return [cast(_Block, block) for block in self.blocks]

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
        E = self.config.num_experts
        n = reports.token_count.to(torch.int64)
        out_sum = reports.mean_output.detach().float() * n.to(torch.float32)[:, None]
        conf_sum = reports.confidence.detach().float() * n.to(torch.float32)
        top, ids = reports.top_tokens, info.ids
        if n.shape[0] != E:
            # A layer resized by moe_framework.adaptation: P physical experts, children of the
            # configured (logical) ones. Reports are filed per configured expert, so the
            # children's sums add into their parent's row (device ops, no host sync).
            parent = self._logical_parent(layer, n.shape[0])
            out_sum = out_sum.new_zeros(E, out_sum.shape[1]).index_add_(0, parent, out_sum)
            conf_sum = conf_sum.new_zeros(E).index_add_(0, parent, conf_sum)
            n = n.new_zeros(E).index_add_(0, parent, n)
            top, ids = self._logical_top_tokens(top, parent, E), parent[ids.long()]
        self.report_output_sum[layer] += out_sum
        self.report_confidence_sum[layer] += conf_sum
        self.report_tokens[layer] += n
        self._collect_top_tokens(layer, top, ids, info.weights)

    def _logical_parent(self, layer: int, P: int) -> torch.Tensor:
        """``parent [P]``: the configured expert each physical expert of ``layer`` descends from;
        a clear error when the layer's logical experts are no longer the configured ones."""
        router = self._blocks()[layer].moe.supervisor
        parent = getattr(router, "parent", None)
        if parent is None or getattr(router, "num_logical", None) != self.config.num_experts:
            logical = getattr(router, "num_logical", P)
            raise ValueError(
                f"MixtureOfExpertsSystem: layer {layer} has {P} experts over {logical} logical "
                f"ones, config.num_experts is {self.config.num_experts}. Draft reports are filed "
                "per configured expert: a layer may be split (split_expert), but merge_experts, "
                "which removes a configured expert, is not supported inside a system; or set "
                "collect_reports=False"
            )
        return parent

    @staticmethod
    def _logical_top_tokens(top: torch.Tensor, parent: torch.Tensor, E: int) -> torch.Tensor:
        """Physical top tokens ``[P, r]`` as logical ``[E, P*r]``: each logical expert's row
        holds its children's tokens (a token has at most one slot per logical expert), in token
        order (-1, no token, last)."""
        P, r = top.shape
        rows = top.new_full((E, P, r), -1)
        rows[parent, torch.arange(P, device=top.device)] = top
        rows = rows.reshape(E, P * r)
        key = torch.where(rows >= 0, rows, torch.full_like(rows, torch.iinfo(rows.dtype).max))
        return rows.gather(1, torch.sort(key, dim=1, stable=True).indices)

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
        return training.autocast(self.config.amp_dtype, device)

    def _grad_scaler(self, device: torch.device):
        if not training.needs_grad_scaler(self.config.amp_dtype, device):
            return None
        # One scaler for the whole training run: it carries the adaptive loss scale.
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    def routers(self) -> tuple:
        """The router of each MoE layer, first layer first."""
        return tuple(block.moe.supervisor for block in self._blocks())

    def training_step(
        self,
        batch: Union[Sequence[torch.Tensor], dict],
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        *,
        options: Optional[training.TrainingOptions] = None,
    ) -> StepResult:
        """One optimisation step on ``batch = (inputs, targets)`` (or ``{"inputs", "targets"}``).

        Runs forward under AMP when ``config.amp_dtype`` is set (bf16 on CPU; fp16 with a
        GradScaler or bf16 on CUDA), adds the balancing losses to ``loss_fn(output, targets)``
        (computed in float32; for outputs [B, S, C] and targets [B, S] both are flattened),
        clips gradients to ``config.grad_clip_norm``, steps, applies the aux-loss-free bias
        update, and frees gradients (``zero_grad(set_to_none=True)``). Every
        ``config.consolidation_interval`` steps it runs :meth:`consolidate` and every
        ``config.kg_checkpoint_interval`` steps it snapshots the knowledge graph. The work is
        :func:`moe_framework.training.training_step`'s (usable in a loop of your own);
        ``options`` (router / expert dropout, diversity loss) are its ``TrainingOptions``.
        """
        inputs, _ = training.split_batch(batch)
        scaler = self._grad_scaler(inputs.device)
        rec = self.run_metrics
        t0 = time.perf_counter()
        with rec.recording(), stage("training_step"):
            result = training.training_step(
                self, batch, optimizer, loss_fn, grad_scaler=scaler, options=options
            )
        rec.record_step(
            self.step, _num_tokens(inputs, self.config), time.perf_counter() - t0, result
        )
        return result

    # ================================================================== run metrics

    @property
    def run_metrics(self) -> RunMetrics:
        """The :class:`~moe_framework.run_metrics.RunMetrics` of this system (created on first
        use; :meth:`log_metrics` replaces it with one that also writes logs)."""
        if self._run_metrics is None:
            self._run_metrics = RunMetrics()
        return self._run_metrics

    def log_metrics(
        self,
        jsonl_path: Optional[str] = None,
        tensorboard_dir: Optional[str] = None,
        *,
        sync_cuda: bool = False,
    ) -> RunMetrics:
        """From now on write one JSON line per training step and consolidation to
        ``jsonl_path`` and/or TensorBoard scalars to ``tensorboard_dir`` (what was recorded so
        far is kept in :meth:`metrics` only)."""
        old = self._run_metrics
        new = RunMetrics(
            jsonl_path=jsonl_path, tensorboard_dir=tensorboard_dir, sync_cuda=sync_cuda
        )
        if old is not None:
            new.__dict__.update(
                {k: v for k, v in old.__dict__.items() if k not in ("jsonl_path", "_writer")}
            )
            new.sync_cuda = sync_cuda
            old.close()
        self._run_metrics = new
        return new

    def metrics(self) -> dict:
        """Run metrics since construction (or ``run_metrics.reset()``): tokens/s, mean step time
        and its split into routing / dispatch / experts / combine / other (per step) and
        consolidation (per consolidation), routing balance and drops per layer, and the
        knowledge graph's growth (nodes and edges after each consolidation). See
        :meth:`moe_framework.run_metrics.RunMetrics.snapshot`."""
        return self.run_metrics.snapshot()

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
    def knowledge_graph(self) -> KnowledgeGraph:
        """The :class:`KnowledgeGraph` at ``config.kg_path`` (opened on first use)."""
        if self._kg is None:
            cfg = self.config
            if cfg.kg_path is None:
                raise ValueError(
                    "MixtureOfExpertsSystem: config.kg_path is not set, there is no knowledge graph"
                )
            from .knowledge_graph import KnowledgeGraph

            self._kg = KnowledgeGraph.open(
                cfg.kg_path,
                dim=cfg.d_model,
                merge_threshold=cfg.kg_merge_threshold,
                index_type=cfg.kg_index_type,
                keep_checkpoints=cfg.kg_keep_checkpoints,
            )
        return self._kg

    @property
    def librarian(self) -> Librarian:
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
        t0 = time.perf_counter()
        with stage("consolidation"):
            for layer, reports in enumerate(self.pending_reports()):
                results.append(
                    self.librarian.file_reports(
                        reports, layer=layer, step=self.step, expert_names=list(names)
                    )
                )
        kg = self.knowledge_graph
        self.run_metrics.record_kg(self.step, len(kg), kg.num_edges(), time.perf_counter() - t0)
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
        rows = q.reshape(-1, q.shape[-1]).float().cpu().numpy()
        if rows.shape[1] != self.config.d_model:
            raise ValueError(
                f"query_knowledge_graph: query must be [..., d_model={self.config.d_model}], got "
                f"last dim {rows.shape[1]} (pass from_inputs=True for model inputs)"
            )
        kg = self.knowledge_graph
        out = []
        for row in rows:
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
            for i, block in enumerate(self._blocks()):
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
        save_system(self, directory)

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
        ``step`` metadata must be a non-negative integer. A ``config.json`` written by an earlier
        version (old field names) loads, with a ``DeprecationWarning``.
        """
        return load_system(
            cls,
            directory,
            map_location=map_location,
            kg_path=kg_path,
            allow_nonfinite=allow_nonfinite,
            max_parameters=max_parameters,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={c.num_layers}, d_model={c.d_model}, experts={c.num_experts}, "
            f"k={c.k}, strategy={c.strategy!r}"
        )
