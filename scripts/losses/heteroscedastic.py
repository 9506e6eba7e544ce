"""The losses of the heteroscedastic registration framework (Zhang et al., MICCAI 2024), one equation per class:
Eq. 4 (:class:`SNRWeightedMSELoss`), Eq. 5 (:class:`BetaNLLLoss`), Eq. 3 (:class:`HeteroscedasticNLLLoss`) and the
displacement-uncertainty extension of the Supp. Mat. (:class:`DisplacementUncertaintyRegLoss`).

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

from scripts.losses._utils import _flag, _need, _reduce
from scripts.losses.smoothness import weighted_smoothness

__all__ = [
    "NORMALIZATIONS",
    "snr_weight",
    "SNRWeightedMSELoss",
    "BetaNLLLoss",
    "HeteroscedasticNLLLoss",
    "DisplacementUncertaintyRegLoss",
]

NORMALIZATIONS = ("minmax", "none", "percentile", "mean_variance", "unit_mean")


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


class HeteroscedasticNLLLoss(BetaNLLLoss):
    """Joint heteroscedastic Gaussian negative log-likelihood, Eq. 3 of the paper (Kendall & Gal, 2017):

    .. math::
        \\mathcal{L} = \\mathbb{E}_\\Omega\\Big[\\,c\\,\\Big(\\frac{(I_f - \\hat I_f)^2}{\\hat\\sigma_I^2}
        + \\log\\hat\\sigma_I^2\\Big)\\Big]

    It is Eq. 5 with β = 0 and no stop-gradient: one objective trains both estimators (the NLL baseline).
    Unlike ``torch.nn.GaussianNLLLoss`` (a variance input, ε-clamped), it takes the log-variance s = log σ̂², with the
    clamp and the ``half`` factor of :class:`BetaNLLLoss`.
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
