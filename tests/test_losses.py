"""Each loss of the paper against hand-computed values, and where its gradients flow."""

import math

import numpy as np
import pytest
import torch

from scripts.losses import BetaNLLLoss, GradientSmoothnessLoss, HeteroscedasticNLLLoss, SNRWeightedMSELoss, snr_weight

SIG = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731


def t(*v):
    return torch.tensor(v, dtype=torch.float32).view(1, 1, 1, -1)


def test_snr_weight_code_form_minmax():
    # (I_f / σ²)^γ with σ² = 1, γ = 0.5: r = [0.5, 1.0, 0.8] -> min-max [0, 1, 0.6] -> sigmoid
    w = snr_weight(t(0.25, 1.0, 0.64), t(0.0, 0.0, 0.0), gamma=0.5)
    assert torch.allclose(w.flatten(), torch.tensor([SIG(0.0), SIG(1.0), SIG(0.6)]), atol=1e-6)
    assert w.min() >= 0.5 and w.max() <= SIG(1.0) + 1e-7


def test_snr_weight_paper_form_no_normalization():
    # Eq. 4 as printed: (I_f / σ)^(2γ); σ = [0.5, 1] -> r = [0.5, 1.0]
    w = snr_weight(t(0.25, 1.0), t(math.log(0.25), 0.0), gamma=0.5, snr_form="std", normalization="none")
    assert torch.allclose(w.flatten(), torch.tensor([SIG(0.5), SIG(1.0)]), atol=1e-6)
    # the two forms differ: the code form divides by the variance
    w2 = snr_weight(t(0.25, 1.0), t(math.log(0.25), 0.0), gamma=0.5, snr_form="variance", normalization="none")
    assert torch.allclose(w2.flatten(), torch.tensor([SIG(1.0), SIG(1.0)]), atol=1e-6)


@pytest.mark.parametrize("normalization", ["minmax", "none"])
@pytest.mark.parametrize("form", ["std", "variance"])
def test_gamma_zero_gives_constant_weight(form, normalization):
    fixed, log_var = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    w = snr_weight(fixed, log_var, gamma=0.0, snr_form=form, normalization=normalization)
    assert torch.isfinite(w).all()  # the authors' min-max gives 0/0 = NaN here
    assert torch.allclose(w, w.flatten()[0].expand_as(w))
    expected = SIG(0.0) if normalization == "minmax" else SIG(1.0)
    assert w.flatten()[0].item() == pytest.approx(expected)
    # so Eq. 4 is the MSE up to that factor
    warped = torch.rand_like(fixed)
    loss = SNRWeightedMSELoss(gamma=0.0, snr_form=form, normalization=normalization)(warped, fixed, log_var)
    assert loss.item() == pytest.approx(expected * torch.mean((fixed - warped) ** 2).item(), rel=1e-5)


def test_snr_loss_value_and_reductions():
    fixed, warped, log_var = t(0.25, 1.0, 0.64), t(0.0, 0.5, 0.64), t(0.0, 0.0, 0.0)
    w = [SIG(0.0), SIG(1.0), SIG(0.6)]
    per = [w[0] * 0.0625, w[1] * 0.25, 0.0]
    assert SNRWeightedMSELoss()(warped, fixed, log_var).item() == pytest.approx(sum(per) / 3, rel=1e-6)
    assert SNRWeightedMSELoss(reduction="sum")(warped, fixed, log_var).item() == pytest.approx(sum(per), rel=1e-6)
    none = SNRWeightedMSELoss(reduction="none")(warped, fixed, log_var)
    assert none.shape == fixed.shape and torch.allclose(none.flatten(), torch.tensor(per), atol=1e-7)
    # no log-variance: unit weights (the MSE warm-up)
    assert SNRWeightedMSELoss()(warped, fixed).item() == pytest.approx((0.0625 + 0.25) / 3, rel=1e-6)


def test_snr_loss_gradients_reach_only_the_warped_image():
    fixed = torch.rand(1, 1, 6, 6)
    warped = torch.rand(1, 1, 6, 6, requires_grad=True)
    log_var = torch.randn(1, 1, 6, 6, requires_grad=True)
    SNRWeightedMSELoss()(warped, fixed, log_var).backward()
    assert log_var.grad is None  # sg(σ̂): Eq. 4 never trains the variance estimator
    # d/dÎ_f mean(w (I_f - Î_f)²) = -2 w (I_f - Î_f) / N with the detached Eq. 4 weight
    w = SNRWeightedMSELoss().weight_map(fixed, log_var)
    assert torch.allclose(warped.grad, -2 * w * (fixed - warped.detach()) / fixed.numel(), atol=1e-7)


def test_beta_nll_value():
    fixed, warped, s = t(1.0), t(0.5), t(math.log(0.25))
    nll = 0.5 * (0.25 / 0.25 + math.log(0.25))
    assert BetaNLLLoss(beta=0.0)(warped, fixed, s).item() == pytest.approx(nll, rel=1e-6)
    assert BetaNLLLoss(beta=0.5)(warped, fixed, s).item() == pytest.approx(0.5 * nll, rel=1e-6)  # σ̂^(2β) = 0.5
    assert BetaNLLLoss(beta=1.0, half=False)(warped, fixed, s).item() == pytest.approx(0.25 * 2 * nll, rel=1e-6)


def test_beta_nll_gradients():
    fixed = torch.rand(1, 1, 5, 5)
    warped = torch.rand(1, 1, 5, 5, requires_grad=True)
    s = torch.randn(1, 1, 5, 5, requires_grad=True)
    BetaNLLLoss(beta=0.5, reduction="sum")(warped, fixed, s).backward()
    assert warped.grad is None  # sg(Î_f): Eq. 5 never trains the displacement estimator
    # the β factor is stopped: d/ds = sg(e^{βs}) * 0.5 * (1 - r e^{-s})
    r = (fixed - warped.detach()) ** 2
    expected = torch.exp(0.5 * s.detach()) * 0.5 * (1 - r * torch.exp(-s.detach()))
    assert torch.allclose(s.grad, expected, atol=1e-5)
    # the joint β-NLL baseline lets the gradient through Î_f
    warped.grad = None
    BetaNLLLoss(beta=0.5, detach_warped=False)(warped, fixed, s).backward()
    # d/dÎ_f = sg(e^{βs}) * 0.5 * -2 (I_f - Î_f) e^{-s} / N
    sd = s.detach()
    expected = torch.exp(0.5 * sd) * -(fixed - warped.detach()) * torch.exp(-sd) / fixed.numel()
    assert torch.allclose(warped.grad, expected, atol=1e-6)


def test_gaussian_nll_is_joint_eq3():
    fixed, warped, s = t(1.0, 0.0), t(0.5, 0.5), t(0.0, math.log(2.0))
    expected = 0.5 * ((0.25 + 0.0) + (0.25 / 2 + math.log(2.0))) / 2
    warped.requires_grad_(True)
    s.requires_grad_(True)
    loss = HeteroscedasticNLLLoss()(warped, fixed, s)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dÎ_f = -(I_f - Î_f) / σ² * 0.5 * 2 / N: both estimators get a gradient (no stop-gradient, β = 0)
    assert warped.grad.flatten().tolist() == pytest.approx([-0.5 / 2, 0.5 / 2 / 2], rel=1e-5)
    # d/ds = 0.5 (1 - r e^{-s}) / N with r = 0.25
    assert s.grad.flatten().tolist() == pytest.approx([0.5 * 0.75 / 2, 0.5 * (1 - 0.125) / 2], rel=1e-5)


def test_log_var_clamp_keeps_losses_finite():
    fixed, warped = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    s = torch.full((1, 1, 4, 4), -1e4)
    assert torch.isfinite(BetaNLLLoss()(warped, fixed, s))
    assert torch.isfinite(SNRWeightedMSELoss()(warped, fixed, s))


def test_gradient_smoothness_hand_value():
    # 2D field, one sample: channel 0 = [[0, 1], [0, 3]], channel 1 = zeros
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    # axis 0 diffs of ch0: [0, 2] -> sq [0, 4]; ch1 zeros: mean over (2 ch x 1 x 2) = 4/4 = 1
    # axis 1 diffs of ch0: [1, 3] -> sq [1, 9]; mean over 4 = 10/4 = 2.5
    loss = GradientSmoothnessLoss(multiplier=2.0)(f)
    assert loss.item() == pytest.approx(2.0 * (1.0 + 2.5) / 2)


def test_gradient_smoothness_sees_checkerboard_and_ignores_translation():
    y, x = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((x + y) % 2).float()
    field = torch.stack([checker, checker])[None]
    assert GradientSmoothnessLoss(multiplier=1.0)(field).item() == pytest.approx(1.0)
    assert GradientSmoothnessLoss()(torch.full((2, 3, 4, 4, 4), 3.0)).item() == 0.0
    assert GradientSmoothnessLoss(reduction="none")(torch.randn(3, 3, 4, 4, 4)).shape == (3,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="snr_form"):
        SNRWeightedMSELoss(snr_form="bogus")
    with pytest.raises(ValueError, match="beta"):
        BetaNLLLoss(beta=2.0)
    with pytest.raises(ValueError, match="shape"):
        BetaNLLLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="ndim"):
        GradientSmoothnessLoss()(torch.zeros(1, 3, 4, 4))


# ------------------------------------------------------------------------------- weight forms beyond the paper
def _old_default_weight(fixed, log_var, gamma=0.5):
    """The authors' form exactly as it was before the new options (the default must stay bit-identical)."""
    s = log_var.float().clamp(-15.0, 15.0)
    r = torch.pow(fixed.float().clamp_min(0.0) * torch.exp(-s), gamma)
    lo, hi = r.min(), r.max()
    span = hi - lo
    r = torch.where(span > 0, (r - lo) / torch.where(span > 0, span, torch.ones_like(span)), r * 0.0)
    return torch.sigmoid(r)


def test_default_weight_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    fixed, log_var = torch.rand(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    assert torch.equal(snr_weight(fixed, log_var), _old_default_weight(fixed, log_var))
    assert torch.equal(SNRWeightedMSELoss().weight_map(fixed, log_var), _old_default_weight(fixed, log_var))


def test_percentile_normalization_hand_value():
    # σ² = 1, γ = 0.5: r = sqrt(I_f) = [0, 0.1, 0.5, 0.8, 1.0]; P5 (position 0.2) = 0.02, P95 (position 3.8) = 0.96
    fixed = t(0.0, 0.01, 0.25, 0.64, 1.0)
    w = snr_weight(fixed, torch.zeros_like(fixed), gamma=0.5, normalization="percentile")
    lo, hi = 0.02, 0.96
    expected = [SIG(min(max((r - lo) / (hi - lo), 0.0), 1.0)) for r in (0.0, 0.1, 0.5, 0.8, 1.0)]
    assert torch.allclose(w.flatten(), torch.tensor(expected), atol=1e-6)
    assert np.percentile([0.0, 0.1, 0.5, 0.8, 1.0], [5, 95]) == pytest.approx([lo, hi])
    # other percentiles through the loss; (0, 100) is the min-max
    loss = SNRWeightedMSELoss(normalization="percentile", percentiles=(0, 100))
    assert torch.allclose(loss.weight_map(fixed, torch.zeros_like(fixed)), snr_weight(fixed, torch.zeros_like(fixed)))


def test_mean_variance_normalization_hand_value_and_scale_free():
    # σ² = [0.5, 2], I_f = 1, γ = 0.5: r = [√2, 1/√2]; ⟨σ²⟩ = 1.25 -> r' = [√2.5, √0.625]
    fixed, log_var = t(1.0, 1.0), t(math.log(0.5), math.log(2.0))
    w = snr_weight(fixed, log_var, gamma=0.5, normalization="mean_variance")
    assert torch.allclose(w.flatten(), torch.tensor([SIG(math.sqrt(2.5)), SIG(math.sqrt(0.625))]), atol=1e-6)
    # a constant added to log σ̂² cancels (but not with "none": the absolute level matters there)
    w2 = snr_weight(fixed, log_var + 3.0, gamma=0.5, normalization="mean_variance")
    assert torch.allclose(w, w2, atol=1e-6)
    assert not torch.allclose(
        snr_weight(fixed, log_var, normalization="none"), snr_weight(fixed, log_var + 3.0, normalization="none")
    )


def test_inverse_variance_weight_hand_value():
    # γ = 1, no I_f, unit_mean: w = min(σ⁻² / ⟨σ⁻²⟩, clip); σ² = [0.5, 1, 2, 0.01] -> σ⁻² = [2, 1, 0.5, 100]
    fixed, log_var = t(0.3, 0.9, 0.1, 0.5), t(*(math.log(v) for v in (0.5, 1.0, 2.0, 0.01)))
    m = (2 + 1 + 0.5 + 100) / 4
    loss = SNRWeightedMSELoss(gamma=1.0, normalization="unit_mean", use_fixed=False, clip=2.0)
    w = loss.weight_map(fixed, log_var)
    assert torch.allclose(w.flatten(), torch.tensor([2 / m, 1 / m, 0.5 / m, 2.0]), atol=1e-6)
    unclipped = SNRWeightedMSELoss(gamma=1.0, normalization="unit_mean", use_fixed=False, clip=1e9)
    assert unclipped.weight_map(fixed, log_var).mean().item() == pytest.approx(1.0, rel=1e-6)  # mean 1
    warped = t(0.0, 0.0, 0.0, 0.0)
    per = [w_i * f_i**2 for w_i, f_i in zip([2 / m, 1 / m, 0.5 / m, 2.0], (0.3, 0.9, 0.1, 0.5))]
    assert loss(warped, fixed, log_var).item() == pytest.approx(sum(per) / 4, rel=1e-6)
    # all-zero ratio (I_f = 0 with the I_f factor): uniform weight 1, not NaN
    z = snr_weight(t(0.0, 0.0), t(0.0, 0.0), gamma=1.0, normalization="unit_mean")
    assert torch.equal(z, torch.ones_like(z))


def test_fixed_factor_ablated():
    # use_fixed=False: r = (1/σ²)^γ; σ² = [1, 0.25, 4], γ = 0.5 -> r = [1, 2, 0.5] -> min-max [1/3, 1, 0]
    log_var = t(0.0, math.log(0.25), math.log(4.0))
    expected = torch.tensor([SIG(1 / 3), SIG(1.0), SIG(0.0)])
    for fixed in (t(0.2, 0.9, 0.5), t(1.0, 0.0, 0.3)):  # independent of I_f
        for form in ("variance", "std"):  # identical without I_f
            w = snr_weight(fixed, log_var, gamma=0.5, snr_form=form, use_fixed=False)
            assert torch.allclose(w.flatten(), expected, atol=1e-6)
    assert SNRWeightedMSELoss(use_fixed="false").use_fixed is False  # from the command line


def test_bad_weight_options():
    with pytest.raises(ValueError, match="normalization"):
        SNRWeightedMSELoss(normalization="bogus")
    with pytest.raises(ValueError, match="percentiles"):
        SNRWeightedMSELoss(percentiles=(95, 5))
    with pytest.raises(ValueError, match="clip"):
        SNRWeightedMSELoss(clip=0)
    with pytest.raises(ValueError, match="use_fixed"):
        SNRWeightedMSELoss(use_fixed="maybe")
