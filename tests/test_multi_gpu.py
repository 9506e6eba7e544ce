"""configs/multi_gpu_train.yaml: 2 CPU processes (gloo) under torchrun train one epoch; rank 0 alone writes the
phantom, the logs and the checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"  # empty dataset_dir: rank 0 writes the phantom, rank 1 waits
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/multi_gpu_train.yaml']",
        "--dataset_dir",
        str(data),
        "--phantom#n_train",
        "4",
        "--phantom#n_val",
        "2",
        "--phantom#n_test",
        "1",
        "--phantom#size",
        "64",
        "--phantom#progress",
        "false",
        "--spatial_size",
        "[64,64]",
        "--max_epochs",
        "1",
        "--epoch_length",
        "2",
        "--output_dir",
        str(out),
        "--num_workers",
        "0",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert (data / "datalist.json").is_file()
    ckpt = torch.load(out / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert set(ckpt) >= {"network", "variance", "optimizer", "optimizer_variance", "trainer"}
    assert ckpt["trainer"]["epoch_length"] == 2 and ckpt["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in ckpt["network"])  # unwrapped: loads in inference as is
    assert (out / "checkpoints" / "checkpoint_epoch=1.pt").is_file()
    for f in ("model.pt", "variance.pt"):
        sd = torch.load(out / f, weights_only=True)
        assert not any(k.startswith("module.") for k in sd)
    # logs from one process only (TensorBoard event file names end with <pid>.<n>)
    pids = {p.name.split(".")[-2] for p in (out / "logs").glob("events.out.tfevents*")}
    assert len(pids) == 1, pids
