"""Bad inputs against inference (issue 12): each case asserts a clear message naming the file or option (or the
documented handling), that no input file changed and that nothing appeared outside the output folder.

Tiny 32x32 images and an untrained network built once (in-process, no subprocess)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data import DataError
from scripts.data.contracts import MARKER_NAME
from scripts.inference import INDEX_NAME, InferenceFailures, RegistrationInferer, make_pairs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference.yaml"
SHAPE = (32, 32)


@pytest.fixture(scope="module")
def nets():
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return net, parser.get_parsed_content("variance_def"), parser.get_parsed_content("sim_loss").weight_map


def inferer(nets, **kw) -> RegistrationInferer:
    net, var, wfn = nets
    return RegistrationInferer(net, SHAPE, variance_network=var, weight_fn=wfn, progress=False, **kw)


def _img(seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    r = np.sqrt((y - shift) ** 2 + x**2)
    img = np.exp(-(((r - 0.5) / 0.15) ** 2)) + 0.05 * rng.random(SHAPE)
    return (img / img.max()).astype(np.float32)


def _lab(shift: float = 0.0) -> np.ndarray:
    y, x = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    r = np.sqrt((y - shift) ** 2 + x**2)
    return (((r > 0.35) & (r < 0.65)) * 2 + (r <= 0.35)).astype(np.uint8)


AFF = np.diag([1.5, 1.5, 1.0, 1.0])
AFF[:3, 3] = [10.0, -20.0, 5.0]


def save(path: Path, arr, affine=AFF) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


class Sandbox:
    """``root/inputs`` holds the inputs, ``root/out`` is the output folder; ``root`` is listed and every input
    hashed before the case, and checked after it."""

    def __init__(self, tmp: Path):
        self.root = tmp / "work"
        self.inputs = self.root / "inputs"
        self.out = self.root / "out"
        self.inputs.mkdir(parents=True)
        self.moving = save(self.inputs / "m.nii.gz", _img(1))
        self.fixed = save(self.inputs / "f.nii.gz", _img(2, 0.1))
        self.moving_label = save(self.inputs / "ml.nii.gz", _lab())
        self.fixed_label = save(self.inputs / "fl.nii.gz", _lab(0.1))

    def snapshot(self) -> None:
        self.before = self._hashes(self.inputs)
        self.listing = sorted(p.name for p in self.root.iterdir())
        self.parent_listing = sorted(p.name for p in self.root.parent.iterdir())

    @staticmethod
    def _hashes(folder: Path) -> dict:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    def check(self) -> None:
        assert self._hashes(self.inputs) == self.before, "an input file changed or appeared"
        assert sorted(set(p.name for p in self.root.iterdir()) - {"out"}) == [n for n in self.listing if n != "out"]
        assert sorted(p.name for p in self.root.parent.iterdir()) == self.parent_listing


@pytest.fixture
def box(tmp_path):
    b = Sandbox(tmp_path)
    yield b
    b.check()


def pair(box, **kw):
    args = {"moving": box.moving, "fixed": box.fixed}
    args.update(kw)
    return make_pairs(**args)


def run_raises(box, nets, pairs, exc, match, **kw):
    box.snapshot()
    with pytest.raises(exc, match=match):
        inferer(nets, **kw).run(pairs, box.out)


# --------------------------------------------------------------------------------------------------- intensities
@pytest.mark.parametrize(
    "name,arr",
    [
        ("x1e6", _img(1) * 1e6),
        ("int16", np.rint(_img(1) * 3000).astype(np.int16)),
        ("negative", _img(1) - 0.5),
    ],
)
def test_intensity_out_of_range_refused(box, nets, name, arr):
    bad = save(box.inputs / f"{name}.nii.gz", arr)
    run_raises(
        box,
        nets,
        pair(box, moving=bad),
        DataError,
        rf"{name}.nii.gz: 'moving' intensities span .*\(stored as {'int16' if name == 'int16' else 'float'}.*"
        "--intensity percentile",
    )
    assert not list(box.out.glob("*_ddf.nii.gz"))


def test_intensity_percentile_is_the_documented_handling(box, nets):
    """×1e6 with --intensity percentile gives the DDF of the [0, 1] image (percentile scaling is scale-invariant)."""
    big = save(box.inputs / "big.nii.gz", _img(1) * 1e6)
    box.snapshot()
    inf = inferer(nets, intensity="percentile")
    a = inf.infer(pair(box)[0])["ddf"]
    b = inf.infer(pair(box, moving=big)[0])["ddf"]
    assert float(a.abs().max()) > 1e-4
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "what,arr,match",
    [
        ("nan", None, "NaN or Inf"),
        ("const", np.full(SHAPE, 0.5, np.float32), "constant image"),
    ],
)
def test_nan_and_constant_images(box, nets, what, arr, match):
    if arr is None:
        arr = _img(1)
        arr[3, 4] = np.nan
    bad = save(box.inputs / f"{what}.nii.gz", arr)
    run_raises(box, nets, pair(box, fixed=bad), DataError, rf"{what}.nii.gz: 'fixed' .*{match}")


# -------------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("value,match", [(-3, r"-3 \(1 voxels\)"), (4, r"4 \(1 voxels\)"), (1.5, "non-integer")])
def test_labels_outside_the_label_set(box, nets, value, match):
    lab = _lab().astype(np.float32 if value == 1.5 else np.int16)
    lab[0, 0] = value
    bad = save(box.inputs / "badlab.nii.gz", lab)
    run_raises(box, nets, pair(box, moving_label=bad), DataError, rf"badlab.nii.gz: 'moving_label' .*{match}")


def test_warped_label_never_wraps(box, nets):
    """Valid labels come back as uint8 with the same value set (no 253 from a wrapped cast)."""
    box.snapshot()
    inferer(nets).run(pair(box, moving_label=box.moving_label, pair_id="c"), box.out)
    vals = set(np.unique(nib.load(str(box.out / "c_warped_label.nii.gz")).get_fdata()).tolist())
    assert vals <= {0.0, 1.0, 2.0} and 2.0 in vals


# ------------------------------------------------------------------------------------------------------ geometry
def _moved_affine(kind: str) -> np.ndarray:
    a = AFF.copy()
    if kind == "origin":
        a[0, 3] += 50.0
    elif kind == "flip":
        a[1, 1] = -a[1, 1]
    elif kind == "spacing":
        a[0, 0] = 2.0
    return a


@pytest.mark.parametrize(
    "kind,match", [("origin", r"origin .*offset \[50.0"), ("flip", "direction"), ("spacing", "spacing")]
)
def test_grid_mismatch_is_an_error(box, nets, kind, match):
    bad = save(box.inputs / f"{kind}.nii.gz", _img(1), _moved_affine(kind))
    run_raises(
        box,
        nets,
        pair(box, moving=bad),
        DataError,
        rf"{kind}.nii.gz: 'moving' is not on the grid of 'fixed' .*f.nii.gz .*{match}.*--on_grid_mismatch resample",
    )


@pytest.mark.parametrize("kind", ["origin", "flip"])
def test_grid_mismatch_resampled_on_request_is_not_the_same_output(box, nets, kind, caplog):
    bad = save(box.inputs / f"{kind}.nii.gz", _img(1), _moved_affine(kind))
    box.snapshot()
    inf = inferer(nets, on_grid_mismatch="resample")
    with caplog.at_level(logging.WARNING):
        moved = inf.infer(pair(box, moving=bad)[0])
    assert f"{kind}.nii.gz" in caplog.text and "resampling" in caplog.text
    ok = inf.infer(pair(box)[0])
    assert float((moved["warped"] - ok["warped"]).abs().max()) > 0.1


def test_fixed_label_must_be_on_the_fixed_grid(box, nets):
    bad = save(box.inputs / "flshift.nii.gz", _lab(0.1), _moved_affine("origin"))
    run_raises(
        box,
        nets,
        pair(box, fixed_label=bad),
        DataError,
        r"flshift.nii.gz: 'fixed_label' .*Resample it onto",
        on_grid_mismatch="resample",
    )


def test_wrong_dimensionality(box, nets):
    bad = save(box.inputs / "vol.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    run_raises(box, nets, pair(box, moving=bad), DataError, r"vol.nii.gz: 'moving' has 3 spatial dims")


# --------------------------------------------------------------------------------------------- unreadable files
def test_truncated_gzip(box, nets):
    data = Path(box.moving).read_bytes()
    bad = box.inputs / "trunc.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    run_raises(
        box, nets, pair(box, moving=str(bad)), DataError, r"trunc.nii.gz: cannot read the 'moving' image: .*truncated"
    )


def test_zero_byte_file(box, nets):
    bad = box.inputs / "empty.nii.gz"
    bad.write_bytes(b"")
    run_raises(box, nets, pair(box, fixed=str(bad)), DataError, r"empty.nii.gz: cannot read the 'fixed' image: .*empty")


def test_not_an_image(box, nets):
    bad = box.inputs / "text.nii.gz"
    bad.write_bytes(gzip.compress(b"hello, not a NIfTI header" * 20))
    run_raises(box, nets, pair(box, moving=str(bad)), DataError, r"text.nii.gz: cannot read the 'moving' image")


def test_missing_file(box, nets):
    run_raises(box, nets, pair(box, moving=str(box.inputs / "nope.nii.gz")), FileNotFoundError, "nope.nii.gz")


# --------------------------------------------------------------------------------------------- ids and folders
def test_pair_id_with_parent_parts_stays_inside(box, nets):
    box.snapshot()
    inferer(nets).run(pair(box, pair_id="../x"), box.out)
    assert (box.out / "x_ddf.nii.gz").is_file()
    assert not list(box.root.glob("x_*")) and not list(box.root.parent.glob("x_*"))


def test_datalist_ids_with_path_parts_stay_inside(box, nets):
    items = [
        {"moving": "m.nii.gz", "fixed": "f.nii.gz", "id": "../../evil"},
        {"moving": "m.nii.gz", "fixed": "f.nii.gz", "id": "a/b"},
        {"moving": "m.nii.gz", "fixed": "f.nii.gz", "id": "/abs/c"},
    ]
    (box.inputs / "pairs.json").write_text(json.dumps(items))
    box.snapshot()
    recs = inferer(nets).run(make_pairs(datalist=str(box.inputs / "pairs.json")), box.out)
    assert [r["id"] for r in recs] == ["evil", "a_b", "abs_c"]
    assert all(Path(f).parent == box.out.resolve() for r in recs for f in r["outputs"].values())


def test_pair_id_without_a_name_is_refused(box, nets):
    box.snapshot()
    with pytest.raises(DataError, match=r"pair id '\.\./\.\.': not usable as a file name"):
        pair(box, pair_id="../..")


@pytest.mark.parametrize("where", ["inputs", "root", "file"])
def test_output_dir_that_is_or_holds_an_input(box, nets, where):
    out = {"inputs": box.inputs, "root": box.root, "file": Path(box.moving)}[where]
    box.snapshot()
    with pytest.raises(DataError, match=r"--output_dir .*(contains the input|is the input|not a folder)"):
        inferer(nets).run(pair(box), out)


def test_datalist_folder_is_an_input(box, nets):
    lists = box.inputs / "lists"
    lists.mkdir()
    (lists / "pairs.json").write_text(json.dumps([{"moving": box.moving, "fixed": box.fixed, "id": "p"}]))
    box.snapshot()
    with pytest.raises(DataError, match="contains the input .*pairs.json"):
        # the datalist sits in the output folder: refused although the images are elsewhere (absolute paths)
        inferer(nets).run(make_pairs(datalist=str(lists / "pairs.json")), lists)


def test_second_run_same_ids_refused_then_overwrite(box, nets):
    box.snapshot()
    inf = inferer(nets)
    inf.run(pair(box, pair_id="p"), box.out)
    first = Sandbox._hashes(box.out)
    (box.out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"already holds p_ddf.nii.gz.*--overwrite true"):
        inf.run(pair(box, pair_id="p"), box.out)
    assert {k: v for k, v in Sandbox._hashes(box.out).items() if k != "notes.txt"} == first
    inf.run(pair(box, pair_id="p"), box.out, overwrite=True)
    assert (box.out / "notes.txt").read_text() == "mine" and (box.out / "p_ddf.nii.gz").is_file()


def test_other_ids_extend_the_index(box, nets):
    box.snapshot()
    inf = inferer(nets)
    inf.run(pair(box, pair_id="p"), box.out)
    inf.run(pair(box, pair_id="q"), box.out)
    index = json.loads((box.out / INDEX_NAME).read_text())
    assert [r["id"] for r in index["pairs"]] == ["p", "q"]
    assert "p_ddf.nii.gz" in json.loads((box.out / MARKER_NAME).read_text())["files"]


def test_overwrite_never_deletes_a_user_file(box, nets):
    box.out.mkdir()
    (box.out / "p_ddf.nii.gz").write_text("a user's file with an output's name")
    box.snapshot()
    with pytest.raises(DataError, match=r"p_ddf.nii.gz were not written by the bundle"):
        inferer(nets).run(pair(box, pair_id="p"), box.out, overwrite=True)
    assert (box.out / "p_ddf.nii.gz").read_text().startswith("a user's")


def test_foreign_index_refused(box, nets):
    box.out.mkdir()
    (box.out / INDEX_NAME).write_text("{}")
    box.snapshot()
    with pytest.raises(DataError, match=rf"holds an {INDEX_NAME} the bundle did not write"):
        inferer(nets).run(pair(box, pair_id="p"), box.out)
    assert (box.out / INDEX_NAME).read_text() == "{}"


# ------------------------------------------------------------------------------------------------- multi-pair runs
def _three(box, bad: str):
    items = [
        {"moving": box.moving, "fixed": box.fixed, "id": "a"},
        {"moving": bad, "fixed": box.fixed, "id": "b"},
        {"moving": box.moving, "fixed": box.fixed, "id": "c"},
    ]
    (box.inputs / "pairs.json").write_text(json.dumps(items))
    return make_pairs(datalist=str(box.inputs / "pairs.json"))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_one_bad_pair_neither_stops_nor_hides_the_others(box, nets, batch_size):
    bad = save(box.inputs / "neg.nii.gz", _img(1) - 0.5)
    pairs = _three(box, bad)
    box.snapshot()
    with pytest.raises(InferenceFailures, match=r"1 of 3 pairs failed \(b\).*neg.nii.gz"):
        inferer(nets, batch_size=batch_size).run(pairs, box.out)
    index = {r["id"]: r for r in json.loads((box.out / INDEX_NAME).read_text())["pairs"]}
    assert index["a"]["status"] == index["c"]["status"] == "done"
    assert index["b"]["status"] == "failed" and "neg.nii.gz" in index["b"]["error"]
    assert (box.out / "a_ddf.nii.gz").is_file() and (box.out / "c_ddf.nii.gz").is_file()
    assert not list(box.out.glob("b_*"))


def test_fail_fast_stops_at_the_bad_pair(box, nets):
    pairs = _three(box, str(box.inputs / "missing.nii.gz"))
    box.snapshot()
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        inferer(nets, fail_fast="true").run(pairs, box.out)
    index = json.loads((box.out / INDEX_NAME).read_text())["pairs"]
    assert [(r["id"], r["status"]) for r in index] == [("a", "done"), ("b", "failed")]
    assert not (box.out / "c_ddf.nii.gz").exists()


# --------------------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "option,value",
    [
        ("intensity", "zscore"),
        ("on_grid_mismatch", "warn"),
        ("orientation", "LPS"),
        ("batch_size", 0),
        ("batch_size", "two"),
        ("threads", -1),
        ("overlay", "maybe"),
        ("overwrite", "yes please"),
        ("geometry_tol", 2.0),
    ],
)
def test_bad_option_values_name_the_option(box, nets, option, value):
    box.snapshot()
    with pytest.raises(ValueError, match=rf"--{option}"):
        inferer(nets, **{option: value})


def test_bad_datalists(box, nets):
    (box.inputs / "broken.json").write_text("[{")
    (box.inputs / "notpath.json").write_text(json.dumps([{"moving": 3, "fixed": "f.nii.gz"}]))
    box.snapshot()
    with pytest.raises(DataError, match="broken.json: --datalist is not valid JSON"):
        make_pairs(datalist=str(box.inputs / "broken.json"))
    with pytest.raises(DataError, match=r"notpath.json: item 0 'moving' must be a path"):
        make_pairs(datalist=str(box.inputs / "notpath.json"))
    with pytest.raises(FileNotFoundError, match="--datalist .*nothere.json"):
        make_pairs(datalist=str(box.inputs / "nothere.json"))


# ------------------------------------------------------------------------------------------------- orientation
def test_canonical_orientation_writes_back_in_the_input_frame(box, nets):
    """The same anatomy stored with axis 0 flipped (affine flipped accordingly): with orientation canonical the DDF
    is the flipped DDF of the plain storage with channel 0 negated; with orientation none it is not."""
    flip = AFF.copy()
    flip[0, 0] = -AFF[0, 0]
    flip[0, 3] = AFF[0, 3] + AFF[0, 0] * (SHAPE[0] - 1)
    fm = save(box.inputs / "fm.nii.gz", _img(1)[::-1].copy(), flip)
    ff = save(box.inputs / "ff.nii.gz", _img(2, 0.1)[::-1].copy(), flip)
    box.snapshot()
    for orientation, same in (("canonical", True), ("none", False)):
        inf = inferer(nets, orientation=orientation)
        a = inf.infer(pair(box)[0])["ddf"]
        b = inf.infer(make_pairs(moving=fm, fixed=ff)[0])["ddf"]
        expected = torch.stack([-a[0].flip(0), a[1].flip(0)])
        err = float((b - expected).abs().max())
        assert (err < 1e-6) == same, (orientation, err, float(a.abs().max()))


# ------------------------------------------------------------------------------- contracts shared with the builders
def test_marker_never_removes_outside_or_unlisted(tmp_path):
    """A crafted marker entry pointing outside the folder is ignored; only listed files inside are removed."""
    from scripts.data.contracts import prepare_output_dir, record_written, remove_written

    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    prepare_output_dir(out)
    (out / "ours.nii.gz").write_text("x")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("x")
    (out / "theirs.txt").write_text("user")
    record_written(out, [out / "ours.nii.gz", "sub/deep.txt"])
    with pytest.raises(DataError, match="not inside the output folder"):
        record_written(out, [victim])
    marker = json.loads((out / MARKER_NAME).read_text())
    marker["files"] += ["../victim.txt", str(victim)]
    (out / MARKER_NAME).write_text(json.dumps(marker))
    removed = remove_written(out)
    assert sorted(removed) == ["ours.nii.gz", "sub/deep.txt"]
    assert victim.read_text() == "keep" and (out / "theirs.txt").read_text() == "user" and not (out / "sub").exists()


def test_prepare_output_dir_whole_folder_mode(tmp_path, caplog):
    """``planned=None`` (a builder's output): any existing entry is a clash; ``overwrite`` removes the bundle's files
    and keeps (and names) the user's."""
    from scripts.data.contracts import prepare_output_dir, record_written

    out = tmp_path / "ds"
    prepare_output_dir(out)
    (out / "datalist.json").write_text("{}")
    (out / "readme.txt").write_text("mine")
    record_written(out, ["datalist.json"], tool="datalist")
    with pytest.raises(DataError, match=r"already holds datalist.json, readme.txt.*--overwrite true"):
        prepare_output_dir(out)
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(out, overwrite=True)
    assert not (out / "datalist.json").exists() and (out / "readme.txt").read_text() == "mine"
    assert "readme.txt" in caplog.text


def test_safe_label_cast_and_ids():
    from scripts.data.contracts import safe_id, safe_label_cast

    np.testing.assert_array_equal(safe_label_cast(np.array([0.0, 1.0, 3.0]), "l.nii.gz"), [0, 1, 3])
    with pytest.raises(DataError, match=r"l.nii.gz: label values \[-3, 1\] do not fit uint8"):
        safe_label_cast(np.array([-3.0, 1.0]), "l.nii.gz", allowed=None)
    assert [safe_id(x) for x in ("..\\x", "C:/a", "a..b", "ok-1.v2")] == ["x", "C_a", "a_b", "ok-1.v2"]
