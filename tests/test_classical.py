"""Classical ITK baselines (scripts/classical.py): axis-order / unit conversion and recovery of known deformations.

Small (64x64) images keep the file well under a minute; ITK's first template lookup alone takes ~10 s.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

itk = pytest.importorskip("itk")
nib = pytest.importorskip("nibabel")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

from scripts.classical import (  # noqa: E402
    DEFAULTS,
    ddf_to_itk_field,
    itk_field_to_ddf,
    register_datalist,
    register_pair,
    warp,
)

N = 64
M = 8  # margin excluded from checks (np.roll wraps content around the border)
INNER = (slice(M, -M), slice(M, -M))


def textured(n: int = N, seed: int = 0) -> np.ndarray:
    """Smooth random texture plus a central blob, in [0, 1]."""
    rng = np.random.default_rng(seed)
    tex = scipy_ndimage.gaussian_filter(rng.standard_normal((n, n)), n / 32)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    blob = np.exp(-((yy - n / 2) ** 2 + (xx - n / 2) ** 2) / (2 * (n / 6) ** 2))
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


@pytest.mark.parametrize("method", ["bspline", "demons"])
def test_known_shift_anisotropic(method):
    """moving = fixed shifted by (+3, -2) along axes (0, 1) => z = (+3, -2) and Warp(moving, z) = fixed."""
    fixed = textured()
    moving = np.roll(fixed, (3, -2), axis=(0, 1))  # moving(i, j) = fixed(i - 3, j + 2)
    ddf, seconds = register_pair(moving, fixed, method=method, spacing=(1.5, 0.8))
    assert ddf.shape == (2, N, N) and ddf.dtype == np.float32
    assert seconds > 0
    inner = ddf[(slice(None),) + INNER]
    np.testing.assert_allclose(np.median(inner, axis=(1, 2)), [3.0, -2.0], atol=0.1)
    err = np.abs(inner - np.array([3.0, -2.0])[:, None, None])
    assert np.percentile(err, 90) < 0.3
    warped = warp(moving, ddf)
    resid = np.abs(warped - fixed)[INNER]
    assert resid.mean() < 0.01 and np.abs(moving - fixed)[INNER].mean() > 0.05


@pytest.mark.parametrize("method, max_ratio", [("bspline", 0.3), ("demons", 0.15)])
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
    assert set(DEFAULTS) == {"bspline", "demons"}


def test_register_datalist(tmp_path):
    from monai.transforms import EnsureChannelFirstd, LoadImaged

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

    out = tmp_path / "out"
    res = register_datalist(tmp_path / "datalist.json", "test", out, method="demons", iterations=(30, 20))
    assert [r["id"] for r in res] == ["case0", "case1"]
    assert all(r["seconds"] > 0 for r in res)
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
