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


def _contenders(model, block, compile_: bool) -> dict[str, Callable]:
    """name -> function(x, backward) running the block under that implementation."""

    def make(impl: str, compiled: bool):
        fn = torch.compile(block) if compiled else block

        def run(x, backward: bool):
            model.set_experts_implementation(impl)
            if backward:
                _call(fn, x).sum().backward()
            else:
                with torch.no_grad():
                    _call(fn, x)

        return run

    out = {impl: make(impl, False) for impl in IMPLS}
    if compile_:
        for impl in IMPLS:
            out[f"{impl}+compile"] = make(impl, True)
    return out


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
) -> dict[str, float]:
    torch.set_num_threads(threads)
    model = family_model(family, d)
    _init(model)
    model = model.to(dtype)
    block = _block(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, T, d, generator=g).to(dtype) for _ in range(pool)]
    if backward:
        for x in xs:
            x.requires_grad_(True)
    fns = _contenders(model, block, compile_)
    best: dict[str, float] = {}
    for name, fn in fns.items():  # warm up (and compile) every contender once
        if name.endswith("+compile"):
            torch._dynamo.reset()
        try:
            fn(xs[0], backward)
            fn(xs[1 % pool], backward)
        except Exception as e:  # noqa: BLE001 - a contender that cannot run this cell
            best[name] = float("nan")
            print(f"  {family} {name}: {type(e).__name__}: {str(e)[:120]}")
    state = {"i": 0}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in best and best[name] != best[name]:
                continue

            def step(fn=fn):
                state["i"] = (state["i"] + 1) % pool
                fn(xs[state["i"]], backward)

            t = common.timeit(step, warmup=1, min_reps=3, min_time=min_time)["median_s"]
            best[name] = min(best.get(name, float("inf")), t)
    return best


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--backward-tokens", type=int, nargs="*", default=None)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile contenders"
    )
    p.add_argument("--decode-bw", action="store_true", help="the decode weight-streaming rate")
    a = p.parse_args(argv)
    load0 = os.getloadavg()
    families = a.families or (["qwen3_moe"] if a.quick else FAMILIES)
    dtypes = a.dtypes or (["fp32"] if a.quick else list(DTYPES))
    tokens = a.tokens or ([1, 8, 32] if a.quick else [1, 8, 32, 2048])
    btokens = a.backward_tokens if a.backward_tokens is not None else ([] if a.quick else [2048])
    threads = common.thread_counts(a.threads or ([1] if a.quick else None))
    rounds = a.rounds or (3 if a.quick else 5)
    min_time = 0.05 if a.quick else 0.2
    rows = []
    for fam in families:
        for dt in dtypes:
            for th in threads:
                cells = [(T, False) for T in tokens] + [(T, True) for T in btokens]
                for T, bwd in cells:
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
                    ours = best["moe_framework"]
                    others = {
                        k: v
                        for k, v in best.items()
                        if not k.startswith("moe_framework") and v == v
                    }
                    ours_best = min(
                        v for k, v in best.items() if k.startswith("moe_framework") and v == v
                    )
                    rival = min(others, key=lambda k: others[k])
                    row = {
                        "family": fam,
                        "dtype": dt,
                        "threads": th,
                        "T": T,
                        "pass": "fwd+bwd" if bwd else "fwd",
                    }
                    row.update({f"{k}_ms": v * 1e3 for k, v in best.items()})
                    row.update(
                        {
                            "best_rival": rival,
                            "ratio": others[rival] / ours_best,
                            "vs_default": best["grouped_mm"] / ours,
                        }
                    )
                    rows.append(row)
                    print(row, flush=True)
    cols = (
        ["family", "dtype", "threads", "T", "pass"]
        + [c for c in rows[0] if c.endswith("_ms")]
        + ["best_rival", "ratio", "vs_default"]
    )
    table = common.print_table(rows, cols, title="HF MoE block: ms per call (best round)")
    payload = {
        "machine": common.machine_info(),
        "rows": rows,
        "table": table,
        "argv": argv,
        "quick": a.quick,
    }
    if a.decode_bw:
        payload["decode_bw"] = decode_bandwidth(families, a.d_model, threads, min_time)
    payload["loadavg_start"], payload["loadavg_end"] = load0, os.getloadavg()
    common.write_json("bench_hf" + ("_quick" if a.quick else ""), payload, a.out)


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
