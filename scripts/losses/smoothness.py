"""Smoothness regularisers of the displacement field: λ‖∇z‖² (Eq. 4, the authors' ``Grad('l2')``) and its spatially
weighted form used by the adaptive baselines and the displacement-uncertainty extension."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from scripts.losses._utils import _reduce

__all__ = ["GradientSmoothnessLoss", "weighted_smoothness"]


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
        return _reduce(weighted_smoothness(field, None, self.multiplier), self.reduction)
