"""The per-module gate cache of the "moe_framework" experts implementation (a swapped activation
or flag is seen at once, compiled tracing never writes it) and bench_hf's chunk merge (later chunks
win, the goals are judged from the rows' times)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOLERANCES

transformers = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.integrations.moe")

from moe_framework.integrations import hf_experts  # noqa: E402
from moe_framework.integrations import transformers as _integ  # noqa: E402, F401

E, K, D, H = 5, 2, 12, 7


def _experts(gen):
    cfg = transformers.MixtralConfig(
        hidden_size=D,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=17,
    )
    ex = transformers.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return ex


def _inputs(gen, T):
    x = torch.randn(T, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    return x, ids, w


def _eager(ex, x, ids, w):
    """transformers' own "eager" experts forward on the module (the independent reference)."""
    ex.config._experts_implementation = "eager"
    try:
        return ex(x, ids, w)
    finally:
        ex.config._experts_implementation = "moe_framework"


@pytest.mark.parametrize("T", [1, 13])  # the fused decode op and the general path
def test_swapped_activation_is_seen_after_a_cached_call(seed, T):
    gen = torch.Generator().manual_seed(seed)
    ex = _experts(gen)
    x, ids, w = _inputs(gen, T)
    with torch.no_grad():
        hf_experts.moe_framework_experts_forward(ex, x, ids, w)  # caches the SiLU rule
        assert "_moe_framework_gate" in ex.__dict__
        ex.act_fn = transformers.activations.ACT2FN["gelu_pytorch_tanh"]
        got = hf_experts.moe_framework_experts_forward(ex, x, ids, w)
        want = _eager(ex, x, ids, w)
        # the reference, by hand: gelu(gate) * up per selected expert
        ref = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                e = int(ids[t, j])
                g, u = (ex.gate_up_proj[e].double() @ x[t].double()).chunk(2)
                a = torch.nn.functional.gelu(g, approximate="tanh") * u
                ref[t] += float(w[t, j]) * (ex.down_proj[e].double() @ a)
    torch.testing.assert_close(got, ref.float(), **TOLERANCES["layer"][torch.float32])
    torch.testing.assert_close(got, want, **TOLERANCES["layer"][torch.float32])


def test_compiled_call_leaves_no_cache_and_matches_eager(seed):
    gen = torch.Generator().manual_seed(seed)
    ex = _experts(gen)
    x, ids, w = _inputs(gen, 3)
    fn = torch.compile(hf_experts.moe_framework_experts_forward, fullgraph=True)
    with torch.no_grad():
        got = fn(ex, x, ids, w)
    assert "_moe_framework_gate" not in ex.__dict__
    with torch.no_grad():
        want = _eager(ex, x, ids, w)
    ref = torch.zeros(3, D, dtype=torch.float64)
    for t in range(3):
        for j in range(K):
            e = int(ids[t, j])
            g, u = (ex.gate_up_proj[e].double() @ x[t].double()).chunk(2)
            ref[t] += float(w[t, j]) * (
                ex.down_proj[e].double() @ (torch.nn.functional.silu(g) * u)
            )
    torch.testing.assert_close(got, ref.float(), **TOLERANCES["layer"][torch.float32])
    torch.testing.assert_close(got, want, **TOLERANCES["layer"][torch.float32])


def _chunk(path, rows):
    path.write_text(json.dumps({"rows": rows, "loadavg_start": [1.0], "loadavg_end": [1.5]}))
    return str(path)


def test_bench_hf_merge_later_chunks_win_and_goals_follow_the_times(tmp_path):
    from moe_framework.benchmarks import bench_hf

    def row(cell, ours, grouped, eager, fam="mixtral"):
        best = {"eager": eager / 1e3, "grouped_mm": grouped / 1e3, "moe_framework": ours / 1e3}
        return bench_hf._row(fam, "fp32", 1, cell, 8, best, (0.5, 0.5, 0.5))

    first = [row("block fwd", 4.0, 5.0, 6.0), row("train", 10.0, 12.0, 11.0)]
    second = [row("train", 8.0, 12.0, 11.0)]  # a rerun of the train cell
    payload = bench_hf.merge(
        [_chunk(tmp_path / "a.json", first), _chunk(tmp_path / "b.json", second)],
        str(tmp_path),
    )
    assert (tmp_path / "bench_hf_matrix.json").exists()
    by_cell = {r["cell"]: r for r in payload["summary"]}
    assert set(by_cell) == {"block fwd", "train"}
    assert by_cell["block fwd"]["best_rival"] == "grouped_mm"
    assert by_cell["block fwd"]["ratio"] == pytest.approx(5.0 / 4.0)
    assert by_cell["block fwd"]["goal"] == "met"
    # the rerun replaced the first train row: 11 / 8 vs the best rival, 12 / 8 = 1.5 vs default
    assert by_cell["train"]["ours_ms"] == pytest.approx(8.0)
    assert by_cell["train"]["ratio"] == pytest.approx(11.0 / 8.0)
    assert by_cell["train"]["goal"] == "met"
    # 1.2x the default is below the whole-model goal of 1.3x even though ours beats every rival
    slow = bench_hf.summary([row("generate", 10.0, 12.0, 11.0)])[0]
    assert slow["ratio"] == pytest.approx(1.1) and slow["goal"] == "NOT met"
    assert [r["file"] for r in payload["runs"]] == ["a.json", "b.json"]


def test_bench_hf_stages_refuses_experts_it_cannot_break_down():
    """``--stages`` times the SwiGLU stages and ``moe_decode``: GPT-OSS (clamped gate, biases,
    ``block.router``) gets a ValueError naming the family, not an AttributeError mid-run."""
    pytest.importorskip("transformers")
    from moe_framework.benchmarks import bench_hf

    with pytest.raises(ValueError, match="gpt_oss's experts .*clamped"):
        bench_hf.stage_breakdown("gpt_oss", 64, torch.float32, [1], 1)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_bench_hf_train_bound_counts_the_routed_experts_work(family):
    # The training-step bound counts the GEMM work of the routed experts only: per expert the
    # gate/up and down weights (GPT-OSS's are stored transposed, biases left out), one MoE layer
    # per decoder layer; DeepSeek-V3's shared experts are a dense MLP and are not counted.
    from moe_framework.benchmarks import bench_hf

    d = 64
    model = bench_hf.family_model(family, d, layers=3)
    layers, per_expert = bench_hf._expert_params_per_expert(model)
    cfg = model.config
    h = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert layers == 3
    assert per_expert == 3 * d * h  # [2h, d] + [d, h]
    with pytest.raises(ValueError, match="no expert stacks found in Linear"):
        bench_hf._expert_params_per_expert(torch.nn.Linear(4, 4))
