"""The registration infer task, taken from the bundle the app serves.

The task class lives in the bundle (``scripts/monailabel_task.py``, importable and tested without MONAI Label); this
module puts the bundle folder on ``sys.path`` and builds it, so that the app serves whichever bundle ``--conf bundle``
names (default: the bundle this app folder belongs to).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

#: the bundle this app folder ships in (scripts/monailabel_app/lib/infers -> bundle root)
DEFAULT_BUNDLE = Path(__file__).resolve().parents[4]


def import_bundle(bundle: str | os.PathLike | None = None) -> tuple[Path, ModuleType]:
    """The bundle folder and its ``scripts.monailabel_task`` module; a clear error when the folder is no bundle."""
    root = Path(bundle).expanduser().resolve() if bundle else DEFAULT_BUNDLE
    if not (root / "configs" / "inference.yaml").is_file() or not (root / "scripts" / "monailabel_task.py").is_file():
        raise FileNotFoundError(
            f"--conf bundle {root}: not this bundle's folder (needs configs/inference.yaml and "
            "scripts/monailabel_task.py); pass the bundle folder with --conf bundle /path/to/bundle."
        )
    loaded = sys.modules.get("scripts")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != root / "scripts":
        raise ImportError(
            f"another 'scripts' package is already imported ({getattr(loaded, '__file__', loaded)}); the app needs "
            f"the bundle's ({root / 'scripts'}): serve one bundle per MONAI Label server."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root, importlib.import_module("scripts.monailabel_task")


def registration_task(bundle: str | os.PathLike | None = None, **kwargs: Any):
    """``RegistrationInferTask(bundle, **kwargs)`` of the bundle at ``bundle``."""
    root, module = import_bundle(bundle)
    return module.RegistrationInferTask(root, **kwargs)
