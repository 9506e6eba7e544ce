"""Losses of the heteroscedastic registration framework (Zhang et al., MICCAI 2024), one equation per class.

Notation: I_f the fixed image, Î_f = I_m ∘ z the warped moving image, s = log σ̂²_I the output of the variance
estimator, sg(·) the stop-gradient, mean over the image domain Ω.

Numerical safety (the same in every class, never changing an equation's meaning):
- the log-variance is clamped to ``[log_var_min, log_var_max]`` (default [-15, 15]) before it is exponentiated;
  the clamp acts only on values far outside the range of intensities in [0, 1] (σ̂ from 5.5e-4 to 1.8e3);
- σ̂² and σ̂ are computed as ``exp(s)`` and ``exp(s / 2)``, so they are never zero and no ε is added to a
  denominator; intensities are clamped at 0 before the fractional power of Eq. 4 (a negative base has no real
  power), which leaves images in [0, 1] unchanged.
"""

from __future__ import annotations

import math

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = [
    "NORMALIZATIONS",
    "snr_weight",
    "SNRWeightedMSELoss",
    "BetaNLLLoss",
    "GaussianNLLLoss",
    "GradientSmoothnessLoss",
]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return x.mean()
    if reduction == LossReduction.SUM.value:
        return x.sum()
    if reduction == LossReduction.NONE.value:
        return x
    raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')


NORMALIZATIONS = ("minmax", "none", "percentile", "mean_variance", "unit_mean")


def _flag(value, name: str) -> bool:
    """A boolean option from a config or the command line (``'false'`` arrives as a string)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be a boolean, got {value!r}.")
    return bool(value)


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile of all values of ``x`` with linear interpolation (``numpy.percentile``'s default);
    by sorting, so any size works (``torch.quantile`` refuses more than 2^24 values)."""
    v = x.reshape(-1).sort().values
    pos = (v.numel() - 1) * float(q) / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def snr_weight(
    fixed: torch.Tensor,
    log_var: torch.Tensor,
    gamma: float = 0.5,
    snr_form: str = "variance",
    normalization: str = "minmax",
    log_var_min: float = -15.0,
    log_var_max: float = 15.0,
    use_fixed: bool = True,
    percentiles: tuple[float, float] = (5.0, 95.0),
    clip: float = 10.0,
) -> torch.Tensor:
    """The adaptive weight of Eq. 4 and its variants, always detached (``sg``). docs/uncertainty.md lists them.

    ``r`` is the exponentiated relative signal-to-noise ratio, with b = I_f (``use_fixed=True``, default) or b = 1
    (``use_fixed=False``: the I_f factor ablated, the weight depends on σ̂ alone):

    - ``snr_form="std"`` (Eq. 4 as printed): ``r = (b / σ̂)^(2γ)``;
    - ``snr_form="variance"`` (the authors' code, default): ``r = (b / σ̂²)^γ`` (the same as "std" when b = 1).

    ``normalization`` maps r to the weight w (⟨·⟩ = mean, P_q = q-th percentile, both over the whole batch):

    - ``"minmax"`` (the authors' code, default): ``w = sigmoid((r − min r) / (max r − min r))`` ∈ [0.5, 0.731];
      where ``r`` is constant (γ = 0) the ratio is taken as 0, i.e. uniform weights of 0.5 (the authors' code gives
      0/0 = NaN there). A constant added to log σ̂² cancels, and a few extreme pixels set the range.
    - ``"none"`` (Eq. 4 as printed): ``w = sigmoid(r)`` ∈ [0.5, 1): the absolute level of σ̂ matters.
    - ``"percentile"``: ``w = sigmoid(clip((r − P_lo) / (P_hi − P_lo), 0, 1))`` with (lo, hi) = ``percentiles``
      (default 5, 95): min-max made robust to the few extreme pixels (uniform 0.5 where P_hi = P_lo).
    - ``"mean_variance"``: ``w = sigmoid(r')`` with r' the ratio computed with σ̂² / ⟨σ̂²⟩, i.e.
      ``r' = r · ⟨σ̂²⟩^γ``: scale free like min-max (a constant added to log σ̂² cancels) but uncompressed; the
      sigmoid bounds it in [0.5, 1).
    - ``"unit_mean"``: no sigmoid, ``w = min(r / ⟨r⟩, clip)``: r normalised to mean 1, clipped at ``clip``
      (default 10). With γ = 1 and ``use_fixed=False`` this is the inverse residual-variance weight
      ``w = min(σ̂⁻² / ⟨σ̂⁻²⟩, clip)`` (the Gaussian likelihood's weighting of each pixel); uniform 1 where ⟨r⟩ = 0.

    γ = 0 makes the weight a constant in every case: Eq. 4 becomes the plain MSE up to a factor.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
    with torch.no_grad():
        s = log_var.detach().float().clamp(log_var_min, log_var_max)
        base = fixed.detach().float().clamp_min(0.0) if use_fixed else torch.ones_like(s)
        if snr_form == "std":
            r = torch.pow(base * torch.exp(-0.5 * s), 2.0 * gamma)
        elif snr_form == "variance":
            r = torch.pow(base * torch.exp(-s), gamma)
        else:
            raise ValueError(f"snr_form must be 'std' or 'variance', got {snr_form!r}.")
        if normalization == "minmax":
            lo, hi = r.min(), r.max()
            span = hi - lo
            r = torch.where(span > 0, (r - lo) / torch.where(span > 0, span, torch.ones_like(span)), r * 0.0)
        elif normalization == "percentile":
            lo, hi = _percentile(r, percentiles[0]), _percentile(r, percentiles[1])
            span = hi - lo
            r = torch.where(span > 0, (r - lo) / torch.where(span > 0, span, torch.ones_like(span)), r * 0.0)
            r = r.clamp(0.0, 1.0)
        elif normalization == "mean_variance":
            r = r * torch.exp(s).mean() ** gamma
        elif normalization == "unit_mean":
            m = r.mean()
            return torch.where(m > 0, r / torch.where(m > 0, m, torch.ones_like(m)), torch.ones_like(r)).clamp_max(clip)
        return torch.sigmoid(r)


class SNRWeightedMSELoss(_Loss):
    """Data term of the displacement loss, Eq. 4 of the paper:

    .. math::
        \\mathcal{L}_\\theta^{data} = \\mathbb{E}_\\Omega\\big[\\,
        \\mathrm{sigmoid}\\big((I_f / sg(\\hat\\sigma_I))^{2\\gamma}\\big)\\,(I_f - \\hat I_f)^2\\big]

    with the weight computed by :func:`snr_weight` from the variance estimator's log σ̂² (no gradient ever reaches
    the variance estimator through this loss), or one of its variants (same function, options below; equations in
    :func:`snr_weight` and docs/uncertainty.md): ``E_Ω[w (I_f − Î_f)²]``. The smoothness term λ‖∇z‖² is
    :class:`GradientSmoothnessLoss`.

    Args:
        gamma: the exponent γ (paper default 0.5; 0 gives a constant weight, i.e. MSE up to a factor).
        snr_form: ``"variance"`` (authors' code, default) or ``"std"`` (Eq. 4 as printed), see :func:`snr_weight`.
        normalization: ``"minmax"`` (authors' code, default), ``"none"`` (Eq. 4 as printed), ``"percentile"``,
            ``"mean_variance"`` or ``"unit_mean"`` (no sigmoid; the inverse-variance weight with γ = 1 and
            ``use_fixed=False``).
        use_fixed: keep the I_f factor of the ratio (default); ``False`` ablates it.
        percentiles: (lo, hi) of ``normalization="percentile"``.
        clip: the largest weight of ``normalization="unit_mean"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    ``forward(input=Î_f, target=I_f, log_var=s, weight=None)``: pass ``weight`` to reuse a weight map already
    computed with :meth:`weight_map`; ``log_var=None`` (and no weight) means unit weights (the MSE warm-up).
    """

    def __init__(
        self,
        gamma: float = 0.5,
        snr_form: str = "variance",
        normalization: str = "minmax",
        log_var_min: float = -15.0,
        log_var_max: float = 15.0,
        use_fixed: bool = True,
        percentiles: tuple[float, float] = (5.0, 95.0),
        clip: float = 10.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        self.gamma = float(gamma)
        self.snr_form = snr_form
        self.normalization = normalization
        self.log_var_min = log_var_min
        self.log_var_max = log_var_max
        self.use_fixed = _flag(use_fixed, "use_fixed")
        pct = tuple(float(p) for p in percentiles)
        if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
            raise ValueError(f"percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got {percentiles!r}.")
        self.percentiles = pct
        if not float(clip) > 0:
            raise ValueError(f"clip must be > 0, got {clip}.")
        self.clip = float(clip)
        snr_weight(torch.ones(1), torch.zeros(1), self.gamma, snr_form, normalization)  # validate the options

    def weight_map(self, fixed: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        return snr_weight(
            fixed,
            log_var,
            self.gamma,
            self.snr_form,
            self.normalization,
            self.log_var_min,
            self.log_var_max,
            self.use_fixed,
            self.percentiles,
            self.clip,
        )

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        log_var: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} shapes differ.")
        if weight is None:
            weight = torch.ones_like(target) if log_var is None else self.weight_map(target, log_var)
        return _reduce(weight.detach() * (target - input) ** 2, self.reduction)


class BetaNLLLoss(_Loss):
    """β-NLL loss of the variance estimator, Eq. 5 of the paper (Seitzer et al., ICLR 2022):

    .. math::
        \\mathcal{L}_\\phi = \\mathbb{E}_\\Omega\\Big[sg(\\hat\\sigma_I^{2\\beta})\\; c\\,
        \\Big(\\frac{(I_f - sg(\\hat I_f))^2}{\\hat\\sigma_I^2} + \\log\\hat\\sigma_I^2\\Big)\\Big]

    on the log-variance input s = log σ̂² (σ̂² = exp(s)). ``c = 1/2`` as in the authors' code (``half=True``,
    the Gaussian NLL's own factor; a constant scale that Adam ignores) or ``c = 1`` as printed.

    Args:
        beta: β in [0, 1]. Default 0.5, the value Seitzer et al. recommend and the authors' code uses: it keeps
            the variance from collapsing onto well-fitted pixels (β = 0 is the plain NLL, whose 1/σ̂² weighting
            under-samples high-noise pixels) while still learning a calibrated σ̂² (β = 1 gives MSE-like gradients
            for the mean but a poorly conditioned variance).
        detach_warped: stop the gradient through Î_f (Eq. 5, default). ``False`` gives the joint β-NLL baseline,
            where the same loss also trains the displacement estimator.
        half: multiply by 1/2 (authors' code).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    ``forward(input=Î_f, target=I_f, log_var=s)``.
    """

    def __init__(
        self,
        beta: float = 0.5,
        detach_warped: bool = True,
        half: bool = True,
        log_var_min: float = -15.0,
        log_var_max: float = 15.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        self.beta = float(beta)
        self.detach_warped = bool(detach_warped)
        self.scale = 0.5 if half else 1.0
        self.log_var_min = log_var_min
        self.log_var_max = log_var_max

    def forward(self, input: torch.Tensor, target: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or log_var.shape != target.shape:
            raise ValueError(
                f"input {tuple(input.shape)}, target {tuple(target.shape)} and log_var {tuple(log_var.shape)} "
                "must have the same shape."
            )
        warped = input.detach() if self.detach_warped else input
        s = log_var.float().clamp(self.log_var_min, self.log_var_max)
        nll = self.scale * ((target.float() - warped.float()) ** 2 * torch.exp(-s) + s)
        if self.beta > 0:
            nll = nll * torch.exp(self.beta * s).detach()
        return _reduce(nll, self.reduction)


class GaussianNLLLoss(BetaNLLLoss):
    """Joint heteroscedastic Gaussian negative log-likelihood, Eq. 3 of the paper (Kendall & Gal, 2017):

    .. math::
        \\mathcal{L} = \\mathbb{E}_\\Omega\\Big[\\,c\\,\\Big(\\frac{(I_f - \\hat I_f)^2}{\\hat\\sigma_I^2}
        + \\log\\hat\\sigma_I^2\\Big)\\Big]

    It is Eq. 5 with β = 0 and no stop-gradient: one objective trains both estimators (the NLL baseline).
    """

    def __init__(
        self,
        half: bool = True,
        log_var_min: float = -15.0,
        log_var_max: float = 15.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(
            beta=0.0,
            detach_warped=False,
            half=half,
            log_var_min=log_var_min,
            log_var_max=log_var_max,
            reduction=reduction,
        )


class GradientSmoothnessLoss(_Loss):
    """Smoothness term λ‖∇z‖² of Eq. 4 as the authors' code computes it (VoxelMorph's ``Grad('l2')``):

    .. math::
        \\mathcal{L}_{reg} = \\frac{m}{n}\\sum_{i=1}^{n} \\mathbb{E}\\big[(z(x + e_i) - z(x))^2\\big]

    the mean squared *forward* differences of the field along each of the n spatial axes, averaged over axes and
    multiplied by ``multiplier`` m (the authors use m = 2, the velocity downsampling factor). λ is applied by the
    trainer. Unlike MONAI's ``DiffusionLoss`` (central differences, summed over axes), forward differences see a
    checkerboard field.

    ``forward(field)`` with field (B, n, *spatial); ``reduction="none"`` returns the per-sample values (B,).
    """

    def __init__(self, multiplier: float = 2.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.multiplier = float(multiplier)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        ndim = field.ndim - 2
        if ndim not in (1, 2, 3) or field.shape[1] != ndim:
            raise ValueError(f"expected a field (B, ndim, *spatial) with ndim channels, got {tuple(field.shape)}.")
        per_axis = [torch.diff(field, dim=d + 2).pow(2).flatten(1).mean(1) for d in range(ndim)]
        value = torch.stack(per_axis, 0).mean(0) * self.multiplier
        return _reduce(value, self.reduction)


# ==================================================================================================================
# Baselines and extensions of the paper's comparison (Table 1, Supp. Table 5). Every class below is used through the
# same CollaborativeTrainer; a loss that needs more than ``(input, target)`` / ``(field,)`` declares ``extra_inputs``
# (names of the trainer's per-iteration context: warped, fixed, moving, ddf, field, log_var, weight, and for networks
# with displacement uncertainty field_mean, log_sigma_z). Equations and paper references: docs/baselines.md.
# ==================================================================================================================


__all__ += [
    "ImageSigmaMSELoss",
    "weighted_smoothness",
    "adareg_weight",
    "AdaRegSmoothnessLoss",
    "adaframe_weight",
    "AdaFrameMSELoss",
    "AdaFrameSmoothnessLoss",
    "DisplacementUncertaintyRegLoss",
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


def _check_field(field: torch.Tensor) -> int:
    ndim = field.ndim - 2
    if ndim not in (1, 2, 3) or field.shape[1] != ndim:
        raise ValueError(f"expected a field (B, ndim, *spatial) with ndim channels, got {tuple(field.shape)}.")
    return ndim


def _to_grid(weight: torch.Tensor, shape) -> torch.Tensor:
    """A (B, 1, *spatial) weight map resampled to the field grid by area averaging (identity when equal)."""
    if tuple(weight.shape[2:]) == tuple(shape):
        return weight
    return torch.nn.functional.interpolate(weight, size=tuple(shape), mode="area")


def weighted_smoothness(
    field: torch.Tensor, weight: torch.Tensor | None = None, multiplier: float = 2.0
) -> torch.Tensor:
    """Per-sample (B,) spatially weighted version of :class:`GradientSmoothnessLoss`:

    .. math:: \\frac{m}{n}\\sum_{i=1}^{n}\\mathbb{E}\\big[w_i(x)\\,(z(x+e_i)-z(x))^2\\big],\\quad
              w_i(x) = \\tfrac12\\big(w(x) + w(x+e_i)\\big)

    with ``w`` (B, 1, *spatial) resampled to the field's grid (area averaging: the half-resolution velocity).
    ``weight=None`` (or w ≡ 1) gives exactly :class:`GradientSmoothnessLoss`'s per-sample values.
    """
    ndim = _check_field(field)
    if weight is not None:
        weight = _to_grid(weight.to(field.dtype), field.shape[2:])
    per_axis = []
    for d in range(ndim):
        sq = torch.diff(field, dim=d + 2).pow(2)
        if weight is not None:
            n = weight.shape[d + 2]
            w = 0.5 * (weight.narrow(d + 2, 0, n - 1) + weight.narrow(d + 2, 1, n - 1))
            sq = sq * w
        per_axis.append(sq.flatten(1).mean(1))
    return torch.stack(per_axis, 0).mean(0) * float(multiplier)


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

    def weight_map(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        w = adareg_weight(warped, fixed, self.c)
        return w.detach() if self.detach_weight else w

    def forward(self, field: torch.Tensor, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return _reduce(weighted_smoothness(field, self.weight_map(warped, fixed), self.multiplier), self.reduction)


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

    def weight_map_from(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        alpha = adaframe_weight(warped, fixed, self.a0, self.b0)
        return alpha.detach() if self.detach_weight else alpha

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} shapes differ.")
        alpha = self.weight_map_from(input, target)
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

    def weight_map(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        gamma = 1.0 - adaframe_weight(warped, fixed, self.a0, self.b0)
        return gamma.detach() if self.detach_weight else gamma

    def forward(self, field: torch.Tensor, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        weight = self.weight_map(warped, fixed) if self.adaptive else None
        return _reduce(weighted_smoothness(field, weight, self.multiplier), self.reduction)


def _need(value: torch.Tensor | None, name: str, cls: str) -> torch.Tensor:
    if value is None:
        raise ValueError(
            f"{cls} needs '{name}': use a displacement network with uncertainty "
            "(scripts.networks.DisplacementUncertaintyNet) so that the trainer passes it."
        )
    return value


class DisplacementUncertaintyRegLoss(_Loss):
    """Regulariser of the paper's displacement-uncertainty extension (Supp. Mat., "Incorporating displacement
    uncertainty"):

    .. math::
        \\mathcal{L}_\\theta = \\mathbb{E}_\\Omega\\Big[\\mathcal{T}\\big[(I_f/sg(\\hat\\sigma_I))^{2\\gamma}\\big]
        (I_f-\\hat I_f)^2 + \\alpha\\,(\\hat\\sigma_z^2 - \\log\\hat\\sigma_z^2)
        + \\lambda\\|\\nabla\\hat z\\|^2\\Big]

    with ẑ ~ N(μ̂_z, σ̂_z² I) sampled by the network (reparameterisation). This class is the part after the data term:
    the trainer computes ``sim + lambda_reg * reg``, so it returns

    .. math:: \\mathcal{L}_{reg} = \\|\\nabla\\hat z\\|^2 + \\frac{\\alpha}{\\lambda}\\,
              \\mathbb{E}_\\Omega\\big[\\hat\\sigma_z^2 - \\log\\hat\\sigma_z^2\\big]

    (‖∇ẑ‖² as :class:`GradientSmoothnessLoss` with ``multiplier`` on the sampled field), so that λ·L_reg is exactly
    λ‖∇ẑ‖² + α(σ̂_z² − log σ̂_z²). The α-term alone is the KL divergence of N(μ, σ²) from N(μ, 1) up to constants:
    it keeps σ̂_z from collapsing to 0, while the data and smoothness terms (through the sampled ẑ) shrink it.

    ``forward(field, log_sigma_z)``: field = the sampled ẑ the network integrates, log_sigma_z = log σ̂_z² on that grid
    (``extra_inputs``; :class:`scripts.networks.DisplacementUncertaintyNet` provides both).
    """

    extra_inputs = ("log_sigma_z",)

    def __init__(
        self,
        alpha: float = 1e-5,
        lambda_reg: float = 0.01,
        multiplier: float = 2.0,
        log_var_min: float = -15.0,
        log_var_max: float = 15.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if alpha < 0 or lambda_reg <= 0:
            raise ValueError(f"need alpha >= 0 and lambda_reg > 0, got alpha={alpha}, lambda_reg={lambda_reg}.")
        self.alpha, self.lambda_reg = float(alpha), float(lambda_reg)
        self.multiplier = float(multiplier)
        self.log_var_min, self.log_var_max = log_var_min, log_var_max

    def uncertainty_term(self, log_sigma_z: torch.Tensor) -> torch.Tensor:
        """Per-sample E_Ω[σ_z² − log σ_z²] (B,)."""
        s = log_sigma_z.float().clamp(self.log_var_min, self.log_var_max)
        return (torch.exp(s) - s).flatten(1).mean(1)

    def forward(self, field: torch.Tensor, log_sigma_z: torch.Tensor | None = None) -> torch.Tensor:
        s = _need(log_sigma_z, "log_sigma_z", type(self).__name__)
        value = weighted_smoothness(field, None, self.multiplier) + (
            self.alpha / self.lambda_reg
        ) * self.uncertainty_term(s)
        return _reduce(value, self.reduction)


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
