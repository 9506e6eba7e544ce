"""Small helpers shared by the engines, the handlers and the configs (no project imports: any module may use them).

- :func:`as_flag`: a config or command-line value as a bool (``--resume true`` arrives as the string ``'true'``).
- :func:`adam_or_none`: the optimizer of a network that a variant may switch off (``variance_def: null``), so that
  the configs need no ``$None if @variance_net is None else ...`` expression::

      variance_optimizer:
        _target_: scripts.utils.adam_or_none
        network: "@variance_net"
        lr: "@variance_learning_rate"

  Every consumer of the variance network / optimizer accepts ``None`` (docs/training.md, "No variance network").
- :func:`ddp_or_none`: the same for DistributedDataParallel (configs/multi_gpu_train.yaml).
"""

from __future__ import annotations

import torch
from monai.utils import str2bool

__all__ = ["adam_or_none", "as_flag", "ddp_or_none"]


def as_flag(value) -> bool:
    """:func:`monai.utils.str2bool` for config and command-line values, which also takes numbers (``1`` / ``0``)
    and ``None`` (false)."""
    return str2bool(value) if isinstance(value, (str, bool)) else bool(value)


def adam_or_none(network: torch.nn.Module | None, lr: float, **kwargs) -> torch.optim.Adam | None:
    """``torch.optim.Adam(network.parameters(), lr=lr, **kwargs)``, or ``None`` when ``network`` is ``None`` (a
    variant without a variance network)."""
    if network is None:
        return None
    return torch.optim.Adam(network.parameters(), lr=lr, **kwargs)


def ddp_or_none(module: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    """``DistributedDataParallel(module.to(device))`` (``device_ids=[device]`` on CUDA, none on CPU / gloo), or
    ``None`` when ``module`` is ``None``. Needs an initialised process group."""
    if module is None:
        return None
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module.to(device), device_ids=ids)
