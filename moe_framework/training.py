"""The optimiser side of training a :class:`~moe_framework.system.MixtureOfExpertsSystem`.

The model computes (forward, balancing losses, draft reports); this module does what a training
loop does around it, the way torchtitan keeps the expert-bias update in the trainer rather than
in the model: autocast (:func:`autocast`), the float16 loss scaler (:func:`needs_grad_scaler`),
backward, clipping and the optimiser step (:func:`backward_and_step`), the aux-loss-free bias
update of the routers (:func:`update_router_biases`), the knowledge-graph schedule
(:func:`run_schedules`) and one device read for the step's numbers (:func:`step_result`).
:func:`training_step` chains them; ``MixtureOfExpertsSystem.training_step`` calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .training_options import (
    TrainingOptions,
    apply_training_options,
    expert_diversity_loss,
    parameter_groups,
)

__all__ = [
    "StepResult",
    "TrainingOptions",
    "apply_training_options",
    "autocast",
    "autocast_dtype",
    "backward_and_step",
    "expert_diversity_loss",
    "needs_grad_scaler",
    "parameter_groups",
    "run_schedules",
    "split_batch",
    "step_result",
    "task_loss",
    "training_step",
    "update_router_biases",
]

Batch = Union[Sequence[torch.Tensor], dict]


class StepResult(NamedTuple):
    """What :func:`training_step` returns (plain Python values).

    loss: task loss + balancing losses of the step. task_loss, aux_loss: its two parts.
    grad_norm: total gradient norm before clipping (None when clipping is off).
    stats: routing telemetry: ``load`` [layers][E] slots per expert, ``dropped`` per layer,
        ``consolidated`` (True when this step ran the librarian), ``step``.
    """

    loss: float
    task_loss: float
    aux_loss: float
    grad_norm: Optional[float]
    stats: dict


def autocast_dtype(amp_dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``config.amp_dtype`` on ``device`` (None: no autocast).

    CPU autocast runs in bfloat16 whatever was asked (float16 matmuls are slow or missing on
    CPUs); on CUDA "fp16" is float16 and "bf16" bfloat16."""
    if amp_dtype == "none":
        return None
    if device.type == "cuda" and amp_dtype == "fp16":
        return torch.float16
    return torch.bfloat16


def autocast(amp_dtype: str, device: torch.device) -> torch.autocast:
    """``torch.autocast`` for ``config.amp_dtype`` on ``device`` (disabled for "none")."""
    dtype = autocast_dtype(amp_dtype, device)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def needs_grad_scaler(amp_dtype: str, device: torch.device) -> bool:
    """Whether training needs a loss scaler: only float16, whose narrow exponent underflows
    gradients (bfloat16 has float32's range)."""
    return autocast_dtype(amp_dtype, device) == torch.float16


def split_batch(batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch given as a pair or as ``{"inputs", "targets"}``."""
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"]
    inputs, targets = batch
    return inputs, targets


def task_loss(
    output: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``loss_fn`` on float32 logits. Per-position class targets ``[B, S]`` for logits
    ``[B, S, C]`` are flattened to ``[B*S]`` and ``[B*S, C]``, the layout losses expect."""
    logits = output.float()
    if targets.shape != logits.shape and logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
    return loss_fn(logits, targets)


def backward_and_step(
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip_norm: Optional[float],
    grad_scaler: Optional[torch.amp.GradScaler] = None,
) -> Optional[torch.Tensor]:
    """Backward (scaled when ``grad_scaler`` is given), clip the gradients of ``parameters`` to
    ``grad_clip_norm`` (unscaled first), optimiser step, then free the gradients
    (``zero_grad(set_to_none=True)``). Returns the total gradient norm before clipping as a
    device tensor (None when ``grad_clip_norm`` is None)."""
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = None
    if grad_clip_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def update_router_biases(routers: Iterable[Any]) -> None:
    """The aux-loss-free balancing step of every router (``update_bias()``: move each expert's
    selection bias against its load since the last call). Call it after the optimiser step."""
    for router in routers:
        router.update_bias()


def run_schedules(model: Any) -> bool:
    """The knowledge-graph work due after ``model.step`` steps: :meth:`consolidate` every
    ``config.consolidation_interval`` steps, a snapshot every ``config.kg_checkpoint_interval``.
    Returns whether it consolidated."""
    cfg = model.config
    consolidated = False
    if cfg.consolidation_interval and model.step % cfg.consolidation_interval == 0:
        model.consolidate()
        consolidated = True
    if cfg.kg_checkpoint_interval and model.step % cfg.kg_checkpoint_interval == 0:
        model.knowledge_graph.checkpoint()
    return consolidated


def step_result(
    loss: torch.Tensor,
    task: torch.Tensor,
    out: Any,
    grad_norm: Optional[torch.Tensor],
    *,
    num_experts: int,
    consolidated: bool,
    step: int,
) -> StepResult:
    """The :class:`StepResult` of a step, read from the device once: the losses, the gradient
    norm and each layer's per-expert load and dropped slots (``out`` is the forward's
    ``SystemOutput``)."""
    E = num_experts
    zero = torch.zeros(1, device=loss.device)
    parts = [loss.detach().float().reshape(1), task.detach().float().reshape(1)]
    parts.append(out.aux_loss.detach().float().reshape(1))
    parts.append(grad_norm.detach().float().reshape(1) if grad_norm is not None else zero)
    for info in out.routing:
        parts.append(info.counts.detach().float().reshape(E))
        dropped = info.stats.get("dropped")
        parts.append(dropped.detach().float().reshape(1) if dropped is not None else zero)
    vals = torch.cat([p.to(loss.device) for p in parts]).tolist()
    load, drops = [], []
    pos = 4
    for _ in out.routing:
        load.append([int(v) for v in vals[pos : pos + E]])
        drops.append(int(vals[pos + E]))
        pos += E + 1
    stats = {"load": load, "dropped": drops, "consolidated": consolidated, "step": step}
    return StepResult(vals[0], vals[1], vals[2], vals[3] if grad_norm is not None else None, stats)


def training_step(
    model: Any,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
    options: Optional[TrainingOptions] = None,
) -> StepResult:
    """One optimisation step of a :class:`~moe_framework.system.MixtureOfExpertsSystem` on
    ``batch = (inputs, targets)`` (or ``{"inputs", "targets"}``).

    Forward under :func:`autocast` of ``config.amp_dtype``; loss = :func:`task_loss` + the
    balancing losses; :func:`backward_and_step` (clipping to ``config.grad_clip_norm``, scaled
    with ``grad_scaler``: required for float16 on CUDA, keep one across steps); the routers' bias
    update when ``config.bias_update_rate > 0``; ``model.step += 1``; :func:`run_schedules`.
    ``options``: a :class:`~moe_framework.training_options.TrainingOptions`: its router and
    expert dropout are set on the routers before the forward and ``diversity_loss_coef *
    expert_diversity_loss(model)`` is added to the loss (build the optimiser with
    ``parameter_groups(model, lr, options)`` for its learning-rate multipliers).
    """
    inputs, targets = split_batch(batch)
    cfg = model.config
    device = inputs.device
    if grad_scaler is None and needs_grad_scaler(cfg.amp_dtype, device):
        raise ValueError(
            "training_step: config.amp_dtype='fp16' on CUDA needs grad_scaler="
            "torch.amp.GradScaler('cuda') (one kept across steps): float16 gradients underflow "
            "without loss scaling"
        )
    if options is not None:
        apply_training_options(model, options)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(cfg.amp_dtype, device):
        out = model(inputs)
    task = task_loss(out.output, targets, loss_fn)
    loss = task + out.aux_loss
    if options is not None and options.diversity_loss_coef > 0:
        loss = loss + options.diversity_loss_coef * expert_diversity_loss(model).to(loss.device)
    grad_norm = backward_and_step(
        loss,
        model.parameters(),
        optimizer,
        grad_clip_norm=cfg.grad_clip_norm,
        grad_scaler=grad_scaler,
    )
    if cfg.bias_update_rate > 0:
        update_router_biases(model.routers())
    model.step += 1
    consolidated = run_schedules(model)
    return step_result(
        loss,
        task,
        out,
        grad_norm,
        num_experts=cfg.num_experts,
        consolidated=consolidated,
        step=model.step,
    )
