"""Test-time instance optimisation: adapt the displacement network to one pair with the bundle's own loss.

For one pair (I_m, I_f), a copy of the trained displacement network q_θ is fine-tuned for ``steps`` Adam steps on
the displacement loss of the collaborative trainer (Eq. 4 + λ‖∇z‖², scripts/trainer.py):

.. math::
    \\mathcal{L}(\\theta) = \\mathbb{E}_\\Omega\\big[w \\,(I_f - I_m \\circ z_\\theta)^2\\big]
    + \\lambda\\,\\|\\nabla v_\\theta\\|^2,
    \\qquad w = \\mathrm{sg}\\big(\\mathrm{weight\\_map}(I_f, h_\\phi(\\mathrm{sg}(\\hat I_f), I_f))\\big)

with the SNR weight w from the frozen variance network h_φ (recomputed from the current Î_f every ``weight_every``
steps, as the displacement step of training does at every iteration), and the DDF of the adapted copy is returned.
The original network is never modified. Without a variance network (vanilla models) the weight is 1 (plain MSE
for :class:`~scripts.losses.SNRWeightedMSELoss`; a loss without ``weight_map``, e.g. LNCC, is called as
``sim_loss(Î_f, I_f)``). Why the weights and not the velocity field: docs/instance_optimisation.md.

Each pair of a batch is optimised on its own (one copy per pair). The networks run in eval mode (a displacement
network with a sampled field then uses its mean), so the result is deterministic given the seed.

:func:`optimise_field` is the field-level alternative (the default of the inference's ``instance_mode``): the
network is run once, and a coarse residual velocity r (zero at the start) is optimised instead of the weights,

.. math::
    v = v_\\theta + \\mathrm{up}(r), \\qquad z = \\exp(v), \\qquad
    \\mathcal{L}(r) = \\sum_{b} \\mathbb{E}_\\Omega\\big[w_b\\,(I_f - I_m \\circ z)^2\\big]
    + \\lambda\\,\\|\\nabla v\\|^2,

z integrated by the network's own scaling and squaring (and upsampling): diffeomorphic, and exactly the network's
DDF at r = 0. A step costs a few ms instead of a forward + backward of q_θ (docs/instance_optimisation.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from scripts.losses import GradientSmoothnessLoss, SNRWeightedMSELoss
from scripts.trainer import registration_forward

__all__ = ["optimise_pair", "adapt_network", "pair_loss", "pair_weight", "optimise_field", "integrate_field"]

logger = logging.getLogger(__name__)


def _inner(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside ``DistributedDataParallel`` (``module``) or ``torch.compile`` (``_orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(network, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _inner(inner)
    return network


def _defaults(warp, sim_loss, reg_loss):
    warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")  # train.yaml's warp
    sim_loss = sim_loss if sim_loss is not None else SNRWeightedMSELoss()
    reg_loss = reg_loss if reg_loss is not None else GradientSmoothnessLoss(multiplier=2.0)
    return warp, sim_loss, reg_loss


def pair_weight(
    variance_network: torch.nn.Module | None, sim_loss: Callable, warped: torch.Tensor, fixed: torch.Tensor
) -> torch.Tensor | None:
    """The Eq. 4 weight map ``sim_loss.weight_map(I_f, h_φ(sg(Î_f), I_f))``, without gradient; unit weights without
    a variance network; ``None`` when ``sim_loss`` has no ``weight_map`` (it is then called without weight)."""
    if not hasattr(sim_loss, "weight_map"):
        return None
    if variance_network is None:
        return torch.ones_like(fixed)
    with torch.no_grad():
        log_var = variance_network(torch.cat([warped.detach(), fixed], dim=1))
    return sim_loss.weight_map(fixed, log_var.float())


def pair_loss(
    network: torch.nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    variance_network: torch.nn.Module | None = None,
    weight: torch.Tensor | None = None,
    warp: Callable | None = None,
    sim_loss: Callable | None = None,
    reg_loss: Callable | None = None,
    lambda_reg: float = 0.01,
) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """``(loss, forward, weight)``: the displacement loss ``sim_loss(Î_f, I_f, weight=w) + λ · reg_loss(field)`` of
    ``network`` on the pair, with the forward pass of :func:`scripts.trainer.registration_forward` (``ddf``,
    ``field``, ``warped``). ``weight=None``: w from :func:`pair_weight` on this forward's Î_f (as the trainer's
    displacement step); a ``sim_loss`` without ``weight_map`` is called as ``sim_loss(Î_f, I_f, **extra_inputs)``.
    Losses get the ``extra_inputs`` they declare (``warped``, ``fixed``, ``moving``, ``ddf``, ``field``, ...)."""
    warp, sim_loss, reg_loss = _defaults(warp, sim_loss, reg_loss)
    fwd = registration_forward(network, warp, moving, fixed)
    warped = fwd["warped"].float()
    if weight is None:
        weight = pair_weight(variance_network, sim_loss, warped, fixed)
    ctx = dict(fwd, warped=warped, fixed=fixed, moving=moving, weight=weight)
    if weight is not None:
        sim = sim_loss(warped, fixed, weight=weight)
    else:
        sim = sim_loss(warped, fixed, **_extra(sim_loss, ctx))
    if not lambda_reg:
        return sim, fwd, weight
    reg = reg_loss(fwd["field"].float(), **_extra(reg_loss, ctx))
    return sim + float(lambda_reg) * reg, fwd, weight


def _extra(loss: Callable, ctx: dict) -> dict:
    """The keyword inputs a loss declares in ``extra_inputs`` (as the trainer passes them); a missing one: error."""
    names = tuple(getattr(loss, "extra_inputs", ()))
    missing = [k for k in names if ctx.get(k) is None]
    if missing:
        raise ValueError(
            f"{type(loss).__name__} needs {missing}, which instance optimisation does not have (it has "
            f"{sorted(k for k, v in ctx.items() if v is not None)})."
        )
    return {k: ctx[k] for k in names}


def _check(network, moving, fixed, steps, lr, weight_every):
    if not isinstance(network, torch.nn.Module):
        raise TypeError(f"optimise_pair: network must be a torch.nn.Module, got {type(network).__name__}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"optimise_pair: steps (instance_steps) must be an integer >= 0, got {steps!r}.")
    if steps > 0 and not float(lr) > 0:
        raise ValueError(f"optimise_pair: lr (instance_lr) must be > 0, got {lr!r}.")
    if not isinstance(weight_every, int) or weight_every < 0:
        raise ValueError(f"optimise_pair: weight_every must be an integer >= 0, got {weight_every!r}.")
    if moving.shape != fixed.shape or moving.ndim not in (4, 5) or moving.shape[1] != 1:
        raise ValueError(
            "optimise_pair: moving and fixed must both be (B, 1, *spatial) with 2 or 3 spatial dims, got "
            f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
        )


def adapt_network(
    network: torch.nn.Module,
    variance_network: torch.nn.Module | None,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 10,
    lr: float = 1e-4,
    warp: Callable | None = None,
    sim_loss: Callable | None = None,
    reg_loss: Callable | None = None,
    lambda_reg: float = 0.01,
    weight_every: int = 1,
    seed: int | None = 0,
) -> torch.nn.Module:
    """A copy of ``network`` fine-tuned on ONE pair (batch of 1 or a batch optimised jointly) for ``steps`` Adam
    steps on :func:`pair_loss`, the weight from :func:`pair_weight` refreshed every ``weight_every`` steps from the
    current Î_f (0: computed once, from the network's initial Î_f). Returned in eval mode, its parameters without
    gradient; ``network`` and ``variance_network`` are left as they were (parameters and train/eval mode)."""
    _check(network, moving, fixed, steps, lr, weight_every)
    warp, sim_loss, reg_loss = _defaults(warp, sim_loss, reg_loss)
    adapted = copy.deepcopy(_inner(network))  # eager, unwrapped copy
    adapted.eval()
    for p in adapted.parameters():
        p.requires_grad_(True)
    var_mode = getattr(variance_network, "training", False)
    if isinstance(variance_network, torch.nn.Module):
        variance_network.eval()
    fork = [moving.device] if moving.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork, enabled=seed is not None), torch.enable_grad():
            if seed is not None:
                torch.manual_seed(int(seed))
            optimizer = torch.optim.Adam(adapted.parameters(), lr=float(lr))
            weight = None
            first = last = None
            for step in range(steps):
                refresh = step == 0 or (weight_every > 0 and step % weight_every == 0)
                loss, _, weight = pair_loss(
                    adapted,
                    moving,
                    fixed,
                    variance_network=variance_network,
                    weight=None if refresh else weight,
                    warp=warp,
                    sim_loss=sim_loss,
                    reg_loss=reg_loss,
                    lambda_reg=lambda_reg,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = loss.detach()
                first = last if first is None else first
                if logger.isEnabledFor(logging.DEBUG) and (step + 1) % 10 == 0:
                    logger.debug("instance optimisation: step %d/%d, loss %.6g", step + 1, steps, last.item())
    finally:
        if isinstance(variance_network, torch.nn.Module):
            variance_network.train(var_mode)
    for p in adapted.parameters():
        p.requires_grad_(False)
    if first is not None and logger.isEnabledFor(logging.INFO):
        logger.info(
            "instance optimisation: %d steps (lr %.3g), loss %.6g -> %.6g", steps, float(lr), first.item(), last.item()
        )
    return adapted


def optimise_pair(
    network: torch.nn.Module,
    variance_network: torch.nn.Module | None,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 10,
    lr: float = 1e-4,
    warp: Callable | None = None,
    sim_loss: Callable | None = None,
    reg_loss: Callable | None = None,
    lambda_reg: float = 0.01,
    weight_every: int = 1,
    seed: int | None = 0,
) -> torch.Tensor:
    """The DDF (B, ndim, *spatial) of the pairs ``(moving, fixed)`` (B, 1, *spatial) after ``steps`` steps of test-time
    instance optimisation, each pair of the batch on its own copy of ``network`` (:func:`adapt_network`).

    Args:
        network: the trained displacement network (not modified).
        variance_network: the trained variance network h_φ, frozen, for the Eq. 4 weight; ``None``: unit weights.
        moving, fixed: the pairs, on the networks' device.
        steps: Adam steps per pair; 0 returns the network's own DDF (no copy, no gradient).
        lr: Adam's learning rate (default 1e-4, train.yaml's; validation smoke runs in docs/instance_optimisation.md).
        warp, sim_loss, reg_loss, lambda_reg: the bundle's loss parts (train.yaml's ``warp``, ``sim_loss``,
            ``reg_loss``, ``lambda_reg``); defaults: bilinear/border ``Warp``, ``SNRWeightedMSELoss()``,
            ``GradientSmoothnessLoss(multiplier=2)``, 0.01.
        weight_every: refresh the weight map from the current Î_f every this many steps (0: once).
        seed: torch seed inside the optimisation (the global RNG state is restored); ``None``: do not seed.
    """
    _check(network, moving, fixed, steps, lr, weight_every)
    warp, _, _ = _defaults(warp, sim_loss, reg_loss)
    if steps == 0:
        inner = _inner(network)
        mode = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                return registration_forward(network, warp, moving, fixed)["ddf"].detach()  # as given (compiled)
        finally:
            inner.train(mode)
    ddfs = []
    for b in range(moving.shape[0]):
        m, f = moving[b : b + 1], fixed[b : b + 1]
        adapted = adapt_network(
            network, variance_network, m, f, steps, lr, warp, sim_loss, reg_loss, lambda_reg, weight_every, seed
        )
        with torch.no_grad():
            ddfs.append(registration_forward(adapted, warp, m, f)["ddf"].detach())
    return torch.cat(ddfs, dim=0)


# ==================================================================================================================
# Field-level instance optimisation: a residual velocity on a coarse grid, integrated by the network's own head
# ==================================================================================================================

FIELD_WEIGHTS = ("snr", "mse")


def integrate_field(network: torch.nn.Module, field: torch.Tensor, size) -> torch.Tensor:
    """The DDF (B, ndim, *size) of the network's ``field`` through the network's own head, its ``integrate(field,
    size)`` (:meth:`scripts.networks.VoxelMorphDisplacement.integrate`: scaling and squaring, then for a
    half-resolution field the upsampling with values ×2). A network without one, or without integration, returns its
    DDF as the field: it is returned as it is (not diffeomorphic then)."""
    net = _inner(network)
    ddf = net.integrate(field, size) if hasattr(net, "integrate") else field  # the network's own head
    if tuple(ddf.shape[2:]) != tuple(size):
        raise ValueError(
            f"optimise_field: {type(net).__name__} returns a field of shape {tuple(field.shape[2:])} that its head "
            f"does not bring to the image size {tuple(size)}; use instance_mode='weights' for this network."
        )
    return ddf


def _residual_grid(field: torch.Tensor, grid: int) -> torch.Tensor:
    """The zero residual (B, ndim, *g), g = min(grid, the field's size) per axis, with gradient."""
    shape = [min(int(grid), s) for s in field.shape[2:]]
    return torch.zeros(field.shape[0], field.shape[1], *shape, device=field.device, requires_grad=True)


def _upsample(residual: torch.Tensor, size) -> torch.Tensor:
    """The residual on the field's grid (linear interpolation, corners aligned: r = 0 stays exactly 0)."""
    if tuple(residual.shape[2:]) == tuple(size):
        return residual
    mode = "bilinear" if residual.ndim == 4 else "trilinear"
    return F.interpolate(residual, size=tuple(size), mode=mode, align_corners=True)


def _field_weight(variance_network, sim_loss, instance_weight, warped, fixed) -> torch.Tensor | None:
    """Per pair (the weight map's normalisation spans the tensor it is given): the Eq. 4 weight of the frozen h_φ
    (``snr``) or ones (``mse``); ``None`` for a ``sim_loss`` without ``weight_map``."""
    if instance_weight == "mse" or not hasattr(sim_loss, "weight_map"):
        return torch.ones_like(fixed) if hasattr(sim_loss, "weight_map") else None
    return torch.cat(
        [pair_weight(variance_network, sim_loss, warped[b : b + 1], fixed[b : b + 1]) for b in range(fixed.shape[0])]
    )


def field_loss(velocity, warped, ddf, moving, fixed, weight, sim_loss, reg_loss, lambda_reg) -> torch.Tensor:
    """``B · (sim_loss(Î_f, I_f, weight=w) + λ · reg_loss(v))``: the batch means ×B, i.e. the sum of the pairs'
    losses, so that each pair's gradient is its own loss's. Losses get the ``extra_inputs`` they declare."""
    ctx = dict(warped=warped, fixed=fixed, moving=moving, ddf=ddf, field=velocity, weight=weight)
    sim = sim_loss(warped, fixed, weight=weight) if weight is not None else sim_loss(warped, fixed)
    if lambda_reg:
        sim = sim + float(lambda_reg) * reg_loss(velocity.float(), **_extra(reg_loss, ctx))
    return sim * fixed.shape[0]


def _check_field(grid, instance_weight):
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
        raise ValueError(f"optimise_field: grid (instance_grid) must be an integer >= 2, got {grid!r}.")
    if instance_weight not in FIELD_WEIGHTS:
        raise ValueError(f"optimise_field: instance_weight must be one of {FIELD_WEIGHTS}, got {instance_weight!r}.")


def _network_field(network, moving, fixed):
    """(DDF, field) of the network in eval mode, without gradient (its train/eval mode restored)."""
    from scripts.networks import network_forward

    inner = _inner(network)
    mode = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            ddf, field = network_forward(network, torch.cat([moving, fixed], dim=1))[:2]
    finally:
        inner.train(mode)
    return ddf.detach(), field.detach().float()


def optimise_field(
    network: torch.nn.Module,
    variance_network: torch.nn.Module | None,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 25,
    lr: float = 0.1,
    grid: int = 16,
    instance_weight: str = "mse",
    warp: Callable | None = None,
    sim_loss: Callable | None = None,
    reg_loss: Callable | None = None,
    lambda_reg: float = 0.02,
    weight_every: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """The DDF (B, ndim, *spatial) of the pairs after ``steps`` Adam steps on a residual of the network's velocity.

    .. math::
        v = v_\\theta + \\mathrm{up}(r),\\quad z = \\exp(v),\\quad
        \\mathcal{L}(r) = \\sum_b \\mathbb{E}_\\Omega\\big[w_b (I_f - I_m \\circ z)^2\\big] + \\lambda \\|\\nabla v\\|^2

    with v_θ the network's field (its half-resolution velocity, computed once without gradient), r a residual on a
    ``grid`` (per axis, at most the field's size) grid starting at 0, up the linear upsampling to the field's grid,
    exp the network's scaling and squaring and upsampling (:func:`integrate_field`): z is diffeomorphic and equals
    the network's DDF at r = 0. One parameter tensor for the batch; the loss is the sum over pairs, so each pair is
    optimised as on its own (Adam is element-wise). On CUDA the forward runs under bf16 autocast.

    Args:
        network: the trained displacement network (not modified; its ``forward(x, return_field=True)``).
        variance_network: the frozen h_φ for the Eq. 4 weight (``instance_weight="snr"``); ``None``: unit weights.
        moving, fixed: (B, 1, *spatial), on the network's device.
        steps: Adam steps; 0 returns the network's DDF. lr: Adam's learning rate on r (velocity-grid voxels).
        grid: residual grid size per axis (16: 16² on the 64² velocity of a 128² pair).
        instance_weight: ``"mse"`` (w = 1) or ``"snr"`` (w from h_φ on the current Î_f, per pair).
        warp, sim_loss, reg_loss, lambda_reg: the bundle's loss parts, as :func:`optimise_pair` (λ default 0.02:
            steps 25, lr 0.1, grid 16, MSE, λ 0.02 were chosen on the phantoms' validation splits,
            docs/instance_optimisation.md).
        weight_every: with ``snr``, refresh w every this many steps (0: once, from the network's Î_f).
        progress: a tqdm bar over the steps (``None``: when the batch has more than 4 pairs).
    """
    _check(network, moving, fixed, steps, lr, weight_every)
    _check_field(grid, instance_weight)
    warp, sim_loss, reg_loss = _defaults(warp, sim_loss, reg_loss)
    ddf0, v0 = _network_field(network, moving, fixed)
    if steps == 0:
        return ddf0
    residual = _residual_grid(v0, grid)
    optimizer = torch.optim.Adam([residual], lr=float(lr))
    cuda = moving.device.type == "cuda"
    show = moving.shape[0] > 4 if progress is None else bool(progress)
    bar = range(steps)
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"field IO ({moving.shape[0]} pairs)", unit="step", leave=False)
    weight = None
    with torch.enable_grad():
        for step in bar:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                velocity = v0 + _upsample(residual, v0.shape[2:])
                ddf = integrate_field(network, velocity, fixed.shape[2:])
                warped = warp(moving, ddf).float()
                if weight is None or (instance_weight == "snr" and weight_every > 0 and step % weight_every == 0):
                    weight = _field_weight(variance_network, sim_loss, instance_weight, warped.detach(), fixed)
                loss = field_loss(velocity, warped, ddf, moving, fixed, weight, sim_loss, reg_loss, lambda_reg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return integrate_field(network, v0 + _upsample(residual.detach(), v0.shape[2:]), fixed.shape[2:]).float()
