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

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = [
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


def snr_weight(
    fixed: torch.Tensor,
    log_var: torch.Tensor,
    gamma: float = 0.5,
    snr_form: str = "variance",
    normalization: str = "minmax",
    log_var_min: float = -15.0,
    log_var_max: float = 15.0,
) -> torch.Tensor:
    """The adaptive weight of Eq. 4, ``sigmoid(r)``, always detached (``sg``).

    ``r`` is the exponentiated relative signal-to-noise ratio:

    - ``snr_form="std"`` (Eq. 4 as printed): ``r = (I_f / σ̂)^(2γ)``;
    - ``snr_form="variance"`` (the authors' code, default): ``r = (I_f / σ̂²)^γ``.

    ``normalization="minmax"`` (the authors' code, default) rescales ``r`` to [0, 1] over the whole batch before
    the sigmoid, so weights lie in [0.5, 0.731]; where ``r`` is constant (γ = 0) it gives 0, i.e. uniform weights
    of 0.5 (the authors' code gives 0/0 = NaN there). ``"none"`` applies the sigmoid to ``r`` directly.
    γ = 0 makes the weight a constant in both cases: Eq. 4 becomes the plain MSE up to a factor.
    """
    with torch.no_grad():
        s = log_var.detach().float().clamp(log_var_min, log_var_max)
        base = fixed.detach().float().clamp_min(0.0)
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
        elif normalization != "none":
            raise ValueError(f"normalization must be 'minmax' or 'none', got {normalization!r}.")
        return torch.sigmoid(r)


class SNRWeightedMSELoss(_Loss):
    """Data term of the displacement loss, Eq. 4 of the paper:

    .. math::
        \\mathcal{L}_\\theta^{data} = \\mathbb{E}_\\Omega\\big[\\,\\mathrm{sigmoid}\\big((I_f / sg(\\hat\\sigma_I))^{2\\gamma}\\big)
        \\,(I_f - \\hat I_f)^2\\big]

    with the weight computed by :func:`snr_weight` from the variance estimator's log σ̂² (no gradient ever reaches
    the variance estimator through this loss). The smoothness term λ‖∇z‖² is :class:`GradientSmoothnessLoss`.

    Args:
        gamma: the exponent γ (paper default 0.5; 0 gives a constant weight, i.e. MSE up to a factor).
        snr_form: ``"variance"`` (authors' code, default) or ``"std"`` (Eq. 4 as printed), see :func:`snr_weight`.
        normalization: ``"minmax"`` (authors' code, default) or ``"none"`` (Eq. 4 as printed).
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
        snr_weight(torch.ones(1), torch.zeros(1), self.gamma, snr_form, normalization)  # validate the options

    def weight_map(self, fixed: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        return snr_weight(
            fixed, log_var, self.gamma, self.snr_form, self.normalization, self.log_var_min, self.log_var_max
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
