"""Outputs and gradients stay bitwise equal to the ones recorded in tests/data/golden/ (see
tests/make_golden.py, and RECORDED_AT there for the commit). A refactor that changes any bit of a
forward, a backward, a routing decision or a draft report fails here; an intended numerical
change re-records the files and says so in its commit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from golden_isa import kernel_isa_tag
from safetensors import safe_open
from safetensors.torch import load_file

from moe_framework import MixtureOfExpertsSystem, MoELayer, Supervisor

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "golden")
CASES = sorted(
    f[: -len(".safetensors")]
    for f in os.listdir(GOLDEN)
    if f.endswith(".safetensors") and not f.startswith("system_")
)


def _load(name):
    """The record of case ``name``, with this CPU build's own bits where they differ (see
    tests/golden_isa.py): the override file may only replace tensors the record has."""
    path = os.path.join(GOLDEN, f"{name}.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    record = load_file(path)
    tag = kernel_isa_tag()
    override = os.path.join(GOLDEN, tag, f"{name}.safetensors")
    if tag != "base" and os.path.exists(override):
        extra = load_file(override)
        assert set(extra) <= set(record), f"{override} holds tensors the record has not"
        assert all(extra[k].shape == record[k].shape for k in extra), override
        record.update(extra)
    return meta, record


def _build(meta) -> torch.nn.Module:
    s = meta["sizes"]
    layer_kw = dict(meta["layer_kw"])
    k = layer_kw.pop("k")
    sup = Supervisor(s["d_model"], s["num_experts"], k, **meta["sup_kw"])
    return MoELayer.build(
        d_model=s["d_model"],
        d_hidden=s["d_hidden"],
        num_experts=s["num_experts"],
        k=k,
        router=sup,
        report_top_tokens=3,
        **layer_kw,
    )


# The records name parameters as the layer did before it was composed of parts (issue 13): the
# Qwen2-MoE shared gate sat beside the shared experts. MoELayer.load_state_dict maps these old
# names itself; the gradient records are compared under today's names.
_RENAMED = {"shared_gate.weight": "shared_experts.gate.weight"}


def _current_name(name: str, gated: bool) -> str:
    if name in _RENAMED:
        return _RENAMED[name]
    if gated and name.startswith("shared_experts."):
        return "shared_experts.ffn." + name[len("shared_experts.") :]
    return name


def test_golden_cases_cover_every_routing_strategy():
    from moe_framework.supervisor import STRATEGIES

    seen = {_load(c)[0]["sup_kw"].get("strategy", "topk") for c in CASES}
    assert seen == set(STRATEGIES)


@pytest.fixture
def one_thread():
    # Recorded on one thread: torch's own matmuls (the router's nn.Linear) reduce in a
    # thread-count-dependent order, so bitwise comparisons pin the thread count too.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def compute_case(meta, g) -> tuple:
    """Run the recorded case now: ``(results by record key, the names computed)`` (the record's
    keys for outputs and gradients, gradients under the names the record uses)."""
    layer = _build(meta)
    state = {k[len("state.") :]: v for k, v in g.items() if k.startswith("state.")}
    layer.load_state_dict(state, strict=True)
    layer.train(meta["training"])
    x = g["x"].clone().requires_grad_(True)
    y, info = layer(x)
    (y.square().mean() + info.aux_loss).backward()
    got = {
        "y": y.detach(),
        "weights": info.weights,
        "ids": info.ids,
        "counts": info.counts,
        "aux_loss": info.aux_loss.detach(),
        "grad_x": x.grad,
        "reports.mean_output": info.reports.mean_output,
        "reports.confidence": info.reports.confidence,
        "reports.token_count": info.reports.token_count,
        "reports.top_tokens": info.reports.top_tokens,
    }
    for n, p in layer.named_parameters():
        got[f"grad.{n}"] = p.grad
    gated = "state.shared_gate.weight" in g
    now = {}
    for k in g:
        if k == "x" or k.startswith("state."):
            continue
        name = f"grad.{_current_name(k[len('grad.') :], gated)}" if k.startswith("grad.") else k
        now[k] = got.get(name)
    return now, set(got)


@pytest.mark.parametrize("case", CASES)
def test_moe_layer_matches_golden_bitwise(case, one_thread):
    meta, g = _load(case)
    now, names = compute_case(meta, g)
    expected_names = {
        f"grad.{_current_name(k[len('grad.') :], 'state.shared_gate.weight' in g)}"
        if k.startswith("grad.")
        else k
        for k in now
    }
    assert names == expected_names
    for key, got in now.items():
        want = g[key]
        assert got.dtype == want.dtype, key
        assert torch.equal(got, want), f"{case}: {key} differs from the golden record"


def test_system_saved_in_v1_format_loads_and_predicts_bitwise(one_thread):
    system = MixtureOfExpertsSystem.load(os.path.join(GOLDEN, "system_v1")).eval()
    io = load_file(os.path.join(GOLDEN, "system_v1_io.safetensors"))
    with torch.no_grad():
        out = system(io["x"])
    assert torch.equal(out.output, io["output"])
