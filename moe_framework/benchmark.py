"""MoEBenchmark: throughput, latency, expert load and memory of a MoE model over batch x sequence.

>>> from moe_framework.benchmark import MoEBenchmark
>>> results = MoEBenchmark(model, batch_sizes=[1, 8], sequence_lengths=[128, 512]).run()
>>> results.print_summary(); results.to_json("bench.json"); results.plot("bench.png")

``model`` is any module whose MoE layers are :class:`~moe_framework.moe_layer.MoELayer` s: a
:class:`~moe_framework.system.MixtureOfExpertsSystem`, a bare ``MoELayer``, or a Hugging Face
Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model (its sparse blocks are swapped for ours with
:func:`~moe_framework.integrations.transformers.replace_moe_blocks` when they are not yet). The
routing of every MoE layer is read through forward hooks on those layers, so the load statistics
need nothing from the model itself.

Per (batch, seq): throughput (tokens/s from the median step time), latency p50 / p99 (over the
timed repetitions, linear interpolation), expert utilisation (each expert's routed slots over its
capacity: ``ceil(capacity_factor * T * k / E)`` when the router has a capacity factor, else the
uniform share ``T * k / E``, capped at 1; the mean over experts is the share of capacity used),
load balance (Gini, CV, max/mean, dead experts, entropy of the load distribution, all over every
layer's counts of one step) and peak memory (CUDA: ``max_memory_allocated``; CPU: the peak growth
of the process RSS over one extra, untimed step, sampled every millisecond). With ``dense=`` a
dense model of equal active parameters gets the same timings in the same run, one contender after
the other (never concurrently), and the ratios are reported.

Timing: ``warmup`` untimed steps, then ``repeats`` timed ones; the median is reported. The machine
(CPU, ISA, threads, torch) is recorded with the results. ``mode="train"`` times a training step
(forward, loss, backward, optimizer step) instead of a forward pass.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["MoEBenchmark", "BenchmarkResults", "load_statistics", "percentile", "peak_rss_growth"]

MODES = ("forward", "train")


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``xs`` with linear interpolation (numpy's default)."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile: no values")
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def load_statistics(counts: torch.Tensor, capacity: float) -> dict:
    """Balance of one step's per-expert load ``counts [E]`` (slots) against ``capacity`` slots per
    expert: utilisation (mean of min(load / capacity, 1)), Gini, CV, max/mean, dead experts,
    entropy of the load distribution (nats) and its normalised value (entropy / ln E)."""
    from .metrics import load_summary

    c = counts.detach().to(torch.float64).reshape(-1).cpu()
    E = c.numel()
    out = load_summary(c)
    total = float(c.sum())
    p = c / total if total > 0 else c
    ent = float(-(p[p > 0] * torch.log(p[p > 0])).sum()) if total > 0 else 0.0
    util = (c / capacity).clamp(max=1.0) if capacity > 0 else torch.zeros_like(c)
    return {
        "utilisation": float(util.mean()) if E else 0.0,
        "gini": out["gini"],
        "cv": out["cv"],
        "max_over_mean": out["max_over_mean"],
        "dead_experts": len(out["dead_experts"]),
        "entropy": ent,
        "normalized_entropy": ent / math.log(E) if E > 1 else 0.0,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_growth(fn: Callable[[], object], interval: float = 0.001) -> float:
    """Peak growth (MB) of this process's resident memory while ``fn`` runs, sampled by a
    thread every ``interval`` seconds (0 where /proc is not available)."""
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - base) / 2**20


# ====================================================================== results


@dataclass
class BenchmarkResults:
    """What :meth:`MoEBenchmark.run` returns: one row per (batch, seq) and the run's context."""

    rows: list
    machine: dict
    settings: dict
    extra: dict = field(default_factory=dict)

    COLUMNS = (
        "batch",
        "seq",
        "tokens_per_s",
        "p50_ms",
        "p99_ms",
        "utilisation",
        "gini",
        "cv",
        "max_over_mean",
        "dead_experts",
        "normalized_entropy",
        "peak_mem_mb",
        "dense_tokens_per_s",
        "moe_over_dense",
    )

    def print_summary(self) -> str:
        """Print the table (markdown) with the machine line; returns the text."""
        from .benchmarks.common import print_table

        m = self.machine
        head = (
            f"MoEBenchmark ({self.settings.get('mode')}, {self.settings.get('model')}): "
            f"{m.get('cpu')}, {m.get('torch_threads')} threads, torch {m.get('torch')}"
            + (f", {m['gpu']}" if m.get("gpu") else "")
        )
        print(head)
        cols = [c for c in self.COLUMNS if any(c in r for r in self.rows)]
        return head + "\n" + print_table(self.rows, cols)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "machine": self.machine,
            "settings": self.settings,
            **self.extra,
        }

    def to_json(self, path: str) -> str:
        """Write the results as JSON; returns the path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
        return path

    @classmethod
    def from_json(cls, path: str) -> BenchmarkResults:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        extra = {k: v for k, v in d.items() if k not in ("rows", "machine", "settings")}
        return cls(d["rows"], d["machine"], d["settings"], extra)

    def plot(self, path: str) -> str:
        """Throughput and Gini against batch x seq tokens (one line per sequence length, and the
        dense baseline dashed when measured) into one PNG; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for seq in sorted({r["seq"] for r in self.rows}):
            rs = sorted((r for r in self.rows if r["seq"] == seq), key=lambda r: r["batch"])
            toks = [r["batch"] * r["seq"] for r in rs]
            (line,) = a1.plot(toks, [r["tokens_per_s"] for r in rs], "o-", label=f"seq {seq}")
            if any("dense_tokens_per_s" in r for r in rs):
                a1.plot(
                    toks,
                    [r.get("dense_tokens_per_s", float("nan")) for r in rs],
                    "x--",
                    color=line.get_color(),
                    label=f"dense, seq {seq}",
                )
            a2.plot(toks, [r["gini"] for r in rs], "o-", label=f"seq {seq}")
        for ax, title in ((a1, "throughput (tokens/s)"), (a2, "load Gini (0 = balanced)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch x seq (tokens per step)")
            ax.set_title(title)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"MoEBenchmark {self.settings.get('mode')}: {self.settings.get('model')}")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ====================================================================== the benchmark


def _moe_layers(model: nn.Module) -> list:
    from .moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def _loss(out: Any) -> torch.Tensor:
    """A scalar to backpropagate from whatever the model returned."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if hasattr(out, "aux_loss") and hasattr(out, "output"):  # SystemOutput
        return out.output.float().square().mean() + out.aux_loss
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # MoELayer
        aux = getattr(out[1], "aux_loss", None) if len(out) > 1 else None
        base = out[0].float().square().mean()
        return base + aux if isinstance(aux, torch.Tensor) else base
    logits = getattr(out, "logits", out)
    if isinstance(logits, torch.Tensor):
        return logits.float().square().mean()
    raise TypeError(f"MoEBenchmark: cannot make a loss from a {type(out).__name__}")


class MoEBenchmark:
    """Benchmark ``model`` over every (batch, seq) of ``batch_sizes`` x ``sequence_lengths``.

    Args:
        model: a module containing :class:`MoELayer` s (our system, a MoELayer, an HF MoE model).
        batch_sizes, sequence_lengths: the grid.
        mode: ``"forward"`` (no grad, eval mode) or ``"train"`` (forward, loss, backward, SGD step).
        dense: optional dense model of equal active parameters, timed on the same inputs.
        input_fn: ``(batch, seq) -> input`` (default: token ids for models with a vocabulary,
            else ``randn(batch, seq, width)``).
        warmup, repeats: untimed and timed steps per configuration (median reported).
        memory: measure peak memory (one extra step per configuration).
        progress: a tqdm progress bar over the grid.
        replace_hf_blocks: swap an HF model's sparse MoE blocks for ours (default True).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Sequence[int] = (1, 8, 32),
        sequence_lengths: Sequence[int] = (128, 512, 2048),
        *,
        mode: str = "forward",
        dense: Optional[nn.Module] = None,
        input_fn: Optional[Callable[[int, int], Any]] = None,
        warmup: int = 2,
        repeats: int = 5,
        memory: bool = True,
        progress: bool = True,
        device: Optional[str] = None,
        replace_hf_blocks: bool = True,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoEBenchmark: model must be an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"MoEBenchmark: mode must be one of {MODES}, got {mode!r}")
        for name, xs in (("batch_sizes", batch_sizes), ("sequence_lengths", sequence_lengths)):
            if not xs or not all(isinstance(x, int) and not isinstance(x, bool) for x in xs):
                raise ValueError(f"MoEBenchmark: {name} must be a non-empty list of ints, got {xs}")
            if min(xs) < 1:
                raise ValueError(f"MoEBenchmark: {name} must be >= 1, got {list(xs)}")
        if warmup < 0 or repeats < 1:
            raise ValueError(
                f"MoEBenchmark: warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}"
            )
        if _is_hf(model) and replace_hf_blocks and not _moe_layers(model):
            from .integrations.transformers import replace_moe_blocks

            replace_moe_blocks(model)
        self.layers = _moe_layers(model)
        if not self.layers:
            raise ValueError(
                "MoEBenchmark: model has no MoELayer (for an HF model, a supported sparse MoE "
                "block: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)"
            )
        self.model, self.dense, self.mode = model, dense, mode
        self.batch_sizes, self.sequence_lengths = list(batch_sizes), list(sequence_lengths)
        self.warmup, self.repeats, self.memory, self.progress = warmup, repeats, memory, progress
        self.seed = seed
        p = next(iter(model.parameters()), None)
        self.device = torch.device(device or (p.device if p is not None else "cpu"))
        self.input_fn = input_fn or self._default_input_fn()

    # ------------------------------------------------------------------ inputs

    def _default_input_fn(self) -> Callable[[int, int], Any]:
        m = self.model
        cfg = getattr(m, "config", None)
        vocab = getattr(cfg, "vocab_size", None)
        g = torch.Generator().manual_seed(self.seed)
        if vocab:
            return lambda b, s: torch.randint(0, vocab, (b, s), generator=g).to(self.device)
        width = getattr(cfg, "input_dim", None) or getattr(cfg, "d_model", None)
        width = width or self.layers[0].d_model
        if width is None:
            raise ValueError("MoEBenchmark: cannot infer the input width: pass input_fn")
        return lambda b, s: torch.randn(b, s, width, generator=g).to(self.device)

    # ------------------------------------------------------------------ steps

    def _step_fn(self, model: nn.Module, x: Any) -> Callable[[], object]:
        hf = _is_hf(model)

        def call():
            if hf:
                return model(input_ids=x, labels=x) if self.mode == "train" else model(input_ids=x)
            return model(x)

        if self.mode == "forward":
            model.eval()

            def fwd():
                with torch.no_grad():
                    return call()

            return fwd
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def train():
            opt.zero_grad(set_to_none=True)
            loss = _loss(call())
            loss.backward()
            opt.step()
            return loss

        return train

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, fn: Callable[[], object]) -> list:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - t0)
        return times

    def _peak_memory(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            self._sync()
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        return peak_rss_growth(fn)

    def _capacity(self, tokens: int) -> float:
        """Slots per expert per layer (the same E and k in every layer is not assumed)."""
        caps = []
        for layer in self.layers:
            E, k = layer.num_experts, layer.k
            cf = getattr(layer.router, "capacity_factor", None)
            caps.append(math.ceil(cf * tokens * k / E) if cf else tokens * k / E)
        return float(statistics.fmean(caps))

    # ------------------------------------------------------------------ run

    def run(self) -> BenchmarkResults:
        """Run the grid (one configuration at a time) and return the results."""
        from .benchmarks.common import machine_info

        grid = [(b, s) for s in self.sequence_lengths for b in self.batch_sizes]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid), desc="MoEBenchmark", unit="config")
        counts: list = []

        def hook(_module, _inputs, output):
            info = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if info is not None and hasattr(info, "counts"):
                counts.append(info.counts.detach())

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        modes = [(m, m.training) for m in (self.model, self.dense) if m is not None]
        rows = []
        load0 = os.getloadavg()
        try:
            for b, s in grid:
                x = self.input_fn(b, s)
                row: dict = {"batch": b, "seq": s}
                fn = self._step_fn(self.model, x)
                times = self._time(fn)
                row["tokens_per_s"] = b * s / statistics.median(times)
                row["p50_ms"] = percentile(times, 50) * 1e3
                row["p99_ms"] = percentile(times, 99) * 1e3
                counts.clear()
                with torch.no_grad() if self.mode == "forward" else _null():
                    fn()
                stats = [
                    load_statistics(c, self._capacity(b * s)) for c in counts[: len(self.layers)]
                ]
                for key in stats[0] if stats else ():
                    row[key] = statistics.fmean(st[key] for st in stats)
                if self.memory:
                    row["peak_mem_mb"] = self._peak_memory(fn)
                if self.dense is not None:
                    dfn = self._step_fn(self.dense, x)
                    dtimes = self._time(dfn)
                    row["dense_tokens_per_s"] = b * s / statistics.median(dtimes)
                    row["dense_p50_ms"] = percentile(dtimes, 50) * 1e3
                    row["moe_over_dense"] = row["tokens_per_s"] / row["dense_tokens_per_s"]
                    if self.memory:
                        row["dense_peak_mem_mb"] = self._peak_memory(dfn)
                rows.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(batch=b, seq=s, tok_s=f"{row['tokens_per_s']:.0f}")
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:  # the modes the models had before the run
                m.train(training)
            if bar is not None:
                bar.close()
        settings = {
            "mode": self.mode,
            "model": type(self.model).__name__,
            "dense": type(self.dense).__name__ if self.dense is not None else None,
            "batch_sizes": self.batch_sizes,
            "sequence_lengths": self.sequence_lengths,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "moe_layers": len(self.layers),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "loadavg_start": list(load0),
            "loadavg_end": list(os.getloadavg()),
        }
        if self.dense is not None:
            settings["dense_parameters"] = sum(p.numel() for p in self.dense.parameters())
        return BenchmarkResults(rows, machine_info(str(self.device)), settings)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ====================================================================== command line


def _hf_model(path: str, random_init: bool):
    """An HF causal-LM from a config.json (random weights) or a model folder (its weights unless
    ``random_init``); local files only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .cli import CLIError

    if not os.path.exists(path):
        raise CLIError(f"--hf: {path!r} does not exist (a config.json or a model folder)")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        cfg = AutoConfig.from_pretrained(path if os.path.isdir(path) else path)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"--hf: cannot read a model config from {path!r}: {exc}") from None
    has_weights = os.path.isdir(path) and any(
        f.endswith(".safetensors") for f in os.listdir(folder)
    )
    if has_weights and not random_init:
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True
        )
    return AutoModelForCausalLM.from_config(cfg)


def add_parser(sub) -> None:
    from .cli import _int_in

    p = sub.add_parser("bench-model", help="MoEBenchmark of an HF MoE model or our MoEConfig")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", default=None, help="an HF config.json or model folder (local)")
    src.add_argument("--config", default=None, help="a moe_framework MoEConfig JSON file")
    p.add_argument("--batch-sizes", type=_int_in(1), nargs="+", default=[1, 8])
    p.add_argument("--seq-lens", type=_int_in(1), nargs="+", default=[128, 512])
    p.add_argument("--mode", choices=MODES, default="forward")
    p.add_argument("--warmup", type=_int_in(0), default=2)
    p.add_argument("--repeats", type=_int_in(1), default=5)
    p.add_argument("--threads", type=_int_in(0), default=0, help="torch threads (0: default)")
    p.add_argument("--random-init", action="store_true", help="ignore weights in --hf's folder")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=os.path.join("outputs", "bench_model"), help="JSON + plot")
    p.set_defaults(func=cmd_bench_model)


def cmd_bench_model(args) -> int:
    from .cli import CLIError

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.hf:
        model = _hf_model(args.hf, args.random_init)
    else:
        from .config import MoEConfig
        from .system import MixtureOfExpertsSystem

        try:
            model = MixtureOfExpertsSystem(MoEConfig.from_json(args.config).replace(kg_path=None))
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--config: {exc}") from None
    try:
        bench = MoEBenchmark(
            model,
            args.batch_sizes,
            args.seq_lens,
            mode=args.mode,
            warmup=args.warmup,
            repeats=args.repeats,
            memory=not args.no_memory,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    res = bench.run()
    res.print_summary()
    os.makedirs(args.out, exist_ok=True)
    print(f"wrote {res.to_json(os.path.join(args.out, 'bench_model.json'))}")
    print(f"wrote {res.plot(os.path.join(args.out, 'bench_model.png'))}")
    return 0
