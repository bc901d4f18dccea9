"""Run metrics of a training / serving system: throughput, per-stage step time, routing balance,
drops and knowledge-graph growth; as a dict (``system.metrics()``), JSON lines and TensorBoard.

Stages. :class:`~moe_framework.moe_layer.MoELayer` runs its parts inside :func:`stage` ranges
named ``moe_framework::routing``, ``::dispatch``, ``::experts`` and ``::combine``;
``MixtureOfExpertsSystem.consolidate`` runs in ``moe_framework::consolidation`` and a whole
``training_step`` in ``moe_framework::training_step``. Each range is a
``torch.profiler.record_function``, so a profiler trace shows them by name; while a
:class:`RunMetrics` records (inside ``system.training_step`` / ``system.predict``) the host time of
each range is added to it as well. Under ``torch.compile`` the ranges are left out (nothing is
traced or timed). On CUDA the host time of a range is its launch time unless ``sync_cuda=True``
(then each range ends with a device sync: accurate, slower).

Routing balance and drops come from the per-layer slot counts each ``training_step`` returns
(``StepResult.stats``: ``load``, ``dropped``), so they need no ``track_stats``; the knowledge-graph
size (nodes, edges) is sampled after each consolidation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections import defaultdict, deque
from typing import Optional

import torch

__all__ = ["RunMetrics", "stage", "STAGES"]

STAGES = ("routing", "dispatch", "experts", "combine", "consolidation")

_local = threading.local()


def _active() -> Optional[RunMetrics]:
    return getattr(_local, "recorder", None)


class _Stage:
    __slots__ = ("name", "rf", "t0", "rec")

    def __init__(self, name: str, rec: Optional[RunMetrics], profiling: bool):
        self.name = name
        self.rec = rec
        self.rf = torch.profiler.record_function(f"moe_framework::{name}") if profiling else None

    def __enter__(self):
        if self.rf is not None:
            self.rf.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        rec = self.rec
        if rec is not None:
            if rec.sync_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            rec._stage_seconds[self.name] += time.perf_counter() - self.t0
        if self.rf is not None:
            self.rf.__exit__(*exc)
        return False


_NULL = contextlib.nullcontext()


def stage(name: str):
    """A named range: ``record_function("moe_framework::<name>")`` while a profiler runs, plus
    host timing into the recording :class:`RunMetrics`; a no-op while ``torch.compile`` traces
    and (about 0.1 us) when neither a profiler nor a recorder is active."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    rec, profiling = _active(), torch.autograd.profiler._is_profiler_enabled
    if rec is None and not profiling:
        return _NULL
    return _Stage(name, rec, profiling)


class RunMetrics:
    """Accumulates a running system's metrics; ``snapshot()`` turns them into a dict.

    Args:
        jsonl_path: append one JSON line per recorded step (and per consolidation) here.
        tensorboard_dir: also write scalars with ``torch.utils.tensorboard.SummaryWriter`` (when
            tensorboard is installed; otherwise a warning once and JSON lines only).
        sync_cuda: synchronise CUDA at the end of each stage (accurate stage times on a GPU).
        history: how many step times (for the percentiles) and KG-growth samples to keep (oldest
            dropped first).
    """

    def __init__(
        self,
        *,
        jsonl_path: Optional[str] = None,
        tensorboard_dir: Optional[str] = None,
        sync_cuda: bool = False,
        history: int = 10_000,
    ):
        self.jsonl_path = jsonl_path
        self.sync_cuda = sync_cuda
        self.history = history
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                import warnings

                warnings.warn(
                    "RunMetrics: tensorboard is not installed; writing JSON lines only",
                    stacklevel=2,
                )
            else:
                self._writer = SummaryWriter(tensorboard_dir)
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (the log files are kept)."""
        self.steps = 0
        self.tokens = 0
        self.step_seconds = 0.0
        self._stage_seconds: dict = defaultdict(float)
        self._stage_total: dict = defaultdict(float)
        self.load: Optional[list] = None  # [layers][E] slots summed over steps
        self.dropped: Optional[list] = None
        self.kg_growth: list = []
        self._recent_steps: deque = deque(maxlen=self.history)
        self._loss_sum = 0.0
        self._loss_steps = 0
        self.consolidations = 0
        self._consolidation_total = 0.0
        self.last_step: dict = {}

    # ------------------------------------------------------------------ recording

    @contextlib.contextmanager
    def recording(self):
        """Stage ranges run inside this block add their host time to this recorder."""
        prev = _active()
        _local.recorder = self
        try:
            yield self
        finally:
            _local.recorder = prev

    def _take_stages(self) -> dict:
        out = dict(self._stage_seconds)
        for k, v in out.items():
            self._stage_total[k] += v
        self._stage_seconds.clear()
        return out

    def record_step(self, step: int, tokens: int, seconds: float, result=None) -> dict:
        """Account one step of ``tokens`` tokens that took ``seconds``; ``result`` is the
        :class:`~moe_framework.training.StepResult` (losses, load, drops) when there is one.
        Returns (and logs) the step's record."""
        stages = self._take_stages()
        self.steps += 1
        self.tokens += tokens
        self.step_seconds += seconds
        self._recent_steps.append(seconds)
        rec: dict = {
            "event": "step",
            "step": step,
            "time": time.time(),
            "tokens": tokens,
            "step_ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
        }
        for name in STAGES[:-1]:
            rec[f"{name}_ms"] = stages.get(name, 0.0) * 1e3
        rec["other_ms"] = max(0.0, seconds - sum(stages.get(n, 0.0) for n in STAGES)) * 1e3
        if stages.get("consolidation"):
            rec["consolidation_ms"] = stages["consolidation"] * 1e3
        if result is not None:
            rec["loss"] = result.loss
            if math.isfinite(result.loss):
                self._loss_sum += result.loss
                self._loss_steps += 1
            rec["aux_loss"] = result.aux_loss
            load, dropped = result.stats.get("load"), result.stats.get("dropped")
            if load is not None:
                self._add_load(load, dropped)
                rec["gini"] = _mean_over_layers(load, "gini")
                rec["max_over_mean"] = _mean_over_layers(load, "max_over_mean")
                rec["dropped"] = int(sum(dropped or ()))
        self.last_step = rec
        self._log(rec)
        return rec

    def _add_load(self, load, dropped) -> None:
        if self.load is None or len(self.load) != len(load):
            self.load = [[0] * len(layer) for layer in load]
            self.dropped = [0] * len(load)
        for acc, layer in zip(self.load, load):
            for e, v in enumerate(layer):
                acc[e] += int(v)
        assert self.dropped is not None
        for i, d in enumerate(dropped or ()):
            self.dropped[i] += int(d)

    def record_kg(self, step: int, nodes: int, edges: int, seconds: float) -> None:
        """Sample the knowledge graph's size after a consolidation."""
        self.consolidations += 1
        self._consolidation_total += seconds
        sample = {"step": step, "time": time.time(), "nodes": nodes, "edges": edges}
        self.kg_growth.append(sample)
        del self.kg_growth[: max(0, len(self.kg_growth) - self.history)]
        self._log({"event": "consolidation", **sample, "consolidation_ms": seconds * 1e3})

    # ------------------------------------------------------------------ output

    def snapshot(self) -> dict:
        """Everything since the last reset as plain Python values: ``steps``, ``tokens``,
        ``tokens_per_s`` (tokens / summed step time), ``step_ms`` (mean), ``step_ms_p50`` /
        ``step_ms_p99`` (over the last ``history`` steps), ``mean_loss`` (finite losses), ``stage_ms`` (mean per
        step of routing / dispatch / experts / combine / other, where other is the rest of the
        step: embedding, norms, head, loss, backward, optimizer; consolidation: mean per
        consolidation), ``balance`` (per layer: cv, gini, max/mean, dead experts of the summed
        load), ``dropped`` (per layer), ``drop_rate``, ``kg_growth`` ([{step, time, nodes,
        edges}]) and ``last_step``."""
        from .metrics import load_summary

        n = max(1, self.steps)
        stage_ms = {s: self._stage_total.get(s, 0.0) * 1e3 / n for s in STAGES[:-1]}
        # Consolidations that ran inside a training step are part of its time, not of "other".
        staged = sum(self._stage_total.get(s, 0.0) for s in STAGES)
        stage_ms["other"] = max(0.0, self.step_seconds - staged) * 1e3 / n
        cons = self.consolidations
        stage_ms["consolidation"] = self._consolidation_total * 1e3 / cons if cons else 0.0
        balance = []
        for layer in self.load or []:
            s = load_summary(layer)
            s["num_dead_experts"] = len(s["dead_experts"])
            s.pop("utilisation")
            balance.append(s)
        routed = sum(sum(layer) for layer in self.load or [])
        dropped = sum(self.dropped or [])
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.step_seconds if self.step_seconds > 0 else None,
            "step_ms": self.step_seconds * 1e3 / n if self.steps else None,
            "step_ms_p50": _percentile(self._recent_steps, 50) * 1e3 if self.steps else None,
            "step_ms_p99": _percentile(self._recent_steps, 99) * 1e3 if self.steps else None,
            "mean_loss": self._loss_sum / self._loss_steps if self._loss_steps else None,
            "stage_ms": stage_ms,
            "balance": balance,
            "dropped": list(self.dropped or []),
            "drop_rate": dropped / (routed + dropped) if routed + dropped else 0.0,
            "kg_growth": list(self.kg_growth),
            "last_step": dict(self.last_step),
        }

    def _log(self, rec: dict) -> None:
        if self.jsonl_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.jsonl_path)), exist_ok=True)
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        if self._writer is not None:
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k not in ("step", "time", "event") and isinstance(v, (int, float)):
                    if isinstance(v, bool) or not math.isfinite(float(v)):
                        continue
                    self._writer.add_scalar(f"moe/{rec['event']}/{k}", v, step)
            self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (JSON lines need no closing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _percentile(xs, q: float) -> float:
    from .benchmark import percentile

    return percentile(list(xs), q)


def _mean_over_layers(load, key: str) -> float:
    from .metrics import load_summary

    vals = [load_summary(layer)[key] for layer in load]
    return sum(vals) / len(vals) if vals else 0.0
