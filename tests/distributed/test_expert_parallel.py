"""Expert parallelism on gloo with CPU processes spawned by the tests themselves.

Each test starts the ranks of tests/distributed/ep_worker.py (one thread each, a fresh port, a
bounded timeout); every rank checks its results against the single-process ``MoELayer`` with the
same global weights and inputs and exits non-zero on a mismatch.
"""

from __future__ import annotations

import os

import pytest

import moe_framework
from moe_framework.distributed import launch_local

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ep_worker.py")
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(moe_framework.__file__)))


def _env(ep_timeout=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    if ep_timeout is not None:
        env["EP_TIMEOUT"] = str(ep_timeout)
    return env


def run(scenario: str, nprocs: int, seed: int, *, timeout_s: float = 150.0, ep_timeout=None):
    return launch_local(
        WORKER, [scenario, str(seed)], nprocs, timeout_s=timeout_s, env=_env(ep_timeout)
    )


def explain(results) -> str:
    return "\n".join(
        f"--- rank {r.rank} rc={r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        for r in results
    )


def assert_all_ok(results, scenario: str) -> None:
    for r in results:
        assert r.returncode == 0 and f"OK {scenario}" in r.stdout, explain(results)


def test_forward_backward_capacity_skew_and_empty_ranks_match_single_process(seed):
    # Dropless: forward, input gradients and each rank's expert-gradient slice bitwise equal to
    # the single-process layer on the concatenated batch (rank sizes 13 and 7), draft reports
    # equal to the single-process layer on the rank's shard, determinism; skewed routing (every
    # slot to one rank: the other receives nothing); capacity mode: outputs, input gradients and
    # dropped counts equal to the single-process capacity router on the rank's tokens; T = 0 on
    # one rank; reduce_gradients + update_bias leave every rank's router identical. Then capacity
    # mode under torch.compile: torch._dynamo.explain finds zero graph breaks, and the
    # fullgraph=True (aot_eager) forward and input gradient equal eager.
    results = run("core", 2, seed)
    assert_all_ok(results, "core")


def test_a_rank_that_raises_or_has_another_config_makes_the_others_fail_clearly(seed):
    # Rank 1 builds another d_hidden: both ranks get an ExpertParallelError at setup naming the
    # differing config hashes. Then rank 1 raises: rank 0's next all-to-all fails with an
    # ExpertParallelError (not a hang) well within the process-group timeout.
    results = run("raise", 2, seed, ep_timeout=20)
    for r in results:
        assert "different layer configurations" in r.stdout, explain(results)
    r0 = results[0]
    assert r0.returncode == 0 and "OK raise" in r0.stdout, explain(results)
    assert "CAUGHT after" in r0.stdout and "expert parallel:" in r0.stdout, explain(results)
    assert results[1].returncode not in (0, None), explain(results)
    assert "rank 1 fails on purpose" in results[1].stderr, explain(results)


def test_a_rank_that_dies_makes_the_others_fail_clearly(seed):
    results = run("die", 2, seed, ep_timeout=20)
    r0 = results[0]
    assert r0.returncode == 0 and "OK die" in r0.stdout, explain(results)
    assert "CAUGHT after" in r0.stdout and "a peer rank raised, died" in r0.stdout
    assert results[1].returncode == 3, explain(results)


def test_dcp_reshard_4_2_1_bitwise_and_fsdp2_training_matches_single_process(seed, tmp_path):
    # The 4 processes save at ep = 4, then train 4 SGD steps of dense -> MoE -> dense with FSDP2
    # (dense parameters) on a (dp=2, ep=2) mesh; the loss curve must match the single-process
    # run on the whole batch (rtol 1e-5: FSDP's reduce-scatter sums in another order).
    import torch

    from moe_framework import MoELayer
    from moe_framework.distributed import checkpoint

    ckpt = str(tmp_path / "ckpt")
    results = launch_local(WORKER, ["dcp_save", str(seed), ckpt], 4, timeout_s=150, env=_env())
    assert_all_ok(results, "dcp_save")
    results = launch_local(WORKER, ["dcp_load", str(seed), ckpt], 2, timeout_s=150, env=_env())
    assert_all_ok(results, "dcp_load")
    # ep = 1: this process, no process group. The reference is the seeded build (ep_worker.build).
    torch.manual_seed(seed)
    want = MoELayer.build(d_model=12, d_hidden=10, num_experts=8, k=2, inplace_backward=False)
    torch.manual_seed(seed + 100)
    got = MoELayer.build(d_model=12, d_hidden=10, num_experts=8, k=2, inplace_backward=False)
    checkpoint.load(got, ckpt)
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_expert_parallel_without_a_process_group_says_how_to_start_one():
    import torch.distributed as dist

    from moe_framework import MoELayer
    from moe_framework.distributed import ExpertParallelError, expert_parallel

    assert not dist.is_initialized()
    layer = MoELayer.build(d_model=4, d_hidden=4, num_experts=2, k=1)
    with pytest.raises(ExpertParallelError, match="init_distributed"):
        expert_parallel(layer)
