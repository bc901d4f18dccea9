"""moe_framework.training: the optimiser side of a training step, usable piece by piece."""

import pytest
import torch
import torch.nn.functional as F

from moe_framework import training
from moe_framework.config import MoEConfig
from moe_framework.system import MixtureOfExpertsSystem, StepResult


def _cfg(tmp_path=None, **kw):
    base = dict(
        input_dim=12, d_model=16, d_hidden=24, num_layers=2, num_experts=4, k=2, output_dim=3
    )
    if tmp_path is not None:
        base["kg_path"] = str(tmp_path / "kg.sqlite")
    base.update(kw)
    return MoEConfig(**base)


def _task(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def _twins(**kw):
    torch.manual_seed(0)
    a = MixtureOfExpertsSystem(_cfg(**kw))
    b = MixtureOfExpertsSystem(_cfg(**kw))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"amp_dtype": "bf16"},
        {"grad_clip_norm": None},
        {"bias_update_rate": 0.01, "load_balance_coef": 0.0},
        {"strategy": "grouped_sigmoid", "n_group": 2, "topk_group": 2, "bias_update_rate": 0.01},
    ],
)
def test_training_step_function_is_what_the_system_method_runs_bitwise(kw):
    a, b = _twins(**kw)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    x, y = _task()
    for _ in range(3):
        ra = a.training_step((x, y), opt_a)
        rb = training.training_step(b, {"inputs": x, "targets": y}, opt_b)
        assert isinstance(rb, StepResult) and ra == rb
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.step == b.step == 3


def test_a_loop_of_the_parts_equals_training_step_bitwise():
    a, b = _twins(bias_update_rate=0.01)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = _task()
    ra = a.training_step((x, y), opt_a)
    # the same step written by hand from the parts, as a custom loop would
    b.train()
    opt_b.zero_grad(set_to_none=True)
    with training.autocast(b.config.amp_dtype, x.device):
        out = b(x)
    task = training.task_loss(out.output, y, F.cross_entropy)
    loss = task + out.aux_loss
    norm = training.backward_and_step(loss, b.parameters(), opt_b, grad_clip_norm=1.0)
    training.update_router_biases(b.routers())
    b.step += 1
    done = training.run_schedules(b)
    rb = training.step_result(loss, task, out, norm, num_experts=4, consolidated=done, step=b.step)
    assert ra == rb
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_autocast_dtype_and_loss_scaler_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training.autocast_dtype("none", cpu) is None
    assert training.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert training.autocast_dtype("fp16", cpu) is torch.bfloat16  # no fast float16 on CPUs
    assert training.autocast_dtype("fp16", cuda) is torch.float16
    assert training.autocast_dtype("bf16", cuda) is torch.bfloat16
    assert [training.needs_grad_scaler(a, cuda) for a in ("none", "bf16", "fp16")] == [
        False,
        False,
        True,
    ]
    assert not training.needs_grad_scaler("fp16", cpu)
    with training.autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with training.autocast("none", cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_task_loss_flattens_per_position_targets_and_computes_in_float32():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 5))
    got = training.task_loss(logits, targets, F.cross_entropy)
    assert got.dtype == torch.float32
    ref = F.cross_entropy(logits.float().reshape(10, 7), targets.reshape(10))
    assert torch.equal(got, ref)
    # same-shaped targets (regression, soft labels) are passed through as they are
    soft = torch.softmax(torch.randn(2, 5, 7), -1)
    assert torch.equal(
        training.task_loss(logits, soft, F.mse_loss), F.mse_loss(logits.float(), soft)
    )


def test_backward_and_step_clips_steps_and_frees_gradients():
    lin = torch.nn.Linear(4, 4)
    before, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    loss = (lin(torch.randn(8, 4)) * 100).square().mean()
    norm = training.backward_and_step(loss, lin.parameters(), opt, grad_clip_norm=1e-3)
    assert float(norm) > 1e-3
    with torch.no_grad():
        moved = torch.cat([(lin.weight - before).reshape(-1), (lin.bias - bias).reshape(-1)])
    assert all(p.grad is None for p in lin.parameters())
    # SGD with lr=1 moves the parameters by the clipped gradient: norm 1e-3
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-4)
    no_clip = training.backward_and_step(
        lin(torch.randn(2, 4)).sum(), lin.parameters(), opt, grad_clip_norm=None
    )
    assert no_clip is None


def test_update_router_biases_calls_each_routers_hook():
    class Router:
        calls = 0

        def update_bias(self):
            self.calls += 1

    routers = [Router(), Router()]
    training.update_router_biases(routers)
    assert [r.calls for r in routers] == [1, 1]


def test_run_schedules_consolidates_and_snapshots_on_their_intervals(tmp_path):
    model = MixtureOfExpertsSystem(
        _cfg(tmp_path, consolidation_interval=2, kg_checkpoint_interval=3, kg_keep_checkpoints=5)
    )
    model(_task(8)[0])
    done = []
    for step in range(1, 7):
        model.step = step
        done.append(training.run_schedules(model))
    assert done == [False, True, False, True, False, True]
    assert len(model.knowledge_graph.list_checkpoints()) == 2  # steps 3 and 6
    model.close()


def test_training_step_on_the_wrong_model_input_says_what_it_expected():
    model = MixtureOfExpertsSystem(_cfg())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[..., 12\]"):
        training.training_step(model, (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), opt)
    assert model.step == 0


@pytest.mark.cuda
def test_training_step_function_refuses_fp16_on_cuda_without_a_loss_scaler():
    model = MixtureOfExpertsSystem(_cfg(amp_dtype="fp16")).cuda()
    x, y = (t.cuda() for t in _task())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs grad_scaler=torch.amp.GradScaler"):
        training.training_step(model, (x, y), opt)
    r = training.training_step(model, (x, y), opt, grad_scaler=torch.amp.GradScaler("cuda"))
    assert r.task_loss > 0
