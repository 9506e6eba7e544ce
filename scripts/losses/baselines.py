"""Baselines of the paper's comparison (Table 1, Supp. Table 5): VoxelMorph-diff, AdaReg and AdaFrame.

Every class is used through the same CollaborativeTrainer; a loss that needs more than ``(input, target)`` /
``(field,)`` declares ``extra_inputs`` (names of the trainer's per-iteration context: warped, fixed, moving, ddf, field,
log_var, weight, and for networks with displacement uncertainty field_mean, log_sigma_z). The baselines' own adaptive
weights are ``adaptive_weight(warped, fixed)``, distinct from the Eq. 4 ``weight_map(fixed, log_var)`` of
:class:`~scripts.losses.SNRWeightedMSELoss` (the one ``weight_map`` the trainer's oracle and the evaluator call).
Equations and paper references: docs/baselines.md.
"""

from __future__ import annotations

import math

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from scripts.losses._utils import _need, _reduce
from scripts.losses.smoothness import _check_field, weighted_smoothness

__all__ = [
    "ImageSigmaMSELoss",
    "adareg_weight",
    "AdaRegSmoothnessLoss",
    "adaframe_weight",
    "AdaFrameMSELoss",
    "AdaFrameSmoothnessLoss",
    "degree_map",
    "VxmDiffKLLoss",
]


class ImageSigmaMSELoss(_Loss):
    """VoxelMorph-diff's data term (Dalca et al., MICCAI 2018 / MedIA 2019, ``vxm.losses.MSE(image_sigma)``):

    .. math:: \\mathcal{L}_{data} = \\frac{1}{\\sigma_I^2}\\,\\mathbb{E}_\\Omega\\big[(I_f - \\hat I_f)^2\\big]

    the Gaussian log-likelihood of a homoscedastic image noise σ_I up to constants. ``image_sigma=1`` (VoxelMorph's
    training-script default) makes it the plain MSE.
    """

    def __init__(self, image_sigma: float = 0.02, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if image_sigma <= 0:
            raise ValueError(f"image_sigma must be > 0, got {image_sigma}.")
        self.image_sigma = float(image_sigma)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} shapes differ.")
        return _reduce((target.float() - input.float()) ** 2 / self.image_sigma**2, self.reduction)


def adareg_weight(warped: torch.Tensor, fixed: torch.Tensor, c: float = 50.0) -> torch.Tensor:
    """AdaReg's residual-conditioned regularity weight (Wong & Soatto, CVPR 2019), one moving→fixed pair:

    .. math:: w(x) = \\exp\\big(-c\\,\\rho(x)\\,\\bar\\rho\\big),\\quad \\rho(x) = \\sum_{ch}|I_f(x)-\\hat I_f(x)|,
              \\quad \\bar\\rho = \\mathbb{E}_\\Omega[\\rho]\\ \\text{(per image)}

    (``residual_regularity_weight_func`` of the authors' release; the MICCAI authors' baseline code computes the same
    with c = 50). w ∈ (0, 1]: regularisation is relaxed where the local residual is high (occlusions, outliers) and
    everywhere while the global fit is poor; it tends to the full weight 1 as the residual vanishes.
    Returns (B, 1, *spatial); differentiable (the original code does not stop the gradient).
    """
    if warped.shape != fixed.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} shapes differ.")
    rho = (fixed.float() - warped.float()).abs().sum(1, keepdim=True)
    rho_bar = rho.flatten(1).mean(1).view(-1, *([1] * (rho.ndim - 1)))
    return torch.exp(-float(c) * rho * rho_bar)


class AdaRegSmoothnessLoss(_Loss):
    """AdaReg regulariser (Wong & Soatto, "Bilateral Cyclic Constraint and Adaptive Regularization for Unsupervised
    Monocular Depth Prediction", CVPR 2019), adapted to registration:

    .. math:: \\mathcal{L}_{reg} = \\frac{m}{n}\\sum_i \\mathbb{E}\\big[w_i(x)\\,(z(x+e_i)-z(x))^2\\big],\\quad
              w = \\exp(-c\\,\\rho\\,\\bar\\rho)

    i.e. :class:`GradientSmoothnessLoss` weighted per pixel by :func:`adareg_weight` of the current residual
    (the data term stays the plain MSE, as in the paper's AdaReg baseline). Single pair: the stereo method's
    left/right residuals reduce to the one moving→fixed residual; its adaptive weight multiplied the regularisers
    (bilateral-cyclic consistency and smoothness), here the only regulariser is ‖∇z‖².

    Args:
        c: the scale c (authors' monodepth release: 5 on RGB photometric residuals; the MICCAI comparison: 50).
        multiplier: m, as :class:`GradientSmoothnessLoss` (2 for the half-resolution velocity).
        detach_weight: stop the gradient through w. ``False`` (default) as both reference implementations.

    ``forward(field, warped, fixed)``; the trainer passes ``warped`` and ``fixed`` (``extra_inputs``).
    """

    extra_inputs = ("warped", "fixed")

    def __init__(
        self,
        c: float = 50.0,
        multiplier: float = 2.0,
        detach_weight: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}.")
        self.c = float(c)
        self.multiplier = float(multiplier)
        self.detach_weight = bool(detach_weight)

    def adaptive_weight(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        w = adareg_weight(warped, fixed, self.c)
        return w.detach() if self.detach_weight else w

    def forward(self, field: torch.Tensor, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return _reduce(weighted_smoothness(field, self.adaptive_weight(warped, fixed), self.multiplier), self.reduction)


def adaframe_weight(
    warped: torch.Tensor, fixed: torch.Tensor, a0: float = 0.1, b0: float = 10.0, eps: float = 1e-7
) -> torch.Tensor:
    """AdaFrame's data-fidelity weight α (Wong, Fei, Hong & Soatto, RA-L 2021), one moving→fixed pair:

    .. math::
        \\alpha(x) = 1 - \\mathrm{sigmoid}\\big(a\\,\\tilde\\rho(x) - b\\big),\\quad
        \\tilde\\rho = \\frac{\\rho - \\mu}{\\sigma},\\quad a = \\frac{a_0}{\\mu},\\quad b = b_0\\,(1 - \\cos \\pi\\mu)

    with ρ = |I_f − Î_f| (summed over channels), μ and σ its mean and standard deviation over the image (per batch
    element). Early in training (large μ: small slope a, large offset b) α ≈ 1 almost uniformly; as the fit improves
    (μ → 0: a → ∞, b → 0) α sharpens into a step that down-weights the pixels whose residual is above average
    (α(μ) = sigmoid(b) ≥ 1/2 at the mean residual). a0 = 0.1, b0 = 10 as the MICCAI authors' AdaFrame baseline.
    Returns (B, 1, *spatial) in (0, 1), differentiable (callers detach it).
    """
    if warped.shape != fixed.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} shapes differ.")
    rho = (fixed.float() - warped.float()).abs().sum(1, keepdim=True)
    shape = (-1,) + (1,) * (rho.ndim - 1)
    flat = rho.flatten(1)
    mu = flat.mean(1)
    sigma = flat.std(1, unbiased=False)
    a = float(a0) / (mu + eps)
    b = float(b0) * (1.0 - torch.cos(math.pi * mu))
    rho_t = (rho - mu.view(shape)) / (sigma.view(shape) + eps)
    return 1.0 - torch.sigmoid(a.view(shape) * rho_t - b.view(shape))


class AdaFrameMSELoss(_Loss):
    """AdaFrame's adaptively weighted data term (Wong et al., "An Adaptive Framework for Learning Unsupervised Depth
    Completion", RA-L 2021), on the squared residual of registration:

    .. math:: \\mathcal{L}_{data} = \\mathbb{E}_\\Omega\\big[sg(\\alpha(x))\\,(I_f - \\hat I_f)^2\\big]

    with α of :func:`adaframe_weight`. Multi-frame → one pair: AdaFrame computes one α_τ per source frame τ (the
    temporally adjacent frames and the stereo frame) with statistics pooled over the frames, and sums the weighted
    residuals over τ; with the single source frame I_m the set has one element, the sum over τ is the identity and
    μ, σ are the statistics of the one residual image.

    Args:
        a0, b0: the slope and offset constants (defaults 0.1 and 10, MICCAI authors' baseline).
        detach_weight: stop the gradient through α (default, as the MICCAI authors' ``WeightedMSE``).
    """

    def __init__(
        self,
        a0: float = 0.1,
        b0: float = 10.0,
        detach_weight: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.a0, self.b0 = float(a0), float(b0)
        self.detach_weight = bool(detach_weight)

    def adaptive_weight(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        alpha = adaframe_weight(warped, fixed, self.a0, self.b0)
        return alpha.detach() if self.detach_weight else alpha

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} shapes differ.")
        alpha = self.adaptive_weight(input, target)
        return _reduce(alpha * (target.float() - input.float()) ** 2, self.reduction)


class AdaFrameSmoothnessLoss(_Loss):
    """AdaFrame's adaptive regulariser γ (Wong et al., RA-L 2021), complementary to the data weight α:

    .. math:: \\mathcal{L}_{reg} = \\frac{m}{n}\\sum_i \\mathbb{E}\\big[\\gamma_i(x)\\,(z(x+e_i)-z(x))^2\\big],\\quad
              \\gamma(x) = 1 - sg(\\alpha(x))

    Regularisation starts low (α ≈ 1 everywhere early in training) and grows where the data cannot determine the
    solution (pixels whose residual α down-weights), so that neighbours that fit the data fill them in. With one
    source frame, the multi-frame 1 − max_τ α_τ reduces to 1 − α. ``adaptive=False`` gives the plain
    :class:`GradientSmoothnessLoss` (what the MICCAI authors' AdaFrame baseline code used with its α-weighted MSE).

    ``forward(field, warped, fixed)`` (``extra_inputs``).
    """

    extra_inputs = ("warped", "fixed")

    def __init__(
        self,
        a0: float = 0.1,
        b0: float = 10.0,
        multiplier: float = 2.0,
        adaptive: bool = True,
        detach_weight: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.a0, self.b0 = float(a0), float(b0)
        self.multiplier = float(multiplier)
        self.adaptive = bool(adaptive)
        self.detach_weight = bool(detach_weight)

    def adaptive_weight(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        gamma = 1.0 - adaframe_weight(warped, fixed, self.a0, self.b0)
        return gamma.detach() if self.detach_weight else gamma

    def forward(self, field: torch.Tensor, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        weight = self.adaptive_weight(warped, fixed) if self.adaptive else None
        return _reduce(weighted_smoothness(field, weight, self.multiplier), self.reduction)


def degree_map(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Number of grid neighbours (2 per axis inside, 1 on a face) of every voxel: the diagonal D of the graph
    Laplacian L = D − A of VoxelMorph-diff's smoothness prior. Shape ``shape``."""
    ndim = len(shape)
    out = torch.zeros(tuple(shape), device=device, dtype=dtype)
    for d, n in enumerate(shape):
        line = torch.full((n,), 2.0, device=device, dtype=dtype)
        line[0] -= 1
        line[-1] -= 1
        out = out + line.view(*([1] * d), n, *([1] * (ndim - d - 1)))
    return out


class VxmDiffKLLoss(_Loss):
    """KL term of probabilistic diffeomorphic VoxelMorph (vxm-diff; Dalca et al., MICCAI 2018 / MedIA 2019;
    ``voxelmorph.losses.KL(prior_lambda)``):

    q(v) = N(μ, diag σ²) the network's velocity posterior, p(v) = N(0, Λ⁻¹) with Λ = λ_p L, L = D − A the graph
    Laplacian of the voxel grid (a smoothness prior). Up to constants,

    .. math::
        KL(q\\|p) = \\tfrac12\\big[\\lambda_p\\,\\mathrm{tr}(D\\,\\Sigma) - \\log|\\Sigma|
        + \\lambda_p\\,\\mu^T L\\,\\mu\\big],\\quad \\mu^T L\\mu = \\sum_{i\\sim j}(\\mu_i-\\mu_j)^2

    normalised as VoxelMorph does: with n the number of spatial axes,

    .. math:: \\mathcal{L}_{KL} = \\frac n2\\Big(\\mathbb{E}\\big[\\lambda_p D\\,\\sigma^2 - \\log\\sigma^2\\big]
              + \\lambda_p\\,\\frac{1}{2n}\\sum_{i=1}^n\\mathbb{E}\\big[(\\mu(x+e_i)-\\mu(x))^2\\big]\\Big)

    (means over batch, channels and voxels). Its data term is :class:`ImageSigmaMSELoss`; the trainer weighs this
    term by λ (VoxelMorph's training script: ``--kl-lambda`` = λ_p = 10 and weight ``--lambda`` = 0.01).

    ``forward(field, field_mean, log_sigma_z)``: the sampled field is not used (the KL is in closed form);
    field_mean = μ and log_sigma_z = log σ² (ndim channels, or 1 for an isotropic σ) on the velocity grid.
    """

    extra_inputs = ("field_mean", "log_sigma_z")

    def __init__(self, prior_lambda: float = 10.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if prior_lambda <= 0:
            raise ValueError(f"prior_lambda must be > 0, got {prior_lambda}.")
        self.prior_lambda = float(prior_lambda)

    def forward(
        self, field: torch.Tensor, field_mean: torch.Tensor | None = None, log_sigma_z: torch.Tensor | None = None
    ) -> torch.Tensor:
        mean = _need(field_mean, "field_mean", type(self).__name__).float()
        s = _need(log_sigma_z, "log_sigma_z", type(self).__name__).float()
        ndim = _check_field(mean)
        deg = degree_map(mean.shape[2:], mean.device)
        sigma_term = (self.prior_lambda * deg * torch.exp(s) - s).flatten(1).mean(1)
        prec = torch.stack([torch.diff(mean, dim=d + 2).pow(2).flatten(1).mean(1) for d in range(ndim)], 0).sum(0)
        prec_term = self.prior_lambda * 0.5 * prec / ndim
        return _reduce(0.5 * ndim * (sigma_term + prec_term), self.reduction)
