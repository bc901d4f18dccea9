"""Swap a (tiny, randomly initialised) Hugging Face Mixtral's MoE blocks onto our kernels.

    python examples/hf_swap.py

replace_moe_blocks() swaps every sparse MoE block in place for a MoELayer composed of adapters
(the HF router as our Router, the HF experts as our Experts) that share the HF parameters (no
copy) and run HF routing -> permute -> grouped GEMM -> unpermute on our ops. The outputs match the
original model to float32 rounding. No download: the model is built from a config.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_framework.integrations.transformers import replace_moe_blocks, restore_moe_blocks


def main():
    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    swapped = replace_moe_blocks(model)
    with torch.no_grad():
        out = model(ids).logits
    diff = (out - ref).abs().max().item()
    print(f"swapped {swapped} MoE blocks; max |logits diff| vs Hugging Face: {diff:.2e}")
    assert diff < 1e-4, diff
    restored = restore_moe_blocks(model)
    print(f"restored {restored} blocks")


if __name__ == "__main__":
    main()
