"""A MONAI Label infer task for this bundle (registration takes two images; stock bundle tasks take one).

MONAI Label's ``BundleInferTask`` (monailabel/tasks/infer/bundle.py) serves single-image bundles: it runs
``inferer(preprocessing(image), network)`` and restores one prediction onto the request's ``image``. A pair of images
and a DDF do not fit that flow, so this task drives :class:`scripts.inference.RegistrationInferer`, built from the
bundle's ``configs/inference.yaml`` and ``models/`` (no network access). The ready app is
``scripts/monailabel_app`` (``monailabel start_server --app scripts/monailabel_app --studies DATASTORE``); usage,
requests and errors: docs/monailabel.md.

Request keys (MONAI Label passes the ``/infer`` query's ``image`` and the JSON ``params`` form field as one dict):

- ``image``: the fixed (ES) image. MONAI Label resolves a datastore id to its path, or stores an uploaded ``file``
  in a temporary file and passes that path.
- ``moving`` (required): the moving (ED) image, a datastore id (or, with ``server_paths``, a path on the server).
- ``moving_label``: a datastore id whose label (tag ``label_tag``, default ``final``) is warped, a server path, or
  ``none``; when absent, the moving image's own label in the datastore is used if it has one.
- ``uncertainty`` (bool): also compute σ̂² and the Eq. 4 weight map.
- ``output``: the file returned: ``warped_label`` (default when there is a moving label, else ``warped``),
  ``warped``, ``ddf``, ``sigma2`` or ``weight``.
- ``result_id``: return ``output`` of an earlier request (its JSON gave the id) without running the networks again.
- ``device``: ``cuda`` (falls back to the CPU when there is none) or ``cpu``.

Every request writes into its own folder ``<results_dir>/<result_id>/`` with file names
``<moving>_to_<fixed>_<result_id>_<output>.nii.gz``; ``result_id`` is ``<UTC time>-<8 random hex digits>``, so no
request ever replaces another's files. A bad request raises :class:`RequestError`, which is a FastAPI
``HTTPException`` when FastAPI is installed (MONAI Label answers it with its status, 400 / 404 / 422, and
``{"detail": message}``), else a ``ValueError``; a failure on the server's side (config, weights) is one with
status 500 and the reason.

This module imports without MONAI Label installed: :class:`RegistrationInferTask` then derives from ``object`` and
still works when called directly (``tests/test_inference.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "RegistrationInferTask",
    "RequestError",
    "SafeIdDatastore",
    "check_store_id",
    "LABELS",
    "OUTPUTS",
    "HAS_MONAILABEL",
]

try:  # pragma: no cover - MONAI Label is optional
    from monailabel.interfaces.tasks.infer_v2 import InferTask as _Base, InferType

    HAS_MONAILABEL = True
    _TYPE: Any = InferType.OTHERS
except ImportError:
    _Base = object
    HAS_MONAILABEL = False
    _TYPE = "others"

try:  # FastAPI comes with MONAI Label; its HTTPException carries the status code to the client
    from fastapi import HTTPException as _HTTPError
except ImportError:  # pragma: no cover
    _HTTPError = None

#: label names shown in MONAI Label's ``/info`` (the project's label set, scripts.data.contracts.LABEL_SET).
LABELS = {"background": 0, "LV blood pool": 1, "LV myocardium": 2, "RV": 3}
#: files a request can return (scripts.inference.OUTPUT_SUFFIXES without the PNG overlay).
OUTPUTS = ("warped_label", "warped", "ddf", "sigma2", "weight")
_NONE = ("", "none", "null", "false", "no", "0")

if _HTTPError is not None:

    class RequestError(_HTTPError, ValueError):
        """A bad registration request: ``status_code`` (400 / 404 / 422) and ``detail`` (the message).

        A FastAPI ``HTTPException`` (MONAI Label returns it as is) that is also a ``ValueError``."""

        def __init__(self, status_code: int, detail: str) -> None:
            _HTTPError.__init__(self, status_code=status_code, detail=detail)
            ValueError.__init__(self, detail)

        def __str__(self) -> str:
            return f"{self.status_code}: {self.detail}"

else:  # pragma: no cover

    class RequestError(ValueError):  # type: ignore[no-redef]
        """A bad registration request: ``status_code`` (400 / 404 / 422) and ``detail`` (the message)."""

        def __init__(self, status_code: int, detail: str) -> None:
            super().__init__(detail)
            self.status_code, self.detail = status_code, detail

        def __str__(self) -> str:
            return f"{self.status_code}: {self.detail}"


def _flag(value: Any, key: str) -> bool:
    from scripts.utils import as_flag

    try:
        return as_flag(value)
    except (ValueError, TypeError):
        raise RequestError(400, f"'{key}': expected true or false, got {value!r}.") from None


def check_store_id(value: Any, key: str = "image") -> str:
    """A datastore image id or label tag: a plain name (no path separator, no ``..``, no NUL or control
    character, at most 255 characters); else 400 naming ``key``. Checked before MONAI Label's datastore sees it."""
    v = str(value)
    bad = (
        not v.strip()
        or len(v) > 255
        or "/" in v
        or "\\" in v
        or ".." in v
        or v.startswith(".")
        or any(ord(c) < 32 for c in v)
    )
    if bad:
        raise RequestError(
            400,
            f"'{key}': {value!r} is not a valid id (a plain name: no '/', '\\', '..', leading '.' or control "
            "characters).",
        )
    return v


class SafeIdDatastore:
    """A MONAI Label datastore whose every image id and label tag is checked by :func:`check_store_id` before the
    wrapped datastore sees it (MONAI Label 0.8.5's ``PUT /datastore/image?image=../../x`` and
    ``PUT /datastore/label?tag=../../x`` wrote above the studies folder). Other attributes pass through."""

    _ID_ARGS = {
        "add_image": (0,),
        "save_label": (0, 2),
        "get_image": (0,),
        "get_image_uri": (0,),
        "get_image_info": (0,),
        "get_label": (0, 1),
        "get_label_uri": (0, 1),
        "get_label_info": (0, 1),
        "get_labels_by_image_id": (0,),
        "remove_image": (0,),
        "remove_label": (0, 1),
        "update_image_info": (0,),
        "update_label_info": (0, 1),
    }
    _KW = {"image_id": "image", "label_id": "label", "label_tag": "tag", "tag": "tag"}

    def __init__(self, datastore: Any) -> None:
        self._ds = datastore

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ds, name)
        positions = self._ID_ARGS.get(name)
        if positions is None or not callable(attr):
            return attr

        def checked(*args, **kwargs):
            for i in positions:
                if i < len(args) and args[i] is not None:
                    check_store_id(args[i], "tag" if (name, i) in _TAG_POSITIONS else "image")
            for k, what in self._KW.items():
                if kwargs.get(k) is not None:
                    check_store_id(kwargs[k], what)
            return attr(*args, **kwargs)

        return checked


_TAG_POSITIONS = {("save_label", 2), ("get_label", 1), ("get_label_uri", 1), ("get_label_info", 1),
                  ("remove_label", 1), ("update_label_info", 1)}  # fmt: skip


def _stem(path: str) -> str:
    return Path(str(path)).name.split(".")[0] or "image"


def _name(path: str, ds: Any) -> str:
    """The name of an image in result file names: its datastore id, ``upload`` for a file MONAI Label received in
    the request (a ``tmp*`` file of the temporary folder), else the file's stem."""
    stem = _stem(path)
    if ds is not None and ds.get_image_uri(stem) and os.path.samefile(ds.get_image_uri(stem), path):
        return stem
    if Path(path).resolve().parent == Path(tempfile.gettempdir()).resolve() and stem.startswith("tmp"):
        return "upload"
    return stem


class RegistrationInferTask(_Base):  # type: ignore[misc,valid-type]
    """Register the request's ``moving`` image onto its ``image`` (fixed) with the bundle at ``bundle_path``.

    Args:
        bundle_path: the bundle folder (``configs/inference.yaml``, ``configs/metadata.json``, ``models/``).
        conf: the MONAI Label app's ``--conf`` values (kept as ``self.conf``).
        config_file: the inference config in ``configs/``.
        datastore: a MONAI Label datastore (or a callable returning one) to resolve image ids; ``None``: paths only.
        results_dir: where each request's folder is made (default: a new temporary folder per request).
        server_paths: accept paths on the server for ``moving`` / ``moving_label`` (and ``output_dir``) besides
            datastore ids (default off: a client names datastore images only). On, a path must lie inside one of
            ``server_roots`` (symbolic links resolved), else 403.
        server_roots: the folders that server paths may point into (``None`` / empty: none, every path refused).
        return_copy: return a copy of the chosen file (MONAI Label deletes the returned file once sent) so that the
            results folder keeps every file of the request.
        override: config ids to override (e.g. ``spatial_size=[128, 128]``, ``ckpt_path=...``).
    """

    def __init__(
        self,
        bundle_path: str | os.PathLike,
        conf: dict | None = None,
        config_file: str = "inference.yaml",
        datastore: Any = None,
        results_dir: str | os.PathLike | None = None,
        server_paths: bool = False,
        return_copy: bool = False,
        server_roots: list | tuple | None = None,
        **override: Any,
    ) -> None:
        self.bundle_path = str(Path(bundle_path).resolve())
        self.config_file = os.path.join(self.bundle_path, "configs", config_file)
        self.override = override
        self.conf = conf or {}
        self._datastore = datastore
        self.results_dir = str(results_dir) if results_dir else None
        self.server_paths = bool(server_paths)
        self.server_roots = [os.path.realpath(str(r)) for r in (server_roots or [])]
        self.return_copy = bool(return_copy)
        with open(os.path.join(self.bundle_path, "configs", "metadata.json")) as f:
            self.metadata = json.load(f)
        spatial = self.metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
        config = {"uncertainty": False, "output": "auto", "device": "cuda"}
        description = self.metadata.get("description", "")
        if HAS_MONAILABEL:
            super().__init__(
                type=_TYPE, labels=dict(LABELS), dimension=len(spatial), description=description, config=config
            )
        else:
            self.type, self.labels, self.dimension = _TYPE, dict(LABELS), len(spatial)
            self.description, self._config = description, config
        self._inferers: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ MONAI Label API
    def is_valid(self) -> bool:
        return os.path.isfile(self.config_file) and os.path.isfile(os.path.join(self.bundle_path, "models", "model.pt"))

    def config(self) -> dict:
        return self._config

    def info(self) -> dict:
        return {
            "type": self.type,
            "labels": self.labels,
            "dimension": self.dimension,
            "description": self.description,
            "config": self.config(),
            "outputs": list(OUTPUTS),
            "version": self.metadata.get("version"),
        }

    # -------------------------------------------------------------------------------------------------- helpers
    def datastore(self):
        ds = self._datastore
        return ds() if callable(ds) and not hasattr(ds, "get_image_uri") else ds

    def _inferer(self, uncertainty: bool, device: str):
        key = (uncertainty, device)
        with self._lock:
            if key not in self._inferers:
                from monai.bundle import ConfigParser

                if self.bundle_path not in sys.path:
                    sys.path.insert(0, self.bundle_path)
                parser = ConfigParser()
                parser.read_config(self.config_file)
                parser.update(
                    {
                        "bundle_root": self.bundle_path,
                        "uncertainty": uncertainty,
                        "overlay": False,
                        "device": f"$torch.device({device!r})",
                        **self.override,
                    }
                )
                self._inferers[key] = parser.get_parsed_content("inferer")
            return self._inferers[key]

    def preload(self, device: str = "cpu", uncertainty: bool = False) -> None:
        """Build the inferer (load the networks) before the first request."""
        self._inferer(uncertainty, self._device(device))

    @staticmethod
    def _device(device: Any) -> str:
        import torch

        device = str(device or "cpu").strip().lower()
        if device.startswith("cuda") and not torch.cuda.is_available():
            return "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise RequestError(400, f"'device': not a torch device: {device!r} (use cuda or cpu).") from None
        if dev.type == "cpu" and dev.index in (None, 0):
            return "cpu"
        if dev.type == "cuda" and (dev.index is None or dev.index < torch.cuda.device_count()):
            return device
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise RequestError(
            400,
            f"'device': {device!r} is not a device of this server (use cpu, or cuda / cuda:0 .. cuda:{max(n - 1, 0)} "
            f"where it has a GPU; it has {n}).",
        )

    def _server_path(self, value: str, key: str, folder: bool = False) -> str | None:
        """``value`` as a server path when ``server_paths`` is on and it lies inside ``server_roots`` (``None`` when
        it does not exist); 403 outside the roots."""
        if not self.server_paths:
            return None
        real = os.path.realpath(value)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.server_roots):
            roots = ", ".join(self.server_roots) or "none configured (--conf server_roots)"
            raise RequestError(
                403, f"'{key}': {value!r} is outside the folders this server may read or write ({roots})."
            )
        if folder:
            return real
        return real if os.path.isfile(real) else None

    @staticmethod
    def _looks_like_path(value: str) -> bool:
        return "/" in value or "\\" in value or value.startswith(("~", "."))

    def _ids(self) -> list[str]:
        ds = self.datastore()
        return sorted(ds.list_images()) if ds is not None else []

    def _image(self, value: Any, key: str) -> str:
        """A datastore id or (``server_paths``) a path on the server -> the image's path."""
        if not isinstance(value, str) or not value.strip():
            raise RequestError(400, f"'{key}': expected a datastore image id, got {value!r}.")
        if self._looks_like_path(value):
            path = self._server_path(value, key)
            if path is not None:
                return path
            if not self.server_paths:
                raise RequestError(
                    400,
                    f"'{key}': {value!r} is a path; this server takes datastore image ids only (server_paths is off).",
                )
        else:
            check_store_id(value, key)
        ds = self.datastore()
        if ds is not None and not self._looks_like_path(value):
            uri = ds.get_image_uri(value)
            if uri:
                return uri
        ids = self._ids()
        have = f"the datastore holds {len(ids)} image(s): {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}"
        paths = " nor an existing path on the server" if self.server_paths else ""
        raise RequestError(
            404,
            f"'{key}': {value!r} is not an image id of the datastore{paths} ({have}). Upload it "
            "first (PUT /datastore/image?image=<id>) or name an existing id.",
        )

    def _label(self, req: dict, moving: Any, moving_is_id: bool) -> str | None:
        tag = str(req.get("label_tag") or "final")
        check_store_id(tag, "label_tag")
        ds = self.datastore()
        if "moving_label" not in req or req["moving_label"] is None:  # auto: the moving image's own label, if any
            if ds is not None and moving_is_id:
                return ds.get_label_uri(moving, tag) or None
            return None
        value = req["moving_label"]
        if isinstance(value, bool) or str(value).strip().lower() in _NONE:
            if value is True:
                raise RequestError(400, "'moving_label': give a datastore id, a path or none (not true).")
            return None
        value = str(value)
        check_store_id(tag, "label_tag")
        if self._looks_like_path(value):
            path = self._server_path(value, "moving_label")
            if path is not None:
                return path
            if not self.server_paths:
                raise RequestError(
                    400,
                    f"'moving_label': {value!r} is a path; this server takes datastore ids only (server_paths off).",
                )
        else:
            check_store_id(value, "moving_label")
        if ds is not None and not self._looks_like_path(value):
            uri = ds.get_label_uri(value, tag)
            if uri:
                return uri
        raise RequestError(
            404,
            f"'moving_label': {value!r} has no label with tag {tag!r} in the datastore"
            f"{' and is not an existing path on the server' if self.server_paths else ''}. Save "
            "one first (PUT /datastore/label?image=<id>&tag=final) or pass moving_label none.",
        )

    def _results_root(self, req: dict) -> str:
        if req.get("output_dir"):
            if not self.server_paths:
                raise RequestError(400, "'output_dir' is not accepted by this server (server_paths is off).")
            out = self._server_path(str(req["output_dir"]), "output_dir", folder=True)
            if os.path.exists(out) and not os.path.isdir(out):
                raise RequestError(400, f"'output_dir': {req['output_dir']!r} is a file, not a folder.")
            return out
        if self.results_dir:
            return self.results_dir
        return tempfile.mkdtemp(prefix="registration_")

    def _reply(self, path: str, root: str) -> str:
        """The file handed to MONAI Label, which deletes it after sending: a copy when ``return_copy``."""
        if not self.return_copy:
            return path
        outbox = Path(root) / ".outbox"
        outbox.mkdir(parents=True, exist_ok=True)
        dst = outbox / Path(path).name
        shutil.copyfile(path, dst)
        return str(dst)

    def _earlier(self, req: dict) -> tuple[str, dict]:
        from scripts.data.contracts import safe_id

        rid = str(req["result_id"])
        root = self.results_dir
        try:
            plain = rid == safe_id(rid, "result_id")
        except ValueError:
            plain = False
        index = Path(root) / rid / "request.json" if root is not None and plain else None
        if index is None or not index.is_file():
            raise RequestError(404, f"'result_id': no earlier result {rid!r} on this server.")
        record = json.loads(index.read_text())
        want = str(req.get("output") or "auto")
        if want == "auto":
            want = record["output"]
        if want not in record["files"]:
            raise RequestError(404, f"'output': result {rid!r} has no {want!r} (it has {sorted(record['files'])}).")
        return self._reply(record["files"][want], root), {**record, "output": want}

    # ----------------------------------------------------------------------------------------------- the request
    def __call__(self, request: dict) -> tuple[str, dict]:
        """Register one pair; return (path of the requested file, JSON result listing every file written)."""
        from scripts.data import DataError
        from scripts.inference import InferenceFailures, make_pairs

        t0 = time.perf_counter()
        req = {**self._config, **request}
        want = str(req.get("output") or "auto")
        if want not in OUTPUTS + ("auto",):
            raise RequestError(400, f"'output': expected one of {['auto', *OUTPUTS]}, got {want!r}.")
        if req.get("result_id"):
            return self._earlier(req)
        fixed = req.get("image")
        if not fixed or not os.path.isfile(str(fixed)):
            raise RequestError(
                404,
                f"'image' (the fixed image): {fixed!r} is not an image of the datastore or an "
                "uploaded file; name a datastore id (?image=<id>) or upload it as 'file'.",
            )
        if not req.get("moving"):
            raise RequestError(
                400,
                "registration needs the request key 'moving' (the datastore id of the moving "
                'image) besides \'image\' (the fixed image): params={"moving": "<id>"}.',
            )
        moving = self._image(req["moving"], "moving")
        ds = self.datastore()
        moving_is_id = ds is not None and bool(ds.get_image_uri(str(req["moving"])))
        moving_label = self._label(req, req["moving"], moving_is_id)
        uncertainty = _flag(req.get("uncertainty", False), "uncertainty")
        if want in ("sigma2", "weight") and not uncertainty:
            raise RequestError(400, f"'output': {want!r} needs 'uncertainty': true.")
        if want == "warped_label" and moving_label is None:
            raise RequestError(
                400,
                "'output': 'warped_label' needs a moving label ('moving_label' or a label of "
                "the moving image in the datastore).",
            )
        device = self._device(req.get("device"))

        rid = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        m_name = str(req["moving"]) if moving_is_id else _stem(moving)
        pair_id = f"{m_name}_to_{_name(str(fixed), ds)}_{rid}"
        root = self._results_root(req)
        out_dir = os.path.join(root, rid)
        try:
            inferer = self._inferer(uncertainty, device)
            items = make_pairs(moving=moving, fixed=str(fixed), moving_label=moving_label, pair_id=pair_id)
            record = inferer.run(items, out_dir)[0]
        except RequestError:
            raise
        except (DataError, InferenceFailures) as e:
            raise RequestError(422, f"registration of {req['moving']!r} onto the fixed image refused: {e}") from e
        except FileNotFoundError as e:
            raise RequestError(404, str(e)) from e
        except ValueError as e:
            raise RequestError(400, str(e)) from e
        except Exception as e:  # noqa: BLE001 - a server-side failure (config, weights): 500 with the reason
            logger.exception("registration %s failed", rid)
            raise RequestError(
                500, f"registration failed on the server ({type(e).__name__}: {e}); see the server log."
            ) from e
        files = dict(record["outputs"])
        if want == "auto":
            want = "warped_label" if "warped_label" in files else "warped"
        result = {
            "result_id": rid,
            "output": want,
            "files": files,
            "result_dir": out_dir,
            "moving": str(req["moving"]),
            "fixed": str(request.get("image")),
            "moving_label": moving_label,
            "uncertainty": uncertainty,
            "device": device,
            "input_size": record["input_size"],
            "network_size": record.get("network_size"),
            "resized": record["resized"],
            "labels": dict(LABELS),
            "latency_s": round(time.perf_counter() - t0, 3),
        }
        with open(os.path.join(out_dir, "request.json"), "w") as f:
            json.dump(result, f, indent=2)
        logger.info(
            "registration %s: %s -> %s in %.2f s (%s)", rid, req["moving"], _stem(fixed), result["latency_s"], out_dir
        )
        return self._reply(files[want], root), result
