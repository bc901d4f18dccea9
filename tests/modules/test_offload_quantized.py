"""Quantised experts offloaded (quantize_experts, then offload_experts / OffloadedExperts): the
packed INT8 / INT4 bytes are what the expert file holds and what moves into the cache, and the
output is bitwise equal to the resident QuantizedExperts (weight-only and act_quant="int8"); and
the prefetch default ("auto": off on the CPU with fewer than 3 usable cores, on for CUDA)."""

import copy
import json
import os

import pytest
import torch

from moe_framework import ExpertBank, MoELayer
from moe_framework import offload as offload_mod
from moe_framework.offload import (
    OffloadedExperts,
    close_offloaded,
    offload_experts,
    offload_metrics,
    prefetch_auto,
)
from moe_framework.offload_storage import DiskExpertStorage, write_expert_file
from moe_framework.quantization import QuantizedExperts, quantize_experts, set_act_quant


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@pytest.mark.parametrize(
    "bits, group_size, symmetric, bias",
    [(4, 32, False, False), (8, None, True, True)],
    ids=["int4_g32_asym", "int8_bias"],
)
def test_offloaded_quantized_layer_is_bitwise_equal(
    tmp_path, seed, bits, group_size, symmetric, bias
):
    E = 8
    layer = MoELayer.build(d_model=64, d_hidden=96, num_experts=E, k=2)
    if bias:  # an ExpertBank with biases, in the layer
        layer.experts = ExpertBank(d_model=64, d_hidden=96, num_experts=E, bias=True)
        with torch.no_grad():
            layer.experts.b_out.normal_()
    quantize_experts(layer, bits=bits, group_size=group_size, symmetric=symmetric)
    resident = copy.deepcopy(layer)
    qe = resident.experts
    assert isinstance(qe, QuantizedExperts)
    x = torch.randn(3, 7, 64)
    offload_experts(layer, cache_slots=2, storage=tmp_path, prefetch=False)  # 25% of experts
    try:
        off = layer.experts
        assert isinstance(off, OffloadedExperts) and off.quant["bits"] == bits
        with torch.no_grad():
            for act in (None, "int8"):
                set_act_quant(resident, act)
                set_act_quant(layer, act)
                assert torch.equal(_out(layer(x)), _out(resident(x)))
            xb, ob = x[0].to(torch.bfloat16), _offsets(7, E)  # bf16 activations too
            assert torch.equal(layer.experts(xb, ob), qe(xb, ob))
        # the stored and moved bytes are the packed ones
        per_expert = qe.weight_bytes() / E + (
            (qe.b_in.numel() + qe.b_out.numel()) * 4 / E if bias else 0
        )
        assert off.storage.expert_nbytes == per_expert
        float_bytes = 3 * 64 * 96 * 4
        assert per_expert < float_bytes / (3.5 if bits == 8 else 6)
        m = offload_metrics(layer)
        assert m["loads"] > 0 and m["bytes_moved"] == m["loads"] * per_expert
        path = os.path.join(tmp_path, "experts_0.safetensors")
        assert os.path.getsize(path) < E * per_expert + 64 * 1024
    finally:
        close_offloaded(layer)


def _offsets(M, E):
    cuts = torch.sort(torch.randint(0, M + 1, (E - 1,))).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([M])]).long()


def test_quantized_expert_file_reopens_and_is_checked(tmp_path, seed):
    bank = ExpertBank(d_model=32, d_hidden=64, num_experts=4, layout="out_in")
    qe = quantize_experts(bank, bits=4, group_size=32, act_quant="int8")
    path = write_expert_file(qe, tmp_path / "q.safetensors")
    off = OffloadedExperts.open(path, cache_slots=1)
    try:
        off.act_quant = "int8"
        x, o = torch.randn(9, 32), _offsets(9, 4)
        with torch.no_grad():
            assert torch.equal(off(x, o), qe(x, o))
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            off(x.double(), o)
    finally:
        off.close()
    # a packed tensor declared with another dtype is refused when the file is opened
    raw = path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["0.qweight_in"]["dtype"] = "I8"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(ValueError, match="must have dtype U8"):
        DiskExpertStorage(bad)


def test_prefetch_auto_default(monkeypatch):
    assert prefetch_auto("cuda") is True
    for cores, want in ((1, False), (2, False), (3, True), (16, True)):
        monkeypatch.setattr(offload_mod, "usable_cpu_cores", lambda c=cores: c)
        assert prefetch_auto("cpu") is want
        layer = MoELayer.build(d_model=8, d_hidden=8, num_experts=4, k=2)
        offload_experts(layer, cache_slots=2)  # prefetch="auto"
        assert (layer.experts.worker is not None) is want
        close_offloaded(layer)
    with pytest.raises(ValueError, match='prefetch must be True, False or "auto"'):
        offload_experts(
            MoELayer.build(d_model=8, d_hidden=8, num_experts=4), cache_slots=2, prefetch="on"
        )


def test_docs_quantised_offload_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "offload.md")
    text = open(path).read()
    block = text.split("### Quantised experts", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/offload.md", "exec"), namespace)
    assert torch.equal(namespace["got"], namespace["want"])
