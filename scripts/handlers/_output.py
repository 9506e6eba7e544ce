"""Reading the engine output of docs/CONTRACTS.md (``engine.state.output``) and the batch: the entries, the
ground-truth DDF, the case ids and the per-case voxel spacing; shared by the metric handlers and the writer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

GT_DDF_KEYS = ("ddf_gt", "ddf")  # where the ground-truth DDF is looked for in the batch (evaluate.yaml: ddf_gt)
FILENAME_KEY = "filename_or_obj"  # the name MetricsSaver reads from each item of its batch_transform


def _get(output: Any, key: str) -> Any:
    """``output[key]`` for the batched dict of the contract, or stacked from a list of per-item dicts."""
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        vals = [o.get(key) for o in output]
        if any(v is None for v in vals):
            return None
        if isinstance(vals[0], torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in vals])
        return vals
    return None


def _plain(x: Any) -> Any:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def squared_residual(output: Any) -> torch.Tensor:
    """``(I_f - I_hat_f)^2`` from an engine output."""
    return (_plain(_get(output, "fixed")).float() - _plain(_get(output, "warped")).float()) ** 2


def _gt_ddf(output: Any, batch: Any, pred: torch.Tensor | None) -> torch.Tensor | None:
    """The ground-truth DDF: ``output['ddf_gt']``, else ``batch['ddf_gt']``, else ``batch['ddf']`` when it is not
    the prediction itself."""
    gt, source = _get(output, "ddf_gt"), "ddf_gt"
    if gt is None and isinstance(batch, Mapping):
        for k in GT_DDF_KEYS:
            if batch.get(k) is not None:
                gt, source = batch[k], k
                break
    if gt is None:
        return None
    gt = _plain(gt)
    if pred is not None:
        gt = gt.to(pred.device)
        same = gt is pred or (gt.shape == pred.shape and torch.equal(gt.float(), pred.float()))
        if source == "ddf" and same:
            warnings.warn(
                "the engine output's 'ddf' equals the batch's ground-truth 'ddf': the prediction was overwritten "
                "by the batch (rename the ground truth to 'ddf_gt', as configs/evaluate.yaml does); EPE skipped."
            )
            return None
    return gt


def _ids(output: Any, batch: Any, n: int, start: int) -> list[str]:
    ids = None
    meta = _get(output, "meta")
    if isinstance(meta, Mapping):
        ids = meta.get("id")
    if ids is None and isinstance(batch, Mapping):
        ids = batch.get("id")
    if ids is None:
        return [f"case{start + i:04d}" for i in range(n)]
    ids = [ids] if isinstance(ids, str) else list(ids)
    return [str(i) for i in ids]


def _per_case(x: Any, n: int, nd: int) -> np.ndarray | None:
    """A collated per-case vector (list of (B,) tensors, (B, nd) tensor/array, or one (nd,) vector) -> (n, nd)."""
    if x is None:
        return None
    try:
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor) and x[0].ndim == 1 and len(x) == nd:
            a = torch.stack([t.double().cpu() for t in x], dim=1).numpy()
        else:
            a = np.asarray(torch.as_tensor(x).double().cpu().numpy() if isinstance(x, torch.Tensor) else x, float)
    except (TypeError, ValueError):
        return None
    if a.size == n * nd:
        return a.reshape(n, nd)
    if a.size == nd:
        return np.broadcast_to(a.reshape(1, nd), (n, nd))
    return None


def _spacings(output: Any, batch: Any, n: int, spatial: Sequence[int]) -> list[list[float] | None]:
    """Per-case voxel spacing (mm) on the network grid: the datalist's ``spacing`` scaled by the resize factor
    (original ``spatial_shape`` of the image meta data / network size), else the pixdim of the (resized) image's
    affine, else None (mm metrics are then not reported)."""
    nd = len(spatial)
    meta = _get(output, "meta")
    sp = meta.get("spacing") if isinstance(meta, Mapping) else None
    if sp is None and isinstance(batch, Mapping):
        sp = batch.get("spacing")
    fixed = batch.get("fixed") if isinstance(batch, Mapping) else None
    fmeta = getattr(fixed, "meta", None) or {}
    arr = _per_case(sp, n, nd)
    if arr is not None:
        orig = _per_case(fmeta.get("spatial_shape"), n, nd)
        if orig is not None:
            arr = arr * orig / np.asarray(spatial, dtype=np.float64)
        return [[float(v) for v in arr[b]] for b in range(n)]
    pd = _per_case(getattr(fixed, "pixdim", None), n, nd)
    if pd is not None:
        return [[float(v) for v in pd[b]] for b in range(n)]
    return [None] * n


def n_pairs(output: Any) -> int:
    """Number of evaluated pairs in the output (0 for a batch of pairs that all failed to load)."""
    fixed = _get(output, "fixed")
    return 0 if fixed is None else int(fixed.shape[0])


def case_spacings(output: Any, batch: Any, spacing: Sequence[float] | None = None) -> list[list[float] | None]:
    """``spacing`` for every pair when given (evaluate.yaml's ``eval_spacing``), else :func:`_spacings`."""
    n = n_pairs(output)
    if spacing is not None:
        return [[float(s) for s in spacing]] * n
    return _spacings(output, batch, n, tuple(_get(output, "fixed").shape[2:]))


def pair_names(batch: Any) -> list[dict[str, str]]:
    """``batch_transform`` of ``monai.handlers.MetricsSaver``: one ``{"filename_or_obj": id}`` per evaluated pair
    of the batch (pairs that failed to load have no metric values, so no name either)."""
    if not isinstance(batch, Mapping) or "fixed" not in batch:
        return []
    n = int(batch["fixed"].shape[0])
    return [{FILENAME_KEY: i} for i in _ids(None, batch, n, 0)]
