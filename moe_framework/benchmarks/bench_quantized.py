"""Decode with weight-only quantised experts: INT8 / INT4 (ops.grouped_gemm_q through
QuantizedExperts) vs our bf16 ExpertBank (ops.grouped_gemm), and the per-expert torch loop.

Each call is one MoE experts stage at decode: T = 1..8 tokens, top-k routed over E experts
(random routing, a fresh draw per call), SwiGLU experts ``[E, 2h, d]`` + ``[E, d, h]``. Weights are
NOT cache-resident: every variant rotates through enough copies of the layer that the bytes it
cycles through are >= 4x the last-level cache, so each call reads its experts from DRAM.

"bytes/token" is the packed weights (+ scales, zero points) of the distinct experts a call touches,
divided by T; "GB/s" is those bytes over the call's median time, and "% triad" compares that with
the triad bandwidth measured in the same run (common.roofline's triad) at 1 thread ("% triad 1t")
and at 2 threads ("% triad 2t": what both cores pull; one core may not reach it). Each probe runs
on 4 KiB and on 2 MiB pages, at the start and at the end of the run; the reference is the best of
them. Every variant's weights sit on 2 MiB pages (moe_framework.huge_pages: QuantizedExperts
allocates its packed weights there, the bf16 ExpertBank weights are moved there); --ab-pages adds
every row again on ordinary 4 KiB pages, timed in the same interleaved rounds. Because this
machine's bandwidth moves a lot within minutes, every cell of every round is also compared with a
triad taken right before it (at the run's thread count, 2 MiB pages): "% triad now" is the median
over the rounds of that ratio. "read" is a
pure streaming read in the same run (torch.sum over a float32 array, one vector add per 32 bytes:
the fastest a kernel that reads its weights once can go). Ratios ("x bf16") are against the
faster of our two bf16 ExpertBank layouts (out_in, in_out) in the same run. The "a8" rows are the
same quantised experts with INT8 activations (act_quant="int8": integer dot products); the other
quantised rows are weight-only (the default).

    python -m moe_framework.benchmarks.bench_quantized            # d=1024, h=768, E=32, k=2
    python -m moe_framework.benchmarks.bench_quantized --threads 2 --no-peer
    python -m moe_framework.benchmarks.bench_quantized --quick    # smoke run

Cells are timed in --rounds interleaved rounds (default 3; best round kept). --tuning KNOB=VALUE
sets CPU kernel knobs first (an A/B of one knob, e.g. ggq_a8_column_tiles=0). --ab KNOB=VALUE
adds every quantised row again, timed with that knob set (labelled "[KNOB=VALUE]"), interleaved
with the default cells of the same run: an A/B that a load change on the machine hits alike, e.g.
--ab ggq_avx512=0 (the AVX2 kernels on an AVX-512 CPU).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import time

import torch

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.experts import ExpertBank
from moe_framework.huge_pages import empty_huge_pages, huge_pages_available, use_huge_pages
from moe_framework.ops.tuning import set_tuning
from moe_framework.quantization import QuantizedExperts, set_act_quant

LLC_BYTES = 32 * 1024 * 1024  # this machine's L3 (lscpu); rotation covers 4x that
# The torchao peer runs in its own venv (torch 2.13.0 CPU + torchao): MOE_BENCH_TORCHAO_PYTHON,
# default /work/venvs/torchao/bin/python; skipped (and said so in the JSON) when it is missing.
TORCHAO_PYTHON = os.environ.get("MOE_BENCH_TORCHAO_PYTHON", "/work/venvs/torchao/bin/python")

# The peer, run in the torchao venv: the same experts as nn.Linear pairs (bf16), quantised with
# torchao's quantize_ (Int8WeightOnlyConfig; IntxWeightOnlyConfig int4 per-group 128, torchao's
# CPU int4 weight-only path: Int4WeightOnlyConfig has no CPU packing in torchao 0.18), run as the
# per-expert loop at decode, rotating through layer copies exactly as ours do.
_TORCHAO_SCRIPT = r"""
import json, math, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
d, h, E, k = cfg["d"], cfg["h"], cfg["E"], cfg["k"]
gen = torch.Generator().manual_seed(1)

def layer():
    m = torch.nn.ModuleList(
        torch.nn.ModuleDict({"gate_up": torch.nn.Linear(d, 2 * h, bias=False),
                             "down": torch.nn.Linear(h, d, bias=False)}) for _ in range(E))
    return m.to(torch.bfloat16)

def run_loop(m, x, counts):
    out = torch.zeros_like(x)
    lo = 0
    for e, c in enumerate(counts):
        if c:
            g, u = m[e]["gate_up"](x[lo:lo + c]).chunk(2, dim=-1)
            out[lo:lo + c] = m[e]["down"](torch.nn.functional.silu(g) * u)
            lo += c
    return out

rows = []
for name, make_cfg, bytes_per_weight in (
    ("torchao int8wo", lambda: Int8WeightOnlyConfig(), 1.0),
    ("torchao int4wo g128 (intx)", lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)), 1.0),
):
    per_layer = E * 3 * d * h * bytes_per_weight
    copies = max(2, math.ceil(cfg["target"] / per_layer))
    layers = []
    for _ in range(copies):
        m = layer()
        quantize_(m, make_cfg())
        layers.append(m)
    with torch.inference_mode():
        for T in cfg["tokens"]:
            calls = []
            for _ in range(64):
                ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
                calls.append(torch.bincount(ids.flatten(), minlength=E).tolist())
            xs = [torch.randn(T * k, d, dtype=torch.bfloat16) for _ in range(4)]
            i = 0
            for _ in range(3):
                run_loop(layers[i % copies], xs[i % 4], calls[i % 64]); i += 1
            times = []
            t_end = time.perf_counter() + cfg["min_time"]
            while len(times) < 5 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                run_loop(layers[i % copies], xs[i % 4], calls[i % 64]); i += 1
                times.append(time.perf_counter() - t0)
            rows.append({"variant": name, "impl": "torchao loop", "T": T,
                         "us/call": statistics.median(times) * 1e6, "rotation MB": copies * per_layer / 1e6})
    del layers
print(json.dumps(rows))
"""


def _llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return LLC_BYTES


def _plain_pages(layer):
    """A copy of ``layer`` whose weights sit in torch's allocator (ordinary pages)."""
    plain = copy.deepcopy(layer)
    for sub in plain.modules():
        for p in sub._parameters.values():
            if p is not None:
                p.data = p.data.clone()
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.clone()
    return plain


def _expert_bytes(module) -> float:
    """Bytes of one expert's weights (+ scales / zero points)."""
    if isinstance(module, QuantizedExperts):
        return module.weight_bytes() / module.num_experts
    return sum(p.numel() * p.element_size() for p in module.parameters()) / module.num_experts


def _routing(T: int, E: int, k: int, gen: torch.Generator):
    """offsets [E+1] of T tokens routed top-k to distinct random experts, and the number of
    distinct experts touched."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    counts = torch.bincount(ids.flatten(), minlength=E)
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(counts, 0)
    return off, int((counts > 0).sum())


def _loop_forward(w_in, w_out, x, off):
    """The per-expert torch loop (bf16 F.linear per expert with rows, what a plain PyTorch MoE
    does at decode)."""
    out = torch.zeros_like(x)
    offs = off.tolist()
    for e in range(len(offs) - 1):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            h = torch.nn.functional.linear(x[lo:hi], w_in[e])
            g, u = h.chunk(2, dim=-1)
            out[lo:hi] = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w_out[e])
    return out


def _ours(m, x, off):
    return m(x, off)


def _loop(m, x, off):
    return _loop_forward(m.weight_in, m.w_out, x, off)


def _time_rotating(fn, layers, calls, xs, min_time: float) -> dict:
    """common.timeit of fn(layer, x, offsets), each call on the next layer copy and routing."""
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = i + 1
        return fn(layers[i % len(layers)], xs[i % len(xs)], calls[i % len(calls)][0])

    return common.timeit(step, min_time=min_time)


def _run_torchao(d, h, E, k, token_counts, target, threads, quick, rows) -> str:
    """Run the torchao peer in its venv; appends its rows; returns what ran (or why not)."""
    if not os.path.exists(TORCHAO_PYTHON):
        return f"not run: no torchao venv at {TORCHAO_PYTHON} (set MOE_BENCH_TORCHAO_PYTHON)"
    cfg = {
        "d": d, "h": h, "E": E, "k": k, "tokens": list(token_counts), "target": target,
        "threads": threads, "min_time": 0.1 if quick else 0.5,
    }  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [TORCHAO_PYTHON, "-c", _TORCHAO_SCRIPT, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    peer_rows = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.extend(peer_rows)
    version = subprocess.run(
        [
            TORCHAO_PYTHON,
            "-c",
            "import torch, torchao; print(torch.__version__, torchao.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"ran: torch, torchao = {version}"


def _read_bandwidth(threads: int, numel: int, huge_pages: bool = False) -> float:
    """Bytes/s of a pure streaming read: torch.sum over a float32 array of numel (not cached), on
    2 MiB pages with ``huge_pages``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = (
            empty_huge_pages((numel,), torch.float32).uniform_()
            if huge_pages
            else torch.rand(numel)
        )
        t = common.timeit(lambda: torch.sum(x), min_time=0.3)
        return 4.0 * numel / t["min_s"]
    finally:
        torch.set_num_threads(prev)


def run(
    quick: bool = False,
    threads=None,
    out_dir=None,
    peer: bool = True,
    tuning=None,
    rounds: int = 0,
    ab=None,
    ab_pages: bool = False,
) -> dict:
    """The decode benchmark (module docstring); ``rounds`` interleaved rounds per cell, best kept
    (default 3, 1 with ``quick``); ``ab``: {knob: value} for the quantised rows' A/B copies;
    ``ab_pages``: every row again with the weights on ordinary 4 KiB pages."""
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    threads = (threads or [1])[0]
    torch.set_num_threads(threads)
    d, h, E, k = (512, 256, 32, 2) if quick else (1024, 768, 32, 2)
    token_counts = (1, 4) if quick else (1, 2, 4, 8)
    rounds = rounds or (1 if quick else 3)
    min_time = 0.1 if quick else 0.5
    target = (1 if quick else 4) * _llc_bytes()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = ExpertBank(d_model=d, d_hidden=h, num_experts=E, layout="out_in", init_std=0.02)
    variants = {
        "bf16 out_in": lambda: ExpertBank(
            d_model=d, d_hidden=h, num_experts=E, layout="out_in", dtype=torch.bfloat16
        ),
        "bf16 in_out": lambda: ExpertBank(
            d_model=d, d_hidden=h, num_experts=E, layout="in_out", dtype=torch.bfloat16
        ),
        "int8": lambda: QuantizedExperts.from_float(base.weight_in, base.w_out, bits=8),
        "int4_g128": lambda: QuantizedExperts.from_float(
            base.weight_in, base.w_out, bits=4, group_size=128
        ),
    }
    # Only the triad of common.roofline: its bf16 GEMM probe takes minutes on CPUs without
    # AVX512-BF16 (torch's CPU bf16 mm runs at ~0.3 GFLOP/s there), and decode needs bandwidth.
    numel = (16 if quick else 64) * 1024 * 1024
    roof: dict = {"threads": threads, "huge_pages_available": huge_pages_available()}
    pages = ("4k", "2m") if roof["huge_pages_available"] else ("4k",)

    # common caches its probe per process; this one is taken afresh at the start and the end
    triad = common._measure_bandwidth.__wrapped__

    def probe(when: str) -> None:
        # Both page sizes, at the start and at the end of the run: the reference is the best of
        # them all (the most this machine streamed), so a probe that happened to run slow cannot
        # flatter the kernels.
        for nt in (1, 2):
            for pg in pages:
                hp = pg == "2m"
                tr = triad(nt, "cpu", numel, huge_pages=hp) / 1e9
                rd = _read_bandwidth(nt, numel, huge_pages=hp) / 1e9
                roof[f"triad_gbs_{nt}t_{pg}_{when}"] = tr
                roof[f"read_gbs_{nt}t_{pg}_{when}"] = rd
                for key, v in ((f"triad_gbs_{nt}t", tr), (f"read_gbs_{nt}t", rd)):
                    roof[key] = max(roof.get(key, 0.0), v)
        roof["triad_gbs"] = roof[f"triad_gbs_{min(threads, 2)}t"]

    probe("start")
    # Every variant's rotation of layer copies is built first, then the cells are timed in
    # interleaved rounds (best round kept): a load change on this shared machine hits every
    # variant alike instead of the few that happened to run during it.
    cases: list = []
    with torch.inference_mode():
        for name, make in variants.items():
            first = make()
            per_layer = _expert_bytes(first) * E
            n_copies = max(2, math.ceil(target / per_layer))
            layers = [first] + [make() for _ in range(n_copies - 1)]
            for layer in layers:
                if isinstance(layer, ExpertBank):
                    tr = layer.layout == "in_out"
                    layer.weight_in.copy_(base.weight_in.transpose(1, 2) if tr else base.weight_in)
                    layer.w_out.copy_(base.w_out.transpose(1, 2) if tr else base.w_out)
                # Every variant streams from 2 MiB pages (QuantizedExperts allocates its packed
                # weights there itself; this moves the bf16 ExpertBank weights too).
                use_huge_pages(layer)
            quantized = isinstance(first, QuantizedExperts)
            rotations = [(layers, "")]
            if ab_pages:
                # The same weights on ordinary pages (copies from torch's allocator).
                plain = [_plain_pages(layer) for layer in layers]
                rotations.append((plain, " [4k pages]"))
            settings = [{}] + ([ab] if quantized and ab else [])
            for mode, knobs_ab, (rot, page_label) in [
                (m, a, r)
                for m in ([None, "int8"] if quantized else [None])
                for a in settings
                for r in rotations
            ]:
                suffix = "".join(f" [{n}={v}]" for n, v in knobs_ab.items()) + page_label
                for T in token_counts:
                    calls = [_routing(T, E, k, gen) for _ in range(64)]
                    xs = [torch.randn(T * k, d, dtype=torch.bfloat16) for _ in range(4)]
                    touched = sum(c[1] for c in calls) / len(calls)
                    impls = {"ours": _ours}
                    if name == "bf16 out_in":
                        impls["torch loop"] = _loop
                    for impl, fn in impls.items():
                        cases.append(
                            {
                                "label": name + (" a8" if mode else "") + suffix,
                                "knobs": knobs_ab,
                                "impl": impl,
                                "T": T,
                                "fn": fn,
                                "layers": rot,
                                "quantized": quantized,
                                "mode": mode,
                                "calls": calls,
                                "xs": xs,
                                "bytes_per_call": touched * _expert_bytes(first),
                                "rotation_mb": n_copies * per_layer / 1e6,
                            }
                        )
        best = [math.inf] * len(cases)
        # This machine's bandwidth moves by up to 2x within minutes (a shared host): each cell is
        # also compared with a triad taken right before it, at the run's thread count, on 2 MiB
        # pages where available ("% triad now": the median over rounds of that ratio).
        now: list = [[] for _ in cases]
        pnum = 32 * 1024 * 1024  # 3 x 128 MiB: far beyond the last-level cache
        parr = [
            empty_huge_pages((pnum,), torch.float32)
            if roof["huge_pages_available"]
            else torch.empty(pnum)
            for _ in range(3)
        ]
        for arr in parr:
            arr.uniform_()

        def triad_now() -> float:
            t = common.timeit(
                lambda: torch.add(parr[0], parr[1], alpha=1.5, out=parr[2]), min_time=0.1
            )
            return 3.0 * pnum * 4 / t["min_s"] / 1e9

        for _ in range(rounds):
            for i, c in enumerate(cases):
                tri = triad_now()
                if c["quantized"]:
                    for layer in c["layers"]:
                        set_act_quant(layer, c["mode"])
                prev = {n: set_tuning(n, v) for n, v in c["knobs"].items()}
                try:
                    t = _time_rotating(c["fn"], c["layers"], c["calls"], c["xs"], min_time)
                finally:
                    for n, v in prev.items():
                        set_tuning(n, v)
                best[i] = min(best[i], t["median_s"])
                now[i].append(100.0 * c["bytes_per_call"] / t["median_s"] / 1e9 / tri)
        parr.clear()
    probe("end")
    rows = []
    for c, t_best, pct_now in zip(cases, best, now):
        gbs = c["bytes_per_call"] / t_best / 1e9
        rows.append(
            {
                "variant": c["label"],
                "impl": c["impl"],
                "T": c["T"],
                "us/call": t_best * 1e6,
                "bytes/token": c["bytes_per_call"] / c["T"],
                "GB/s": gbs,
                "% triad now": statistics.median(pct_now),
                "% triad now (rounds)": pct_now,
                "% triad 1t": 100.0 * gbs / roof["triad_gbs_1t"],
                "% triad 2t": 100.0 * gbs / roof["triad_gbs_2t"],
                "% read": 100.0 * gbs / roof[f"read_gbs_{min(threads, 2)}t"],
                "rotation MB": c["rotation_mb"],
            }
        )
    del cases
    peer_note = (
        _run_torchao(d, h, E, k, token_counts, target, threads, quick, rows)
        if peer
        else "not run (--no-peer)"
    )
    # "x bf16": against the faster of our two bf16 layouts at the same T
    best_bf16: dict = {}
    for r in rows:
        if r["impl"] == "ours" and r["variant"].startswith("bf16"):
            best_bf16[r["T"]] = min(best_bf16.get(r["T"], float("inf")), r["us/call"])
    for r in rows:
        ref = best_bf16.get(r["T"])
        r["x bf16"] = ref / r["us/call"] if ref else float("nan")
    columns = ["variant", "impl", "T", "us/call", "x bf16", "bytes/token", "GB/s"]
    columns += ["% triad now", "% triad 1t", "% triad 2t", "% read"]
    title = (
        f"decode experts stage: d={d}, h={h}, E={E}, k={k}, {threads} thread(s), triad "
        f"{roof['triad_gbs_1t']:.1f} / {roof['triad_gbs_2t']:.1f} GB/s (1 / 2 threads), "
        f"read {roof['read_gbs_1t']:.1f} / {roof['read_gbs_2t']:.1f} GB/s (best of the probes on "
        f"{' and '.join(pages)} pages at the start and the end)"
    )
    common.print_table(rows, columns, title)
    payload = {
        "benchmark": "quantized",
        "shape": {"d_model": d, "d_hidden": h, "num_experts": E, "k": k},
        "threads": threads,
        "quick": quick,
        "machine": common.machine_info(),
        "roofline": roof,
        "rows": rows,
        "torchao": peer_note,
        "tuning": tuning or {},
        "ab": ab or {},
        "ab_pages": ab_pages,
        "rounds": rounds,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
    }
    name = (
        "bench_quantized" + ("_quick" if quick else "") + (f"_t{threads}" if threads != 1 else "")
    )
    common.write_json(name, payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--no-peer", action="store_true", help="skip the torchao peer")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3)")
    common.add_tuning_arg(p)
    p.add_argument(
        "--ab",
        nargs="*",
        default=[],
        metavar="KNOB=VALUE",
        help="time every quantised row again with these knobs set (interleaved A/B)",
    )
    p.add_argument(
        "--ab-pages",
        action="store_true",
        help="time every row again with the weights on ordinary 4 KiB pages (interleaved A/B)",
    )
    args = p.parse_args(argv)
    tuning = common.apply_tuning(p, args.tuning)
    ab = common.parse_tuning(p, args.ab)
    run(
        quick=args.quick,
        threads=args.threads,
        out_dir=args.out,
        peer=not args.no_peer,
        tuning=tuning,
        rounds=args.rounds,
        ab=ab,
        ab_pages=args.ab_pages,
    )


if __name__ == "__main__":
    main()
