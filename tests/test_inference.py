"""configs/inference.yaml + scripts/inference.py: outputs in the input space, resizing, 2D/3D, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data import DataError
from scripts.inference import OUTPUT_SUFFIXES, RegistrationInferer, make_pairs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference.yaml"
NET = [32, 32]


def _affine(spacing, origin=(3.0, -7.0, 11.0)):
    a = np.eye(4)
    for i, s in enumerate(spacing):
        a[i, i] = s
    a[:3, 3] = origin
    return a


def _rings(shape, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt((axes[0] - shift) ** 2 + sum(a**2 for a in axes[1:]))
    img = np.exp(-(((r - 0.5) / 0.15) ** 2)) + 0.05 * rng.random(shape)
    lab = ((r > 0.35) & (r < 0.65)).astype(np.uint8) * 2 + (r <= 0.35).astype(np.uint8)
    return (img / img.max()).astype(np.float32), lab


def write_pair(folder: Path, name: str, shape, spacing=None, moving_spacing=None, labels=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spacing = spacing or [1.25] * len(shape)
    m, lm = _rings(shape, 0.0, 1)
    f, lf = _rings(shape, 0.08, 2)
    item = {"id": name}
    for key, arr, sp in (
        ("moving", m, moving_spacing or spacing),
        ("fixed", f, spacing),
        ("moving_label", lm, moving_spacing or spacing),
        ("fixed_label", lf, spacing),
    ):
        if "label" in key and not labels:
            continue
        p = folder / f"{name}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr, _affine(sp)), str(p))
        item[key] = str(p)
    return item


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Fresh (untrained) weights for the 2D and 3D networks of inference.yaml: no shipped weights needed."""
    d = tmp_path_factory.mktemp("weights")
    out = {}
    for nd in (2, 3):
        parser = ConfigParser()
        parser.read_config(str(CONFIG))
        parser["spatial_dims"] = nd
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def")
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
        torch.save(net.state_dict(), d / f"model{nd}.pt")
        torch.save(parser.get_parsed_content("variance_def").state_dict(), d / f"variance{nd}.pt")
        out[nd] = (str(d / f"model{nd}.pt"), str(d / f"variance{nd}.pt"))
    return out


def make_inferer(weights, nd=2, spatial_size=NET, **override) -> RegistrationInferer:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(
        {
            "bundle_root": str(ROOT),
            "spatial_dims": nd,
            "spatial_size": list(spatial_size),
            "ckpt_path": weights[nd][0],
            "variance_ckpt_path": weights[nd][1],
            "device": "$torch.device('cpu')",
            "overlay": False,
            **override,
        }
    )
    return parser.get_parsed_content("inferer")


def _check_outputs(out: Path, item: dict, nd: int, uncertainty: bool, labels: bool = True):
    ref = nib.load(item["fixed"])
    expect = ["ddf", "warped"] + (["warped_label"] if labels else []) + (["sigma2", "weight"] if uncertainty else [])
    for k in expect:
        img = nib.load(str(out / f"{item['id']}{OUTPUT_SUFFIXES[k]}"))
        shape = ref.shape + ((nd,) if k == "ddf" else ())
        assert img.shape == shape, (k, img.shape, shape)
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        np.testing.assert_allclose(img.header.get_zooms()[: len(ref.shape)], ref.header.get_zooms(), rtol=1e-5)
        assert np.isfinite(img.get_fdata()).all()
    if labels:
        assert set(np.unique(nib.load(str(out / f"{item['id']}_warped_label.nii.gz")).get_fdata())) <= {0, 1, 2, 3}
    if uncertainty:
        assert nib.load(str(out / f"{item['id']}_sigma2.nii.gz")).get_fdata().min() > 0
        w = nib.load(str(out / f"{item['id']}_weight.nii.gz")).get_fdata()
        assert w.min() >= 0.5 - 1e-6 and w.max() <= 1.0


@pytest.mark.slow
def test_cli_2d_all_outputs(tmp_path, weights):
    """The documented command line: every output, with the input's affine and shape, plus the PNG overlay (opt-in)."""
    item = write_pair(tmp_path / "in", "case", (32, 32), spacing=[1.5, 0.9])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIG),
        "--bundle_root",
        str(ROOT),
        "--moving",
        item["moving"],
        "--fixed",
        item["fixed"],
        "--moving_label",
        item["moving_label"],
        "--fixed_label",
        item["fixed_label"],
        "--pair_id",
        "case",
        "--output_dir",
        str(out),
        "--uncertainty",
        "true",
        "--ckpt_path",
        weights[2][0],
        "--variance_ckpt_path",
        weights[2][1],
        "--spatial_size",
        "[32,32]",
        "--device",
        "$torch.device('cpu')",
        "--overlay",
        "true",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_outputs(out, item, 2, uncertainty=True)
    assert (out / "case_overlay.png").stat().st_size > 1000
    summary = json.loads((out / "inference.json").read_text())
    assert summary["pairs"][0]["id"] == "case" and not summary["pairs"][0]["resized"]


def test_resized_input_comes_back_at_its_size(tmp_path, weights):
    item = write_pair(tmp_path, "big", (40, 36), spacing=[1.1, 1.3])
    inferer = make_inferer(weights, uncertainty=True)
    rec = inferer.run(
        make_pairs(**{k: item[k] for k in ("moving", "fixed", "moving_label", "fixed_label")}, pair_id="big"),
        tmp_path / "out",
    )
    assert rec[0]["resized"] and rec[0]["input_size"] == [40, 36] and rec[0]["network_size"] == NET
    _check_outputs(tmp_path / "out", item, 2, uncertainty=True)


class _ConstantDDF(torch.nn.Module):
    """A 'network' whose DDF is a constant translation on its own grid."""

    def __init__(self, shift):
        super().__init__()
        self.shift = torch.tensor(shift, dtype=torch.float32)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        nd = x.ndim - 2
        return self.shift.view(1, nd, *([1] * nd)).expand(x.shape[0], nd, *x.shape[2:]).clone()


def test_ddf_values_rescaled_per_axis(tmp_path):
    """A displacement of s voxels of the network grid is s * input_i / network_i voxels of the input grid, and the
    warp with the rescaled DDF is the same translation in world units."""
    item = write_pair(tmp_path, "p", (64, 48), labels=False)
    inferer = RegistrationInferer(_ConstantDDF([2.0, -1.0]), spatial_size=(32, 32), overlay=False)
    res = inferer.infer(make_pairs(moving=item["moving"], fixed=item["fixed"])[0])
    ddf = res["ddf"].numpy()
    assert ddf.shape == (2, 64, 48)
    np.testing.assert_allclose(ddf[0], 4.0, atol=1e-5)
    np.testing.assert_allclose(ddf[1], -1.5, atol=1e-5)
    moving = nib.load(item["moving"]).get_fdata()
    # warped(i, j) = moving(i + 4, j - 1.5): the mean of columns j - 2 and j - 1 (bilinear)
    expected = 0.5 * (moving[14:54, 8:38] + moving[14:54, 9:39])
    np.testing.assert_allclose(res["warped"][0].numpy()[10:50, 10:40], expected, atol=1e-5)


def test_3d_network(tmp_path, weights):
    item = write_pair(tmp_path, "vol", (16, 20, 16), spacing=[2.0, 1.5, 1.5])
    inferer = make_inferer(weights, nd=3, spatial_size=[16, 16, 16], uncertainty=True, overlay=True)
    rec = inferer.run(
        make_pairs(**{k: item[k] for k in ("moving", "fixed", "moving_label", "fixed_label")}, pair_id="vol"),
        tmp_path / "out",
    )
    assert rec[0]["resized"]
    _check_outputs(tmp_path / "out", item, 3, uncertainty=True)
    from matplotlib.image import imread

    png = imread(tmp_path / "out" / "vol_overlay.png")  # a readable RGB(A) figure with content, not a blank canvas
    assert png.ndim == 3 and png.shape[2] in (3, 4) and min(png.shape[:2]) > 100 and png[..., :3].std() > 0.05


def test_datalist_and_singleton_axis(tmp_path, weights):
    """Many pairs from a JSON list (relative paths, duplicate ids made unique); a 2D image stored as (H, W, 1)."""
    a = write_pair(tmp_path, "a", (32, 32), labels=False)
    b = write_pair(tmp_path, "b", (32, 32, 1), labels=False)
    pairs = [
        {"moving": Path(a["moving"]).name, "fixed": Path(a["fixed"]).name, "id": "x"},
        {"moving": Path(b["moving"]).name, "fixed": Path(b["fixed"]).name, "id": "x"},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    items = make_pairs(datalist=str(tmp_path / "pairs.json"))
    assert [i["id"] for i in items] == ["x", "x_1"]
    make_inferer(weights).run(items, tmp_path / "out")
    assert nib.load(str(tmp_path / "out" / "x_ddf.nii.gz")).shape == (32, 32, 2)
    assert nib.load(str(tmp_path / "out" / "x_1_ddf.nii.gz")).shape == (32, 32, 1, 2)
    assert nib.load(str(tmp_path / "out" / "x_1_warped.nii.gz")).shape == (32, 32, 1)


def _chain(e: BaseException) -> str:
    msgs = []
    while e is not None:
        msgs.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(msgs)


def test_bad_inputs(tmp_path, weights):
    inferer = make_inferer(weights)
    good = write_pair(tmp_path, "g", (32, 32), labels=False)
    # missing file
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        inferer.infer(make_pairs(moving=str(tmp_path / "nope.nii.gz"), fixed=good["fixed"])[0])
    # 3D image for the 2D network
    vol = write_pair(tmp_path, "v", (16, 16, 16), labels=False)
    with pytest.raises(DataError, match=r"v_moving.nii.gz.*3 spatial dims.*2D"):
        inferer.infer(make_pairs(moving=vol["moving"], fixed=vol["fixed"])[0])
    # different spacing: an error naming the file by default ...
    sp = write_pair(tmp_path, "s", (32, 32), spacing=[1.0, 1.0], moving_spacing=[1.0, 2.0], labels=False)
    with pytest.raises(DataError, match=r"s_moving.nii.gz.*spacing"):
        inferer.infer(make_pairs(moving=sp["moving"], fixed=sp["fixed"])[0])
    # ... or resampled onto the fixed grid on request
    res = make_inferer(weights, on_grid_mismatch="resample").infer(
        make_pairs(moving=sp["moving"], fixed=sp["fixed"])[0]
    )
    assert tuple(res["ddf"].shape) == (2, 32, 32)
    # different shape
    other = write_pair(tmp_path, "o", (32, 30), labels=False)
    with pytest.raises(DataError, match=r"o_moving.nii.gz.*shape"):
        inferer.infer(make_pairs(moving=other["moving"], fixed=good["fixed"])[0])
    # NaN voxels
    arr = nib.load(good["moving"]).get_fdata().astype(np.float32)
    arr[3, 4] = np.nan
    bad = tmp_path / "nan_moving.nii.gz"
    nib.save(nib.Nifti1Image(arr, nib.load(good["moving"]).affine), str(bad))
    with pytest.raises(DataError, match=r"nan_moving.nii.gz.*NaN"):
        inferer.infer(make_pairs(moving=str(bad), fixed=good["fixed"])[0])
    # no weights (the config wraps the error: the cause names the file)
    with pytest.raises(Exception) as ei:
        make_inferer({2: (str(tmp_path / "model.pt"), weights[2][1])})
    assert "weights for 'network' not found" in _chain(ei.value) and str(tmp_path / "model.pt") in _chain(ei.value)
    # 2D weights in a 3D network
    with pytest.raises(Exception) as ei:
        make_inferer({3: weights[2]}, nd=3, spatial_size=[16, 16, 16])
    assert "do not fit" in _chain(ei.value)
    # nothing to register
    with pytest.raises(ValueError, match="nothing to register"):
        make_pairs()


def test_monailabel_task_without_monailabel(tmp_path, weights):
    """The MONAI Label task class imports and runs without MONAI Label installed."""
    from scripts.monailabel_task import RegistrationInferTask

    item = write_pair(tmp_path, "ml", (32, 32))
    task = RegistrationInferTask(ROOT, ckpt_path=weights[2][0], variance_ckpt_path=weights[2][1], spatial_size=NET,
                                 server_paths=True, server_roots=[tmp_path])  # fmt: skip
    path, info = task(
        {
            "image": item["fixed"],
            "moving": item["moving"],
            "moving_label": item["moving_label"],
            "uncertainty": "true",
            "device": "cpu",
            "output_dir": str(tmp_path / "out"),
        }
    )
    assert path.endswith("_warped_label.nii.gz") and set(info["files"]) >= {"ddf", "warped", "sigma2", "weight"}
    assert nib.load(path).shape == (32, 32)


def test_batched_run_equals_one_by_one(tmp_path, weights):
    """--batch_size 2 writes the same DDFs, σ̂² and weight maps as one pair per forward (the weight map's
    normalisation stays per pair), and the index lists every pair as done."""
    items = []
    for i, shape in enumerate([(32, 32), (40, 36), (32, 32)]):
        it = write_pair(tmp_path / "in", f"p{i}", shape, labels=False)
        items.append({"moving": it["moving"], "fixed": it["fixed"], "id": f"p{i}"})
    (tmp_path / "in" / "pairs.json").write_text(json.dumps(items))
    pairs = make_pairs(datalist=str(tmp_path / "in" / "pairs.json"))
    threads = torch.get_num_threads()
    try:
        for b in (1, 2):
            make_inferer(weights, uncertainty=True, batch_size=b, threads=1).run(pairs, tmp_path / f"b{b}")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for i in range(3):
        for k in ("ddf", "sigma2", "weight"):
            a, b = (nib.load(str(tmp_path / f"b{n}" / f"p{i}{OUTPUT_SUFFIXES[k]}")).get_fdata() for n in (1, 2))
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"p{i} {k}")
    index = json.loads((tmp_path / "b2" / "inference.json").read_text())
    assert [(r["id"], r["status"]) for r in index["pairs"]] == [("p0", "done"), ("p1", "done"), ("p2", "done")]
    assert not list((tmp_path / "b2").glob("*_overlay.png"))  # overlays are opt-in


def test_instance_optimisation_option(tmp_path, weights):
    """--instance_steps 0 gives exactly the network's DDF; > 0 changes it (scripts.instance_optimisation)."""
    item = make_pairs(**{k: v for k, v in write_pair(tmp_path, "io", (32, 32), labels=False).items() if k != "id"})[0]
    base = make_inferer(weights).infer(item)["ddf"]
    zero = make_inferer(weights, instance_steps=0).infer(item)["ddf"]
    assert torch.equal(base, zero)
    opt = make_inferer(weights, instance_steps=2, instance_lr=1e-3).infer(item)["ddf"]
    assert opt.shape == base.shape and float((opt - base).abs().max()) > 1e-6
    with pytest.raises(Exception) as ei:  # the config parser wraps the ValueError
        make_inferer(weights, instance_steps=-1)
    assert "--instance_steps: expected a whole number >= 0, got -1" in _chain(ei.value)


def test_sigma_scale_once_and_qc_score_in_the_index(tmp_path, weights):
    """--sigma_scale (a number or variance_scale.json) multiplies σ̂² by s² exactly once and leaves the DDF alone;
    the index gives each pair the evaluation's qc_score (scripts.metrics.quality.qc_score on the network grid)."""
    from scripts.metrics import qc_score

    item = make_pairs(**{k: v for k, v in write_pair(tmp_path, "sc", (32, 32), labels=False).items() if k != "id"})[0]
    base = make_inferer(weights, uncertainty=True).infer(item)
    two = make_inferer(weights, uncertainty=True, sigma_scale=2.0).infer(item)
    (tmp_path / "variance_scale.json").write_text(json.dumps({"sigma_scale": 3.0, "variance_scale": 9.0}))
    three = make_inferer(weights, uncertainty=True, sigma_scale=str(tmp_path / "variance_scale.json")).infer(item)
    assert torch.equal(base["ddf"], two["ddf"]) and torch.equal(base["warped"], three["warped"])
    torch.testing.assert_close(two["sigma2"], 4.0 * base["sigma2"], rtol=1e-5, atol=0)  # s², not s nor s⁴
    torch.testing.assert_close(three["sigma2"], 9.0 * base["sigma2"], rtol=1e-5, atol=0)
    # qc_score: the mean inverse-consistency error of the network's forward and backward DDFs, as evaluated
    inf = make_inferer(weights, uncertainty=True, sigma_scale=2.0)
    prep = inf.prepare(item)
    m, f = prep["m_net"], prep["f_net"]
    with torch.no_grad():
        ddf, ddf_bw = inf.network(torch.cat([m, f], 1)), inf.network(torch.cat([f, m], 1))
        expect = float(qc_score(f, inf.warp(m, ddf), m, ddf, ddf_backward=ddf_bw)[0])
    assert expect > 0 and base["qc_score"] == pytest.approx(expect, rel=1e-5)
    inf.run([item], tmp_path / "out")
    rec = json.loads((tmp_path / "out" / "inference.json").read_text())["pairs"][0]
    assert rec["qc_score"] == pytest.approx(expect, rel=1e-5) and rec["sigma_scale"] == 2.0
    assert make_inferer(weights, qc_score=False).infer(item)["qc_score"] is None
    with pytest.raises(Exception) as ei:
        make_inferer(weights, uncertainty=True, sigma_scale=-1.0)
    assert "sigma scale must be a positive number" in _chain(ei.value)
