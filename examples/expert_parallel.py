"""Expert parallelism on torch.distributed: shard a MoE layer's experts over 2 processes.

    torchrun --nproc-per-node 2 examples/expert_parallel.py        # on CPU (gloo) or GPUs (NCCL)
    python examples/expert_parallel.py                              # starts the 2 ranks itself

Every rank builds the same layer (same seed), keeps the experts it owns (rank r: experts
r*E/2 .. (r+1)*E/2 - 1), trains a few steps on its own tokens, and checks that its output equals
the single-process layer's on the same tokens. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from moe_framework import MoELayer
from moe_framework.distributed import (
    expert_parallel,
    init_distributed,
    launch_local,
    reduce_gradients,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="dropless", choices=("dropless", "capacity"))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if "RANK" not in os.environ:  # not under torchrun: start 2 ranks of this script
        results = launch_local(__file__, sys.argv[1:], 2, timeout_s=240)
        for r in results:
            print(r.stdout, end="")
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                sys.exit(1)
        return

    rank, world = init_distributed(timeout_s=60)
    torch.manual_seed(0)
    layer = MoELayer.build(d_model=32, d_hidden=64, num_experts=8, k=2, capacity_factor=1.25)
    reference = copy.deepcopy(layer)  # the single-process layer, for the check below
    expert_parallel(layer, mode=args.mode)  # the world group; capacity from the router
    print(f"rank {rank}: {layer.dispatcher}")

    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        if step == 0:
            with torch.no_grad():
                same = torch.equal(layer(x)[0], reference(x)[0])
            print(f"rank {rank}: output equals the single-process layer: {same}")
        y, info = layer(x)
        loss = y.pow(2).mean() + info.aux_loss
        opt.zero_grad()
        loss.backward()
        reduce_gradients(layer)  # dense grads averaged over ranks, expert grads scaled
        opt.step()
        print(f"rank {rank}: step {step} loss {loss.item():.5f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
