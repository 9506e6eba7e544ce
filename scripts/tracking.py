"""TensorBoard tracking beyond the scalar losses and metrics: images of a validation pair and the learning rates.

- :class:`RegistrationImageHandler` (attach to the validation evaluator): every validation, the moving, fixed and
  warped images, the variance map σ̂² = exp(log σ̂²) and the Eq. 4 weight map of one validation pair, through
  ``monai.visualize.plot_2d_or_3d_image`` (2D: one image each, min-max scaled for display; 3D: an animated GIF
  along the last spatial axis), at the step of the training epoch.
- :class:`LearningRateLogger` (attach to the trainer): the learning rate of each optimizer (displacement and
  variance) at every epoch, through Ignite's ``OptimizerParamsHandler`` and ``TensorboardLogger``.

Both write only on rank 0 of a distributed run. MLflow: ``monai.bundle run ... --tracking mlflow`` (docs/zoo.md), with
:func:`decollated_view` adapting MONAI's default trainer MLflow handler to the trainer's output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("moving", "fixed", "warped", "sigma2", "weight")


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class RegistrationImageHandler:
    """TensorBoard images of one validation pair at the end of every validation run.

    ``engine.state.output`` of the registration evaluator holds ``moving``, ``fixed``, ``warped`` (B, 1, *spatial),
    ``log_var`` (or ``None`` without a variance network) and ``weight`` (or ``None``); the first iteration of each run
    is kept and written at ``EPOCH_COMPLETED`` under ``<tag>/<key>``, with the evaluator's epoch (the training epoch
    given by ``ValidationHandler``) as the step. Missing maps (vanilla training) are skipped.

    Args:
        log_dir: TensorBoard folder (ignored when ``summary_writer`` is given).
        summary_writer: an existing ``SummaryWriter``.
        index: which item of the first batch to show.
        tag: prefix of the image tags.
        keys: the images to write, among ``moving, fixed, warped, sigma2, weight``.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        summary_writer: Any | None = None,
        index: int = 0,
        tag: str = "val",
        keys: tuple[str, ...] | list[str] = IMAGE_KEYS,
    ) -> None:
        unknown = [k for k in keys if k not in IMAGE_KEYS]
        if unknown:
            raise ValueError(f"RegistrationImageHandler: unknown image keys {unknown}; choose among {IMAGE_KEYS}.")
        if summary_writer is None and log_dir is None:
            raise ValueError("RegistrationImageHandler needs log_dir or summary_writer.")
        self.log_dir = log_dir
        self._writer = summary_writer
        self.index = int(index)
        self.tag = tag
        self.keys = tuple(keys)
        self._images: dict[str, torch.Tensor] | None = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        if not _is_rank0():
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._images = None

    @staticmethod
    def images(output: Mapping, index: int = 0) -> dict[str, torch.Tensor]:
        """The channel-first images of item ``index`` of an evaluator output: σ̂² is ``exp(log_var)``."""
        out = {}
        for k in ("moving", "fixed", "warped", "weight"):
            v = output.get(k)
            if isinstance(v, torch.Tensor):
                out[k] = v[index].detach().float().cpu()
        log_var = output.get("log_var")
        if isinstance(log_var, torch.Tensor):
            out["sigma2"] = torch.exp(log_var[index].detach().float().cpu())
        return out

    def _capture(self, engine: Engine) -> None:
        if self._images is None and isinstance(engine.state.output, Mapping):
            self._images = self.images(engine.state.output, self.index)

    def _write(self, engine: Engine) -> None:
        from monai.visualize import plot_2d_or_3d_image

        if not self._images:
            return
        step = engine.state.epoch
        for k in self.keys:
            if k in self._images:
                # plot_2d_or_3d_image takes a batch and the index of the item to show
                plot_2d_or_3d_image(self._images[k][None], step, self.writer, index=0, tag=f"{self.tag}/{k}")
        self.writer.flush()


class LearningRateLogger:
    """The learning rate of each optimizer in TensorBoard (``<name>/lr/group_<i>``), with Ignite's
    ``OptimizerParamsHandler``.

    Args:
        log_dir: TensorBoard folder.
        optimizers: ``{name: optimizer}``; ``None`` entries (no variance network) are skipped.
        epoch_level: log at every epoch start (default) or at every iteration start.
    """

    def __init__(self, log_dir: str, optimizers: Mapping[str, Any], epoch_level: bool = True) -> None:
        self.log_dir = log_dir
        self.optimizers = {k: v for k, v in optimizers.items() if v is not None}
        if not self.optimizers:
            raise ValueError("LearningRateLogger: no optimizer given.")
        self.event = Events.EPOCH_STARTED if epoch_level else Events.ITERATION_STARTED
        self.tb_logger = None

    def attach(self, engine: Engine) -> None:
        if not _is_rank0():
            return
        from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, TensorboardLogger

        self.tb_logger = TensorboardLogger(log_dir=self.log_dir)
        for name, opt in self.optimizers.items():
            handler = OptimizerParamsHandler(opt, param_name="lr", tag=name)  # "<name>/lr/group_<i>"
            self.tb_logger.attach(engine, log_handler=handler, event_name=self.event)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.tb_logger.close())


def decollated_view(handlers: Sequence | None) -> list:
    """``handlers`` with each ``MLFlowHandler`` reading the trainer's output as MONAI's decollated list.

    ``monai.bundle run ... --tracking mlflow`` appends to ``train#handlers`` an ``MLFlowHandler`` whose
    ``output_transform`` is ``from_engine(["loss"], first=True)``: written for MONAI's decollated outputs (a list of
    per-item dicts), it returns a 1-tuple for the single dict the collaborative trainer returns, which MLflow
    cannot log. Its transform is given ``[output]`` instead (the same loss). Other handlers are returned unchanged.
    """
    from monai.handlers import MLFlowHandler

    out = list(handlers or [])
    for h in out:
        if isinstance(h, MLFlowHandler) and not getattr(h.output_transform, "_decollated_view", False):
            h.output_transform = _list_view(h.output_transform)
    return out


def _list_view(transform):
    def wrapped(output):
        return transform([output] if isinstance(output, Mapping) else output)

    wrapped._decollated_view = True
    return wrapped


class RunTimeEstimate:
    """Log the whole run's estimated time, not only the current epoch's (the progress bar's).

    Attached to the trainer, after ``first`` iterations it logs ``estimated time for the whole run: …`` from the
    measured seconds per iteration (validation included from the first epoch on), and at every epoch end the time
    left. Iterations already done by a resumed run are not counted.

    Args:
        first: iterations measured before the first estimate.
    """

    def __init__(self, first: int = 20) -> None:
        self.first = int(first)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        import time

        self._t0, self._it0, self._told = time.perf_counter(), engine.state.iteration, False

    def _left(self, engine: Engine) -> tuple[float, int, float]:
        import time

        done = engine.state.iteration - self._it0
        per_it = (time.perf_counter() - self._t0) / max(done, 1)
        total = engine.state.max_epochs * engine.state.epoch_length
        return per_it, total, per_it * (total - engine.state.iteration)

    def _iteration(self, engine: Engine) -> None:
        if not self._told and engine.state.iteration - self._it0 >= self.first and _is_rank0():
            per_it, total, left = self._left(engine)
            logger.info(
                "estimated time for the whole run: %s (%d iterations at %.3f s each, measured on the first %d)",
                _hms(left),
                total,
                per_it,
                self.first,
            )
            self._told = True

    def _epoch(self, engine: Engine) -> None:
        if _is_rank0():
            logger.info(
                "epoch %d/%d done; estimated time left: %s",
                engine.state.epoch,
                engine.state.max_epochs,
                _hms(self._left(engine)[2]),
            )


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"
