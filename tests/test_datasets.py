"""Datalist builders for real data (scripts/data/builders/) on tiny synthetic fixtures in the providers' layouts."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data import DataError, load_datalist, paired_transforms
from scripts.data.builders import DataWarning, build_acdc, build_camus, build_datalist, build_pairs

SHAPE = (20, 24, 3)  # ACDC volume (x, y, slices)
ACDC_AFFINE = np.diag([1.5, 1.4, 10.0, 1.0])
ACDC_AFFINE[:3, 3] = [-12.0, 7.0, 3.0]


def ring_labels(shape2d, centre, r_lv, width=2.0, rv=True, myo_label=2, lv_label=3, rv_label=1):
    """ACDC-coded slice: LV cavity disc (3), myocardium ring (2), RV blob (1)."""
    x, y = np.meshgrid(np.arange(shape2d[0]), np.arange(shape2d[1]), indexing="ij")
    d = np.hypot(x - centre[0], y - centre[1])
    lab = np.zeros(shape2d, np.uint8)
    lab[d <= r_lv] = lv_label
    lab[(d > r_lv) & (d <= r_lv + width)] = myo_label
    if rv:
        lab[(np.hypot(x - centre[0], y - centre[1] - r_lv - width - 2.5) <= 1.5) & (lab == 0)] = rv_label
    return lab


def image_from_labels(lab, rng):
    img = 20.0 + 5.0 * rng.standard_normal(lab.shape)
    img[lab == 3] += 200.0
    img[lab == 2] += 60.0
    img[lab == 1] += 150.0
    return img.astype(np.float32)


def save_nii(path, arr, affine=ACDC_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))


def acdc_patient(folder: Path, pid: str, ed: int, es: int, centre, rng, nbframe: int = 5):
    """One ACDC patient: Info.cfg, ED/ES frames + _gt, a decoy frame and the 4d file. Slice 2 has no ES myocardium."""
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(
        f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: {nbframe}\n" "Weight: 80.0\n"
    )
    vols = {}
    for phase, frame, r in (("ED", ed, 4.0), ("ES", es, 2.0)):  # ES is contracted: smaller LV cavity
        lab = np.zeros(SHAPE, np.uint8)
        for z in range(SHAPE[2]):
            c = (centre[0] + z, centre[1] - z)
            lab[..., z] = ring_labels(SHAPE[:2], c, r)
        if phase == "ES":
            lab[..., 2][lab[..., 2] == 2] = 0  # no myocardium in the ES frame of slice 2
        img = image_from_labels(lab, rng)
        save_nii(folder / f"{pid}_frame{frame:02d}.nii.gz", img)
        save_nii(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", lab)
        vols[phase] = img
    decoy = [f for f in range(1, nbframe + 1) if f not in (ed, es)][0]  # an unlabelled frame with a huge LV
    save_nii(
        folder / f"{pid}_frame{decoy:02d}.nii.gz",
        image_from_labels(np.stack([ring_labels(SHAPE[:2], centre, 8.0)] * SHAPE[2], -1), rng),
    )
    save_nii(folder / f"{pid}_4d.nii.gz", np.stack([vols["ED"]] * nbframe, -1))


def make_acdc(root: Path, n_train=5, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_test):
        sub = "training" if i < n_train else "testing"
        ed, es = (1, 3) if i % 2 == 0 else (1, 4)
        acdc_patient(root / sub / f"patient{i + 1:03d}", f"patient{i + 1:03d}", ed, es, (8 + i % 3, 11 - i % 2), rng)
    return root


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc") / "database")


@pytest.fixture(scope="module")
def acdc_out(acdc_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("acdc_out") / "acdc"
    with pytest.warns(DataWarning, match=r"skipped 7 slice pair\(s\) without myocardium"):
        build_acdc(acdc_root, out, seed=3)
    return out


def read_list(out):
    return json.loads((Path(out) / "datalist.json").read_text())


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


# ---------------------------------------------------------------------------------------------------------------- ACDC
def test_acdc_pairs_frames_crop_labels(acdc_out, acdc_root):
    dl = read_list(acdc_out)
    assert sum(len(v) for v in dl.values()) == 7 * 2  # 7 patients x 2 slices with myocardium in ED and ES
    for split in ("training", "validation", "test"):
        for item in dl[split]:
            assert not Path(item["moving"]).is_absolute() and item["moving"].endswith("_ED.nii.gz")
            assert item["fixed"].endswith("_ES.nii.gz")
            assert item["spacing"] == pytest.approx([1.5, 1.4])
            z = int(item["id"][-2:])
            assert z in (0, 1)  # slice 2 has no ES myocardium: skipped
            m, m_aff = load(acdc_out / item["moving"])
            ml, _ = load(acdc_out / item["moving_label"])
            fl, _ = load(acdc_out / item["fixed_label"])
            assert m.shape == (128, 128) and m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0
            assert ml.dtype == np.uint8 and set(np.unique(ml)) == {0, 1, 2, 3}
            # ED (moving) has the larger cavity: the Info.cfg frames were used, not the decoy (radius 8)
            assert 0 < (fl == 1).sum() < (ml == 1).sum() < np.pi * 5.0**2
            # label mapping: LV cavity (ACDC 3) -> 1 at the ring centre, RV (ACDC 1) -> 3
            cy = np.argwhere((ml == 2) | (fl == 2)).mean(axis=0)
            assert np.abs(cy - 64).max() <= 0.5  # crop centre = ED U ES myocardium centroid
            assert ml[64, 64] == 1 and fl[64, 64] == 1
            # the affine keeps the slice's world position: crop pixel (64, 64) is the original centroid
            pid = item["patient"]
            sub = "testing" if split == "test" else "training"
            raw = [load(p)[0][..., z] for p in sorted((acdc_root / sub / pid).glob("*_gt.nii.gz"))]
            c0 = np.argwhere((raw[0] == 2) | (raw[1] == 2)).mean(axis=0)
            world = ACDC_AFFINE @ [*np.rint(c0), z, 1.0]
            assert np.allclose(m_aff @ [64, 64, 0, 1.0], world)


def test_acdc_split_and_determinism(acdc_out, acdc_root, tmp_path):
    dl = read_list(acdc_out)
    pats = {s: sorted({i["patient"] for i in dl[s]}) for s in dl}
    assert len(pats["training"]) == 4 and len(pats["validation"]) == 1  # 80/20 of the 5 training/ patients
    assert pats["test"] == ["patient006", "patient007"]  # testing/ -> test
    with pytest.warns(DataWarning):
        build_acdc(acdc_root, tmp_path / "again", seed=3)
    assert read_list(tmp_path / "again") == dl  # same seed, same datalist
    with pytest.raises(DataError, match="not empty"):
        build_acdc(acdc_root, tmp_path / "again", seed=3)
    with pytest.warns(DataWarning):
        build_acdc(acdc_root, tmp_path / "again", seed=3, crop_size=(64, 64), overwrite=True)
    assert load(tmp_path / "again" / read_list(tmp_path / "again")["test"][0]["moving"])[0].shape == (64, 64)
    val = set()
    for seed in range(4):
        with pytest.warns(DataWarning):
            build_acdc(acdc_root, tmp_path / f"s{seed}", seed=seed, labels=False)
        d = read_list(tmp_path / f"s{seed}")
        assert "moving_label" not in d["training"][0]
        val.add(d["validation"][0]["patient"])
    assert len(val) > 1  # the seed changes the split
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["patient001"], "validation": ["patient002"], "test": ["patient007"]}))
    with pytest.warns(DataWarning, match="in no split were skipped"):
        build_acdc(acdc_root, tmp_path / "f", split_file=split, require_myo="either")
    d = read_list(tmp_path / "f")
    assert {i["patient"] for i in d["test"]} == {"patient007"} and len(d["training"]) == 3  # 'either' keeps slice 2


def test_datalist_through_paired_transforms(acdc_out):
    items = load_datalist(acdc_out, "training")
    out = paired_transforms(spatial_size=(128, 128))(items[0])
    assert out["moving"].shape == (1, 128, 128) and out["fixed_label"].shape == (1, 128, 128)
    assert float(out["moving"].max()) <= 1.0


def test_cli_acdc(acdc_root, tmp_path, capsys):
    from bundle.__main__ import main

    with pytest.warns(DataWarning):
        main(
            [
                "datalist",
                "--dataset",
                "acdc",
                "--root",
                str(acdc_root),
                "--out",
                str(tmp_path / "o"),
                "--seed",
                "3",
                "--verbose",
                "False",
            ]
        )
    assert "datalist.json" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown option"):
        main(
            [
                "datalist",
                "--dataset",
                "acdc",
                "--root",
                str(acdc_root),
                "--out",
                str(tmp_path / "p"),
                "--views",
                "2CH",
                "--verbose",
                "False",
            ]
        )


def _corrupt_and_check(root, out, target: Path, action, match=None, **kw):
    action(target)
    with pytest.raises(DataError, match=re.escape(match or target.name)):
        build_acdc(root, out, **kw)
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


BAD_ACDC = {
    "missing_ed": ("patient001_frame01.nii.gz", lambda p: p.unlink(), None),
    "missing_es_label": ("patient001_frame03_gt.nii.gz", lambda p: p.unlink(), None),
    "label_shape": ("patient001_frame03_gt.nii.gz", lambda p: save_nii(p, np.zeros((20, 22, 3), np.uint8)), None),
    "label_affine": (
        "patient001_frame01_gt.nii.gz",
        lambda p: save_nii(p, np.asarray(nib.load(str(p)).dataobj), np.diag([2.0, 2, 2, 1])),
        None,
    ),
    "4d": ("patient001_frame01.nii.gz", lambda p: save_nii(p, np.ones(SHAPE + (2,), np.float32)), None),
    "truncated": ("patient001_frame03.nii.gz", _truncate, None),
    "unreadable": ("patient001_frame01.nii.gz", lambda p: p.write_bytes(b"not a nifti" * 10), None),
    "nan": ("patient001_frame01.nii.gz", lambda p: save_nii(p, np.full(SHAPE, np.nan, np.float32)), None),
    "constant": ("patient001_frame03.nii.gz", lambda p: save_nii(p, np.full(SHAPE, 7.0, np.float32)), None),
    "label_values": ("patient001_frame01_gt.nii.gz", lambda p: save_nii(p, np.full(SHAPE, 9, np.uint8)), None),
    "info_cfg": ("Info.cfg", lambda p: p.write_text("ES: 3\nNbFrame: 5\n"), "no 'ED:' line"),
}


@pytest.mark.parametrize("case", sorted(BAD_ACDC))
def test_acdc_bad_input(case, tmp_path):
    root = make_acdc(tmp_path / "db", n_train=2, n_test=1)
    name, action, match = BAD_ACDC[case]
    target = root / "training" / "patient001" / name
    _corrupt_and_check(root, tmp_path / "out", target, action, match=f"{target.name}: {match}" if match else None)


@pytest.mark.filterwarnings("ignore::scripts.data.builders.DataWarning")
def test_acdc_empty_split(tmp_path):
    root = make_acdc(tmp_path / "db", n_train=3, n_test=0)
    with pytest.raises(DataError, match="split 'test' is empty"):
        build_acdc(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["patient001"], "validation": ["patient002"], "test": ["patient009"]}))
    with pytest.raises(DataError, match=r"split\.json: patient 'patient009'"):
        build_acdc(root, tmp_path / "out", split_file=split)


# --------------------------------------------------------------------------------------------------------------- CAMUS
CAMUS_SPACING = (0.3, 0.25)  # (x, y) in mm
CAMUS_HW = (36, 28)  # numpy (rows = y, cols = x)


def camus_frame(rng, r_lv):
    lab = ring_labels(CAMUS_HW, (18, 14), r_lv, width=3, rv=False, myo_label=2, lv_label=1)
    lab[(np.arange(CAMUS_HW[0])[:, None] > 28) & (lab == 0)] = 3  # atrium at the bottom
    img = np.clip(image_from_labels(np.where(lab == 1, 3, np.where(lab == 3, 1, lab)), rng), 0, 255)
    return img.astype(np.uint8), lab


def make_camus(root: Path, n=5, fmt="mhd", seed=0, layout_3d_first=False):
    import itk

    rng = np.random.default_rng(seed)
    for i in range(n):
        pid = f"patient{i + 1:04d}"
        folder = root / pid
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            for phase, r in (("ED", 8.0), ("ES", 5.0)):
                img, lab = camus_frame(rng, r)
                for arr, suffix in ((img, ""), (lab, "_gt")):
                    stem = folder / f"{pid}_{view}_{phase}{suffix}"
                    if fmt == "mhd":
                        a = arr[None] if (layout_3d_first and i == 0) else arr  # original release: 3D, one slice
                        im = itk.image_from_array(np.ascontiguousarray(a))
                        im.SetSpacing(list(CAMUS_SPACING) + ([1.0] if a.ndim == 3 else []))
                        itk.imwrite(im, str(stem) + ".mhd")
                    else:
                        aff = np.diag(list(CAMUS_SPACING) + [1.0, 1.0])
                        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.T), aff), str(stem) + ".nii.gz")
    return root


@pytest.fixture(scope="module")
def camus_mhd(tmp_path_factory):
    return make_camus(tmp_path_factory.mktemp("camus") / "training", layout_3d_first=True)


@pytest.mark.parametrize("fmt", ["mhd", "nii"])
def test_camus(fmt, camus_mhd, tmp_path):
    root = camus_mhd if fmt == "mhd" else make_camus(tmp_path / "in" / "database_nifti", fmt="nii")
    out = build_camus(root.parent, tmp_path / "out", seed=1).parent  # root.parent: one level above patients
    dl = read_list(out)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [6, 2, 2]  # 3/1/1 patients x 2 views
    assert len({i["patient"] for s in dl.values() for i in s}) == 5
    item = dl["training"][0]
    ml, aff = load(out / item["moving_label"])
    fl, _ = load(out / item["fixed_label"])
    m, _ = load(out / item["moving"])
    f, _ = load(out / item["fixed"])
    assert m.shape == (128, 128) and min(m.min(), f.min()) == 0.0 and max(m.max(), f.max()) == 1.0  # min-max, jointly
    assert set(np.unique(ml)) == {0, 1, 2, 3} and (ml == 1).sum() > (fl == 1).sum()  # ED -> ES
    # array axes are (x, y) as MONAI reads them; spacing after the resize
    sp = [CAMUS_SPACING[0] * CAMUS_HW[1] / 128, CAMUS_SPACING[1] * CAMUS_HW[0] / 128]
    assert item["spacing"] == pytest.approx(sp)
    assert np.allclose(np.abs(np.diag(aff)[:2]), sp)
    # both releases give the same arrays (same orientation)
    assert (ml[:, :64] == 3).sum() == 0 and (ml[:, 100:] == 3).sum() > 0  # atrium at high y
    assert load_datalist(out, "test")[0]["id"].endswith(("_2CH", "_4CH"))
    d = paired_transforms(spatial_size=(128, 128))(load_datalist(out, "validation")[0])
    assert d["moving"].shape == (1, 128, 128)


def test_camus_options_and_determinism(camus_mhd, tmp_path):
    build_camus(camus_mhd, tmp_path / "a", seed=1, views="4CH", keep_atrium=False)
    build_camus(camus_mhd, tmp_path / "b", seed=1, views=("4CH",), keep_atrium=False)
    a = read_list(tmp_path / "a")
    assert a == read_list(tmp_path / "b") and len(a["training"]) == 3
    assert all(i["id"].endswith("_4CH") for s in a.values() for i in s)
    assert 3 not in np.unique(load(tmp_path / "a" / a["training"][0]["fixed_label"])[0])


def test_camus_bad_input(tmp_path):
    root = make_camus(tmp_path / "c", n=3)
    (root / "patient0002" / "patient0002_2CH_ES_gt.mhd").unlink()
    with pytest.raises(DataError, match="patient0002_2CH_ES_gt"):
        build_camus(root, tmp_path / "out")
    build_camus(root, tmp_path / "nolabels", labels=False)  # fine without labels
    assert "moving_label" not in read_list(tmp_path / "nolabels")["training"][0]
    raw = root / "patient0003" / "patient0003_4CH_ED.raw"
    _truncate(raw)
    with pytest.raises(DataError, match="patient0003_4CH_ED.mhd: unreadable or truncated"):
        build_camus(root, tmp_path / "out", labels=False)
    (root / "patient0003" / "patient0003_4CH_ED.mhd").unlink()
    with pytest.raises(DataError, match="patient0003_4CH_ED.*missing ED frame"):
        build_camus(root, tmp_path / "out", labels=False)
    root2 = make_camus(tmp_path / "n", n=3, fmt="nii")
    nib.save(
        nib.Nifti1Image(np.ones((28, 36, 4), np.float32), np.eye(4)),
        str(root2 / "patient0001" / "patient0001_4CH_ES.nii.gz"),
    )
    with pytest.raises(DataError, match=r"patient0001_4CH_ES.nii.gz: image has shape \(28, 36, 4\) \(3D\)"):
        build_camus(root2, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# --------------------------------------------------------------------------------------------------------------- pairs
def make_pairs(folder: Path, n=5, dims=2):
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    shape = (32, 30) if dims == 2 else (12, 10, 8)
    for i in range(n):
        fmt = ["nii.gz", "mhd", "nrrd"][i % 3]
        row = {}
        for key in ("moving", "fixed", "moving_label", "fixed_label"):
            arr = (
                rng.integers(0, 3, shape).astype(np.uint8)
                if key.endswith("label")
                else rng.random(shape).astype(np.float32) * 500
            )
            name = f"case{i}_{key}.{fmt}"
            if fmt == "nii.gz":
                aff = np.diag([0.7, 0.8, 0.9, 1.0])
                aff[:3, 3] = [5.0, -3.0, 2.0]
                nib.save(nib.Nifti1Image(arr, aff), str(folder / name))
            else:
                im = itk.image_from_array(np.ascontiguousarray(arr.T))
                im.SetSpacing([0.7, 0.8, 0.9][:dims])
                itk.imwrite(im, str(folder / name))
            row[key] = name
        rows.append(row)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_pairs_reference_originals(tmp_path):
    rows = make_pairs(tmp_path / "in")
    csv_path = write_csv(tmp_path / "in" / "pairs.csv", rows)
    out = build_pairs(csv_path, tmp_path / "out", split="test").parent
    dl = read_list(out)
    assert len(dl["test"]) == 5 and dl["training"] == [] and dl["validation"] == []
    item = dl["test"][0]
    assert item["moving"] == "../in/case0_moving.nii.gz" and item["spacing"] == pytest.approx([0.7, 0.8])
    for it in load_datalist(out, "test"):
        d = paired_transforms(spatial_size=(128, 128), intensity="percentile")(it)
        assert d["moving"].shape == (1, 128, 128) and d["fixed_label"].shape == (1, 128, 128)
        assert 0.9 < float(d["moving"].max()) <= 1.0
    # fractions, JSON list, determinism, copies in the input geometry
    (tmp_path / "in" / "pairs.json").write_text(json.dumps(rows))
    build_pairs(tmp_path / "in" / "pairs.json", tmp_path / "j1", split=(0.6, 0.2, 0.2), seed=4)
    build_datalist("pairs", csv_path, tmp_path / "j2", split="0.6,0.2,0.2", seed=4, copy=True)
    d1, d2 = read_list(tmp_path / "j1"), read_list(tmp_path / "j2")
    assert [len(d1[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    assert [i["id"] for i in d1["training"]] == [i["id"] for i in d2["training"]]
    copy = d2["training"][0]
    arr, aff = load(tmp_path / "j2" / copy["moving"])
    src = next(r for r in rows if r["moving"].startswith(copy["id"][5:].split("_")[0] + "_"))
    assert arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    if src["moving"].endswith(".nii.gz"):
        assert np.allclose(aff, nib.load(str(tmp_path / "in" / src["moving"])).affine)


def test_pairs_3d(tmp_path):
    rows = make_pairs(tmp_path / "in", n=2, dims=3)
    csv_path = write_csv(tmp_path / "in" / "pairs.csv", [{k: r[k] for k in ("moving", "fixed")} for r in rows])
    out = build_pairs(csv_path, tmp_path / "out", split="test", spatial_dims=3).parent
    d = paired_transforms(spatial_size=(16, 16, 16), intensity="percentile")(load_datalist(out, "test")[1])
    assert d["moving"].shape == (1, 16, 16, 16) and "moving_label" not in d
    with pytest.raises(DataError, match="labels were asked for"):
        build_pairs(csv_path, tmp_path / "out2", split="test", labels=True)


def _bad_pairs(tmp_path, mutate, match, **kw):
    rows = make_pairs(tmp_path / "in", n=3)
    mutate(tmp_path / "in", rows)
    csv_path = write_csv(tmp_path / "in" / "pairs.csv", rows)
    with pytest.raises(DataError, match=match):
        build_pairs(csv_path, tmp_path / "out", **{"split": "test", **kw})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def _replace(row, key, arr):
    """Mutation: overwrite the file of ``key`` in pair ``row`` with ``arr`` (NIfTI, identity affine)."""
    return lambda d, rows: nib.save(nib.Nifti1Image(arr, np.eye(4)), str(d / rows[row][key]))


BAD_PAIRS = {
    "missing_file": (lambda d, rows: (d / rows[1]["fixed"]).unlink(), r"case1_fixed\.mhd: image file does not exist"),
    "label_shape": (
        _replace(0, "moving_label", np.zeros((32, 31), np.uint8)),
        r"case0_moving_label\.nii\.gz: label shape",
    ),
    "pair_shape": (_replace(0, "fixed", np.arange(960.0).reshape(30, 32)), r"case0_fixed\.nii\.gz: fixed shape"),
    "label_affine": (
        _replace(0, "fixed_label", np.zeros((32, 30), np.uint8)),
        r"case0_fixed_label\.nii\.gz: 'fixed_label' is not on the grid of 'image' " r".*case0_fixed\.nii\.gz \(spacing",
    ),
    "4d": (_replace(0, "moving", np.ones((32, 30, 4, 2), np.float32)), r"case0_moving\.nii\.gz: image has shape .*4D"),
    "nan": (
        _replace(0, "moving", np.full((32, 30), np.inf, np.float32)),
        r"case0_moving\.nii\.gz: image contains NaN or Inf",
    ),
    "constant": (_replace(0, "fixed", np.zeros((32, 30), np.float32)), r"case0_fixed\.nii\.gz: constant image"),
    "truncated_raw": (lambda d, rows: _truncate(d / "case1_moving.raw"), r"case1_moving\.mhd: unreadable or truncated"),
    "truncated_gz": (
        lambda d, rows: _truncate(d / rows[0]["moving"]),
        r"case0_moving\.nii\.gz: unreadable or truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_pairs_bad_input(case, tmp_path):
    mutate, match = BAD_PAIRS[case]
    _bad_pairs(tmp_path, mutate, match)


def test_pairs_empty_split_and_list(tmp_path):
    _bad_pairs(tmp_path, lambda d, rows: rows.pop(), r"pairs\.csv: split 'validation' is empty", split=(0.6, 0.2, 0.2))
    (tmp_path / "empty.csv").write_text("moving,fixed\n")
    with pytest.raises(DataError, match=r"empty\.csv: the pair list is empty"):
        build_pairs(tmp_path / "empty.csv", tmp_path / "o")
    (tmp_path / "bad.csv").write_text("moving,fixed\na.nii.gz,\n")
    with pytest.raises(DataError, match=r"bad\.csv: row 1 has no \['fixed'\]"):
        build_pairs(tmp_path / "bad.csv", tmp_path / "o")
