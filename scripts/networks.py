"""Networks of the bundle that MONAI does not provide as they are.

- :class:`VoxelMorphDisplacement`: the displacement estimator q_θ. MONAI's ``VoxelMorphUNet`` backbone with the
  original VoxelMorph (Dalca et al. 2019) integration head: a stationary velocity field at half resolution,
  scaling-and-squaring by MONAI ``DVF2DDF``, resized back to full resolution. ``forward(x, return_field=True)``
  also returns the velocity for the regulariser, which MONAI's ``VoxelMorph`` does not expose.
- :class:`DisplacementUncertaintyNet`: q_θ with a displacement-uncertainty head (Supp. Mat., VoxelMorph-diff).
- :class:`VarianceUNet`: the authors' variance estimator h_φ.
- TransMorph lives in :mod:`scripts.transmorph` and is re-exported here.

The displacement networks share one contract (docs/CONTRACTS.md): ``forward(x)`` returns the DDF (what MONAI Label,
``monai.bundle.load``, the traced ``models/model.ts`` and ``Warp`` pipelines use); ``forward(x, return_field=True)``
returns ``(ddf, field)``, the field being what the smoothness regulariser acts on. :func:`network_forward` calls
any network, with or without ``return_field``, the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from monai.networks.nets import VoxelMorphUNet
from torch import nn

# TransMorph is importable from here too (``scripts.networks.TransMorph``), loaded lazily by ``__getattr__``
__all__ = ["VoxelMorphDisplacement", "init_flow_head", "network_forward"]


def network_forward(network: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(ddf, field, *extra)`` of a displacement network on ``x = cat([moving, fixed], 1)``.

    Networks whose ``forward`` takes ``return_field`` (this module's and :class:`~scripts.transmorph.TransMorph`)
    are called with ``return_field=True``; any other network (e.g. MONAI's ``VoxelMorph`` or ``LocalNet``) returns
    the DDF only, which is then the field too. ``network`` may be wrapped (``DistributedDataParallel``: keyword
    arguments reach the module's forward) or compiled (``torch.compile``)."""
    if _takes_return_field(type(_wrapped(network))):
        return tuple(network(x, return_field=True))
    ddf = network(x)
    return ddf, ddf


def _wrapped(network: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        inner = getattr(network, attr, None)
        if isinstance(inner, nn.Module):
            return _wrapped(inner)
    return network


@functools.lru_cache(maxsize=None)
def _takes_return_field(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    try:
        return forward is not None and "return_field" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def init_flow_head(module: nn.Module, std: float = 1e-5) -> None:
    """Initialise the last convolution of ``module`` near zero (Normal(0, std), zero bias), as VoxelMorph does,
    so that training starts from the identity transform."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError("init_flow_head: the module has no convolution.")
    nn.init.normal_(convs[-1].weight, mean=0.0, std=std)
    if convs[-1].bias is not None:
        nn.init.zeros_(convs[-1].bias)


def _backbone(spatial_dims: int, channels: Sequence[int], final_conv_channels: Sequence[int]) -> VoxelMorphUNet:
    """MONAI's VoxelMorph U-Net on cat([moving or warped, fixed]), shared by q_θ and h_φ."""
    return VoxelMorphUNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        unet_out_channels=channels[-1],
        channels=tuple(channels),
        final_conv_channels=tuple(final_conv_channels),
    )


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

    ``forward(x, return_field=True)`` returns ``(ddf, field)``, the field the smoothness regulariser acts on (the
    half-resolution velocity, or the DDF itself when ``integration_steps == 0``).
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
        self.backbone = _backbone(spatial_dims, channels, final_conv_channels)
        init_flow_head(self.backbone, init_std)
        self.integration_steps = int(integration_steps)
        self.half_res = bool(half_res) and self.integration_steps > 0
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.dvf2ddf = DVF2DDF(num_steps=max(self.integration_steps, 1), mode="bilinear", padding_mode="zeros")

    def forward(self, x: torch.Tensor, return_field: bool = False):
        """The DDF of ``x = cat([moving, fixed], 1)``; ``(ddf, field)`` with ``return_field``."""
        if x.shape[1] != 2:
            raise ValueError(f"expected cat([moving, fixed], dim=1) with 2 channels, got shape {tuple(x.shape)}.")
        flow = self.backbone(x)
        if self.half_res:
            flow = F.interpolate(flow, scale_factor=0.5, mode=self.mode, align_corners=True) * 0.5
        ddf = self.integrate(flow, x.shape[2:])
        return (ddf, flow) if return_field else ddf

    def integrate(self, field: torch.Tensor, size) -> torch.Tensor:
        """The head: the DDF at the image ``size`` of ``field`` as ``forward(x, return_field=True)`` returns it —
        scaling and squaring, then for a half-resolution field the upsampling with values ×2 (the field itself
        without integration). Test-time field optimisation (scripts/instance_optimisation.py) integrates through it."""
        if self.integration_steps == 0:
            return field
        ddf = self.dvf2ddf(field)
        if self.half_res:
            ddf = F.interpolate(ddf, size=tuple(size), mode=self.mode, align_corners=True) * 2.0
        return ddf


def __getattr__(name):
    if name == "TransMorph":
        from scripts.transmorph import TransMorph

        return TransMorph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ==================================================================================================================
# Displacement uncertainty (the paper's Supp. Mat. extension, and VoxelMorph-diff)
# ==================================================================================================================

__all__ += ["DisplacementUncertaintyNet"]

_LOG_QUARTER = -1.3862943611198906  # log(0.25): variance of a field whose values are halved


class DisplacementUncertaintyNet(nn.Module):
    """VoxelMorph with a displacement-uncertainty head: ``forward(cat([moving, fixed], 1)) -> DDF`` (the contract).

    The backbone of a :class:`VoxelMorphDisplacement` (``base``) predicts the mean field μ̂_z with its flow head, and
    one extra 3×3 convolution on the same features predicts log σ̂_z² (the "additional layer" of the paper's Supp.
    Mat.). The field is then, as in VoxelMorph-diff (Dalca et al. 2019):

    - training mode: ẑ = μ̂_z + σ̂_z ⊙ ε, ε ~ N(0, I) (reparameterisation trick); eval mode: ẑ = μ̂_z;
    - ẑ is the stationary velocity that the base integrates (downsampled by 2 first when ``half_res``: values
      halved, log-variance + log ¼), or the DDF itself when the base has ``integration_steps == 0``.

    ``sigma_channels=1``: isotropic σ̂_z(x) ∈ ℝ, the paper's extension (``configs/variants/loss/ours_dispunc.yaml``);
    ``sigma_channels=spatial_dims``: one variance per component, VoxelMorph-diff (``vxm_diff.yaml``).
    The head starts at log σ̂² = ``log_var_init`` (-10, VoxelMorph's initialisation) with weights N(0, init_std).

    ``forward(x, return_field=True)`` returns ``(ddf, ẑ, μ̂_z, log σ̂_z²)``: ẑ is the field the smoothness term acts
    on, μ̂_z and log σ̂_z² are on the field's grid; the trainer passes the last two to losses that ask for
    ``field_mean`` / ``log_sigma_z`` (:func:`network_forward`). :meth:`sigma_z` gives the σ̂_z map at image
    resolution for inference.

    Args:
        base: a :class:`VoxelMorphDisplacement` (or ``None``: built from ``base_kwargs``). Its weights are reused;
            only its modules are re-arranged (trunk, flow head), so build it for this network.
        sigma_channels: 1 (isotropic) or spatial_dims.
        log_var_init, init_std: initialisation of the log-variance head.
    """

    def __init__(
        self,
        base: nn.Module | None = None,
        sigma_channels: int = 1,
        log_var_init: float = -10.0,
        init_std: float = 1e-10,
        **base_kwargs,
    ) -> None:
        super().__init__()
        if base is None:
            base = VoxelMorphDisplacement(**base_kwargs)
        elif base_kwargs:
            raise ValueError(f"give either base or its keyword arguments, not both ({sorted(base_kwargs)}).")
        net = getattr(getattr(base, "backbone", None), "net", None)
        if not isinstance(base, VoxelMorphDisplacement) or not isinstance(net, nn.Sequential) or len(net) != 2:
            raise TypeError("DisplacementUncertaintyNet needs a scripts.networks.VoxelMorphDisplacement base.")
        self.spatial_dims = base.spatial_dims
        if sigma_channels not in (1, self.spatial_dims):
            raise ValueError(f"sigma_channels must be 1 or spatial_dims={self.spatial_dims}, got {sigma_channels}.")
        final = list(net[1].children())
        self.trunk = nn.Sequential(net[0], *final[:-1])
        self.mean_head = final[-1]
        head_convs = [m for m in self.mean_head.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
        self.log_var_head = conv(head_convs[-1].in_channels, int(sigma_channels), kernel_size=3, padding=1)
        nn.init.normal_(self.log_var_head.weight, mean=0.0, std=init_std)
        nn.init.constant_(self.log_var_head.bias, float(log_var_init))
        self.sigma_channels = int(sigma_channels)
        self.integration_steps = base.integration_steps
        self.half_res = base.half_res
        self.mode = base.mode
        self.dvf2ddf = base.dvf2ddf

    def field_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ̂_z, log σ̂_z²) on the grid of the field the network integrates."""
        if x.shape[1] != 2:
            raise ValueError(f"expected cat([moving, fixed], dim=1) with 2 channels, got shape {tuple(x.shape)}.")
        h = self.trunk(x)
        mean = self.mean_head(h)
        log_var = self.log_var_head(h)
        if self.half_res:
            mean = F.interpolate(mean, scale_factor=0.5, mode=self.mode, align_corners=True) * 0.5
            log_var = F.interpolate(log_var, scale_factor=0.5, mode=self.mode, align_corners=True) + _LOG_QUARTER
        return mean, log_var

    def forward(self, x: torch.Tensor, return_field: bool = False):
        """The DDF of ``x = cat([moving, fixed], 1)``; ``(ddf, ẑ, μ̂_z, log σ̂_z²)`` with ``return_field``."""
        mean, log_var = self.field_distribution(x)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if self.training else mean
        ddf = self.integrate(z, x.shape[2:])
        return (ddf, z, mean, log_var) if return_field else ddf

    integrate = VoxelMorphDisplacement.integrate  # the base's head (same attributes)

    def sigma_z(self, x: torch.Tensor) -> torch.Tensor:
        """σ̂_z at image resolution, in image voxels (B, sigma_channels, *spatial), without sampling or gradient.

        It is the standard deviation of the predicted field: of the DDF when ``integration_steps == 0``, of the
        stationary velocity otherwise (upsampled, and ×2 back to full-resolution voxels when ``half_res``), which
        approximates the displacement's for small deformations (VoxelMorph-diff reports the same quantity)."""
        with torch.no_grad():
            _, log_var = self.field_distribution(x)
            sigma = torch.exp(0.5 * log_var)
            if tuple(sigma.shape[2:]) != tuple(x.shape[2:]):
                sigma = F.interpolate(sigma, size=x.shape[2:], mode=self.mode, align_corners=True)
            return sigma * (2.0 if self.half_res else 1.0)


# ==================================================================================================================
# Variance estimator h_φ (the authors' architecture)
# ==================================================================================================================

__all__ += ["VarianceUNet", "level_bias"]


class VarianceUNet(nn.Module):
    """The authors' variance estimator h_φ: ``forward(cat([warped, fixed], 1)) -> log σ̂²`` (B, 1, *spatial).

    The VoxelMorph U-Net of the authors' code (MONAI ``VoxelMorphUNet``: encoder 16-32-32-32, decoder
    32-32-32-32-32-16-16, LeakyReLU 0.2, max-pooling, no normalisation) with a plain 3×3 convolution 16 → 1 as the
    head and no activation after it: 109,025 parameters in 2D and 326,465 in 3D (the same recipe; the displacement
    net's 16 → n flow head is replaced by the 16 → 1 head).

    **Output level.** Nothing normalises the features, so every parameter can move the mean log σ̂²; the head's
    bias *is* the level (adding c to it adds c to log σ̂² everywhere). It is initialised to ``log_var_init``
    (default 0: σ̂² ≈ 1 at the start, as with PyTorch's default initialisation in the authors' code; every other
    weight keeps PyTorch's default). :meth:`init_level` sets it; ``scripts.handlers.VarianceLevelInit`` sets it from
    the data (log of the mean squared residual of the first batches) before training, which train.yaml does by
    default. Compare MONAI's ``UNet(norm="instance")``, the former default (``configs/variants/arch/
    variance_unet.yaml``): its last block normalises the one output channel to mean 0 / std 1 before a 1 → 1
    convolution, so only that convolution's two parameters set the level.

    Args:
        spatial_dims: 2 or 3.
        channels: ``VoxelMorphUNet`` feature widths (encoder then decoder), as the displacement network.
        final_conv_channels: widths of the full-resolution convolutions before the head.
        log_var_init: initial value of the head's bias (log σ̂²); ``None`` keeps PyTorch's default bias.
        output_smoothing: Gaussian σ in voxels (0: off, the authors' network). When > 0 the variance map is
            smoothed before it is returned, log σ̂² = log(G * σ̃² / G * 1) with σ̃² the head's exp output and G the
            Gaussian (separable, zero padding, normalised at the borders): h_φ sees I_f and Î_f, so it can follow
            the realised residual pixel by pixel, which Eq. 5 rewards; a smooth map must model the local variance
            instead (docs/uncertainty.md). No parameters: the state dict is the same with or without it.
        input_smoothing: Gaussian σ in voxels (0: off, the authors' network). When > 0 both input channels are
            low-passed before the U-Net, x ← G * x / G * 1 (the same normalised Gaussian): h_φ then cannot read the
            realised speckle and noise of either frame, so Eq. 5 can only fit the residual's *expected* square given
            the local appearance (brightness, depth, artefacts, edges), pooled over the training pairs; the residual
            it is trained on (I_f − Î_f at full resolution) is unchanged. No parameters either.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32, 32, 32),
        final_conv_channels: Sequence[int] = (16, 16),
        log_var_init: float | None = 0.0,
        output_smoothing: float = 0.0,
        input_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not float(output_smoothing) >= 0.0:
            raise ValueError(f"output_smoothing must be >= 0 (a Gaussian sigma in voxels), got {output_smoothing}.")
        if not float(input_smoothing) >= 0.0:
            raise ValueError(f"input_smoothing must be >= 0 (a Gaussian sigma in voxels), got {input_smoothing}.")
        self.output_smoothing = float(output_smoothing)
        self.input_smoothing = float(input_smoothing)
        from monai.networks.layers.convutils import gaussian_1d

        for name, sigma in (("smoothing_kernel", self.output_smoothing), ("input_kernel", self.input_smoothing)):
            if sigma > 0:
                kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, approx="sampled", normalize=True)
                self.register_buffer(name, kernel.float(), persistent=False)
        if len(final_conv_channels) < 1:
            raise ValueError("final_conv_channels needs at least one width (the head's input).")
        self.spatial_dims = spatial_dims
        self.backbone = _backbone(spatial_dims, channels, final_conv_channels)
        self.backbone.net[1].final_conv_out = nn.Identity()  # VoxelMorph's n-channel flow conv; our head replaces it
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(int(final_conv_channels[-1]), 1, kernel_size=3, padding=1)
        if log_var_init is not None:
            self.init_level(log_var_init)

    @torch.no_grad()
    def init_level(self, value: float) -> None:
        """Set the output level: the head's bias = ``value`` (log σ̂² where the head's weighted features are 0)."""
        self.head.bias.fill_(float(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 2:
            raise ValueError(f"expected cat([warped, fixed], dim=1) with 2 channels, got shape {tuple(x.shape)}.")
        if self.input_smoothing > 0:
            x = self._normalised_gaussian(x, self.input_kernel)
        log_var = self.head(self.backbone(x))
        return self._smooth(log_var) if self.output_smoothing > 0 else log_var

    def _normalised_gaussian(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """G * x / G * 1 per channel: separable Gaussian, zero padding, renormalised at the borders."""
        from monai.networks.layers.simplelayers import separable_filtering

        kernels = [kernel.to(x)] * self.spatial_dims
        num = separable_filtering(x, kernels, mode="zeros")
        den = separable_filtering(torch.ones_like(x[:1, :1]), kernels, mode="zeros")
        return num / den

    def _smooth(self, log_var: torch.Tensor) -> torch.Tensor:
        """log(G * exp(log_var) / G * 1), computed with the per-image maximum factored out (no overflow)."""
        dims = tuple(range(2, log_var.ndim))
        top = log_var.detach().amax(dim=dims, keepdim=True)
        smoothed = self._normalised_gaussian(torch.exp(log_var - top), self.smoothing_kernel)
        return torch.log(torch.clamp(smoothed, min=torch.finfo(log_var.dtype).tiny)) + top


def level_bias(module: nn.Module) -> nn.Parameter:
    """The parameter that shifts a variance network's output uniformly: the head's bias of a :class:`VarianceUNet`,
    else the bias of the module's last convolution (for MONAI's ``UNet`` the final 1-channel convolution, after its
    normalisation). Raises when there is none."""
    module = getattr(module, "module", module)  # DistributedDataParallel
    if isinstance(module, VarianceUNet):
        return module.head.bias
    convs = [
        m
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and m.bias is not None
    ]
    if not convs or convs[-1].out_channels != 1:
        raise ValueError(f"{type(module).__name__}: no final 1-channel convolution with a bias to set the level.")
    return convs[-1].bias
