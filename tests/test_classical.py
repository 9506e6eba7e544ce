"""Classical baselines (scripts/classical/): axis-order / unit conversion and recovery of known deformations.

The bundle's ITK methods are always tested; SimpleITK demons, ANTsPy SyN and itk-elastix B-spline where their
optional package is installed (``pip install -e ".[classical]"``), else skipped with that command. Small (<= 64x64)
images keep the file well under a minute; ITK's first template lookup alone takes ~10 s, so every test that runs an
ITK registration is in the slow tier (docs/testing.md) and the fast tier keeps the conversions and the argument checks.
"""

from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as scipy_ndimage

from scripts.classical import (
    DEFAULTS,
    METHODS,
    OPTIONAL_METHODS,
    available,
    ddf_to_itk_field,
    itk_field_to_ddf,
    register_datalist,
    register_pair,
    register_pair_timed,
    warp,
)
from scripts.classical.external import PACKAGES


def needs(method: str, *values):
    """``(method, *values)`` as a parameter set, skipped (naming the install command) when its package is missing."""
    marks = []
    if method in OPTIONAL_METHODS and not available(method):
        marks = [pytest.mark.skip(reason=f"{PACKAGES[method][1]} not installed: {PACKAGES[method][2]}")]
    return pytest.param(method, *values, marks=marks, id="-".join([method, *map(str, values)]))


ALL = [needs(m) for m in METHODS]

N = 64
M = 8  # margin excluded from checks (np.roll wraps content around the border)
INNER = (slice(M, -M), slice(M, -M))


def textured(n: int = N, seed: int = 0, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Smooth random texture plus a central blob, in [0, 1] (``shape`` default (n, n))."""
    shape = shape or (n, n)
    rng = np.random.default_rng(seed)
    tex = scipy_ndimage.gaussian_filter(rng.standard_normal(shape), n / 32)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    blob = np.exp(-((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) / (2 * (n / 6) ** 2))
    return (0.5 * tex + 0.5 * blob).astype(np.float32)


def sinusoid(n: int = N) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([3 * np.sin(2 * np.pi * xx / n) * np.cos(np.pi * yy / n), 2.5 * np.sin(2 * np.pi * yy / n)]).astype(
        np.float32
    )


def test_conversion_roundtrip_and_order():
    spacing = (1.5, 0.8, 2.0)
    ddf = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    field = ddf_to_itk_field(ddf, spacing)
    assert field.shape == (4, 5, 6, 3)
    # ITK component 0 is x = last array axis, in mm
    np.testing.assert_allclose(field[..., 0], ddf[2] * spacing[2], rtol=1e-6)
    np.testing.assert_allclose(field[..., 2], ddf[0] * spacing[0], rtol=1e-6)
    np.testing.assert_allclose(itk_field_to_ddf(field, spacing), ddf, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_known_shift_anisotropic(method):
    """moving = fixed shifted by (+3, -2) along axes (0, 1) of a non-square image with anisotropic spacing
    => z = (+3, -2) within 0.1 px (sign, axis order and mm -> voxel units of each tool), Warp(moving, z) = fixed."""
    shape = (N - 8, N)  # non-square: a transposed field would not even have the right shape
    fixed = textured(shape=shape)
    moving = np.roll(fixed, (3, -2), axis=(0, 1))  # moving(i, j) = fixed(i - 3, j + 2)
    ddf, timing = register_pair_timed(moving, fixed, method=method, spacing=(1.5, 0.8), num_threads=1)
    assert ddf.shape == (2,) + shape and ddf.dtype == np.float32
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0
    inner = ddf[(slice(None),) + INNER]
    np.testing.assert_allclose(np.median(inner, axis=(1, 2)), [3.0, -2.0], atol=0.1)
    err = np.abs(inner - np.array([3.0, -2.0])[:, None, None])
    assert np.percentile(err, 90) < 0.3
    warped = warp(moving, ddf)
    resid = np.abs(warped - fixed)[INNER]
    assert resid.mean() < 0.01 and np.abs(moving - fixed)[INNER].mean() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, max_ratio",
    [
        needs("bspline", 0.3),
        needs("demons", 0.15),
        needs("sitk_demons", 0.15),
        needs("ants_syn", 0.3),
        needs("elastix_bspline", 0.3),
        needs("convexadam", 0.3),
    ],
)
def test_sinusoidal_deformation(method, max_ratio):
    """fixed = Warp(moving, z_true) with a smooth sinusoidal z_true: the recovered DDF has a much smaller EPE."""
    z = sinusoid()
    moving = textured(seed=1)
    fixed = warp(moving, z)
    ddf, _ = register_pair(moving, fixed, method=method)
    epe = np.linalg.norm(ddf - z, axis=0)[INNER].mean()
    epe_identity = np.linalg.norm(z, axis=0)[INNER].mean()
    assert epe < max_ratio * epe_identity, (epe, epe_identity)


def test_bad_inputs():
    with pytest.raises(ValueError):
        register_pair(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError):
        register_pair(np.zeros((8, 8)), np.zeros((8, 8)), method="affine")
    with pytest.raises(TypeError):
        register_pair(np.zeros((8, 8)), np.zeros((8, 8)), method="demons", mesh_size=4)
    with pytest.raises(TypeError, match="unknown sitk_demons parameters"):
        register_pair(np.zeros((8, 8)), np.zeros((8, 8)), method="sitk_demons", mesh_size=4)
    assert (
        set(DEFAULTS)
        == set(METHODS)
        == {
            "bspline",
            "demons",
            "sitk_demons",
            "ants_syn",
            "elastix_bspline",
            "convexadam",
        }
    )


@pytest.mark.parametrize("method", OPTIONAL_METHODS)
def test_missing_package_names_the_install_command(method, monkeypatch):
    import scripts.classical.external as external

    monkeypatch.setattr(external, "available", lambda m: False)
    hint = "antspyx" if method == "ants_syn" else 'pip install -e ".[classical]"'
    with pytest.raises(ImportError, match=re.escape(hint)):
        register_pair(np.zeros((8, 8)), np.ones((8, 8)), method=method)


@pytest.fixture
def datalist2(tmp_path):
    """Two 64x64 pairs fixed = Warp(moving, z) (z = half the sinusoid), spacing (1.2, 0.9), with moving labels."""
    z = sinusoid() * 0.5
    items = []
    for k in range(2):
        moving = textured(seed=10 + k)
        fixed = warp(moving, z)
        label = (moving > np.percentile(moving, 70)).astype(np.uint8) * 2
        affine = np.diag([1.2, 0.9, 1.0, 1.0])
        for name, arr in (("m", moving), ("f", fixed)):
            nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / f"{name}{k}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(tmp_path / f"ml{k}.nii.gz"))
        items.append(
            {"id": f"case{k}", "moving": f"m{k}.nii.gz", "fixed": f"f{k}.nii.gz", "moving_label": f"ml{k}.nii.gz"}
        )
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items, "test": items}))
    return tmp_path / "datalist.json", z


@pytest.mark.slow
def test_register_datalist(tmp_path, datalist2):
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    datalist, z = datalist2
    out = tmp_path / "out"
    res = register_datalist(datalist, "test", out, method="demons", iterations=(30, 20))
    assert [r["id"] for r in res] == ["case0", "case1"]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in res)
    with open(out / "timing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["case0", "case1"] and {r["method"] for r in rows} == {"demons"}
    np.testing.assert_allclose([float(r["wall_s"]) for r in rows], [r["seconds"] for r in res], atol=1e-4)
    for r in res:
        for key in ("ddf", "warped", "warped_label"):
            assert (out / f"{r['id']}_{key}.nii.gz").is_file()
    summary = json.loads((out / "classical_demons.json").read_text())
    assert summary["method"] == "demons" and len(summary["cases"]) == 2

    # the DDF file loads as the contract says: channel-last -> (ndim, *spatial), voxels, array-axis order
    d = LoadImaged("ddf", image_only=True)({"ddf": str(out / "case0_ddf.nii.gz")})
    d = EnsureChannelFirstd("ddf", channel_dim=-1)(d)
    ddf = np.asarray(d["ddf"])
    assert ddf.shape == (2, N, N)
    epe = np.linalg.norm(ddf - z, axis=0)[INNER].mean()
    assert epe < 0.3 * np.linalg.norm(z, axis=0)[INNER].mean()
    img = nib.load(str(out / "case0_ddf.nii.gz"))
    np.testing.assert_allclose(img.header.get_zooms()[:2], (1.2, 0.9), rtol=1e-5)
    lab = np.asarray(nib.load(str(out / "case0_warped_label.nii.gz")).dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 2}


@pytest.mark.slow
def test_cli_limit_resume_and_evaluation_datalist(tmp_path, datalist2, capsys):
    """``--limit 1`` registers one pair and writes OUT/datalist.json of it (what the evaluation of a partial run
    reads); ``--resume`` keeps it; bad parameters are a usage error naming the known ones."""
    from scripts.classical.__main__ import main
    from scripts.data import load_datalist

    datalist, z = datalist2
    out = tmp_path / "cli"
    argv = [
        "--method",
        "demons",
        "--datalist",
        str(datalist),
        "--out",
        str(out),
        "--limit",
        "1",
        "--threads",
        "1",
        "--param",
        "iterations=(20,10)",
        "--no-progress",
        "--no-warped",
    ]
    main(argv)
    assert "demons: 1 pairs" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case0_ddf.nii.gz"]
    sub = load_datalist(out / "datalist.json", "test")
    assert [it["id"] for it in sub] == ["case0"] and len(load_datalist(out / "datalist.json", "training")) == 2
    first = (out / "timing.csv").read_text()
    assert first.splitlines()[1].startswith("case0,demons,") and first.splitlines()[1].endswith(",1")
    main(argv + ["--resume"])
    assert (out / "timing.csv").read_text() == first  # kept, not re-registered
    with pytest.raises(SystemExit):
        main(["--method", "demons", "--datalist", str(datalist), "--out", str(out), "--param", "mesh_size=4"])
    assert "unknown demons parameters ['mesh_size']" in capsys.readouterr().err
