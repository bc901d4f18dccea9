"""Offloaded experts: serve an MoE model whose experts do not fit in (device) memory.

:class:`OffloadedExperts` implements the :class:`~moe_framework.experts.Experts` protocol with
its weights outside the compute device's memory, in host memory or in a memory-mapped
safetensors file (``moe_framework.offload_storage``), and a cache of ``cache_slots`` expert slots
on the compute device. A forward pass loads the experts its tokens were routed to into slots
(evicting the least recently, ``policy="lru"``, or least frequently, ``policy="lfu"``, used
unpinned ones) and runs them with the same ``ops.grouped_gemm`` calls as
:class:`~moe_framework.experts.ExpertBank`, over the slots: the output is bitwise equal to the
resident layer's.

Router-driven prefetch (:func:`offload_experts` sets it up on ``MoELayer`` s): a forward hook on
each layer's router sends the experts it picked to a background loader as soon as routing is
done (they load while the tokens are permuted), and predicts the next layer's experts, from a
table of which experts the same tokens used in consecutive layers (learned online, falling back to
the next layer's expert frequencies), and fetches those ahead while this layer computes. Loads run
on one background thread per :func:`offload_experts` call (CPU), which on CUDA issues the
host-to-device copies on a side stream; the compute stream waits on an event, not the host.

Metrics (:meth:`OffloadedExperts.metrics`, :func:`offload_metrics` for a whole model): hits,
misses, hit rate, bytes moved, loads and prefetches, and stall time (seconds the forward waited
for weights). Inference only. Guide: docs/offload.md.

The CUDA path (pinned host storage, side-stream copies, events) is written and type-checked but
has not been run: the machine it was written on has no GPU.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from typing import Iterable, Optional, Sequence, Union, cast

import torch
from torch import nn

from .experts import CheckpointedExperts, ExpertBank, expert_ffn
from .offload_storage import (
    DiskExpertStorage,
    HostExpertStorage,
    _bank_tensors,
    bank_config,
    write_expert_file,
)

__all__ = [
    "POLICIES",
    "OffloadedExperts",
    "PrefetchWorker",
    "close_offloaded",
    "enable_prefetch",
    "offload_experts",
    "offload_metrics",
    "offloaded_modules",
    "prefetch_auto",
    "usable_cpu_cores",
]

POLICIES = ("lru", "lfu")
_QUANT_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_EMPTY, _LOADING, _READY = 0, 1, 2
Storage = Union[HostExpertStorage, DiskExpertStorage]


class PrefetchWorker:
    """One background thread that loads experts into caches ahead of use.

    Requests are ``(cache, expert, generation)``; a request whose cache has since received a newer
    prefetch request is skipped (the newer routing knows better). The thread is a daemon and is
    also stopped at interpreter exit (``atexit``) and when the worker is garbage collected, so it
    never keeps a process alive; :meth:`close` stops it and joins it (idempotent).
    """

    def __init__(self, name: str = "moe-offload-prefetch"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=_worker_loop, args=(self._q,), name=name)
        self._thread.daemon = True
        self._thread.start()
        # Runs on close(), when the worker is collected, or at interpreter exit (finalize's
        # atexit hook), whichever comes first.
        self._finalizer = weakref.finalize(self, _stop_worker, self._q, self._thread)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, cache: _SlotCache, experts: Sequence[int], generation: int) -> None:
        if self._closed:
            return
        for e in experts:
            self._q.put((cache, int(e), generation))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the load in progress (queued requests are dropped)."""
        self._closed = True
        self._finalizer()


def _stop_worker(q: queue.SimpleQueue, thread: threading.Thread) -> None:
    q.put(None)
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=10.0)


def _worker_loop(q: queue.SimpleQueue) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        cache, e, generation = item
        try:
            cache.prefetch_one(e, generation)
        except Exception as exc:  # recorded; the forward then loads the expert itself
            cache.prefetch_error = f"{type(exc).__name__}: {exc}"
        del cache, item


class _SlotCache:
    """``N`` device slots holding experts, thread-safe (one condition variable guards the
    bookkeeping; copies run outside it). Slot states: empty, loading (reserved for one expert,
    being copied), ready. Pinned slots (in use by the running forward chunk) and experts in the
    ``protected`` set (the chunk about to run, or the experts the router just picked) are never
    evicted."""

    def __init__(self, storage: Storage, slots: int, policy: str, device: torch.device):
        self.storage = storage
        self.n = slots
        self.policy = policy
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = {
            name: torch.empty(
                (slots,) + storage.shapes[name], dtype=storage.dtypes[name], device=device
            )
            for name in storage.names
        }
        self.cv = threading.Condition()
        self.slot_expert = [-1] * slots
        self.state = [_EMPTY] * slots
        self.pins = [0] * slots
        self.last_use = [0] * slots
        self.prefetched_unused = [False] * slots
        self.expert_slot: dict = {}
        self.freq: dict = {}
        self.tick = 0
        self.protected: frozenset = frozenset()
        self.generation = 0
        self.prefetch_error: Optional[str] = None
        # CUDA: the copy into a slot is enqueued on a side stream; `ready_event` marks its end,
        # `free_event` the compute stream's last use of the slot (the next copy waits on it).
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.ready_event: list = [None] * slots
        self.free_event: list = [None] * slots
        self._staging = threading.local()
        self.reset_metrics()

    def reset_metrics(self) -> None:
        self.m = dict.fromkeys(
            (
                "requests",
                "hits",
                "inflight_waits",
                "misses",
                "loads",
                "prefetch_loads",
                "prefetch_unused",
                "bytes_moved",
            ),
            0,
        )
        self.stall_s = 0.0

    # ---------------------------------------------------------------- bookkeeping (under cv)

    def _victim(self, ignore_protected: bool = False) -> Optional[int]:
        best, best_key = None, None
        for s in range(self.n):
            if self.state[s] == _EMPTY:
                return s
            if self.state[s] != _READY or self.pins[s]:
                continue
            e = self.slot_expert[s]
            if e in self.protected and not ignore_protected:
                continue
            key = (
                (self.freq.get(e, 0), self.last_use[s])
                if self.policy == "lfu"
                else (self.last_use[s],)
            )
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    def _reserve(self, e: int, s: int) -> None:
        old = self.slot_expert[s]
        if old >= 0:
            del self.expert_slot[old]
            if self.prefetched_unused[s]:
                self.m["prefetch_unused"] += 1
        self.slot_expert[s] = e
        self.expert_slot[e] = s
        self.state[s] = _LOADING
        self.prefetched_unused[s] = False

    # ---------------------------------------------------------------- copies (outside cv)

    def _copy_in(self, e: int, s: int) -> None:
        st = self.storage
        if not self.cuda:
            for name in st.names:
                self.buffers[name][s].copy_(st.view(e, name))
            st.done(e)
            return
        self._copy_in_cuda(e, s)

    def _copy_in_cuda(self, e: int, s: int) -> None:
        # Host -> device on the side stream, after the compute stream's last use of the slot.
        # Pinned host storage is copied directly (asynchronous); a mapped file goes through a
        # pinned staging buffer per thread, reused once the previous copy from it has finished.
        st = self.storage
        stream = cast(torch.cuda.Stream, self.stream)
        staging: Optional[dict] = getattr(self._staging, "bufs", None)
        if not st.pinned and staging is None:
            staging = {
                name: torch.empty(st.shapes[name], dtype=st.dtypes[name]).pin_memory()
                for name in st.names
            }
            self._staging.bufs = staging
        with torch.cuda.stream(stream):
            if self.free_event[s] is not None:
                stream.wait_event(self.free_event[s])
            for name in st.names:
                src = st.view(e, name)
                if staging is not None:
                    staging[name].copy_(src)
                    src = staging[name]
                self.buffers[name][s].copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        self.ready_event[s] = ev
        if not st.pinned:
            ev.synchronize()  # the staging buffer is reused by this thread's next copy
        st.done(e)

    def _finish(self, e: int, s: int, ok: bool, nbytes: int, prefetch: bool) -> None:
        with self.cv:
            if ok:
                self.state[s] = _READY
                self.m["loads"] += 1
                self.m["bytes_moved"] += nbytes
                if prefetch:
                    self.m["prefetch_loads"] += 1
                    self.prefetched_unused[s] = True
            else:
                self.state[s] = _EMPTY
                self.slot_expert[s] = -1
                self.expert_slot.pop(e, None)
            self.cv.notify_all()

    def _load(self, e: int, s: int, prefetch: bool) -> None:
        ok = False
        try:
            self._copy_in(e, s)
            ok = True
        finally:
            self._finish(e, s, ok, self.storage.expert_nbytes, prefetch)

    # ---------------------------------------------------------------- public

    def prefetch_one(self, e: int, generation: int) -> None:
        with self.cv:
            if generation != self.generation or e in self.expert_slot:
                return
            s = self._victim()
            if s is None:  # every slot pinned, loading or protected: skip (best effort)
                return
            self._reserve(e, s)
        self._load(e, s, prefetch=True)

    def acquire(self, e: int) -> int:
        """The slot of expert ``e``, loaded (pinned until :meth:`release`). Blocks while the
        expert or a free slot is not ready; time spent waiting or loading counts as stall."""
        t0 = time.perf_counter()
        first = True
        with self.cv:
            self.m["requests"] += 1
            self.freq[e] = self.freq.get(e, 0) + 1
            while True:
                s = self.expert_slot.get(e)
                if s is not None and self.state[s] == _READY:
                    if first:
                        self.m["hits"] += 1
                    self._use(s)
                    break
                if s is not None:  # being loaded (by the prefetcher): wait for it
                    if first:
                        self.m["inflight_waits"] += 1
                    first = False
                    self.cv.wait()
                    continue
                v = self._victim()
                if v is None and _LOADING not in self.state:
                    # Nothing in flight will free a slot: protection is a hint, not a lock.
                    v = self._victim(ignore_protected=True)
                    if v is None:
                        raise RuntimeError(
                            f"OffloadedExperts: all {self.n} cache slots are in use; expert {e} "
                            "cannot be loaded (more concurrent users than slots)"
                        )
                if v is None:  # all slots busy: a load in flight frees one when it finishes
                    first = False
                    self.cv.wait()
                    continue
                if first:
                    self.m["misses"] += 1
                self._reserve(e, v)
                self.cv.release()
                try:
                    self._load(e, v, prefetch=False)
                finally:
                    self.cv.acquire()
                first = False
        if not first:
            self.stall_s += time.perf_counter() - t0
        return s

    def _use(self, s: int) -> None:
        self.tick += 1
        self.last_use[s] = self.tick
        self.pins[s] += 1
        self.prefetched_unused[s] = False

    def release(self, slots: Iterable[int]) -> None:
        ev = None
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with self.cv:
            for s in slots:
                self.pins[s] -= 1
                if ev is not None:
                    self.free_event[s] = ev
            self.cv.notify_all()

    def protect(self, experts: Iterable[int]) -> None:
        with self.cv:
            self.protected = frozenset(experts)

    def new_generation(self, experts: Sequence[int]) -> int:
        with self.cv:
            self.generation += 1
            self.protected = frozenset(experts)
            return self.generation

    def cached(self, e: int) -> bool:
        with self.cv:
            return e in self.expert_slot


class OffloadedExperts(nn.Module):
    """An :class:`~moe_framework.experts.Experts` whose weights live outside the compute device,
    with a cache of ``cache_slots`` experts on it.

    Build it with :func:`offload_experts` (from an ``ExpertBank``, an ``MoELayer`` or a whole
    model), :meth:`from_bank`, or :meth:`open` (a file written by
    :func:`~moe_framework.offload_storage.write_expert_file`).

    Args:
        storage: a :class:`~moe_framework.offload_storage.HostExpertStorage` or
            :class:`~moe_framework.offload_storage.DiskExpertStorage`.
        cache_slots: ``N``, experts kept on the device (``1 <= N <= num_experts``).
        policy: ``"lru"`` or ``"lfu"`` (least frequently used, ties to least recently used;
            frequencies count every use since construction).
        device: the compute device (default CPU): where the slots are and the inputs must be.
        worker: the :class:`PrefetchWorker` that runs :meth:`prefetch` (``None``: prefetch
            requests are ignored, every load happens in the forward).

    ``forward(x_sorted [M, d], offsets [E+1]) -> [M, d]`` as ``ExpertBank`` (bitwise equal for
    the same weights): it reads ``offsets`` on the host (one sync; not for
    ``torch.compile(fullgraph=True)`` or CUDA graphs), loads the routed experts, at most
    ``cache_slots`` at a time, and runs each group with two grouped GEMMs over the slots.
    Inference only: a ``RuntimeError`` if ``x_sorted`` requires grad (use ``torch.no_grad()``).

    Quantised experts (a :class:`~moe_framework.quantization.QuantizedExperts` offloaded, or a
    file written from one) keep their packed INT8 / INT4 weights in the storage and the slots (the
    bytes moved are the packed ones) and run ``ops.grouped_gemm_q`` over the slots, bitwise equal
    to the resident ``QuantizedExperts``; ``x_sorted`` may then be float32, bfloat16 or float16,
    and ``act_quant`` (``None`` or ``"int8"``, see ``QuantizedExperts``) is an attribute.
    The module has no parameters (its weights are the storage's) and refuses ``state_dict()``
    with a ``RuntimeError`` (a saved model would lack its experts): save before offloading.
    One forward at a time per module (a lock serialises concurrent calls).
    """

    _hook: Optional[torch.utils.hooks.RemovableHandle] = None

    def __init__(
        self,
        storage: Storage,
        *,
        cache_slots: int,
        policy: str = "lru",
        device=None,
        worker: Optional[PrefetchWorker] = None,
    ):
        super().__init__()
        if not isinstance(storage, (HostExpertStorage, DiskExpertStorage)):
            raise ValueError(
                "OffloadedExperts: storage must be a HostExpertStorage or DiskExpertStorage, got "
                f"{type(storage).__name__}"
            )
        cfg = storage.config
        E = cfg["num_experts"]
        if isinstance(cache_slots, bool) or not isinstance(cache_slots, int):
            raise ValueError(f"OffloadedExperts: cache_slots must be an int, got {cache_slots!r}")
        if not 1 <= cache_slots <= E:
            raise ValueError(
                f"OffloadedExperts: cache_slots must be in [1, num_experts={E}], got {cache_slots}"
            )
        if policy not in POLICIES:
            raise ValueError(f"OffloadedExperts: policy must be one of {POLICIES}, got {policy!r}")
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.num_experts = E
        self.d_model = cfg["d_model"]
        self.d_hidden = cfg["d_hidden"]
        self.activation = cfg["activation"]
        self.layout = cfg["layout"]
        self.bias = bool(cfg["bias"])
        self.cache_slots = cache_slots
        self.policy = policy
        self.device = dev
        self.storage = storage
        self.worker = worker
        self.quant = storage.quant
        self.act_quant: Optional[str] = None
        self._cache = _SlotCache(storage, cache_slots, policy, dev)
        self._forward_lock = threading.Lock()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_bank(
        cls,
        bank: nn.Module,
        *,
        cache_slots: int,
        storage: Union[str, os.PathLike] = "host",
        policy: str = "lru",
        device=None,
        worker: Optional[PrefetchWorker] = None,
    ) -> OffloadedExperts:
        """Offload an ``ExpertBank`` or a ``QuantizedExperts`` (packed): ``storage="host"`` keeps
        its tensors in host memory (pinned when ``device`` is CUDA; CPU tensors are shared, not
        copied, otherwise), a path writes them to that safetensors file and maps it."""
        from .quantization import QuantizedExperts

        if not isinstance(bank, (ExpertBank, QuantizedExperts)):
            raise ValueError(
                "OffloadedExperts.from_bank: bank must be an ExpertBank or QuantizedExperts, got "
                f"{type(bank).__name__}"
            )
        dev = torch.device("cpu" if device is None else device)
        st: Storage
        if isinstance(storage, str) and storage == "host":
            st = HostExpertStorage(_bank_tensors(bank), bank_config(bank), pin=dev.type == "cuda")
        elif isinstance(storage, (str, os.PathLike)):
            st = DiskExpertStorage(write_expert_file(bank, storage))
        else:
            raise ValueError(
                f'OffloadedExperts.from_bank: storage must be "host" or a file path, got {storage!r}'
            )
        out = cls(st, cache_slots=cache_slots, policy=policy, device=dev, worker=worker)
        out.act_quant = getattr(bank, "act_quant", None)
        return out

    @classmethod
    def open(
        cls,
        path: Union[str, os.PathLike],
        *,
        cache_slots: int,
        policy: str = "lru",
        device=None,
        worker: Optional[PrefetchWorker] = None,
    ) -> OffloadedExperts:
        """Offloaded experts over a file written by ``write_expert_file`` (memory-mapped)."""
        st = DiskExpertStorage(path)
        return cls(st, cache_slots=cache_slots, policy=policy, device=device, worker=worker)

    # ---------------------------------------------------------------- prefetch and metrics

    def prefetch(self, experts: Iterable[int]) -> None:
        """Start loading ``experts`` (ids in ``[0, E)``, at most ``cache_slots`` are taken, in
        order) on the background worker; returns at once. They are protected from eviction by
        other prefetches until the next request. A no-op without a worker."""
        wanted = []
        for e in experts:
            e = int(e)
            if not 0 <= e < self.num_experts:
                raise ValueError(
                    f"OffloadedExperts.prefetch: expert ids must be in [0, {self.num_experts}), "
                    f"got {e}"
                )
            if e not in wanted:
                wanted.append(e)
        wanted = wanted[: self.cache_slots]
        if self.worker is None or not wanted:
            return
        gen = self._cache.new_generation(wanted)
        self.worker.submit(self._cache, [e for e in wanted if not self._cache.cached(e)], gen)

    def metrics(self) -> dict:
        """Counters since construction or :meth:`reset_metrics`: ``requests`` (expert uses by
        forward passes), ``hits`` (ready in the cache), ``inflight_waits`` (being prefetched:
        the forward waited for the rest of the copy), ``misses`` (loaded by the forward itself),
        ``hit_rate`` = hits / requests, ``loads``, ``prefetch_loads``, ``prefetch_unused``
        (prefetched, evicted before any use), ``bytes_moved`` (storage to slots),
        ``stall_s`` (forward time spent waiting for or copying weights) and the last
        ``prefetch_error`` (``None`` normally)."""
        c = self._cache
        with c.cv:
            out: dict = dict(c.m)
            out["stall_s"] = c.stall_s
        out["hit_rate"] = out["hits"] / out["requests"] if out["requests"] else 0.0
        out["prefetch_error"] = c.prefetch_error
        return out

    def reset_metrics(self) -> None:
        with self._cache.cv:
            self._cache.reset_metrics()

    def cached_experts(self) -> list:
        """The experts in the cache now (ready or being loaded), sorted."""
        with self._cache.cv:
            return sorted(self._cache.expert_slot)

    def close(self) -> None:
        """Stop this module's prefetch worker (shared with the other layers it serves) and
        unmap its file. The module cannot run afterwards."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.worker is not None:
            self.worker.close()
        self.storage.close()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # An empty entry would save a model without its experts, which then fails to load far
        # from here: refuse at the source instead.
        raise RuntimeError(
            f"OffloadedExperts ({prefix.rstrip('.') or 'experts'}) has no state dict: its weights "
            "are the storage's (host memory or the expert file). Save the model before offloading "
            "it; the expert files are plain safetensors files"
        )

    # ---------------------------------------------------------------- forward

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted ``[M, d]`` (expert-sorted), offsets ``[E+1]`` int64 -> ``[M, d]``."""
        E, d = self.num_experts, self.d_model
        if x_sorted.dim() != 2 or x_sorted.shape[1] != d:
            raise ValueError(
                f"OffloadedExperts: x_sorted must be [M, {d}], got {tuple(x_sorted.shape)}"
            )
        if self.quant is not None:
            if x_sorted.dtype not in _QUANT_ACT_DTYPES or x_sorted.device != self.device:
                raise ValueError(
                    "OffloadedExperts: x_sorted must be float32, bfloat16 or float16 on "
                    f"{self.device} (quantised experts), got {x_sorted.dtype} on {x_sorted.device}"
                )
        elif x_sorted.dtype != self.storage.dtype or x_sorted.device != self.device:
            raise ValueError(
                f"OffloadedExperts: x_sorted must be {self.storage.dtype} on {self.device} (the "
                f"stored weights), got {x_sorted.dtype} on {x_sorted.device}"
            )
        if tuple(offsets.shape) != (E + 1,):
            raise ValueError(
                f"OffloadedExperts: offsets must have shape [{E + 1}], got {tuple(offsets.shape)}"
            )
        if torch.is_grad_enabled() and x_sorted.requires_grad:
            raise RuntimeError(
                "OffloadedExperts is inference-only (its weights are not parameters and its "
                "slots are overwritten): run it under torch.no_grad() or torch.inference_mode()"
            )
        with self._forward_lock:
            return self._forward(x_sorted, offsets.tolist())

    def _forward(self, x: torch.Tensor, off: list) -> torch.Tensor:
        E, c = self.num_experts, self._cache
        M = x.shape[0]
        if any(b < a for a, b in zip(off, off[1:])) or off[0] < 0 or off[E] > M:
            raise ValueError(
                f"OffloadedExperts: offsets must be non-decreasing within [0, M={M}], got {off}"
            )
        y = x.new_zeros(M, self.d_model)
        active = [e for e in range(E) if off[e + 1] > off[e]]
        # Experts already in the cache first (they run before any eviction could take them), then
        # ascending: the order in which the router hook asked the prefetcher for them.
        active.sort(key=lambda e: not c.cached(e))
        N = self.cache_slots
        try:
            for i in range(0, len(active), N):
                chunk = active[i : i + N]
                c.protect(chunk)
                # Within the chunk, the experts to load in descending order: the prefetcher loads
                # them ascending, so the forward copies from the other end instead of waiting.
                order = sorted(chunk, key=lambda e: (not c.cached(e), -e))
                slots = []
                try:
                    for e in order:
                        slots.append(c.acquire(e))
                    if self._cache.cuda:
                        stream = torch.cuda.current_stream(self.device)
                        for s in slots:
                            if c.ready_event[s] is not None:
                                stream.wait_event(c.ready_event[s])
                    self._run_chunk(x, y, off, order, slots)
                finally:
                    c.release(slots)
        finally:
            c.protect(())
        return y

    def _run_chunk(self, x, y, off, chunk, slots) -> None:
        # Rows of the chunk's experts, ordered by slot; per-slot offsets over those rows.
        N, c = self.cache_slots, self._cache
        by_slot = sorted(zip(slots, chunk))
        counts = [0] * N
        for s, e in by_slot:
            counts[s] = off[e + 1] - off[e]
        slot_off = [0]
        for n in counts:
            slot_off.append(slot_off[-1] + n)
        starts = [off[e] for _, e in by_slot]
        if all(a + counts[s] == b for (s, _), a, b in zip(by_slot, starts, starts[1:])):
            # One contiguous run of rows already in slot order: no gather.
            rows: Union[slice, torch.Tensor] = slice(starts[0], starts[0] + slot_off[-1])
        else:
            rows = torch.cat(
                [torch.arange(off[e], off[e + 1], dtype=torch.long) for _, e in by_slot]
            ).to(self.device)
        b = c.buffers
        slot_offsets = torch.tensor(slot_off, dtype=torch.long, device=self.device)
        if self.quant is not None:
            from .quantization import quantized_ffn

            q = self.quant
            y[rows] = quantized_ffn(
                x[rows],
                slot_offsets,
                (b["qweight_in"], b["scales_in"], b.get("zeros_in"), q["group_size_in"]),
                (b["qweight_out"], b["scales_out"], b.get("zeros_out"), q["group_size_out"]),
                bits=q["bits"],
                activation=self.activation,
                b_in=b.get("b_in"),
                b_out=b.get("b_out"),
                act_bits=8 if self.act_quant == "int8" else 0,
            )
            return
        out = expert_ffn(
            x[rows],
            slot_offsets,
            b["w_in"],
            b["w_out"],
            activation=self.activation,
            layout=self.layout,
            b_in=b.get("b_in"),
            b_out=b.get("b_out"),
        )
        y[rows] = out

    def extra_repr(self) -> str:
        where = getattr(self.storage, "path", "host memory")
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"cache_slots={self.cache_slots}, policy={self.policy!r}, storage={where!r}, "
            f"device={self.device}"
            + (f", quant={self.quant}, act_quant={self.act_quant!r}" if self.quant else "")
        )


# ==================================================================== model-level helpers


class _NextLayerPlanner:
    """Predicts layer ``l+1``'s experts from layer ``l``'s routing.

    ``trans[l] [E_l, E_{l+1}]`` counts, over every token seen, how often a token routed to
    expert ``a`` in layer ``l`` went to ``b`` in layer ``l+1``; ``freq[l]`` counts layer ``l``'s
    expert uses. For each token of this batch, ``q_t(b)`` = (slots per token of layer ``l+1``) x
    the mean over its experts ``a`` of ``P(b | a)`` (the rows of ``trans`` normalised after adding
    ``E_{l+1}`` pseudo-counts spread as layer ``l+1``'s frequencies, so rows seen a few times
    lean on the frequencies), capped at 1: the chance the token uses ``b``. The chance the batch uses ``b`` is
    ``1 - prod_t (1 - q_t(b))``; the ``budget`` most likely experts whose chance is at least
    ``threshold`` are fetched ahead (so a flat table, as random routing gives, fetches nothing
    rather than evicting useful experts for guesses).
    """

    def __init__(
        self, experts: Sequence[OffloadedExperts], budget: Sequence[int], threshold: float
    ):
        self.experts = list(experts)
        self.budget = list(budget)
        self.threshold = float(threshold)
        self.freq = [torch.zeros(m.num_experts, dtype=torch.float64) for m in experts]
        self.trans = [
            torch.zeros(a.num_experts, b.num_experts, dtype=torch.float64)
            for a, b in zip(experts, experts[1:])
        ]
        self.slots = [0] * len(experts)
        self.last: list = [None] * len(experts)
        self.lock = threading.Lock()

    @staticmethod
    def _onehot(ids: torch.Tensor, E: int) -> torch.Tensor:
        # [T, k] (-1 = dropped) -> [T, E] float64 counts.
        T = ids.shape[0]
        out = torch.zeros(T, E + 1, dtype=torch.float64)
        out.scatter_add_(
            1, ids.long().clamp(min=-1) % (E + 1), torch.ones(ids.shape, dtype=out.dtype)
        )
        return out[:, :E]

    def observe(self, layer: int, ids: torch.Tensor) -> Optional[list]:
        """Record layer ``layer``'s routing ``ids [T, k]`` (CPU); return the predicted experts
        of the next layer (``None`` for the last layer, a zero budget or no likely expert)."""
        E = self.experts[layer].num_experts
        oh = self._onehot(ids, E)
        with self.lock:
            self.freq[layer] += oh.sum(0)
            self.slots[layer] = ids.shape[1] if ids.dim() == 2 else 1
            prev = self.last[layer - 1] if layer > 0 else None
            if prev is not None and prev.shape[0] == oh.shape[0]:
                self.trans[layer - 1] += prev.T @ oh
            self.last[layer] = oh
            if layer + 1 >= len(self.experts) or self.budget[layer + 1] <= 0:
                return None
            trans = self.trans[layer].clone()
            nxt = self.freq[layer + 1].clone()
            k_next = self.slots[layer + 1]
        if k_next == 0 or float(nxt.sum()) == 0.0:
            return None  # the next layer has never run: nothing to go on
        # P(b | a) with E_next pseudo-counts of the next layer's frequencies: a row seen a few
        # times is pulled toward the prior instead of trusting its first counts (random routing
        # would otherwise look predictable after a few batches); an unseen row is the prior.
        prior = nxt / nxt.sum()
        alpha = float(trans.shape[1])
        P = (trans + alpha * prior) / (trans.sum(1, keepdim=True) + alpha)
        n_valid = oh.sum(1, keepdim=True)
        q = (oh @ P) / n_valid.clamp(min=1.0)
        q = (q * k_next).clamp(max=1.0 - 1e-12)
        chance = -torch.expm1(torch.log1p(-q).sum(0))
        ok = (chance > 0) & (chance >= self.threshold)
        m = min(self.budget[layer + 1], int(ok.sum()))
        if m == 0:
            return None
        return torch.topk(torch.where(ok, chance, -1.0), m).indices.tolist()


def _router_hook(experts: OffloadedExperts, planner: Optional[_NextLayerPlanner], layer: int):
    ref = weakref.ref(experts)

    def hook(module, args, out) -> None:
        me = ref()
        if me is None or torch.compiler.is_compiling():
            return
        ids = out.ids.detach().to("cpu")
        # Cached experts first, then ascending: the order of the forward's chunks (see _forward).
        picks = torch.unique(ids[ids >= 0]).tolist()
        me.prefetch(sorted(picks, key=lambda e: not me._cache.cached(e)))
        if planner is not None:
            pred = planner.observe(layer, ids)
            if pred is not None:
                planner.experts[layer + 1].prefetch(pred)

    return hook


def offload_experts(
    module: nn.Module,
    *,
    cache_slots: int,
    storage: Union[str, os.PathLike] = "host",
    policy: str = "lru",
    device=None,
    prefetch: Union[bool, str] = "auto",
    prefetch_next: Optional[int] = None,
    prefetch_threshold: float = 0.8,
) -> nn.Module:
    """Replace the ``ExpertBank`` (or ``QuantizedExperts``) experts of a module by
    :class:`OffloadedExperts`.

    Args:
        module: an ``ExpertBank`` (returns its ``OffloadedExperts``), an ``MoELayer``, or any
            module holding ``MoELayer`` s (a ``MixtureOfExpertsSystem``, an ``nn.Sequential``),
            changed in place and returned. Layers are taken in ``module.modules()`` order, which
            is their order in the forward pass for the system and for sequential stacks (next-layer
            prefetch relies on it). Each layer's experts must be an ``ExpertBank`` (possibly inside
            ``CheckpointedExperts``) or a ``QuantizedExperts`` (``quantize_experts`` first, then
            offload: the packed INT8 / INT4 bytes are what is stored and moved).
        cache_slots: experts kept on the compute device per layer, ``1 <= cache_slots <= E``.
        storage: ``"host"`` (weights stay in host memory; pinned when ``device`` is CUDA) or a
            folder: each layer's experts are written to ``<folder>/experts_<i>.safetensors``
            (an ``ExpertBank`` alone: ``experts_0.safetensors``) and memory-mapped from there.
        policy: ``"lru"`` or ``"lfu"``.
        device: compute device (default: where the experts' weights are now).
        prefetch: router-driven prefetch on a background thread (``MoELayer`` s only): each
            layer's picked experts, and the next layer's predicted ones. ``"auto"`` (default):
            on when the compute device is CUDA (copies overlap compute on a side stream), and on
            the CPU only with at least 3 usable cores (:func:`prefetch_auto`): the loader thread
            competes with the compute threads for cores, and on a busy 2-core machine prefetch
            made decoding slower (docs/offload.md). ``True`` / ``False`` force it.
        prefetch_next: how many experts of the next layer to fetch ahead at most (default
            ``cache_slots // 2``; 0: only the layer's own picked experts).
        prefetch_threshold: fetch a next-layer expert ahead only when the chance that this
            batch uses it, estimated from the routing seen so far, is at least this (default
            0.8: a wrong guess costs a copy and evicts an expert about as likely to be used;
            0 fetches the ``prefetch_next`` likeliest whenever any is possible).

    After the call the original expert weights are no longer referenced by the module (the
    memory is freed once nothing else holds them). Call ``close()`` on any of the new modules
    (or :func:`close_offloaded`) to stop the prefetch thread; it is a daemon and is also stopped
    at interpreter exit, so forgetting to close never hangs a process.
    """
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"offload_experts: policy must be one of {POLICIES}, got {policy!r}")
    if not (isinstance(prefetch, bool) or prefetch == "auto"):
        raise ValueError(
            f'offload_experts: prefetch must be True, False or "auto", got {prefetch!r}'
        )
    if isinstance(cache_slots, bool) or not isinstance(cache_slots, int) or cache_slots < 1:
        raise ValueError(f"offload_experts: cache_slots must be an int >= 1, got {cache_slots!r}")
    if prefetch_next is not None and (
        isinstance(prefetch_next, bool) or not isinstance(prefetch_next, int) or prefetch_next < 0
    ):
        raise ValueError(
            f"offload_experts: prefetch_next must be None or an int >= 0, got {prefetch_next!r}"
        )
    if isinstance(prefetch_threshold, bool) or not (
        isinstance(prefetch_threshold, (int, float)) and 0.0 <= prefetch_threshold <= 1.0
    ):
        raise ValueError(
            "offload_experts: prefetch_threshold must be a number in [0, 1], got "
            f"{prefetch_threshold!r}"
        )
    if not (isinstance(storage, os.PathLike) or isinstance(storage, str)):
        raise ValueError(f'offload_experts: storage must be "host" or a folder, got {storage!r}')
    if storage != "host":
        os.makedirs(os.fspath(storage), exist_ok=True)

    def storage_for(i: int):
        if isinstance(storage, str) and storage == "host":
            return "host"
        return os.path.join(os.fspath(storage), f"experts_{i}.safetensors")

    from .quantization import QuantizedExperts

    def bank_of(experts: nn.Module, where: str):
        inner = experts.inner if isinstance(experts, CheckpointedExperts) else experts
        if isinstance(inner, OffloadedExperts):
            raise ValueError(f"offload_experts: {where} is already offloaded")
        if not isinstance(inner, (ExpertBank, QuantizedExperts)):
            raise ValueError(
                f"offload_experts: {where} must be an ExpertBank (or CheckpointedExperts around "
                f"one) or a QuantizedExperts, got {type(inner).__name__}"
            )
        if not 1 <= cache_slots <= inner.num_experts:
            raise ValueError(
                f"offload_experts: cache_slots must be in [1, num_experts={inner.num_experts}] "
                f"({where}), got {cache_slots}"
            )
        return inner

    def device_of(bank):
        w = bank.qweight_out if isinstance(bank, QuantizedExperts) else bank.w_out
        return w.device if device is None else device

    if isinstance(module, (ExpertBank, QuantizedExperts)):
        bank = bank_of(module, "the ExpertBank")
        return OffloadedExperts.from_bank(
            bank,
            cache_slots=cache_slots,
            storage=storage_for(0),
            policy=policy,
            device=device_of(bank),
        )

    from .moe_layer import MoELayer  # the layer module imports experts; avoid a cycle here

    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(
            "offload_experts: module must be an ExpertBank, an MoELayer or a module holding "
            f"MoELayers, got {type(module).__name__} with none"
        )
    banks = [bank_of(layer.experts, f"layer {i}'s experts") for i, layer in enumerate(layers)]
    new: list = []
    try:
        for i, bank in enumerate(banks):
            new.append(
                OffloadedExperts.from_bank(
                    bank,
                    cache_slots=cache_slots,
                    storage=storage_for(i),
                    policy=policy,
                    device=device_of(bank),
                )
            )
    except BaseException:
        for m in new:
            m.storage.close()
        raise
    for layer, off in zip(layers, new):
        layer.experts = off
    if prefetch == "auto":
        prefetch = prefetch_auto(new[0].device)
    if prefetch:
        enable_prefetch(module, prefetch_next=prefetch_next, prefetch_threshold=prefetch_threshold)
    return module


MIN_CPU_CORES_FOR_PREFETCH = 3


def usable_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prefetch_auto(device) -> bool:
    """What ``offload_experts(prefetch="auto")`` picks for a compute ``device``: ``True`` on
    CUDA; on the CPU ``True`` only with at least ``MIN_CPU_CORES_FOR_PREFETCH`` (3) usable cores,
    so that the loader thread does not take a core from the compute threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return usable_cpu_cores() >= MIN_CPU_CORES_FOR_PREFETCH


def enable_prefetch(
    module: nn.Module,
    *,
    prefetch_next: Optional[int] = None,
    prefetch_threshold: float = 0.8,
) -> nn.Module:
    """Router-driven prefetch for every ``MoELayer`` of ``module`` whose experts are
    :class:`OffloadedExperts` (``offload_experts(..., prefetch=True)`` calls it; call it yourself
    on a model assembled from :meth:`OffloadedExperts.open`).

    A forward hook on each layer's router sends the experts it picked to one background
    :class:`PrefetchWorker` shared by the layers, and the ``prefetch_next`` (default: half the
    next layer's ``cache_slots``) experts the next layer most likely needs, predicted from the
    routing of the same tokens seen so far, when the estimated chance that this batch uses them
    is at least ``prefetch_threshold`` (see ``_NextLayerPlanner``). Layers are linked in
    ``module.modules()`` order. Returns ``module``.
    """
    from .moe_layer import MoELayer

    if prefetch_next is not None and (
        isinstance(prefetch_next, bool) or not isinstance(prefetch_next, int) or prefetch_next < 0
    ):
        raise ValueError(
            f"enable_prefetch: prefetch_next must be None or an int >= 0, got {prefetch_next!r}"
        )
    if isinstance(prefetch_threshold, bool) or not (
        isinstance(prefetch_threshold, (int, float)) and 0.0 <= prefetch_threshold <= 1.0
    ):
        raise ValueError(
            "enable_prefetch: prefetch_threshold must be a number in [0, 1], got "
            f"{prefetch_threshold!r}"
        )
    layers = [
        m
        for m in module.modules()
        if isinstance(m, MoELayer) and isinstance(m.experts, OffloadedExperts)
    ]
    if not layers:
        raise ValueError(
            f"enable_prefetch: {type(module).__name__} has no MoELayer with OffloadedExperts"
        )
    offs = [cast(OffloadedExperts, layer.experts) for layer in layers]
    if any(off._hook is not None for off in offs):
        raise ValueError("enable_prefetch: prefetch is already enabled on this module")
    worker = PrefetchWorker()
    budget = [
        off.cache_slots // 2 if prefetch_next is None else min(prefetch_next, off.cache_slots)
        for off in offs
    ]
    planner = _NextLayerPlanner(offs, budget, prefetch_threshold) if len(offs) > 1 else None
    for i, (layer, off) in enumerate(zip(layers, offs)):
        off.worker = worker
        off._hook = layer.supervisor.register_forward_hook(_router_hook(off, planner, i))
    return module


def offloaded_modules(module: nn.Module) -> list:
    """The :class:`OffloadedExperts` inside ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, OffloadedExperts)]


def offload_metrics(module: nn.Module) -> dict:
    """:meth:`OffloadedExperts.metrics` summed over every offloaded layer of ``module`` (the
    hit rate recomputed from the sums), with ``layers``: the per-layer dicts."""
    per = [m.metrics() for m in offloaded_modules(module)]
    keys = [k for k in (per[0] if per else {}) if k not in ("hit_rate", "prefetch_error")]
    total: dict = {k: sum(p[k] for p in per) for k in keys}
    total["hit_rate"] = total["hits"] / total["requests"] if per and total["requests"] else 0.0
    total["layers"] = per
    return total


def close_offloaded(module: nn.Module) -> None:
    """Stop the prefetch threads and unmap the files of every offloaded layer of ``module``."""
    for m in offloaded_modules(module):
        m.close()
