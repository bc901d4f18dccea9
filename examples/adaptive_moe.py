"""Online adaptation and hierarchical MoE on sklearn digits as patch tokens (docs/adaptive.md).

1. An MoELayer that starts with 3 experts, trained with an AdaptationController: every `window`
   steps it splits an overloaded expert (function-preserving: the copy takes half its tokens)
   or merges an under-used one, resizing the optimiser state in place; a validation loss guards
   each change (rollback when it gets worse).
2. A HierarchicalMoELayer (a group router over 2 MoE layers) with telemetry per level.

    python examples/adaptive_moe.py [--epochs 3]
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from moe_framework import MoELayer
from moe_framework.adaptation import AdaptationController
from moe_framework.hierarchical import HierarchicalMoELayer
from moe_framework.routing import TopKRouter

D = 32


def digits_patches():
    """Each 8x8 digit as 4 tokens (its 4x4 quadrants), pixels in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    return img.reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4, 16), torch.tensor(y)


class Net(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.embed, self.norm, self.moe, self.head = (
            nn.Linear(16, D),
            nn.LayerNorm(D),
            moe,
            nn.Linear(D, 10),
        )

    def forward(self, x):
        h = self.embed(x)
        z = self.norm(h)
        y, info = self.moe(z)
        return self.head((h + y).mean(1)), info, z


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=1400, help="training images (of 1797)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = digits_patches()
    x_tr, y_tr, x_va, y_va = x[: args.train], y[: args.train], x[1400:], y[1400:]

    # 1. online adaptation
    layer = MoELayer.build(d_model=D, d_hidden=32, num_experts=3, k=2, load_balance_coef=0.01)
    net = Net(layer)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)

    def val_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net(x_va)[0], y_va))

    ctl = AdaptationController(
        layer, opt, window=10, split_ratio=1.2, max_experts=6, validate=val_loss, tolerance=0.05
    )
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(x_tr)).split(64):
            logits, info, z = net(x_tr[idx])
            loss = nn.functional.cross_entropy(logits, y_tr[idx]) + info.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(z, info)  # device-side window statistics
            for event in ctl.step():  # between steps, off the hot path
                print(
                    f"epoch {epoch}: {event['action']}",
                    {k: v for k, v in event.items() if k != "action"},
                )
        acc = float((net(x_va)[0].argmax(1) == y_va).float().mean())
        print(f"epoch {epoch}: {layer.num_experts} experts, validation accuracy {acc:.3f}")

    # 2. hierarchical: a group router over two MoE layers
    members = [MoELayer.build(d_model=D, d_hidden=32, num_experts=3, k=2) for _ in range(2)]
    hier = HierarchicalMoELayer(TopKRouter(D, 2, 1, load_balance_coef=0.01), members)
    hnet = Net(hier)
    hopt = torch.optim.AdamW(hnet.parameters(), lr=3e-3)
    for idx in torch.randperm(len(x_tr)).split(64):
        logits, info, _ = hnet(x_tr[idx])
        loss = nn.functional.cross_entropy(logits, y_tr[idx]) + info.aux_loss
        hopt.zero_grad()
        loss.backward()
        hopt.step()
    stats = hier.routing_stats()
    print("hierarchical level 0 (groups) load:", stats["level0"]["load"])
    for g, s in enumerate(stats["level1"]):
        print(f"hierarchical level 1, group {g} load:", s["load"], f"cv={s['cv']:.2f}")
    acc = float((hnet(x_va)[0].argmax(1) == y_va).float().mean())
    print(f"hierarchical validation accuracy after 1 epoch {acc:.3f}")


if __name__ == "__main__":
    main()
