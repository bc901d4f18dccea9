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

Quantised experts (:class:`~moe_framework.quantization.QuantizedExperts`) are stored packed: the
per-expert tensors are then ``qweight_in``, ``scales_in`` (``zeros_in``), ``qweight_out``,
``scales_out`` (``zeros_out``) and the float32 biases, with the scheme under ``"quant"`` in the
configuration, so what is kept, mapped and copied into the cache is the INT8 / INT4 bytes.
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
    torch.int8: "I8",
    torch.uint8: "U8",
}
_ST_DTYPE = {v: k for k, v in _ST_CODE.items()}
_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_FAULT_AROUND_MARGIN = 256 * 1024
_CONFIG_KEYS = ("num_experts", "d_model", "d_hidden", "activation", "layout", "bias", "dtype")


def expert_tensor_names(bias: bool, quant: Optional[dict] = None) -> tuple:
    """The per-expert tensor names of a storage: ``("w_in", "w_out")`` plus the two biases; for
    quantised experts (``quant``: the configuration's scheme) the packed weights, scales and, for
    asymmetric INT4, zero points of both projections instead of ``w_in`` / ``w_out``."""
    if quant is None:
        names: tuple = ("w_in", "w_out")
    else:
        zeros = not quant["symmetric"]
        names = ("qweight_in", "scales_in") + (("zeros_in",) if zeros else ())
        names += ("qweight_out", "scales_out") + (("zeros_out",) if zeros else ())
    return names + (("b_in", "b_out") if bias else ())


def tensor_dtype(name: str, config: dict) -> torch.dtype:
    """The dtype of a storage's tensor ``name`` under ``config``: the configuration's dtype,
    except packed weights (int8 for INT8, uint8 for INT4) and zero points (uint8)."""
    quant = config.get("quant")
    if quant is not None and name.startswith("qweight"):
        return torch.int8 if quant["bits"] == 8 else torch.uint8
    if name.startswith("zeros"):
        return torch.uint8
    return getattr(torch, str(config["dtype"]))


def _is_quantized(module) -> bool:
    return type(module).__name__ == "QuantizedExperts" and hasattr(module, "qweight_in")


def _bank_tensors(bank) -> dict:
    """The stacked ``[E, ...]`` tensors of an ExpertBank (or QuantizedExperts) under the
    storage's names."""
    if _is_quantized(bank):
        q = {n: getattr(bank, n) for n in expert_tensor_names(False, bank_config(bank)["quant"])}
        if bank.b_in is not None:
            q["b_in"], q["b_out"] = bank.b_in, bank.b_out
        return {k: v.detach() for k, v in q.items()}
    out = {"w_in": bank.weight_in, "w_out": bank.w_out}
    if bank.b_out is not None:
        out["b_in"], out["b_out"] = bank.bias_in, bank.b_out
    return {k: v.detach() for k, v in out.items()}


def bank_config(bank) -> dict:
    """The configuration an offloaded copy of ``bank`` (an ExpertBank or QuantizedExperts)
    needs (saved in the file's metadata)."""
    if _is_quantized(bank):
        if bank.act_fn is not None:
            raise ValueError(
                "offloading QuantizedExperts needs the plain SiLU / GELU activation (a custom "
                "act_fn, e.g. of a Hugging Face model, cannot be stored in the expert file)"
            )
        if (bank.b_in is None) != (bank.b_out is None):
            raise ValueError("offloading QuantizedExperts needs both biases or neither")
        return {
            "num_experts": bank.num_experts,
            "d_model": bank.d_model,
            "d_hidden": bank.d_hidden,
            "activation": bank.activation,
            "layout": "out_in",
            "bias": bank.b_in is not None,
            "dtype": "float32",
            "quant": {
                "bits": bank.bits,
                "group_size": bank.group_size,
                "symmetric": bank.symmetric,
                "group_size_in": bank.group_size_in,
                "group_size_out": bank.group_size_out,
            },
        }
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
        self.dtypes = {k: v.dtype for k, v in self._t.items()}
        self.quant = self.config.get("quant")
        # the dtype of the float weights (and of the activations they take); None: quantised
        self.dtype = None if self.quant is not None else self._t["w_out"].dtype
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
    """Write the experts of an :class:`~moe_framework.experts.ExpertBank` (or a
    :class:`~moe_framework.quantization.QuantizedExperts`: packed) to a safetensors file for
    :class:`DiskExpertStorage`; returns the path.

    Each expert's tensors are stored one after the other (one contiguous byte range per expert),
    streamed tensor by tensor (no second copy of the bank in memory). The write is atomic: a
    temporary file in the same folder, fsynced, then renamed over ``path``.
    """
    path = os.fspath(path)
    tensors = _bank_tensors(bank)
    config = bank_config(bank)
    dtype = getattr(torch, str(config["dtype"]))
    if dtype not in _ST_CODE or dtype in (torch.int8, torch.uint8):
        raise ValueError(f"write_expert_file: dtype must be a float type, got {dtype}")
    header: dict = {"__metadata__": {"format": EXPERT_FILE_FORMAT, "config": json.dumps(config)}}
    pos = 0
    order = []
    for e in range(config["num_experts"]):
        for name, t in tensors.items():
            n = t[e].numel() * t.element_size()
            header[f"{e}.{name}"] = {
                "dtype": _ST_CODE[t.dtype],
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
        if not isinstance(cfg, dict) or sorted(k for k in cfg if k != "quant") != sorted(
            _CONFIG_KEYS
        ):
            raise ValueError(f"{where}: metadata 'config' must hold the keys {_CONFIG_KEYS}")
        quant = cfg.get("quant")
        if quant is not None and not (
            isinstance(quant, dict)
            and quant.get("bits") in (8, 4)
            and isinstance(quant.get("symmetric"), bool)
            and all(isinstance(quant.get(k), int) for k in ("group_size_in", "group_size_out"))
        ):
            raise ValueError(f"{where}: bad 'quant' scheme in metadata: {quant!r}")
        E = cfg["num_experts"]
        dtype = getattr(torch, str(cfg["dtype"]), None)
        if not isinstance(E, int) or E < 1 or dtype not in _ST_CODE:
            raise ValueError(f"{where}: bad num_experts / dtype in metadata: {cfg!r}")
        self.config = cfg
        self.quant = quant
        self.dtype = None if quant is not None else dtype
        self.names = expert_tensor_names(bool(cfg["bias"]), quant)
        self.dtypes = {name: tensor_dtype(name, cfg) for name in self.names}
        want = {f"{e}.{name}" for e in range(E) for name in self.names}
        if set(header) != want:
            missing, extra = sorted(want - set(header)), sorted(set(header) - want)
            raise ValueError(
                f"{where}: tensors do not match the metadata: missing {missing[:4]}, "
                f"unexpected {extra[:4]}"
            )
        self._spans: dict = {}
        shapes: dict = {}
        for key, entry in header.items():
            e_str, name = key.split(".", 1)
            code = _ST_CODE[self.dtypes[name]]
            esize = torch.empty((), dtype=self.dtypes[name]).element_size()
            if not isinstance(entry, dict) or entry.get("dtype") != code:
                raise ValueError(f"{where}: tensor {key!r} must have dtype {code}")
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
        self.expert_nbytes = sum(
            self._spans[(0, name)][1] * self.dtypes[name].itemsize for name in self.names
        )

    def view(self, e: int, name: str) -> torch.Tensor:
        """Expert ``e``'s tensor ``name``: a tensor over the mapped file (no copy)."""
        start, numel = self._spans[(e, name)]
        if self._mm is None:
            raise RuntimeError(f"DiskExpertStorage: {self.path} is closed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a private (copy-on-write) mapping we never write
            flat = torch.frombuffer(self._mm, dtype=self.dtypes[name], count=numel, offset=start)
        return flat.view(self.shapes[name])

    def done(self, e: int) -> None:
        """Give expert ``e``'s mapped pages back (they leave the resident set)."""
        if self._mm is None:
            return
        spans = [(*self._spans[(e, name)], self.dtypes[name].itemsize) for name in self.names]
        lo = min(s for s, _, _ in spans)
        hi = max(s + n * size for s, n, size in spans)
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
