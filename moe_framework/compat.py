"""The original design guide's names, mapped to this package's.

Users arrive with code written against the MoE framework guide this project started from. Its
classes are thin factories (or, for ``BaseExpert``, a thin subclass) returning our modules, and its
config keys are accepted by :meth:`MoEConfig.from_dict <moe_framework.config.MoEConfig.from_dict>`.
The factories take the guide's argument names and defaults; what they return is ours, with our
forward contracts (docs/compat.md has the table and the differences).

==========================  ======================================================================
guide                       here
==========================  ======================================================================
``SupervisorGating``        :class:`~moe_framework.supervisor.Supervisor`
``ExpertConstellation``     :class:`~moe_framework.constellation.MoELayer`
``LibrarianCurator``        :class:`~moe_framework.librarian.Librarian`
``FullyOptimizedMoESystem`` :class:`~moe_framework.system.MixtureOfExpertsSystem`
``BaseExpert``              a one-expert :class:`~moe_framework.experts.ExpertBank`
==========================  ======================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch

from .config import MoEConfig
from .experts import ExpertBank
from .knowledge_graph import KnowledgeGraph
from .librarian import Librarian
from .moe_layer import MoELayer
from .options import STRATEGIES
from .routing import Router
from .supervisor import Supervisor
from .system import MixtureOfExpertsSystem

__all__ = [
    "BaseExpert",
    "ExpertConstellation",
    "FullyOptimizedMoESystem",
    "GUIDE_CONFIG_KEYS",
    "LibrarianCurator",
    "SupervisorGating",
    "translate_guide_config",
]


# ====================================================================== config keys

# The guide's MoEConfig keys -> the field each one sets here (None: no equivalent, refused with the
# reason in _NO_EQUIVALENT). Keys the guide shares with us (input_dim, output_dim, num_experts,
# dedup_threshold, max_batch_size, max_seq_len) need no entry.
GUIDE_CONFIG_KEYS = {
    "hidden_dim": "d_hidden",
    "top_k_experts": "k",
    "expert_specializations": "specialisation_names",
    "gating_type": "strategy",
    "load_balance_weight": "load_balance_coef",
    "use_amp": "amp_dtype",
    "use_compile": "compile_mode",
    "use_cuda_graph": "cuda_graphs",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "max_kg_nodes": None,
    "kg_checkpoint_dir": None,
    "kg_save_interval": None,
}

_NO_EQUIVALENT = {
    "max_kg_nodes": (
        "the knowledge graph is an SQLite store on disk with no node limit; similar reports merge "
        "into one node (kg_merge_threshold) instead of filling a fixed buffer, and nothing is "
        "ever dropped to make room. Remove the key"
    ),
    "kg_checkpoint_dir": (
        "snapshots of the knowledge graph live beside its store, in kg_path + '.checkpoints'; "
        "set kg_path to place them. Remove the key"
    ),
    "kg_save_interval": (
        "every write to the knowledge graph is a committed transaction (nothing waits for a "
        "save); snapshots are taken every kg_checkpoint_interval training steps, not every N "
        "node updates. Remove the key (and set kg_checkpoint_interval if you want snapshots)"
    ),
}


def _guide_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"MoEConfig: {key} (a key of the design guide) must be a bool, got {value!r}"
        )
    return value


def _gating_type(value: Any, d: dict) -> dict:
    """``gating_type`` -> ``strategy``; "dense" (every expert on every token, softmax weights) is
    top-k routing with ``k = num_experts``."""
    allowed = ("dense",) + STRATEGIES
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"MoEConfig: gating_type (a key of the design guide) must be one of {allowed}, "
            f"got {value!r}"
        )
    if value != "dense":
        return {"strategy": value}
    num_experts = d.get("num_experts", _default("num_experts"))
    if "k" in d and d["k"] != num_experts:
        raise ValueError(
            f"MoEConfig: gating_type='dense' routes every token to all num_experts={num_experts!r} "
            f"experts, but k (top_k_experts) is {d['k']!r}; leave k out or set it to num_experts"
        )
    return {"strategy": "topk", "k": num_experts}


def _default(field: str) -> Any:
    return next(f.default for f in dataclasses.fields(MoEConfig) if f.name == field)


def translate_guide_config(d: dict) -> dict:
    """``d`` with the design guide's config keys replaced by ours (see :data:`GUIDE_CONFIG_KEYS`
    and docs/compat.md); other keys pass through. A guide key and the field it maps to given
    together, or a key with no equivalent, raise ``ValueError`` saying why."""
    present = [key for key in GUIDE_CONFIG_KEYS if key in d]
    if not present:
        return d
    out = {k: v for k, v in d.items() if k not in GUIDE_CONFIG_KEYS}
    for key in present:
        target = GUIDE_CONFIG_KEYS[key]
        if target is None:
            raise ValueError(
                f"MoEConfig: {key} (a key of the design guide) has no equivalent: "
                f"{_NO_EQUIVALENT[key]}"
            )
        if target in out:
            raise ValueError(
                f"MoEConfig: got both {key!r} (the design guide's name for {target!r}) and "
                f"{target!r}; give one"
            )
    # gating_type last: "dense" reads k and num_experts.
    for key in sorted(present, key=lambda key: key == "gating_type"):
        value = d[key]
        if key == "gating_type":
            out.update(_gating_type(value, out))
        elif key == "use_amp":
            # bfloat16: autocast on CPUs and recent GPUs, no loss scaler needed (the guide's
            # float16 + GradScaler is amp_dtype="fp16").
            out["amp_dtype"] = "bf16" if _guide_bool(key, value) else "none"
        elif key == "use_compile":
            out["compile_mode"] = "default" if _guide_bool(key, value) else "none"
        else:
            out[GUIDE_CONFIG_KEYS[key]] = value
    return out


# ====================================================================== modules


def SupervisorGating(input_dim: int, num_experts: int, top_k: int = 3, **kwargs: Any) -> Supervisor:
    """The guide's gate: a :class:`Supervisor` routing ``input_dim``-wide tokens to ``top_k`` of
    ``num_experts`` experts (the guide's default ``top_k=3``). ``kwargs`` are the Supervisor's
    (``strategy=``, ``load_balance_coef=``, ...).

    Its forward is ours: ``forward(x [..., input_dim]) -> RoutingDecision`` (weights, ids, counts,
    ...), not the guide's ``(indices, weights)`` pair, and it takes no expert embeddings."""
    return Supervisor(input_dim, num_experts, top_k, **kwargs)


class BaseExpert(ExpertBank):
    """The guide's single expert: an :class:`ExpertBank` holding one expert (same parameters and
    state-dict names), applied to every row.

    ``forward(x [..., input_dim]) -> [..., input_dim]``; ``forward(x_sorted, offsets)`` (the
    ``Experts`` protocol, ``offsets = [0, M]``) works too. Experts here map ``d_model`` to
    ``d_model``: ``output_dim`` must be None or ``input_dim``. ``kwargs`` are the ExpertBank's
    (``activation=``, ``bias=``, ``layout=``, ...)."""

    def __init__(
        self,
        expert_id: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: Optional[int] = None,
        specialization: Optional[str] = None,
        **kwargs: Any,
    ):
        if output_dim is not None and output_dim != input_dim:
            raise ValueError(
                f"BaseExpert: output_dim must be None or input_dim={input_dim!r} (experts map "
                f"d_model to d_model; project outside them), got {output_dim!r}"
            )
        if specialization is not None and not isinstance(specialization, str):
            raise ValueError(
                f"BaseExpert: specialization must be None or a str, got {specialization!r}"
            )
        super().__init__(num_experts=1, d_model=input_dim, d_hidden=hidden_dim, **kwargs)
        self.expert_id = expert_id
        self.specialization = specialization

    def forward(self, x: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[..., d]`` -> ``[..., d]`` through the one expert (or, with ``offsets [2]`` int64,
        the ExpertBank contract on ``x [M, d]``)."""
        if offsets is not None:
            return super().forward(x, offsets)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"BaseExpert: x must be [..., {self.d_model}], got {tuple(x.shape)}")
        rows = x.reshape(-1, self.d_model)
        # [0, M] built on the device (no host-to-device copy: CUDA-graph and fullgraph safe).
        offsets = torch.arange(2, device=x.device, dtype=torch.int64) * rows.shape[0]
        return super().forward(rows, offsets).reshape(x.shape)


def _build_moe_layer(**kwargs: Any) -> MoELayer:
    return MoELayer.build(**kwargs)


def ExpertConstellation(
    experts: Optional[Sequence[BaseExpert]] = None,
    supervisor: Optional[Supervisor] = None,
    *,
    d_model: Optional[int] = None,
    d_hidden: Optional[int] = None,
    num_experts: Optional[int] = None,
    k: int = 2,
    **kwargs: Any,
) -> MoELayer:
    """The guide's constellation: a :class:`MoELayer`.

    Either the guide's form ``ExpertConstellation(experts, supervisor)``, with ``experts`` a list
    of :class:`BaseExpert` of one size and kind and ``supervisor`` a Supervisor over
    ``len(experts)`` experts: the layer routes with that supervisor and its expert bank starts
    from copies of the experts' weights (one grouped bank, not the list). Or sizes:
    ``ExpertConstellation(d_model=..., d_hidden=..., num_experts=..., k=2, **kwargs)`` with
    MoELayer's keyword arguments.

    Its forward is ours: ``forward(x [..., d]) -> (y [..., d], RoutingInfo)``; the draft reports
    are ``info.reports`` (per-expert device tensors, not a list of dicts).
    """
    if experts is None and supervisor is None:
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if v is None:
                raise ValueError(
                    f"ExpertConstellation: {name} is required (or pass experts and a supervisor)"
                )
        return _build_moe_layer(
            d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, **kwargs
        )
    if d_model is not None or d_hidden is not None or num_experts is not None:
        raise ValueError(
            "ExpertConstellation: give either experts and a supervisor, or d_model, d_hidden "
            "and num_experts, not both"
        )
    return _constellation_of(list(experts or ()), supervisor, kwargs)


def _constellation_of(experts: list, supervisor: Any, kwargs: dict) -> MoELayer:
    if not experts or not all(isinstance(e, BaseExpert) for e in experts):
        raise ValueError(
            "ExpertConstellation: experts must be a non-empty list of BaseExpert, got "
            f"{[type(e).__name__ for e in experts]}"
        )
    if not isinstance(supervisor, Router):
        raise ValueError(
            "ExpertConstellation: supervisor must be a router (a Supervisor or any module with "
            f"the Router protocol), got {type(supervisor).__name__}"
        )
    first = experts[0]
    kind = ("d_model", "d_hidden", "activation", "layout")

    def describe(e):
        return {a: getattr(e, a) for a in kind} | {"bias": e.b_out is not None}

    for i, e in enumerate(experts):
        if describe(e) != describe(first):
            raise ValueError(
                f"ExpertConstellation: experts[{i}] is {describe(e)}, experts[0] is "
                f"{describe(first)}; the experts of one layer share their size and kind"
            )
    if supervisor.num_experts != len(experts):
        raise ValueError(
            f"ExpertConstellation: supervisor routes to {supervisor.num_experts} experts, got "
            f"{len(experts)} experts"
        )
    layer = _build_moe_layer(
        d_model=first.d_model,
        d_hidden=first.d_hidden,
        num_experts=len(experts),
        k=supervisor.slots_per_token,
        router=supervisor,
        activation=first.activation,
        bias=first.b_out is not None,
        layout=first.layout,
        **kwargs,
    )
    with torch.no_grad():
        for name, param in layer.experts.named_parameters():
            for e, expert in enumerate(experts):
                param[e].copy_(expert.get_parameter(name)[0])
    return layer


def LibrarianCurator(
    graph: KnowledgeGraph, similarity_threshold: float = 0.85, **kwargs: Any
) -> Librarian:
    """The guide's librarian: a :class:`Librarian` that deduplicates reports at cosine
    ``similarity_threshold`` (its ``dedup_threshold``; the guide's default 0.85) and files them
    into ``graph``. ``kwargs`` are the Librarian's.

    The guide's librarian took an ``embedding_dim`` and kept the graph elsewhere; ours writes into
    a :class:`KnowledgeGraph` store, so pass one (``KnowledgeGraph.open(path, dim=...)``)."""
    if not isinstance(graph, KnowledgeGraph):
        raise ValueError(
            "LibrarianCurator: graph must be a KnowledgeGraph (the librarian files reports into "
            "a store: KnowledgeGraph.open(path, dim=embedding_dim)), got "
            f"{type(graph).__name__} {graph!r:.40}"
        )
    return Librarian(graph, dedup_threshold=similarity_threshold, **kwargs)


def FullyOptimizedMoESystem(config: Union[MoEConfig, dict]) -> MixtureOfExpertsSystem:
    """The guide's optimised system: a :class:`MixtureOfExpertsSystem`. ``config`` is a
    :class:`MoEConfig` or a dict in either vocabulary (the guide's ``use_compile``,
    ``use_cuda_graph``, ``use_amp`` set ``compile_mode``, ``cuda_graphs``, ``amp_dtype``, which
    ``predict`` and ``training_step`` honour)."""
    if isinstance(config, dict):
        config = MoEConfig.from_dict(config)
    if not isinstance(config, MoEConfig):
        raise ValueError(
            f"FullyOptimizedMoESystem: config must be a MoEConfig or a dict, got "
            f"{type(config).__name__}"
        )
    return MixtureOfExpertsSystem(config)
