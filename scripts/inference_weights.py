"""The weights of inference: ``monai.handlers.CheckpointLoader`` with the bundle's checks (configs/inference.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from scripts.checkpoint import read_checkpoint

__all__ = ["WeightsLoader"]


class WeightsLoader(CheckpointLoader):
    """:class:`monai.handlers.CheckpointLoader` for one network: a bare state dict (``models/model.pt``, a run's
    ``model.pt`` / ``variance.pt``) or a training checkpoint holding the key of ``load_dict``
    (``checkpoint_final.pt``: ``network`` / ``variance``).

    Before MONAI's loader runs, the file is checked: missing, empty, truncated or unsafe files, and weights that do
    not fit the network, are errors naming the file and the option to change. Attached to an engine it loads at
    ``Events.STARTED`` (as MONAI's); :meth:`load` loads at once (:class:`scripts.inference.RegistrationInferer` does
    when it is built, so that an inferer taken from the config has its weights). A ``None`` network (a variant
    without a variance network) is skipped.

    Args:
        load_path: the weights file.
        load_dict: ``{key: network}``, one network.
        map_location: ``torch.load``'s ``map_location``.
        strict: ``load_state_dict``'s ``strict``.
        option: the config id of ``load_path``, named in the errors.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, torch.nn.Module | None],
        map_location=None,
        strict: bool = True,
        option: str | None = None,
        name: str | None = None,
    ) -> None:
        if len(load_dict) != 1:
            raise ValueError(f"WeightsLoader loads one network, got load_dict keys {list(load_dict)}.")
        ((self.key, self.network),) = load_dict.items()
        self.option = option or ("variance_ckpt_path" if self.key == "variance" else "ckpt_path")
        super().__init__(str(load_path), {self.key: self.network}, name=name, map_location=map_location, strict=strict)

    def _check_file(self) -> None:
        p = Path(self.load_path)
        if p.is_dir():
            inside = sorted(x.name for x in p.glob("*.pt"))
            default = p / ("variance.pt" if self.key == "variance" else "model.pt")
            raise IsADirectoryError(
                f"--{self.option} {self.load_path}: a folder, not a weights file; "
                + (f"did you mean --{self.option} {default}?" if default.is_file() else "give the .pt file")
                + (f" (.pt files in it: {inside})." if inside else " (it holds no .pt file).")
            )
        if not p.is_file():
            siblings = sorted(x.name for x in p.parent.glob("*.pt")) if p.parent.is_dir() else []
            raise FileNotFoundError(
                f"weights for '{self.key}' not found: {self.load_path}. Pass --{self.option} (the shipped weights: "
                f"models/model.pt, models/variance.pt; models/mri2d/, models/sunnybrook/, models/lowpass/), or train "
                f"first (python -m monai.bundle run training ...)"
                + (f" (.pt files in {p.parent}: {siblings})." if siblings else ".")
            )
        read_checkpoint(p, "cpu")  # empty, truncated or unsafe files: an error naming the file

    def __call__(self, engine: Engine) -> None:
        if self.network is None:
            return
        self._check_file()
        try:
            super().__call__(engine)
        except (RuntimeError, KeyError) as e:
            raise RuntimeError(
                f"{self.load_path}: the weights do not fit the '{self.key}' network of the config (check "
                f"spatial_dims and the architecture variant; --{self.option}): {e}"
            ) from e

    def load(self) -> torch.nn.Module | None:
        """Load now (no engine needed); return the network."""
        self(Engine(lambda engine, batch: None))
        return self.network
