"""``python -m bundle curves``: learning curves from TensorBoard event files (tiny synthetic runs written here)."""

import json
import math

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from bundle.curves import _regroup_labels, curves, epoch_length, load_run, plateau, read_scalars

DICE = [0.50, 0.70, 0.80, 0.805, 0.81]  # within 1 % of 0.81 from validation 4 on
EPE = [3.0, 2.0, 1.52, 1.55, 1.50]  # within 5 % of 1.50 from validation 3 on
LR = [1e-3, 1e-3, 1e-3, 1e-4, 1e-4]


def _write_run(folder, epoch_length, dice=DICE, epe=EPE, every=2, t0=1000.0):
    """A run as training writes it: losses every ``every`` iterations (step = iteration), validation metrics and
    learning rates per epoch (step = epoch), in separate event files, with increasing wall times."""
    logs = folder / "logs"
    val, train, lr = (SummaryWriter(str(logs), filename_suffix=f".{i}") for i in range(3))
    t = t0
    for epoch in range(1, len(dice) + 1):
        lr.add_scalar("displacement/lr/group_0", LR[epoch - 1], epoch, walltime=t)
        for it in range((epoch - 1) * epoch_length + 1, epoch * epoch_length + 1):
            t += 1
            if it % every == 0:
                train.add_scalar("loss", 1.0 / epoch + 0.001 * it, it, walltime=t)
        t += 1
        val.add_scalar("val_myo_dice", dice[epoch - 1], epoch, walltime=t)
        val.add_scalar("val_epe_heart", epe[epoch - 1], epoch, walltime=t)
        val.add_scalar("val_var_ratio", math.nan, epoch, walltime=t)  # an MSE run: no variance network
    for w in (val, train, lr):
        w.close()
    return folder


def test_tables_and_plateaus_of_two_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "mse" / "seed0", 10)
    b = _write_run(tmp_path / "ours" / "seed0", 20, dice=[0.6, 0.7, 0.78])  # 3 epochs of 20 iterations
    (b / "checkpoints").mkdir()
    torch.save({"trainer": {"epoch_length": 20, "iteration": 60, "max_epochs": 3}}, b / "checkpoints" / "c.pt")
    (b / "checkpoints" / "c.pt").rename(b / "checkpoints" / "checkpoint_final.pt")
    md, png = tmp_path / "out" / "curves.md", tmp_path / "out" / "curves.png"
    curves(str(a), str(b), labels=("A", "B"), md=str(md), plot=str(png))
    text = md.read_text()
    assert text in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch length 10 (events" in text and "epoch length 20 (checkpoints/checkpoint_final.pt)" in text
    dice = text.split("## val_myo_dice")[1].split("## ")[0]
    # rows: the union of the validation iterations, columns: the runs
    assert "| iteration | A | B |" in dice
    assert "| 10 | 0.5000 | – |" in dice and "| 20 | 0.7000 | 0.6000 |" in dice
    assert "| 40 | 0.8050 | 0.7000 |" in dice and "| 60 | – | 0.7800 |" in dice
    assert "- A: iteration 40 (validation 4 of 5; final 0.8100)" in dice
    assert "- B: no plateau yet (the validation before the last differs by more than 1 %; final 0.7800)" in dice
    epe = text.split("## val_epe_heart")[1].split("## ")[0]
    assert "within 5 % of its final value" in epe and "- A: iteration 30 (validation 3 of 5; final 1.5000)" in epe
    assert "val_var_ratio" not in text  # no finite value in any run
    # training loss: mean over the epoch's logged iterations, at the validation iterations
    loss = text.split("## loss (training")[1].split("## ")[0]
    mean_epoch2 = sum(0.5 + 0.001 * it for it in (12, 14, 16, 18, 20)) / 5
    assert f"| 20 | {mean_epoch2:.4f} |" in loss
    lr = text.split("## displacement/lr/group_0")[1]
    assert "| 0 | 1.000e-03 | 1.000e-03 |" in lr and "| 30 | 1.000e-04 | – |" in lr  # lr of epoch 4 from it. 30


def test_epoch_length_checkpoint_then_config_then_events(tmp_path):
    run = _write_run(tmp_path / "r", 7)  # not a multiple of the logging interval 2: last step of epoch 5 is 34
    scalars = read_scalars(run / "logs")
    assert epoch_length(run, scalars) == (7, "events (last training step before the validation of epoch 5)")
    assert epoch_length(run) == (None, "unknown: x axis in epochs")
    (run / "config.json").write_text(json.dumps({"epoch_length": 9}))
    assert epoch_length(run, scalars) == (9, "config.json")
    (run / "checkpoints").mkdir()
    torch.save({"trainer": {"epoch_length": 8}}, run / "checkpoints" / "checkpoint_epoch=3.pt")
    assert epoch_length(run, scalars) == (8, "checkpoints/checkpoint_epoch=3.pt")
    r = load_run(run, "x")
    assert r["series"]["val_myo_dice"][0] == (8, pytest.approx(0.5)) and r["series"]["loss"][0][0] == 2
    assert r["series"]["displacement/lr/group_0"][1] == (8, pytest.approx(1e-3))  # epoch 2 starts at iteration 8


def test_a_resumed_step_keeps_its_later_value(tmp_path):
    run = _write_run(tmp_path / "r", 4)
    w = SummaryWriter(str(run / "logs"), filename_suffix=".resumed")
    w.add_scalar("val_myo_dice", 0.9, 5, walltime=5000.0)
    w.close()
    assert [v for s, _, v in read_scalars(run / "logs")["val_myo_dice"]] == pytest.approx(DICE[:4] + [0.9])


def test_plateau():
    pts = list(zip([10, 20, 30, 40], [0.5, 0.9, 0.95, 0.951]))
    assert plateau(pts, 0.01) == {"x": 30, "index": 2, "n": 4, "final": 0.951}
    assert plateau(pts, 0.5) == {"x": 10, "index": 0, "n": 4, "final": 0.951}
    assert plateau(pts, 1e-4)["index"] == 3  # only the last point: no plateau yet
    assert plateau([(1, math.nan), (2, 1.0), (3, math.nan)], 0.1) == {"x": 2, "index": 0, "n": 1, "final": 1.0}
    assert plateau([(1, math.nan)], 0.1) is None


def test_labels_and_bad_input(tmp_path):
    # python-fire binds `--labels a b` as labels='a' and appends 'b' to the runs
    argv = ["python -m bundle", "r1", "r2", "--labels", "a", "b", "--md", "x.md"]
    assert _regroup_labels(("r1", "r2", "b"), "a", argv) == (["r1", "r2"], ["a", "b"])
    assert _regroup_labels(("r1",), ("a",), []) == (["r1"], ["a"])
    run = _write_run(tmp_path / "r", 4)
    with pytest.raises(ValueError, match="1 label"):
        curves(str(run), str(run), labels=("only",))
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        curves(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        curves(str(tmp_path / "empty"))
    with pytest.raises(KeyError, match="val_nope"):
        curves(str(run), metrics="val_nope")
