"""Losses, one equation per class (MONAI ``_Loss`` subclasses with ``reduction``), split by concern:

- :mod:`scripts.losses.heteroscedastic`: the paper's framework (Zhang et al., MICCAI 2024): the Eq. 4 weight
  :func:`snr_weight` and :class:`SNRWeightedMSELoss`, Eq. 5 :class:`BetaNLLLoss`, Eq. 3
  :class:`HeteroscedasticNLLLoss`, and the displacement-uncertainty extension :class:`DisplacementUncertaintyRegLoss`.
- :mod:`scripts.losses.smoothness`: λ‖∇z‖² (:class:`GradientSmoothnessLoss`) and its weighted form
  :func:`weighted_smoothness`.
- :mod:`scripts.losses.baselines`: the comparison's baselines (VoxelMorph-diff, AdaReg, AdaFrame; docs/baselines.md).

Configs name every class as ``scripts.losses.<Name>`` (the names re-exported below).
"""

from scripts.losses.baselines import (
    AdaFrameMSELoss,
    AdaFrameSmoothnessLoss,
    AdaRegSmoothnessLoss,
    ImageSigmaMSELoss,
    VxmDiffKLLoss,
    adaframe_weight,
    adareg_weight,
    degree_map,
)
from scripts.losses.heteroscedastic import (
    NORMALIZATIONS,
    BetaNLLLoss,
    DisplacementUncertaintyRegLoss,
    HeteroscedasticNLLLoss,
    SNRWeightedMSELoss,
    snr_weight,
)
from scripts.losses.smoothness import GradientSmoothnessLoss, weighted_smoothness

__all__ = [
    "NORMALIZATIONS",
    "snr_weight",
    "SNRWeightedMSELoss",
    "BetaNLLLoss",
    "HeteroscedasticNLLLoss",
    "GradientSmoothnessLoss",
    "weighted_smoothness",
    "DisplacementUncertaintyRegLoss",
    "ImageSigmaMSELoss",
    "adareg_weight",
    "AdaRegSmoothnessLoss",
    "adaframe_weight",
    "AdaFrameMSELoss",
    "AdaFrameSmoothnessLoss",
    "degree_map",
    "VxmDiffKLLoss",
]
