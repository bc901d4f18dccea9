"""Coverage of the "moe_framework" experts implementation over every experts class of the
installed transformers decorated with ``use_experts_implementation`` (found by scanning, not
listed: a new release's new MoE families are covered without touching this file).

Each class is built from a tiny config (its config class's defaults, shrunk), given random weights,
and run under ``"eager"`` (the model's own per-expert loop) and ``"moe_framework"`` on the same
inputs: outputs and the gradients of the input, the gate weights and every expert parameter must
agree, fp32 to rounding and bf16 within the stated tolerances (``TOLERANCES["layer"]``). At least
95% of the classes must pass; docs/huggingface.md lists the others with the reason.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES

pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

import hf_coverage  # noqa: E402

import moe_framework.integrations.transformers  # noqa: E402,F401  (registers the implementation)
from moe_framework import ops  # noqa: E402

T = 13


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = TOLERANCES["layer"][dtype]
    scale = max(1.0, float(b.float().abs().max()))
    return torch.allclose(a.float(), b.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def _check_class(cls: type, dtype: torch.dtype, gen: torch.Generator) -> str | None:
    """None when the class passes, else why not."""
    try:
        module, _ = hf_coverage.build_tiny_experts(cls)
    except RuntimeError as e:
        return f"no tiny config: {e}"
    module = module.to(dtype)
    d = None
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() == 3 else 4
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in**0.5))
    w = hf_coverage.expert_weight(module)
    E = w.shape[0]
    d = w.shape[1] if getattr(module, "is_transposed", False) else w.shape[2]
    k = min(hf_coverage.TOP_K, E)
    x = torch.randn(T, d, generator=gen).to(dtype)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(T, k, generator=gen).softmax(-1).to(dtype)
    grad_out = torch.randn(T, d, generator=gen)
    ref, ref_g = hf_coverage.run_experts(module, "eager", x, ids, weights, grad_out)
    out, out_g = hf_coverage.run_experts(module, "moe_framework", x, ids, weights, grad_out)
    if out.dtype != ref.dtype or out.shape != ref.shape:
        return f"output {out.dtype} {tuple(out.shape)} vs eager {ref.dtype} {tuple(ref.shape)}"
    if not _close(out, ref, dtype):
        return f"output differs by {float((out.float() - ref.float()).abs().max()):.3g}"
    for name, g in ref_g.items():
        if not _close(out_g[name], g, dtype):
            diff = float((out_g[name].float() - g.float()).abs().max())
            return f"gradient of {name} differs by {diff:.3g}"
    # Inference at decode size takes the fused moe_decode path where it applies (SiLU gate, no
    # bias): forced here whatever the dtype's slots-per-expert threshold says for these sizes.
    saved = ops.DECODE_SLOTS_PER_EXPERT
    ops.DECODE_SLOTS_PER_EXPERT = dict.fromkeys(saved, float(1 << 30))
    try:
        with torch.no_grad():
            y1, _ = hf_coverage.run_experts(
                module, "moe_framework", x[:3], ids[:3], weights[:3], None
            )
    finally:
        ops.DECODE_SLOTS_PER_EXPERT = saved
    with torch.no_grad():
        r1, _ = hf_coverage.run_experts(module, "eager", x[:3], ids[:3], weights[:3], None)
    if not _close(y1, r1, dtype):
        return f"decode output differs by {float((y1.float() - r1.float()).abs().max()):.3g}"
    return None


@pytest.fixture(scope="module")
def classes():
    found = hf_coverage.decorated_experts_classes()
    assert len(found) >= 4, f"found only {len(found)} decorated experts classes"
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_decorated_experts_class_matches_eager(classes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    failures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds pool wake-ups
    try:
        for cls in classes:
            reason = _check_class(cls, dtype, gen)
            if reason is not None:
                failures[cls.__name__] = reason
    finally:
        torch.set_num_threads(threads)
    passed = len(classes) - len(failures)
    print(f"{dtype}: {passed}/{len(classes)} classes pass; failures: {failures}")
    assert passed >= 0.95 * len(classes), f"{passed}/{len(classes)} pass; failures: {failures}"
