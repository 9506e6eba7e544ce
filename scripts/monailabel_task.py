"""A MONAI Label infer task for this bundle (registration takes two images; stock bundle tasks take one).

MONAI Label's ``BundleInferTask`` (monailabel/tasks/infer/bundle.py) serves single-image bundles: it reads
``configs/inference.json|yaml`` and the ids ``network_def``, ``preprocessing``/``pre_transforms``,
``postprocessing``/``post_transforms``, ``inferer``, ``device``, ``bundle_root`` (and ``detector``,
``displayable_configs``), runs ``inferer(preprocessing(image), network)`` and restores one prediction onto the
request's ``image``. A pair of images and a DDF do not fit that flow, so this task drives
:class:`scripts.inference.RegistrationInferer` (built from ``configs/inference.yaml``) instead.

This module imports without MONAI Label installed: ``RegistrationInferTask`` then derives from ``object`` and
still works when called directly (for tests). In a MONAI Label app (``main.py``)::

    from scripts.monailabel_task import RegistrationInferTask      # with the bundle folder on sys.path
    def init_infers(self):
        return {"cardiac_registration": RegistrationInferTask(bundle_path, conf=self.conf)}

Request keys: ``image`` (the fixed image path, resolved by MONAI Label from the datastore), ``moving`` (path of the
moving image; an app can resolve a datastore id to a path before calling), optional ``moving_label``,
``uncertainty`` (bool), ``output`` (``warped_label`` (default when a moving label is given), ``warped``, ``ddf``,
``sigma2`` or ``weight``: the file returned to the client); the JSON result lists every file written.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

try:  # pragma: no cover - MONAI Label is optional
    from monailabel.interfaces.tasks.infer_v2 import InferTask as _Base
    from monailabel.interfaces.tasks.infer_v2 import InferType

    HAS_MONAILABEL = True
    _TYPE: Any = InferType.OTHERS
except ImportError:
    _Base = object
    HAS_MONAILABEL = False
    _TYPE = "others"


class RegistrationInferTask(_Base):  # type: ignore[misc,valid-type]
    """Register the request's ``moving`` image onto its ``image`` (fixed) with the bundle at ``bundle_path``."""

    def __init__(self, bundle_path: str | os.PathLike, conf: dict | None = None, config_file: str = "inference.yaml",
                 **override: Any) -> None:
        self.bundle_path = str(Path(bundle_path).resolve())
        self.config_file = os.path.join(self.bundle_path, "configs", config_file)
        self.override = override
        self.conf = conf or {}
        meta_file = os.path.join(self.bundle_path, "configs", "metadata.json")
        import json

        with open(meta_file) as f:
            self.metadata = json.load(f)
        spatial = self.metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
        config = {"uncertainty": False, "output": "warped_label", "device": "cuda"}
        if HAS_MONAILABEL:
            super().__init__(type=_TYPE, labels=None, dimension=len(spatial),
                             description=self.metadata.get("description", ""), config=config)
        else:
            self.type, self.labels, self.dimension = _TYPE, [], len(spatial)
            self.description, self._config = self.metadata.get("description", ""), config
        self._inferers: dict = {}

    def is_valid(self) -> bool:
        return os.path.isfile(self.config_file) and os.path.isfile(
            os.path.join(self.bundle_path, "models", "model.pt"))

    def config(self) -> dict:
        return self._config

    def _inferer(self, uncertainty: bool, device: str):
        key = (uncertainty, device)
        if key not in self._inferers:
            from monai.bundle import ConfigParser

            if self.bundle_path not in sys.path:
                sys.path.insert(0, self.bundle_path)
            parser = ConfigParser()
            parser.read_config(self.config_file)
            parser.update({"bundle_root": self.bundle_path, "uncertainty": uncertainty, "overlay": False,
                           "device": f"$torch.device({device!r})", **self.override})
            self._inferers[key] = parser.get_parsed_content("inferer")
        return self._inferers[key]

    def __call__(self, request: dict) -> tuple[str, dict]:
        import torch

        req = {**self._config, **request}
        if not req.get("moving"):
            raise ValueError("registration needs the request key 'moving' (path of the moving image) besides 'image'.")
        device = str(req.get("device") or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        from scripts.inference import make_pairs
        from scripts.trainer import as_flag

        uncertainty = as_flag(req.get("uncertainty", False))
        inferer = self._inferer(uncertainty, device)
        items = make_pairs(moving=req["moving"], fixed=req["image"], moving_label=req.get("moving_label"),
                           pair_id=req.get("id") or "result")
        out_dir = req.get("output_dir") or tempfile.mkdtemp(prefix="registration_")
        record = inferer.run(items, out_dir)[0]
        files = record["outputs"]
        want = req.get("output") or "warped_label"
        if want not in files:
            want = "warped"
        return files[want], {"files": files, "input_size": record["input_size"], "resized": record["resized"]}
