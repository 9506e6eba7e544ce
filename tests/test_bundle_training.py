"""The real `python -m monai.bundle run training` command, end to end on a tiny phantom, and resume."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"Epoch: (\d+)/(\d+), Iter: \d+/\d+ -- (.*)")


def run_training(out: Path, dataset: Path, *extra: str) -> str:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "configs/train.yaml",
        "--dataset_dir", str(dataset),
        "--output_dir", str(out),
        "--spatial_size", "[64,64]",
        "--phantom#size", "64", "--phantom#n_train", "4", "--phantom#n_val", "2", "--phantom#n_test", "2",
        "--epoch_length", "2", "--num_workers", "0",
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def losses(log: str) -> list[tuple[int, dict]]:
    rows = []
    for epoch, _, rest in LOSS_LINE.findall(log):
        vals = {k: float(v) for k, v in re.findall(r"(\w+): (-?[\d.]+(?:e-?\d+)?|nan|inf)", rest)}
        rows.append((int(epoch), vals))
    return rows


@pytest.mark.slow
def test_training_command_writes_both_networks_and_resumes(tmp_path):
    dataset, out = tmp_path / "phantom", tmp_path / "run"
    log = run_training(out, dataset, "--max_epochs", "1", "--log_every", "1")
    # the phantom was generated on first use
    assert (dataset / "datalist.json").is_file()
    # both networks (best validation Dice) and the full training state were saved
    assert (out / "model.pt").is_file() and (out / "variance.pt").is_file()
    ckpt = torch.load(out / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert {"network", "variance", "optimizer", "optimizer_variance", "trainer", "rng", "validation"} <= set(ckpt)
    assert {"torch", "numpy", "python", "data"} <= set(ckpt["rng"])  # exact resume (tests/test_resume.py)
    assert ckpt["validation"]["best_metric_epoch"] == 1 and "model.pt" in ckpt["validation"]["savers"]
    model = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("backbone.") for k in model)  # a plain state_dict, MONAI convention
    rows = losses(log)
    assert rows and all(e == 1 for e, _ in rows)
    for _, vals in rows:
        assert {"loss", "loss_sim", "loss_reg", "loss_var"} <= set(vals)
        assert all(torch.isfinite(torch.tensor(v)) for v in vals.values())
    assert "val_myo_dice" in log

    # a second run with --resume continues at epoch 2 with both networks and optimizers restored
    log2 = run_training(out, dataset, "--max_epochs", "2", "--resume", "true", "--log_every", "1")
    assert re.search(r"resumed from \S*checkpoint_epoch=1\.pt \(epoch 1, iteration 2\)", log2), log2[-3000:]
    epochs = {e for e, _ in losses(log2)}
    assert epochs == {2}, epochs
    assert (out / "checkpoints" / "checkpoint_epoch=2.pt").is_file()
    ckpt2 = torch.load(out / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert ckpt2["trainer"]["iteration"] == 4  # 2 epochs x 2 iterations: epoch 1 was not repeated
    assert ckpt2["optimizer_variance"]["state"], "the variance optimizer state was not restored/saved"


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
        "--dataset_dir", str(tmp_path / "nothing"), "--phantom", "null", "--output_dir", str(tmp_path / "r"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no datalist found" in proc.stdout + proc.stderr
