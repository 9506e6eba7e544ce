"""TransMorph (Chen et al., 2022) built from MONAI's Swin components.

Reference: J. Chen, E. C. Frey, Y. He, W. P. Segars, Y. Li, Y. Du, "TransMorph: Transformer for unsupervised medical
image registration", Medical Image Analysis 82 (2022) 102615; official code
https://github.com/junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration (``models/TransMorph.py``).

Architecture (as in the official ``TransMorph`` class, with ``if_transskip = if_convskip = True``):

* encoder: Swin transformer -- ``PatchEmbed`` (patch 4, LayerNorm), four stages of shifted-window attention
  (``monai.networks.nets.swin_unetr.BasicLayer`` without downsampling), ``PatchMerging`` (4C->2C in 2D, 8C->2C in 3D,
  i.e. the official ``pat_merg_rf=4``) between the stages, a LayerNorm on each stage output (``norm0..norm3``);
* two convolutional skips from the input: ``c1`` = conv-IN-LeakyReLU(2 -> embed/2) on the 3x3 average-pooled
  (half-resolution) input and ``c2`` = conv-IN-LeakyReLU(2 -> reg_head_chan) on the full-resolution input;
* decoder: five ``DecoderBlock`` = x2 (bi/tri)linear upsampling, concat skip, two conv-IN-LeakyReLU
  (here ``monai.networks.blocks.UnetBasicBlock``):
  (8E -> 4E, skip 4E), (4E -> 2E, skip 2E), (2E -> E, skip E), (E -> E/2, skip E/2 from ``c1``),
  (E/2 -> 16, skip 16 from ``c2``);
* registration head: 3x3 conv 16 -> ndim, weights ~ Normal(0, 1e-5), bias 0.

Parameter counts (``count_parameters``): 2D default (embed 96, depths 2-2-4-2, heads 4-4-8-8, window 8x8, 128x128)
= 31,013,570, identical to the official code transposed to 2D. 3D, 64^3, window 4x4x4 (:func:`transmorph_3d_config`):
embed 48 / heads 4-4-4-4 (the official "TransMorph-Small" widths) = 11,719,435; embed 96 / heads 4-4-8-8 (the full
official widths) = 46,710,835 (the official 3D model at 160x192x224 with window 5x6x7 has 46,771,251 -- only the
relative-position tables, which depend on the window, differ).

Differences from the official code (none changes the parameter count):
* MONAI's ``BasicLayer`` shrinks the attention window to the feature map (and disables the shift) when a feature
  map is not larger than the window (the official code pads the map to the window instead);
* MONAI's 3D ``PatchMerging`` concatenates the eight sub-grids in a slightly different order (6th/7th swapped), so
  official 3D weights cannot be loaded 1:1; the 2D order is the original Swin order.

Contract (docs/CONTRACTS.md): ``forward(cat([moving, fixed], 1))`` -> DDF (B, ndim, *spatial) in voxels, channel i =
displacement along array axis i, as ``monai.networks.blocks.Warp`` takes it. With ``integration_steps > 0`` the head
output is a stationary velocity field integrated by scaling and squaring (``monai.networks.blocks.DVF2DDF``);
``forward(x, return_field=True)`` returns ``(ddf, field)``, the field a smoothness regulariser should act on (the
velocity, or the DDF itself).

TorchScript: ``torch.jit.trace`` works (2D and 3D, for the traced input size); ``torch.jit.script`` does not, because
MONAI's ``BasicLayer`` uses einops and numpy in its forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import DVF2DDF, Convolution, PatchEmbed, UnetBasicBlock
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging, compute_mask, get_window_size
from monai.utils import ensure_tuple_rep

__all__ = ["TransMorph", "count_parameters", "transmorph_2d_config", "transmorph_3d_config", "PARAMS_2D_DEFAULT"]

#: parameters of ``TransMorph()`` (2D default); equal to the official TransMorph transposed to 2D.
PARAMS_2D_DEFAULT = 31_013_570

_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
_NORM = ("instance", {"affine": False})


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def transmorph_2d_config() -> dict:
    """Official TransMorph widths at 128x128 (31,013,570 parameters)."""
    return dict(
        spatial_dims=2,
        img_size=(128, 128),
        embed_dim=96,
        depths=(2, 2, 4, 2),
        num_heads=(4, 4, 8, 8),
        window_size=(8, 8),
    )


def transmorph_3d_config(embed_dim: int = 48) -> dict:
    """A 3D configuration for 64^3 volumes: feature maps 16^3, 8^3, 4^3, 2^3; window 4^3.

    ``embed_dim=96, num_heads=(4, 4, 8, 8)`` is the full official configuration (heavy on CPU); the default
    ``embed_dim=48, num_heads=(4, 4, 4, 4)`` follows the official "TransMorph-Small".
    """
    heads = (4, 4, 8, 8) if embed_dim >= 96 else (4, 4, 4, 4)
    return dict(
        spatial_dims=3,
        img_size=(64, 64, 64),
        embed_dim=embed_dim,
        depths=(2, 2, 4, 2),
        num_heads=heads,
        window_size=(4, 4, 4),
    )


class _DecoderBlock(nn.Module):
    """x2 upsampling, concatenation of the skip, two conv-InstanceNorm-LeakyReLU (official ``DecoderBlock``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=False)
        self.conv = UnetBasicBlock(
            spatial_dims,
            in_channels + skip_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            norm_name=_NORM,
            act_name=_ACT,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:  # odd sizes: match the skip (the official code requires even sizes)
            x = nn.functional.interpolate(x, size=skip.shape[2:], mode=self.up.mode, align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class TransMorph(nn.Module):
    """TransMorph displacement network (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (2: moving and fixed).
        img_size: expected input size; only checked for divisibility (the network is fully convolutional / windowed
            and accepts sizes divisible by ``patch_size * 2**(len(depths) - 1)``, i.e. 32 by default).
        embed_dim: patch embedding dimension E (stage widths E, 2E, 4E, 8E).
        depths: Swin blocks per stage (4 stages).
        num_heads: attention heads per stage.
        window_size: attention window (int or tuple); default 8 (2D) / 4 (3D).
        patch_size: patch embedding size (the decoder assumes 4: two conv-skip levels above the first stage).
        mlp_ratio: MLP hidden width / embedding width.
        qkv_bias: bias in the q, k, v projection (official config: False).
        drop_rate, attn_drop_rate: dropout rates.
        drop_path_rate: stochastic depth, linearly increasing over the blocks (official: 0.3).
        reg_head_chan: channels of the last decoder block / registration head input (official: 16).
        integration_steps: 0 -> the head output is the DDF; > 0 -> it is a stationary velocity field integrated
            with that many scaling-and-squaring steps (diffeomorphic variant).
        use_checkpoint: gradient checkpointing in the Swin blocks.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        img_size: Sequence[int] | int = (128, 128),
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (4, 4, 8, 8),
        window_size: Sequence[int] | int | None = None,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        reg_head_chan: int = 16,
        integration_steps: int = 0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("TransMorph has four Swin stages: depths and num_heads need 4 entries.")
        if patch_size != 4:
            raise ValueError("the TransMorph decoder (two conv skips above the first stage) needs patch_size=4.")
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even, got {embed_dim}.")
        if window_size is None:
            window_size = 8 if spatial_dims == 2 else 4
        self.spatial_dims = spatial_dims
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.window_size = ensure_tuple_rep(window_size, spatial_dims)
        factor = patch_size * 2 ** (len(depths) - 1)
        if any(s % factor for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be divisible by {factor} (patch_size * 2**3).")
        self.embed_dim = embed_dim
        self.integration_steps = int(integration_steps)
        e = embed_dim

        # ---- Swin encoder
        self.patch_embed = PatchEmbed(
            patch_size=patch_size, in_chans=in_channels, embed_dim=e, norm_layer=nn.LayerNorm, spatial_dims=spatial_dims
        )
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.num_features = [e * 2**i for i in range(4)]
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i in range(4):
            self.layers.append(
                BasicLayer(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=self.window_size,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    norm_layer=nn.LayerNorm,
                    downsample=None,
                    use_checkpoint=use_checkpoint,
                )
            )
            self.norms.append(nn.LayerNorm(self.num_features[i]))
            if i < 3:
                merge = PatchMerging(dim=self.num_features[i], norm_layer=nn.LayerNorm, spatial_dims=spatial_dims)
                self.merges.append(merge)

        # ---- convolutional skips from the input (full and half resolution)
        pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
        self.avg_pool = pool(3, stride=2, padding=1)
        self.c1 = Convolution(spatial_dims, in_channels, e // 2, kernel_size=3, act=_ACT, norm=_NORM, bias=False)
        self.c2 = Convolution(spatial_dims, in_channels, reg_head_chan, kernel_size=3, act=_ACT, norm=_NORM, bias=False)

        # ---- decoder
        self.up0 = _DecoderBlock(spatial_dims, e * 8, e * 4, e * 4)
        self.up1 = _DecoderBlock(spatial_dims, e * 4, e * 2, e * 2)
        self.up2 = _DecoderBlock(spatial_dims, e * 2, e, e)
        self.up3 = _DecoderBlock(spatial_dims, e, e // 2, e // 2)
        self.up4 = _DecoderBlock(spatial_dims, e // 2, reg_head_chan, reg_head_chan)

        # ---- registration head: conv to ndim channels, N(0, 1e-5) weights, zero bias
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.reg_head = conv(reg_head_chan, spatial_dims, kernel_size=3, padding=1)
        with torch.no_grad():
            self.reg_head.weight.normal_(0.0, 1e-5)
            self.reg_head.bias.zero_()

        self.dvf2ddf = DVF2DDF(num_steps=self.integration_steps) if self.integration_steps > 0 else None

    # channel-first <-> channel-last
    def _to_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1) if x.dim() == 4 else x.permute(0, 2, 3, 4, 1)

    def _to_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(0, 4, 1, 2, 3)

    @staticmethod
    def _run_stage(layer: BasicLayer, x: torch.Tensor) -> torch.Tensor:
        """``BasicLayer.forward`` (downsample=None) on a channel-last map, without MONAI's einops dependency."""
        size = tuple(int(s) for s in x.shape[1:-1])
        window, shift = get_window_size(size, layer.window_size, layer.shift_size)
        padded = [-(-s // w) * w for s, w in zip(size, window)]
        mask = compute_mask(padded, window, shift, x.device)
        for blk in layer.blocks:
            x = blk(x, mask)
        return x

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised outputs of the four Swin stages, channel-first (strides 4, 8, 16, 32)."""
        x = self._to_last(self.pos_drop(self.patch_embed(x))).contiguous()  # (B, *s, C)
        outs = []
        for i, layer in enumerate(self.layers):
            x = self._run_stage(layer, x)
            outs.append(self._to_first(self.norms[i](x)).contiguous())
            if i < len(self.merges):
                x = self.merges[i](x)
        return outs

    def forward(self, x: torch.Tensor, return_field: bool = False):
        """The DDF of ``x = cat([moving, fixed], 1)``; ``(ddf, field)`` with ``return_field``."""
        f4 = self.c1(self.avg_pool(x))  # half resolution
        f5 = self.c2(x)  # full resolution
        feats = self.encode(x)
        y = self.up0(feats[3], feats[2])
        y = self.up1(y, feats[1])
        y = self.up2(y, feats[0])
        y = self.up3(y, f4)
        y = self.up4(y, f5)
        field = self.reg_head(y)
        ddf = self.integrate(field, x.shape[2:])
        return (ddf, field) if return_field else ddf

    def integrate(self, field: torch.Tensor, size=None) -> torch.Tensor:
        """The head: the DDF of ``field`` (scaling and squaring with ``integration_steps > 0``, else the field)."""
        return self.dvf2ddf(field) if self.dvf2ddf is not None else field
