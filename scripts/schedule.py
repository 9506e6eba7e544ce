"""Learning-rate schedule of both optimizers, as an Ignite handler.

:class:`EpochLRSchedule` sets, at the start of every epoch ``e`` (1-based), the learning rate of every parameter group
of each optimizer to

    lr(e) = lr_0 · decay ^ |{m ∈ milestones : m < e}|

(a step schedule: ``milestones: [6]`` and ``decay: 0.1`` run epochs 1–6 at lr_0 and the rest at lr_0 / 10), where
``lr_0`` is the group's learning rate when the handler is attached. The rate is a function of the epoch alone, so a
resumed run (``--resume true``) continues on the same schedule without saving a scheduler state. ``milestones: []``
(configs/train.yaml's default: the paper's constant 1e-4) leaves the rates untouched. The CPU schedule that uses it is
configs/variants/schedule/cpu.yaml (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ignite.engine import Engine, Events

__all__ = ["EpochLRSchedule", "SCHEDULES", "announce", "scheduled_lr", "training_schedule"]


def scheduled_lr(base: float, epoch: int, milestones: Sequence[int], decay: float) -> float:
    """``base · decay^(number of milestones < epoch)`` for the 1-based ``epoch``."""
    return float(base) * float(decay) ** sum(1 for m in milestones if int(m) < int(epoch))


class EpochLRSchedule:
    """Step-decay both optimizers' learning rates at epoch boundaries (see the module docstring).

    Args:
        optimizers: ``{name: optimizer}``; ``None`` entries (a run without a variance network) are skipped.
        milestones: epochs after which the rates are multiplied by ``decay`` (1-based, increasing).
        decay: the factor, in (0, 1].
    """

    def __init__(self, optimizers: Mapping[str, object], milestones: Sequence[int] = (), decay: float = 0.1) -> None:
        self.optimizers = {k: v for k, v in optimizers.items() if v is not None}
        self.milestones = [int(m) for m in milestones]
        if any(m < 1 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ValueError(f"lr_milestones must be increasing epochs >= 1, got {list(milestones)}.")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {decay}.")
        self.decay = float(decay)
        self.base: dict[str, list[float]] = {}

    def attach(self, engine: Engine) -> None:
        self.base = {k: [float(g["lr"]) for g in opt.param_groups] for k, opt in self.optimizers.items()}
        if self.milestones:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for name, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base[name]):
                group["lr"] = scheduled_lr(base, engine.state.epoch, self.milestones, self.decay)


# the two schedules of configs/train.yaml's `schedule` (docs/training.md): the paper's, and the converged CPU schedule
# of configs/variants/schedule/cpu.yaml (docs/results/learning_curves.md: the plateau of validation Dice and EPE in
# 4,000 iterations on a 2-core CPU)
SCHEDULES = {
    "paper": {"max_epochs": 300, "epoch_length": 100, "learning_rate": 1e-4, "lr_milestones": []},
    "cpu": {"max_epochs": 8, "epoch_length": 500, "learning_rate": 1e-3, "lr_milestones": [6]},
}


def training_schedule(schedule: str = "auto", cuda: bool | None = None) -> dict:
    """The settings of ``schedule``: ``paper`` (300 × 100 iterations, Adam 1e-4), ``cpu`` (8 × 500 iterations, Adam
    1e-3 then 1e-4 after epoch 6) or ``auto`` (``paper`` when CUDA is available, else ``cpu``), with its ``name``.
    Each setting stays one override away (``--max_epochs`` ... win over the schedule)."""
    import torch

    name = str(schedule).strip().lower()
    if name == "auto":
        name = "paper" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {['auto', *SCHEDULES]}, got {schedule!r}.")
    return {"name": name, **SCHEDULES[name]}


def announce(settings: Mapping, max_epochs: int, epoch_length: int, learning_rate: float, milestones) -> None:
    """Log, in the first lines of a training, which schedule runs and how to get the other one."""
    import logging

    name = settings["name"]
    now = {"max_epochs": max_epochs, "epoch_length": epoch_length, "learning_rate": learning_rate}
    now["lr_milestones"] = list(milestones or [])
    changed = sorted(k for k, v in now.items() if v != SCHEDULES[name][k])
    why = {"cpu": "no GPU: the converged CPU schedule", "paper": "the paper's schedule"}[name]
    if changed:
        why += f", with {', '.join(changed)} set by a variant or the command line"
    other = "--schedule paper (300 x 100 iterations, Adam 1e-4)" if name == "cpu" else "--schedule cpu"
    logging.getLogger("scripts.schedule").info(
        "training schedule '%s' (%s): %d epochs x %s iterations, Adam %g%s; the other one: %s",
        name,
        why,
        max_epochs,
        epoch_length,
        learning_rate,
        f", x0.1 after epoch(s) {list(milestones)}" if milestones else "",
        other,
    )
