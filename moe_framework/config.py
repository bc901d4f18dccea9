"""MoEConfig: every knob of a :class:`~moe_framework.system.MixtureOfExpertsSystem`, validated.

A config is checked once, at construction: a bad value or a combination that cannot work raises a
``ValueError`` naming the field, what it must be and what it got, so a mistake surfaces before any
weight is allocated. It round-trips through JSON (``to_json`` / ``from_json``); unknown keys are an
error, not silently dropped. Field reference: docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

__all__ = [
    "MoEConfig",
    "ACTIVATIONS",
    "ROUTING_STRATEGIES",
    "COMPILE_MODES",
    "AMP_DTYPES",
    "INDEX_TYPES",
]

# Kept in sync with the Supervisor / ExpertBank / KnowledgeGraph choices; a test checks that
# every value listed here is accepted by the module it is forwarded to.
ACTIVATIONS = ("swiglu", "gelu")
ROUTING_STRATEGIES = (
    "topk",
    "topk_then_softmax",
    "switch",
    "noisy_topk",
    "grouped_sigmoid",
    "expert_choice",
    "attention",
)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AMP_DTYPES = ("none", "bf16", "fp16")
INDEX_TYPES = ("flat", "hnsw", "ivfpq")

_FORMAT = "moe_framework.MoEConfig/1"


def _bad(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"MoEConfig: {name} must be {expected}, got {got!r}")


@dataclass
class MoEConfig:
    """Configuration of a :class:`~moe_framework.system.MixtureOfExpertsSystem`.

    Input: ``input_dim`` (dense features [B, input_dim] or [B, S, input_dim], linearly projected
    to ``d_model``), or ``vocab_size`` (token ids [B] or [B, S], embedded), or neither (features
    already [..., d_model]). Output:
    ``output_dim`` logits per position (classes or vocabulary). See docs/configuration.md for
    every field.
    """

    # ---- dimensions
    d_model: int = 64
    d_hidden: int = 128
    num_layers: int = 2
    input_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    output_dim: int = 10
    dropout: float = 0.0
    norm_eps: float = 1e-5
    # ---- experts
    num_experts: int = 8
    top_k: int = 2
    activation: str = "swiglu"
    specialisation_names: Optional[Tuple[str, ...]] = None
    num_shared_experts: int = 0
    # ---- routing
    routing_strategy: str = "topk"
    router_temperature: float = 1.0
    capacity_factor: Optional[float] = None
    router_jitter: float = 0.0
    router_noise_eps: Optional[float] = None
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.0
    causal: bool = False
    # ---- losses
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    # ---- librarian
    dedup_threshold: float = 0.95
    consolidation_interval: int = 0
    # ---- knowledge graph
    kg_path: Optional[str] = None
    kg_merge_threshold: float = 0.9
    kg_checkpoint_interval: int = 0
    kg_snapshots_kept: int = 3
    kg_index_type: str = "flat"
    # ---- optimisations
    compile_mode: str = "none"
    cuda_graphs: bool = False
    amp_dtype: str = "none"
    gradient_checkpointing: bool = False
    grad_clip_norm: Optional[float] = 1.0
    # ---- shapes
    max_batch_size: int = 64
    max_seq_len: int = 1
    # ---- reproducibility
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.specialisation_names, list):
            self.specialisation_names = tuple(self.specialisation_names)
        self._check_types()
        self._check_ranges()
        self._check_combinations()

    # ------------------------------------------------------------------ validation

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            t = str(f.type)  # a string: this module uses postponed annotations
            optional = t.startswith("Optional[")
            base = t[len("Optional[") : -1] if optional else t
            if v is None:
                if not optional:
                    raise _bad(f.name, f"a {base} (not None)", v)
                continue
            if base == "int":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise _bad(f.name, "an int", v)
            elif base == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise _bad(f.name, "a number", v)
                if not math.isfinite(v):
                    raise _bad(f.name, "finite", v)
                setattr(self, f.name, float(v))
            elif base == "bool":
                if not isinstance(v, bool):
                    raise _bad(f.name, "a bool", v)
            elif base == "str":
                if not isinstance(v, str):
                    raise _bad(f.name, "a str", v)
        names = self.specialisation_names
        if names is not None and not all(isinstance(n, str) and n for n in names):
            raise _bad("specialisation_names", "None or a list of non-empty str", names)

    def _check_ranges(self) -> None:
        def positive(name):
            if getattr(self, name) < 1:
                raise _bad(name, ">= 1", getattr(self, name))

        for name in (
            "d_model",
            "d_hidden",
            "num_layers",
            "output_dim",
            "num_experts",
            "top_k",
            "num_groups",
            "topk_groups",
            "max_batch_size",
            "max_seq_len",
            "kg_snapshots_kept",
        ):
            positive(name)
        for name in ("input_dim", "vocab_size"):
            if getattr(self, name) is not None:
                positive(name)
        for name in (
            "num_shared_experts",
            "consolidation_interval",
            "kg_checkpoint_interval",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise _bad(name, ">= 0", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", "in [0, 1)", self.dropout)
        if self.norm_eps <= 0:
            raise _bad("norm_eps", "> 0", self.norm_eps)
        choices = (
            ("activation", ACTIVATIONS),
            ("routing_strategy", ROUTING_STRATEGIES),
            ("compile_mode", COMPILE_MODES),
            ("amp_dtype", AMP_DTYPES),
            ("kg_index_type", INDEX_TYPES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise _bad(name, f"one of {allowed}", getattr(self, name))
        if self.router_temperature <= 0:
            raise _bad("router_temperature", "> 0", self.router_temperature)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise _bad("capacity_factor", "None (dropless) or > 0", self.capacity_factor)
        if not 0.0 <= self.router_jitter < 1.0:
            raise _bad("router_jitter", "in [0, 1)", self.router_jitter)
        for name in ("router_noise_eps", "bias_update_rate", "aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise _bad(name, ">= 0", getattr(self, name))
        if self.routed_scaling_factor <= 0:
            raise _bad("routed_scaling_factor", "> 0", self.routed_scaling_factor)
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise _bad("dedup_threshold", "a cosine in (0, 1]", self.dedup_threshold)
        if not 0.0 <= self.kg_merge_threshold <= 1.0:
            raise _bad("kg_merge_threshold", "a cosine in [0, 1]", self.kg_merge_threshold)
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise _bad("grad_clip_norm", "None (no clipping) or > 0", self.grad_clip_norm)

    def _check_combinations(self) -> None:
        if self.input_dim is not None and self.vocab_size is not None:
            raise ValueError(
                "MoEConfig: set at most one of input_dim (dense features) or vocab_size (token "
                f"ids), got input_dim={self.input_dim!r}, vocab_size={self.vocab_size!r}"
            )
        E, k = self.num_experts, self.top_k
        if k > E:
            raise _bad("top_k", f"<= num_experts={E}", k)
        if self.routing_strategy == "switch" and k != 1:
            raise _bad("top_k", "1 for routing_strategy='switch' (top-1 routing)", k)
        if E % self.num_groups != 0:
            raise _bad("num_groups", f"a divisor of num_experts={E}", self.num_groups)
        if self.topk_groups > self.num_groups:
            raise _bad("topk_groups", f"<= num_groups={self.num_groups}", self.topk_groups)
        reachable = self.topk_groups * (E // self.num_groups)
        if k > reachable:
            raise _bad(
                "top_k",
                f"<= topk_groups * experts per group = {reachable} (group-limited routing "
                "cannot reach more experts)",
                k,
            )
        if self.routing_strategy == "expert_choice":
            if self.causal:
                raise ValueError(
                    "MoEConfig: routing_strategy='expert_choice' cannot be used with causal=True "
                    "(each expert ranks all tokens of the batch, future ones included)"
                )
            if self.bias_update_rate > 0:
                raise _bad(
                    "bias_update_rate",
                    "0 for routing_strategy='expert_choice' (balanced by construction)",
                    self.bias_update_rate,
                )
            if self.num_groups > 1:
                raise _bad("num_groups", "1 for routing_strategy='expert_choice'", self.num_groups)
        names = self.specialisation_names
        if names is not None:
            if len(names) != E:
                raise _bad("specialisation_names", f"one name per expert ({E} names)", list(names))
            if len(set(names)) != len(names):
                raise _bad("specialisation_names", "distinct names", list(names))
        if self.kg_path is None:
            if self.consolidation_interval > 0:
                raise _bad(
                    "kg_path",
                    f"set when consolidation_interval={self.consolidation_interval} > 0 "
                    "(consolidation writes into the knowledge-graph store)",
                    None,
                )
            if self.kg_checkpoint_interval > 0:
                raise _bad(
                    "kg_path",
                    f"set when kg_checkpoint_interval={self.kg_checkpoint_interval} > 0",
                    None,
                )
        if self.cuda_graphs and self.compile_mode == "reduce-overhead":
            raise ValueError(
                "MoEConfig: cuda_graphs=True cannot be combined with compile_mode="
                "'reduce-overhead', which already captures CUDA graphs (pick one)"
            )
        if self.routing_strategy != "noisy_topk" and self.router_noise_eps is not None:
            raise _bad(
                "router_noise_eps",
                "None unless routing_strategy='noisy_topk' (it has no effect with "
                f"{self.routing_strategy!r})",
                self.router_noise_eps,
            )

    # ------------------------------------------------------------------ derived

    @property
    def expert_names(self) -> Tuple[str, ...]:
        """Expert names: ``specialisation_names`` or ``expert_0 ... expert_{E-1}``."""
        if self.specialisation_names is not None:
            return tuple(self.specialisation_names)
        return tuple(f"expert_{i}" for i in range(self.num_experts))

    def replace(self, **changes: Any) -> MoEConfig:
        """A validated copy with some fields changed."""
        d = self.to_dict()
        d.pop("format")
        d.update(changes)
        return MoEConfig.from_dict(d)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """Plain JSON-able dict (with a ``format`` tag)."""
        d = {"format": _FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        """Inverse of :meth:`to_dict`; unknown keys or a foreign ``format`` raise ValueError."""
        if not isinstance(d, dict):
            raise _bad("JSON document", "an object", type(d).__name__)
        d = dict(d)
        fmt = d.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise _bad("format", repr(_FORMAT), fmt)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The config as a JSON string; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            tmp = os.fspath(path) + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]) -> MoEConfig:
        """Parse a JSON string, or read a file when given a path to an existing file."""
        s = os.fspath(text_or_path)
        if not s.lstrip().startswith("{") and os.path.exists(s):
            with open(s, encoding="utf-8") as f:
                s = f.read()
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"MoEConfig.from_json: not valid JSON ({exc})") from None
        return cls.from_dict(d)
