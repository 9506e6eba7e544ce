"""The real echo cine of pydicom-data (``color3d_jpeg_baseline.dcm``): reader, region crop and spacing, the ED/ES
rule, the by-beat datalist, and one real pair registered with the shipped weights (docs/data.md, echo_cine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom", reason="pydicom is needed to read DICOM (pip install -e .[test])")
pytest.importorskip(  # pydicom-data installs its files as the module ``data_store``
    "data_store",
    reason="pydicom-data (pydicom's test files: the real echo cine) is not installed; pip install -e .[test]",
)

from scripts.data import DataError  # noqa: E402
from scripts.data.builders.echo_cine import (  # noqa: E402
    build_echo_cine,
    detect_cycles,
    echo_pairs,
    preprocess_cine,
    read_echo_cine,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cine_path():
    from pydicom.data import get_testdata_file

    p = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)  # never a download in CI
    if p is None:
        pytest.skip("color3d_jpeg_baseline.dcm not found by pydicom.data.get_testdata_file")
    return Path(p)


@pytest.fixture(scope="module")
def cine(cine_path):
    return read_echo_cine(cine_path)


@pytest.fixture(scope="module")
def pre(cine):
    return preprocess_cine(cine)


@pytest.fixture(scope="module")
def cycles(cine, pre):
    return detect_cycles(pre["frames"], pre["mask"], cine.frame_time)


def test_reader_frames_region_and_spacing(cine):
    assert cine.frames.shape == (120, 384, 512)  # region y 31-414, x 84-595 (inclusive) of 480 x 640 frames
    assert cine.region == (84, 31, 595, 414)
    assert cine.spacing == pytest.approx((0.5105, 0.5105), abs=1e-4)  # PhysicalDeltaX/Y 0.05105 cm -> mm
    assert cine.frame_time == pytest.approx(33.333, abs=1e-3)
    assert 0 <= cine.frames.min() and cine.frames.max() <= 255
    # the sector: a convex fan, about 57 % of the region, apex at the top centre, black outside
    assert 0.5 < cine.mask.mean() < 0.65
    rows = np.nonzero(cine.mask.any(1))[0]
    apex_cols = np.nonzero(cine.mask[rows[0]])[0]
    assert rows[0] < 40 and abs(apex_cols.mean() - 256) < 40 and apex_cols.size < 60  # the apex: top centre
    assert cine.mask[rows[-1] - 3, 256] and not cine.mask[rows[0] + 5, :100].any()
    assert cine.frames[:, ~cine.mask].std(0).max() < 1.0  # nothing moves outside the sector


def test_preprocessing_grid_and_intensity(cine, pre):
    assert pre["frames"].shape == (120, 128, 128) and pre["frames"].dtype == np.float32
    assert pre["spacing"] == pytest.approx([0.5105 * 384 / 128, 0.5105 * 512 / 128], abs=1e-3)
    assert pre["frames"].min() == 0.0 and pre["frames"].max() == 1.0
    assert (pre["frames"][:, ~pre["mask"]] == 0).all()
    # the affine: resized grid's pixel size, the crop's position in the full frame
    assert np.diag(pre["affine"])[:2] == pytest.approx(pre["spacing"])


def test_ed_es_rule_gives_about_four_plausible_cycles(cycles):
    assert 24 <= cycles["period"] <= 30  # ~0.9 s at 30 frames/s: 60-75 bpm
    assert 55 <= cycles["bpm"] <= 75
    eds, ess = cycles["ed"], cycles["es"]
    assert len(eds) == 4  # 4 EDs: three complete beats and the last, partial one (ED, systole, early diastole)
    gaps = np.diff(eds)
    assert gaps.min() >= 0.8 * cycles["period"] and gaps.max() <= 1.2 * cycles["period"]
    for e, s in zip(eds, ess):
        assert s is not None and 5 <= s - e <= 12  # systole 0.17-0.4 s
    # the frames found by the rule (docs/results/real_echo.md; within 2 frames if the JPEG decoder changes)
    assert np.abs(np.array(eds) - [22, 50, 78, 105]).max() <= 2
    assert np.abs(np.array(ess) - [31, 58, 85, 114]).max() <= 2


def test_pairs_are_split_by_beat(cycles):
    pairs = echo_pairs(cycles, 120)
    last_start = cycles["beats"][-1][0]
    test_frames = set(range(last_start, 120))
    for split in ("training", "validation"):
        used = {f for m, fx, _ in pairs[split] for f in (m, fx)}
        assert not used & test_frames, split
    assert {m for m, _, _ in pairs["test"]} == {last_start}
    assert pairs["test"][0][1] == cycles["es"][-1]
    assert len(pairs["training"]) == sum(b - a - 1 for a, b in cycles["beats"][:-1])


def test_bad_input_errors_name_the_file(tmp_path, cine_path):
    import pydicom
    from pydicom.data import get_testdata_file

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match="junk.dcm"):
        read_echo_cine(junk)
    single = get_testdata_file("CT_small.dcm", download=False)
    with pytest.raises(DataError, match="not a multi-frame"):
        read_echo_cine(single)
    ds = pydicom.dcmread(cine_path)
    del ds.SequenceOfUltrasoundRegions
    noreg = tmp_path / "noregion.dcm"
    ds.save_as(noreg)
    with pytest.raises(DataError, match="noregion.dcm.*SequenceOfUltrasoundRegions"):
        read_echo_cine(noreg)
    with pytest.raises(DataError, match="fewer than two cardiac cycles|no cardiac period"):
        detect_cycles(np.random.default_rng(0).random((20, 32, 32)), np.ones((32, 32), bool), 33.3, source="x")


@pytest.mark.slow
def test_builder_writes_a_by_beat_datalist_and_a_real_pair_registers(tmp_path, cine_path):
    import nibabel as nib
    import torch
    from monai.networks.blocks import Warp

    from scripts.networks import VoxelMorphDisplacement, network_forward

    path = build_echo_cine(cine_path, tmp_path / "echo")
    dl = json.loads(path.read_text())
    info = json.loads((path.parent / "preprocessing.json").read_text())
    assert {k: len(v) for k, v in dl.items()} == info["pairs"]
    test_start = info["beats"][-1][0]
    frame_no = lambda rel: int(Path(rel).name[6:9])  # noqa: E731  frames/frame_NNN.nii.gz
    for split in ("training", "validation"):
        for it in dl[split]:
            assert frame_no(it["moving"]) < test_start and frame_no(it["fixed"]) < test_start
    ed_es = dl["test"][0]
    assert ed_es["id"].endswith(f"f{info['ed'][-1]:03d}_to_f{info['es'][-1]:03d}")
    assert (path.parent / "cycles.png").is_file()
    mov = nib.load(str(path.parent / ed_es["moving"])).get_fdata().astype(np.float32)
    fix = nib.load(str(path.parent / ed_es["fixed"])).get_fdata().astype(np.float32)
    mask = nib.load(str(path.parent / "sector.nii.gz")).get_fdata() > 0
    assert mov.shape == (128, 128) and ed_es["spacing"] == pytest.approx(info["spacing"])
    net = VoxelMorphDisplacement(2, [16, 32, 32, 32, 32, 32, 32, 32], [16, 16], integration_steps=7, half_res=True)
    net.load_state_dict(torch.load(ROOT / "models" / "model.pt", map_location="cpu"))
    m, f = (torch.as_tensor(a)[None, None] for a in (mov, fix))
    with torch.no_grad():
        ddf = network_forward(net.eval(), torch.cat([m, f], 1))[0]
        warped = Warp("bilinear", "border")(m, ddf)[0, 0].numpy()
    mse_id, mse_reg = ((fix - mov) ** 2)[mask].mean(), ((fix - warped) ** 2)[mask].mean()
    assert mse_reg < 0.8 * mse_id, (mse_reg, mse_id)
