"""Writes tests/data/golden/: reference outputs of MoELayer and MixtureOfExpertsSystem recorded
with the code at a known commit, so a refactor can prove that outputs and gradients stay bitwise
equal (tests/test_golden.py). Each case stores its layer's parameters and buffers, the input,
and forward/backward results; the test rebuilds the layer from the case's JSON arguments, loads
the stored state and compares with ``torch.equal``.

Run only to re-record after an intended numerical change, and say so in the commit message:
    python tests/make_golden.py

The main records hold the AVX2 / baseline CPU build's bits. On a CPU that runs the AVX-512
clones (tests/golden_isa.py), record the tensors whose bits differ there, and only those, under
tests/data/golden/<tag>/ (the main records are left as they are):
    python tests/make_golden.py --isa-overrides
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "golden")

# (name, MoELayer kwargs, Supervisor kwargs or None for the default router, training mode)
CASES = [
    ("topk", {}, {}, True),
    ("topk_capacity", {}, {"capacity_factor": 0.75, "load_balance_coef": 0.01}, True),
    ("topk_then_softmax", {}, {"strategy": "topk_then_softmax", "z_loss_coef": 1e-3}, True),
    ("switch", {"k": 1}, {"strategy": "switch", "load_balance_coef": 0.01}, True),
    ("noisy_topk", {}, {"strategy": "noisy_topk", "seed": 7}, True),
    (
        "grouped_sigmoid",
        {"num_shared_experts": 1, "shared_expert_gate": True},
        {
            "strategy": "grouped_sigmoid",
            "n_group": 3,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "bias_update_rate": 1e-3,
            "auto_update_bias": True,
        },
        True,
    ),
    ("expert_choice", {}, {"strategy": "expert_choice", "capacity_factor": 1.0}, True),
    ("attention", {}, {"strategy": "attention", "attention_dim": 8}, False),
    ("gelu_bias", {"activation": "gelu", "bias": True}, {}, True),
]
T, D, H, E = 23, 16, 24, 6


def record(name, layer_kw, sup_kw, training) -> dict:
    from moe_framework import MoELayer, Supervisor

    torch.manual_seed(1234)
    k = layer_kw.pop("k", 2)
    sup = Supervisor(D, E, k, **sup_kw)
    layer = MoELayer.build(
        d_model=D, d_hidden=H, num_experts=E, k=k, router=sup, report_top_tokens=3, **layer_kw
    )
    layer.train(training)
    state = {f"state.{n}": t.detach().clone().contiguous() for n, t in layer.state_dict().items()}
    x = torch.randn(2, T, D, requires_grad=True)
    y, info = layer(x)
    loss = y.square().mean() + info.aux_loss
    loss.backward()
    out = {
        "x": x.detach(),
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
        out[f"grad.{n}"] = p.grad
    out.update(state)
    meta = {
        "layer_kw": json.dumps({"k": k, **layer_kw}),
        "sup_kw": json.dumps(sup_kw),
        "training": json.dumps(training),
        "sizes": json.dumps({"T": T, "d_model": D, "d_hidden": H, "num_experts": E}),
    }
    save_file(
        {k_: v.contiguous() for k_, v in out.items()},
        os.path.join(OUT, f"{name}.safetensors"),
        metadata=meta,
    )
    return meta


def record_system() -> None:
    """A saved MixtureOfExpertsSystem (today's on-disk format, no knowledge graph) and its
    predictions on a fixed input."""
    from moe_framework import MixtureOfExpertsSystem, MoEConfig

    torch.manual_seed(99)
    cfg = MoEConfig(
        input_dim=12,
        output_dim=5,
        d_model=16,
        d_hidden=24,
        num_layers=2,
        num_experts=4,
        k=2,
        num_shared_experts=1,
    )
    system = MixtureOfExpertsSystem(cfg).eval()
    d = os.path.join(OUT, "system_v1")
    system.save(d)
    x = torch.randn(7, 12)
    with torch.no_grad():
        out = system(x)
    save_file(
        {"x": x, "output": out.output.contiguous()}, os.path.join(OUT, "system_v1_io.safetensors")
    )


def record_isa_overrides() -> None:
    """tests/data/golden/<tag>/<case>.safetensors: this CPU build's own bits of the tensors that
    differ from the main record of each case (computed as the test computes them)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sys.path[:0] = [HERE, os.path.join(HERE, "modules")]
    import test_golden
    from golden_isa import kernel_isa_tag

    tag = kernel_isa_tag()
    if tag == "base":
        raise SystemExit("this CPU runs the base build: the main records are its own")
    out_dir = os.path.join(OUT, tag)
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    for case in test_golden.CASES:
        path = os.path.join(OUT, f"{case}.safetensors")
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        record = load_file(path)
        now, _ = test_golden.compute_case(meta, record)
        differ = {k: t.contiguous() for k, t in now.items() if not torch.equal(t, record[k])}
        target = os.path.join(out_dir, f"{case}.safetensors")
        if differ:
            save_file(differ, target)
        elif os.path.exists(target):
            os.remove(target)
        print(f"{tag}/{case}: {sorted(differ) or 'same bits'}", file=sys.stderr)


def main() -> None:
    if "--isa-overrides" in sys.argv[1:]:
        record_isa_overrides()
        return
    sys.path.insert(0, HERE)
    from golden_isa import kernel_isa_tag

    if kernel_isa_tag() != "base" and "--force" not in sys.argv[1:]:
        raise SystemExit(
            f"this machine runs the {kernel_isa_tag()!r} builds; the main records are an AVX2 "
            "CPU's (torch's own kernels and MKL also follow the CPU): record on one, then "
            "--isa-overrides here (--force overrides this check)"
        )
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    for name, layer_kw, sup_kw, training in CASES:
        record(name, dict(layer_kw), dict(sup_kw), training)
    # system_v1 is also the compatibility fixture of an older on-disk format (its config.json
    # carries since-renamed fields that load must still accept): never overwrite it.
    system_recorded = not os.path.exists(os.path.join(OUT, "system_v1"))
    if system_recorded:
        record_system()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    with open(os.path.join(OUT, "RECORDED_AT"), "w") as f:
        f.write(f"{commit}\n")
    what = " and system_v1" if system_recorded else " (system_v1 kept: it exists)"
    print(f"wrote {len(CASES)} layer cases{what} to {OUT} (commit {commit})", file=sys.stderr)


if __name__ == "__main__":
    main()
