"""Calibration measures of σ̂² (ZMS, ZVE, ENCE, NLL, PICP, MPIW), the validation σ scale and the quality score
(docs/uncertainty.md, "Calibration of σ̂" and "Which registrations to distrust")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bundle.calibrate import fit_sigma_scale
from scripts import metrics as M
from scripts.evaluator import RegistrationEvaluator
from scripts.handlers import evaluate_outputs


def _img(values, shape=(1, 1, 2, 2)):
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def test_each_measure_against_a_hand_computed_case():
    # 4 pixels, σ̂² = 1, 1, 4, 4 (σ̂ = 1, 1, 2, 2), r = 0.5, -2, 1, 5: z = 0.5, -2, 0.5, 2.5
    lv = _img(np.log([1.0, 1.0, 4.0, 4.0]))
    r = _img([0.5, -2.0, 1.0, 5.0])
    c = M.sigma_calibration(lv, r, n_bins=2)
    z = np.array([0.5, -2.0, 0.5, 2.5])
    assert c["zms"].item() == pytest.approx(np.mean(z**2))  # (0.25 + 4 + 0.25 + 6.25) / 4 = 2.6875
    assert c["zms"].item() == pytest.approx(2.6875)
    assert c["zve"].item() == pytest.approx(np.var(z))
    # bins by σ̂: {1, 1} and {4, 4}; RMV 1 and 2; RMSE sqrt((0.25 + 4)/2) and sqrt((1 + 25)/2)
    ence = 0.5 * (abs(1 - math.sqrt(2.125)) / 1 + abs(2 - math.sqrt(13.0)) / 2)
    assert c["ence"].item() == pytest.approx(ence)
    nll = np.mean(0.5 * (np.log([1, 1, 4, 4]) + z**2 + math.log(2 * math.pi)))
    assert c["nll"].item() == pytest.approx(nll)
    assert c["picp90"].item() == pytest.approx(0.5)  # |z| <= 1.645: 0.5, 0.5
    assert c["picp95"].item() == pytest.approx(0.5)  # |z| <= 1.96: 0.5, 0.5 (|-2| and 2.5 fall outside)
    assert c["mpiw95"].item() == pytest.approx(2 * M.Z95 * 1.5)
    # mask: the first two pixels only
    cm = M.sigma_calibration(lv, r, mask=_img([1, 1, 0, 0]), n_bins=2)
    assert cm["zms"].item() == pytest.approx((0.25 + 4) / 2)
    # against the exact moments: residual_std² = σ̂² exactly -> ZMS_ref 1, ENCE_ref 0, coverage nominal
    t = _img([1.0, 1.0, 4.0, 4.0])
    cr = M.sigma_calibration(lv, r, target_var=t, n_bins=2)
    assert cr["zms_ref"].item() == pytest.approx(1.0)
    assert cr["ence_ref"].item() == pytest.approx(0.0, abs=1e-12)
    assert cr["picp90_ref"].item() == pytest.approx(0.90, abs=1e-9)
    assert cr["picp95_ref"].item() == pytest.approx(0.95, abs=1e-9)
    # residual_std² = 4 σ̂²: ZMS_ref 4, expected coverage P(|N(0,1)| <= z_q / 2)
    cr4 = M.sigma_calibration(lv, None, target_var=4 * t, n_bins=2)
    assert cr4["zms_ref"].item() == pytest.approx(4.0)
    assert cr4["picp90_ref"].item() == pytest.approx(math.erf(M.Z90 / 2 / math.sqrt(2)))
    assert math.isnan(cr4["zms"].item())


def test_picp95_hand_case_counts_the_boundary():
    # |z| = 1.5, 1.9, 2.5 with σ̂ = 1: 95 % interval holds 2 of 3, 90 % holds 1 of 3
    c = M.sigma_calibration(torch.zeros(1, 1, 3), torch.tensor([[[1.5, -1.9, 2.5]]]), n_bins=1)
    assert c["picp95"].item() == pytest.approx(2 / 3)
    assert c["picp90"].item() == pytest.approx(1 / 3)


def test_synthetic_gaussian_sample_is_calibrated():
    g = torch.Generator().manual_seed(0)
    std = torch.exp(torch.rand(1, 1, 256, 256, generator=g, dtype=torch.float64) * 2 - 3)  # σ from e^-3 to e^-1
    r = std * torch.randn(1, 1, 256, 256, generator=g, dtype=torch.float64)
    c = M.sigma_calibration(2 * std.log(), r)
    assert c["zms"].item() == pytest.approx(1.0, abs=0.02)
    assert c["zve"].item() == pytest.approx(1.0, abs=0.02)
    assert c["picp90"].item() == pytest.approx(0.90, abs=0.005)
    assert c["picp95"].item() == pytest.approx(0.95, abs=0.005)
    assert c["ence"].item() < 0.03  # 20 bins of 3,277 pixels: sampling noise ≈ 1/sqrt(2·3277) = 0.012 per bin
    # a σ̂ twice too large: ZMS 1/4, over-coverage, ENCE ≈ 1 - 1/2
    c2 = M.sigma_calibration(2 * (2 * std).log(), r)
    assert c2["zms"].item() == pytest.approx(0.25, abs=0.01)
    assert c2["picp90"].item() > 0.99
    assert c2["ence"].item() == pytest.approx(0.5, abs=0.02)


def test_sigma_scale_value_and_fit(tmp_path):
    assert M.sigma_scale_value(None) is None and M.sigma_scale_value("null") is None
    assert M.sigma_scale_value(2) == 2.0
    p = tmp_path / "variance_scale.json"
    p.write_text(json.dumps({"sigma_scale": 0.5, "variance_scale": 0.25}))
    assert M.sigma_scale_value(str(p)) == 0.5
    with pytest.raises(ValueError):
        M.sigma_scale_value(-1.0)
    assert fit_sigma_scale({"calibration": {"pooled_zms_fov": 4.0}}) == pytest.approx(2.0)


class _Shift(torch.nn.Module):  # a displacement "network": a constant DDF of 0.25 px
    def forward(self, x, return_field=False):
        ddf = torch.full((x.shape[0], 2, *x.shape[2:]), 0.25)
        return (ddf, ddf) if return_field else ddf


class _ConstVar(torch.nn.Module):  # log σ̂² = log 0.01 everywhere
    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), math.log(0.01))


def _run_evaluator(sigma_scale):
    g = torch.Generator().manual_seed(1)
    batch = {"moving": torch.rand(1, 1, 16, 16, generator=g), "fixed": torch.rand(1, 1, 16, 16, generator=g)}
    ev = RegistrationEvaluator("cpu", [batch], _Shift(), _ConstVar(), sigma_scale=sigma_scale, inverse_consistency=True)
    ev.run()
    return ev.state.output


def test_validation_sigma_scale_is_applied_exactly_once(tmp_path):
    base = _run_evaluator(None)
    p = tmp_path / "variance_scale.json"
    p.write_text(json.dumps({"sigma_scale": 3.0}))
    scaled = _run_evaluator(str(p))
    # σ̂² -> 9 σ̂², not 81 σ̂² nor 3 σ̂²
    assert torch.allclose(scaled["log_var"], base["log_var"] + math.log(9.0), atol=1e-6)
    assert torch.allclose(scaled["warped"], base["warped"])
    # and the metrics see exactly that σ̂²: ZMS divided by 9
    zb = M.sigma_calibration(base["log_var"], base["fixed"] - base["warped"])["zms"]
    zs = M.sigma_calibration(scaled["log_var"], scaled["fixed"] - scaled["warped"])["zms"]
    assert zs.item() == pytest.approx(zb.item() / 9.0, rel=1e-5)
    # a constant DDF of 0.25 px registered back by the same constant: ‖0.25 + 0.25‖ per axis -> 0.5·sqrt(2)
    ic = M.inverse_consistency_error(scaled["ddf"].double(), scaled["ddf_backward"].double())
    assert torch.allclose(ic, torch.full_like(ic, 0.5 * math.sqrt(2)), atol=1e-6)


def test_qc_score_on_a_toy_case(tmp_path):
    # two pairs: a still one (ddf 0) and one displaced by 3 px along axis 0; candidate "disp" = mean ‖z‖ over the fov
    f = torch.zeros(2, 1, 8, 8)
    f[:, :, 2:6, 2:6] = 1.0
    ddf = torch.zeros(2, 2, 8, 8)
    ddf[1, 0] = 3.0
    c = M.quality_candidates(f, f, f, ddf, log_var=torch.zeros(2, 1, 8, 8))
    assert c["disp"].tolist() == pytest.approx([0.0, 3.0])
    assert c["mse"].tolist() == pytest.approx([0.0, 0.0])
    assert c["std_log_jac"].tolist() == pytest.approx([0.0, 0.0])
    # qc_score = ic: the backward registration -z undoes z (0); a backward registration of 0 leaves ‖z‖ = 3
    assert M.qc_score(f, f, f, ddf, ddf_backward=-ddf).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert M.qc_score(f, f, f, ddf, ddf_backward=torch.zeros_like(ddf)).tolist() == pytest.approx([0.0, 3.0])
    # r = 0.5 on the 16 fov pixels of pair 1 only, σ̂² = 1: mse 0.25 there, zms 0.25
    w = f.clone()
    w[1] = w[1] * 0.5
    c = M.quality_candidates(f, w, torch.zeros_like(f), ddf, log_var=torch.zeros(2, 1, 8, 8))
    assert c["mse"].tolist() == pytest.approx([0.0, 0.25])
    assert c["zms"].tolist() == pytest.approx([0.0, 0.25])
    assert c["rel_mse"].tolist() == pytest.approx([0.0, 0.25])
    assert math.isnan(c["ic"][0].item())


def test_evaluation_writes_the_columns_and_the_pooled_zms(tmp_path):
    g = torch.Generator().manual_seed(0)
    outs = []
    for i in range(2):
        f = torch.rand(1, 1, 16, 16, generator=g)
        f[..., :4] = 0.0  # a zero background outside the field of view
        rs = torch.where(f > 0, 0.1, 0.0)
        w = f + rs * torch.randn(1, 1, 16, 16, generator=g)
        lv = torch.full_like(f, math.log(0.01))
        outs.append(
            dict(
                fixed=f,
                warped=w,
                moving=f,
                ddf=torch.zeros(1, 2, 16, 16),
                log_var=lv,
                residual_std=rs,
                meta={"id": [f"c{i}"]},
            )
        )
    st = evaluate_outputs(outs, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for k in ("zms", "zms_fov", "zve_fov", "ence_fov", "picp90_fov", "picp95_fov", "mpiw90", "zms_ref_fov"):
        assert k in summary["metrics"], k
    assert summary["metrics"]["zms_ref_fov"]["mean"] == pytest.approx(1.0)
    assert summary["metrics"]["picp90_ref_fov"]["mean"] == pytest.approx(0.9, abs=1e-6)
    # the background pixels have r = 0: the all-pixel ZMS is the fov one times the fov share (12/16)
    assert summary["metrics"]["zms"]["mean"] == pytest.approx(summary["metrics"]["zms_fov"]["mean"] * 0.75)
    cal = summary["calibration"]
    z2 = torch.cat([((o["fixed"] - o["warped"]) ** 2 / 0.01)[o["residual_std"] > 0] for o in outs])
    assert cal["pooled_zms_fov"] == pytest.approx(z2.double().mean().item(), rel=1e-5)
    assert (tmp_path / "reliability_fov.png").exists()
    assert math.isnan(st.metrics["qc_score"])  # no ddf_backward in these outputs: qc_score (ic) is not available
    assert "qc_score" not in summary["metrics"]  # unavailable, not failed
