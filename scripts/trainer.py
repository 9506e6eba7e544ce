"""The collaborative trainer: two networks, two optimizers, updated alternately (Zhang et al., MICCAI 2024, §4).

One iteration of :class:`CollaborativeTrainer` in its default ``mode="collaborative"``:

1. **displacement step**: z = q_θ(I_m, I_f), Î_f = I_m ∘ z, s = h_φ(sg(Î_f), I_f) evaluated without gradient,
   loss = Eq. 4 (SNR weight from sg(σ̂)) + λ‖∇z‖², step the displacement optimizer;
2. **variance step** (every ``variance_every`` iterations): Î_f is recomputed with the updated q_θ (the authors'
   schedule; ``reuse_warped=True`` reuses step 1's Î_f instead, one forward pass cheaper), s = h_φ(sg(Î_f), I_f),
   loss = Eq. 5 (β-NLL with sg(Î_f)), step the variance optimizer.

Other modes of the same trainer (the baselines are config overrides, not code):

- ``"vanilla"``: no variance network; ``sim_loss(Î_f, I_f) + λ‖∇z‖²`` with any MONAI loss (MSE, LNCC, MI, ...);
- ``"joint"``: one objective ``joint_loss(Î_f, I_f, s) + λ‖∇z‖²`` backpropagated into both networks, both
  optimizers stepped together (the NLL of Eq. 3 and the joint β-NLL baselines).

Schedule options: ``disp_warmup_epochs`` (displacement only, unit weights = MSE) then ``var_warmup_epochs``
(variance only), then both, as the authors' optional warm start. ``couple_variance_grad=True`` reproduces a quirk
of the authors' code: the variance network's input Î_f is not detached, so the variance loss also leaves
gradients in the displacement network, which are added to its next update.

Loss classes may declare ``extra_inputs``: names among ``moving, fixed, warped, ddf, field, log_var, weight`` (and
``field_mean, log_sigma_z`` for networks with displacement uncertainty) that the trainer passes to them as keyword
arguments (AdaReg / AdaFrame / the displacement-uncertainty terms use this); a loss with a
``weight_map(fixed, log_var)`` method gets its weight map computed once and passed as ``weight``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.networks.blocks import Warp
from monai.utils import ForwardMode
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

MODES = ("collaborative", "vanilla", "joint")


def as_flag(value) -> bool:
    """A boolean from a config or command-line value (``--resume true`` arrives as the string 'true')."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", "none", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def _unwrap(net: torch.nn.Module | None) -> torch.nn.Module | None:
    return getattr(net, "module", net)


def _to(batch: Mapping, device, keys: Iterable[str], non_blocking: bool = False) -> dict:
    out = {}
    for k in keys:
        v = batch.get(k)
        if isinstance(v, torch.Tensor):
            out[k] = v.as_tensor() if hasattr(v, "as_tensor") else v
            out[k] = out[k].to(device, non_blocking=non_blocking)
    return out


BATCH_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std")


def register(
    network: torch.nn.Module,
    warp: Callable,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    variance_network: torch.nn.Module | None = None,
    detach_for_variance: bool = True,
    with_variance: bool = True,
) -> dict:
    """One registration forward pass: DDF, warped image, regularised field and (optionally) log σ̂²."""
    ddf = network(torch.cat([moving, fixed], dim=1))
    inner = _unwrap(network)
    field = getattr(inner, "last_velocity", None)
    warped = warp(moving, ddf)
    out = {"ddf": ddf, "field": ddf if field is None else field, "warped": warped, "log_var": None}
    # networks with displacement uncertainty (docs/baselines.md)
    for key, attr in (("field_mean", "last_mean"), ("log_sigma_z", "last_log_sigma_z")):
        value = getattr(inner, attr, None)
        if value is not None:
            out[key] = value
    if variance_network is not None and with_variance:
        w_in = warped.detach() if detach_for_variance else warped
        out["log_var"] = variance_network(torch.cat([w_in, fixed], dim=1))
    return out


def _extra(loss: Callable, ctx: Mapping) -> dict:
    return {k: ctx[k] for k in getattr(loss, "extra_inputs", ()) if k in ctx}


class CollaborativeTrainer(Trainer):
    """A ``monai.engines.Trainer`` that holds the displacement and variance estimators and their two optimizers.

    Args:
        device: torch device.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``moving`` and ``fixed`` (B, 1, *spatial); other keys
            (``moving_label``, ``fixed_label``, ``ddf``, ``noise_std``) are passed through to the output.
        network: displacement estimator, ``network(cat([moving, fixed], 1)) -> DDF``.
        optimizer: its optimizer.
        sim_loss: the data term: :class:`~scripts.losses.SNRWeightedMSELoss` in ``collaborative`` mode, any
            ``loss(input, target)`` in ``vanilla`` mode, the joint NLL in ``joint`` mode (called with ``log_var``).
        reg_loss: the smoothness loss applied to the network's ``last_velocity`` (or to the DDF).
        lambda_reg: λ.
        variance_network / variance_optimizer / variance_loss: h_φ, its optimizer and Eq. 5
            (unused in ``vanilla`` mode, may be ``None`` there).
        warp: the warping block (default ``monai.networks.blocks.Warp("bilinear", "border")``).
        mode: ``"collaborative"`` | ``"vanilla"`` | ``"joint"``.
        variance_every: step the variance network every k iterations (collaborative mode).
        disp_warmup_epochs / var_warmup_epochs: warm start, see the module docstring.
        reuse_warped: reuse the displacement step's Î_f for the variance step instead of a second forward.
        couple_variance_grad: do not detach Î_f at the variance network's input (authors' code quirk).
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
        mode: str = "collaborative",
        variance_every: int = 1,
        disp_warmup_epochs: int = 0,
        var_warmup_epochs: int = 0,
        reuse_warped: bool = False,
        couple_variance_grad: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode != "vanilla":
            missing = [n for n, v in (("variance_network", variance_network), ("variance_optimizer",
                       variance_optimizer)) if v is None]
            if mode == "collaborative" and variance_loss is None:
                missing.append("variance_loss")
            if missing:
                raise ValueError(f"mode={mode!r} needs {missing}; use mode='vanilla' for a displacement net alone.")
        if variance_every < 1:
            raise ValueError(f"variance_every must be >= 1, got {variance_every}.")
        self.mode = mode
        amp = as_flag(amp)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp,
            event_names=[IterationEvents],
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.sim_loss = sim_loss
        self.reg_loss = reg_loss
        self.lambda_reg = float(lambda_reg)
        self.variance_network = variance_network if mode != "vanilla" else None
        self.variance_optimizer = variance_optimizer if mode != "vanilla" else None
        self.variance_loss = variance_loss
        self.warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        self.variance_every = int(variance_every)
        self.disp_warmup_epochs = int(disp_warmup_epochs)
        self.var_warmup_epochs = int(var_warmup_epochs)
        self.reuse_warped = as_flag(reuse_warped)
        self.couple_variance_grad = as_flag(couple_variance_grad)
        dev = torch.device(device)
        self.amp_device = dev.type
        self.disp_scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
        self.var_scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")

    # ----------------------------------------------------------------------------------------------- schedule
    def _phase(self, epoch: int) -> str:
        """'disp' (warm-up: displacement only, unit weight), 'var' (variance only) or 'both' for a 1-based epoch."""
        if epoch <= self.disp_warmup_epochs:
            return "disp"
        if epoch <= self.disp_warmup_epochs + self.var_warmup_epochs:
            return "var"
        return "both"

    def _autocast(self):
        return torch.autocast(device_type=self.amp_device, enabled=self.amp)

    def _step(self, loss: torch.Tensor, optimizers: Sequence[Optimizer], scaler) -> None:
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()

    def _displacement_loss(self, fwd: dict, fixed: torch.Tensor, moving: torch.Tensor, unit_weight: bool) -> dict:
        ctx = dict(fwd, fixed=fixed, moving=moving)
        log_var = fwd["log_var"]
        warped, field = fwd["warped"].float(), fwd["field"].float()
        weight = None
        if self.mode == "joint":
            sim = self.sim_loss(warped, fixed, log_var.float())
        else:
            if self.mode == "collaborative" and hasattr(self.sim_loss, "weight_map"):
                weight = (
                    torch.ones_like(fixed) if unit_weight else self.sim_loss.weight_map(fixed, log_var.detach())
                )
                ctx["weight"] = weight
                sim = self.sim_loss(warped, fixed, weight=weight)
            else:
                sim = self.sim_loss(warped, fixed, **_extra(self.sim_loss, ctx))
        reg = (
            self.reg_loss(field, **_extra(self.reg_loss, ctx))
            if self.reg_loss is not None
            else torch.zeros((), device=fixed.device)
        )
        return {"loss": sim + self.lambda_reg * reg, "loss_sim": sim, "loss_reg": reg, "weight": weight}

    # ---------------------------------------------------------------------------------------------- iteration
    def _iteration(self, engine: CollaborativeTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = _to(batchdata, engine.state.device, BATCH_KEYS, engine.non_blocking)
        moving, fixed = batch["moving"], batch["fixed"]
        phase = engine._phase(engine.state.epoch)
        var_net, disp_net = engine.variance_network, engine.network
        do_var = var_net is not None and engine.mode == "collaborative" and phase != "disp" and (
            engine.state.iteration % engine.variance_every == 0 or phase == "var"
        )
        out: dict = {"loss_var": None}

        if engine.mode == "joint":
            disp_net.train()
            var_net.train()
            with engine._autocast():
                fwd = register(disp_net, engine.warp, moving, fixed, var_net, not engine.couple_variance_grad)
                losses = engine._displacement_loss(fwd, fixed, moving, unit_weight=False)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.optimizer.zero_grad(set_to_none=True)
            engine.variance_optimizer.zero_grad(set_to_none=True)
            engine._step(losses["loss"], [engine.optimizer, engine.variance_optimizer], engine.disp_scaler)
            out.update(fwd, **losses)
        else:
            if phase != "var":
                # 1. displacement step: σ̂ from the current variance net, stopped.
                disp_net.train()
                with engine._autocast():
                    fwd = register(disp_net, engine.warp, moving, fixed, None)
                    if var_net is not None and phase == "both":
                        with torch.set_grad_enabled(engine.reuse_warped and do_var):
                            var_net.train(engine.reuse_warped and do_var)
                            fwd["log_var"] = var_net(torch.cat([fwd["warped"].detach(), fixed], dim=1))
                    losses = engine._displacement_loss(fwd, fixed, moving, unit_weight=phase == "disp")
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
                if not engine.couple_variance_grad:
                    engine.optimizer.zero_grad(set_to_none=True)
                engine._step(losses["loss"], [engine.optimizer], engine.disp_scaler)
                engine.optimizer.zero_grad(set_to_none=True)
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                out.update(fwd, **losses)
            if do_var:
                # 2. variance step on Eq. 5 with Î_f stopped.
                var_net.train()
                if engine.reuse_warped and out.get("log_var") is not None and out["log_var"].requires_grad:
                    log_var, warped = out["log_var"], out["warped"]
                else:
                    with engine._autocast():
                        with torch.set_grad_enabled(engine.couple_variance_grad):
                            fwd2 = register(disp_net, engine.warp, moving, fixed, None)
                        warped = fwd2["warped"]
                        w_in = warped if engine.couple_variance_grad else warped.detach()
                        log_var = var_net(torch.cat([w_in, fixed], dim=1))
                    if "ddf" not in out:
                        out.update(fwd2)
                with engine._autocast():
                    loss_var = engine.variance_loss(warped.float(), fixed, log_var.float())
                engine.variance_optimizer.zero_grad(set_to_none=True)
                engine._step(loss_var, [engine.variance_optimizer], engine.var_scaler)
                out["log_var"], out["loss_var"] = log_var, loss_var
                out.setdefault("loss", loss_var)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        out.update(_passthrough(batch))
        return _detach_output(out)

    def get_train_stats(self) -> dict:
        return self.get_stats("best_metric", "best_metric_epoch")


def _passthrough(batch: Mapping) -> dict:
    """Batch entries carried into the engine output; the ground-truth DDF becomes ``ddf_gt`` so that it never
    shadows the predicted ``ddf``."""
    return {("ddf_gt" if k == "ddf" else k): v for k, v in batch.items()}


def _detach_output(out: dict) -> dict:
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


class RegistrationEvaluator(Evaluator):
    """Evaluator for a registration pair: runs the displacement network (and the variance network if given).

    ``engine.state.output`` follows docs/CONTRACTS.md: ``moving, fixed, warped, ddf, log_var, weight``, labels
    and ``warped_label`` (the moving label warped with nearest interpolation) when the batch has them.

    Args:
        weight_fn: optional ``(fixed, log_var) -> weight map`` (e.g. ``SNRWeightedMSELoss.weight_map``).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        variance_network: torch.nn.Module | None = None,
        warp: Callable | None = None,
        weight_fn: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        amp = as_flag(amp)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=amp,
            mode=ForwardMode.EVAL,
            decollate=False,
        )
        self.network = network
        self.variance_network = variance_network
        self.warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        self.label_warp = Warp(mode="nearest", padding_mode="border")
        self.weight_fn = weight_fn
        self.amp_device = torch.device(device).type

    def _iteration(self, engine: RegistrationEvaluator, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = _to(batchdata, engine.state.device, BATCH_KEYS, engine.non_blocking)
        moving, fixed = batch["moving"], batch["fixed"]
        engine.network.eval()
        if engine.variance_network is not None:
            engine.variance_network.eval()
        with torch.no_grad(), torch.autocast(device_type=engine.amp_device, enabled=engine.amp):
            fwd = register(engine.network, engine.warp, moving, fixed, engine.variance_network)
        out = {k: v for k, v in fwd.items() if k != "field"}
        out["weight"] = None
        if fwd["log_var"] is not None and engine.weight_fn is not None:
            out["weight"] = engine.weight_fn(fixed, fwd["log_var"].float())
        if "moving_label" in batch:
            out["warped_label"] = engine.label_warp(batch["moving_label"], fwd["ddf"].float())
        out.update(_passthrough(batch))
        out["meta"] = {"id": batchdata.get("id"), "spacing": batchdata.get("spacing")}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return _detach_output(out)


def label_pair(output: Mapping, label: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(warped label == label, fixed label == label)`` as float masks, for MONAI Dice/HD handlers."""
    if output.get("warped_label") is None or output.get("fixed_label") is None:
        raise KeyError("the data has no moving_label/fixed_label: label metrics need them.")
    return (output["warped_label"].round() == label).float(), (output["fixed_label"].round() == label).float()


# ------------------------------------------------------------------------------------------------------ resume
def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint with the highest epoch in ``ckpt_dir`` (``checkpoint_epoch=N.pt``), or ``None``."""
    best, best_epoch = None, -1
    for p in Path(ckpt_dir).glob("*.pt"):
        m = re.search(r"epoch=(\d+)", p.name)
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = str(p), int(m.group(1))
    return best


class ResumeFromLatest:
    """Ignite handler: when ``enabled``, load the latest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` into
    ``load_dict`` (both networks, both optimizers, the trainer's epoch/iteration) before training starts."""

    def __init__(self, ckpt_dir: str, load_dict: Mapping, enabled: bool = True, map_location=None) -> None:
        self.ckpt_dir = ckpt_dir
        self.load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.enabled = as_flag(enabled)
        self.map_location = map_location

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume=true but {self.ckpt_dir} holds no checkpoint_epoch=N.pt: nothing to resume from."
            )
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=self.map_location).attach(engine)


def load_weights(
    network: torch.nn.Module | None,
    path: str | os.PathLike | None,
    key: str = "network",
    map_location=None,
    strict: bool = True,
) -> torch.nn.Module | None:
    """Load weights saved by the bundle into ``network`` with ``torch.load(weights_only=True)``.

    Accepts a bare state dict (``models/model.pt``, a run's ``model.pt`` / ``variance.pt``) or a training checkpoint
    holding ``key`` (``checkpoint_final.pt``: ``network`` / ``variance``); a ``module.`` prefix left by
    DistributedDataParallel is removed. A missing file or weights that do not fit the network are clear errors.
    ``None`` network -> ``None`` (variants without a variance network).
    """
    if network is None:
        return None
    p = Path(path) if path is not None else None
    if p is None or not p.is_file():
        siblings = sorted(x.name for x in p.parent.glob("*.pt")) if p is not None and p.parent.is_dir() else []
        raise FileNotFoundError(
            f"weights for '{key}' not found: {path}. Train first (python -m monai.bundle run training ...) and copy "
            "model.pt / variance.pt into models/, or pass --ckpt_path / --variance_ckpt_path"
            + (f" (.pt files in {p.parent}: {siblings})." if siblings else ".")
        )
    obj = torch.load(p, map_location=map_location or "cpu", weights_only=True)
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a state dict, got {type(obj).__name__}.")
    obj = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    try:
        _unwrap(network).load_state_dict(obj, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(
            f"{p}: the weights do not fit the '{key}' network of the config (check spatial_dims and the "
            f"architecture variant): {e}"
        ) from e
    logger.info("loaded %s weights from %s", key, p)
    return network


def checkpoint_dict(**objects) -> dict:
    """``save_dict`` for CheckpointSaver without the ``None`` entries (e.g. no variance net in vanilla mode)."""
    return {k: v for k, v in objects.items() if v is not None}
