"""Unit tests of scripts.metrics against brute-force references and closed-form cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts import metrics as M


# ------------------------------------------------------------------------------------------------ sparsification
def brute_force_curves(u, e, steps):
    """Explicit sort + pixel-by-pixel removal. With n - 1 a multiple of steps, the percentile threshold of step t
    falls exactly on a sorted value, so step t removes exactly t (n - 1) / steps pixels."""
    u, e = list(np.ravel(u)), list(np.ravel(e))
    n = len(u)
    assert (n - 1) % steps == 0

    def curve(key):
        order = sorted(range(n), key=lambda i: -key[i])  # most uncertain first
        out = []
        for t in range(steps):
            k = t * (n - 1) // steps
            kept = order[k:]
            s = 0.0
            for i in kept:
                s += e[i]
            out.append(s / len(kept))
        return out + [0.0]

    return curve(u), curve(e)


def trapz(y, x):
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


@pytest.mark.parametrize("steps,n", [(5, 21), (10, 31), (50, 101)])
def test_sparsification_matches_brute_force(steps, n):
    rng = np.random.default_rng(steps)
    u = rng.random(n)
    e = rng.random(n) ** 2
    x, c, o = M.sparsification_curves(u, e, steps=steps)
    bc, bo = brute_force_curves(u, e, steps)
    np.testing.assert_allclose(x, [t / steps for t in range(steps + 1)])
    np.testing.assert_allclose(c, bc, rtol=1e-12)
    np.testing.assert_allclose(o, bo, rtol=1e-12)
    r = M.ause(u, e, steps=steps)
    assert r["ause"] == pytest.approx(trapz(bc, x) - trapz(bo, x), rel=1e-12)
    assert r["aurg"] == pytest.approx(np.mean(e) - trapz(bc, x), rel=1e-12)
    rn = M.ause(u, e, steps=steps, normalize=True)
    assert rn["ause"] == pytest.approx(r["ause"] / np.mean(e), rel=1e-12)


def test_sparsification_mask_and_torch_input():
    rng = np.random.default_rng(0)
    u, e = rng.random((1, 8, 8)), rng.random((1, 8, 8))
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :4] = True
    x, c, o = M.sparsification_curves(torch.as_tensor(u), torch.as_tensor(e), steps=10, mask=torch.as_tensor(mask))
    x2, c2, o2 = M.sparsification_curves(u[mask], e[mask], steps=10)
    np.testing.assert_allclose(c, c2)
    np.testing.assert_allclose(o, o2)
    assert c[0] == pytest.approx(e[mask].mean())


def test_ause_perfect_random_reversed():
    rng = np.random.default_rng(1)
    e = rng.random(64 * 64) ** 2
    perfect = M.ause(e, e)["ause"]
    rand = M.ause(rng.random(e.size), e)["ause"]
    rev = M.ause(-e, e)["ause"]
    assert perfect == pytest.approx(0.0, abs=1e-15)
    assert rand > 0.0
    assert rev > rand > perfect
    # monotone transforms of the uncertainty do not change the ranking
    assert M.ause(np.log(e + 1e-3), e)["ause"] == pytest.approx(perfect, abs=1e-15)
    # AURG of the oracle is the largest
    assert M.ause(e, e)["aurg"] > M.ause(rng.random(e.size), e)["aurg"]


def test_sparsification_ties_keep_all_at_threshold():
    # constant uncertainty: every threshold equals the value, '>=' keeps everything -> flat curve at the MSE
    e = np.arange(11.0)
    _, c, _ = M.sparsification_curves(np.ones(11), e, steps=5)
    np.testing.assert_allclose(c[:-1], e.mean())


def test_cumulative_sparsification_and_ause_metrics():
    rng = np.random.default_rng(2)
    lv = torch.as_tensor(rng.normal(size=(3, 1, 10, 10)))
    se = torch.as_tensor(rng.random((3, 1, 10, 10)))
    m = M.AUSEMetric(steps=10)
    m(lv[:2], se[:2])
    m(lv[2:], se[2:])
    expected = [M.ause(lv[b], se[b], steps=10)["ause"] for b in range(3)]
    assert m.aggregate().item() == pytest.approx(np.mean(expected))
    assert m.aggregate("none").flatten().tolist() == pytest.approx(expected)
    g = M.AUSEMetric(steps=10, output="aurg")
    g(lv, se)
    assert g.aggregate().item() == pytest.approx(np.mean([M.ause(lv[b], se[b], 10)["aurg"] for b in range(3)]))
    s = M.SparsificationMetric(steps=10)
    s(lv, se)
    x, c, o = s.aggregate()
    curves = [M.sparsification_curves(lv[b], se[b], 10) for b in range(3)]
    np.testing.assert_allclose(c.numpy(), np.mean([cc[1] for cc in curves], 0))
    np.testing.assert_allclose(o.numpy(), np.mean([cc[2] for cc in curves], 0))
    assert x[-1] == 1.0 and len(x) == 11


# ------------------------------------------------------------------------------------------------ Jacobian
def test_jacobian_zero_field():
    for shape in [(2, 2, 9, 10), (1, 3, 5, 6, 7)]:
        det = M.jacobian_determinant(torch.zeros(shape))
        assert det.shape == (shape[0],) + shape[2:]
        assert torch.allclose(det, torch.ones_like(det))


@pytest.mark.parametrize("nd", [2, 3])
def test_jacobian_linear_field_exact(nd):
    rng = np.random.default_rng(nd)
    A = rng.normal(scale=0.3, size=(nd, nd))
    shape = (6, 7, 8)[:nd]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))  # (nd, *shape)
    z = np.einsum("ij,j...->i...", A, grid) + rng.normal(size=(nd,) + (1,) * nd)  # z = A x + b
    det = M.jacobian_determinant(torch.as_tensor(z)[None])
    np.testing.assert_allclose(det.numpy(), np.linalg.det(np.eye(nd) + A), rtol=1e-10)
    # unbatched input works too
    assert M.jacobian_determinant(torch.as_tensor(z)).shape == shape


def test_jacobian_folding_field():
    # z_0 = -2 x_0 gives d phi_0 / d x_0 = -1: every voxel folds
    H, W = 8, 8
    z = torch.zeros(1, 2, H, W)
    z[0, 0] = -2 * torch.arange(H, dtype=torch.float32)[:, None]
    s = M.jacobian_stats(z)
    assert s["fold_frac"].item() == 1.0
    # a local fold: a displacement spike flips neighbouring derivatives
    z = torch.zeros(1, 2, 16, 16)
    z[0, 0, 8, 8] = 3.0
    s = M.jacobian_stats(z)
    assert 0 < s["fold_frac"].item() < 1
    assert s["std_log_jac"].item() > 0
    m = M.JacobianMetric()
    m(z)
    m(torch.zeros(1, 2, 16, 16))
    assert m.aggregate().item() == pytest.approx(s["fold_frac"].item() / 2)
    assert m.aggregate_all()["std_log_jac"].item() == pytest.approx(s["std_log_jac"].item() / 2)


# ------------------------------------------------------------------------------------------------ EPE
def test_end_point_error():
    gt = torch.zeros(2, 2, 4, 4)
    pred = torch.zeros(2, 2, 4, 4)
    pred[:, 0] = 3.0
    pred[:, 1] = 4.0
    assert M.end_point_error(pred, gt).tolist() == [5.0, 5.0]
    assert M.end_point_error(pred, gt, spacing=[2.0, 0.5]).tolist() == pytest.approx([math.hypot(6, 2)] * 2)
    pred[1, :, :2] = 0.0
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    assert M.end_point_error(pred, gt, mask=mask).tolist() == [5.0, 0.0]
    assert M.end_point_error(pred, gt).tolist() == [5.0, 2.5]
    m = M.EndPointErrorMetric()
    m(pred, gt, mask=mask)
    assert m.aggregate().item() == 2.5
    assert math.isnan(M.end_point_error(pred, gt, mask=torch.zeros(2, 1, 4, 4))[0])


# ------------------------------------------------------------------------------------------------ NLL, Spearman
def test_gaussian_nll_and_spearman():
    lv = torch.zeros(1, 1, 3, 3)
    r = torch.ones(1, 1, 3, 3)
    assert M.gaussian_nll(lv, r).item() == pytest.approx(0.5 * (1 + math.log(2 * math.pi)))
    m = M.GaussianNLLMetric()
    m(lv, r)
    assert m.aggregate().item() == pytest.approx(0.5 * (1 + math.log(2 * math.pi)))
    a = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert M.spearman_corr(a, a**3).item() == pytest.approx(1.0)
    assert M.spearman_corr(a, -a).item() == pytest.approx(-1.0)
    assert math.isnan(M.spearman_corr(a, torch.ones_like(a)).item())


# ------------------------------------------------------------------------------------------------ contours
def _square(lo, hi, size=32, value=2):
    lab = np.zeros((size, size), np.uint8)
    lab[lo:hi, lo:hi] = value
    return lab


def test_myocardium_metrics_identical_and_shifted():
    g = _square(8, 20)
    r = M.myocardium_metrics(g, g)
    assert r["dice"] == 1.0 and r["hd"] == 0.0 and r["assd"] == 0.0 and r["n_failed"] == 0
    p = np.roll(g, 2, axis=0)
    r = M.myocardium_metrics(p[None], g[None], spacing=[1.5, 1.0])
    assert r["dice"] == pytest.approx(2 * 10 * 12 / (2 * 144))
    assert r["hd"] == pytest.approx(2.0)
    assert r["hd_mm"] == pytest.approx(3.0)
    assert 0 < r["asd"] <= r["hd"] and 0 < r["assd"] <= r["hd"] and r["hd95"] <= r["hd"]
    # other labels are ignored: label 1 next to the myocardium changes nothing
    p1 = p.copy()
    p1[0:4, 0:4] = 1
    assert M.myocardium_metrics(p1, g)["dice"] == r["dice"]


def test_myocardium_metrics_one_sided_vs_symmetric():
    g = _square(8, 20)
    p = _square(10, 18)  # smaller square inside: pred->ref distance is 2 everywhere
    r = M.myocardium_metrics(p, g)
    assert r["asd"] == pytest.approx(2.0)
    assert r["asd_rev"] > r["asd"]  # the reference border has corners farther from the prediction
    assert min(r["asd"], r["asd_rev"]) <= r["assd"] <= max(r["asd"], r["asd_rev"])


def test_myocardium_metrics_failures_flagged():
    g = _square(8, 20)
    empty = np.zeros_like(g)
    r = M.myocardium_metrics(empty, g)
    assert r["dice"] == 0.0
    assert math.isnan(r["hd"]) and "hd" in r["failed"] and r["n_failed"] == 5
    r = M.myocardium_metrics(g, empty, spacing=[1.0, 1.0])
    assert math.isnan(r["dice"]) and r["n_failed"] == 11


def test_myocardium_metrics_3d():
    g = np.zeros((12, 12, 12), np.uint8)
    g[3:9, 3:9, 3:9] = 2
    r = M.myocardium_metrics(g, g, spacing=[2.0, 1.0, 1.0])
    assert r["dice"] == 1.0 and r["hd_mm"] == 0.0


# ------------------------------------------------------------------------------------------------ calibration
def test_variance_calibration_hand_values():
    # one image of 4 pixels: σ̂² = [1, 2, 4, 1] (mean 2), residual r = [1, -1, 2, 0] (mean r² 1.5),
    # residual_std = [0.5, 1, 2, 1] (mean rs² = (0.25 + 1 + 4 + 1) / 4 = 1.5625)
    var = np.array([1.0, 2.0, 4.0, 1.0])
    lv = torch.tensor(np.log(var)).view(1, 1, 2, 2)
    r = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    rs = torch.tensor([0.5, 1.0, 2.0, 1.0]).view(1, 1, 2, 2)
    c = M.variance_calibration(lv, r, rs, steps=2)
    assert c["var_ratio_residual"].item() == pytest.approx(2.0 / 1.5)
    assert c["var_ratio_residual_std"].item() == pytest.approx(2.0 / 1.5625)
    # ranks of σ̂: [1.5, 3, 4, 1.5], of rs: [1, 2.5, 4, 2.5] -> Pearson of the ranks
    ra, rb = np.array([1.5, 3, 4, 1.5]), np.array([1, 2.5, 4, 2.5])
    assert c["spearman_residual_std"].item() == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    nll = np.mean(0.5 * (np.log(var) + np.array([0.25, 1, 4, 1]) / var + math.log(2 * math.pi)))
    assert c["nll_residual_std"].item() == pytest.approx(nll)
    assert c["ause_residual_std"].item() == pytest.approx(M.ause(rs, r**2, steps=2)["ause"])
    # at σ̂ = residual_std the expected NLL is minimal: ½(log rs² + 1 + log 2π)
    c_oracle = M.variance_calibration(torch.log(rs**2), r, rs)
    assert c_oracle["nll_residual_std"].item() == pytest.approx(
        float(np.mean(0.5 * (np.log(rs.numpy() ** 2) + 1 + math.log(2 * math.pi))))
    )
    assert c_oracle["nll_residual_std"].item() < c["nll_residual_std"].item()
    assert c_oracle["spearman_residual_std"].item() == pytest.approx(1.0)
    # a mask keeps the first two pixels: σ̂² mean 1.5, r² mean 1
    m = torch.tensor([1, 1, 0, 0]).view(1, 1, 2, 2)
    assert M.variance_calibration(lv, r, rs, mask=m)["var_ratio_residual"].item() == pytest.approx(1.5)
    # every residual_std > 0 here: the field-of-view Spearman is the all-pixel one
    assert c["spearman_residual_std_fov"].item() == pytest.approx(c["spearman_residual_std"].item())


def test_spearman_in_the_field_of_view_leaves_out_the_zero_background():
    """Two background pixels (residual_std = 0, σ̂ smallest) make the all-pixel Spearman high; inside the field of
    view σ̂ ranks residual_std backwards (-1)."""
    lv = torch.log(torch.tensor([0.01, 0.01, 1.0, 2.0, 3.0, 4.0])).view(1, 1, 2, 3)
    rs = torch.tensor([0.0, 0.0, 4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 3)
    c = M.variance_calibration(
        lv, torch.ones(1, 1, 2, 3), rs, keys=["spearman_residual_std", "spearman_residual_std_fov"]
    )
    ra = np.array([1.5, 1.5, 3, 4, 5, 6])  # ranks of σ̂
    rb = np.array([1.5, 1.5, 6, 5, 4, 3])  # ranks of residual_std
    assert c["spearman_residual_std"].item() == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert c["spearman_residual_std"].item() > 0.1
    assert c["spearman_residual_std_fov"].item() == pytest.approx(-1.0)


def test_variance_calibration_nan_without_residual_std():
    lv, r = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    c = M.variance_calibration(lv, r, None)
    assert torch.allclose(c["var_ratio_residual"], torch.ones(2, dtype=torch.float64))
    for k in M.CALIBRATION_KEYS[1:]:
        assert c[k].shape == (2,) and torch.isnan(c[k]).all()
    assert torch.isnan(M.variance_calibration(lv, torch.zeros_like(r))["var_ratio_residual"]).all()  # 0 residual
    metric = M.VarianceCalibrationMetric("var_ratio_residual_std")
    metric(lv, r)
    assert math.isnan(metric.aggregate().item())
    metric = M.VarianceCalibrationMetric("var_ratio_residual")
    metric(lv, r)
    metric(lv + math.log(2.0), r)
    assert metric.aggregate().item() == pytest.approx(1.5)  # mean of 1 and 2
    with pytest.raises(ValueError, match="output"):
        M.VarianceCalibrationMetric("bogus")


def test_reliability_diagram_hand_values(tmp_path):
    rd = M.ReliabilityDiagram(edges=[0.01, 0.1, 1.0])
    # σ̂² = [0.05, 0.05, 0.5, 5 (-> last bin), 1e-4 (-> first bin)]
    var = np.array([0.05, 0.05, 0.5, 5.0, 1e-4])
    rd.update(np.log(var), [0.1, 0.3, 1.0, 2.0, 0.0], residual_var=[0.1, 0.1, 0.2, 0.2, 0.1])
    res = rd.result()
    np.testing.assert_allclose(res["count"], [3, 2])
    np.testing.assert_allclose(res["pred"], [(0.05 + 0.05 + 1e-4) / 3, (0.5 + 5.0) / 2])
    np.testing.assert_allclose(res["observed"], [0.4 / 3, 1.5])
    np.testing.assert_allclose(res["target"], [0.1, 0.2])
    assert res["pooled_var_ratio_residual"] == pytest.approx(var.sum() / 3.4)
    assert res["pooled_var_ratio_residual_std"] == pytest.approx(var.sum() / 0.7)
    empty = M.ReliabilityDiagram().result()
    assert empty["count"].size == 0 and math.isnan(empty["pooled_var_ratio_residual_std"])
    from scripts.plots import plot_reliability

    assert (tmp_path / "r.png").stat().st_size > 0 if plot_reliability(res, tmp_path / "r.png") else False


def _eval_output(with_rs: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(2, 1, 16, 16, generator=g)
    rs = 0.02 + 0.1 * torch.rand(2, 1, 16, 16, generator=g)
    warped = fixed + rs * torch.randn(2, 1, 16, 16, generator=g)
    out = {
        "moving": torch.rand(2, 1, 16, 16, generator=g),
        "fixed": fixed,
        "warped": warped,
        "ddf": torch.zeros(2, 2, 16, 16),
        "log_var": torch.log(rs**2),
        "meta": {"id": [f"a{seed}", f"b{seed}"]},
    }
    if with_rs:
        out["residual_std"] = rs
    return out


@pytest.mark.parametrize("with_rs", [True, False])
def test_results_writer_reports_calibration(tmp_path, with_rs):
    import csv
    import json

    from scripts.handlers import evaluate_outputs

    evaluate_outputs([_eval_output(with_rs), _eval_output(with_rs, 1)], tmp_path, n_panels=0, steps=10)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [dict(r, n_failed=int(r["n_failed"])) for r in csv.DictReader(f)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "var_ratio_residual" in summary["metrics"]
    assert (tmp_path / "reliability.png").is_file() and (tmp_path / "reliability.npz").is_file()
    cal = summary["calibration"]
    if with_rs:  # σ̂ = residual_std exactly: ratio ≈ 1 against rs², rank correlation 1
        assert summary["metrics"]["var_ratio_residual_std"]["mean"] == pytest.approx(1.0)
        assert summary["metrics"]["spearman_residual_std"]["mean"] == pytest.approx(1.0)
        assert cal["pooled_var_ratio_residual_std"] == pytest.approx(1.0)
        assert 0.7 < cal["pooled_var_ratio_residual"] < 1.4  # 1024 noise draws around their std
        assert "curve_residual_std" in np.load(tmp_path / "sparsification.npz")
        assert all(r["n_failed"] == 0 for r in rows)
    else:  # no ground truth: the columns are absent (not NaN failures), the pooled ratio NaN, no crash
        assert "var_ratio_residual_std" not in summary["metrics"]
        assert cal["pooled_var_ratio_residual_std"] is None or math.isnan(cal["pooled_var_ratio_residual_std"])
        assert all(r["n_failed"] == 0 for r in rows)
    assert "Pooled over all pixels" in (tmp_path / "summary.md").read_text()


def test_calibration_handler_on_an_engine():
    from ignite.engine import Engine

    from scripts.handlers import VarianceCalibrationHandler

    outs = [_eval_output(True, 0), _eval_output(True, 1), dict(_eval_output(True, 2), log_var=None)]
    eng = Engine(lambda e, b: outs[b])
    VarianceCalibrationHandler("var_ratio_residual_std").attach(eng, "ratio_std")
    VarianceCalibrationHandler("spearman_residual_std").attach(eng, "rho")
    VarianceCalibrationHandler("var_ratio_residual").attach(eng, "ratio")
    eng.run([0, 1, 2], max_epochs=1)
    m = eng.state.metrics
    assert m["ratio_std"] == pytest.approx(1.0) and m["rho"] == pytest.approx(1.0)  # σ̂ = residual_std
    c = [M.variance_calibration(o["log_var"], o["fixed"] - o["warped"])["var_ratio_residual"] for o in outs[:2]]
    assert m["ratio"] == pytest.approx(torch.cat(c).mean().item())  # the image without σ̂ is skipped
    eng2 = Engine(lambda e, b: dict(_eval_output(False), log_var=None if b else _eval_output(False)["log_var"]))
    VarianceCalibrationHandler("var_ratio_residual_std").attach(eng2, "ratio_std")  # no residual_std: NaN
    VarianceCalibrationHandler("var_ratio_residual").attach(eng2, "ratio")
    eng2.run([1], max_epochs=1)  # and no variance network: NaN, no crash
    assert math.isnan(eng2.state.metrics["ratio_std"]) and math.isnan(eng2.state.metrics["ratio"])
    assert set(M.variance_calibration(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), keys=["nll_residual_std"])) == {
        "nll_residual_std"
    }


def test_spearman_noise_handler_in_the_field_of_view_on_an_engine():
    """spearman_noise_fov ranks only where noise_std > 0: the zero background, where σ̂ is smallest, is left out."""
    from ignite.engine import Engine

    from scripts.handlers import SpearmanHandler

    lv = torch.log(torch.tensor([0.01, 0.01, 1.0, 2.0, 3.0, 4.0])).view(1, 1, 2, 3)
    noise = torch.tensor([0.0, 0.0, 4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 3)
    eng = Engine(lambda e, b: {"log_var": lv, "noise_std": noise, "fixed": torch.zeros_like(noise)})
    SpearmanHandler("noise_std").attach(eng, "all")
    SpearmanHandler("noise_std", fov=True).attach(eng, "fov")
    eng.run([0], max_epochs=1)
    ra, rb = np.array([1.5, 1.5, 3, 4, 5, 6]), np.array([1.5, 1.5, 6, 5, 4, 3])
    assert eng.state.metrics["all"] == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert eng.state.metrics["fov"] == pytest.approx(-1.0)
