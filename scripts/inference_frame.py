"""The canonical frame of inference (``orientation: canonical``): array axes sorted by world axis, pointing to +."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scripts.data import DataError
from scripts.data.contracts import affine4

__all__ = ["CanonicalFrame"]


class CanonicalFrame:
    """The permutation and flips that bring a (C, *spatial) array of a grid to the canonical frame and back.

    Canonical: array axes sorted by the world axis they point along, each pointing to + (nibabel's
    ``io_orientation``; RAS for a 3D image). Canonical axis j is input axis ``order[j]``."""

    def __init__(self, affine: Any, nd: int):
        from nibabel.orientations import io_orientation

        a = affine4(affine)
        sub = np.zeros((4, nd + 1))
        sub[:3, :nd], sub[:3, nd], sub[3, nd] = a[:3, :nd], a[:3, 3], 1.0
        ornt = io_orientation(sub)
        if not np.isfinite(ornt).all():
            raise DataError("orientation: the fixed image's affine is degenerate; use --orientation none.")
        self.order = [int(i) for i in np.argsort(ornt[:, 0], kind="stable")]
        self.inverse = [int(i) for i in np.argsort(self.order)]
        self.flips = [i for i in range(nd) if ornt[i, 1] < 0]
        self.signs = torch.tensor([-1.0 if i in self.flips else 1.0 for i in range(nd)])
        self.identity = self.order == list(range(nd)) and not self.flips

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if self.flips:
            x = x.flip([1 + i for i in self.flips])
        return x.permute(0, *[1 + i for i in self.order]).contiguous()

    def from_canonical(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        x = x.permute(0, *[1 + i for i in self.inverse])
        if self.flips:
            x = x.flip([1 + i for i in self.flips])
        return x.contiguous()

    def ddf_from_canonical(self, ddf: torch.Tensor) -> torch.Tensor:
        """Spatial axes back to the input frame, channel j (canonical axis j) to input axis ``order[j]``, signed."""
        if self.identity:
            return ddf
        d = self.from_canonical(ddf)[self.inverse]
        return d * self.signs.to(d).view(-1, *([1] * (d.ndim - 1)))
