"""Where the weights of offloaded experts live: host memory or a memory-mapped safetensors file.

Used by :class:`moe_framework.offload.OffloadedExperts`. A storage holds, for each expert ``e``,
the tensors ``w_in`` (the first projection: ``w_gate_up`` for SwiGLU, ``w_in`` for GELU),
``w_out`` and, with biases, ``b_in`` / ``b_out``, with the shapes of one expert of an
:class:`~moe_framework.experts.ExpertBank` (its stacked tensors without the leading ``E``).

* :class:`HostExpertStorage`: the stacked tensors in host memory (pinned, for asynchronous
  copies, when the compute device is CUDA).
* :class:`DiskExpertStorage`: a safetensors file (written by :func:`write_expert_file`) mapped
  into memory; each expert's tensors are read from the mapping when the expert is loaded, and
  the pages are then given back (``madvise(MADV_DONTNEED)``), so the file's bytes never add up in
  the process's resident memory. The file is a plain safetensors file (the ``safetensors``
  library reads it) with tensors named ``"{e}.w_in"``, ``"{e}.w_out"``, ``"{e}.b_in"``,
  ``"{e}.b_out"`` and the expert configuration in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import stat
import warnings
from typing import Optional, Union

import torch

from .config import fsync_dir

__all__ = [
    "EXPERT_FILE_FORMAT",
    "DiskExpertStorage",
    "HostExpertStorage",
    "expert_tensor_names",
    "write_expert_file",
]

EXPERT_FILE_FORMAT = "moe_framework.offloaded_experts/1"

_ST_CODE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
_ST_DTYPE = {v: k for k, v in _ST_CODE.items()}
_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_FAULT_AROUND_MARGIN = 256 * 1024
_CONFIG_KEYS = ("num_experts", "d_model", "d_hidden", "activation", "layout", "bias", "dtype")


def expert_tensor_names(bias: bool) -> tuple:
    """The per-expert tensor names of a storage: ``("w_in", "w_out")`` plus the two biases."""
    return ("w_in", "w_out", "b_in", "b_out") if bias else ("w_in", "w_out")


def _bank_tensors(bank) -> dict:
    """The stacked ``[E, ...]`` tensors of an ExpertBank under the storage's names."""
    out = {"w_in": bank.weight_in, "w_out": bank.w_out}
    if bank.b_out is not None:
        out["b_in"], out["b_out"] = bank.bias_in, bank.b_out
    return {k: v.detach() for k, v in out.items()}


def bank_config(bank) -> dict:
    """The configuration an offloaded copy of ``bank`` needs (saved in the file's metadata)."""
    return {
        "num_experts": bank.num_experts,
        "d_model": bank.d_model,
        "d_hidden": bank.d_hidden,
        "activation": bank.activation,
        "layout": bank.layout,
        "bias": bank.b_out is not None,
        "dtype": str(bank.w_out.dtype).replace("torch.", ""),
    }


class HostExpertStorage:
    """The experts' stacked tensors in host memory.

    Args:
        tensors: ``{"w_in": [E, ...], "w_out": [E, ...], ("b_in", "b_out")}``; CPU tensors are
            used as they are when contiguous (no copy) unless ``pin`` asks for pinned memory.
        config: the expert configuration (:func:`bank_config`).
        pin: copy into page-locked memory (for ``non_blocking`` host-to-device copies on CUDA).
    """

    def __init__(self, tensors: dict, config: dict, *, pin: bool = False):
        self.config = dict(config)
        self.pinned = bool(pin)
        self._t = {}
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self._t[name] = t.pin_memory() if pin else t
        self.names = tuple(self._t)
        self.shapes = {k: tuple(v.shape[1:]) for k, v in self._t.items()}
        self.dtype = self._t["w_out"].dtype
        self.expert_nbytes = sum(v[0].numel() * v.element_size() for v in self._t.values())

    def view(self, e: int, name: str) -> torch.Tensor:
        """Expert ``e``'s tensor ``name`` (a CPU view, no copy)."""
        if not self._t:
            raise RuntimeError("HostExpertStorage: the storage is closed")
        return self._t[name][e]

    def done(self, e: int) -> None:
        """Called after expert ``e`` was copied out (nothing to give back in memory)."""

    def close(self) -> None:
        self._t = {}


def write_expert_file(bank, path: Union[str, os.PathLike]) -> str:
    """Write the experts of an :class:`~moe_framework.experts.ExpertBank` to a safetensors file
    for :class:`DiskExpertStorage`; returns the path.

    Each expert's tensors are stored one after the other (one contiguous byte range per expert),
    streamed tensor by tensor (no second copy of the bank in memory). The write is atomic: a
    temporary file in the same folder, fsynced, then renamed over ``path``.
    """
    path = os.fspath(path)
    tensors = _bank_tensors(bank)
    config = bank_config(bank)
    dtype = tensors["w_out"].dtype
    if dtype not in _ST_CODE:
        raise ValueError(f"write_expert_file: dtype must be one of {list(_ST_CODE)}, got {dtype}")
    header: dict = {"__metadata__": {"format": EXPERT_FILE_FORMAT, "config": json.dumps(config)}}
    pos = 0
    order = []
    for e in range(config["num_experts"]):
        for name, t in tensors.items():
            n = t[e].numel() * t.element_size()
            header[f"{e}.{name}"] = {
                "dtype": _ST_CODE[dtype],
                "shape": list(t.shape[1:]),
                "data_offsets": [pos, pos + n],
            }
            order.append((e, name))
            pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned (spaces are valid JSON)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        with open(tmp, "xb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for e, name in order:
                t = tensors[name][e].to("cpu").contiguous()
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskExpertStorage:
    """Experts in a safetensors file written by :func:`write_expert_file`, memory-mapped.

    ``view(e, name)`` is a tensor over the mapping (no copy); after the expert was copied into
    the cache, ``done(e)`` gives its pages back to the kernel (``MADV_DONTNEED``: they stay in the
    page cache but leave this process's resident set). The file is checked when opened: format,
    configuration, every tensor's name, dtype, shape and byte range; a ``ValueError`` names what
    is wrong. ``close()`` unmaps it.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        self.pinned = False
        where = f"DiskExpertStorage: {self.path}"
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{where} is not a regular file")
            size = st.st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise ValueError(f"{where} is too short to be a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise ValueError(
                    f"{where} has a header length of {n} bytes, the file has {size} "
                    "(not a safetensors file, or a truncated one)"
                )
            try:
                header = json.loads(os.pread(fd, n, 8))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{where}: header is not valid JSON ({exc!r})") from None
            self._mm: Optional[mmap.mmap] = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        try:
            self._parse(header, 8 + n, size - 8 - n, where)
        except BaseException:
            self.close()
            raise

    def _parse(self, header, data_start: int, data_len: int, where: str) -> None:
        if not isinstance(header, dict):
            raise ValueError(f"{where}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != EXPERT_FILE_FORMAT:
            raise ValueError(
                f"{where} is not an offloaded-experts file (format {fmt!r}, expected "
                f"{EXPERT_FILE_FORMAT!r}; write one with write_expert_file)"
            )
        try:
            cfg = json.loads(meta.get("config", ""))
        except json.JSONDecodeError:
            cfg = None
        if not isinstance(cfg, dict) or sorted(cfg) != sorted(_CONFIG_KEYS):
            raise ValueError(f"{where}: metadata 'config' must hold the keys {_CONFIG_KEYS}")
        E = cfg["num_experts"]
        dtype = getattr(torch, str(cfg["dtype"]), None)
        if not isinstance(E, int) or E < 1 or dtype not in _ST_CODE:
            raise ValueError(f"{where}: bad num_experts / dtype in metadata: {cfg!r}")
        self.config = cfg
        self.dtype = dtype
        self.names = expert_tensor_names(bool(cfg["bias"]))
        want = {f"{e}.{name}" for e in range(E) for name in self.names}
        if set(header) != want:
            missing, extra = sorted(want - set(header)), sorted(set(header) - want)
            raise ValueError(
                f"{where}: tensors do not match the metadata: missing {missing[:4]}, "
                f"unexpected {extra[:4]}"
            )
        self._spans: dict = {}
        shapes: dict = {}
        esize = torch.empty((), dtype=dtype).element_size()
        for key, entry in header.items():
            e_str, name = key.split(".", 1)
            if not isinstance(entry, dict) or entry.get("dtype") != _ST_CODE[dtype]:
                raise ValueError(f"{where}: tensor {key!r} must have dtype {_ST_CODE[dtype]}")
            shape, offs = entry.get("shape"), entry.get("data_offsets")
            if not (
                isinstance(shape, list)
                and all(isinstance(v, int) and v >= 0 for v in shape)
                and isinstance(offs, list)
                and len(offs) == 2
                and all(isinstance(v, int) for v in offs)
            ):
                raise ValueError(f"{where}: tensor {key!r} has a malformed entry {entry!r}")
            numel = 1
            for v in shape:
                numel *= v
            b, end = offs
            if not 0 <= b <= end <= data_len or end - b != numel * esize:
                raise ValueError(
                    f"{where}: tensor {key!r} byte range {offs} does not fit its shape {shape} "
                    f"or the file's {data_len} data bytes (truncated file?)"
                )
            if shapes.setdefault(name, tuple(shape)) != tuple(shape):
                raise ValueError(f"{where}: tensor {key!r} has shape {shape}, not {shapes[name]}")
            self._spans[(int(e_str), name)] = (data_start + b, numel)
        self.shapes = shapes
        self.expert_nbytes = sum(self._spans[(0, name)][1] * esize for name in self.names)

    def view(self, e: int, name: str) -> torch.Tensor:
        """Expert ``e``'s tensor ``name``: a tensor over the mapped file (no copy)."""
        start, numel = self._spans[(e, name)]
        if self._mm is None:
            raise RuntimeError(f"DiskExpertStorage: {self.path} is closed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a private (copy-on-write) mapping we never write
            flat = torch.frombuffer(self._mm, dtype=self.dtype, count=numel, offset=start)
        return flat.view(self.shapes[name])

    def done(self, e: int) -> None:
        """Give expert ``e``'s mapped pages back (they leave the resident set)."""
        if self._mm is None:
            return
        spans = [self._spans[(e, name)] for name in self.names]
        esize = torch.empty((), dtype=self.dtype).element_size()
        lo = min(s for s, _ in spans)
        hi = max(s + n * esize for s, n in spans)
        # The kernel maps pages around each faulting page ("fault-around", 64 KiB by default),
        # including pages of the neighbouring experts: the margin gives those back too. Harmless
        # for a concurrent reader: a private mapping never written refaults from the page cache.
        lo = max(0, lo - lo % _PAGE - _FAULT_AROUND_MARGIN)
        hi = min(hi + (-hi % _PAGE) + _FAULT_AROUND_MARGIN, len(self._mm))
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        mm: Optional[mmap.mmap] = getattr(self, "_mm", None)
        self._mm = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                pass
