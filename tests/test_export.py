"""TorchScript (traced, via monai.bundle ckpt_export) and ONNX exports equal the eager network; net in/out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.export import _example, build_network, check_onnx, check_torchscript, export_onnx, fresh_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_weights(tmp_path_factory.mktemp("w") / "model.pt")


@pytest.mark.slow
def test_ckpt_export_cli_equals_eager(tmp_path, ckpt):
    """The documented command; the TorchScript file carries the metadata and equals eager on a test pair."""
    ts = tmp_path / "model.ts"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts),
        "--ckpt_file",
        ckpt,
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        "--use_trace",
        "True",
        "--input_shape",
        "[1,2,64,64]",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    net = build_network(ckpt_file=ckpt)
    err = check_torchscript(str(ts), net, [1, 2, 64, 64])
    assert err < 1e-5
    # the export is not a trivial identity: the DDF of the test pair is not zero
    assert float(net(_example([1, 2, 64, 64])).abs().max()) > 1e-3
    # the weights file loads with weights_only=True
    assert isinstance(torch.load(ckpt, weights_only=True), dict)


@pytest.mark.slow
@pytest.mark.parametrize("nd", [2, 3])
def test_onnx_equals_eager(tmp_path, nd):
    pytest.importorskip("onnxruntime")
    ckpt = fresh_weights(tmp_path / "m.pt", spatial_dims=nd)
    shape = [1, 2, 64, 64] if nd == 2 else [1, 2, 16, 16, 16]
    override = {} if nd == 2 else {"spatial_dims": 3}
    f = export_onnx(ckpt, str(tmp_path / "model.onnx"), shape, **override)  # opset 16 (2D) / 20 (3D)
    err = check_onnx(f, build_network(ckpt_file=ckpt, **override), shape)
    assert err < 1e-4


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    for cfg in ("train.yaml", "inference.yaml"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(ROOT / "configs" / "metadata.json"),
            config_file=str(ROOT / "configs" / cfg),
            device="cpu",
            bundle_root=str(ROOT),
        )
