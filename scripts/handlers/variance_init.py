"""Data-driven initialisation of the variance network's output level before training (docs/uncertainty.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from monai.utils import min_version, optional_import

from scripts.handlers._output import _plain

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)


class VarianceLevelInit:
    """Data-driven initialisation of the variance network's output level before training.

    On a fresh run it sets the level of h_φ so that the mean σ̂² over the first ``n_batches`` batches of the
    training set equals their mean squared residual (I_f − I_m∘z)², z from the current (initial) displacement
    network: the head's bias b (:func:`scripts.networks.level_bias`) becomes

    .. math:: b \\leftarrow b + \\log\\overline{(I_f - I_m\\circ z)^2} - \\log\\overline{\\hat\\sigma^2}

    (for :class:`scripts.networks.VarianceUNet` at its default initialisation, b ≈ log of the mean squared residual).
    Why: σ̂² should learn the residual's variance, ~0.02 on the phantom, while a fresh network starts at σ̂² ≈ 1; at
    Adam 1e-4 the level alone would take thousands of iterations to get there (docs/uncertainty.md).

    It consumes no random number: the items ``0 .. n_batches * batch_size - 1`` of ``dataset`` are read by index
    (never through a shuffling DataLoader), both networks run in eval mode under ``no_grad`` (the displacement
    network's sampling, if any, is off) and their modes are restored, so seeded runs stay reproducible.
    Each process of a multi-GPU run reads the same items and sets the same value.

    Attached to the trainer (train.yaml's ``train#handlers``), it runs at the first ITERATION_STARTED of a fresh
    run (``engine.state.iteration == 1``, i.e. no iteration done before); a resumed run keeps its checkpoint.
    Networks and warp are taken from the engine (``engine.network``, ``engine.variance_network``,
    ``engine.warp``) unless given; without a variance network (vanilla mode) it does nothing.

    Args:
        dataset: the training dataset (indexable, items with ``moving`` and ``fixed``).
        n_batches: number of batches to average over; 0 disables the handler.
        batch_size: items per batch (train.yaml: ``@batch_size``).
    """

    def __init__(
        self,
        dataset: Sequence,
        n_batches: int = 8,
        batch_size: int = 1,
        network: torch.nn.Module | None = None,
        variance_network: torch.nn.Module | None = None,
        warp: Callable | None = None,
    ) -> None:
        if int(n_batches) < 0 or int(batch_size) < 1:
            raise ValueError(
                f"VarianceLevelInit: need n_batches >= 0 and batch_size >= 1, got {n_batches}, {batch_size}."
            )
        self.dataset = dataset
        self.n_batches, self.batch_size = int(n_batches), int(batch_size)
        self.network, self.variance_network, self.warp = network, variance_network, warp
        self.mean_sq_residual: float | None = None  # measured value (after the handler ran)
        self.level: float | None = None  # log of it: the level set

    def attach(self, engine) -> None:
        if self.n_batches > 0:
            engine.add_event_handler(Events.ITERATION_STARTED(once=1), self)

    def __call__(self, engine) -> None:
        if engine.state.iteration != 1:
            return
        var_net = self.variance_network
        if var_net is None:
            var_net = getattr(engine, "variance_network", None)
        if var_net is None:
            return
        self.apply(
            self.network if self.network is not None else engine.network,
            var_net,
            self.warp if self.warp is not None else getattr(engine, "warp", None),
        )

    def apply(self, network: torch.nn.Module, variance_network: torch.nn.Module, warp: Callable | None = None) -> float:
        """Measure and set the level; returns the level set (log of the mean squared residual)."""
        from monai.networks.blocks import Warp

        from scripts.networks import level_bias

        net, var_net = getattr(network, "module", network), getattr(variance_network, "module", variance_network)
        warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        bias = level_bias(var_net)
        device = bias.device
        n_items = min(len(self.dataset), self.n_batches * self.batch_size)
        if n_items == 0:
            raise ValueError("VarianceLevelInit: the training dataset is empty.")
        modes = (net.training, var_net.training)
        sum_sq = sum_var = 0.0
        count = 0
        try:
            net.eval()
            var_net.eval()
            with torch.no_grad():
                for start in range(0, n_items, self.batch_size):
                    items = [self.dataset[i] for i in range(start, min(start + self.batch_size, n_items))]
                    moving, fixed = (
                        torch.stack([_plain(torch.as_tensor(it[k])) for it in items]).float().to(device)
                        for k in ("moving", "fixed")
                    )
                    warped = warp(moving, net(torch.cat([moving, fixed], dim=1)))
                    log_var = var_net(torch.cat([warped, fixed], dim=1))
                    sum_sq += float(((fixed - warped) ** 2).sum())
                    sum_var += float(torch.exp(log_var.float().clamp(-15.0, 15.0)).sum())
                    count += fixed.numel()
        finally:
            net.train(modes[0])
            var_net.train(modes[1])
        msr, mean_var = sum_sq / count, sum_var / count
        if not msr > 0:
            logger.warning("VarianceLevelInit: the mean squared residual is %g; level left unchanged.", msr)
            return math.nan
        with torch.no_grad():
            bias.add_(math.log(msr) - math.log(mean_var))
        self.mean_sq_residual, self.level = msr, math.log(msr)
        logger.info(
            "variance level initialised from %d pairs: mean squared residual %.4g (log %.3f); mean sigma^2 was %.4g",
            n_items,
            msr,
            self.level,
            mean_var,
        )
        return self.level
