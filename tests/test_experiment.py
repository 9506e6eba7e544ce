"""``python -m bundle experiment``: a toy matrix end to end (real training + evaluation subprocesses), the report,
resuming, and the command lines of the full matrix (dry run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bundle.experiment import ROOT, Run, _ours_vs_best, build_runs, config_files, has_oracle, resolve_losses

LOSS_DIR = ROOT / "configs" / "variants" / "loss"


def _cli(*args, timeout=170):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "bundle", "experiment", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_losses_and_config_lists():
    assert resolve_losses("all") == ["mse", "ncc", "mi", "nll", "beta_nll", "adareg", "adaframe", "ours"]
    assert resolve_losses(["supp"]) == ["ours_dispunc", "vxm_diff"]
    with pytest.raises(FileNotFoundError):
        resolve_losses("nope")
    files = config_files("phantom_echo", "transmorph", "adareg", evaluate=True)
    names = [Path(f).name for f in files]
    assert names == ["train.yaml", "phantom_echo.yaml", "adareg.yaml", "transmorph.yaml", "evaluate.yaml"]
    assert [Path(f).name for f in config_files("phantom_echo", "voxelmorph", "vxm_diff")][-1] == "vxm_diff.yaml"


@pytest.mark.slow
def test_dry_run_lists_the_whole_matrix(tmp_path):
    res = _cli(
        "--data",
        "phantom_echo",
        "--arch",
        "voxelmorph",
        "transmorph",
        "--loss",
        "all",
        "ours_dispunc",
        "--seeds",
        "2",
        "--gamma_sweep",
        "0",
        "0.5",
        "--max_epochs",
        "3",
        "--out",
        str(tmp_path),
        "--dry_run",
        "true",
        "--num_workers",
        "0",
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    trains = [line for line in res.stdout.splitlines() if "] train:" in line]
    # (8 losses + 2 gammas) x 2 archs x 2 seeds + ours_dispunc x voxelmorph only x 2 seeds
    assert len(trains) == (8 + 2) * 2 * 2 + 2
    assert any("transmorph/ours_gamma0.5/seed1" in t and "--gamma 0.5" in t for t in trains)
    assert all("--max_epochs 3" in t and "--num_workers 0" in t for t in trains)
    assert not any("transmorph/ours_dispunc" in t for t in trains)


@pytest.mark.slow
def test_toy_matrix_end_to_end_and_resume(tmp_path):
    out = tmp_path / "runs"
    args = [
        "--data",
        "phantom_echo",
        "--arch",
        "voxelmorph",
        "--loss",
        "mse",
        "ours",
        "--seeds",
        "1",
        "--max_epochs",
        "1",
        "--epoch_length",
        "2",
        "--n_train",
        "4",
        "--n_val",
        "2",
        "--n_test",
        "2",
        "--size",
        "32",
        "--out",
        str(out),
        "--num_workers",
        "0",
        "--n_panels",
        "0",
    ]
    res = _cli(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Table 1: voxelmorph" in report and "## Table 2" in report
    assert "| mse |" in report and "| ours |" in report and "DSC (%)" in report and "**" in report
    for loss in ("mse", "ours"):
        run = out / "phantom_echo" / "voxelmorph" / loss / "seed0"
        assert (run / "eval" / "summary.json").is_file() and (run / "checkpoints" / "checkpoint_final.pt").is_file()
    assert (out / "phantom_echo" / "voxelmorph" / "ours" / "seed0" / "variance.pt").is_file()
    assert not (out / "phantom_echo" / "voxelmorph" / "mse" / "seed0" / "variance.pt").exists()
    status = json.loads((out / "experiment.json").read_text())
    assert not status["failed"] and all(r["state"] == "done" for r in status["runs"])
    # resume: everything evaluated -> nothing is rerun
    log = out / "phantom_echo" / "voxelmorph" / "mse" / "seed0" / "experiment.log"
    before = log.read_text()
    assert _cli(*args, timeout=60).returncode == 0
    assert log.read_text() == before


def test_run_states(tmp_path):
    r = Run("phantom_echo", "voxelmorph", "ours", 0, tmp_path)
    assert r.state() == "new"
    (r.dir / "checkpoints").mkdir(parents=True)
    (r.dir / "checkpoints" / "checkpoint_epoch=3.pt").touch()
    assert r.state() == "partial"
    assert "--resume" in r.commands({}, resume=True)["train"]
    (r.dir / "checkpoints" / "checkpoint_final.pt").touch()
    (r.dir / "model.pt").touch()
    assert r.state() == "trained"
    (r.dir / "eval").mkdir()
    (r.dir / "eval" / "summary.json").write_text("{}")
    (r.dir / "eval" / "metrics.csv").write_text("id\n")
    assert r.state() == "done"


def test_oracle_rows_follow_their_weight_form(tmp_path):
    losses = resolve_losses(["mse", "ours", "ours_literal", "nll", "ours_dispunc", "oracle"])
    runs, skipped, rows = build_runs("phantom_echo", ["voxelmorph", "transmorph"], losses, 2, tmp_path, oracle=True)
    # collaborative variants that learn σ̂ get an oracle row right after them; `--loss oracle` is not run twice
    assert rows == ["mse", "ours", "oracle", "ours_literal", "oracle_literal", "nll", "ours_dispunc"]
    assert not has_oracle("mse") and not has_oracle("nll") and not has_oracle("oracle")
    assert len(runs) == 2 * 2 * 6 + 2 and len({r.dir for r in runs}) == len(runs)
    assert skipped == ["transmorph x ours_dispunc: the displacement-uncertainty head is built on VoxelMorph"]
    lit = next(r for r in runs if r.name == "oracle_literal" and r.arch == "transmorph" and r.seed == 1)
    assert lit.dir == tmp_path / "phantom_echo" / "transmorph" / "oracle_literal" / "seed1"
    for what, cmd in lit.commands({}).items():
        files = [Path(f).name for f in eval(cmd[cmd.index("--config_file") + 1])]
        expected = ["train.yaml", "phantom_echo.yaml", "ours_literal.yaml", "oracle.yaml", "transmorph.yaml"]
        assert files == expected + (["evaluate.yaml"] if what == "evaluate" else [])
    plain, _, rows = build_runs("phantom_echo", ["voxelmorph"], ["ours"], 1, tmp_path)
    assert rows == ["ours"] and [r.name for r in plain] == ["ours"]


def _load(name):
    with open(LOSS_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def test_every_weight_form_has_a_stand_alone_oracle_equal_to_the_overlay():
    overlay = _load("oracle")
    assert overlay == {"mode": "collaborative", "variance_source": "oracle", "variance_def": None}
    # oracle.yaml alone is the authors' form: ours.yaml only restates train.yaml's defaults
    with open(ROOT / "configs" / "train.yaml") as f:
        train = yaml.safe_load(f)
    assert all(train[k] == v for k, v in _load("ours").items())
    forms = sorted(p.stem.removeprefix("oracle_") for p in LOSS_DIR.glob("oracle_*.yaml"))
    assert forms and "literal" in forms
    for form in forms:
        assert _load(f"oracle_{form}") == dict(_load(f"ours_{form}"), **overlay), form
    # and every weight form of ours_<form>.yaml that is collaborative has its stand-alone oracle
    for p in LOSS_DIR.glob("ours_*.yaml"):
        if has_oracle(p.stem):
            assert p.stem.removeprefix("ours_") in forms, f"configs/variants/loss/oracle_{p.stem[5:]}.yaml is missing"


def test_table2_never_takes_the_oracle_as_the_competitor(tmp_path):
    def csv(name, values):
        path = tmp_path / f"{name}.csv"
        path.write_text("id,dice\n" + "".join(f"c{i},{v}\n" for i, v in enumerate(values)))
        return name, path

    named = [csv("mse", [0.70, 0.72, 0.71]), csv("ours", [0.74, 0.73, 0.75]), csv("oracle", [0.9, 0.91, 0.92])]
    table = _ours_vs_best(named, "dice")
    assert "| ours vs mse |" in table and "oracle" not in table
