"""``python -m bundle experiment``: a toy matrix end to end (real training + evaluation subprocesses), the report,
resuming, and the command lines of the full matrix (dry run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.experiment import ROOT, Run, config_files, resolve_losses

EVAL_READY = (ROOT / "configs" / "evaluate.yaml").is_file() and (ROOT / "scripts" / "handlers.py").is_file()


def _cli(*args, timeout=170):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bundle", "experiment", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_losses_and_config_lists():
    assert resolve_losses("all") == ["mse", "ncc", "mi", "nll", "beta_nll", "adareg", "adaframe", "ours"]
    assert resolve_losses(["supp"]) == ["ours_dispunc", "vxm_diff"]
    with pytest.raises(FileNotFoundError):
        resolve_losses("nope")
    files = config_files("phantom_echo", "transmorph", "adareg", evaluate=True)
    names = [Path(f).name for f in files]
    assert names == ["train.yaml", "phantom_echo.yaml", "adareg.yaml", "transmorph.yaml", "evaluate.yaml"]
    assert [Path(f).name for f in config_files("phantom_echo", "voxelmorph", "vxm_diff")][-1] == "vxm_diff.yaml"


def test_dry_run_lists_the_whole_matrix(tmp_path):
    res = _cli("--data", "phantom_echo", "--arch", "voxelmorph", "transmorph", "--loss", "all", "ours_dispunc",
               "--seeds", "2", "--gamma_sweep", "0", "0.5", "--max_epochs", "3", "--out", str(tmp_path),
               "--dry_run", "true", "--num_workers", "0", timeout=60)
    assert res.returncode == 0, res.stderr
    trains = [line for line in res.stdout.splitlines() if "] train:" in line]
    # (8 losses + 2 gammas) x 2 archs x 2 seeds + ours_dispunc x voxelmorph only x 2 seeds
    assert len(trains) == (8 + 2) * 2 * 2 + 2
    assert any("transmorph/ours_gamma0.5/seed1" in t and "--gamma 0.5" in t for t in trains)
    assert all("--max_epochs 3" in t and "--num_workers 0" in t for t in trains)
    assert not any("transmorph/ours_dispunc" in t for t in trains)


@pytest.mark.skipif(not EVAL_READY, reason="the evaluation workflow (configs/evaluate.yaml) is not in the bundle yet")
def test_toy_matrix_end_to_end_and_resume(tmp_path):
    out = tmp_path / "runs"
    args = ["--data", "phantom_echo", "--arch", "voxelmorph", "--loss", "mse", "ours", "--seeds", "1",
            "--max_epochs", "1", "--epoch_length", "2", "--n_train", "4", "--n_val", "2", "--n_test", "2",
            "--size", "32", "--out", str(out), "--num_workers", "0", "--n_panels", "0"]
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
