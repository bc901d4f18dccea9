"""Hugging Face MoE blocks and models: transformers' experts implementations vs ours.

Same weights, same inputs, one process; contenders measured in interleaved rounds (each round times
every contender once, so a slow spell of a shared machine hits them all alike; the table keeps the
best round of each):

  * ``eager``, ``grouped_mm``, ``batched_mm``: transformers' experts implementations;
  * ``moe_framework``: ours (``model.set_experts_implementation("moe_framework")``: permute ->
    grouped GEMM -> fused gate -> grouped GEMM -> unpermute; the fused ``moe_decode`` op when
    ``T * k <= 4 E`` and no gradient is needed);
  * ``*+compile``: ``torch.compile`` of the block with that implementation.

Cells: the model's MoE block (router + experts, + shared experts where the family has them) at
``T`` tokens, forward (no_grad) at T = 1, 8, 32 (decode) and 2048 (prefill), forward+backward at
2048; ``ratio`` is the best contender's time over ours (> 1: ours faster), ``vs_default`` HF's
default ``grouped_mm`` over ours. Configs: tiny-width but realistic proportions of Mixtral,
Qwen3-MoE, OLMoE, GPT-OSS and DeepSeek-V3 at ``--d-model`` (512 by default).

Decode weight streaming (``--decode-bw``): ours at T = 1 through the block, each call with another
token from a pool so that the selected experts change (the block's expert weights, far larger than
the L3, are not cache resident): bytes of the k selected experts' weights / time, against the
triad bandwidth measured in the same run (``common.roofline``): the decode roofline.

    python -m moe_framework.benchmarks.bench_hf --quick          # Qwen3-MoE fp32, T = 1, 8, 32
    python -m moe_framework.benchmarks.bench_hf                  # every family, dtype, T, threads
    python -m moe_framework.benchmarks.bench_hf --families mixtral --dtypes bf16 --tokens 1 8
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch

import moe_framework  # noqa: F401
import moe_framework.integrations.transformers  # noqa: F401  (registers "moe_framework")
from moe_framework.benchmarks import common

IMPLS = ["eager", "grouped_mm", "batched_mm", "moe_framework"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def family_model(family: str, d: int, *, layers: int = 1, vocab: int = 256):
    """A randomly initialised HF model of ``family`` at width ``d`` (realistic proportions)."""
    import transformers as tf

    heads = max(1, d // 64)
    cfg: Any
    common_kw: dict[str, Any] = dict(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    if family == "mixtral":  # 8 experts, top-2, h = 2 d (3.5 d in the original)
        cfg = tf.MixtralConfig(
            **common_kw, intermediate_size=2 * d, num_local_experts=8, num_experts_per_tok=2
        )
        return tf.MixtralForCausalLM(cfg)
    if family == "qwen3_moe":  # 64 experts (128 in the original), top-8, h = 0.375 d
        cfg = tf.Qwen3MoeConfig(
            **common_kw,
            intermediate_size=3 * d,
            moe_intermediate_size=3 * d // 8,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=True,
        )
        return tf.Qwen3MoeForCausalLM(cfg)
    if family == "olmoe":  # 64 experts, top-8, h = d / 2
        cfg = tf.OlmoeConfig(
            **common_kw, intermediate_size=d // 2, num_experts=64, num_experts_per_tok=8
        )
        return tf.OlmoeForCausalLM(cfg)
    if family == "gpt_oss":  # 32 experts, top-4, h = d, biases, clamped SwiGLU
        cfg = tf.GptOssConfig(
            **common_kw,
            intermediate_size=d,
            num_local_experts=32,
            num_experts_per_tok=4,
            head_dim=64,
        )
        return tf.GptOssForCausalLM(cfg)
    if family == "deepseek_v3":  # 64 routed experts in 8 groups, top-8, h = d / 4, 1 shared
        common_kw["num_key_value_heads"] = heads  # MLA: as many KV heads as query heads
        cfg = tf.DeepseekV3Config(
            **common_kw,
            intermediate_size=3 * d,
            moe_intermediate_size=d // 4,
            n_routed_experts=64,
            n_shared_experts=1,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=0,
            kv_lora_rank=64,
            q_lora_rank=96,
            qk_rope_head_dim=32,
            qk_nope_head_dim=32,
            v_head_dim=64,
        )
        return tf.DeepseekV3ForCausalLM(cfg)
    raise ValueError(f"bench_hf: unknown family {family!r}")


FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"]


def _init(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def _block(model):
    return model.model.layers[0].mlp


def _call(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


# Contenders that materialise a weight copy per routed slot (batched_mm) run out of memory (or take
# minutes) on large token counts: they are left out of cells with more slots than this.
BATCHED_MM_MAX_SLOTS = 512


def _twin_with_routers(model):
    """A copy of ``model`` (same weights) whose standard routers run our fused ``ops.route``."""
    import copy

    from moe_framework.integrations.hf_routers import replace_routers

    twin = copy.deepcopy(model)
    replace_routers(twin)
    return twin


def _contenders(model, block, compile_: bool, twin=None) -> dict[str, Callable]:
    """name -> function(x, backward) running the block under that implementation (``twin``: the
    block of a same-weights copy whose router is ours, for ``moe_framework+routers``)."""

    def make(impl: str, compiled: bool, blk=block, owner=model):
        fn = torch.compile(blk) if compiled else blk

        def run(x, backward: bool):
            owner.set_experts_implementation(impl)
            if backward:
                _call(fn, x).sum().backward()
            else:
                with torch.no_grad():
                    _call(fn, x)

        return run

    out = {impl: make(impl, False) for impl in IMPLS}
    if twin is not None:
        out["moe_framework+routers"] = make("moe_framework", False, _block(twin), twin)
    if compile_:
        for impl in IMPLS:
            out[f"{impl}+compile"] = make(impl, True)
    return out


def _interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, min_time: float, warm: int = 2
) -> dict[str, float]:
    """Warm every contender up, then time them in interleaved rounds; best round of each (NaN for
    a contender that raised)."""
    best: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warm):
                fn()
        except Exception as e:  # noqa: BLE001 - a contender that cannot run this cell
            best[name] = float("nan")
            print(f"  {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in best and best[name] != best[name]:
                continue
            t = common.timeit(fn, warmup=0, min_reps=1 if min_time == 0 else 3, min_time=min_time)
            best[name] = min(best.get(name, float("inf")), t["median_s"])
    return best


def bench_block(
    family: str,
    d: int,
    dtype: torch.dtype,
    T: int,
    threads: int,
    *,
    backward: bool,
    rounds: int,
    compile_: bool,
    min_time: float,
    pool: int = 8,
    routers: bool = True,
) -> dict[str, float]:
    """The family's MoE block at ``T`` tokens: ms per call of every contender (best round)."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = family_model(family, d)
    _init(model)
    model = model.to(dtype)
    twin = _twin_with_routers(model) if routers else None
    block = _block(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, T, d, generator=g).to(dtype) for _ in range(pool)]
    if backward:
        for x in xs:
            x.requires_grad_(True)
    fns = _contenders(model, block, compile_, twin)
    k = model.config.num_experts_per_tok
    state = {"i": 0}
    bound: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        if name.startswith("batched_mm") and T * k > BATCHED_MM_MAX_SLOTS:
            continue

        def step(fn=fn):
            state["i"] = (state["i"] + 1) % pool
            fn(xs[state["i"]], backward)

        bound[name] = step
    return _interleaved(bound, rounds, min_time)


def bench_model(
    family: str,
    d: int,
    dtype: torch.dtype,
    threads: int,
    cell: str,
    *,
    rounds: int,
    layers: int,
    batch: int = 4,
    seq: int = 512,
    prompt: int = 64,
    new_tokens: int = 32,
) -> dict[str, float]:
    """Whole model: one training step (``batch x seq`` tokens, loss.backward, AdamW step) or
    ``generate`` (greedy, ``new_tokens`` from a ``prompt``-token prompt, KV cache): s per call."""
    torch.set_num_threads(threads)
    model = family_model(family, d, layers=layers)
    _init(model)
    model = model.to(dtype)
    twin = _twin_with_routers(model)
    k = model.config.num_experts_per_tok
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    fns: dict[str, Callable[[], object]] = {}
    impls = [(i, model, i) for i in IMPLS] + [("moe_framework+routers", twin, "moe_framework")]
    if cell == "train":
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        for name, m, impl in impls:
            if name.startswith("batched_mm") and batch * seq * k > BATCHED_MM_MAX_SLOTS:
                continue
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-6, foreach=True)

            def train_step(m=m, opt=opt, impl=impl):
                m.set_experts_implementation(impl)
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            fns[name] = train_step
    elif cell == "generate":
        ids = torch.randint(0, vocab, (1, prompt), generator=g)
        for name, m, impl in impls:
            m.eval()

            def gen(m=m, impl=impl):
                m.set_experts_implementation(impl)
                with torch.no_grad():
                    out = m.generate(
                        ids,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                assert out.shape[1] == prompt + new_tokens

            fns[name] = gen
    else:
        raise ValueError(f"bench_hf: unknown whole-model cell {cell!r}")
    return _interleaved(fns, rounds, 0.0, warm=1)


def _row(family, dtype, threads, cell, T, best, load0) -> dict:
    """One table row: ms of every contender, the best rival, ours / rival and ours / default."""
    others = {k: v for k, v in best.items() if not k.startswith("moe_framework") and v == v}
    ours = {k: v for k, v in best.items() if k.startswith("moe_framework") and v == v}
    rival = min(others, key=lambda k: others[k])
    mine = min(ours, key=lambda k: ours[k])
    row: dict[str, Any] = {
        "family": family,
        "dtype": dtype,
        "threads": threads,
        "cell": cell,
        "T": T,
    }
    row.update({f"{k}_ms": v * 1e3 for k, v in best.items()})
    row.update(
        {
            "best_rival": rival,
            "ours_best": mine,
            "ratio": others[rival] / ours[mine],
            "vs_default": best["grouped_mm"] / ours[mine],
            "load_start": load0[0],
            "load_end": os.getloadavg()[0],
        }
    )
    return row


SUMMARY_COLS = [
    "family",
    "dtype",
    "threads",
    "cell",
    "T",
    "grouped_mm_ms",
    "best_rival",
    "rival_ms",
    "ours_best",
    "ours_ms",
    "ratio",
    "vs_default",
    "goal",
]


def summary(rows: list) -> list:
    """Compact rows for the docs: HF default, the best rival, our best variant, the two ratios and
    whether the cell meets the issue's goals (>= 1.0x the best rival everywhere, >= 1.3x the
    default for whole-model cells)."""
    out = []
    for r in rows:
        whole = r["cell"] in ("train", "generate")
        ok = r["ratio"] >= 1.0 and (not whole or r["vs_default"] >= 1.3)
        out.append(
            {
                **{c: r[c] for c in ("family", "dtype", "threads", "cell", "T")},
                "grouped_mm_ms": r.get("grouped_mm_ms", float("nan")),
                "best_rival": r["best_rival"],
                "rival_ms": r[f"{r['best_rival']}_ms"],
                "ours_best": r["ours_best"],
                "ours_ms": r[f"{r['ours_best']}_ms"],
                "ratio": r["ratio"],
                "vs_default": r["vs_default"],
                "goal": "met" if ok else "NOT met",
            }
        )
    return out


def merge(paths: list, out_dir=None, name: str = "bench_hf_matrix") -> dict:
    """Merge the rows of several bench_hf JSON files (later files win for the same family, dtype,
    threads, cell and T) into one JSON and table; returns the payload."""
    import json

    rows: dict[tuple, dict] = {}
    runs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs.append(
            {
                "file": os.path.basename(path),
                "timestamp": data.get("timestamp"),
                "argv": data.get("argv"),
                "loadavg_start": data.get("loadavg_start"),
                "loadavg_end": data.get("loadavg_end"),
            }
        )
        for r in data.get("rows", []):
            r = dict(r)
            r.setdefault("cell", "block " + r.pop("pass", "fwd"))
            rows[(r["family"], r["dtype"], r["threads"], r["cell"], r["T"])] = r
    merged = list(rows.values())
    table = common.print_table(summary(merged), SUMMARY_COLS, title="HF MoE: ms per call")
    payload = {"runs": runs, "rows": merged, "summary": summary(merged), "table": table}
    common.write_json(name, payload, out_dir)
    return payload


def stage_breakdown(family: str, d: int, dtype: torch.dtype, tokens, threads: int) -> list:
    """Ours at small T, stage by stage (each stage timed alone on the same inputs, ms): the HF
    router, the general path's permute, grouped GEMM in, swiglu, grouped GEMM out, unpermute and
    their sum; the fused ``moe_decode`` op alone; the whole experts implementation (op + Python
    path); HF's default ``grouped_mm`` experts on the same routing, for scale."""
    from transformers.integrations import moe as hf_moe

    from moe_framework import ops
    from moe_framework.integrations.hf_experts import (
        _cached_gate_of,
        moe_framework_experts_forward,
    )

    torch.set_num_threads(threads)
    model = family_model(family, d)
    _init(model)
    model = model.to(dtype)
    block = _block(model)
    ex = block.experts
    kind = _cached_gate_of(ex)[0]
    if kind != "silu" or not hasattr(block, "gate") or getattr(ex, "has_bias", False):
        raise ValueError(
            f"bench_hf --stages: {family}'s experts (gate {kind!r}, bias "
            f"{getattr(ex, 'has_bias', False)}) are not plain SwiGLU experts routed by "
            "`block.gate`; the stage breakdown (swiglu, moe_decode) covers mixtral, qwen3_moe, "
            "olmoe and deepseek_v3"
        )
    w_in, w_out = ex.gate_up_proj, ex.down_proj
    trans_b = not getattr(ex, "is_transposed", False)
    num_experts = w_in.shape[0]
    grouped = hf_moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    g = torch.Generator().manual_seed(4)

    def stage_row(T: int) -> dict:
        pool = [torch.randn(T, d, generator=g).to(dtype) for _ in range(8)]
        with torch.no_grad():
            routed = [block.gate(x) for x in pool]
        ids = [r[2] for r in routed]
        wts = [r[1] for r in routed]
        st = {"i": 0}

        def timed(fn) -> float:
            def step():
                st["i"] = (st["i"] + 1) % len(pool)
                with torch.no_grad():
                    fn(st["i"])

            return common.timeit(step, warmup=3, min_reps=20, min_time=0.1)["median_s"] * 1e3

        perm = [ops.permute(pool[i], ids[i], num_experts) for i in range(len(pool))]
        hs = [ops.grouped_gemm(p[0], w_in, p[2], trans_b=trans_b) for p in perm]
        acts = [ops.swiglu(h) for h in hs]
        ys = [ops.grouped_gemm(a, w_out, p[2], trans_b=trans_b) for a, p in zip(acts, perm)]
        row: dict[str, Any] = {
            "family": family,
            "dtype": str(dtype).replace("torch.", ""),
            "T": T,
            "T*k": T * ids[0].shape[1],
        }
        row["router_ms"] = timed(lambda i: block.gate(pool[i]))
        row["permute_ms"] = timed(lambda i: ops.permute(pool[i], ids[i], num_experts))
        row["gemm_in_ms"] = timed(
            lambda i: ops.grouped_gemm(perm[i][0], w_in, perm[i][2], trans_b=trans_b)
        )
        row["swiglu_ms"] = timed(lambda i: ops.swiglu(hs[i]))
        row["gemm_out_ms"] = timed(
            lambda i: ops.grouped_gemm(acts[i], w_out, perm[i][2], trans_b=trans_b)
        )
        row["unpermute_ms"] = timed(lambda i: ops.unpermute(ys[i], perm[i][1], wts[i]))
        row["general_sum_ms"] = sum(
            row[c] for c in ("permute_ms", "gemm_in_ms", "swiglu_ms", "gemm_out_ms", "unpermute_ms")
        )
        row["moe_decode_op_ms"] = timed(
            lambda i: ops.moe_decode(pool[i], ids[i], wts[i], w_in, w_out, trans_b)
        )
        row["ours_experts_ms"] = timed(
            lambda i: moe_framework_experts_forward(ex, pool[i], ids[i], wts[i])
        )
        # The whole experts implementation forced onto each path (the data behind the
        # DECODE_SLOTS_PER_EXPERT threshold): general = permute -> grouped GEMMs -> unpermute.
        saved = ops.DECODE_SLOTS_PER_EXPERT
        try:
            for path, slots in (("general", 0), ("decode", 1 << 30)):
                ops.DECODE_SLOTS_PER_EXPERT = dict.fromkeys(saved, slots)
                row[f"ours_{path}_path_ms"] = timed(
                    lambda i: moe_framework_experts_forward(ex, pool[i], ids[i], wts[i])
                )
        finally:
            ops.DECODE_SLOTS_PER_EXPERT = saved
        row["general/decode"] = row["ours_general_path_ms"] / row["ours_decode_path_ms"]
        row["hf_grouped_mm_experts_ms"] = timed(lambda i: grouped(ex, pool[i], ids[i], wts[i]))
        return row

    rows = [stage_row(T) for T in tokens]
    common.print_table(rows, title=f"ours stage by stage ({family}, {dtype}, {threads} thread)")
    return rows


def profile_train(family: str, d: int, dtype: torch.dtype, threads: int, layers: int) -> dict:
    """torch.profiler over one whole-model training step (4 x 512 tokens) under HF's default
    ``grouped_mm`` and ours: the ops with the most self CPU time, ms."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    model = family_model(family, d, layers=layers)
    _init(model)
    model = model.to(dtype).train()
    twin = _twin_with_routers(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator())
    out = {}
    for name, m, impl in [
        ("grouped_mm", model, "grouped_mm"),
        ("moe_framework", model, "moe_framework"),
        ("moe_framework+routers", twin, "moe_framework"),
    ]:
        m.set_experts_implementation(impl)

        def step(m=m):
            m(input_ids=ids, labels=ids).loss.backward()
            m.zero_grad(set_to_none=True)

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ev) / 1e3
        top = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ev[:15]
        ]
        out[name] = {"total_self_ms": total, "top": top}
        common.print_table(top, title=f"{family} train step, {name}: total self {total:.1f} ms")
    return out


def _expert_params_per_expert(model) -> tuple[int, int]:
    """(MoE layers, weights per routed expert) of ``model``: every module holding
    ``gate_up_proj`` / ``down_proj`` (or ``up_proj`` / ``down_proj``, non-gated) expert stacks
    ``[E, ...]``; biases left out (their FLOPs are not GEMM work)."""
    layers, per_expert = 0, 0
    for m in model.modules():
        first = getattr(m, "gate_up_proj", None)
        if first is None:
            first = getattr(m, "up_proj", None)
        down = getattr(m, "down_proj", None)
        if not isinstance(first, torch.Tensor) or not isinstance(down, torch.Tensor):
            continue
        if first.dim() != 3 or down.dim() != 3:
            continue  # a dense MLP (nn.Linear modules), e.g. DeepSeek-V3's shared experts
        E = first.shape[0]
        n = (first.numel() + down.numel()) // E
        if per_expert not in (0, n):
            raise ValueError(f"bench_hf: MoE layers of different expert sizes ({per_expert}, {n})")
        per_expert = n
        layers += 1
    if layers == 0:
        raise ValueError(f"bench_hf: no expert stacks found in {type(model).__name__}")
    return layers, per_expert


def train_bound(
    family: str, d: int, dtype: torch.dtype, threads: int, layers: int, rounds: int = 3
) -> dict:
    """How much faster than HF's default (``grouped_mm``) *any* experts implementation could make
    one whole-model training step (4 x 512 tokens, AdamW), measured, not assumed:

    * ``hf_ms`` / ``ours_ms``: the step under ``grouped_mm`` and under ours (interleaved rounds,
      best);
    * ``ours_kernels_share``: the share of our step's CPU time (torch.profiler) spent in our ops
      and what they call (``moe_framework::*``: permute, grouped GEMMs forward / dgrad / wgrad --
      with the BLAS calls of large groups --, SwiGLU and their backwards, unpermute) --
      everything an experts implementation owns;
    * ``expert_gflop``: the experts' GEMM work (tokens x k rows through each MoE layer's
      ``[d -> 2h -> h -> d]`` per expert, forward + input gradient + weight gradient = 3x forward),
      and ``peak_gflops``: this core count's arithmetic peak (``common.cpu_compute_peak``: fp32
      FMAs, or AVX512-BF16 dot products for bf16) -- no GEMM runs faster;
    * ``ideal_ms`` = our step without our ops plus the GEMM work at the peak: the step with a
      perfect experts implementation (routing, permutes and activation free, GEMMs at 100% of the
      peak); ``bound`` = ``hf_ms / ideal_ms``, the largest ratio any implementation can reach;
    * ``bound_blas``: the same with the GEMMs at ``blas_gflops``, the rate torch's BLAS reaches on
      one 2048 x 2048 product at this thread count (what the best GEMM library here achieves)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    model = family_model(family, d, layers=layers)
    _init(model)
    model = model.to(dtype).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def step(impl: str) -> None:
        model.set_experts_implementation(impl)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    best = _interleaved(
        {"grouped_mm": lambda: step("grouped_mm"), "moe_framework": lambda: step("moe_framework")},
        rounds,
        0.0,
        warm=1,
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step("moe_framework")
    # Our ops with everything they call (a large group handed to torch's BLAS runs as a child
    # aten::mm): the total time of each outermost moe_framework:: event.
    events = prof.events()
    total = sum(e.self_cpu_time_total for e in events)

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("moe_framework::"):
                return False
            p = p.cpu_parent
        return True

    ours_ops = sum(
        e.cpu_time_total for e in events if e.name.startswith("moe_framework::") and outermost(e)
    )
    share = ours_ops / total
    moe_layers, per_expert = _expert_params_per_expert(model)
    rows = 4 * 512 * model.config.num_experts_per_tok
    gflop = 3 * 2 * rows * per_expert * moe_layers / 1e9
    peak = common.cpu_compute_peak(threads)
    peak_gflops = peak["bf16_gflops"] if dtype == torch.bfloat16 else peak["fp32_gflops"]
    hf_ms, ours_ms = best["grouped_mm"] * 1e3, best["moe_framework"] * 1e3
    row = {
        "family": family,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "threads": threads,
        "hf_ms": hf_ms,
        "ours_ms": ours_ms,
        "ratio": hf_ms / ours_ms,
        "ours_kernels_share": share,
        "ours_kernels_ms": share * ours_ms,
        "expert_gflop": gflop,
        "peak_gflops": peak_gflops,
    }
    if peak_gflops:
        row["gemm_at_peak_ms"] = gflop / peak_gflops * 1e3
        row["ideal_ms"] = ours_ms * (1 - share) + row["gemm_at_peak_ms"]
        row["bound"] = hf_ms / row["ideal_ms"]
    # The same with the GEMMs at the rate torch's BLAS reaches on one large square product (what
    # the best GEMM library here does; the peak above is what no code can pass).
    blas = common._measure_gemm_flops(threads, dtype, "cpu", 2048) / 1e9
    row["blas_gflops"] = blas
    row["ideal_blas_ms"] = ours_ms * (1 - share) + gflop / blas * 1e3
    row["bound_blas"] = hf_ms / row["ideal_blas_ms"]
    return row


def _commit() -> str:
    """The git commit of the measured source (with ``-dirty``), or ``unknown`` outside a checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return head or os.environ.get("MOE_BENCH_COMMIT", "unknown")


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--backward-tokens", type=int, nargs="*", default=None)
    p.add_argument(
        "--cells",
        nargs="*",
        default=None,
        choices=["block", "train", "generate"],
        help="block (forward at --tokens, forward+backward at --backward-tokens), train (whole "
        "model, 4 x 512 tokens), generate (32 tokens from 64); default block",
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers of whole-model cells")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile contenders"
    )
    p.add_argument("--decode-bw", action="store_true", help="the decode weight-streaming rate")
    p.add_argument(
        "--stages",
        action="store_true",
        help="ours stage by stage at --tokens (decode) and a profile of one training step",
    )
    p.add_argument(
        "--train-bound",
        action="store_true",
        help="the whole-model training step's bound: HF's default against a perfect experts "
        "implementation (our step without our ops + the experts' GEMMs at the arithmetic peak)",
    )
    p.add_argument("--tag", default=None, help="write bench_hf_<tag>.json (one chunk of a matrix)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="merge these bench_hf JSON files into bench_hf_matrix.json and its table; runs nothing",
    )
    a = p.parse_args(argv)
    if a.merge:
        merge(a.merge, a.out)
        return
    load0 = os.getloadavg()
    if a.train_bound:
        bound_rows = []
        for fam in a.families or FAMILIES:
            for dt in a.dtypes or ["fp32"]:
                for th in common.thread_counts(a.threads or [1]):
                    bound_rows.append(
                        train_bound(fam, a.d_model, DTYPES[dt], th, a.layers, a.rounds or 3)
                    )
                    print(bound_rows[-1], flush=True)
        cols = ["family", "dtype", "threads", "hf_ms", "ours_ms", "ratio", "ours_kernels_ms"]
        cols += ["expert_gflop", "peak_gflops", "gemm_at_peak_ms", "ideal_ms", "bound"]
        cols += ["blas_gflops", "ideal_blas_ms", "bound_blas"]
        table = common.print_table(
            bound_rows, cols, title="whole-model training step: the most any experts code can gain"
        )
        common.write_json(
            "bench_hf_train_bound" + (f"_{a.tag}" if a.tag else ""),
            {
                "machine": common.machine_info(),
                "rows": bound_rows,
                "table": table,
                "d_model": a.d_model,
                "layers": a.layers,
                "commit": _commit(),
                "loadavg_start": load0,
                "loadavg_end": os.getloadavg(),
            },
            a.out,
        )
        return
    if a.stages:
        st_payload: dict[str, Any] = {"machine": common.machine_info(), "stages": [], "train": {}}
        for fam in a.families or ["qwen3_moe"]:
            for dt in a.dtypes or ["fp32"]:
                for th in common.thread_counts(a.threads or [1]):
                    st_payload["stages"] += stage_breakdown(
                        fam, a.d_model, DTYPES[dt], a.tokens or [1, 8, 32], th
                    )
                    if "train" in (a.cells or []):
                        st_payload["train"][f"{fam}/{dt}/{th}"] = profile_train(
                            fam, a.d_model, DTYPES[dt], th, a.layers
                        )
        st_payload["loadavg_start"], st_payload["loadavg_end"] = load0, os.getloadavg()
        st_payload["commit"] = _commit()
        common.write_json("bench_hf_stages" + (f"_{a.tag}" if a.tag else ""), st_payload, a.out)
        return
    families = a.families or (["qwen3_moe"] if a.quick else FAMILIES)
    dtypes = a.dtypes or (["fp32"] if a.quick else list(DTYPES))
    tokens = a.tokens if a.tokens is not None else ([1, 8, 32] if a.quick else [1, 8, 32, 2048])
    btokens = a.backward_tokens if a.backward_tokens is not None else ([] if a.quick else [2048])
    threads = common.thread_counts(a.threads or ([1] if a.quick else None))
    cells = a.cells or ["block"]
    rounds = a.rounds or (3 if a.quick else 5)
    min_time = 0.05 if a.quick else 0.2
    rows: list = []
    name = "bench_hf" + (f"_{a.tag}" if a.tag else ("_quick" if a.quick else ""))

    def save(final: bool) -> None:  # after every row, so that a chunk cut short keeps its rows
        payload: dict[str, Any] = {
            "machine": common.machine_info(),
            "rows": rows,
            "argv": argv if argv is not None else sys.argv[1:],
            "quick": a.quick,
            "d_model": a.d_model,
            "layers": a.layers,
            "commit": _commit(),
            "complete": final,
        }
        if final:
            cols = ["family", "dtype", "threads", "cell", "T"] + sorted(
                {c for r in rows for c in r if c.endswith("_ms")}
            )
            cols += ["best_rival", "ratio", "vs_default"]
            payload["table"] = common.print_table(
                rows, cols, title="HF MoE: ms per call (best round)"
            )
            common.print_table(summary(rows), SUMMARY_COLS, title="summary")
            if a.decode_bw:
                payload["decode_bw"] = decode_bandwidth(families, a.d_model, threads, min_time)
        payload["loadavg_start"], payload["loadavg_end"] = load0, os.getloadavg()
        common.write_json(name, payload, a.out)

    for fam in families:
        for dt in dtypes:
            for th in threads:
                if "block" in cells:
                    for T, bwd in [(T, False) for T in tokens] + [(T, True) for T in btokens]:
                        l0 = os.getloadavg()
                        best = bench_block(
                            fam,
                            a.d_model,
                            DTYPES[dt],
                            T,
                            th,
                            backward=bwd,
                            rounds=rounds,
                            compile_=not a.no_compile,
                            min_time=min_time,
                        )
                        rows.append(
                            _row(fam, dt, th, "block fwd+bwd" if bwd else "block fwd", T, best, l0)
                        )
                        print(rows[-1], flush=True)
                        save(False)
                for cell in [c for c in cells if c != "block"]:
                    l0 = os.getloadavg()
                    best = bench_model(
                        fam,
                        a.d_model,
                        DTYPES[dt],
                        th,
                        cell,
                        rounds=max(2, rounds - 2),
                        layers=a.layers,
                    )
                    T = 4 * 512 if cell == "train" else 32
                    rows.append(_row(fam, dt, th, cell, T, best, l0))
                    print(rows[-1], flush=True)
                    save(False)
    save(True)


def decode_bandwidth(families, d, threads, min_time) -> list:
    """Ours at T = 1: selected-expert weight bytes per second vs the measured triad bandwidth."""
    out = []
    for th in threads:
        roof = common.roofline(th, quick=True)
        for fam in families:
            torch.set_num_threads(th)
            model = family_model(fam, d)
            _init(model)
            model.set_experts_implementation("moe_framework")
            block = _block(model)
            ex = block.experts
            k = model.config.num_experts_per_tok
            w_bytes = sum(
                p[0].numel() * p.element_size()
                for n, p in ex.named_parameters()
                if n in ("gate_up_proj", "down_proj")
            )
            g = torch.Generator().manual_seed(2)
            pool = [torch.randn(1, 1, d, generator=g) for _ in range(256)]
            state = {"i": 0}

            def step(state=state, pool=pool, block=block):
                state["i"] = (state["i"] + 1) % len(pool)
                with torch.no_grad():
                    _call(block, pool[state["i"]])

            t = common.timeit(step, warmup=5, min_time=min_time)["median_s"]
            gbs = k * w_bytes / t / 1e9
            row = {
                "family": fam,
                "threads": th,
                "ms": t * 1e3,
                "GB/s": gbs,
                "triad_GB/s": roof["triad_gbs"],
                "%triad": 100 * gbs / roof["triad_gbs"],
                "total_expert_MB": ex.gate_up_proj.numel() * 4 * 1.5 / 1e6,
            }
            out.append(row)
    common.print_table(out, title="decode weight streaming (ours, T = 1, fp32)")
    return out


if __name__ == "__main__":
    main()
