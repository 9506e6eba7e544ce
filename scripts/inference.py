"""Inference: register image pairs of any size with the trained networks and write the results in the input space.

Used by ``configs/inference.yaml`` (``python -m monai.bundle run --config_file configs/inference.yaml --moving M
--fixed F [--moving_label L] [--uncertainty true] --output_dir OUT``, or ``--datalist pairs.json`` for many pairs in
one process) and usable on its own::

    inferer = RegistrationInferer(network, spatial_size=(128, 128))
    records = inferer.run(make_pairs(moving="m.nii.gz", fixed="f.nii.gz"), "out")

The engine is here (loading and checks, batching, the forward, the way back to the input grid, the run with its
index and failure policy); the pairs and options are in :mod:`scripts.inference_pairs`, the writers (``SaveImage``)
and the index in :mod:`scripts.inference_writers`, the canonical frame in :mod:`scripts.inference_frame`, the
weights (``CheckpointLoader``) in :mod:`scripts.inference_weights`; the benchmark is
``python -m bundle.inference_bench``.

Conventions of the outputs (docs/inference.md):

- everything is written on the grid of the **fixed** image, with the fixed image's affine (hence its spacing),
  as NIfTI (``monai.transforms.SaveImage``), one file per quantity: ``<id>_ddf.nii.gz``, ``<id>_warped.nii.gz``,
  ``<id>_warped_label.nii.gz``, ``<id>_sigma2.nii.gz``, ``<id>_weight.nii.gz`` and (``overlay: true``)
  ``<id>_overlay.png``;
- the DDF is stored channel-last, shape ``spatial + (ndim,)``, in **voxel units of the fixed grid**, channel i =
  displacement along array axis i, applied as ``monai.networks.blocks.Warp`` does: Î_f(x) = I_m(x + z(x));
- when the input size differs from the network size (``spatial_size``) the pair is resized to it (bilinear,
  labels nearest), the network runs there, and the DDF is resized back (bilinear / trilinear,
  ``align_corners=False``) with its values multiplied per axis by ``input_size_i / network_size_i``;
- ``orientation: canonical`` presents the pair to the network in the canonical frame (array axes sorted by world
  axis, pointing to +: RAS for 3D) and writes every result back in the input's frame (DDF axes and signs mapped back);
- the warped image is the moving image **in its original intensities** warped with that DDF (bilinear, border
  padding as in training); the warped label uses nearest interpolation;
- σ̂² = exp(log σ̂²) of the variance network (intensity² units of the network input, i.e. images in [0, 1]) and
  the Eq. 4 weight map (``SNRWeightedMSELoss.weight_map``, per pair) are computed on the network grid and resized back.

Input contracts (:mod:`scripts.data.contracts`; errors are :class:`scripts.data.DataError` naming the file):
unreadable or truncated files, dimensionality, channels, NaN/Inf, constant images, intensities outside [0, 1] with
``intensity: none`` (refused, never normalised silently: use ``--intensity percentile``), labels outside
{0, 1, 2, 3} or not integer, grids (shape, spacing, direction, origin) that differ (``on_grid_mismatch``). Ids are
sanitised (never a path), the output folder may neither be nor contain an input, existing results are never
replaced without ``overwrite`` and ``overwrite`` removes only files the bundle wrote (marker file). ``run`` writes the
index ``inference.json`` after every pair (``done`` / ``failed`` with the error); a failed pair does not stop the
others unless ``fail_fast``; ``run`` raises :class:`InferenceFailures` at the end when some pair failed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import Warp
from monai.transforms import ResampleToMatch, Resize, ScaleIntensityRangePercentiles

from scripts.checkpoint import load_weights
from scripts.data import DataError
from scripts.data.contracts import (
    GRID_POLICIES,
    INTENSITY_POLICIES,
    LABEL_SET,
    affine4,
    atomic_write_json,
    check_geometry,
    check_intensity,
    check_labels,
    not_a_file,
    prepare_output_dir,
    prune_marker,
    read_error,
    record_written,
    safe_id,
    stored_dtype,
)
from scripts.inference_frame import CanonicalFrame
from scripts.inference_pairs import (
    IMAGE_KEYS,
    LABEL_KEYS,
    PAIR_KEYS,
    flag_option,
    int_option,
    make_pairs,
    pair_preprocessing,
    positive_float_option,
)
from scripts.inference_weights import WeightsLoader
from scripts.inference_writers import (
    INDEX_NAME,
    OUTPUT_SUFFIXES,
    index_summary,
    previous_records,
    save_nifti,
    write_outputs,
)
from scripts.metrics.calibration import sigma_scale_value
from scripts.metrics.quality import qc_score as pair_qc_score

logger = logging.getLogger(__name__)

__all__ = [
    "RegistrationInferer",
    "InferenceFailures",
    "WeightsLoader",
    "make_pairs",
    "load_weights",
    "pair_preprocessing",
    "write_outputs",
    "save_nifti",
    "OUTPUT_SUFFIXES",
    "INDEX_NAME",
]

ORIENTATIONS = ("none", "canonical")


class InferenceFailures(RuntimeError):
    """Raised by :meth:`RegistrationInferer.run` after all pairs ran when some failed; ``records`` is the index."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


# ----------------------------------------------------------------------------------------------------- inferer
def _lambda_option(value: Any, option: str) -> float | None:
    """``value`` as a finite number >= 0, or ``None``."""
    if value is None:
        return None
    try:
        v = float(value)
        ok = bool(np.isfinite(v) and v >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--{option}: expected a finite number >= 0 or null, got {value!r}.")
    return v


class RegistrationInferer:
    """Register pairs of images with the displacement network (and, on request, the variance network).

    Args:
        network: displacement network, ``network(cat([moving, fixed], 1)) -> DDF`` (voxel units of its grid).
        spatial_size: the network input size; pairs of another size are resized to it and the results resized
            back (DDF values rescaled per axis).
        variance_network: the variance estimator (``cat([warped, fixed], 1) -> log σ̂²``), or ``None``.
        weight_fn: ``(fixed, log_var) -> weight`` (the Eq. 4 weight map), e.g. ``SNRWeightedMSELoss.weight_map``;
            applied per pair (its normalisation is over the whole tensor it gets).
        uncertainty: compute σ̂² and the weight map (needs ``variance_network``).
        intensity: ``"none"`` (images must already be in [0, 1]: anything else is refused) or ``"percentile"``
            (0.5-99.5 percentiles -> [0, 1], any finite range).
        on_grid_mismatch: ``"error"`` (default) or ``"resample"`` when moving and fixed differ in shape, spacing,
            direction or origin (full affines, tolerance ``geometry_tol``).
        device: torch device.
        preprocessing: the loading transform (default :func:`pair_preprocessing`).
        padding_mode: padding of the image warp (``"border"`` as in training).
        overlay: write a PNG panel per pair (≈ 1 s of CPU per pair; off by default).
        spacing_rtol: deprecated alias of ``geometry_tol``.
        geometry_tol: relative tolerance on spacing, absolute on direction cosines, fraction of a voxel on origin.
        orientation: ``"none"`` (the network sees the arrays as stored, as in training) or ``"canonical"``.
        batch_size: pairs per forward pass in :meth:`run`.
        threads: ``torch.set_num_threads`` (``None``: leave torch's default).
        overwrite: let :meth:`run` replace what the bundle wrote earlier in the output folder.
        fail_fast: stop :meth:`run` at the first failed pair (default: record it and go on).
        progress: a tqdm progress bar in :meth:`run`.
        label_set: the allowed label values.
        weights: :class:`scripts.inference_weights.WeightsLoader` handlers (``CheckpointLoader``), run when the
            inferer is built; the variance network's only when it is used (``uncertainty`` or ``instance_steps``),
            otherwise the variance network is dropped.
        instance_steps: test-time instance optimisation (:func:`scripts.instance_optimisation.optimise_pair`): Adam
            steps on each pair with the bundle's loss and the Eq. 4 weight of the variance network; 0 (default): off,
            the network's own DDF.
        instance_lr: Adam's learning rate of the weight-level instance optimisation (``instance_mode="weights"``).
        instance_mode: ``"field"`` (default: :func:`scripts.instance_optimisation.optimise_field`, a coarse residual
            of the network's velocity, a few ms per step) or ``"weights"`` (:func:`~scripts.instance_optimisation.
            optimise_pair`, a copy of the network fine-tuned per pair).
        instance_grid, instance_field_lr, instance_weight, instance_field_lambda: the field mode's residual grid
            size per axis, Adam's learning rate on it, its data weight (``"mse"``: unit weights; ``"snr"``: the Eq. 4
            weight of the frozen variance network) and its smoothness weight λ (``None``: ``lambda_reg``); chosen on
            the phantoms' validation splits, docs/instance_optimisation.md.
        sim_loss, reg_loss, lambda_reg: the loss of the instance optimisation (train.yaml's, by default those of
            :func:`~scripts.instance_optimisation.optimise_pair`).
        sigma_scale: the σ scale s fitted on validation (``python -m bundle calibrate``): ``None`` (default: σ̂² as
            the variance network gives it), a number, or the path of its ``variance_scale.json``; σ̂² (and the Eq. 4
            weight map written with it) become s² σ̂², applied once, where log σ̂² leaves the variance network.
        qc_score: also register fixed → moving (one more forward pass) and put the per-pair ``qc_score`` in the
            index: the mean inverse-consistency error ‖z_fw(x) + z_bw(x + z_fw(x))‖ in pixels of the network grid
            over the image field of view, the evaluation's definition (:func:`scripts.metrics.quality.qc_score`);
            larger = less trustworthy.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        spatial_size: Sequence[int],
        variance_network: torch.nn.Module | None = None,
        weight_fn: Callable | None = None,
        uncertainty: bool | str = False,
        intensity: str = "none",
        on_grid_mismatch: str = "error",
        device: str | torch.device = "cpu",
        preprocessing: Callable | None = None,
        padding_mode: str = "border",
        overlay: bool | str = False,
        spacing_rtol: float | None = None,
        geometry_tol: float = 1e-3,
        orientation: str = "none",
        batch_size: int | str = 1,
        threads: int | str | None = None,
        overwrite: bool | str = False,
        fail_fast: bool | str = False,
        progress: bool | str = True,
        label_set: Sequence[int] = LABEL_SET,
        weights: Sequence[WeightsLoader] = (),
        instance_steps: int | str = 0,
        instance_lr: float | str = 1e-4,
        instance_mode: str = "field",
        instance_grid: int | str = 16,
        instance_field_lr: float | str = 0.1,
        instance_weight: str = "mse",
        instance_field_lambda: float | str | None = 0.02,
        sim_loss: Callable | None = None,
        reg_loss: Callable | None = None,
        lambda_reg: float = 0.01,
        sigma_scale: float | str | None = None,
        qc_score: bool | str = True,
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.nd = len(self.spatial_size)
        if self.nd not in (2, 3):
            raise ValueError(f"--spatial_size must have 2 or 3 entries, got {spatial_size}.")
        if intensity not in INTENSITY_POLICIES:
            raise ValueError(f"--intensity must be one of {list(INTENSITY_POLICIES)}, got {intensity!r}.")
        if on_grid_mismatch not in GRID_POLICIES:
            raise ValueError(f"--on_grid_mismatch must be one of {list(GRID_POLICIES)}, got {on_grid_mismatch!r}.")
        if orientation in (None, "null"):
            orientation = "none"
        if orientation not in ORIENTATIONS:
            raise ValueError(f"--orientation must be one of {list(ORIENTATIONS)}, got {orientation!r}.")
        self.geometry_tol = float(spacing_rtol if spacing_rtol is not None else geometry_tol)
        if not (np.isfinite(self.geometry_tol) and 0 < self.geometry_tol < 0.5):
            raise ValueError(f"--geometry_tol must be in (0, 0.5), got {geometry_tol!r}.")
        self.batch_size = int_option(batch_size, "batch_size")
        self.threads = int_option(threads, "threads", allow_none=True)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.uncertainty = flag_option(uncertainty, "uncertainty")
        if self.uncertainty and variance_network is None:
            raise ValueError("uncertainty=true needs the variance network (this config has variance_def: null).")
        self.instance_steps = int_option(instance_steps, "instance_steps", minimum=0)
        self.instance_lr = positive_float_option(instance_lr, "instance_lr")
        if instance_mode not in ("field", "weights"):
            raise ValueError(f"--instance_mode: expected 'field' or 'weights', got {instance_mode!r}.")
        if instance_weight not in ("mse", "snr"):
            raise ValueError(f"--instance_weight: expected 'mse' or 'snr', got {instance_weight!r}.")
        self.instance_mode, self.instance_weight = instance_mode, instance_weight
        self.instance_grid = int_option(instance_grid, "instance_grid", minimum=2)
        self.instance_field_lr = positive_float_option(instance_field_lr, "instance_field_lr")
        self.instance_field_lambda = _lambda_option(instance_field_lambda, "instance_field_lambda")
        self.sim_loss, self.reg_loss, self.lambda_reg = sim_loss, reg_loss, float(lambda_reg)
        self.sigma_scale = sigma_scale_value(sigma_scale)
        self.qc_score = flag_option(qc_score, "qc_score")
        weighted = self.instance_steps and (instance_mode == "weights" or instance_weight == "snr")
        if not (self.uncertainty or weighted):
            variance_network = None  # not used: its weights are not even read
        for loader in weights:
            if loader.network is network or (variance_network is not None and loader.network is variance_network):
                loader.load()
        self.network = network.to(self.device).eval()
        self.variance_network = variance_network.to(self.device).eval() if variance_network is not None else None
        self.weight_fn = weight_fn
        self.intensity = intensity
        self.on_grid_mismatch = on_grid_mismatch
        self.orientation = orientation
        self.preprocessing = preprocessing if preprocessing is not None else pair_preprocessing()
        self.overlay = flag_option(overlay, "overlay")
        self.overwrite = flag_option(overwrite, "overwrite")
        self.fail_fast = flag_option(fail_fast, "fail_fast")
        self.progress = flag_option(progress, "progress")
        self.label_set = tuple(int(v) for v in label_set)
        self.warp = Warp(mode="bilinear", padding_mode=padding_mode)
        self.label_warp = Warp(mode="nearest", padding_mode="border")
        self.linear = "bilinear" if self.nd == 2 else "trilinear"

    # ------------------------------------------------------------------------------------------------ loading
    def _read(self, key: str, path: str):
        try:
            return self.preprocessing({key: path})[key]
        except Exception as e:  # noqa: BLE001 - every reader error becomes one message naming the file
            raise read_error(path, e, f"'{key}' image") from e

    def load(self, item: Mapping[str, Any]) -> dict:
        """Load and check one pair; return channel-first MetaTensors on the fixed grid (squeezed to the network's
        dimensionality) and ``output_shape``, the fixed image's own spatial shape."""
        for k in IMAGE_KEYS:
            if not item.get(k):
                raise ValueError(f"pair {item.get('id')}: '{k}' is required.")
        for k in PAIR_KEYS:
            v = item.get(k)
            if v is None:
                continue
            problem = not_a_file(str(v))
            if problem == "does not exist":
                raise FileNotFoundError(f"{v}: '{k}' file does not exist.")
            if problem:
                raise DataError(f"{v}: '{k}' {problem}; give an image file.")
        data = {k: self._read(k, str(item[k])) for k in PAIR_KEYS if item.get(k) is not None}
        output_shape = tuple(int(s) for s in data["fixed"].shape[1:])
        for k in [k for k in PAIR_KEYS if k in data]:
            data[k] = self._check_dims(data[k], str(item[k]), k)
            if k in IMAGE_KEYS:
                check_intensity(data[k], item[k], self.intensity, key=k, stored_dtype=stored_dtype(data[k]))
            else:
                check_labels(data[k], item[k], self.label_set, key=k)
        self._check_grid(data, item)
        return {"data": data, "output_shape": output_shape}

    def _check_dims(self, x, name: str, key: str):
        if x.shape[0] != 1:
            raise DataError(f"{name}: '{key}' has {x.shape[0]} channels (shape {tuple(x.shape)}); expected one.")
        spatial = tuple(x.shape[1:])
        if len(spatial) == self.nd:
            return x
        if len(spatial) == self.nd + 1 and spatial[-1] == 1:  # 2D image stored as (H, W, 1)
            y = x[..., 0]
            if hasattr(x, "affine"):
                y.affine = x.affine  # the 4x4 affine is kept for writing
            return y
        raise DataError(
            f"{name}: '{key}' has {len(spatial)} spatial dims (shape {spatial}), the network is {self.nd}D "
            f"(spatial_dims={self.nd}, spatial_size={list(self.spatial_size)}): use the "
            f"{'3D' if len(spatial) == 3 else '2D'} configuration (--spatial_dims {len(spatial)} --spatial_size ...) "
            f"with matching weights."
        )

    def _check_grid(self, data: dict, item: Mapping) -> None:
        fixed = data["fixed"]
        for k in ("moving", "moving_label", "fixed_label"):
            if k not in data:
                continue
            x = data[k]
            same = check_geometry(
                x.affine,
                fixed.affine,
                (item[k], item["fixed"]),
                tol=self.geometry_tol,
                on_mismatch=self.on_grid_mismatch,
                moving_shape=x.shape[1:],
                fixed_shape=fixed.shape[1:],
                keys=(k, "fixed"),
                resample_allowed=k != "fixed_label",
            )
            if not same:
                mode = "nearest" if k in LABEL_KEYS else "bilinear"
                data[k] = ResampleToMatch(mode=mode, padding_mode="border")(x, img_dst=fixed)

    # -------------------------------------------------------------------------------------------------- infer
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.intensity == "percentile":
            return ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(x)
        return x

    def _resize(self, x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
        if tuple(x.shape[1:]) == tuple(size):
            return x
        return self._plain(Resize(tuple(size), mode=mode, anti_aliasing=False)(x))

    @staticmethod
    def _plain(x) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.float()

    def prepare(self, item: Mapping[str, Any]) -> dict:
        """Load and check one pair and make the network inputs (``m_net``, ``f_net``: (1, 1, *spatial_size))."""
        loaded = self.load(item)
        data = loaded["data"]
        moving_s = self._plain(self._scale(data["moving"]))
        fixed_s = self._plain(self._scale(data["fixed"]))
        frame = CanonicalFrame(data["fixed"].affine, self.nd) if self.orientation == "canonical" else None
        m_c = frame.to_canonical(moving_s) if frame else moving_s
        f_c = frame.to_canonical(fixed_s) if frame else fixed_s
        can_size = tuple(m_c.shape[1:])
        return {
            "item": item,
            "data": data,
            "output_shape": loaded["output_shape"],
            "moving_s": moving_s,
            "fixed_s": fixed_s,
            "frame": frame,
            "can_size": can_size,
            "m_net": self._resize(m_c, self.spatial_size, self.linear)[None],
            "f_net": self._resize(f_c, self.spatial_size, self.linear)[None],
        }

    @torch.no_grad()
    def forward(self, preps: Sequence[Mapping[str, Any]]) -> list[dict]:
        """One forward pass of the networks on a batch of prepared pairs; per pair ``ddf``/``log_var``/``weight``
        on the network grid ((C, *spatial_size), CPU)."""
        m = torch.cat([p["m_net"] for p in preps], 0).to(self.device)
        f = torch.cat([p["f_net"] for p in preps], 0).to(self.device)
        if self.instance_steps:
            ddf = self._optimise(m, f)
        else:
            ddf = self.network(torch.cat([m, f], dim=1)).float()
        log_var = None
        if self.uncertainty:
            log_var = self.variance_network(torch.cat([self.warp(m, ddf), f], dim=1)).float()
            if self.sigma_scale is not None:  # the validation σ scale, once: σ̂² -> s² σ̂² (the weight map follows)
                log_var = log_var + 2.0 * math.log(self.sigma_scale)
        qc = None
        if self.qc_score:  # as the evaluation: the plain network's fixed -> moving DDF, on the network grid
            ddf_bw = self.network(torch.cat([f, m], dim=1)).float()
            qc = pair_qc_score(f, self.warp(m, ddf), m, ddf, ddf_backward=ddf_bw)
        outs = []
        for i in range(len(preps)):
            o = {"ddf": ddf[i].cpu(), "log_var": None, "weight": None, "qc_score": None}
            if qc is not None:
                o["qc_score"] = float(qc[i])
            if log_var is not None:
                o["log_var"] = log_var[i].cpu()
                if self.weight_fn is not None:  # per pair: the weight's normalisation spans the tensor it is given
                    one = slice(i, i + 1)
                    o["weight"] = self.weight_fn(f[one], log_var[one]).float()[0].cpu()
            outs.append(o)
        return outs

    def _optimise(self, m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The DDF after ``instance_steps`` Adam steps on each pair (the networks themselves are not changed)."""
        from scripts.instance_optimisation import optimise_field, optimise_pair

        if self.instance_mode == "field":
            ddf = optimise_field(
                self.network,
                self.variance_network,
                m,
                f,
                steps=self.instance_steps,
                lr=self.instance_field_lr,
                grid=self.instance_grid,
                instance_weight=self.instance_weight,
                warp=self.warp,
                sim_loss=self.sim_loss,
                reg_loss=self.reg_loss,
                lambda_reg=self.lambda_reg if self.instance_field_lambda is None else self.instance_field_lambda,
                progress=False,
            )
            return ddf.detach().float()
        with torch.enable_grad():
            ddf = optimise_pair(
                self.network,
                self.variance_network,
                m,
                f,
                steps=self.instance_steps,
                lr=self.instance_lr,
                warp=self.warp,
                sim_loss=self.sim_loss,
                reg_loss=self.reg_loss,
                lambda_reg=self.lambda_reg,
            )
        return ddf.detach().float()

    @torch.no_grad()
    def finish(self, prep: Mapping[str, Any], out: Mapping[str, Any]) -> dict:
        """Bring one pair's network outputs back to the input grid and warp; the result :func:`write_outputs` takes."""
        data, frame, can_size = prep["data"], prep["frame"], prep["can_size"]
        resized = can_size != self.spatial_size
        ddf = out["ddf"]
        if resized:
            ddf = self._resize(ddf, can_size, self.linear)
            scale = torch.tensor([i / n for i, n in zip(can_size, self.spatial_size)], dtype=ddf.dtype)
            ddf = ddf * scale.view(-1, *([1] * self.nd))
        if frame is not None:
            ddf = frame.ddf_from_canonical(ddf)

        def back(x):
            if x is None:
                return None
            x = self._resize(x, can_size, self.linear) if resized else x
            return frame.from_canonical(x) if frame is not None else x

        moving_raw = self._plain(data["moving"])
        warped = self.warp(moving_raw[None], ddf[None])[0]
        log_var = back(out["log_var"])
        result = {
            "id": prep["item"]["id"],
            "ddf": ddf,
            "warped": warped,
            "sigma2": None if log_var is None else torch.exp(log_var),
            "qc_score": out.get("qc_score"),
            "weight": back(out["weight"]),
            "affine": affine4(data["fixed"].affine),
            "output_shape": prep["output_shape"],
            "input_size": list(moving_raw.shape[1:]),
            "network_size": list(self.spatial_size),
            "resized": resized,
            "reoriented": frame is not None and not frame.identity,
            "moving_display": prep["moving_s"],
            "fixed_display": prep["fixed_s"],
            "warped_display": self.warp(prep["moving_s"][None], ddf[None])[0] if self.overlay else None,
            "fixed_label": self._plain(data["fixed_label"]) if "fixed_label" in data else None,
            "warped_label": None,
        }
        if "moving_label" in data:
            result["warped_label"] = self.label_warp(self._plain(data["moving_label"])[None], ddf[None])[0]
        return result

    @torch.no_grad()
    def infer(self, item: Mapping[str, Any]) -> dict:
        """Register one pair; return tensors (C, *spatial) on the fixed grid and the bookkeeping to write them."""
        prep = self.prepare(item)
        return self.finish(prep, self.forward([prep])[0])

    def __call__(self, item: Mapping[str, Any]) -> dict:
        return self.infer(item)

    # ---------------------------------------------------------------------------------------------------- run
    def run(
        self, pairs: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, overwrite: bool | None = None
    ) -> list[dict]:
        """Register every pair (``batch_size`` per forward) and write its outputs into ``output_dir``.

        Before anything is written: ids must be unique plain names, the folder may neither be nor contain an input,
        and files of these ids already there are refused unless ``overwrite`` (which first removes every file the
        bundle wrote there earlier, listed in its marker). The index ``inference.json`` is rewritten (atomically)
        after every pair, with ``status`` ``done`` or ``failed`` (and the error); records of other ids from earlier
        runs into the same folder are kept. A failed pair leaves no files; the others go on unless ``fail_fast``.
        Returns this run's records; raises :class:`InferenceFailures` at the end if a pair failed (or the pair's own
        error when it is the only pair or ``fail_fast`` is set).
        """
        overwrite = self.overwrite if overwrite is None else flag_option(overwrite, "overwrite")
        pairs = list(pairs)
        ids = [str(p.get("id")) for p in pairs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise DataError(f"duplicate pair ids {dup}: make them unique (make_pairs does).")
        for i in ids:
            if i != safe_id(i):
                raise DataError(f"pair id {i!r}: not a plain file name (make_pairs sanitises ids).")
        inputs = [p.get(k) for p in pairs for k in PAIR_KEYS + ("datalist",)]
        planned = [f"{i}{s}" for i in ids for s in OUTPUT_SUFFIXES.values()]
        out = prepare_output_dir(output_dir, inputs, overwrite, planned, tool="inference")
        index_path = out / INDEX_NAME
        previous = previous_records(out, set(ids))
        records: list[dict] = []

        # every name this run may write is in the marker before it is written (a crash leaves nothing unlisted);
        # names never written are dropped from it at the end. A pair counts as done once the index says so.
        record_written(out, planned + [INDEX_NAME], tool="inference")

        def save_index():
            atomic_write_json(index_path, index_summary(previous + records))

        def fail(item: Mapping, err: BaseException) -> None:
            cid = str(item.get("id"))
            for s in OUTPUT_SUFFIXES.values():  # they did not exist before this run (checked above)
                p = out / f"{cid}{s}"
                if p.is_file():
                    p.unlink()
            msg = f"{type(err).__name__}: {err}"
            records.append(
                {
                    "id": cid,
                    "status": "failed",
                    "inputs": {k: item.get(k) for k in PAIR_KEYS if item.get(k)},
                    "error": msg,
                }
            )
            logger.error("pair %s failed: %s", cid, msg)
            save_index()
            if self.fail_fast or len(pairs) == 1:
                raise err

        bar = None
        if self.progress and len(pairs) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc="inference", unit="pair")
        t0 = time.perf_counter()
        try:
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[slice(start, start + self.batch_size)]
                preps = []
                for item in chunk:
                    try:
                        preps.append(self.prepare(item))
                    except Exception as e:  # noqa: BLE001 - recorded per pair
                        fail(item, e)
                        if bar is not None:
                            bar.update(1)
                if not preps:
                    continue
                try:
                    outs = self.forward(preps)
                except Exception as e:  # noqa: BLE001
                    for p in preps:
                        fail(p["item"], e)
                    continue
                for prep, o in zip(preps, outs):
                    item = prep["item"]
                    try:
                        result = self.finish(prep, o)
                        files = write_outputs(result, out, overlay=self.overlay)
                    except Exception as e:  # noqa: BLE001
                        fail(item, e)
                    else:
                        records.append(
                            {
                                "id": result["id"],
                                "status": "done",
                                "inputs": {k: item.get(k) for k in PAIR_KEYS if item.get(k)},
                                "outputs": files,
                                "input_size": result["input_size"],
                                "network_size": result["network_size"],
                                "resized": result["resized"],
                                "reoriented": result["reoriented"],
                                "qc_score": result["qc_score"],
                                "sigma_scale": self.sigma_scale if self.uncertainty else None,
                            }
                        )
                        save_index()
                        logger.debug("registered %s -> %s", result["id"], out)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            prune_marker(out)
        failed = [r for r in records if r["status"] == "failed"]
        logger.info(
            "inference: %d pair(s) done, %d failed in %.1f s -> %s",
            len(records) - len(failed),
            len(failed),
            time.perf_counter() - t0,
            index_path,
        )
        if failed:
            first = failed[0]
            raise InferenceFailures(
                f"{len(failed)} of {len(pairs)} pairs failed ({', '.join(r['id'] for r in failed[:10])}); the other "
                f"pairs' results are written; errors per pair in {index_path}. First: {first['id']}: {first['error']}",
                records,
            )
        return records
