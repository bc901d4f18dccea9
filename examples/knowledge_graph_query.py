"""Train briefly, consolidate the experts' draft reports into a knowledge graph, then query it.

    python examples/knowledge_graph_query.py [--steps 40] [--out DIR]

Each MoE layer emits per-expert draft reports (mean output, confidence, token count) on the device
during forward; consolidate() runs the librarian (dedup + merge) and files them into the SQLite
store. A query is an embedding in the same space: here, the mean last-layer MoE output for images
of a digit, compared with the last layer's nodes only.
"""

import argparse
import os
import tempfile

import torch

from moe_framework.config import MoEConfig
from moe_framework.demo import load_digits_split
from moe_framework.knowledge_graph import KnowledgeGraph
from moe_framework.system import MixtureOfExpertsSystem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="moe_kg_")
    os.makedirs(out, exist_ok=True)
    kg_path = os.path.join(out, "knowledge.sqlite")
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0, tiny=True)
    cfg = MoEConfig(
        input_dim=64,
        output_dim=10,
        d_model=32,
        d_hidden=32,
        num_experts=4,
        k=2,
        kg_path=kg_path,
        consolidation_interval=10,
        specialisation_names=["north", "east", "south", "west"],
    )
    with MixtureOfExpertsSystem(cfg) as model:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(args.steps):
            idx = torch.randint(0, len(x_tr), (64,))
            model.training_step((x_tr[idx], y_tr[idx]), opt)
        model.consolidate()
        # The query is an embedding of the last layer's output, so only that layer's nodes live in
        # the same space: filter on their "layer" metadata.
        last = cfg.num_layers - 1
        for digit in (0, 7):
            hits = model.query_knowledge_graph(
                x_te[y_te == digit], top_k=2, from_inputs=True, layer=last, where={"layer": last}
            )
            print(f"digit {digit} (nodes of layer {last}):")
            for h in hits:
                m = h["metadata"]
                print(f"  node {h['id']} cos={h['similarity']:+.3f} metadata={m}")
    # The store outlives the model: reopen it read-only, as another process would.
    with KnowledgeGraph.open(kg_path, readonly=True) as kg:
        print(f"reopened {kg_path}: {len(kg)} nodes")


if __name__ == "__main__":
    main()
