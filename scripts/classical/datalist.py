"""Register every pair of a datalist split with a classical method and write what the evaluation reads.

``DIR/<id>_ddf.nii.gz`` per pair (channel-last, voxels, array-axis order: docs/CONTRACTS.md) is what
``python -m monai.bundle run evaluating ... --ddf_dir DIR`` consumes (``scripts.handlers.PrecomputedDDF``), so the
classical methods get Dice, HD95, EPE and folding from the same evaluation as the network.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.classical import check_params, prepare, register_pair_timed, tool_version, warp

logger = logging.getLogger(__name__)

TIMING_CSV = "timing.csv"
TIMING_FIELDS = ("id", "method", "wall_s", "cpu_s", "num_threads")


def _affine_4x4(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    out = np.eye(4)
    n = a.shape[0] - 1  # (n+1, n+1) homogeneous affine of n spatial dims
    out[:n, :n], out[:n, 3] = a[:n, :n], a[:n, n]
    return out


def _save(path: Path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))


def _read_timing(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _write_timing(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TIMING_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_subset_datalist(datalist_path, split: str, items: list[dict], path: Path) -> None:
    """A datalist whose ``split`` holds only ``items`` (absolute paths), the other splits as they were: the
    evaluation of a partial run then uses ``--datalist`` on it, so that every evaluated case has a DDF."""
    from scripts.data import datalist_path as resolve

    with open(resolve(datalist_path), encoding="utf-8") as f:
        content = json.load(f)
    root = Path(resolve(datalist_path)).parent.resolve()
    for name, value in list(content.items()):
        if isinstance(value, list) and value and isinstance(value[0], dict) and name != split:
            content[name] = [{k: _absolute(root, v) for k, v in it.items()} for it in value]
    content[split] = [{k: _absolute(Path.cwd(), v) for k, v in it.items()} for it in items]
    path.write_text(json.dumps(content, indent=1, default=str))


def _absolute(root: Path, value):
    if isinstance(value, str) and not os.path.isabs(value) and (root / value).exists():
        return str((root / value).resolve())
    return value


def register_datalist(
    datalist_path: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike = "classical",
    method: str = "bspline",
    spatial_size: Sequence[int] | None = None,
    intensity: str = "none",
    save_warped: bool = True,
    progress: bool = True,
    limit: int | None = None,
    resume: bool = False,
    **params,
) -> list[dict]:
    """Register every pair of a datalist split and write the results like a network's predictions.

    Each pair is loaded with :func:`scripts.data.paired_transforms` (same ``spatial_size`` / ``intensity`` as the
    network so that DDFs live on the same grid). Per case ``<id>`` the folder gets ``<id>_ddf.nii.gz`` (channel-last
    (*spatial, ndim), voxels, array-axis order: docs/CONTRACTS.md), with ``save_warped`` also ``<id>_warped.nii.gz``
    and, where the item has a moving label, ``<id>_warped_label.nii.gz`` (nearest-neighbour warp), all with the
    fixed image's affine; then ``timing.csv`` (id, method, wall_s, cpu_s, num_threads per pair) and
    ``classical_<method>.json`` (method, tool version, parameters, machine, per-case and median times).

    The spacing given to the tool is the item's ``spacing`` if present, else the voxel size of the (resized) fixed
    image. ``progress`` shows a tqdm bar over the pairs (with the seconds of the last one). ``limit``: only the first
    ``limit`` pairs, and ``datalist.json`` in ``out_dir`` lists them (evaluate with ``--datalist`` on it).
    ``resume``: pairs whose DDF and timing row exist are kept. The tool's one-off loading happens before the first
    pair and is not timed. ``params``: overrides of ``scripts.classical.DEFAULTS[method]``.

    Returns:
        ``[{"id", "seconds", "cpu_seconds", "ddf", ...}, ...]`` in datalist order.
    """
    from tqdm.auto import tqdm

    from scripts.data import load_datalist, paired_transforms

    p = check_params(method, params)
    items = load_datalist(datalist_path, split)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be >= 1, got {limit}.")
        items = items[: int(limit)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        write_subset_datalist(datalist_path, split, items, out / "datalist.json")
    keys = ("moving", "fixed", "moving_label", "fixed_label")
    xform = paired_transforms(spatial_size=spatial_size, keys=keys, intensity=intensity)
    done = _read_timing(out / TIMING_CSV) if resume else {}
    rows, results, prepared = [], [], False
    bar = tqdm(items, desc=f"classical {method}", unit="pair", disable=not progress)
    for item in bar:
        case = str(item["id"])
        rec = {"id": case, "ddf": str(out / f"{case}_ddf.nii.gz")}
        if case in done and Path(rec["ddf"]).is_file():
            row = done[case]
            rows.append(row)
            results.append({**rec, "seconds": float(row["wall_s"]), "cpu_seconds": float(row["cpu_s"])})
            continue
        d = xform({k: item[k] for k in keys if item.get(k) is not None})
        fixed_t, moving_t = d["fixed"], d["moving"]
        ndim = fixed_t.ndim - 1
        if not prepared:
            prepare(method, ndim)  # the tool's imports / ITK templates: not part of any pair's time
            prepared = True
        affine = _affine_4x4(fixed_t.affine.cpu().numpy()) if hasattr(fixed_t, "affine") else np.eye(4)
        if item.get("spacing") is not None and spatial_size is None:
            spacing = [float(s) for s in item["spacing"]][:ndim]
        else:
            spacing = [float(s) for s in np.linalg.norm(affine[:ndim, :ndim], axis=0)]
        moving = moving_t[0].cpu().numpy()
        ddf, timing = register_pair_timed(moving, fixed_t[0].cpu().numpy(), method=method, spacing=spacing, **p)
        rec.update(seconds=float(timing["wall_s"]), cpu_seconds=float(timing["cpu_s"]))
        _save(out / f"{case}_ddf.nii.gz", np.moveaxis(ddf, 0, -1), affine)
        if save_warped:
            rec["warped"] = str(out / f"{case}_warped.nii.gz")
            _save(out / f"{case}_warped.nii.gz", warp(moving, ddf), affine)
            if "moving_label" in d:
                rec["warped_label"] = str(out / f"{case}_warped_label.nii.gz")
                lab = warp(d["moving_label"][0].cpu().numpy(), ddf, mode="nearest")
                _save(out / f"{case}_warped_label.nii.gz", np.rint(lab), affine, dtype=np.uint8)
        rows.append(
            {
                "id": case,
                "method": method,
                "wall_s": f"{timing['wall_s']:.4f}",
                "cpu_s": f"{timing['cpu_s']:.4f}",
                "num_threads": p.get("num_threads") or "default",
            }
        )
        _write_timing(out / TIMING_CSV, rows)
        bar.set_postfix(case=case, wall=f"{timing['wall_s']:.2f}s", cpu=f"{timing['cpu_s']:.2f}s")
        results.append(rec)
    _write_timing(out / TIMING_CSV, rows)
    walls, cpus = [r["seconds"] for r in results], [r["cpu_seconds"] for r in results]
    summary = {
        "method": method,
        "tool_version": tool_version(method) or _itk_version(),
        "parameters": p,
        "datalist": str(datalist_path),
        "split": split,
        "n_pairs": len(results),
        "spatial_size": list(spatial_size) if spatial_size else None,
        "median_seconds": float(np.median(walls)),
        "mean_seconds": float(np.mean(walls)),
        "median_cpu_seconds": float(np.median(cpus)),
        "machine": {"cpus": os.cpu_count(), "load_average": _load(), "machine": platform.machine()},
        "cases": results,
    }
    with open(out / f"classical_{method}.json", "w") as f:
        json.dump(summary, f, indent=2, default=list)
    return results


def _itk_version() -> str | None:
    import importlib.metadata

    try:
        return "itk " + importlib.metadata.version("itk")
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
