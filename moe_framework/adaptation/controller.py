""":class:`AdaptationController`: splits overloaded experts and merges dead or duplicate ones
between training steps, with drift detection as a trigger and rollback on a validation loss."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
from torch import nn

from .resize import _as_optimizers, expert_bank, make_adaptive, merge_experts, split_expert
from .snapshot import Snapshot
from .stats import DriftDetector, ExpertWindowStats

__all__ = ["AdaptationController"]

TRIGGERS = ("always", "drift")
SIMILARITIES = ("weights", "outputs")


def _check_real(name: str, v, lo: float = 0.0) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (lo <= float(v) < math.inf):
        raise ValueError(f"AdaptationController: {name} must be a finite float >= {lo}, got {v!r}")
    return float(v)


class AdaptationController:
    """Watches one :class:`~moe_framework.moe_layer.MoELayer` and adapts its experts.

    Use::

        ctl = AdaptationController(layer, optimizer, window=50, validate=val_loss_fn)
        for x in batches:
            y, info = layer(x)                 # compiled or not
            ...backward, optimizer.step()...
            ctl.observe(x, info)               # device-side, no host sync
            events = ctl.step()                # between steps, off the hot path (reads the device
                                               # once every `window` steps)

    Every ``window`` steps :meth:`step` reads the window statistics
    (:class:`~moe_framework.adaptation.stats.ExpertWindowStats`) and takes at most one action:

    * **split** the most loaded expert when its load exceeds ``split_ratio`` times the mean (and
      the layer has fewer than ``max_experts``); the copy takes about half its tokens.
    * otherwise **merge** the least loaded expert into its nearest expert (cosine of the
      flattened weights, or with ``similarity="outputs"`` of the experts' mean outputs over the
      window) when its load is below ``merge_ratio`` times the mean (dead or under-used; at least
      ``min_experts`` remain), or any pair whose cosine exceeds ``duplicate_cosine``.

    The halves of a split are kept balanced as it trains: :meth:`observe` moves each split
    sibling's sub-routing offset by ``sibling_balance_rate`` towards its siblings' mean load
    (:meth:`AdaptiveRouter.balance_siblings`, on the device; 0 = off).

    ``trigger="drift"`` acts only when the routing distribution drifted: Jensen-Shannon divergence
    between the window and the previous one above ``drift_threshold`` nats
    (:class:`~moe_framework.adaptation.stats.DriftDetector`); ``"always"`` checks every window.

    Rollback: with ``validate`` (a callable returning the validation loss as a float), the layer
    and optimiser state are snapshotted before each action and the loss measured; one window later
    the loss is measured again and, when it is worse by more than ``tolerance`` (relative), the
    snapshot is restored bit for bit (event ``"rollback"``), else dropped (``"commit"``).

    :meth:`step` returns the list of events of the call (dicts with ``"action"``); ``history``
    keeps them all.
    """

    def __init__(
        self,
        layer: nn.Module,
        optimizer=None,
        *,
        window: int = 50,
        split_ratio: float = 2.0,
        merge_ratio: float = 0.05,
        duplicate_cosine: Optional[float] = None,
        max_experts: Optional[int] = None,
        min_experts: int = 2,
        noise: float = 0.0,
        similarity: str = "weights",
        sibling_balance_rate: float = 0.05,
        trigger: str = "always",
        drift_threshold: float = 0.05,
        validate: Optional[Callable[[], float]] = None,
        tolerance: float = 0.02,
        seed: int = 0,
    ):
        bank = expert_bank(layer)
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"AdaptationController: similarity must be one of {SIMILARITIES}, got {similarity!r}"
            )
        if trigger not in TRIGGERS:
            raise ValueError(
                f"AdaptationController: trigger must be one of {TRIGGERS}, got {trigger!r}"
            )
        if duplicate_cosine is not None and not (
            isinstance(duplicate_cosine, numbers.Real) and -1 <= duplicate_cosine <= 1
        ):
            raise ValueError(
                f"AdaptationController: duplicate_cosine must be None or in [-1, 1], got {duplicate_cosine!r}"
            )
        for name, v in (("min_experts", min_experts), ("max_experts", max_experts)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"AdaptationController: {name} must be an int >= 1, got {v!r}")
        if validate is not None and not callable(validate):
            raise ValueError(f"AdaptationController: validate must be callable, got {validate!r}")
        self.layer = layer
        self.optimizers = _as_optimizers(optimizer)
        self.split_ratio = _check_real("split_ratio", split_ratio, 1.0)
        self.merge_ratio = _check_real("merge_ratio", merge_ratio)
        self.noise = _check_real("noise", noise)
        self.sibling_balance_rate = _check_real("sibling_balance_rate", sibling_balance_rate)
        self.tolerance = _check_real("tolerance", tolerance)
        self.duplicate_cosine = duplicate_cosine
        self.max_experts = max_experts if max_experts is not None else 2 * bank.num_experts
        self.min_experts = min_experts
        self.trigger = trigger
        self.validate = validate
        self.detector = DriftDetector(drift_threshold)
        self.similarity = similarity
        self.stats = ExpertWindowStats(
            bank.num_experts, window, device=bank.w_out.device, d_model=bank.d_model
        )
        self.window = self.stats.window
        self.generator = torch.Generator().manual_seed(seed)
        self.recent_steps = min(self.window, 8)
        self.steps = 0
        self.history: list = []
        # The inputs and ids of the last few steps: the tokens whose median sets a split's offset.
        self._recent: list = []
        self._pending: Optional[tuple] = None
        make_adaptive(layer)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, info) -> None:
        """Record one step: ``x`` the layer's input, ``info`` its :class:`RoutingInfo` (no sync)."""
        self.stats.update(info)
        if self.sibling_balance_rate > 0:
            make_adaptive(self.layer).balance_siblings(info.counts, self.sibling_balance_rate)
        self._recent.append((x.detach().reshape(-1, x.shape[-1]), info.ids.detach()))
        del self._recent[: -self.recent_steps]

    def _weights(self) -> torch.Tensor:
        """Per-expert vectors the merge compares: flattened weights, or the window's mean
        outputs (``similarity="outputs"``; needs the layer's draft reports)."""
        bank = expert_bank(self.layer)
        if self.similarity == "outputs":
            return self.stats.mean_output.float()
        parts = [bank.weight_in.detach(), bank.w_out.detach()]
        return torch.cat([p.reshape(bank.num_experts, -1).float() for p in parts], 1)

    def _mergeable(self, a: int, b: int, parent: list) -> bool:
        return parent[a] == parent[b] or (
            parent.count(parent[a]) == 1 and parent.count(parent[b]) == 1
        )

    def _act(self, summary: dict) -> Optional[dict]:
        E = expert_bank(self.layer).num_experts
        load = summary["load"]
        mean = sum(load) / E
        if mean <= 0:
            return None
        e = max(range(E), key=lambda i: load[i])
        if load[e] > self.split_ratio * mean and E < self.max_experts:
            tokens = None
            if self._recent:
                tokens = torch.cat([x[(ids == e).any(1)] for x, ids in self._recent])
            new = split_expert(
                self.layer,
                e,
                tokens=tokens,
                noise=self.noise,
                optimizer=self.optimizers,
                generator=self.generator,
            )
            return {"action": "split", "expert": e, "new_expert": new, "load_ratio": load[e] / mean}
        if E <= self.min_experts:
            return None
        parent = make_adaptive(self.layer).parent.tolist()
        w = torch.nn.functional.normalize(self._weights(), dim=1)
        cos = w @ w.t()
        cos.fill_diagonal_(-2.0)
        low = min(range(E), key=lambda i: load[i])
        pair = None
        if load[low] < self.merge_ratio * mean:
            order = torch.argsort(cos[low], descending=True).tolist()
            partner = next((j for j in order if j != low and self._mergeable(low, j, parent)), None)
            if partner is not None:
                pair, reason = (partner, low), "under-used"
        if pair is None and self.duplicate_cosine is not None:
            flat = torch.argsort(cos.reshape(-1), descending=True).tolist()
            for idx in flat:
                a, b = divmod(idx, E)
                if float(cos[a, b]) <= self.duplicate_cosine:
                    break
                if a != b and self._mergeable(a, b, parent):
                    pair, reason = (a, b), "duplicate"
                    break
        if pair is None:
            return None
        a, b = pair
        kept = merge_experts(self.layer, a, b, loads=load, optimizer=self.optimizers)
        return {
            "action": "merge",
            "expert": kept,
            "merged": [a, b],
            "reason": reason,
            "cosine": float(cos[a, b]),
        }

    def step(self) -> list:
        """Call once per training step, after :meth:`observe`, outside any compiled region.
        Acts every ``window`` steps; returns this call's events."""
        self.steps += 1
        if self.steps % self.window != 0:
            return []
        events: list = []
        if self._pending is not None:
            snapshot, base = self._pending
            self._pending = None
            assert self.validate is not None
            loss = float(self.validate())
            if loss > base + self.tolerance * abs(base):
                snapshot.restore()
                events.append({"action": "rollback", "loss": loss, "before": base})
            else:
                events.append({"action": "commit", "loss": loss, "before": base})
            self._restart_window()
            self.history.extend(events)
            return events
        summary = self.stats.summary()
        drift = self.detector.check(summary["load"])
        if self.trigger == "drift" and not drift:
            return events
        snapshot, base = None, None
        if self.validate is not None:
            snapshot = Snapshot(self.layer, self.optimizers)
            base = float(self.validate())
        event = self._act(summary)
        if event is not None:
            event["cv_before"] = summary["cv"]
            event["step"] = self.steps
            if self.detector.last_divergence is not None:
                event["drift"] = self.detector.last_divergence
            events.append(event)
            if snapshot is not None and base is not None:
                self._pending = (snapshot, base)
            self._restart_window()
        self.history.extend(events)
        return events

    def _restart_window(self) -> None:
        self.stats.reset(expert_bank(self.layer).num_experts)
        self.detector.previous = None
        self._recent = []
