"""One rank of the expert-parallel tests (tests/distributed/test_expert_parallel.py), started by
``moe_framework.distributed.launch_local``. ``python ep_worker.py SCENARIO SEED [OUT]``.

Every rank builds the same global layer from SEED, keeps an unsharded copy as the single-process
reference (the plain ``MoELayer`` with ``LocalDispatcher``), shards the other, and checks its own
results against the reference; a failed check raises (non-zero exit). Prints ``OK SCENARIO``.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

import moe_framework  # noqa: F401
from moe_framework import MoELayer
from moe_framework.distributed import (
    ExpertParallelError,
    expert_parallel,
    global_routing_stats,
    init_distributed,
    reduce_gradients,
    update_bias,
)
from moe_framework.routing.base import RoutingDecision

torch.set_num_threads(1)
D, H, E, K = 12, 10, 8, 2


def build(seed: int, **kw) -> MoELayer:
    torch.manual_seed(seed)
    kw.setdefault("d_hidden", H)
    return MoELayer.build(d_model=D, num_experts=E, k=K, inplace_backward=False, **kw)


def shards(sizes, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(sizes), D, generator=g)
    gy = torch.randn(sum(sizes), D, generator=g)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return x, gy, starts


def check_equal(name, got, want, exact=True, tol=None):
    if exact:
        if not torch.equal(got, want):
            diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
            raise AssertionError(f"{name}: not bitwise equal (max diff {diff})")
    else:
        torch.testing.assert_close(got, want, **(tol or dict(rtol=1e-5, atol=1e-6)), msg=name)


def scenario_core(seed: int, rank: int, world: int) -> None:
    sizes = [13, 7, 0, 5][:world]
    # --- dropless: forward and gradients vs the single-process layer on the whole batch --------
    ref = build(seed)
    layer = expert_parallel(copy.deepcopy(ref), None, mode="dropless")
    lo, El = rank * (E // world), E // world
    x, gy, starts = shards(sizes, seed)
    xs = x[starts[rank] : starts[rank] + sizes[rank]].clone().requires_grad_(True)
    gys = gy[starts[rank] : starts[rank] + sizes[rank]]
    xr = x.clone().requires_grad_(True)
    y_ref, info_ref = ref(xr)
    (y_ref * gy).sum().backward()
    y, info = layer(xs)
    (y * gys).sum().backward()
    sl = slice(starts[rank], starts[rank] + sizes[rank])
    check_equal("dropless forward", y, y_ref[sl])
    assert xs.grad is not None and xr.grad is not None
    check_equal("dropless grad x", xs.grad, xr.grad[sl])
    bank, ref_bank = layer.experts, ref.experts
    for name, p in bank.named_parameters():
        want = dict(ref_bank.named_parameters())[name].grad[lo : lo + El]
        check_equal(f"dropless grad {name}", p.grad, want)
    # Dense (router) gradients: each rank holds its tokens' part; their sum is the global one.
    g = layer.router.gate.weight.grad.clone()
    dist.all_reduce(g)
    check_equal("router grad (summed)", g, ref.router.gate.weight.grad, exact=False)
    # Draft reports: the rank's own tokens, as the single-process layer on that shard.
    ref_local = build(seed)
    _, info_local = ref_local(x[sl])
    for f in ("token_count", "top_tokens", "confidence", "mean_output"):
        check_equal(f"reports.{f}", getattr(info.reports, f), getattr(info_local.reports, f))
    # reduce_gradients: the mean-loss convention (each rank: mean over its tokens).
    # Determinism: a second forward gives the same bits.
    y2, _ = layer(xs)
    check_equal("dropless determinism", y2, y)

    # Routing statistics over every rank's tokens equal the single-process layer's on the whole
    # batch (the loads are integer sums: exact).
    ref_s = build(seed, track_stats=True)
    ep_s = expert_parallel(build(seed, track_stats=True), None)
    ref_s(x)
    ep_s(x[sl])
    got_s, want_s = global_routing_stats(ep_s), ref_s.routing_stats()
    for key in ("tokens_per_expert", "tokens", "routed", "dropped", "steps"):
        assert got_s[key] == want_s[key], (key, got_s[key], want_s[key])
    assert abs(got_s["entropy"] - want_s["entropy"]) < 1e-6

    # --- skewed routing: every slot to the last rank's experts (the others receive nothing) ---
    T = 9
    xk = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 7))
    owner = world - 1
    ids = torch.stack(
        [torch.full((T,), owner * El + (j % El), dtype=torch.int32) for j in range(K)], 1
    )
    ids[0, 1] = -1  # a dropped slot too
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(seed + 8))
    w[0, 1] = 0
    dec = RoutingDecision(w, ids, torch.zeros(E, dtype=torch.int32), w, w.new_zeros(()), {})
    xsd, off, ctx = layer.dispatcher.dispatch(xk, dec)
    if rank != owner:
        assert xsd.shape[0] == 0, f"rank {rank} should receive nothing, got {xsd.shape[0]} rows"
    ysd = layer.experts(xsd, off)
    yk = layer.dispatcher.combine(ysd, ctx)
    ref_y = ref.dispatcher.combine(
        ref.experts(*ref.dispatcher.dispatch(xk, dec)[:2]), ctx_ref(ref, xk, dec)
    )
    check_equal("skewed forward", yk, ref_y)

    # --- capacity mode: same drops and outputs as the single-process capacity router ---------
    cf = 0.75
    for Tc in (12, 5):
        csizes = [Tc] * world
        refc = build(seed, capacity_factor=cf)
        base = build(seed)
        cap = expert_parallel(base, None, mode="capacity", capacity_factor=cf)
        x, gy, starts = shards(csizes, seed + 3 + Tc)
        sl = slice(starts[rank], starts[rank] + csizes[rank])
        xs = x[sl].clone().requires_grad_(True)
        y, _ = cap(xs)
        (y * gy[sl]).sum().backward()
        xr = x[sl].clone().requires_grad_(True)
        y_ref, info_ref = refc(xr)
        (y_ref * gy[sl]).sum().backward()
        check_equal("capacity forward", y, y_ref)
        check_equal("capacity grad x", xs.grad, xr.grad)
        dec = cap.router(x[sl])
        _, _, ctxc = cap.dispatcher.dispatch(x[sl], dec)
        check_equal("capacity dropped", ctxc.dropped, info_ref.stats["dropped"])
        # Expert gradients: the sum of every rank's single-process gradients, sliced.
        for name, p in cap.experts.named_parameters():
            want = dict(refc.experts.named_parameters())[name].grad.clone()
            dist.all_reduce(want)
            check_equal(f"capacity grad {name}", p.grad, want[lo : lo + El], exact=False)
    print(f"rank {rank}: capacity dropped {int(ctxc.dropped)}", flush=True)

    # --- T = 0 on one rank, dropless and capacity (C from capacity_tokens on every rank) ------
    x0 = torch.randn(0 if rank == 0 else 5, D)
    y0, _ = layer(x0)
    assert y0.shape == x0.shape
    cap0 = expert_parallel(
        build(seed), None, mode="capacity", capacity_factor=1.0, capacity_tokens=5
    )
    y0c, _ = cap0(x0)
    if rank != 0:  # C = ceil(5*2/8) = 2 here, as in the single-process layer on these 5 tokens
        check_equal("capacity T=0 peer", y0c, build(seed, capacity_factor=1.0)(x0)[0])

    # --- reduce_gradients + global bias update keep every rank's router identical ------------
    lb = build(seed, bias_update_rate=0.01)
    lb = expert_parallel(lb, None)
    xb = torch.randn(6 + 3 * rank, D, generator=torch.Generator().manual_seed(seed + rank))
    yb, _ = lb(xb)
    yb.mean().backward()
    reduce_gradients(lb)
    update_bias(lb)
    for t in (lb.router.gate.weight.grad, lb.router.selection_bias):
        others = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(others, t.contiguous())
        for o in others:
            check_equal("replicated after reduce/update", o, t)
    assert lb.router.selection_bias.abs().sum() > 0
    scenario_compile(seed, rank, world)  # same processes: capacity mode under torch.compile
    check_bad_arguments(seed)


def check_bad_arguments(seed: int) -> None:
    """Bad input: a ValueError naming the argument, expected and actual value."""
    cases = [
        (
            lambda: expert_parallel(MoELayer.build(d_model=D, d_hidden=H, num_experts=3, k=1)),
            "num_experts=3 must be divisible by the expert-parallel size ep=2",
        ),
        (lambda: expert_parallel(build(seed), mode="sparse"), "mode must be one of"),
        (lambda: expert_parallel(build(seed), mode="capacity"), "needs capacity_factor"),
        (
            lambda: expert_parallel(build(seed), mode="capacity", capacity_factor=-1.0),
            "capacity_factor, a float > 0, got -1.0",
        ),
        (lambda: expert_parallel(build(seed), capacity_tokens=4), "capacity_tokens must be None"),
        (lambda: expert_parallel(torch.nn.Linear(2, 2)), "layer must be a MoELayer, got Linear"),
        (lambda: expert_parallel(expert_parallel(build(seed))), "already expert-parallel"),
        (
            lambda: expert_parallel(build(seed, bias_update_rate=0.1, auto_update_bias=True)),
            "auto_update_bias=True",
        ),
    ]
    for fn, want in cases:
        try:
            fn()
        except ValueError as err:
            assert want in str(err), f"{want!r} not in {err}"
        else:
            raise AssertionError(f"no ValueError for {want!r}")


def ctx_ref(ref, x, dec):
    return ref.dispatcher.dispatch(x, dec)[2]


def scenario_compile(seed: int, rank: int, world: int) -> None:
    import torch._dynamo

    layer = expert_parallel(build(seed), None, mode="capacity", capacity_factor=1.0)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(seed + rank))
    y_eager, _ = layer(x)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, f"graph breaks: {explain.break_reasons}"
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_(True)
    yc, _ = compiled(xc)
    check_equal("compiled capacity forward", yc, y_eager)
    yc.sum().backward()
    xe = x.clone().requires_grad_(True)
    layer.zero_grad()
    ye, _ = layer(xe)
    ye.sum().backward()
    check_equal("compiled capacity grad x", xc.grad, xe.grad)


def scenario_raise(seed: int, rank: int, world: int) -> None:
    scenario_config(seed, rank, world)  # the setup check first (both ranks catch it)
    layer = expert_parallel(build(seed), None)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    t0 = time.monotonic()
    try:
        layer(torch.randn(8, D))
        layer(torch.randn(8, D))
    except ExpertParallelError as err:
        print(f"CAUGHT after {time.monotonic() - t0:.1f}s: {err}", flush=True)
        return
    raise AssertionError("rank 0 did not notice that rank 1 failed")


def scenario_die(seed: int, rank: int, world: int) -> None:
    layer = expert_parallel(build(seed), None)
    if rank == 1:
        os._exit(3)
    scenario_raise_tail(layer)


def scenario_raise_tail(layer) -> None:
    t0 = time.monotonic()
    try:
        for _ in range(3):
            layer(torch.randn(8, D))
    except ExpertParallelError as err:
        print(f"CAUGHT after {time.monotonic() - t0:.1f}s: {err}", flush=True)
        return
    raise AssertionError("rank 0 did not notice that rank 1 died")


def scenario_config(seed: int, rank: int, world: int) -> None:
    layer = build(seed, d_hidden=H + rank)  # rank 1 has a different hidden width
    try:
        expert_parallel(layer, None)
    except ExpertParallelError as err:
        assert "different layer configurations" in str(err), str(err)
        print(f"CAUGHT: {err}", flush=True)
        return
    raise AssertionError("the config mismatch was not detected")


def scenario_dcp_save(seed: int, rank: int, world: int) -> None:
    from moe_framework.distributed import checkpoint

    layer = expert_parallel(build(seed), None)
    checkpoint.save(layer, sys.argv[3])
    scenario_fsdp(seed, rank, world)  # the same 4 processes: FSDP2 + EP on a (dp=2, ep=2) mesh


def scenario_dcp_load(seed: int, rank: int, world: int) -> None:
    from moe_framework.distributed import checkpoint

    want = build(seed)
    layer = expert_parallel(build(seed + 100), None)  # other weights, overwritten by the load
    checkpoint.load(layer, sys.argv[3])
    lo, El = rank * (E // world), E // world
    got_sd, want_sd = layer.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for k, v in want_sd.items():
        exp = v[lo : lo + El] if k.startswith("experts.") else v
        check_equal(f"dcp load {k}", got_sd[k], exp)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(seed + rank))
    check_equal("dcp loaded forward", layer(x)[0], want(x)[0])


class Net(torch.nn.Module):
    """dense -> MoE -> dense: the FSDP2 + expert-parallel training check."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(D, D)
        self.moe = MoELayer.build(d_model=D, d_hidden=H, num_experts=E, k=K, inplace_backward=False)
        self.out = torch.nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        y, _ = self.moe(h)
        return self.out(h + y)


def scenario_fsdp(seed: int, rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moe_framework.distributed import expert_parameters

    steps, T = 4, 6
    g = torch.Generator().manual_seed(seed + 5)
    data = [(torch.randn(world * T, D, generator=g), torch.randn(world * T, 3, generator=g))]
    data = data * steps

    def loss_fn(model, x, t):
        return torch.nn.functional.mse_loss(model(x), t)

    ref = Net(seed)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_losses = []
    for x, t in data:
        opt.zero_grad()
        loss = loss_fn(ref, x, t)
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "ep"))
    flat = init_device_mesh("cpu", (world,))
    model = Net(seed)
    expert_parallel(model.moe, mesh)
    fully_shard(model, mesh=flat, ignored_params=set(expert_parameters(model)))
    from torch.distributed.tensor import DTensor

    assert isinstance(model.inp.weight, DTensor) and isinstance(
        model.moe.router.gate.weight, DTensor
    )
    assert not isinstance(model.moe.experts.w_out, DTensor)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    sl = slice(rank * T, (rank + 1) * T)
    for x, t in data:
        opt.zero_grad()
        loss = loss_fn(model, x[sl], t[sl])
        loss.backward()
        reduce_gradients(model)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    print(f"rank {rank}: losses {losses} reference {ref_losses}", flush=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]


def main() -> None:
    scenario, seed = sys.argv[1], int(sys.argv[2])
    rank, world = init_distributed("gloo", timeout_s=float(os.environ.get("EP_TIMEOUT", "20")))
    try:
        globals()[f"scenario_{scenario}"](seed, rank, world)
    finally:
        pass
    print(f"OK {scenario}", flush=True)
    if scenario in ("raise", "die"):
        # The group lost a peer: gloo cannot tear it down cleanly, and its background threads can
        # abort the interpreter's shutdown ("terminate called without an active exception",
        # SIGABRT) after the scenario already passed. Leave without running destructors.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
