"""MoEBenchmark (moe_framework.benchmark) and `python -m moe_framework bench-model`: the load
statistics against plain formulas, the rows against what the model's routing did, forward and
training modes, the dense baseline, JSON round trip, plots, HF models through our block swap."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from moe_framework import MixtureOfExpertsSystem, MoEConfig, MoELayer, cli
from moe_framework.benchmark import (
    BenchmarkResults,
    MoEBenchmark,
    load_statistics,
    percentile,
)


def test_percentile_matches_numpy(seed):
    rng = random.Random(seed)
    xs = [rng.random() for _ in range(rng.randint(1, 30))]
    for q in (0, 50, 99, 100, rng.uniform(0, 100)):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_load_statistics_against_plain_formulas(seed):
    rng = random.Random(seed)
    E = rng.randint(2, 12)
    counts = [rng.choice([0, rng.randint(1, 50)]) for _ in range(E)]
    counts[0] = max(counts[0], 1)
    cap = rng.uniform(5, 30)
    st = load_statistics(torch.tensor(counts), cap)
    c = np.array(counts, dtype=np.float64)
    p = c / c.sum()
    mean_abs_diff = np.abs(c[:, None] - c[None, :]).sum() / (2 * E * E * c.mean())
    assert st["gini"] == pytest.approx(mean_abs_diff, abs=1e-12)
    assert st["cv"] == pytest.approx(c.std() / c.mean(), abs=1e-12)
    assert st["max_over_mean"] == pytest.approx(c.max() / c.mean(), abs=1e-12)
    assert st["dead_experts"] == int((c == 0).sum())
    ent = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert st["entropy"] == pytest.approx(ent, abs=1e-12)
    assert st["normalized_entropy"] == pytest.approx(ent / math.log(E), abs=1e-12)
    assert st["utilisation"] == pytest.approx(np.minimum(c / cap, 1).mean(), abs=1e-12)
    empty = load_statistics(torch.zeros(4), 3.0)
    assert empty["gini"] == 0 and empty["dead_experts"] == 4 and empty["utilisation"] == 0


def _system(**kw):
    cfg = MoEConfig(input_dim=12, output_dim=3, d_model=16, d_hidden=8, num_experts=4, k=2, **kw)
    return MixtureOfExpertsSystem(cfg)


def test_forward_rows_report_the_routing_the_model_did(tmp_path):
    torch.manual_seed(0)
    model = _system()
    xs = {}

    def input_fn(b, s):
        xs[(b, s)] = torch.randn(b, s, 12)
        return xs[(b, s)]

    model.eval()
    res = MoEBenchmark(
        model, [1, 3], [5], input_fn=input_fn, warmup=0, repeats=3, progress=False
    ).run()
    assert not model.training
    assert [(r["batch"], r["seq"]) for r in res.rows] == [(1, 5), (3, 5)]
    for r in res.rows:
        out = model(xs[(r["batch"], r["seq"])])
        stats = [
            load_statistics(info.counts, r["batch"] * r["seq"] * 2 / 4) for info in out.routing
        ]
        for key in ("gini", "cv", "max_over_mean", "utilisation", "normalized_entropy"):
            assert r[key] == pytest.approx(sum(s[key] for s in stats) / len(stats), abs=1e-9)
        assert r["p50_ms"] <= r["p99_ms"]
        assert r["tokens_per_s"] > 0 and "peak_mem_mb" in r
    assert res.machine["torch_threads"] == torch.get_num_threads()
    assert res.settings["moe_layers"] == 2 and res.settings["mode"] == "forward"
    path = res.to_json(str(tmp_path / "r.json"))
    back = BenchmarkResults.from_json(path)
    assert back.rows == json.loads(json.dumps(res.rows)) and back.settings == res.settings
    png = res.plot(str(tmp_path / "r.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "tokens_per_s" in res.print_summary()


def test_training_mode_updates_weights_and_times_a_dense_baseline():
    torch.manual_seed(0)
    layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=1)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8))
    before = [p.detach().clone() for p in layer.parameters()]
    res = MoEBenchmark(
        layer,
        [2],
        [3, 4],
        mode="train",
        dense=dense,
        warmup=1,
        repeats=2,
        progress=False,
        memory=False,
    ).run()
    assert any(not torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert layer.training and dense.training  # modes restored (a fresh module trains)
    for r in res.rows:
        assert r["moe_over_dense"] == pytest.approx(r["tokens_per_s"] / r["dense_tokens_per_s"])
        assert "peak_mem_mb" not in r
    assert res.settings["dense"] == "Sequential"


def test_capacity_factor_sets_the_capacity_of_the_utilisation():
    torch.manual_seed(0)
    model = _system(capacity_factor=1.0)
    res = MoEBenchmark(model, [2], [8], warmup=0, repeats=1, progress=False, memory=False).run()
    out = model(torch.randn(2, 8, 12))  # the default inputs are random too: only the range
    assert 0 < res.rows[0]["utilisation"] <= 1.0
    assert all(int(i.counts.max()) <= math.ceil(1.0 * 16 * 2 / 4) for i in out.routing)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="both"), "mode must be one of"),
        (dict(batch_sizes=[]), "batch_sizes must be a non-empty list"),
        (dict(sequence_lengths=[0]), "sequence_lengths must be >= 1"),
        (dict(repeats=0), "repeats >= 1"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    args = dict(batch_sizes=[1], sequence_lengths=[2])
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEBenchmark(_system(), **args)
    with pytest.raises(ValueError, match="has no MoELayer"):
        MoEBenchmark(torch.nn.Linear(2, 2), [1], [1])


def test_bench_model_cli_on_an_hf_config_swaps_the_blocks(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=50,
        max_position_embeddings=32,
    )
    cfg.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["bench-model", "--hf", str(tmp_path / "model" / "config.json"), "--batch-sizes", "1"]
    argv += ["--seq-lens", "4", "--repeats", "1", "--warmup", "0", "--mode", "train"]
    assert cli.main(argv + ["--no-progress", "--no-memory", "--out", str(out)]) == 0
    data = json.loads((out / "bench_model.json").read_text())
    assert data["settings"]["moe_layers"] == 2 and data["settings"]["mode"] == "train"
    assert data["rows"][0]["tokens_per_s"] > 0
    assert (out / "bench_model.png").exists()
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert cli.main(["bench-model", "--hf", str(tmp_path / "nowhere")]) == 2
