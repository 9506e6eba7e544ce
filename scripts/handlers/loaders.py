"""Weights loading of configs/evaluate.yaml: ``monai.handlers.CheckpointLoader`` with the bundle's errors."""

from __future__ import annotations

from pathlib import Path

from monai.handlers import CheckpointLoader


class WeightsLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` (loads ``load_path`` into the objects of ``load_dict`` at STARTED) that

    - skips the ``None`` entries of ``load_dict`` (a variant without a variance network: ``variance_def: null``)
      and does nothing when none is left;
    - stops with ``FileNotFoundError: weights for '<key>' not found: <path>`` (listing the ``.pt`` files of the
      folder) before the run starts, instead of torch's bare error;
    - names the file and the key when the weights do not fit the network of the config.

    A single-object ``load_dict`` accepts the bare state dict ``scripts.checkpoint.CheckpointSaver`` writes for
    one object (``model.pt`` = ``{network: ...}``'s state dict, ``variance.pt``) as well as a training checkpoint
    holding that key (``checkpoints/checkpoint_final.pt``: ``network`` / ``variance``).
    """

    def __init__(self, load_path: str, load_dict: dict, **kwargs) -> None:
        self.skipped = sorted(k for k, v in load_dict.items() if v is None)
        load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.enabled = bool(load_dict)
        if self.enabled:
            super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        else:
            self.load_path, self.load_dict = load_path, {}

    def attach(self, engine) -> None:
        if self.enabled:
            super().attach(engine)

    def __call__(self, engine) -> None:
        p = Path(self.load_path)
        keys = ", ".join(f"'{k}'" for k in self.load_dict)
        if not p.is_file():
            siblings = sorted(x.name for x in p.parent.glob("*.pt")) if p.parent.is_dir() else []
            raise FileNotFoundError(
                f"weights for {keys} not found: {p}. Train first (python -m monai.bundle run training ...) and copy "
                "model.pt / variance.pt into models/, or pass --ckpt_path / --variance_ckpt_path"
                + (f" (.pt files in {p.parent}: {siblings})." if siblings else ".")
            )
        try:
            super().__call__(engine)
        except (RuntimeError, KeyError) as e:
            raise RuntimeError(
                f"{p}: the weights do not fit the {keys} object(s) of the config (check spatial_dims and the "
                f"architecture variant): {e}"
            ) from e
