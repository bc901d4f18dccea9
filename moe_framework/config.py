"""MoEConfig: every knob of a :class:`~moe_framework.system.MixtureOfExpertsSystem`, validated.

A config is checked once, at construction: a bad value or a combination that cannot work raises a
``ValueError`` naming the field, what it must be and what it got, so a mistake surfaces before any
weight is allocated. It round-trips through JSON (``to_json`` / ``from_json``); unknown keys are an
error, not silently dropped. Field reference: docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import reprlib
import stat
import warnings
from dataclasses import InitVar, dataclass
from typing import Any, BinaryIO, Optional, Tuple, Union

from .options import ACTIVATIONS, AMP_DTYPES, COMPILE_MODES, INDEX_TYPES, STRATEGIES

__all__ = [
    "MoEConfig",
    "ACTIVATIONS",
    "ROUTING_STRATEGIES",
    "RENAMED_FIELDS",
    "STRATEGIES",
    "COMPILE_MODES",
    "AMP_DTYPES",
    "INDEX_TYPES",
    "SIZE_LIMITS",
]

# The modules' own choices (one definition, see options.py); ROUTING_STRATEGIES is the name this
# module has always exported.
ROUTING_STRATEGIES = STRATEGIES

_FORMAT = "moe_framework.MoEConfig/1"

# Upper bounds of the size fields: far above any model this package can train, low enough that a
# hostile or mistyped config.json is refused before anything is allocated or built (a million
# layers would take hours just to construct, even on the meta device).
SIZE_LIMITS = {
    "d_model": 1 << 16,
    "d_hidden": 1 << 18,
    "num_layers": 1024,
    "input_dim": 1 << 24,
    "vocab_size": 1 << 24,
    "output_dim": 1 << 24,
    "num_experts": 1 << 16,
    "num_shared_experts": 1024,
    "max_batch_size": 1 << 20,
}
# A config value is at most a list of strings (depth 2 inside the document).
_MAX_JSON_DEPTH = 8
# config.json is a few KB; a larger "config" is not one (and must not be read into memory whole).
MAX_CONFIG_BYTES = 16 << 20

# repr of a bad value in an error message: bounded in length and nesting depth, so a huge or
# deeply nested value cannot make the error itself fail (repr of a 10k-deep list raises
# RecursionError).
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlevel = 3


def _bad(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"MoEConfig: {name} must be {expected}, got {_short.repr(got)}")


def open_regular_file(path: Union[str, os.PathLike], what: str) -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything but a regular file.

    The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor: a
    FIFO opens at once instead of blocking until a writer appears, and no swap of the path between
    a check and the open can slip a FIFO, device or directory through. ``what`` names the caller
    in the error (e.g. ``"MoEConfig.from_json"``).
    """
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device or socket"
            )
            raise ValueError(f"{what}: {p} is {kind}, expected a regular file")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _warn_max_seq_len(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad("max_seq_len", "an int >= 1 (deprecated: leave it out)", value)
    # The model has no positional state and no buffer sized by the sequence length, so the field
    # never limited anything. The old default (written into every saved config) only concerns
    # developers; another value was set by someone who expected a limit, so they are told.
    category = DeprecationWarning if value == 1 else FutureWarning
    warnings.warn(
        f"MoEConfig: max_seq_len={value} is deprecated and ignored: the model has no positional "
        "state, so sequences of any length run and nothing was ever limited by it; leave it out "
        "(saving the model again writes its config without it)",
        category,
        stacklevel=5,
    )


def _json_depth_field(text: str, limit: int) -> Optional[tuple]:
    """``(field, depth)`` of the first top-level field of a JSON object nested deeper than
    ``limit`` (``field`` is None outside any field), or None. One pass over the strings and
    brackets, no recursion: ``json.loads`` itself raises RecursionError on deep documents."""
    depth = 0
    field = None
    expect_key = False
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]', text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            expect_key = tok == "{" and depth == 1
            if depth > limit:
                return field, depth
        elif tok in "]}":
            depth -= 1
        elif tok == ",":
            expect_key = depth == 1
        elif tok == ":":
            expect_key = False
        elif expect_key:
            field = tok[1:-1]
            expect_key = False
    return None


@dataclass
class MoEConfig:
    """Configuration of a :class:`~moe_framework.system.MixtureOfExpertsSystem`.

    Input: ``input_dim`` (dense features [B, input_dim] or [B, S, input_dim], linearly projected
    to ``d_model``), or ``vocab_size`` (token ids [B] or [B, S], embedded), or neither (features
    already [..., d_model]). Output:
    ``output_dim`` logits per position (classes or vocabulary). See docs/configuration.md for
    every field.

    Fields carry the argument names of the modules they configure: ``k``, ``strategy``,
    ``temperature``, ``load_balance_coef``, ... are the :class:`~moe_framework.supervisor.Supervisor`
    / ``MoELayer`` arguments of the same name; knowledge-graph fields are ``kg_`` + the
    ``KnowledgeGraph.open`` argument (``kg_merge_threshold``, ``kg_index_type``,
    ``kg_keep_checkpoints``). The names used before (``top_k``, ``routing_strategy``, ... see
    :data:`RENAMED_FIELDS`) are still accepted, with a warning naming the new field.
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
    # ---- experts (MoELayer / ExpertBank arguments)
    num_experts: int = 8
    k: int = 2
    activation: str = "swiglu"
    specialisation_names: Optional[Tuple[str, ...]] = None
    num_shared_experts: int = 0
    # ---- routing (Supervisor arguments)
    strategy: str = "topk"
    temperature: float = 1.0
    capacity_factor: Optional[float] = None
    jitter_eps: float = 0.0
    # None: the Supervisor's default; only meaningful with strategy="noisy_topk"
    noise_eps: Optional[float] = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.0
    causal: bool = False
    track_stats: bool = False
    # ---- losses (Supervisor arguments)
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    # ---- librarian
    dedup_threshold: float = 0.95
    consolidation_interval: int = 0
    # ---- knowledge graph ("kg_" + the KnowledgeGraph.open argument)
    kg_path: Optional[str] = None
    kg_merge_threshold: float = 0.9
    kg_checkpoint_interval: int = 0
    kg_keep_checkpoints: int = 3
    kg_index_type: str = "flat"
    # ---- optimisations
    compile_mode: str = "none"
    cuda_graphs: bool = False
    amp_dtype: str = "none"
    gradient_checkpointing: bool = False
    grad_clip_norm: Optional[float] = 1.0
    # ---- shapes
    max_batch_size: int = 64
    # ---- reproducibility
    seed: int = 0
    # ---- deprecated: accepted (with a warning) so older configs still load, never stored
    max_seq_len: InitVar[Optional[int]] = None

    def __post_init__(self, max_seq_len: Optional[int] = None) -> None:
        if max_seq_len is not None:
            _warn_max_seq_len(max_seq_len)
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
        if names is not None and not (
            isinstance(names, tuple) and all(isinstance(n, str) and n for n in names)
        ):
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
            "k",
            "n_group",
            "topk_group",
            "max_batch_size",
            "kg_keep_checkpoints",
        ):
            positive(name)
        for name in ("input_dim", "vocab_size"):
            if getattr(self, name) is not None:
                positive(name)
        for name, limit in SIZE_LIMITS.items():
            v = getattr(self, name)
            if v is not None and v > limit:
                raise _bad(name, f"<= {limit} (a sanity bound of MoEConfig)", v)
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
            ("strategy", STRATEGIES),
            ("compile_mode", COMPILE_MODES),
            ("amp_dtype", AMP_DTYPES),
            ("kg_index_type", INDEX_TYPES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise _bad(name, f"one of {allowed}", getattr(self, name))
        if self.temperature <= 0:
            raise _bad("temperature", "> 0", self.temperature)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise _bad("capacity_factor", "None (dropless) or > 0", self.capacity_factor)
        if not 0.0 <= self.jitter_eps < 1.0:
            raise _bad("jitter_eps", "in [0, 1)", self.jitter_eps)
        for name in ("noise_eps", "bias_update_rate", "load_balance_coef", "z_loss_coef"):
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
        E, k = self.num_experts, self.k
        if k > E:
            raise _bad("k", f"<= num_experts={E}", k)
        if self.strategy == "switch" and k != 1:
            raise _bad("k", "1 for strategy='switch' (top-1 routing)", k)
        if E % self.n_group != 0:
            raise _bad("n_group", f"a divisor of num_experts={E}", self.n_group)
        if self.topk_group > self.n_group:
            raise _bad("topk_group", f"<= n_group={self.n_group}", self.topk_group)
        reachable = self.topk_group * (E // self.n_group)
        if k > reachable:
            raise _bad(
                "k",
                f"<= topk_group * experts per group = {reachable} (group-limited routing "
                "cannot reach more experts)",
                k,
            )
        if self.strategy == "expert_choice":
            if self.causal:
                raise ValueError(
                    "MoEConfig: strategy='expert_choice' cannot be used with causal=True "
                    "(each expert ranks all tokens of the batch, future ones included)"
                )
            if self.bias_update_rate > 0:
                raise _bad(
                    "bias_update_rate",
                    "0 for strategy='expert_choice' (balanced by construction)",
                    self.bias_update_rate,
                )
            if self.n_group > 1:
                raise _bad("n_group", "1 for strategy='expert_choice'", self.n_group)
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
        if self.strategy != "noisy_topk" and self.noise_eps is not None:
            raise _bad(
                "noise_eps",
                f"None unless strategy='noisy_topk' (it has no effect with {self.strategy!r})",
                self.noise_eps,
            )

    # ------------------------------------------------------------------ derived

    @property
    def expert_names(self) -> Tuple[str, ...]:
        """Expert names: ``specialisation_names`` or ``expert_0 ... expert_{E-1}``."""
        if self.specialisation_names is not None:
            return tuple(self.specialisation_names)
        return tuple(f"expert_{i}" for i in range(self.num_experts))

    def replace(self, **changes: Any) -> MoEConfig:
        """A validated copy with some fields changed (old field names are accepted, with a
        warning, as in the constructor)."""
        changes = _rename_old_fields(changes, FutureWarning, "")
        d = self.to_dict()
        d.pop("format")
        d.update(changes)
        return MoEConfig.from_dict(d)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """Plain JSON-able dict (with a ``format`` tag), in the current field names."""
        d: dict = {"format": _FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        """Inverse of :meth:`to_dict`; unknown keys or a foreign ``format`` raise ValueError.

        Also accepted: the field names used before (:data:`RENAMED_FIELDS`, a
        ``DeprecationWarning`` names the new field; configs saved by earlier versions use them)
        and the original design guide's keys (``hidden_dim``, ``top_k_experts``, ``use_amp``, ...:
        see :mod:`moe_framework.compat`), translated to ours."""
        if not isinstance(d, dict):
            raise _bad("JSON document", "an object", type(d).__name__)
        d = dict(d)
        fmt = d.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise _bad("format", repr(_FORMAT), fmt)
        d = _rename_old_fields(
            d, DeprecationWarning, "; saving the config again writes the new names"
        )
        from .compat import translate_guide_config  # late: compat builds on this module

        d = translate_guide_config(d)
        known = {f.name for f in dataclasses.fields(cls)} | {"max_seq_len"}
        unknown = sorted((k for k in d if k not in known), key=str)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The config as a JSON string; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            write_file_atomically(path, text.encode("utf-8"))
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]) -> MoEConfig:
        """Parse a JSON string, or read a file when given a path to an existing file (a regular
        file of at most :data:`MAX_CONFIG_BYTES`: a FIFO or device is refused, never waited on).
        Malformed or absurdly nested JSON is a ``ValueError``."""
        s = os.fspath(text_or_path)
        if not s.lstrip().startswith("{") and os.path.lexists(s):
            s = read_config_text(s, "MoEConfig.from_json")
        return cls.from_dict(parse_config_json(s, "MoEConfig.from_json"))


# Field names used before MoEConfig took the modules' argument names. Accepted from keyword
# arguments, dicts and JSON (configs saved by earlier versions have them) with a warning naming
# the new field; never written. Readable and settable as deprecated attributes.
RENAMED_FIELDS = {
    "top_k": "k",
    "routing_strategy": "strategy",
    "router_temperature": "temperature",
    "router_jitter": "jitter_eps",
    "router_noise_eps": "noise_eps",
    "num_groups": "n_group",
    "topk_groups": "topk_group",
    "aux_loss_weight": "load_balance_coef",
    "z_loss_weight": "z_loss_coef",
    "kg_snapshots_kept": "kg_keep_checkpoints",
}


def _rename_old_fields(d: dict, category: type, hint: str) -> dict:
    """``d`` with old field names replaced by the new ones (one warning for all of them, pointing
    at the caller of the public method that called this). Both names at once is an error."""
    old = [name for name in d if name in RENAMED_FIELDS]
    if not old:
        return d
    d = dict(d)
    for name in old:
        new = RENAMED_FIELDS[name]
        if new in d:
            raise ValueError(
                f"MoEConfig: got both {name!r} (the old name of {new!r}) and {new!r}; "
                f"give only {new!r}"
            )
        d[new] = d.pop(name)
    pairs = ", ".join(f"{name} -> {RENAMED_FIELDS[name]}" for name in old)
    warnings.warn(
        f"MoEConfig: renamed field(s) {pairs} (the modules' argument names): use the new "
        f"name(s){hint}",
        category,
        stacklevel=3,
    )
    return d


def _accept_old_field_names(init):
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Code that passes an old name should change it: a FutureWarning is shown to users.
        init(self, *args, **_rename_old_fields(kwargs, FutureWarning, ""))

    return __init__


def _deprecated_alias(old: str, new: str) -> property:
    def get(self):
        warnings.warn(
            f"MoEConfig.{old} is deprecated: read MoEConfig.{new}", DeprecationWarning, stacklevel=2
        )
        return getattr(self, new)

    def set_(self, value):
        warnings.warn(
            f"MoEConfig.{old} is deprecated: set MoEConfig.{new}", DeprecationWarning, stacklevel=2
        )
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated alias of :attr:`{new}`.")


MoEConfig.__init__ = _accept_old_field_names(MoEConfig.__init__)  # type: ignore[method-assign]
for _old, _new in RENAMED_FIELDS.items():
    setattr(MoEConfig, _old, _deprecated_alias(_old, _new))
del _old, _new


def read_config_text(path: Union[str, os.PathLike], what: str) -> str:
    """The text of a config file: a regular file (see :func:`open_regular_file`) of at most
    :data:`MAX_CONFIG_BYTES`, UTF-8."""
    with open_regular_file(path, what) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{what}: {os.fspath(path)} is larger than {MAX_CONFIG_BYTES} bytes, not a config"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {os.fspath(path)} is not UTF-8 text ({exc})") from None


def parse_config_json(text: str, what: str) -> Any:
    """``json.loads`` of a config document, with nesting bounded before parsing (the parser
    would raise RecursionError) and errors as ``ValueError`` naming ``what`` and the field."""
    deep = _json_depth_field(text, _MAX_JSON_DEPTH)
    if deep is not None:
        field, depth = deep
        where = f"field {field!r}" if field is not None else "the document"
        raise ValueError(
            f"{what}: {where} is nested deeper than {_MAX_JSON_DEPTH} levels (got at least "
            f"{depth}); a config value is a scalar or a list of strings"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:  # unreachable with the depth bound above; kept as a clear error
        raise ValueError(f"{what}: JSON nested too deeply") from None


def write_file_atomically(path: Union[str, os.PathLike], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one:
    a temporary file beside it (mode ``0o666`` minus the umask, like any other tool), fsync,
    ``os.replace``, fsync of the directory."""
    p = os.fspath(path)
    tmp = os.path.join(os.path.dirname(p) or ".", f".{os.path.basename(p)}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):  # a leftover of a crash (or a planted link)
        os.remove(tmp)
    # O_EXCL: a fresh file, so its mode comes from 0o666 and the umask alone.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(p) or ".")


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """fsync a directory, so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
