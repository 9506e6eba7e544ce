"""``python -m bundle sigma_target``: σ̂ against its targets, the residual at the true and at the estimated z.

    python -m bundle sigma_target --weights models/mri2d --datalist data/phantom_mri2d_v2 --n 50 [--md FILE]

The phantom's ``residual_std`` is the root-mean-square of r = I_f − I_m∘z over noise draws of both frames at the
**true** displacement z (:func:`scripts.data.phantom.residual_moments`). The variance network is trained on the
residual at the **estimated** displacement ẑ, so what a perfect σ̂² converges to is

.. math::
    s^2(\\hat z) = \\mathbb{E}_{\\text{noise}}\\big[(I_f - I_m \\circ \\hat z)^2 \\mid \\hat z\\big]
    = \\mathrm{Var}[r \\mid \\hat z] + \\mathbb{E}[r \\mid \\hat z]^2 ,

the same moments with ẑ in place of z: misregistration enters as the mean E[r | ẑ]. Where registration is good the two
targets agree; where the residual is dominated by misregistration (sharp, high-SNR MRI edges) they do not, and
Spearman(σ̂, residual_std) is bounded by Spearman(s(ẑ), residual_std) whatever the estimator.

Each pair of the split is **regenerated** from the datalist's phantom record (kind, seed, size, version; pair ``i`` of
a split depends only on those and ``i``), which gives the frames' noise parameters that the files do not hold; the
regenerated moving and fixed images are checked against the files (max |Δ| ≤ 1e-6, else an error names the pair).
The networks and the warp are those of the training config (``configs/train.yaml`` plus ``--variants``) with
``WEIGHTS/model.pt`` and ``WEIGHTS/variance.pt``. Reported per pair, over all pixels (region ``all``) and over the
field of view (``fov``: residual_std > 0; outside an echo sector both frames are 0 by construction and those pixels
rank trivially), then mean ± std over the pairs:

- ``spearman_true`` = Spearman(σ̂, residual_std) (the evaluation's ``spearman_residual_std``);
- ``spearman_estimated`` = Spearman(σ̂, s(ẑ));
- ``bound`` = Spearman(s(ẑ), residual_std): what a perfect estimator of the residual it is trained on scores
  against residual_std;
- ``ratio_true`` = mean σ̂² / mean residual_std², ``ratio_estimated`` = mean σ̂² / mean s(ẑ)²;
- ``mean_share`` = mean E[r | ẑ]² / mean s(ẑ)²: the share of the expected squared residual that is its mean (the
  misregistration, plus the frame-specific artefacts that are there at the true z too);
- ``mean_share_true_z`` = mean E[r | z]² / mean residual_std²: the same at the true z (no misregistration);
- ``spearman_fed_true_z``, ``ratio_fed_true_z``: Spearman and level ratio against residual_std of the variance network
  fed the pair warped with the **true** z (h_φ(I_m∘z, I_f)): the estimator itself, misregistration removed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from bundle.instance_bench import _as_list, _fmt, _loss_parts, _parts

logger = logging.getLogger(__name__)

KEYS = (
    "spearman_true",
    "spearman_estimated",
    "bound",
    "ratio_true",
    "ratio_estimated",
    "mean_share",
    "mean_share_true_z",
    "spearman_fed_true_z",
    "ratio_fed_true_z",
)


def pair_targets(pair: dict, ddf_hat: np.ndarray) -> dict:
    """``residual_std`` (true z) and the moments at ``ddf_hat`` (channel-last, voxels, ``Warp`` convention) of a pair
    from :func:`scripts.data.phantom.make_pair`: ``{"true": rms at z, "true_mean": E[r | z], "estimated": rms at ẑ,
    "mean": E[r | ẑ]}``."""
    from scripts.data.phantom import residual_moments

    mean, rms = residual_moments(
        pair["fixed_clean"], pair["fixed_params"], pair["moving_clean"], pair["moving_params"], ddf_hat
    )
    return {
        "true": np.asarray(pair["residual_std"], np.float64),
        "true_mean": np.asarray(pair["residual_mean"], np.float64),
        "estimated": rms.astype(np.float64),
        "mean": mean,
    }


def against(sigma2: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """``(Spearman(σ̂, target), mean σ̂² / mean target²)`` over the pixels of ``mask`` (all when ``None``), with the
    evaluation's Spearman (:func:`scripts.metrics.uncertainty._spearmanr`)."""
    from scripts.metrics.uncertainty import _spearmanr

    keep = slice(None) if mask is None else np.asarray(mask, bool).ravel()
    s, t = np.sqrt(sigma2).ravel()[keep], np.asarray(target, np.float64).ravel()[keep]
    return _spearmanr(s, t), float((s**2).mean() / (t**2).mean())


def pair_row(sigma2: np.ndarray, targets: dict, mask: np.ndarray | None = None) -> dict:
    """The first seven :data:`KEYS` of one pair from σ̂² and :func:`pair_targets`, over the pixels of ``mask`` (all
    pixels when ``None``)."""
    spearman_true, ratio_true = against(sigma2, targets["true"], mask)
    spearman_estimated, ratio_estimated = against(sigma2, targets["estimated"], mask)
    bound, _ = against(targets["estimated"] ** 2, targets["true"], mask)
    mean2 = np.asarray(targets["mean"], np.float64) ** 2
    keep = slice(None) if mask is None else np.asarray(mask, bool).ravel()
    return {
        "spearman_true": spearman_true,
        "spearman_estimated": spearman_estimated,
        "bound": bound,
        "ratio_true": ratio_true,
        "ratio_estimated": ratio_estimated,
        "mean_share": float(mean2.ravel()[keep].mean() / (targets["estimated"].ravel()[keep] ** 2).mean()),
        "mean_share_true_z": float(
            (np.asarray(targets["true_mean"], np.float64) ** 2).ravel()[keep].mean()
            / (targets["true"].ravel()[keep] ** 2).mean()
        ),
    }


# the pixels each figure is computed over: all, or the field of view (residual_std > 0: outside an echo sector both
# frames are 0 by construction, and those pixels rank trivially)
REGIONS = {"all": lambda targets: None, "fov": lambda targets: targets["true"] > 0}


def _index(case_id: str, position: int) -> int:
    tail = str(case_id).rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else position


def sigma_target(**kwargs) -> None:
    """Command line: ``python -m bundle sigma_target --weights models/mri2d --datalist data/phantom_mri2d_v2 --n 50
    [--md FILE]``; see :func:`measure` for the arguments."""
    measure(**kwargs)


def measure(
    weights: str = "models",
    datalist: str = "data/phantom_echo2d_v2",
    split: str = "test",
    n: int = 50,
    configs=("configs/train.yaml",),
    variants=(),
    threads: int | None = 1,
    md: str | None = None,
    plot: str | None = None,
    plot_pairs: int = 3,
    progress: bool = True,
    instance_steps: int = 0,
    instance_lr: float = 1e-4,
) -> dict:
    """σ̂ of ``weights`` against residual_std and against the residual moments at the network's own ẑ (module doc).

    Args:
        weights: folder with ``model.pt`` and ``variance.pt``, e.g. ``models/mri2d``.
        datalist: a **phantom** data set folder (or its datalist JSON) of version ≥ 2.
        split, n: the first ``n`` pairs of ``split`` (0: all).
        configs, variants: the training config(s) of the networks (e.g. ``--variants
            configs/variants/data/phantom_mri.yaml``: the data variant does not change the networks in 2D).
        threads: torch CPU threads. md: also write the Markdown table there.
        plot: write a PNG of the maps of the first ``plot_pairs`` pairs (one row each: I_f, residual_std, s(ẑ),
            σ̂, σ̂ fed I_m∘z, on one colour scale per row) there.
        instance_steps, instance_lr: ẑ after that many steps of test-time instance optimisation
            (:func:`scripts.instance_optimisation.optimise_pair`, as ``inference.yaml``'s options of the same names),
            so that σ̂ and its targets are those of the registration the inference writes with them; 0: the network's ẑ.

    Returns ``{"rows": per-pair and region dicts, "summary": {region: {key: (mean, std)}}}``.
    """
    import json

    from monai.utils import str2bool

    from scripts.checkpoint import load_weights
    from scripts.data import load_datalist
    from scripts.data.phantom import make_pair, pair_rng

    if threads:
        torch.set_num_threads(int(threads))
    path = Path(datalist)
    path = path / "datalist.json" if path.is_dir() else path
    record = json.loads(path.read_text()).get("phantom")
    if not record or int(record.get("version", 1)) < 2:
        raise ValueError(f"{path}: sigma_target needs a phantom data set of version >= 2 (its 'phantom' record).")
    items = load_datalist(str(path), split)
    items = items[: int(n)] if n and int(n) > 0 else items
    parts = _parts(_as_list(configs) + _as_list(variants), torch.device("cpu"))
    wdir = Path(weights)
    network = load_weights(parts["network"], wdir / "model.pt", "network").eval()
    variance = load_weights(parts["variance"], wdir / "variance.pt", "variance").eval()
    warp = parts["warp"]
    steps, lr = int(instance_steps), float(instance_lr)
    rows, panels = [], []
    it = items
    if str2bool(progress) if isinstance(progress, str) else bool(progress):
        from tqdm.auto import tqdm

        it = tqdm(items, desc="sigma_target", unit="pair")
    for pos, item in enumerate(it):
        case = item.get("id", str(pos))
        rng = pair_rng(int(record["seed"]), record["kind"], split, _index(case, pos))
        pair = make_pair(rng, record["kind"], record.get("size"), version=int(record["version"]))
        _check_files(item, pair, case)
        m = torch.from_numpy(np.asarray(pair["moving"], np.float32))[None, None]
        f = torch.from_numpy(np.asarray(pair["fixed"], np.float32))[None, None]
        with torch.no_grad():
            ddf = network(torch.cat([m, f], 1)) if not steps else _optimised(parts, network, variance, m, f, steps, lr)
            warped = warp(m, ddf)
            sigma2 = torch.exp(variance(torch.cat([warped, f], 1)))[0, 0].double().numpy()
            z = torch.from_numpy(np.moveaxis(np.asarray(pair["ddf"], np.float32), -1, 0))[None]
            sigma2_z = torch.exp(variance(torch.cat([warp(m, z), f], 1)))[0, 0].double().numpy()
        ddf_hat = np.moveaxis(ddf[0].double().numpy(), 0, -1)
        targets = pair_targets(pair, ddf_hat)
        if plot and len(panels) < int(plot_pairs):
            maps = [targets["true"], targets["estimated"], np.sqrt(sigma2), np.sqrt(sigma2_z)]
            panels.append((case, np.asarray(pair["fixed"]), maps))
        for region, mask in REGIONS.items():
            keep = mask(targets)
            spearman_z, ratio_z = against(sigma2_z, targets["true"], keep)
            rows.append(
                {
                    "id": case,
                    "region": region,
                    **pair_row(sigma2, targets, keep),
                    "spearman_fed_true_z": spearman_z,
                    "ratio_fed_true_z": ratio_z,
                }
            )
    summary = {
        region: {
            k: (
                float(np.nanmean([r[k] for r in rows if r["region"] == region])),
                float(np.nanstd([r[k] for r in rows if r["region"] == region])),
            )
            for k in KEYS
        }
        for region in REGIONS
    }
    info = dict(weights=str(weights), datalist=str(path), split=split, instance_steps=steps)
    text = _markdown(rows, summary, info)
    print(text)
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(text + "\n")
    if plot and panels:
        _plot(panels, plot)
    return {"rows": rows, "summary": summary}


def _optimised(parts: dict, network, variance, m, f, steps: int, lr: float) -> torch.Tensor:
    """ẑ after ``steps`` Adam steps of instance optimisation on the pair (the networks are left unchanged)."""
    from scripts.instance_optimisation import optimise_pair

    with torch.enable_grad():
        ddf = optimise_pair(network, variance, m, f, steps=steps, lr=lr, **_loss_parts(parts))
    return ddf.detach().float()


def _plot(panels: list, path: str) -> None:
    """One row per pair: I_f, then residual_std, s(ẑ), σ̂ and σ̂ fed I_m∘z on the row's shared scale (2D, or the
    middle slice of the first axis in 3D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["I_f", "residual_std (true z)", "s(ẑ) (estimated ẑ)", "σ̂", "σ̂ fed I_m∘z (true z)"]
    fig, axes = plt.subplots(len(panels), 5, figsize=(15, 3.1 * len(panels)), squeeze=False)
    for row, (case, fixed, maps) in zip(axes, panels):
        mid = (lambda a: a[a.shape[0] // 2]) if fixed.ndim == 3 else (lambda a: a)
        row[0].imshow(mid(fixed), cmap="gray", vmin=0, vmax=1)
        row[0].set_ylabel(case, fontsize=8)
        vmax = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99))
        for ax, m in zip(row[1:], maps):
            im = ax.imshow(mid(m), cmap="magma", vmin=0.0, vmax=vmax)
        fig.colorbar(im, ax=list(row[1:]), fraction=0.02, pad=0.01)
        for ax, t in zip(row, titles):
            ax.set_title(t, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _check_files(item: dict, pair: dict, case: str) -> None:
    import nibabel as nib

    for key in ("moving", "fixed"):
        data = np.asarray(nib.load(item[key]).dataobj, dtype=np.float64)
        gap = float(np.max(np.abs(data - pair[key]))) if data.shape == pair[key].shape else math.inf
        if gap > 1e-6:
            raise ValueError(
                f"{item[key]} ({case}): the regenerated phantom pair differs from the file (max |diff| {gap:.3g}, "
                f"shape {data.shape} vs {pair[key].shape}); the data set is not the phantom its datalist records."
            )


def _markdown(rows: list[dict], summary: dict, info: dict) -> str:
    head = (
        f"σ̂ against its targets on {len(rows) // len(REGIONS)} pairs of `{info['datalist']}` ({info['split']}), "
        f"weights `{info['weights']}` (mean ± std over pairs; region `all`: every pixel, `fov`: residual_std > 0)"
        + (f"; ẑ after {info['instance_steps']} steps of instance optimisation." if info.get("instance_steps") else ".")
    )
    lines = [head, "", "| region | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for region in REGIONS:
        vals = [_fmt([r[k] for r in rows if r["region"] == region]) for k in KEYS]
        lines.append(f"| {region} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
