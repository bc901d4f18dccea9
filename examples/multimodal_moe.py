"""Multimodal MoE on two packaged data sets (docs/adaptive.md): sklearn digits as image patch
tokens (modality 0) and the wine data set's 13 tabular features as tokens (modality 1), routed by
a MultimodalMoELayer with a pool of experts per modality plus a shared routed expert, routing
biased by modality, and one balancing loss per modality. Prints per-modality accuracy and where
each modality's tokens went (own pool / shared / other pool) to show the specialisation.

    python examples/multimodal_moe.py [--epochs 8] [--mode bias|restrict]
"""

import argparse

import torch
from sklearn.datasets import load_digits, load_wine
from torch import nn

from moe_framework.multimodal import MultimodalMoELayer

D = 32


def digits_tokens():
    x, y = load_digits(return_X_y=True)
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    return img.reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4, 16), torch.tensor(y)


def wine_tokens():
    x, y = load_wine(return_X_y=True)
    z = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    z = torch.cat([z, torch.zeros(len(z), 3)], 1).reshape(-1, 4, 4)  # 13 features + 3 pads
    return z, torch.tensor(y) + 10  # classes 10-12 after the digits


class Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.embed = nn.ModuleList([nn.Linear(16, D), nn.Linear(4, D)])
        self.norm = nn.LayerNorm(D)
        self.moe = MultimodalMoELayer(
            d_model=D,
            d_hidden=32,
            experts_per_modality=[3, 2],
            num_shared_routed=1,
            k=2,
            mode=mode,
            load_balance_coef=0.01,
        )
        self.head = nn.Linear(D, 13)

    def forward(self, xs):
        h = torch.cat([self.embed[m](x) for m, x in enumerate(xs) if x is not None])
        mods = torch.cat([torch.full(x.shape[:2], m) for m, x in enumerate(xs) if x is not None])
        y, info = self.moe(self.norm(h), mods)
        return self.head((h + y).mean(1)), info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--mode", default="bias", choices=["bias", "restrict"])
    p.add_argument("--train", type=int, default=1400, help="training digits (of 1797)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    (xd, yd), (xw, yw) = digits_tokens(), wine_tokens()
    pd, pw = torch.randperm(len(xd)), torch.randperm(len(xw))
    dtr, dte, wtr, wte = pd[: args.train], pd[1400:], pw[:130], pw[130:]
    net = Net(args.mode)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in dtr[torch.randperm(len(dtr))].split(64):
            widx = wtr[torch.randint(len(wtr), (16,))]  # a few wine rows in every batch
            logits, info = net([xd[idx], xw[widx]])
            loss = nn.functional.cross_entropy(logits, torch.cat([yd[idx], yw[widx]]))
            opt.zero_grad()
            (loss + info.aux_loss).backward()
            opt.step()
    net.eval()
    net.moe.reset_stats()
    with torch.no_grad():
        acc_d = float((net([xd[dte], None])[0].argmax(1) == yd[dte]).float().mean())
        acc_w = float((net([None, xw[wte]])[0].argmax(1) == yw[wte]).float().mean())
    print(f"mode={args.mode}: digits accuracy {acc_d:.3f}, wine accuracy {acc_w:.3f}")
    for m, s in enumerate(net.moe.routing_stats()["modalities"]):
        print(
            f"modality {m} ({['digits', 'wine'][m]}): own pool {s['own_pool']:.2f}, shared "
            f"{s['shared_pool']:.2f}, other pool {s['other_pools']:.2f}; slots per expert {s['load']}"
        )


if __name__ == "__main__":
    main()
