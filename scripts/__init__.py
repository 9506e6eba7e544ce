"""Python package of the heteroscedastic registration bundle.

Configs import it with ``$import scripts``; the submodules are imported lazily so that a config only pays for
what it uses.
"""

import importlib

from scripts import errors as _errors

if _errors._under_monai_bundle():  # one-line errors for `python -m monai.bundle run ...` (scripts/errors.py)
    _errors.install()

__all__ = [
    "checkpoint",
    "classical",
    "data",
    "errors",
    "evaluator",
    "handlers",
    "inference",
    "inference_frame",
    "inference_pairs",
    "inference_weights",
    "inference_writers",
    "instance_optimisation",
    "losses",
    "metrics",
    "monailabel_task",
    "networks",
    "overrides",
    "performance",
    "plots",
    "run_folder",
    "schedule",
    "tracking",
    "trainer",
    "transmorph",
    "utils",
    "validation",
]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
