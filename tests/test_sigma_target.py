"""bundle/sigma_target.py: σ̂'s targets at the true and at the estimated displacement (phantom regeneration)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.sigma_target import measure, pair_row, pair_targets
from scripts.data.phantom import make_pair, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_targets_at_the_true_displacement_are_residual_std():
    pair = make_pair(3, "mri2d", 32)
    t = pair_targets(pair, pair["ddf"])
    np.testing.assert_allclose(t["estimated"], t["true"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t["mean"], pair["residual_mean"], rtol=1e-5, atol=1e-7)


def test_a_displacement_error_adds_its_mean_squared_residual():
    """At ẑ = z + 2 px the RMS grows by the misregistration, which enters as the mean E[r | ẑ]."""
    pair = make_pair(3, "mri2d", 32)
    shifted = pair["ddf"] + np.array([2.0, 0.0], np.float32)
    t = pair_targets(pair, shifted)
    assert float((t["estimated"] ** 2).mean()) > 1.5 * float((t["true"] ** 2).mean())
    one = np.ones_like(t["true"])
    grown = float((t["mean"] ** 2).mean() - (pair["residual_mean"].astype(np.float64) ** 2).mean())
    assert grown > 0.5 * float((t["estimated"] ** 2).mean() - (t["true"] ** 2).mean())  # the growth is in the mean
    row = pair_row(one, t)
    assert row["mean_share"] > row["mean_share_true_z"]


def test_pair_row_by_hand():
    true = np.array([[1.0, 2.0], [3.0, 4.0]])
    est = np.array([[2.0, 1.0], [4.0, 3.0]])
    mean = np.array([[1.0, 0.0], [0.0, 1.0]])
    true_mean = np.array([[0.0, 1.0], [1.0, 1.0]])
    row = pair_row(est**2, {"true": true, "true_mean": true_mean, "estimated": est, "mean": mean})
    assert row["spearman_estimated"] == pytest.approx(1.0)
    assert row["ratio_estimated"] == pytest.approx(1.0)
    # ranks (1 2 3 4) vs (2 1 4 3): 1 - 6 * 4 / (4 * 15) = 0.6
    assert row["spearman_true"] == pytest.approx(0.6)
    assert row["bound"] == pytest.approx(0.6)
    assert row["ratio_true"] == pytest.approx(1.0)  # same values, permuted
    assert row["mean_share"] == pytest.approx(2.0 / 30.0)
    assert row["mean_share_true_z"] == pytest.approx(3.0 / 30.0)
    inner = pair_row(est**2, {"true": true, "true_mean": true_mean, "estimated": est, "mean": mean}, mask=true > 1.5)
    assert inner["mean_share"] == pytest.approx(1.0 / 26.0)  # the pixel of true = 1 left out: est² 1 + 16 + 9


def _weights(tmp: Path) -> Path:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    torch.manual_seed(0)
    wdir = tmp / "w"
    wdir.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), wdir / "model.pt")
    torch.save(parser.get_parsed_content("variance_def").state_dict(), wdir / "variance.pt")
    return wdir


def test_measure_on_a_small_phantom_and_a_tampered_file(tmp_path):
    ds = tmp_path / "ph"
    write_dataset(ds, kind="mri2d", n_train=1, n_val=1, n_test=2, size=32, progress=False)
    wdir = _weights(tmp_path)
    md = tmp_path / "t.md"
    rep = measure(
        weights=str(wdir),
        datalist=str(ds),
        n=2,
        progress=False,
        md=str(md),
        plot=str(tmp_path / "maps.png"),
        plot_pairs=2,
        configs=[str(ROOT / "configs/train.yaml")],
    )
    assert [(r["id"], r["region"]) for r in rep["rows"]] == [
        ("mri2d_test_0000", "all"),
        ("mri2d_test_0000", "fov"),
        ("mri2d_test_0001", "all"),
        ("mri2d_test_0001", "fov"),
    ]
    for r in rep["rows"]:
        assert all(math.isfinite(r[k]) for k in ("spearman_true", "spearman_estimated", "ratio_estimated"))
    # mri2d has no sector: the field of view is every pixel, so both regions give the same figures
    by_region = {(r["id"], r["region"]): r for r in rep["rows"]}
    for case in ("mri2d_test_0000", "mri2d_test_0001"):
        assert by_region[(case, "all")] == dict(by_region[(case, "fov")], region="all")
    assert "spearman_estimated" in md.read_text()
    assert (tmp_path / "maps.png").stat().st_size > 10_000
    item = json.loads((ds / "datalist.json").read_text())["test"][1]
    f = ds / item["fixed"]
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 0.01, img.affine), f)
    with pytest.raises(ValueError, match="mri2d_test_0001.*regenerated phantom pair differs"):
        measure(weights=str(wdir), datalist=str(ds), n=2, progress=False, configs=[str(ROOT / "configs/train.yaml")])


def test_measure_at_the_instance_optimised_displacement(tmp_path):
    """--instance_steps moves ẑ (so the targets at ẑ change) and says so in the table's header."""
    ds = tmp_path / "ph"
    write_dataset(ds, kind="mri2d", n_train=1, n_val=1, n_test=1, size=32, progress=False)
    wdir = _weights(tmp_path)
    kw = dict(weights=str(wdir), datalist=str(ds), n=1, progress=False, configs=[str(ROOT / "configs/train.yaml")])
    plain = measure(**kw)
    md = tmp_path / "io.md"
    moved = measure(**kw, instance_steps=5, instance_lr=0.01, md=str(md))
    a, b = plain["rows"][0], moved["rows"][0]
    assert a["spearman_fed_true_z"] == b["spearman_fed_true_z"]  # h_φ fed the true z does not depend on ẑ
    assert a["bound"] != b["bound"] and a["spearman_estimated"] != b["spearman_estimated"]
    assert "after 5 steps of instance optimisation" in md.read_text()
