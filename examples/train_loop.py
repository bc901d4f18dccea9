"""A training loop with MixtureOfExpertsSystem.training_step on a real dataset (sklearn digits).

    python examples/train_loop.py [--epochs 5] [--amp bf16]

training_step does the whole step: AMP autocast, aux + z losses, gradient clipping,
zero_grad(set_to_none=True), the aux-loss-free bias update, and (every consolidation_interval
steps) consolidation of the experts' draft reports into the knowledge graph.
"""

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

from moe_framework.config import MoEConfig
from moe_framework.demo import load_digits_split
from moe_framework.system import MixtureOfExpertsSystem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--out", default=None, help="folder for the saved model (default: a temp dir)")
    args = p.parse_args()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0, tiny=False)
    out = args.out or tempfile.mkdtemp(prefix="moe_train_loop_")
    cfg = MoEConfig(
        input_dim=64,
        output_dim=10,
        d_model=48,
        d_hidden=48,
        num_experts=4,
        k=2,
        amp_dtype=args.amp,
        kg_path=os.path.join(out, "knowledge.sqlite"),
        consolidation_interval=20,
    )
    with MixtureOfExpertsSystem(cfg) as model:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for epoch in range(args.epochs):
            perm = torch.randperm(len(x_tr))
            for i in range(0, len(x_tr), 64):
                idx = perm[i : i + 64]
                r = model.training_step((x_tr[idx], y_tr[idx]), opt, F.cross_entropy)
            acc = (model.predict(x_te).argmax(-1) == y_te).float().mean().item()
            print(
                f"epoch {epoch}: loss {r.loss:.4f} (aux {r.aux_loss:.4f})  test acc {acc:.3f}  "
                f"load layer0 {r.stats['load'][0]}"
            )
        model.save(os.path.join(out, "model"))
        print(f"knowledge graph: {len(model.knowledge_graph)} nodes; saved to {out}/model")


if __name__ == "__main__":
    main()
