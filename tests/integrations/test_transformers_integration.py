"""moe_framework.integrations.transformers: tiny randomly initialised Hugging Face MoE models give
the same logits, losses and gradients before and after replace_moe_blocks, the swap shares the
parameter storage, and the swapped blocks compile without graph breaks."""

import pytest
import torch
from conftest import TOLERANCES

import moe_framework  # noqa: F401
from moe_framework.integrations.transformers import (
    HFMoEBlock,
    replace_moe_blocks,
    restore_moe_blocks,
)
from moe_framework.moe_layer import RoutingInfo

transformers = pytest.importorskip("transformers")


COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=64,
)
# The reference is HF's eager experts loop (transformers 5.x defaults to its grouped_mm path);
# one test also compares against grouped_mm.
IMPL = "eager"


def _mixtral(**kw):
    kw.setdefault("experts_implementation", IMPL)
    cfg = transformers.MixtralConfig(
        **COMMON, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2, **kw
    )
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe(**kw):
    kw.setdefault("experts_implementation", IMPL)
    cfg = transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=3,
        **kw,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3_moe(**kw):
    kw.setdefault("experts_implementation", IMPL)
    cfg = transformers.Qwen3MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=10,
        num_experts_per_tok=4,
        head_dim=8,
        **kw,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _olmoe(**kw):
    kw.setdefault("experts_implementation", IMPL)
    cfg = transformers.OlmoeConfig(
        **COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2, **kw
    )
    return transformers.OlmoeForCausalLM(cfg)


MODELS = {
    "mixtral": _mixtral,
    "qwen2_moe": lambda: _qwen2_moe(norm_topk_prob=False),
    "qwen2_moe_norm_topk": lambda: _qwen2_moe(norm_topk_prob=True),
    "qwen3_moe": lambda: _qwen3_moe(norm_topk_prob=True),
    "qwen3_moe_no_norm": lambda: _qwen3_moe(norm_topk_prob=False),
    "olmoe": _olmoe,
    "mixtral_vs_hf_grouped_mm": lambda: _mixtral(experts_implementation="grouped_mm"),
}

# Same weights, same routing; only the expert arithmetic differs (grouped GEMM vs per-expert
# F.linear, fp32 combine vs index_add): fp32 agrees to float32 rounding through 2 layers; bf16 to
# a few bf16 ulps of the logits (HF accumulates the k expert outputs in bf16, we in fp32).
TOL = TOLERANCES["hf_model"]


def _step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_swapped_model_matches_hf_logits_losses_and_gradients_fp32(seed, name):
    model = MODELS[name]().float()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11))
    logits0, loss0, aux0, grads0 = _step(model, ids)
    assert replace_moe_blocks(model) == COMMON["num_hidden_layers"]
    logits1, loss1, aux1, grads1 = _step(model, ids)
    torch.testing.assert_close(logits1, logits0, **TOL[torch.float32])
    torch.testing.assert_close(loss1, loss0, **TOL[torch.float32])
    # The router logits reach HF's load-balancing loss through the model's own router module.
    torch.testing.assert_close(aux1, aux0, **TOL[torch.float32])
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        scale = max(1.0, float(grads0[n].abs().max()))
        torch.testing.assert_close(
            grads1[n], grads0[n], rtol=1e-4, atol=2e-5 * scale, msg=lambda m, n=n: f"{n}: {m}"
        )
    assert any(".experts.gate_up_proj" in n for n in grads1)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_swapped_model_matches_hf_in_bf16(seed, name):
    # One layer: with two, bf16 rounding differences in layer 1 may legitimately flip a near-tie
    # routing decision in layer 2.
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    logits0, loss0, _, grads0 = _step(model, ids)
    replace_moe_blocks(model)
    logits1, loss1, _, grads1 = _step(model, ids)
    torch.testing.assert_close(logits1.float(), logits0.float(), **TOL[torch.bfloat16])
    for n in grads0:
        g0, g1 = grads0[n].float(), grads1[n].float()
        # bf16 gradients of summed products: compare relative to the tensor's scale.
        err = float((g1 - g0).abs().max())
        assert err <= 5e-2 * max(float(g0.abs().max()), 1e-3), n


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_swap_shares_parameter_storage_and_keeps_state_dict_keys(name):
    model = MODELS[name]()
    params = {n: p for n, p in model.named_parameters()}
    sd_keys = list(model.state_dict().keys())
    n_params = sum(p.numel() for p in model.parameters())
    replace_moe_blocks(model)
    assert all(isinstance(layer.mlp, HFMoEBlock) for layer in model.model.layers)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys()
    assert all(after[n] is params[n] for n in params)  # the same Parameter objects, no copy
    assert list(model.state_dict().keys()) == sd_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    # Training through the adapter updates the HF parameters themselves.
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.mul_(2)
    assert params["model.layers.0.mlp.experts.down_proj"].data_ptr() == (
        model.model.layers[0].mlp.experts.down_proj.data_ptr()
    )


def test_restore_puts_back_the_original_blocks_with_trained_weights(seed):
    model = _mixtral()
    originals = [layer.mlp for layer in model.model.layers]
    ids = torch.randint(0, COMMON["vocab_size"], (1, 7))
    replace_moe_blocks(model)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj.add_(0.5)
    swapped = model(input_ids=ids).logits
    assert restore_moe_blocks(model) == 2
    assert [layer.mlp for layer in model.model.layers] == originals
    torch.testing.assert_close(model(input_ids=ids).logits, swapped, **TOL[torch.float32])


def test_qwen2_moe_dense_layers_are_left_alone():
    model = _qwen2_moe(decoder_sparse_step=1, mlp_only_layers=[0])
    assert replace_moe_blocks(model) == 1
    assert not isinstance(model.model.layers[0].mlp, HFMoEBlock)
    assert isinstance(model.model.layers[1].mlp, HFMoEBlock)


def test_replace_on_a_model_without_moe_blocks_replaces_nothing():
    assert replace_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    with pytest.raises(ValueError, match="nn.Module"):
        replace_moe_blocks("not a model")


def test_mixtral_router_jitter_in_training_matches_hf(seed):
    model = _mixtral(router_jitter_noise=0.1).train()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 6))
    torch.manual_seed(seed)
    want = model(input_ids=ids).logits
    replace_moe_blocks(model)
    torch.manual_seed(seed)
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_adapter_can_keep_routing_info_and_draft_reports(seed):
    model = _qwen3_moe(norm_topk_prob=True)
    replace_moe_blocks(model, report_top_tokens=2)
    block = model.model.layers[0].mlp
    block.keep_routing_info = True
    ids = torch.randint(0, COMMON["vocab_size"], (2, 5))
    model(input_ids=ids)
    info = block.last_routing_info
    assert isinstance(info, RoutingInfo)
    assert info.ids.shape == (10, 4) and int(info.counts.sum()) == 40
    assert torch.equal(info.reports.token_count, info.counts.long())
    assert info.reports.top_tokens.shape == (10, 2)


def test_swapped_block_compiles_fullgraph_and_matches_eager(seed):
    torch._dynamo.reset()
    model = _qwen2_moe(norm_topk_prob=True)
    replace_moe_blocks(model)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 7, COMMON["hidden_size"], requires_grad=True)
    explain = torch._dynamo.explain(block)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y_eager = block(x)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y_comp = compiled(x)
    (gx_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_comp, gx_eager, rtol=1e-6, atol=1e-6)


def test_second_backward_needs_inplace_backward_off_and_then_matches(seed):
    # The experts write the SwiGLU gradient over their saved activation by default: one graph can
    # be backpropagated once, and a second backward raises an error that names the switch.
    torch.manual_seed(seed)
    model = _mixtral()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7))
    replace_moe_blocks(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=False"):
        loss.backward()
    restore_moe_blocks(model)
    model.zero_grad(set_to_none=True)
    assert replace_moe_blocks(model, inplace_backward=False) == COMMON["num_hidden_layers"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    for n, p in model.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-5, atol=1e-6)


def test_swapped_block_is_a_moe_layer_of_adapters_that_follow_copies_of_the_model(seed):
    import copy

    from moe_framework.integrations.transformers import HFExperts, HFRouter

    model = _qwen2_moe(norm_topk_prob=True).eval()
    replace_moe_blocks(model)
    block = model.model.layers[0].mlp
    assert isinstance(block.moe.router, HFRouter) and isinstance(block.moe.experts, HFExperts)
    assert block.moe.router.gate is block.gate and block.moe.experts.hf_experts is block.experts
    ids = torch.randint(0, COMMON["vocab_size"], (1, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # The adapters borrow the HF modules without owning them: a deep copy must run on the copy's
    # own modules, not on the original's.
    twin = copy.deepcopy(model)
    twin_block = twin.model.layers[0].mlp
    assert twin_block.moe.router.gate is twin_block.gate
    assert twin_block.moe.experts.hf_experts is twin_block.experts
    with torch.no_grad():
        twin_block.experts.down_proj.zero_()
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="route every token; mask must be None"):
        block.moe(torch.randn(2, 3, COMMON["hidden_size"]), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="keep_routing_info"):
        block.moe.routing_stats()
