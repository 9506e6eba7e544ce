"""Bad-input campaign of the data path (docs/reliability.md): datalist builders, training / evaluation data, options.

Each case feeds one hostile-but-fair input and asserts (a) a clear error naming the file or option, or the documented
handling, (b) that no input file changed and (c) that nothing appeared outside the output folder (SHA-256 of every
file under the test folder before and after). Inference cases: tests/test_bad_inputs_inference.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data import DataError, load_datalist, paired_transforms
from scripts.data.builders import DataWarning, build_acdc, build_camus, build_pairs
from scripts.data.contracts import MARKER_NAME
from scripts.validation import RULES, ConfigError, validate_options

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16)
AFFINE = np.diag([1.2, 1.1, 1.0, 1.0])
AFFINE[:3, 3] = [3.0, -2.0, 0.0]


# ------------------------------------------------------------------------------------------------------------ helpers
def snapshot(folder: Path) -> dict:
    """relative path -> sha256 of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_untouched(before: dict, folder: Path, out: Path | None = None) -> None:
    """Every file of ``before`` is unchanged; new files only inside ``out`` (none at all when ``out`` is None)."""
    after = snapshot(folder)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"input files changed or deleted: {changed}"
    prefix = None if out is None else out.relative_to(folder).as_posix() + "/"
    new = [k for k in after if k not in before and (prefix is None or not k.startswith(prefix))]
    assert not new, f"files written outside the output: {new}"


def save(path: Path, arr, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def disc(r: float, shape=SHAPE) -> np.ndarray:
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (np.hypot(y - shape[0] / 2, x - shape[1] / 2) <= r).astype(np.int16)


def make_input(folder: Path, n: int = 3, labels: bool = True) -> Path:
    """``n`` pairs in [0, 1] with labels 0/2, and ``pairs.csv``; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"id": f"case{i}"}
        for key, r in (("moving", 4.0), ("fixed", 5.0)):
            lab = disc(r) * 2
            save(folder / f"c{i}_{key}.nii.gz", (0.2 + 0.3 * lab + 0.05 * rng.random(SHAPE)).astype(np.float32))
            row[key] = f"c{i}_{key}.nii.gz"
            if labels:
                save(folder / f"c{i}_{key}_label.nii.gz", lab)
                row[f"{key}_label"] = f"c{i}_{key}_label.nii.gz"
        rows.append(row)
    return write_csv(folder / "pairs.csv", rows)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def raises_named(fn, exc, *patterns):
    """``fn()`` raises ``exc``; every regex of ``patterns`` is found in the message (or in its chained causes)."""
    with pytest.raises(exc) as info:
        fn()
    text, e = "", info.value
    while e is not None:
        text += f"\n{e}"
        e = e.__cause__ or e.__context__
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in {text!r}"
    return text


@pytest.fixture
def area(tmp_path):
    """A test folder with pair data in ``in/``; returns (folder, csv path, snapshot before)."""
    csv_path = make_input(tmp_path / "in")
    return tmp_path, csv_path, snapshot(tmp_path)


# ------------------------------------------------------------------------------------------- builders: never the input
def test_out_is_the_input_folder_refused_with_overwrite(area):
    """The campaign's data loss: --out = the CSV's folder with --overwrite deleted the CSV and the images."""
    tmp, csv_path, before = area
    raises_named(
        lambda: build_pairs(csv_path, csv_path.parent, split="test", overwrite=True),
        DataError,
        r"--out .*in: contains the input .*pairs\.csv",
    )
    assert_untouched(before, tmp)


def test_out_is_the_csv_file(area):
    tmp, csv_path, before = area
    raises_named(
        lambda: build_pairs(csv_path, csv_path, split="test", overwrite=True),
        DataError,
        r"--out .*pairs\.csv: exists and is not a folder",
    )
    assert_untouched(before, tmp)


def test_out_is_a_symlink_to_the_input_folder(area):
    tmp, csv_path, _ = area
    (tmp / "link").symlink_to(csv_path.parent, target_is_directory=True)
    before = snapshot(tmp)
    raises_named(
        lambda: build_pairs(csv_path, tmp / "link", split="test", overwrite=True),
        DataError,
        r"--out .*link: contains the input .*pairs\.csv",
    )
    assert_untouched(before, tmp)
    assert (tmp / "link").is_symlink()


def test_out_contains_an_image_listed_by_absolute_path(area):
    tmp, csv_path, before = area
    rows = read_rows(csv_path)
    (tmp / "elsewhere").mkdir()
    img = save(tmp / "elsewhere" / "m.nii.gz", np.asarray(nib.load(str(csv_path.parent / rows[0]["moving"])).dataobj))
    rows[0]["moving"] = str(img)
    other = write_csv(tmp / "other.csv", rows)
    before = snapshot(tmp)
    raises_named(
        lambda: build_pairs(other, tmp / "elsewhere", split="test", overwrite=True),
        DataError,
        r"contains the input .*m\.nii\.gz",
    )
    assert_untouched(before, tmp)


def test_overwrite_refuses_a_folder_the_bundle_did_not_write(area):
    tmp, csv_path, before = area
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = snapshot(tmp)
    raises_named(
        lambda: build_pairs(csv_path, mine, split="test", overwrite=True),
        DataError,
        r"--out .*mine: was not written by `python -m bundle datalist` \(no \.bundle_written\.json",
    )
    assert_untouched(before, tmp)


def test_overwrite_keeps_user_files_added_to_a_bundle_folder(area):
    tmp, csv_path, _ = area
    out = build_pairs(csv_path, tmp / "out", split="test", copy=True).parent
    (out / "my_results.csv").write_text("do not delete")
    before = snapshot(tmp)
    raises_named(
        lambda: build_pairs(csv_path, out, split="test", overwrite=True),
        DataError,
        r"holds my_results\.csv, not written by the bundle",
    )
    assert_untouched(before, tmp)


def test_overwrite_replaces_only_bundle_files(area):
    """Documented handling: --overwrite of a folder the builder wrote replaces exactly its files (marker)."""
    tmp, csv_path, _ = area
    out = build_pairs(csv_path, tmp / "out", split="test", copy=True).parent
    marker = json.loads((out / MARKER_NAME).read_text())
    assert {"datalist.json", "preprocessing.json", "pairs/case0_moving.nii.gz"} <= set(marker["files"])
    before = {k: v for k, v in snapshot(tmp).items() if not k.startswith("out/")}
    build_pairs(csv_path, out, split="test", copy=False, overwrite=True)
    assert not (out / "pairs").exists()  # the old copies are gone, the new datalist references the originals
    assert load_datalist(out, "test")[0]["moving"].endswith("in/c0_moving.nii.gz")
    assert not [p for p in tmp.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    assert_untouched(before, tmp, out)


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    from test_datasets import make_acdc

    return make_acdc(tmp_path_factory.mktemp("acdc") / "database", n_train=2, n_test=1)


@pytest.mark.parametrize("where", ["root", "inside"])
def test_acdc_out_in_the_data(acdc_root, where):
    before = snapshot(acdc_root)
    out = acdc_root if where == "root" else acdc_root / "prepared"
    raises_named(
        lambda: build_acdc(acdc_root, out, overwrite=True),
        DataError,
        "is the input" if where == "root" else "lies inside the input folder",
    )
    assert_untouched(before, acdc_root)


# --------------------------------------------------------------------------------------------- builders: ids are names
def test_id_with_dot_dot_is_sanitised_inside_out(area):
    tmp, csv_path, _ = area
    rows = read_rows(csv_path)
    rows[0]["id"], rows[1]["id"] = "../../x", "/abs/y"
    write_csv(csv_path, rows)
    before = snapshot(tmp)
    with pytest.warns(DataWarning, match=r"row 1: id '\.\./\.\./x' is used as a file name: changed to 'x'"):
        out = build_pairs(csv_path, tmp / "sub" / "out", split="test", copy=True).parent
    ids = [i["id"] for i in json.loads((out / "datalist.json").read_text())["test"]]
    assert ids == ["x", "abs_y", "case2"]
    assert (out / "pairs" / "x_moving.nii.gz").is_file()
    assert_untouched(before, tmp, out)


@pytest.mark.filterwarnings("ignore::scripts.data.builders.DataWarning")
@pytest.mark.parametrize(
    "ids, match",
    [
        (["../..", "b", "c"], r"row 1: id '\.\./\.\.': not usable as a file name"),
        (["a/b", "a_b", "c"], r"row 2: duplicate id 'a_b'"),
    ],
    ids=["empty", "collide"],
)
def test_unusable_or_colliding_ids(area, ids, match):
    tmp, csv_path, _ = area
    rows = read_rows(csv_path)
    for r, i in zip(rows, ids):
        r["id"] = i
    write_csv(csv_path, rows)
    before = snapshot(tmp)
    raises_named(lambda: build_pairs(csv_path, tmp / "out", split="test", copy=True), DataError, match)
    assert_untouched(before, tmp)


# ---------------------------------------------------------------------------------------------- builders: label values
@pytest.mark.parametrize(
    "values, dtype, match",
    [
        (-3, np.int16, r"c1_fixed_label\.nii\.gz: 'fixed_label' has values outside the label set \[0, 1, 2, 3\]: -3"),
        (4, np.uint8, r"c1_fixed_label\.nii\.gz: 'fixed_label' has values outside the label set .*: 4 \("),
        (2.5, np.float32, r"c1_fixed_label\.nii\.gz: 'fixed_label' has \d+ non-integer voxels"),
    ],
    ids=["minus3_int16", "4", "2.5"],
)
def test_pairs_label_values(area, values, dtype, match):
    tmp, csv_path, _ = area
    save(csv_path.parent / "c1_fixed_label.nii.gz", (disc(5.0) * values).astype(dtype))
    before = snapshot(tmp)
    raises_named(lambda: build_pairs(csv_path, tmp / "out", split="test", copy=True), DataError, match)
    assert_untouched(before, tmp)


def test_pairs_label_values_option(area):
    """Documented handling: another label set is accepted when declared with label_values."""
    tmp, csv_path, _ = area
    save(csv_path.parent / "c1_fixed_label.nii.gz", disc(5.0) * 4)
    before = snapshot(tmp)
    out = build_pairs(csv_path, tmp / "out", split="test", copy=True, label_values="[0,1,2,3,4]").parent
    lab = np.asarray(nib.load(str(out / "pairs" / "case1_fixed_label.nii.gz")).dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 4}
    assert_untouched(before, tmp, out)


def test_camus_label_value(tmp_path):
    from test_datasets import make_camus

    root = make_camus(tmp_path / "camus", n=3)
    import itk

    gt = root / "patient0002" / "patient0002_4CH_ED_gt.mhd"
    a = itk.array_from_image(itk.imread(str(gt))).copy()
    a[0, 0] = 7
    im = itk.image_from_array(a)
    im.SetSpacing([0.3, 0.25])
    itk.imwrite(im, str(gt))
    before = snapshot(tmp_path)
    raises_named(
        lambda: build_camus(root, tmp_path / "out"),
        DataError,
        r"patient0002_4CH_ED_gt\.mhd: 'label' has values outside the label set \[0, 1, 2, 3\]: 7 \(1 voxels\)",
    )
    assert_untouched(before, tmp_path)


# ------------------------------------------------------------------------------------------------ builders: geometry
def _moved(affine_change):
    a = AFFINE.copy()
    affine_change(a)
    return a


@pytest.mark.parametrize(
    "name, change, what",
    [
        ("origin_50mm", lambda a: a.__setitem__((0, 3), a[0, 3] + 50.0), r"origin .*offset \[50\.0"),
        ("flipped_axis", lambda a: a.__setitem__((1, 1), -a[1, 1]), r"direction"),
    ],
    ids=["origin_50mm", "flipped_axis"],
)
def test_pairs_moving_fixed_grids(area, name, change, what):
    tmp, csv_path, _ = area
    rows = read_rows(csv_path)
    p = csv_path.parent / rows[2]["moving"]
    save(p, np.asarray(nib.load(str(p)).dataobj), _moved(change))
    rows[2].pop("moving_label"), rows[2].pop("fixed_label")
    for r in rows:
        r.pop("moving_label", None), r.pop("fixed_label", None)
    write_csv(csv_path, rows)
    before = snapshot(tmp)
    raises_named(
        lambda: build_pairs(csv_path, tmp / "out", split="test"),
        DataError,
        r"c2_moving\.nii\.gz: 'moving' is not on the grid of 'fixed' .*c2_fixed\.nii\.gz",
        what,
        "row 3",
    )
    assert_untouched(before, tmp)


# ------------------------------------------------------------------------------------------ builders: unreadable files
@pytest.mark.parametrize("case", ["truncated_gz", "zero_bytes", "nan", "json_list"])
def test_pairs_unreadable(area, case):
    tmp, csv_path, _ = area
    target = csv_path.parent / "c0_fixed.nii.gz"
    if case == "truncated_gz":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
        args, match = (csv_path,), r"c0_fixed\.nii\.gz: unreadable or truncated image file"
    elif case == "zero_bytes":
        target.write_bytes(b"")
        args, match = (csv_path,), r"c0_fixed\.nii\.gz: unreadable or truncated image file"
    elif case == "nan":
        a = np.asarray(nib.load(str(target)).dataobj).copy()
        a[3, 3] = np.nan
        save(target, a)
        args, match = (csv_path,), r"c0_fixed\.nii\.gz: image contains NaN or Inf"
    else:
        bad = tmp / "in" / "pairs.json"
        bad.write_text('[{"moving": "c0_moving.nii.gz", "fixed": ')
        args, match = (bad,), r"pairs\.json: unreadable pair list \(Expecting value"
    before = snapshot(tmp)
    raises_named(lambda: build_pairs(*args, tmp / "out", split="test"), DataError, match)
    assert_untouched(before, tmp)


# -------------------------------------------------------------------------------------- training / evaluation: datalist
@pytest.mark.parametrize(
    "content, match",
    [
        ('{"training": [{"moving": "a.nii.gz", ', r"datalist\.json: not valid JSON \(Expecting"),
        ("[1, 2]", r"datalist\.json: a datalist is a JSON object .* got a list"),
        ('{"validation": []}', r"datalist\.json: no 'training' split \(has: \['validation'\]\)"),
        ('{"training": {"moving": "a"}}', r"split 'training' must be a list of items, got a dict"),
        ('{"training": [{"moving": "c0_moving.nii.gz"}]}', r"item 0 of 'training' has no \['fixed'\]"),
        ('{"training": [{"moving": "c0_moving.nii.gz", "fixed": 3}]}', r"key 'fixed' must be a file path .* got 3"),
        (
            '{"training": [{"moving": "c0_moving.nii.gz", "fixed": "gone.nii.gz"}]}',
            r"gone\.nii\.gz: file listed in .*datalist\.json \('training' item 0, key 'fixed'\) does not exist",
        ),
    ],
    ids=[
        "truncated_json",
        "not_an_object",
        "missing_split",
        "split_not_a_list",
        "missing_key",
        "path_not_a_string",
        "missing_file",
    ],
)
def test_malformed_datalist(area, content, match):
    tmp, csv_path, _ = area
    (csv_path.parent / "datalist.json").write_text(content)
    before = snapshot(tmp)
    raises_named(lambda: load_datalist(csv_path.parent, "training"), DataError, match)
    assert_untouched(before, tmp)


def test_datalist_ids_are_file_names(area):
    tmp, csv_path, _ = area
    items = [
        {"moving": "c0_moving.nii.gz", "fixed": "c0_fixed.nii.gz", "id": "../../evil"},
        {"moving": "c1_moving.nii.gz", "fixed": "c1_fixed.nii.gz", "id": "../evil"},
    ]
    (csv_path.parent / "datalist.json").write_text(json.dumps({"test": items}))
    raises_named(lambda: load_datalist(csv_path.parent, "test"), DataError, r"item 1\): duplicate id 'evil'")
    items[1]["id"] = "ok"
    (csv_path.parent / "datalist.json").write_text(json.dumps({"test": items}))
    assert [i["id"] for i in load_datalist(csv_path.parent, "test")] == ["evil", "ok"]


# ----------------------------------------------------------------------------------- training / evaluation: transforms
def _pair(tmp: Path, moving=None, fixed=None, m_aff=AFFINE, moving_label=None) -> dict:
    base = (0.2 + 0.6 * disc(4.0)).astype(np.float32)
    item = {
        "moving": str(save(tmp / "m.nii.gz", base if moving is None else moving, m_aff)),
        "fixed": str(save(tmp / "f.nii.gz", base if fixed is None else fixed)),
        "fixed_label": str(save(tmp / "fl.nii.gz", disc(4.0) * 2)),
    }
    if moving_label is not None:
        item["moving_label"] = str(save(tmp / "ml.nii.gz", moving_label))
    return item


XF_CASES = {
    "x1e6": (
        dict(moving=(0.2 + 0.6 * disc(4.0)).astype(np.float32) * 1e6),
        [r"m\.nii\.gz: 'moving' intensities span \[200000, 800000\]", r"--intensity percentile"],
    ),
    "int16_0_3000": (
        dict(fixed=(disc(4.0) * 3000).astype(np.int16)),
        [r"f\.nii\.gz: 'fixed' intensities span \[0, 3000\]"],
    ),
    "negative": (dict(moving=(disc(4.0) - 0.5).astype(np.float32)), [r"m\.nii\.gz: 'moving' intensities span \[-0\.5"]),
    "nan": (dict(fixed=np.where(disc(2.0) > 0, np.nan, 0.5).astype(np.float32)), [r"f\.nii\.gz: 'fixed' contains NaN"]),
    "label_minus_3": (
        dict(moving_label=(disc(4.0) * -3).astype(np.int16)),
        [r"ml\.nii\.gz: 'moving_label' has values outside the label set \[0, 1, 2, 3\]: -3"],
    ),
    "origin_50mm": (
        dict(m_aff=_moved(lambda a: a.__setitem__((0, 3), a[0, 3] + 50.0))),
        [r"m\.nii\.gz: 'moving' is not on the grid of 'fixed' .*f\.nii\.gz", r"offset \[50\.0"],
    ),
    "flipped": (
        dict(m_aff=_moved(lambda a: a.__setitem__((0, 0), -a[0, 0]))),
        [r"m\.nii\.gz: 'moving' is not on the grid of 'fixed'", "direction"],
    ),
}


@pytest.mark.parametrize("case", sorted(XF_CASES))
def test_paired_transforms_contract(tmp_path, case):
    kwargs, patterns = XF_CASES[case]
    item = _pair(tmp_path, **kwargs)
    before = snapshot(tmp_path)
    raises_named(lambda: paired_transforms(spatial_size=(16, 16))(item), Exception, *patterns)
    assert_untouched(before, tmp_path)


def test_paired_transforms_percentile_accepts_raw_range(tmp_path):
    """Documented handling: the same ×1e6 pair is scaled to [0, 1] with intensity: percentile."""
    item = _pair(tmp_path, moving=(0.2 + 0.6 * disc(4.0)).astype(np.float32) * 1e6)
    d = paired_transforms(spatial_size=(16, 16), intensity="percentile")(item)
    assert float(d["moving"].min()) == 0.0 and float(d["moving"].max()) == 1.0


@pytest.mark.parametrize("case", ["truncated", "zero_bytes"])
def test_paired_transforms_unreadable_file(tmp_path, case):
    item = _pair(tmp_path)
    p = Path(item["fixed"])
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2] if case == "truncated" else b"")
    why = "truncated or its compression is corrupt" if case == "truncated" else r"empty \(0 bytes\)"
    raises_named(
        lambda: paired_transforms(spatial_size=(16, 16))(item),
        Exception,
        rf"f\.nii\.gz: cannot read the 'fixed' file: .*{why}",
    )


def _parser(files, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(override)
    parser.parse()
    return parser


def test_training_dataset_in_process(area):
    """train.yaml's own data path (CacheDataset + preprocessing) on a datalist with a raw int16 image."""
    tmp, csv_path, _ = area
    out = build_pairs(csv_path, tmp / "data", split=(0.6, 0.2, 0.2), seed=0).parent
    raw = csv_path.parent / load_datalist(out, "training")[0]["fixed"].split("/")[-1]
    save(raw, (disc(5.0) * 3000).astype(np.int16))
    before = snapshot(tmp)
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train.yaml"),
        workflow_type="train",
        run_id="training",
        dataset_dir=str(out),
        phantom=None,
        spatial_size=[16, 16],
        output_dir=str(tmp / "run"),
        num_workers=0,
    )
    wf.initialize()
    raises_named(wf.run, Exception, rf"{raw.name}: 'fixed' intensities span \[0, 3000\]", r"--intensity percentile")
    # no TensorBoard event file, no checkpoint: only the run folder's own record and lock (scripts/run_folder.py)
    assert {p.name for p in (tmp / "run").rglob("*")} <= {".lock", "run_settings.json"}
    parser = _parser(
        ["train.yaml"],
        dataset_dir=str(out),
        phantom=None,
        spatial_size=[16, 16],
        output_dir=str(tmp / "run"),
        num_workers=0,
        intensity="percentile",
    )
    assert len(parser.get_parsed_content("train#dataset")) == 1  # documented handling: percentile scaling
    assert_untouched(before, tmp, tmp / "run")


def test_evaluation_dataset_in_process(area):
    tmp, csv_path, _ = area
    out = build_pairs(csv_path, tmp / "data", split="test").parent
    lab = csv_path.parent / "c2_moving_label.nii.gz"
    save(lab, (disc(4.0) * 253).astype(np.uint8))
    before = snapshot(tmp)
    parser = _parser(
        ["train.yaml", "evaluate.yaml"],
        dataset_dir=str(out),
        phantom=None,
        spatial_size=[16, 16],
        output_dir=str(tmp / "run"),
        intensity="percentile",
    )
    ds = parser.get_parsed_content("evaluate#dataset")
    assert "failed" not in ds[0]
    # default: the bad pair becomes a failed item naming the file (the others are evaluated, the run then errors)
    bad = ds[2]
    assert set(bad) == {"id", "failed"} and bad["id"] == "case2"
    msg = r"^DataError: .*c2_moving_label\.nii\.gz: 'moving_label' has values outside .*: 253"
    assert re.search(msg, bad["failed"]), bad["failed"]
    # eval_fail_fast: the same message, raised at once
    parser["eval_fail_fast"] = True
    ds = parser.get_parsed_content("evaluate#dataset", lazy=False)
    raises_named(lambda: ds[2], Exception, r"c2_moving_label\.nii\.gz: 'moving_label' has values outside .*: 253")
    assert_untouched(before, tmp)


# ------------------------------------------------------------------------------------------------------------ options
BAD_OPTIONS = {
    "learning_rate": ("nan", "learning_rate must be a finite number > 0, got 'nan'"),
    "variance_learning_rate": (0.0, "variance_learning_rate must be a finite number > 0, got 0.0"),
    "gamma": (-1.0, "gamma must be a finite number >= 0, got -1.0"),
    "beta": (2.0, r"beta must be a finite number in \[0, 1\], got 2.0"),
    "lambda_reg": (float("inf"), "lambda_reg must be a finite number >= 0, got inf"),
    "max_epochs": (0, "max_epochs must be an integer >= 1, got 0"),
    "epoch_length": (2.5, "epoch_length must be an integer >= 1 or null, got 2.5"),
    "batch_size": ("4", "batch_size must be an integer >= 1, got '4'"),
    "val_interval": (0, "val_interval must be an integer >= 1, got 0"),
    "num_workers": (-1, "num_workers must be an integer >= 0, got -1"),
    "seed": (-5, r"seed must be an integer in \[0, 4294967295\], got -5"),
    "spatial_size": ([0, 64], "spatial_size must be a list of 2 or 3 integers >= 1, got \\[0, 64\\]"),
    "cache_rate": (1.5, r"cache_rate must be a finite number in \[0, 1\], got 1.5"),
    "mode": ("collab", "mode must be one of"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_training_option(name, tmp_path):
    """The config's first step refuses the value before any folder or TensorBoard event file is written."""
    from monai.bundle import ConfigWorkflow

    value, match = BAD_OPTIONS[name]
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train.yaml"),
        workflow_type="train",
        output_dir=str(tmp_path / "run"),
        dataset_dir=str(tmp_path / "data"),
        **{name: value},
    )
    raises_named(wf.initialize, RuntimeError, match)
    assert not any(tmp_path.iterdir())  # no run folder, no phantom, no event file


def test_yaml_exponent_string_hint():
    raises_named(
        lambda: validate_options({"learning_rate": "1e-4"}),
        ConfigError,
        r"learning_rate must be a finite number > 0, got '1e-4' \(a string: .* write 1\.0e-4",
    )


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1, got 0"),
        ("eval_spacing", [0.0, 1.0], "eval_spacing must be null or a list of 2 or 3 finite numbers > 0"),
        ("sparsification_steps", "many", "sparsification_steps must be an integer >= 1, got 'many'"),
    ],
    ids=["eval_batch_size", "eval_spacing", "sparsification_steps"],
)
def test_evaluation_option(name, value, match, tmp_path):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(ROOT / "configs" / f) for f in ("train.yaml", "evaluate.yaml")],
        workflow_type="infer",
        run_id="evaluating",
        output_dir=str(tmp_path / "run"),
        dataset_dir=str(tmp_path / "data"),
        **{name: value},
    )
    raises_named(wf.initialize, RuntimeError, match)
    assert not any(tmp_path.iterdir())


def test_every_numeric_option_of_train_yaml_has_a_rule():
    parser = _parser(["train.yaml", "evaluate.yaml"])
    checked = {**parser.get_parsed_content("checked_options"), **parser.get_parsed_content("extra_checked_options")}
    plain = {k for k, v in parser.get().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert plain <= set(checked), plain - set(checked)
    assert set(checked) <= set(RULES), set(checked) - set(RULES)  # every checked option has its own rule
    assert validate_options(checked)


# --------------------------------------------------------------------------------------------- command line (2 slow)
@pytest.mark.slow
def test_cli_datalist_out_is_the_input_folder(area):
    tmp, csv_path, before = area
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bundle",
            "datalist",
            "--dataset",
            "pairs",
            "--root",
            str(csv_path),
            "--out",
            str(csv_path.parent),
            "--overwrite",
            "True",
            "--split",
            "test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "contains the input" in proc.stdout + proc.stderr
    assert_untouched(before, tmp)


@pytest.mark.slow
def test_cli_training_learning_rate_nan(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            "configs/train.yaml",
            "--learning_rate",
            "nan",
            "--output_dir",
            str(tmp_path / "run"),
            "--dataset_dir",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "learning_rate must be a finite number > 0, got 'nan'" in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())  # no run folder, no TensorBoard event file
