"""Saving and loading a :class:`~moe_framework.system.MixtureOfExpertsSystem`: safetensors
weights, JSON config, the SQLite knowledge-graph store. No pickle anywhere.

:func:`save_system` replaces each file atomically and never copies the live store onto itself;
:func:`load_system` trusts nothing in the directory (symlinks may point only inside it, FIFOs are
refused, the weights' header is checked against the model the config describes before any
memory is allocated). ``MixtureOfExpertsSystem.save`` / ``.load`` call them.
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
from typing import Optional, Union

import torch

from .config import MoEConfig, fsync_dir, open_regular_file, parse_config_json, read_config_text
from .kg.paths import same_file, store_companions, touches_store

__all__ = ["MAX_PARAMETERS", "load_system", "save_system"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_KG = "knowledge.sqlite"
_FORMAT = "moe_framework.MixtureOfExpertsSystem/1"
_LOAD = "MixtureOfExpertsSystem.load"
# Default bound of load(max_parameters=...): elements of the model state (2^32, 16 GiB in fp32).
MAX_PARAMETERS = 1 << 32


def save_system(model, directory: Union[str, os.PathLike]) -> None:
    """Write ``model`` to ``directory``: see ``MixtureOfExpertsSystem.save``."""
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    weights, config, dst = (os.path.join(d, n) for n in (_WEIGHTS, _CONFIG, _KG))
    store = _store_path(model)
    if store is not None:
        for path in (weights, config):
            if touches_store(path, store):
                raise ValueError(
                    f"MixtureOfExpertsSystem.save: writing {path} would overwrite the live "
                    f"knowledge-graph store {store} (or one of its files); save elsewhere"
                )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_safetensors(weights, state, {"format": _FORMAT, "step": str(model.step)})
    model.config.to_json(config)
    if store is not None:
        _save_store(model, store, dst)


def _store_path(model) -> Optional[str]:
    """The live store's path as its writer spells it (None when there is no store yet)."""
    if model._kg is not None:
        return model._kg.path
    src = model.config.kg_path
    return src if src is not None and os.path.exists(src) else None


def _save_store(model, store: str, dst: str) -> None:
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
    if model._kg is not None:
        model._kg.backup(dst)
    else:
        from .knowledge_graph import KnowledgeGraph

        with KnowledgeGraph.open(store, readonly=True) as kg:
            kg.backup(dst)


def load_system(
    cls,
    directory: Union[str, os.PathLike],
    *,
    map_location: Union[str, torch.device] = "cpu",
    kg_path: Optional[str] = None,
    allow_nonfinite: bool = False,
    max_parameters: int = MAX_PARAMETERS,
):
    """Rebuild a ``cls`` (a MixtureOfExpertsSystem) saved in ``directory``: see
    ``MixtureOfExpertsSystem.load``."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{_LOAD}: {d} is not a directory (expected one written by save())")
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
    weights = _model_file(d, _WEIGHTS)
    with open_regular_file(weights, _LOAD) as f:
        header = _SafetensorsHeader.read(f, weights)
        header.check_saved_system()
        step = header.step()
        adapted = _adapted_shapes(header)
        header.check_against(_expected_state(cls, cfg, max_parameters, adapted))
        # Only now, with every shape known to match a file of this size, is memory allocated.
        model = cls(cfg)
        _prepare_adapted(model, adapted)
        header.read_into(f, model.state_dict(), allow_nonfinite)
    model.step = step
    return model.to(map_location)


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


# The keys of a layer resized by moe_framework.adaptation whose shapes ``prepare_load`` reads.
_ADAPTED_PARENT = "supervisor.parent"
_ADAPTED_KEYS = (_ADAPTED_PARENT, "supervisor.inner.gate.weight")


def _adapted_shapes(header: _SafetensorsHeader) -> dict:
    """``name -> meta tensor`` (shape only, no memory) of the saved adapted layers' size keys."""
    out = {}
    for name, entry in header.tensors.items():
        if not name.endswith(_ADAPTED_KEYS):
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(_is_int(v) and v >= 0 for v in shape)):
            raise ValueError(
                f"{_LOAD}: {header.path}: tensor {name!r} shape {shape!r} is not a list of "
                "non-negative ints"
            )
        out[name] = torch.empty(shape, device="meta")
    return out


def _prepare_adapted(model, adapted: dict) -> None:
    """Give each layer saved after ``split_expert`` / ``merge_experts`` its stored sizes
    (``adaptation.prepare_load``) so the saved state loads into it."""
    from .adaptation import prepare_load
    from .moe_layer import MoELayer

    for name in adapted:
        if not name.endswith(_ADAPTED_PARENT):
            continue
        prefix = name[: -len(_ADAPTED_PARENT)]
        try:
            layer = model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            layer = None
        if not isinstance(layer, MoELayer):
            raise ValueError(
                f"{_LOAD}: tensor {name!r} belongs to no MoELayer of the model config.json "
                "describes"
            )
        prepare_load(layer, adapted, prefix)


def _expected_state(cls, cfg: MoEConfig, max_parameters: int, adapted: dict) -> dict:
    """``name -> (shape, dtype)`` of the model state ``cfg`` describes (with the adapted layers'
    stored sizes), from a model built on the meta device (no memory), checked against
    ``max_parameters``."""
    with torch.device("meta"):
        skeleton = cls(
            cfg.replace(kg_path=None, consolidation_interval=0, kg_checkpoint_interval=0)
        )
        _prepare_adapted(skeleton, adapted)
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
