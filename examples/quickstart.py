"""Quickstart: a MoELayer inside an ordinary PyTorch model.

    python examples/quickstart.py [--tokens 256] [--steps 50]

Builds a tiny next-feature regressor whose feed-forward block is a dropless top-2 MoE layer,
trains it for a few steps, and prints the loss and how the tokens were spread over the experts.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from moe_framework import MoELayer


class TinyModel(nn.Module):
    def __init__(self, d: int = 32, experts: int = 4):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.norm = nn.LayerNorm(d)
        # router -> dispatcher (permute) -> grouped GEMM experts -> combine, all on our own ops
        self.moe = MoELayer.build(d_model=d, d_hidden=2 * d, num_experts=experts, k=2)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        y, info = self.moe(self.norm(h))  # y [..., d]; info: weights, ids, counts, aux_loss, ...
        return self.out(h + y), info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, 8)
    target = (x[:, :4].sum(-1, keepdim=True) > 0).float() * x[:, 4:5]
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        pred, info = model(x)
        loss = F.mse_loss(pred, target) + info.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (0, args.steps - 1):
            print(
                f"step {step:3d}  loss {loss.item():.4f}  tokens per expert {info.counts.tolist()}"
            )


if __name__ == "__main__":
    main()
