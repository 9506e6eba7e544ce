"""The Sunnybrook builder: the shared copy of the real data (skipped when ../shared/realdata is absent) and the
official download's layout on a small synthetic DICOM tree (pydicom writes it, MONAI's ITK reader reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.data import DataError, load_datalist
from scripts.data.builders import build_sunnybrook
from scripts.data.builders.sunnybrook import contour_mask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "sunnybrook"
needs_shared = pytest.mark.skipif(
    not (SHARED / "dicoms").is_dir(), reason=f"real Sunnybrook data not found at {SHARED} (../shared/realdata)"
)


def _write_dicom(path: Path, pixels: np.ndarray, n: int, phases: int, z: float) -> None:
    pydicom = pytest.importorskip("pydicom", reason="pydicom (test extra) writes the synthetic DICOM tree")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", "SCD0000101", n
    ds.CardiacNumberOfImages = phases
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.5, 1.5]
    ds.SliceThickness = 10
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _circle(cx, cy, r, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return "\n".join(f"{cx + r * np.cos(a):.2f} {cy + r * np.sin(a):.2f}" for a in t)


def _official_tree(root: Path, slices=2, phases=4, size=40, es_o_contour=False) -> None:
    """SCD_IMAGES_01/SCD0000101/CINESAX_300/IM-0003-<n>.dcm + SCD_ManualContours/SC-HF-I-01/contours-manual/
    IRCCI-expert/IM-0001-<n>-{i,o}contour-manual.txt; cavity radius 8 px at phase 0 (ED), 5 px at phase 2 (ES)."""
    yy, xx = np.mgrid[:size, :size]
    for s in range(slices):
        for p in range(phases):
            n = s * phases + p + 1
            r = 8 - 1.5 * min(p, 2)
            img = 200 + 800 * (((xx - 20) ** 2 + (yy - 18) ** 2) < r**2)  # rows y, columns x
            _write_dicom(
                root / "SCD_IMAGES_01/SCD0000101/CINESAX_300" / f"IM-0003-{n:04d}.dcm", img, n, phases, 10.0 * s
            )
    cdir = root / "SCD_ManualContours/SC-HF-I-01/contours-manual/IRCCI-expert"
    cdir.mkdir(parents=True)
    for s in range(slices):
        ed, es = s * phases + 1, s * phases + 3
        (cdir / f"IM-0001-{ed:04d}-icontour-manual.txt").write_text(_circle(20, 18, 8))
        (cdir / f"IM-0001-{ed:04d}-ocontour-manual.txt").write_text(_circle(20, 18, 12))
        (cdir / f"IM-0001-{es:04d}-icontour-manual.txt").write_text(_circle(20, 18, 5))
        (cdir / f"IM-0001-{es:04d}-p1contour-manual.txt").write_text(_circle(20, 18, 2))  # papillary: ignored
        if es_o_contour:
            (cdir / f"IM-0001-{es:04d}-ocontour-manual.txt").write_text(_circle(20, 18, 9))
    (root / "link.csv").write_text("PatientID,OriginalID\nSCD0000101,SC-HF-I-01\n")


def test_contour_mask_is_the_polygon_in_column_row_order(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("1.5 0.5\n6.5 0.5\n6.5 3.5\n1.5 3.5\n")  # x (column) 1.5..6.5, y (row) 0.5..3.5
    m = contour_mask(f, (10, 8))
    assert m.shape == (10, 8) and m.sum() == 5 * 3
    assert sorted(set(np.argwhere(m)[:, 0])) == [2, 3, 4, 5, 6]  # axis 0 is x (the column)
    assert sorted(set(np.argwhere(m)[:, 1])) == [1, 2, 3]
    f.write_text("1 1\n2 2\n")
    with pytest.raises(DataError, match="c.txt.*≥ 3"):
        contour_mask(f, (10, 8))


@pytest.mark.slow
def test_official_layout_builds_labelled_and_unlabelled_pairs(tmp_path):
    root = tmp_path / "scd"
    _official_tree(root)
    path = build_sunnybrook(root, tmp_path / "out", crop_size=(32, 32), link=root / "link.csv")
    train = load_datalist(path, "training")
    test = load_datalist(path, "test")
    assert len(train) == 2 * 3 and len(test) == 2  # ED -> 3 other phases per slice; one ED -> ES pair per slice
    assert {i["id"] for i in test} == {"SCD0000101_slice00_ED_to_ES", "SCD0000101_slice01_ED_to_ES"}
    import nibabel as nib

    item = test[0]
    mov_lab = np.asarray(nib.load(item["moving_label"]).dataobj)
    fix_lab = np.asarray(nib.load(item["fixed_label"]).dataobj)
    assert set(np.unique(mov_lab)) == {0, 1, 2} and set(np.unique(fix_lab)) == {0, 1}  # no myocardium at ES
    # the cavity radius 8 (ED) vs 5 (ES): ~201 vs ~78 pixels; the image is bright exactly inside the ED cavity
    assert 180 < (mov_lab == 1).sum() < 220 and 65 < (fix_lab == 1).sum() < 95
    mov = np.asarray(nib.load(item["moving"]).dataobj)
    assert mov[mov_lab == 1].mean() > 0.9 and mov[mov_lab == 0].mean() < 0.3
    assert item["spacing"] == [1.5, 1.5]
    info = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    assert info["patients"]["SCD0000101"]["ed_phase"] == 0 and info["patients"]["SCD0000101"]["layout"] == "official"


@pytest.mark.slow
def test_pairing_problems_name_the_file(tmp_path):
    root = tmp_path / "scd"
    _official_tree(root, es_o_contour=True)
    with pytest.raises(DataError, match=r"IM-0001-0003-ocontour-manual.txt: epicardium at ES"):
        build_sunnybrook(root, tmp_path / "out", crop_size=(32, 32))
    assert not (tmp_path / "out").exists()  # nothing written
    (root / "SCD_ManualContours/SC-HF-I-01/contours-manual/IRCCI-expert/IM-0001-0003-ocontour-manual.txt").unlink()
    (root / "SCD_IMAGES_01/SCD0000101/CINESAX_300/IM-0003-0006.dcm").unlink()
    with pytest.raises(
        DataError, match=r"CINESAX_300: SCD0000101 has 7 images for 4 phases.*missing image number\(s\) \[6\]"
    ):
        build_sunnybrook(root, tmp_path / "out", crop_size=(32, 32))
    (root / "link.csv").unlink()
    with pytest.raises(DataError, match="link.csv: patient link CSV not found"):
        build_sunnybrook(root, tmp_path / "out", crop_size=(32, 32))


@needs_shared
@pytest.mark.slow
def test_shared_copy_gives_real_pairs_and_patient_folds(tmp_path):
    path = build_sunnybrook(SHARED, tmp_path / "sb")
    info = json.loads((tmp_path / "sb" / "preprocessing.json").read_text())
    assert info["pairs"] == {
        "SCD0000101": {"labelled": 9, "unlabelled": 228},
        "SCD0000201": {"labelled": 9, "unlabelled": 247},
        "SCD0000301": {"labelled": 10, "unlabelled": 190},
    }
    assert len(load_datalist(path, "training")) == 665
    for pid in ("SCD0000101", "SCD0000201", "SCD0000301"):
        fold = tmp_path / "sb" / f"datalist_loo_{pid}.json"
        test_p = {i["patient"] for i in load_datalist(fold, "test")}
        train_p = {i["patient"] for i in load_datalist(fold, "training")}
        val_p = {i["patient"] for i in load_datalist(fold, "validation")}
        assert test_p == {pid} and pid not in train_p | val_p and len(train_p) == 2  # split by patient
    # the expert LV cavity is larger at ED than at ES on every labelled pair, and the images are in [0, 1]
    import nibabel as nib

    for item in load_datalist(path, "test"):
        ed = np.asarray(nib.load(item["moving_label"]).dataobj)
        es = np.asarray(nib.load(item["fixed_label"]).dataobj)
        assert (ed == 1).sum() > (es == 1).sum() > 0 and (es == 2).sum() == 0
        img = np.asarray(nib.load(item["moving"]).dataobj)
        assert img.shape == (128, 128) and 0.0 <= img.min() and img.max() <= 1.0


@needs_shared
@pytest.mark.slow
def test_one_real_pair_registered_end_to_end_with_the_shipped_mri_weights(tmp_path):
    """Builder -> the bundle's transforms -> shipped models/mri2d -> warp: the LV-cavity Dice of a real ED -> ES pair
    rises above the identity's."""
    import torch
    from monai.networks.blocks import Warp

    from scripts.data import paired_transforms
    from scripts.metrics import myocardium_metrics
    from scripts.networks import VoxelMorphDisplacement

    path = build_sunnybrook(SHARED, tmp_path / "sb", folds=False)
    item = [i for i in load_datalist(path, "test") if i["id"] == "SCD0000301_slice04_ED_to_ES"][0]
    batch = paired_transforms(spatial_size=(128, 128), intensity="none")(item)
    net = VoxelMorphDisplacement(2, channels=[16, 32, 32, 32, 32, 32, 32, 32], final_conv_channels=[16, 16])
    net.load_state_dict(torch.load(Path(__file__).resolve().parents[1] / "models/mri2d/model.pt", weights_only=True))
    net.eval()
    mov, fix = batch["moving"][None], batch["fixed"][None]
    with torch.no_grad():
        ddf = net(torch.cat([mov, fix], 1))
    warped_label = Warp(mode="nearest", padding_mode="border")(batch["moving_label"][None], ddf)
    reg = myocardium_metrics(warped_label[0], batch["fixed_label"], label=1)["dice"]
    ident = myocardium_metrics(batch["moving_label"], batch["fixed_label"], label=1)["dice"]
    assert ident < 0.95 and reg > ident + 0.025, (ident, reg)  # measured 0.939 -> 0.974
