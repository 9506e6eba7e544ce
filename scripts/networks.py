"""Networks of the bundle that MONAI does not provide as they are.

- :class:`VoxelMorphDisplacement`: the displacement estimator q_θ. MONAI's ``VoxelMorphUNet`` backbone with the
  original VoxelMorph (Dalca et al. 2019) integration head: a stationary velocity field at half resolution,
  scaling-and-squaring by MONAI ``DVF2DDF``, resized back to full resolution. It exposes the velocity for the
  regulariser (``last_velocity``), which MONAI's ``VoxelMorph`` does not.
- The variance estimator h_φ is MONAI's ``UNet`` declared in ``configs/train.yaml`` (no code here).
- TransMorph lives in :mod:`scripts.transmorph` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from monai.networks.nets import VoxelMorphUNet
from torch import nn

__all__ = ["VoxelMorphDisplacement", "init_flow_head", "TransMorph"]


def init_flow_head(module: nn.Module, std: float = 1e-5) -> None:
    """Initialise the last convolution of ``module`` near zero (Normal(0, std), zero bias), as VoxelMorph does,
    so that training starts from the identity transform."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError("init_flow_head: the module has no convolution.")
    nn.init.normal_(convs[-1].weight, mean=0.0, std=std)
    if convs[-1].bias is not None:
        nn.init.zeros_(convs[-1].bias)


class VoxelMorphDisplacement(nn.Module):
    """VoxelMorph displacement estimator: ``forward(cat([moving, fixed], 1)) -> DDF``.

    With the defaults this is the diffeomorphic VoxelMorph of the authors' code (encoder 16-32-32-32, decoder
    32-32-32-32-32-16-16, 7 scaling-and-squaring steps on a half-resolution velocity field): 109,170 parameters
    in 2D and 327,331 in 3D.

    The velocity is downsampled by 2 (and its values halved, to stay in voxel units of the coarse grid),
    integrated, then the displacement is upsampled back (values doubled). ``integration_steps=0`` gives the plain
    (non-diffeomorphic) VoxelMorph, whose output is the DDF itself.

    Args:
        spatial_dims: 2 or 3.
        channels: ``VoxelMorphUNet`` feature widths (encoder then decoder).
        final_conv_channels: widths of the convolutions after the U-Net.
        integration_steps: scaling-and-squaring steps (0: no integration).
        half_res: integrate at half resolution.
        init_std: std of the initial weights of the flow head.

    After each eager forward, ``last_velocity`` holds the field the smoothness regulariser acts on (the
    half-resolution velocity, or the DDF when ``integration_steps == 0``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32, 32, 32),
        final_conv_channels: Sequence[int] = (16, 16),
        integration_steps: int = 7,
        half_res: bool = True,
        init_std: float = 1e-5,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.backbone = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            unet_out_channels=channels[-1],
            channels=tuple(channels),
            final_conv_channels=tuple(final_conv_channels),
        )
        init_flow_head(self.backbone, init_std)
        self.integration_steps = int(integration_steps)
        self.half_res = bool(half_res) and self.integration_steps > 0
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.dvf2ddf = DVF2DDF(num_steps=max(self.integration_steps, 1), mode="bilinear", padding_mode="zeros")
        self.last_velocity: torch.Tensor | None = None

    @torch.jit.unused
    def _remember(self, velocity: torch.Tensor) -> None:
        self.last_velocity = velocity

    def __getstate__(self):
        # the cached field is part of an autograd graph: never copy or pickle it
        state = dict(super().__getstate__())
        state["last_velocity"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 2:
            raise ValueError(f"expected cat([moving, fixed], dim=1) with 2 channels, got shape {tuple(x.shape)}.")
        flow = self.backbone(x)
        if self.integration_steps == 0:
            if not torch.jit.is_scripting():
                self._remember(flow)
            return flow
        if self.half_res:
            flow = F.interpolate(flow, scale_factor=0.5, mode=self.mode, align_corners=True) * 0.5
        if not torch.jit.is_scripting():
            self._remember(flow)
        ddf = self.dvf2ddf(flow)
        if self.half_res:
            ddf = F.interpolate(ddf, size=x.shape[2:], mode=self.mode, align_corners=True) * 2.0
        return ddf


def __getattr__(name):
    if name == "TransMorph":
        from scripts.transmorph import TransMorph

        return TransMorph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
