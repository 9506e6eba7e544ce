"""MONAI Label app serving the bundle's registration (docs/monailabel.md).

    monailabel start_server --app scripts/monailabel_app --studies DATASTORE --host 127.0.0.1 --port 8000 \
        [--conf bundle /path/to/bundle] [--conf results DIR] [--conf server_paths false] [--conf device cpu]
        [--conf server_roots DIR1:DIR2]

One model, ``registration``: ``POST /infer/registration?image=<fixed id>`` with ``params={"moving": "<moving id>"}``
(or the fixed image uploaded as ``file``) registers the moving image onto the fixed one with the bundle's
``configs/inference.yaml`` and ``models/`` and returns the warped label (or ``output``: ``warped``, ``ddf``,
``sigma2``, ``weight``). Each request writes into ``<results>/<result_id>/``; a bad request is answered 400 / 404 /
422 with ``{"detail": message}``.

``--conf`` keys: ``bundle`` (default: the bundle this folder ships in), ``results`` (default
``<studies>/.registration``), ``server_paths`` (default ``false``; ``true``: ``moving``, ``moving_label``,
``output_dir`` and ``image`` may also be paths on the server, inside ``server_roots``), ``server_roots`` (folders
separated by ``os.pathsep``; default: the studies and results folders), ``device`` (default ``cuda``, the CPU when
there is none), ``preload`` (default ``true``: load the networks at start).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from lib.infers import import_bundle, registration_task
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


class RegistrationApp(MONAILabelApp):
    """The bundle's pairwise registration as a MONAI Label app (one infer task, ``registration``)."""

    MODEL = "registration"

    def __init__(self, app_dir: str, studies: str, conf: dict):
        conf = dict(conf or {})
        self.bundle, self._task_module = import_bundle(conf.get("bundle"))
        with open(self.bundle / "configs" / "metadata.json") as f:
            meta = json.load(f)
        self.results = os.path.realpath(conf.get("results") or os.path.join(studies, ".registration"))
        self.server_paths = bool(strtobool(str(conf.get("server_paths", "false"))))
        roots = conf.get("server_roots")
        roots = str(roots).split(os.pathsep) if roots else [studies, self.results]
        self.server_roots = [os.path.realpath(r) for r in roots if r]
        self.device = str(conf.get("device", "cuda"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"{meta.get('name', 'registration')} (MONAI Label)",
            description=meta.get("description", ""),
            version=meta.get("version", "0"),
            labels=dict(self._task_module.LABELS),
        )

    def init_infers(self):
        task = registration_task(
            self.bundle,
            conf=self.conf,
            datastore=self.datastore,
            results_dir=self.results,
            server_paths=self.server_paths,
            server_roots=self.server_roots,
            return_copy=True,
        )
        task.config()["device"] = self.device
        if strtobool(str(self.conf.get("preload", "true"))):
            task.preload(self.device)
        logger.info(
            "+++ Adding Inferer:: %s => %s (bundle %s, results %s)", self.MODEL, task, self.bundle, self.results
        )
        return {self.MODEL: task}

    def init_datastore(self):
        """MONAI Label's datastore, with every image id and label tag checked before it sees them (no ``/``, ``..``:
        its ``PUT /datastore/image?image=../../x`` wrote outside the studies folder)."""
        return self._task_module.SafeIdDatastore(super().init_datastore())

    def infer(self, request, datastore=None):
        """MONAI Label's ``infer`` with the fixed image checked first and its errors answered 4xx, not 500."""
        error = self._task_module.RequestError
        image = request.get("image")
        ds = datastore if datastore else self.datastore()
        if isinstance(image, str) and image and os.path.exists(image):  # a path: an upload, or server_paths
            real = os.path.realpath(image)
            upload = os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
            inside = any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.server_roots)
            if not upload and not (self.server_paths and inside):
                raise error(403, f"'image': {image!r} is a path on the server; this server takes datastore ids.")
        elif isinstance(image, str) and image:
            self._task_module.check_store_id(image, "image")
        if isinstance(image, str) and image and not os.path.exists(image) and not ds.get_image_uri(image):
            ids = sorted(ds.list_images())
            raise error(
                404,
                f"'image' (the fixed image): {image!r} is not an image id of the datastore ({len(ids)} "
                f"image(s): {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}).",
            )
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            status = 404 if "no model" in str(e.msg).lower() else 400
            if e.error == MONAILabelError.INVALID_INPUT:
                raise error(status, f"{e.msg} (models: {sorted(self._infers)})") from e
            raise
