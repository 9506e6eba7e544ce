"""The collaborative trainer: two networks, two optimizers, updated alternately (Zhang et al., MICCAI 2024, §4).

One iteration of :class:`CollaborativeTrainer` in its default ``mode="collaborative"``:

1. **displacement step** (:meth:`CollaborativeTrainer.displacement_step`): (z, field) = q_θ(I_m, I_f) (the network's
   ``forward(x, return_field=True)``), Î_f = I_m ∘ z, s = h_φ(sg(Î_f), I_f) evaluated without gradient,
   loss = Eq. 4 (SNR weight from sg(σ̂)) + λ‖∇ field‖², step the displacement optimizer;
2. **variance step** (:meth:`CollaborativeTrainer.variance_step`, every ``variance_every`` iterations): Î_f is
   recomputed with the updated q_θ (the authors' schedule), s = h_φ(sg(Î_f), I_f), loss = Eq. 5 (β-NLL with
   sg(Î_f)), step the variance optimizer. ``reuse_warped=True`` reuses step 1's Î_f *and* its s: step 1 then runs
   h_φ with gradient (h_φ is unchanged between the two steps, so the numbers are those of a second forward), the
   weight uses sg(s), and the variance loss backpropagates through that graph: two forward passes cheaper.

The evaluator of the same pairs is :class:`scripts.evaluator.RegistrationEvaluator`.

Each step fires its own :class:`CollaborativeIterationEvents` (as MONAI's ``AdversarialIterationEvents`` for the
generator and the discriminator), so a handler can act between the forward, the loss, the backward pass and the
optimizer step of either network; ``engine.state.output`` holds the iteration's tensors so far while they fire. The
MONAI ``IterationEvents`` fire too (``FORWARD/LOSS/BACKWARD_COMPLETED`` for the displacement step, ``MODEL_COMPLETED``
once at the end of the iteration).

The modes are small strategy objects (:class:`TrainingMode`), chosen by name; the baselines are config overrides:

- ``"collaborative"`` (:class:`CollaborativeMode`): the two steps above;
- ``"vanilla"`` (:class:`VanillaMode`): no variance network; ``sim_loss(Î_f, I_f) + λ‖∇z‖²`` with any MONAI loss
  (MSE, LNCC, MI, ...);
- ``"joint"`` (:class:`JointMode`): one objective ``joint_loss(Î_f, I_f, s) + λ‖∇z‖²`` backpropagated into both
  networks, both optimizers stepped together (the NLL of Eq. 3 and the joint β-NLL baselines); it fires the
  displacement events.

Schedule options: ``disp_warmup_epochs`` (displacement only, unit weights = MSE) then ``var_warmup_epochs``
(variance only), then both, as the authors' optional warm start. ``couple_variance_grad=True`` reproduces a quirk
of the authors' code: the variance network's input Î_f is not detached, so the variance loss also leaves
gradients in the displacement network, which are added to its next update.

``variance_source="oracle"`` (collaborative mode, an instrument, not a method): the displacement step's weight uses
log σ² = 2 log ``residual_std`` of the batch (the phantom's std of the residual at the true displacement, clamped to
the loss's ``[log_var_min, log_var_max]``) instead of h_φ, for whichever weight form ``sim_loss.weight_map``
implements; there is no variance step and the variance network may be ``None``. It bounds what any variance
estimator can give the displacement network.

Loss classes may declare ``extra_inputs``: names among ``moving, fixed, warped, ddf, field, log_var, weight`` (and
``field_mean, log_sigma_z`` for networks with displacement uncertainty) that the trainer passes to them as keyword
arguments (AdaReg / AdaFrame / the displacement-uncertainty terms use this); a loss with a
``weight_map(fixed, log_var)`` method gets its weight map computed once and passed as ``weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from ignite.engine import EventEnum
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp
from torch.optim import Optimizer

from scripts.data import PAIR_KEYS
from scripts.networks import network_forward
from scripts.utils import as_flag

logger = logging.getLogger(__name__)

VARIANCE_SOURCES = ("network", "oracle")
# the batch entries the engines move to the device and carry into their output (docs/CONTRACTS.md)
BATCH_KEYS = PAIR_KEYS


class CollaborativeIterationEvents(EventEnum):
    """Events of one :class:`CollaborativeTrainer` iteration, registered through ``event_names`` (as MONAI's
    ``AdversarialIterationEvents``). ``*_BACKWARD_COMPLETED`` fires after ``backward()`` and before the optimizer
    step (gradients are there), ``*_MODEL_COMPLETED`` after the optimizer step."""

    DISPLACEMENT_FORWARD_COMPLETED = "displacement_forward_completed"
    DISPLACEMENT_LOSS_COMPLETED = "displacement_loss_completed"
    DISPLACEMENT_BACKWARD_COMPLETED = "displacement_backward_completed"
    DISPLACEMENT_MODEL_COMPLETED = "displacement_model_completed"
    VARIANCE_FORWARD_COMPLETED = "variance_forward_completed"
    VARIANCE_LOSS_COMPLETED = "variance_loss_completed"
    VARIANCE_BACKWARD_COMPLETED = "variance_backward_completed"
    VARIANCE_MODEL_COMPLETED = "variance_model_completed"


def prepare_registration_batch(
    batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
) -> dict[str, torch.Tensor]:
    """``prepare_batch`` of the registration engines (MONAI's convention: ``(batchdata, device, non_blocking,
    **to_kwargs)``): the tensors of :data:`BATCH_KEYS` present in ``batchdata``, as plain tensors on ``device``.
    Other entries (``id``, ``spacing``, meta data) stay in ``batchdata``."""
    if not isinstance(batchdata, Mapping) or not all(
        isinstance(batchdata.get(k), torch.Tensor) for k in BATCH_KEYS[:2]
    ):
        got = sorted(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
        raise ValueError(
            f"a registration batch is a dict with 'moving' and 'fixed' tensors (B, 1, *spatial); got {got}."
        )
    out = {}
    for k in BATCH_KEYS:
        v = batchdata.get(k)
        if isinstance(v, torch.Tensor):
            v = v.as_tensor() if hasattr(v, "as_tensor") else v
            out[k] = v.to(device, non_blocking=non_blocking, **kwargs)
    return out


def registration_forward(
    network: torch.nn.Module,
    warp: Callable,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    variance_network: torch.nn.Module | None = None,
    detach_for_variance: bool = True,
) -> dict:
    """One forward pass of the registration: DDF, warped image, regularised field (returned by the network's
    ``forward(x, return_field=True)``, :func:`scripts.networks.network_forward`) and (optionally) log σ̂²."""
    ddf, field, *extra = network_forward(network, torch.cat([moving, fixed], dim=1))
    warped = warp(moving, ddf)
    out = {"ddf": ddf, "field": field, "warped": warped, "log_var": None}
    # networks with displacement uncertainty (docs/baselines.md) also return (μ̂_z, log σ̂_z²)
    out.update(zip(("field_mean", "log_sigma_z"), extra))
    if variance_network is not None:
        w_in = warped.detach() if detach_for_variance else warped
        out["log_var"] = variance_network(torch.cat([w_in, fixed], dim=1))
    return out


def oracle_log_var(batch: Mapping, log_var_min: float = -15.0, log_var_max: float = 15.0) -> torch.Tensor:
    """log σ² = 2 log ``residual_std`` of the batch, clamped to ``[log_var_min, log_var_max]`` as the losses clamp
    (``residual_std`` = 0 gives ``log_var_min``): the variance an estimator should reach at perfect registration."""
    std = batch.get("residual_std")
    if not isinstance(std, torch.Tensor):
        raise KeyError(
            "variance_source='oracle' weights the displacement loss with the true 'residual_std' map, but the batch "
            f"has no 'residual_std' (keys: {sorted(batch)}). Use a phantom datalist that writes it (phantom "
            "version 2) and load it in the preprocessing (scripts.data.paired_transforms keys)."
        )
    if std.shape != batch["fixed"].shape:
        raise ValueError(f"residual_std {tuple(std.shape)} and fixed {tuple(batch['fixed'].shape)} shapes differ.")
    return (2.0 * torch.log(std.float().clamp_min(0.0))).clamp(log_var_min, log_var_max)


def _extra(loss: Callable, ctx: Mapping) -> dict:
    return {k: ctx[k] for k in getattr(loss, "extra_inputs", ()) if k in ctx}


# ------------------------------------------------------------------------------------------------------- modes
class TrainingMode:
    """A training mode of :class:`CollaborativeTrainer`: which parts it needs, its data term, and the steps of one
    iteration. Subclass it (and pass an instance as ``mode``) for a new schedule."""

    name = ""
    trains_variance = True  # whether the mode keeps and trains a variance network

    def check(self, trainer: CollaborativeTrainer) -> None:
        """Raise a clear error when ``trainer`` lacks a part this mode needs."""

    def data_term(self, engine: CollaborativeTrainer, fwd: Mapping, ctx: dict, unit_weight: bool):
        """``(similarity loss, weight map or None)``; may add ``weight`` to ``ctx`` for the regulariser."""
        raise NotImplementedError

    def iteration(self, engine: CollaborativeTrainer, batch: Mapping, out: dict) -> None:
        """Run the steps of one iteration, filling ``out`` (the live ``engine.state.output``)."""
        raise NotImplementedError


def _need(trainer: CollaborativeTrainer, names: Sequence[str], why: str) -> None:
    missing = [n for n in names if getattr(trainer, n) is None]
    if missing:
        raise ValueError(f"{why} needs {missing}; use mode='vanilla' for a displacement net alone.")


class VanillaMode(TrainingMode):
    """The displacement network alone on ``sim_loss(Î_f, I_f, **extra_inputs) + λ‖∇z‖²``."""

    name = "vanilla"
    trains_variance = False

    def check(self, trainer):
        if trainer.var_warmup_epochs > 0:
            raise ValueError("mode='vanilla' has no variance network: var_warmup_epochs must be 0.")
        if trainer.variance_source != "network":
            raise ValueError(f"variance_source={trainer.variance_source!r} needs mode='collaborative'.")

    def data_term(self, engine, fwd, ctx, unit_weight):
        return engine.sim_loss(fwd["warped"].float(), ctx["fixed"], **_extra(engine.sim_loss, ctx)), None

    def iteration(self, engine, batch, out):
        engine.displacement_step(batch, out)


class CollaborativeMode(VanillaMode):
    """The paper's schedule: a displacement step on Eq. 4 with the weight from sg(σ̂), then a variance step on Eq. 5
    (warm-up phases and ``variance_every`` as in the module docstring)."""

    name = "collaborative"
    trains_variance = True

    def check(self, trainer):
        if trainer.variance_source == "oracle":
            if not hasattr(trainer.sim_loss, "weight_map"):
                raise ValueError(
                    "variance_source='oracle' needs a sim_loss with weight_map(fixed, log_var) "
                    f"(e.g. scripts.losses.SNRWeightedMSELoss), got {type(trainer.sim_loss).__name__}."
                )
            if trainer.var_warmup_epochs > 0:
                raise ValueError("variance_source='oracle' trains no variance network: var_warmup_epochs must be 0.")
            return
        _need(trainer, ("variance_network", "variance_optimizer", "variance_loss"), "mode='collaborative'")

    def data_term(self, engine, fwd, ctx, unit_weight):
        if not hasattr(engine.sim_loss, "weight_map"):
            return super().data_term(engine, fwd, ctx, unit_weight)
        fixed = ctx["fixed"]
        weight = torch.ones_like(fixed) if unit_weight else engine.sim_loss.weight_map(fixed, fwd["log_var"].detach())
        ctx["weight"] = weight
        return engine.sim_loss(fwd["warped"].float(), fixed, weight=weight), weight

    def iteration(self, engine, batch, out):
        phase = engine.phase(engine.state.epoch)
        do_var = (
            engine.variance_source == "network"
            and phase != "disp"
            and (engine.state.iteration % engine.variance_every == 0 or phase == "var")
        )
        if phase != "var":
            engine.displacement_step(
                batch,
                out,
                with_log_var=phase == "both",
                unit_weight=phase == "disp",
                train_variance=engine.reuse_warped and do_var,
            )
        if do_var:
            engine.variance_step(batch, out)


class JointMode(TrainingMode):
    """One objective ``sim_loss(Î_f, I_f, s) + λ‖∇z‖²`` backpropagated into both networks (:meth:`joint_step`)."""

    name = "joint"

    def check(self, trainer):
        if trainer.variance_source != "network":
            raise ValueError(f"variance_source={trainer.variance_source!r} needs mode='collaborative'.")
        _need(trainer, ("variance_network", "variance_optimizer"), "mode='joint'")

    def data_term(self, engine, fwd, ctx, unit_weight):
        return engine.sim_loss(fwd["warped"].float(), ctx["fixed"], fwd["log_var"].float()), None

    def iteration(self, engine, batch, out):
        engine.joint_step(batch, out)


TRAINING_MODES: dict[str, TrainingMode] = {m.name: m for m in (CollaborativeMode(), VanillaMode(), JointMode())}
MODES = tuple(TRAINING_MODES)


# ----------------------------------------------------------------------------------------------------- trainer
class CollaborativeTrainer(Trainer):
    """A ``monai.engines.Trainer`` that holds the displacement and variance estimators and their two optimizers.

    Args:
        device: torch device.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``moving`` and ``fixed`` (B, 1, *spatial); the other
            :data:`BATCH_KEYS` (labels, ``ddf``, ``noise_std``, ``moving_noise_std``, ``residual_std``) are passed
            through to the output (the ground-truth ``ddf`` as ``ddf_gt``).
        network: displacement estimator, ``network(cat([moving, fixed], 1)) -> DDF``.
        optimizer: its optimizer.
        sim_loss: the data term: :class:`~scripts.losses.SNRWeightedMSELoss` in ``collaborative`` mode, any
            ``loss(input, target)`` in ``vanilla`` mode, the joint NLL in ``joint`` mode (called with ``log_var``).
        reg_loss: the smoothness loss applied to the field the network returns with ``return_field=True`` (the
            velocity, or the DDF).
        lambda_reg: λ.
        variance_network / variance_optimizer / variance_loss: h_φ, its optimizer and Eq. 5
            (unused in ``vanilla`` mode and with ``variance_source="oracle"``, may be ``None`` there).
        warp: the warping block (default ``monai.networks.blocks.Warp("bilinear", "border")``).
        mode: ``"collaborative"`` | ``"vanilla"`` | ``"joint"``, or a :class:`TrainingMode`.
        variance_source: ``"network"`` (h_φ) or ``"oracle"`` (the batch's ``residual_std``, collaborative mode).
        variance_every: step the variance network every k iterations (collaborative mode).
        disp_warmup_epochs / var_warmup_epochs: warm start, see the module docstring.
        reuse_warped: reuse the displacement step's Î_f for the variance step instead of a second forward.
        couple_variance_grad: do not detach Î_f at the variance network's input (authors' code quirk).
        prepare_batch: ``(batchdata, device, non_blocking, **kwargs) -> dict`` of tensors (default
            :func:`prepare_registration_batch`).
        amp: mixed precision (``torch.autocast`` on the device; gradient scaling on CUDA).
        epoch_length, train_handlers, key_train_metric, additional_metrics: as in ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        sim_loss: Callable,
        reg_loss: Callable | None = None,
        lambda_reg: float = 0.01,
        variance_network: torch.nn.Module | None = None,
        variance_optimizer: Optimizer | None = None,
        variance_loss: Callable | None = None,
        warp: Callable | None = None,
        mode: str | TrainingMode = "collaborative",
        variance_source: str = "network",
        variance_every: int = 1,
        disp_warmup_epochs: int = 0,
        var_warmup_epochs: int = 0,
        reuse_warped: bool = False,
        couple_variance_grad: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_registration_batch,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        if not isinstance(mode, TrainingMode):
            if mode not in TRAINING_MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
            mode = TRAINING_MODES[mode]
        if variance_source not in VARIANCE_SOURCES:
            raise ValueError(f"variance_source must be one of {VARIANCE_SOURCES}, got {variance_source!r}.")
        if variance_every < 1:
            raise ValueError(f"variance_every must be >= 1, got {variance_every}.")
        amp = as_flag(amp)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp,
            event_names=[IterationEvents, CollaborativeIterationEvents],
            decollate=False,
        )
        self.training_mode = mode
        self.mode = mode.name
        self.variance_source = variance_source
        self.network = network
        self.optimizer = optimizer
        self.sim_loss = sim_loss
        self.reg_loss = reg_loss
        self.lambda_reg = float(lambda_reg)
        self.variance_network = variance_network if mode.trains_variance else None
        self.variance_optimizer = variance_optimizer if mode.trains_variance else None
        self.variance_loss = variance_loss
        self.warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        self.variance_every = int(variance_every)
        self.disp_warmup_epochs = int(disp_warmup_epochs)
        self.var_warmup_epochs = int(var_warmup_epochs)
        self.reuse_warped = as_flag(reuse_warped)
        self.couple_variance_grad = as_flag(couple_variance_grad)
        mode.check(self)
        if variance_source == "oracle" and variance_network is not None:
            logger.warning("variance_source='oracle': the variance network is neither used nor trained.")
        dev = torch.device(device)
        self.amp_device = dev.type
        self.disp_scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
        self.var_scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")

    # ----------------------------------------------------------------------------------------------- schedule
    def phase(self, epoch: int) -> str:
        """'disp' (warm-up: displacement only, unit weight), 'var' (variance only) or 'both' for a 1-based epoch."""
        if epoch <= self.disp_warmup_epochs:
            return "disp"
        if epoch <= self.disp_warmup_epochs + self.var_warmup_epochs:
            return "var"
        return "both"

    def _autocast(self):
        return torch.autocast(device_type=self.amp_device, enabled=self.amp)

    def _backward_and_step(self, loss: torch.Tensor, optimizers: Sequence[Optimizer], scaler, backward_event) -> None:
        scaler.scale(loss).backward()
        self.fire_event(backward_event)
        if backward_event is CollaborativeIterationEvents.DISPLACEMENT_BACKWARD_COMPLETED:
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()

    # ----------------------------------------------------------------------------------------------- the steps
    def weight_log_var(self, fwd: Mapping, batch: Mapping, train_variance: bool = False) -> torch.Tensor:
        """log σ̂² for the displacement step's weight: h_φ(sg(Î_f), I_f) without gradient (with gradient and in
        train mode when ``train_variance``: the variance step reuses it), or the oracle of the batch."""
        if self.variance_source == "oracle":
            lo, hi = getattr(self.sim_loss, "log_var_min", -15.0), getattr(self.sim_loss, "log_var_max", 15.0)
            return oracle_log_var(batch, lo, hi)
        with torch.set_grad_enabled(train_variance):
            self.variance_network.train(train_variance)
            return self.variance_network(torch.cat([fwd["warped"].detach(), batch["fixed"]], dim=1))

    def displacement_loss(self, fwd: Mapping, batch: Mapping, unit_weight: bool = False) -> dict:
        """``{loss, loss_sim, loss_reg, weight}``: the mode's data term + λ · ``reg_loss(field)``."""
        fixed = batch["fixed"]
        ctx = dict(fwd, fixed=fixed, moving=batch["moving"])
        field = fwd["field"].float()
        sim, weight = self.training_mode.data_term(self, fwd, ctx, unit_weight)
        reg = (
            self.reg_loss(field, **_extra(self.reg_loss, ctx))
            if self.reg_loss is not None
            else torch.zeros((), device=fixed.device)
        )
        return {"loss": sim + self.lambda_reg * reg, "loss_sim": sim, "loss_reg": reg, "weight": weight}

    def displacement_step(
        self,
        batch: Mapping,
        out: dict,
        with_log_var: bool = False,
        unit_weight: bool = False,
        train_variance: bool = False,
    ) -> None:
        """Step 1: update q_θ on its loss; σ̂ (``with_log_var``) from :meth:`weight_log_var`, stopped in the weight.
        Fires ``DISPLACEMENT_{FORWARD,LOSS,BACKWARD,MODEL}_COMPLETED``."""
        self.network.train()
        with self._autocast():
            fwd = registration_forward(self.network, self.warp, batch["moving"], batch["fixed"])
            if with_log_var:
                fwd["log_var"] = self.weight_log_var(fwd, batch, train_variance)
        out.update(fwd)
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_FORWARD_COMPLETED)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        with self._autocast():
            out.update(self.displacement_loss(fwd, batch, unit_weight))
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_LOSS_COMPLETED)
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        if not self.couple_variance_grad:  # coupled: keep the variance step's gradients for this update
            self.optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(
            out["loss"],
            [self.optimizer],
            self.disp_scaler,
            CollaborativeIterationEvents.DISPLACEMENT_BACKWARD_COMPLETED,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_MODEL_COMPLETED)

    def variance_step(self, batch: Mapping, out: dict) -> None:
        """Step 2: update h_φ on Eq. 5 with Î_f from the updated q_θ (or the displacement step's Î_f and s with
        ``reuse_warped``). Fires ``VARIANCE_{FORWARD,LOSS,BACKWARD,MODEL}_COMPLETED``."""
        moving, fixed = batch["moving"], batch["fixed"]
        self.variance_network.train()
        if self.reuse_warped and out.get("log_var") is not None and out["log_var"].requires_grad:
            log_var, warped = out["log_var"], out["warped"]
        else:
            with self._autocast():
                with torch.set_grad_enabled(self.couple_variance_grad):
                    fwd = registration_forward(self.network, self.warp, moving, fixed)
                warped = fwd["warped"]
                w_in = warped if self.couple_variance_grad else warped.detach()
                log_var = self.variance_network(torch.cat([w_in, fixed], dim=1))
            if "ddf" not in out:  # variance warm-up: no displacement step in this iteration
                out.update(fwd)
        out["log_var"] = log_var
        self.fire_event(CollaborativeIterationEvents.VARIANCE_FORWARD_COMPLETED)
        with self._autocast():
            out["loss_var"] = self.variance_loss(warped.float(), fixed, log_var.float())
        out.setdefault("loss", out["loss_var"])
        self.fire_event(CollaborativeIterationEvents.VARIANCE_LOSS_COMPLETED)
        self.variance_optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(
            out["loss_var"],
            [self.variance_optimizer],
            self.var_scaler,
            CollaborativeIterationEvents.VARIANCE_BACKWARD_COMPLETED,
        )
        self.fire_event(CollaborativeIterationEvents.VARIANCE_MODEL_COMPLETED)

    def joint_step(self, batch: Mapping, out: dict) -> None:
        """Joint mode: one loss through both networks, both optimizers stepped together (displacement events)."""
        self.network.train()
        self.variance_network.train()
        with self._autocast():
            fwd = registration_forward(
                self.network,
                self.warp,
                batch["moving"],
                batch["fixed"],
                self.variance_network,
                detach_for_variance=not self.couple_variance_grad,
            )
        out.update(fwd)
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_FORWARD_COMPLETED)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        with self._autocast():
            out.update(self.displacement_loss(fwd, batch))
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_LOSS_COMPLETED)
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        self.optimizer.zero_grad(set_to_none=True)
        self.variance_optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(
            out["loss"],
            [self.optimizer, self.variance_optimizer],
            self.disp_scaler,
            CollaborativeIterationEvents.DISPLACEMENT_BACKWARD_COMPLETED,
        )
        self.fire_event(CollaborativeIterationEvents.DISPLACEMENT_MODEL_COMPLETED)

    # ---------------------------------------------------------------------------------------------- iteration
    def _iteration(self, engine: CollaborativeTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        out: dict = {"loss_var": None}
        engine.state.output = out  # live: the step events see what is computed so far
        engine.training_mode.iteration(engine, batch, out)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        out.update(passthrough(batch))
        return detach_output(out)


def passthrough(batch: Mapping) -> dict:
    """Batch entries carried into the engine output; the ground-truth DDF becomes ``ddf_gt`` so that it never
    shadows the predicted ``ddf``."""
    return {("ddf_gt" if k == "ddf" else k): v for k, v in batch.items()}


def detach_output(out: dict) -> dict:
    """The engine output: tensors detached (floating ones as float32), the losses as Python floats."""
    res = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            res[k] = v.float() if v.is_floating_point() else v
        else:
            res[k] = v
    for k in ("loss", "loss_sim", "loss_reg", "loss_var"):
        if isinstance(res.get(k), torch.Tensor):
            res[k] = res[k].item()
    return res
