"""A "network" returning DDFs computed elsewhere (classical baselines), for ``--ddf_dir`` of configs/evaluate.yaml."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.utils import min_version, optional_import

from scripts.data import FAILED_KEY

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")


class PrecomputedDDF(torch.nn.Module):
    """Stands in for the displacement network when evaluating DDFs computed elsewhere (classical baselines).

    ``ddf_dir`` holds one file per case named ``<id>_ddf.nii.gz`` (as ``scripts.classical.register_datalist``
    writes them) or ``<id>.nii.gz`` (or ``.nii``, ``.npy``), channel-last
    ``spatial + (ndim,)`` in voxels (the file convention of docs/CONTRACTS.md), on the network grid. ``attach``
    it to the evaluator: at each ITERATION_STARTED it reads the DDFs of the batch's ``id`` s; ``forward`` returns
    them (its input is only used for the device and the shape check).
    """

    def __init__(self, ddf_dir: str | os.PathLike) -> None:
        super().__init__()
        self.ddf_dir = Path(ddf_dir)
        if not self.ddf_dir.is_dir():
            raise FileNotFoundError(f"ddf_dir {self.ddf_dir} does not exist.")
        self._current: torch.Tensor | None = None
        self.files: dict[str, str] = {}  # id -> file of the DDFs loaded last (named in a non-finite pair's reason)
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)

    def _file(self, case_id: str) -> Path:
        for stem in (f"{case_id}_ddf", case_id):
            for ext in (".nii.gz", ".nii", ".npy"):
                p = self.ddf_dir / f"{stem}{ext}"
                if p.is_file():
                    return p
        raise FileNotFoundError(
            f"no precomputed DDF for case '{case_id}' in {self.ddf_dir} (<id>_ddf.nii.gz or <id>.nii.gz/.nii/.npy)."
        )

    def load(self, case_id: str) -> torch.Tensor:
        p = self._file(case_id)
        if p.suffix == ".npy":
            a = np.load(p)
        else:
            from monai.transforms import LoadImage

            a = np.asarray(LoadImage(image_only=True)(str(p)))
        a = torch.as_tensor(np.asarray(a, dtype=np.float32))
        return torch.movedim(a, -1, 0)

    def set_ids(self, ids: Sequence[str]) -> None:
        self.files = {str(i): str(self._file(str(i))) for i in ids}
        self._current = torch.stack([self.load(str(i)) for i in ids])

    def attach(self, engine) -> None:
        def _started(e):
            if isinstance(e.state.batch, Mapping) and "moving" not in e.state.batch and FAILED_KEY in e.state.batch:
                return  # only pairs that failed to load: nothing to read
            ids = e.state.batch.get("id") if isinstance(e.state.batch, Mapping) else None
            if ids is None:
                raise KeyError("PrecomputedDDF needs the batch's 'id' (the datalist items' case names).")
            self.set_ids([ids] if isinstance(ids, str) else list(ids))

        engine.add_event_handler(Events.ITERATION_STARTED, _started)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._current is None:
            raise RuntimeError("PrecomputedDDF: no DDFs loaded (attach it to the evaluator).")
        ddf = self._current.to(x.device)
        if ddf.shape[0] != x.shape[0] or tuple(ddf.shape[2:]) != tuple(x.shape[2:]) or ddf.shape[1] != x.ndim - 2:
            raise ValueError(
                f"precomputed DDF shape {tuple(ddf.shape)} does not match the images {tuple(x.shape)} "
                "(needs (B, ndim, *spatial) on the network grid)."
            )
        return ddf
