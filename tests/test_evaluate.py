"""End-to-end: `python -m monai.bundle run evaluating` with configs/train.yaml + configs/evaluate.yaml on a tiny
synthetic data set written per docs/CONTRACTS.md (with exact ground truth), untrained networks and precomputed
DDFs; plus the results writer and handlers in-process."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
SPACING = [1.5, 1.0]
N_TEST = 3


def _ring_label(size, cy, cx, r_in, r_out):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - cy, xx - cx)
    lab = np.zeros((size, size), np.uint8)
    lab[r < r_out] = 2
    lab[r < r_in] = 1
    return lab


def _warp_np(img, ddf, mode):
    from monai.networks.blocks import Warp

    w = Warp(mode=mode, padding_mode="border")
    return w(torch.as_tensor(img, dtype=torch.float32)[None, None], torch.as_tensor(ddf)[None])[0, 0].numpy()


def write_tiny_dataset(folder: Path, seed: int = 0) -> Path:
    """moving = ring image; gt DDF = smooth contraction; fixed label = nearest warp of the moving label by the gt
    DDF (so the gt DDF registers the labels exactly); fixed image = warped moving + heteroscedastic noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag(SPACING + [1.0, 1.0])
    items = []
    for i in range(N_TEST + 1):
        cy, cx = SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2)
        lab_m = _ring_label(SIZE, cy, cx, 5 + i % 2, 9 + i % 2)
        img_m = (0.2 + 0.6 * (lab_m == 2) + 0.3 * (lab_m == 1) + 0.05 * rng.random((SIZE, SIZE))).astype(np.float32)
        yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
        s = rng.uniform(0.08, 0.15)
        ddf = np.stack([s * (yy - cy), s * (xx - cx)]).astype(np.float32)  # phi(x) = x + s (x - c): the heart shrinks
        lab_f = np.rint(_warp_np(lab_m, ddf, "nearest")).astype(np.uint8)
        noise_std = (0.01 + 0.1 * yy / SIZE).astype(np.float32)  # depth-dependent noise
        img_f = np.clip(_warp_np(img_m, ddf, "bilinear") + noise_std * rng.normal(size=(SIZE, SIZE)), 0, 1)
        case = f"case{i:02d}"
        paths = {}
        for key, arr in (
            ("moving", img_m),
            ("fixed", img_f.astype(np.float32)),
            ("moving_label", lab_m),
            ("fixed_label", lab_f),
            ("noise_std", noise_std),
            ("ddf", np.moveaxis(ddf, 0, -1)),
        ):
            p = f"{case}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(arr, affine), str(folder / p))
            paths[key] = p
        items.append({"id": case, **paths, "spacing": SPACING})
    dl = {"training": items[:1], "validation": items[:1], "test": items[1:]}
    (folder / "datalist.json").write_text(json.dumps(dl, indent=1))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--config_file",
        "['configs/train.yaml','configs/evaluate.yaml']",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _common(data: Path, out: Path):
    return [
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--spatial_size",
        f"[{SIZE},{SIZE}]",
        "--num_workers",
        "0",
        "--n_panels",
        "1",
        "--sparsification_steps",
        "10",
    ]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _save_untrained(out: Path):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(ROOT / "configs" / "train.yaml"))
    p["device"] = "$torch.device('cpu')"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(p.get_parsed_content("network").state_dict(), out / "model.pt")
    torch.save(p.get_parsed_content("variance_net").state_dict(), out / "variance.pt")


def test_evaluate_missing_checkpoint_is_clear(tmp_path):
    """The config's default checkpoint paths are what train.yaml saves; a missing one is a clear error."""
    from monai.bundle import ConfigParser

    from scripts.handlers import load_weights

    p = ConfigParser()
    p.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")])
    p["output_dir"] = str(tmp_path / "run")
    assert p.get_parsed_content("ckpt_path") == str(tmp_path / "run" / "model.pt")
    assert p.get_parsed_content("variance_ckpt_path") == str(tmp_path / "run" / "variance.pt")
    assert p.get_parsed_content("eval_dir") == str(tmp_path / "run" / "eval")
    net = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="weights for 'network' not found"):
        load_weights(net, p.get_parsed_content("ckpt_path"), "network")
    # both checkpoint layouts load: a bare state dict and a full training checkpoint
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    torch.save({"network": net.state_dict(), "trainer": {"epoch": 3}}, tmp_path / "full.pt")
    # DistributedDataParallel's "module." prefix is removed
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    for f in ("bare.pt", "full.pt", "ddp.pt"):
        fresh = torch.nn.Linear(2, 2)
        assert load_weights(fresh, tmp_path / f, "network") is fresh
        for k, v in net.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), (f, k)
    assert load_weights(None, None) is None


@pytest.mark.slow
def test_evaluate_untrained_network(tiny, tmp_path):
    out = tmp_path / "run"
    _save_untrained(out)
    r = _run(_common(tiny, out))
    assert r.returncode == 0, r.stderr[-4000:]
    ev = out / "eval"
    for name in ("metrics.csv", "summary.json", "summary.md", "sparsification.png"):
        assert (ev / name).is_file(), name
    assert len(list((ev / "panels").glob("*.png"))) == 1
    rows = _rows(ev / "metrics.csv")
    assert [r["id"] for r in rows] == [f"case{i:02d}" for i in range(1, N_TEST + 1)]
    dl = json.loads((tiny / "datalist.json").read_text())["test"]
    for row, item in zip(rows, dl):
        lm = np.asanyarray(nib.load(str(tiny / item["moving_label"])).dataobj) == 2
        lf = np.asanyarray(nib.load(str(tiny / item["fixed_label"])).dataobj) == 2
        assert float(row["identity_dice"]) == pytest.approx(_dice(lm, lf), abs=1e-6)
        gt = np.asanyarray(nib.load(str(tiny / item["ddf"])).dataobj)
        assert float(row["identity_epe"]) == pytest.approx(np.linalg.norm(gt, axis=-1).mean(), rel=1e-5)
        assert float(row["identity_epe_mm"]) == pytest.approx(np.linalg.norm(gt * SPACING, axis=-1).mean(), rel=1e-5)
        assert row["spacing"] == "1.5 1"
        # an untrained flow head (init std 1e-5) is nearly the identity
        assert float(row["dice"]) == pytest.approx(float(row["identity_dice"]), abs=0.02)
        assert float(row["fold_frac"]) == 0.0
        assert float(row["hd_mm"]) >= float(row["hd"])  # spacing >= 1
        for k in ("ause", "aurg", "ause_norm", "nll", "spearman_noise", "mse", "identity_mse", "epe_heart"):
            assert math.isfinite(float(row[k])), k
        assert float(row["ause"]) >= 0
        assert row["n_failed"] == "0"
    summ = json.loads((ev / "summary.json").read_text())
    assert summ["n_cases"] == N_TEST
    dice = summ["metrics"]["identity_dice"]
    vals = [float(r["identity_dice"]) for r in rows]
    assert dice["mean"] == pytest.approx(np.mean(vals)) and dice["std"] == pytest.approx(np.std(vals))
    assert dice["n"] == N_TEST and dice["n_failed"] == 0
    assert "| dice |" in (ev / "summary.md").read_text()


@pytest.mark.slow
def test_evaluate_precomputed_ddfs(tiny, tmp_path):
    """The ground-truth DDFs as a 'classical' result: EPE 0 and exact label overlap, no sigma^2."""
    ddf_dir = tmp_path / "ddfs"
    ddf_dir.mkdir()
    for item in json.loads((tiny / "datalist.json").read_text())["test"]:
        os.symlink(tiny / item["ddf"], ddf_dir / f"{item['id']}_ddf.nii.gz")
    out = tmp_path / "classical"
    r = _run(_common(tiny, out) + ["--ddf_dir", str(ddf_dir), "--n_panels", "0"])
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _rows(out / "eval" / "metrics.csv")
    assert len(rows) == N_TEST
    for row in rows:
        assert float(row["epe"]) == pytest.approx(0.0, abs=1e-6)
        assert float(row["dice"]) == pytest.approx(1.0)
        assert float(row["hd"]) == 0.0 and float(row["assd"]) == 0.0
        assert float(row["dice"]) > float(row["identity_dice"])
        assert "ause" not in row
    assert not (out / "eval" / "sparsification.png").exists()


# ------------------------------------------------------------------------------------------- in-process handlers
def _fake_output(b=2, size=16, with_var=True):
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(b, 1, size, size, generator=g)
    lab = torch.zeros(b, 1, size, size)
    lab[..., 4:12, 4:12] = 2
    lab[..., 6:10, 6:10] = 1
    ddf = 0.1 * torch.randn(b, 2, size, size, generator=g)
    return {
        "moving": torch.rand(b, 1, size, size, generator=g),
        "fixed": fixed,
        "warped": fixed + 0.1,
        "ddf": ddf,
        "ddf_gt": torch.zeros_like(ddf),
        "log_var": torch.randn(b, 1, size, size, generator=g) if with_var else None,
        "weight": None,
        "moving_label": torch.roll(lab, 1, -1),
        "fixed_label": lab,
        "warped_label": lab,
        "meta": {"id": [f"x{i}" for i in range(b)], "spacing": None},
    }


def test_results_writer_in_process(tmp_path):
    from scripts.handlers import evaluate_outputs

    out = _fake_output(with_var=False)
    out["meta"]["id"] = ["y0", "y1"]
    out["fixed_label"] = torch.zeros_like(out["fixed_label"])  # empty reference: failures are counted
    evaluate_outputs([_fake_output(), out], tmp_path, steps=10, n_panels=1)
    summ = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["id"] for r in rows] == ["x0", "x1", "y0", "y1"]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[0]["identity_dice"]) < 1.0
    assert rows[2]["dice"] == "nan" and int(rows[2]["n_failed"]) >= 6 and "dice" in rows[2]["failed"]
    assert rows[2]["ause"] == "nan"  # no sigma^2 for that batch
    assert summ["dice"]["n"] == 2 and summ["dice"]["n_failed"] == 2
    assert summ["ause"]["n"] == 2
    assert (tmp_path / "sparsification.png").is_file() and (tmp_path / "panels" / "x0.png").is_file()


def test_metric_handlers_with_engine():
    from ignite.engine import Engine

    from scripts import metrics as M
    from scripts.handlers import AUSEHandler, EndPointErrorHandler, JacobianFoldingHandler

    outs = [_fake_output(), _fake_output(with_var=False)]
    engine = Engine(lambda e, b: outs[e.state.iteration - 1])
    AUSEHandler(steps=10).attach(engine, "ause")
    JacobianFoldingHandler().attach(engine, "fold")
    EndPointErrorHandler(region="heart").attach(engine, "epe_heart")
    engine.run([0, 1])
    o = outs[0]
    exp = np.mean([M.ause(o["log_var"][b], (o["fixed"][b] - o["warped"][b]) ** 2, 10)["ause"] for b in range(2)])
    assert engine.state.metrics["ause"] == pytest.approx(exp)  # the batch without log_var is skipped
    heart = [M.end_point_error(x["ddf"], x["ddf_gt"], mask=x["fixed_label"] > 0) for x in outs]
    assert engine.state.metrics["epe_heart"] == pytest.approx(torch.cat(heart).mean().item())
    assert 0 <= engine.state.metrics["fold"] <= 1
