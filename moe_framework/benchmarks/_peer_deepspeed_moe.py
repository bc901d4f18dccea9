"""Peer baseline for bench_expert_parallel: DeepSpeed-MoE (``deepspeed.moe.layer.MoE``) on CPU/gloo.

Runs in its OWN virtual environment (DeepSpeed + the same torch; it does not import
moe_framework), one process per rank, started by ``bench_expert_parallel --deepspeed-python PY``:
``PY _peer_deepspeed_moe.py WEIGHTS OUT REPS WARMUP``. WEIGHTS (a safetensors file written by
the bench; no pickle crosses the process boundary) holds the router weight ``gate [E, d]``, the
experts ``w_gate_up [E, d, 2h]`` / ``w_out [E, h, d]`` and each rank's tokens ``x<r> [T, d]``;
the layer is set to the same function as ``MoELayer`` (softmax top-k renormalised, no token
dropping, no random second-expert sampling, SwiGLU experts) so the outputs can be compared. Writes
``OUT.rank<r>.safetensors`` with the output and the fwd+bwd step times. The venv needs
``requirements-peers.txt`` (deepspeed, safetensors).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class SwiGLUExpert(torch.nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.w1 = torch.nn.Linear(d, 2 * h, bias=False)
        self.w2 = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, -1)
        return self.w2(F.silu(a) * b)


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    # Imported by name: deepspeed lives only in the peer's venv (not a dependency of ours).
    deepspeed = importlib.import_module("deepspeed")
    MoE = importlib.import_module("deepspeed.moe.layer").MoE

    weights, out, reps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    w = load_file(weights)
    gate, wgu, wo = w["gate"], w["w_gate_up"], w["w_out"]
    E, d = gate.shape
    h = wo.shape[1]
    k = int(w["k"])
    moe = MoE(
        hidden_size=d,
        expert=SwiGLUExpert(d, h),
        num_experts=E,
        ep_size=world,
        k=k,
        use_residual=False,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        min_capacity=0,
    )
    # What deepspeed.initialize would do: create the expert-parallel group and hand it to the
    # gate (without it the dropless capacity is not agreed between the ranks).
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate)
        local = moe.deepspeed_moe.experts.deepspeed_experts
        El = len(local)
        for i, ex in enumerate(local):
            e = rank * El + i
            ex.w1.weight.copy_(wgu[e].t())
            ex.w2.weight.copy_(wo[e].t())
    x = w[f"x{rank}"].clone().requires_grad_(True)
    y, _, _ = moe(x.unsqueeze(0))
    y = y.squeeze(0).detach().clone()
    times = []
    for i in range(warmup + reps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        yy, _, _ = moe(x.unsqueeze(0))
        yy.sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    save_file(
        {"y": y, "step_s": torch.tensor(times, dtype=torch.float64)},
        f"{out}.rank{rank}.safetensors",
    )
    print(f"RESULT rank {rank} ok", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
