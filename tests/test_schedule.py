"""The step learning-rate schedule (scripts/schedule.py): values per epoch, both optimizers, resume, bad options."""

import pytest
import torch
from ignite.engine import Engine, Events

from scripts.schedule import EpochLRSchedule, scheduled_lr


def _run(max_epochs, milestones, start_epoch=0):
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt_a, opt_b = torch.optim.Adam([p], lr=1e-3), torch.optim.SGD([q], lr=0.5)
    seen = []
    engine = Engine(lambda e, b: None)
    EpochLRSchedule({"displacement": opt_a, "variance": opt_b, "none": None}, milestones, 0.1).attach(engine)
    engine.add_event_handler(
        Events.EPOCH_STARTED, lambda e: seen.append((opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"]))
    )
    if start_epoch:  # as ResumeFromLatest does: the state's epoch is restored before the run starts
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", start_epoch))
    engine.run([0, 1], max_epochs=max_epochs)
    return seen


def test_step_schedule_per_epoch_for_both_optimizers():
    seen = _run(8, [6])
    assert [round(a, 12) for a, _ in seen] == [1e-3] * 6 + [1e-4] * 2
    assert [round(b, 12) for _, b in seen] == [0.5] * 6 + [0.05] * 2
    assert scheduled_lr(1.0, 9, [3, 6], 0.5) == 0.25 and scheduled_lr(1.0, 3, [3, 6], 0.5) == 1.0


def test_no_milestones_leaves_the_rate_and_resume_continues_the_schedule():
    assert {a for a, _ in _run(3, [])} == {1e-3}
    resumed = _run(8, [6], start_epoch=6)  # epochs 7 and 8 only
    assert [round(a, 12) for a, _ in resumed] == [1e-4, 1e-4]


@pytest.mark.parametrize("milestones, decay", [([0], 0.1), ([5, 3], 0.1), ([2], 0.0), ([2], 1.5)])
def test_bad_schedule_is_refused(milestones, decay):
    with pytest.raises(ValueError, match="lr_milestones|lr_decay"):
        EpochLRSchedule({"a": None}, milestones, decay)


def test_training_schedule_follows_the_machine_and_names_overrides(caplog):
    import logging

    from scripts.schedule import announce, training_schedule

    assert training_schedule("auto", cuda=False) == {
        "name": "cpu",
        "max_epochs": 8,
        "epoch_length": 500,
        "learning_rate": 1e-3,
        "lr_milestones": [6],
    }
    assert training_schedule("auto", cuda=True)["max_epochs"] == 300 and training_schedule("PAPER")["name"] == "paper"
    with pytest.raises(ValueError, match="schedule must be one of \\['auto', 'paper', 'cpu'\\], got 'fast'"):
        training_schedule("fast")
    with caplog.at_level(logging.INFO, logger="scripts.schedule"):
        announce(training_schedule("cpu"), 8, 500, 1e-3, [6])
        announce(training_schedule("cpu"), 2, 500, 1e-3, [6])
    first, second = [r.getMessage() for r in caplog.records if r.name == "scripts.schedule"]
    assert (
        "'cpu' (no GPU: the converged CPU schedule): 8 epochs x 500 iterations" in first and "--schedule paper" in first
    )
    assert "with max_epochs set by a variant or the command line): 2 epochs" in second


def test_run_time_estimate_logs_the_whole_run(caplog):
    import logging

    from ignite.engine import Engine

    from scripts.tracking import RunTimeEstimate

    engine = Engine(lambda e, b: None)
    RunTimeEstimate(first=3).attach(engine)
    with caplog.at_level(logging.INFO, logger="scripts.tracking"):
        engine.run(range(5), max_epochs=2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "scripts.tracking"]  # (Ignite logs too)
    assert sum("estimated time for the whole run" in m for m in msgs) == 1
    assert "(10 iterations at" in msgs[0] and "measured on the first 3" in msgs[0]
    assert msgs[-1].startswith("epoch 2/2 done; estimated time left: 0 min 00 s")
