"""Helpers shared by the loss modules: MONAI's reduction, boolean options from configs, required extra inputs."""

from __future__ import annotations

import torch
from monai.utils import LossReduction


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return x.mean()
    if reduction == LossReduction.SUM.value:
        return x.sum()
    if reduction == LossReduction.NONE.value:
        return x
    raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')


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


def _need(value: torch.Tensor | None, name: str, cls: str) -> torch.Tensor:
    if value is None:
        raise ValueError(
            f"{cls} needs '{name}': use a displacement network with uncertainty "
            "(scripts.networks.DisplacementUncertaintyNet) so that the trainer passes it."
        )
    return value
