"""The registration evaluator: the displacement network (and the variance network, if any) on each validation or
test pair, with the label protocol that makes ``warped_label`` (docs/evaluation.md).

- :class:`RegistrationEvaluator`: a ``monai.engines.Evaluator`` whose output follows docs/CONTRACTS.md;
- :func:`label_pair`: the (warped, fixed) masks of one structure for MONAI's Dice / Hausdorff handlers;
- :data:`LABEL_PROTOCOLS`: ``"nearest"`` (default) or ``"authors"``.

The forward pass and the batch handling are the trainer's (:func:`scripts.trainer.registration_forward`,
:func:`scripts.trainer.prepare_registration_batch`), so training and evaluation see the same pair the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp
from monai.utils import ForwardMode

from scripts.data import FAILED_KEY
from scripts.metrics.calibration import sigma_scale_value
from scripts.trainer import detach_output, passthrough, prepare_registration_batch, registration_forward
from scripts.utils import as_flag

__all__ = ["LABEL_PROTOCOLS", "RegistrationEvaluator", "label_pair"]

LABEL_PROTOCOLS = ("nearest", "authors")


class RegistrationEvaluator(Evaluator):
    """Evaluator for a registration pair: runs the displacement network (and the variance network if given).

    ``engine.state.output`` follows docs/CONTRACTS.md: ``moving, fixed, warped, ddf, log_var, weight``, the batch's
    :data:`~scripts.trainer.BATCH_KEYS` (the ground-truth DDF as ``ddf_gt``), ``warped_label`` when the batch has
    labels, and ``field_mean`` / ``log_sigma_z`` for networks with displacement uncertainty.

    Args:
        weight_fn: optional ``(fixed, log_var) -> weight map`` (e.g. ``SNRWeightedMSELoss.weight_map``).
        label_protocol: how ``warped_label`` is made from the moving label (docs/evaluation.md):
            ``"nearest"`` (default): the whole label map warped with nearest interpolation (border padding);
            ``"authors"``: as the authors' test.py, the mask ``moving_label == label`` warped bilinearly with zero
            padding and every pixel > 0 counted as ``label`` (``warped_label`` then holds ``label`` and 0 only).
        label: the structure of the ``"authors"`` protocol (2 = myocardium).
        sigma_scale: σ scale s fitted on validation (``python -m bundle calibrate``; a number, the path of its
            ``variance_scale.json`` or None): the variance network's log σ̂² gets + 2 log s, once, here, so that every
            metric, figure and weight map sees σ̂² s² (docs/uncertainty.md).
        inverse_consistency: also register fixed → moving and put that DDF in the output as ``ddf_backward`` (one
            more forward pass; the quality-score candidate ``ic``, docs/uncertainty.md).
        prepare_batch: as in :class:`~scripts.trainer.CollaborativeTrainer`.
        check_finite: a pair whose DDF or log σ̂² holds NaN / inf is not evaluated: it becomes a failed pair
            (``failed_items``, its reason naming the output, the count and, for precomputed DDFs, the file), so that
            the results writer records it as ``status: failed`` instead of numbers (configs/evaluate.yaml: on).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        variance_network: torch.nn.Module | None = None,
        warp: Callable | None = None,
        weight_fn: Callable | None = None,
        label_protocol: str = "nearest",
        label: int = 2,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_registration_batch,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        sigma_scale: float | str | None = None,
        inverse_consistency: bool = False,
        check_finite: bool = False,
    ) -> None:
        if label_protocol not in LABEL_PROTOCOLS:
            raise ValueError(f"label_protocol must be one of {LABEL_PROTOCOLS}, got {label_protocol!r}.")
        amp = as_flag(amp)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=amp,
            mode=ForwardMode.EVAL,
            decollate=False,
        )
        self.network = network
        self.variance_network = variance_network
        self.warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        self.label_protocol = label_protocol
        self.label = int(label)
        if label_protocol == "nearest":
            self.label_warp = Warp(mode="nearest", padding_mode="border")
        else:
            self.label_warp = Warp(mode="bilinear", padding_mode="zeros")
        self.weight_fn = weight_fn
        self.sigma_scale = sigma_scale_value(sigma_scale)
        self.inverse_consistency = as_flag(inverse_consistency)
        self.check_finite = as_flag(check_finite)
        self.amp_device = torch.device(device).type

    def warp_label(self, moving_label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """The moving label warped by ``ddf`` with the evaluator's ``label_protocol``."""
        if self.label_protocol == "nearest":
            return self.label_warp(moving_label, ddf)
        mask = (moving_label.round() == self.label).float()
        return (self.label_warp(mask, ddf) > 0).float() * self.label

    def _iteration(self, engine: RegistrationEvaluator, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        # pairs that failed to load (scripts.data.TolerantDataset): reported by the results writer, not computed
        failed = list(batchdata.get(FAILED_KEY) or []) if isinstance(batchdata, Mapping) else []
        if failed and "moving" not in batchdata:
            return {FAILED_KEY: failed}
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        moving, fixed = batch["moving"], batch["fixed"]
        engine.network.eval()
        if engine.variance_network is not None:
            engine.variance_network.eval()
        with torch.no_grad(), torch.autocast(device_type=engine.amp_device, enabled=engine.amp):
            fwd = registration_forward(engine.network, engine.warp, moving, fixed, engine.variance_network)
            if engine.inverse_consistency:
                fwd["ddf_backward"] = registration_forward(engine.network, engine.warp, fixed, moving)["ddf"]
        out = {k: v for k, v in fwd.items() if k != "field"}
        if out.get("log_var") is not None and engine.sigma_scale is not None:
            out["log_var"] = out["log_var"] + 2.0 * math.log(engine.sigma_scale)
        out["weight"] = None
        if fwd["log_var"] is not None and engine.weight_fn is not None:
            out["weight"] = engine.weight_fn(fixed, out["log_var"].float())
        if "moving_label" in batch:
            out["warped_label"] = engine.warp_label(batch["moving_label"], fwd["ddf"].float())
        out.update(passthrough(batch))
        out["meta"] = {"id": batchdata.get("id"), "spacing": batchdata.get("spacing")}
        if self.check_finite:
            bad = non_finite_pairs(out, getattr(engine.network, "files", None))
            if bad:
                failed += [(case, why) for _, case, why in bad]
                keep = [b for b in range(out["ddf"].shape[0]) if b not in {i for i, _, _ in bad}]
                if not keep:
                    return {FAILED_KEY: failed}
                out = _select(out, keep, out["ddf"].shape[0])
                for k, v in list(batchdata.items()):  # the batch the handlers read (ids, spacing) follows
                    if k != FAILED_KEY:
                        batchdata[k] = _select(v, keep, len(keep) + len(bad))
        if failed:
            out[FAILED_KEY] = failed
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return detach_output(out)


def _ids_of(out: Mapping, n: int) -> list[str]:
    ids = (out.get("meta") or {}).get("id")
    if isinstance(ids, str):
        ids = [ids]
    ids = list(ids) if isinstance(ids, (list, tuple)) else []
    return [str(ids[b]) if b < len(ids) else f"pair {b}" for b in range(n)]


def non_finite_pairs(out: Mapping, files: Mapping | None = None) -> list[tuple[int, str, str]]:
    """``(batch index, id, reason)`` of the pairs whose ``ddf`` or ``log_var`` holds NaN or inf."""
    ddf = out.get("ddf")
    if not isinstance(ddf, torch.Tensor):
        return []
    n = ddf.shape[0]
    ids = _ids_of(out, n)
    bad = []
    for b in range(n):
        reasons = []
        for key, what in (("ddf", "DDF"), ("log_var", "log sigma^2 (variance network)")):
            v = out.get(key)
            if isinstance(v, torch.Tensor) and v.shape[0] == n:
                finite = torch.isfinite(v[b])
                if not bool(finite.all()):
                    reasons.append(f"{int((~finite).sum())} of {finite.numel()} values of the {what} are NaN or inf")
        if reasons:
            src = (files or {}).get(ids[b])
            where = f" ({src})" if src else ""
            bad.append((b, ids[b], f"NonFiniteOutput: {'; '.join(reasons)}{where}: not evaluated"))
    return bad


def _select(v, keep: list[int], n: int):
    """``v`` restricted to the pairs ``keep`` of a batch of ``n`` (tensors, lists and mappings with that length)."""
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n:
        return v[keep]
    if isinstance(v, (list, tuple)) and len(v) == n:
        return type(v)(v[i] for i in keep) if isinstance(v, list) else tuple(v[i] for i in keep)
    if isinstance(v, Mapping):
        return {k: _select(x, keep, n) for k, x in v.items()}
    return v


def label_pair(output: Mapping, label: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(warped label == label, fixed label == label)`` as float masks, for MONAI Dice/HD handlers."""
    if output.get("warped_label") is None or output.get("fixed_label") is None:
        raise KeyError("the data has no moving_label/fixed_label: label metrics need them.")
    return (output["warped_label"].round() == label).float(), (output["fixed_label"].round() == label).float()
