"""Speed options of the bundle: memory format, ``torch.compile``, cuDNN autotuning, and a final full-split
validation so that the per-epoch one can run on a subset.

All options default to off (the default path is bit-identical to not calling these helpers); the CPU tests run
every branch except the CUDA-only ones, which are plain flag settings. Measured effects: docs/speed.md.
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Events

from scripts.utils import as_flag

logger = logging.getLogger(__name__)

__all__ = ["prepare_network", "FullSplitValidation"]


def prepare_network(
    network: torch.nn.Module | None,
    device: str | torch.device,
    channels_last: bool = False,
    compile: bool = False,
    cudnn_benchmark: bool = True,
) -> torch.nn.Module | None:
    """Move ``network`` to ``device`` and apply the speed options; ``None`` (a variant without a variance network,
    ``variance_def: null``) gives ``None``.

    Args:
        network: a displacement or variance network, or ``None``.
        device: where it runs.
        channels_last: store 4D (2D images) / 5D (3D) weights as ``channels_last`` / ``channels_last_3d``; the
            convolutions then pick the NHWC kernels (faster with CUDA tensor cores, measured on CPU in docs/speed.md).
        compile: wrap the module with ``torch.compile`` (off by default: the first iterations pay the compilation;
            a model that cannot be compiled raises at its first forward, with torch's message).
        cudnn_benchmark: on CUDA, let cuDNN pick the fastest convolution algorithms for the fixed input size.
    """
    if network is None:
        return None
    device = torch.device(device)
    network = network.to(device)
    if as_flag(channels_last):
        dims = {p.dim() for p in network.parameters()}
        fmt = torch.channels_last_3d if 5 in dims else torch.channels_last
        network = network.to(memory_format=fmt)
    if device.type == "cuda" and as_flag(cudnn_benchmark):
        torch.backends.cudnn.benchmark = True
    if as_flag(compile):
        if not hasattr(torch, "compile"):
            raise RuntimeError("compile: true needs torch >= 2.0 (torch.compile).")
        logger.info("compiling %s with torch.compile", type(network).__name__)
        network = torch.compile(network)
    return network


class FullSplitValidation:
    """Ignite handler: when training completes, run ``evaluator`` (a separate evaluator over the WHOLE validation
    split, with report-only handlers) once, so that the per-epoch validation may use a subset (``val_max_pairs``).

    The per-epoch validator keeps choosing the best ``model.pt``; this run only reports the final model on every
    validation pair (logged as ``full validation``). ``enabled=False`` (every pair is validated each time anyway)
    makes :meth:`attach` a no-op.
    """

    def __init__(self, evaluator, enabled: bool = True) -> None:
        self.evaluator = evaluator
        self.enabled = as_flag(enabled)

    def attach(self, engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        logger.info("full validation split after epoch %d", engine.state.epoch)
        self.evaluator.run(engine.state.epoch)
        metrics = {k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
        engine.state.full_validation = metrics
        logger.info("full validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
