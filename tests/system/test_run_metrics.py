"""Run metrics (moe_framework.run_metrics, system.metrics()): the numbers agree with what the
training steps returned and with the knowledge graph, the JSON lines and TensorBoard logs are
written, and a profiler trace shows every stage by name (also: compiled code has no ranges)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch.profiler import profile

from moe_framework import MixtureOfExpertsSystem, MoEConfig, MoELayer
from moe_framework.metrics import load_summary
from moe_framework.run_metrics import RunMetrics, stage


def _system(tmp_path, **kw):
    kw.setdefault("consolidation_interval", 2)
    cfg = MoEConfig(
        input_dim=12,
        output_dim=3,
        d_model=16,
        d_hidden=8,
        num_experts=4,
        k=2,
        kg_path=str(tmp_path / "kg.sqlite"),
        **kw,
    )
    return MixtureOfExpertsSystem(cfg)


def test_metrics_agree_with_the_steps_and_the_knowledge_graph(tmp_path, seed):
    torch.manual_seed(seed)
    with _system(tmp_path) as model:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        model.log_metrics(str(tmp_path / "run.jsonl"), str(tmp_path / "tb"))
        results, tokens = [], 0
        for b, s in ((3, 5), (2, 7), (4, 1), (1, 2)):
            x, y = torch.randn(b, s, 12), torch.randint(0, 3, (b, s))
            results.append(model.training_step((x, y), opt))
            tokens += b * s
        m = model.metrics()
        assert m["steps"] == 4 and m["tokens"] == tokens
        lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
        steps = [r for r in lines if r["event"] == "step"]
        cons = [r for r in lines if r["event"] == "consolidation"]
        assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in cons] == [2, 4]
        step_s = sum(r["step_ms"] for r in steps) / 1e3
        assert m["tokens_per_s"] == pytest.approx(tokens / step_s, rel=1e-9)
        assert m["step_ms"] == pytest.approx(step_s * 1e3 / 4, rel=1e-9)
        times = sorted(r["step_ms"] for r in steps)
        assert m["step_ms_p50"] == pytest.approx((times[1] + times[2]) / 2, rel=1e-9)
        assert times[2] <= m["step_ms_p99"] <= times[3]
        assert m["mean_loss"] == pytest.approx(sum(r.loss for r in results) / 4, rel=1e-9)
        for r, res in zip(steps, results):
            assert r["loss"] == res.loss
            parts = sum(r[f"{k}_ms"] for k in ("routing", "dispatch", "experts", "combine"))
            assert 0 < parts <= r["step_ms"] and r["other_ms"] >= 0
        # balance: load_summary of the per-expert slots summed over the steps, per layer
        for layer, bal in enumerate(m["balance"]):
            load = [sum(res.stats["load"][layer][e] for res in results) for e in range(4)]
            want = load_summary(load)
            assert bal["gini"] == pytest.approx(want["gini"]) and bal["cv"] == pytest.approx(
                want["cv"]
            )
        assert m["dropped"] == [0, 0] and m["drop_rate"] == 0.0
        # knowledge-graph growth: the store's size after each consolidation
        assert [g["step"] for g in m["kg_growth"]] == [2, 4]
        assert m["kg_growth"][-1]["nodes"] == len(model.knowledge_graph)
        assert m["kg_growth"][-1]["edges"] == model.knowledge_graph.num_edges()
        assert m["kg_growth"][0]["nodes"] <= m["kg_growth"][1]["nodes"]
        assert m["stage_ms"]["consolidation"] > 0
        model.run_metrics.close()
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_drops_are_counted_with_a_capacity_factor(tmp_path):
    torch.manual_seed(0)
    with _system(tmp_path, capacity_factor=0.25, consolidation_interval=0) as model:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        res = model.training_step((torch.randn(4, 6, 12), torch.randint(0, 3, (4, 6))), opt)
        m = model.metrics()
    assert m["dropped"] == [int(d) for d in res.stats["dropped"]] and sum(m["dropped"]) > 0
    routed = sum(sum(layer) for layer in res.stats["load"])
    assert m["drop_rate"] == pytest.approx(sum(m["dropped"]) / (routed + sum(m["dropped"])))


def test_a_profiler_trace_shows_every_stage_by_name(tmp_path):
    with _system(tmp_path) as model:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        batch = (torch.randn(2, 3, 12), torch.randint(0, 3, (2, 3)))
        model.training_step(batch, opt)
        with profile() as prof:
            model.training_step(batch, opt)  # step 2 consolidates
        names = {e.name for e in prof.events()}
    stages = ("training_step", "routing", "dispatch", "experts", "combine", "consolidation")
    assert {f"moe_framework::{s}" for s in stages} <= names


def test_stages_are_timed_only_while_recording_and_compile_without_ranges():
    rec = RunMetrics()
    with stage("experts"):
        pass
    assert rec.snapshot()["stage_ms"]["experts"] == 0
    layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2)
    x = torch.randn(5, 8)
    with rec.recording():
        layer(x)
    assert rec._stage_seconds["experts"] > 0
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with profile() as prof:
        y, _ = compiled(x)
    assert not any(e.name == "moe_framework::routing" for e in prof.events())
    torch.testing.assert_close(y, layer(x)[0])
