"""``python -m bundle.inference_bench --datalist DIR``: the per-pair marginal cost of inference against the bare
``no_grad`` forward + I/O, and against the bundle's ITK demons (docs/inference.md, "Speed")."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks import Warp

from scripts.inference import RegistrationInferer, make_pairs, save_nifti


def _bare_pair(network, warp, label_warp, item: Mapping, out: Path, device) -> None:
    """The floor of one pair: read the files, one ``no_grad`` forward, warp, write the same NIfTI files."""
    import nibabel as nib

    imgs = {k: nib.load(item[k]) for k in ("moving", "fixed", "moving_label") if item.get(k)}
    arrs = {k: torch.from_numpy(np.asarray(v.dataobj, dtype=np.float32))[None, None] for k, v in imgs.items()}
    with torch.no_grad():
        ddf = network(torch.cat([arrs["moving"], arrs["fixed"]], 1).to(device)).float().cpu()
        warped = warp(arrs["moving"], ddf)
        lab = label_warp(arrs["moving_label"], ddf) if "moving_label" in arrs else None
    aff = imgs["fixed"].affine
    cid = item["id"]
    save_nifti(np.moveaxis(ddf[0].numpy(), 0, -1), aff, out / f"{cid}_ddf.nii.gz")
    save_nifti(warped[0, 0].numpy(), aff, out / f"{cid}_warped.nii.gz")
    if lab is not None:
        save_nifti(np.rint(lab[0, 0].numpy()), aff, out / f"{cid}_warped_label.nii.gz", np.uint8)


def benchmark(
    datalist: str,
    ckpt_path: str | None = None,
    split: str = "test",
    n_pairs: int = 20,
    repeats: int = 5,
    batch_sizes: Sequence[int] = (1, 4),
    demons_pairs: int = 4,
    threads: int = 1,
    config_file: str | None = None,
    work_dir: str | None = None,
) -> dict:
    """Per-pair marginal cost of ``RegistrationInferer.run`` against the bare forward + I/O, interleaved.

    Each repeat runs the cases in turn (bare, bundle b=1, bundle b=4, ...: A B C A B C ...) on the same ``n_pairs``
    pairs (moving, fixed, moving label), each into a fresh folder, in this process (imports and network construction
    excluded: the marginal cost). Reports the median seconds per pair of each case and the ratios to the bare case;
    then the bundle's ITK demons (``scripts.classical``, ``num_threads=threads``) on ``demons_pairs`` pairs.
    """
    import shutil
    import tempfile

    from monai.bundle import ConfigParser

    torch.set_num_threads(int(threads))
    root = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config(config_file or str(root / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    if ckpt_path:
        parser["ckpt_path"] = ckpt_path
    network = parser.get_parsed_content("network")
    for loader in parser.get_parsed_content("checkpoint_loaders"):  # WeightsLoader (CheckpointLoader) handlers
        if loader.network is network:
            loader.load()
    spatial_size = parser.get_parsed_content("spatial_size")
    pairs = make_pairs(datalist=datalist, split=split)[: int(n_pairs)]
    pairs = [{k: p[k] for k in ("moving", "fixed", "moving_label", "id") if p.get(k)} for p in pairs]
    tmp = Path(work_dir or tempfile.mkdtemp(prefix="inference_bench_"))
    warp, label_warp = Warp("bilinear", "border"), Warp("nearest", "border")
    inferers = {b: RegistrationInferer(network, spatial_size, batch_size=b, progress=False) for b in batch_sizes}
    cases = ["bare"] + [f"bundle_b{b}" for b in batch_sizes]
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(int(repeats) + 1):  # repeat 0 warms up (allocator, lazy imports) and is not counted
        for c in cases:
            out = tmp / f"{c}_{r}"
            out.mkdir(parents=True)
            t, tc = time.perf_counter(), time.process_time()
            if c == "bare":
                for item in pairs:
                    _bare_pair(network, warp, label_warp, item, out, "cpu")
            else:
                inferers[int(c.split("_b")[1])].run(pairs, out)
            if r:
                wall[c].append((time.perf_counter() - t) / len(pairs))
                cpu[c].append((time.process_time() - tc) / len(pairs))
            shutil.rmtree(out)
    med = {c: float(np.median(v)) for c, v in wall.items()}
    med_cpu = {c: float(np.median(v)) for c, v in cpu.items()}
    report = {
        "pairs": len(pairs),
        "repeats": int(repeats),
        "threads": int(threads),
        "seconds_per_pair": med,
        "cpu_seconds_per_pair": med_cpu,
        "wall": wall,
        "cpu": cpu,
        "ratio_to_bare": {c: med[c] / med["bare"] for c in cases if c != "bare"},
        "cpu_ratio_to_bare": {c: med_cpu[c] / med_cpu["bare"] for c in cases if c != "bare"},
    }
    if demons_pairs:
        import nibabel as nib

        from scripts.classical import register_pair

        secs, csecs = [], []
        for n, item in enumerate([pairs[0]] + pairs[: int(demons_pairs)]):  # the first call loads ITK: not counted
            m, f = (np.asarray(nib.load(item[k]).dataobj, dtype=np.float32) for k in ("moving", "fixed"))
            spacing = nib.load(item["fixed"]).header.get_zooms()[: m.ndim]
            t, tc = time.perf_counter(), time.process_time()
            register_pair(m, f, "demons", spacing=spacing, num_threads=int(threads))
            if n:
                secs.append(time.perf_counter() - t)
                csecs.append(time.process_time() - tc)
        report["demons_seconds_per_pair"] = float(np.median(secs))
        report["demons_cpu_seconds_per_pair"] = float(np.median(csecs))
        report["demons_over_bundle"] = report["demons_seconds_per_pair"] / min(med[c] for c in cases if c != "bare")
        report["demons_cpu_over_bundle"] = report["demons_cpu_seconds_per_pair"] / min(
            med_cpu[c] for c in cases if c != "bare"
        )
    if not work_dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bundle.inference_bench --datalist DIR [--n_pairs 20 --repeats 5 --batch_sizes 1,4 ...]``."""
    import argparse

    b = ap = argparse.ArgumentParser(prog="python -m bundle.inference_bench", description=main.__doc__)
    b.add_argument("--datalist", required=True)
    b.add_argument("--split", default="test")
    b.add_argument("--ckpt_path", default=None)
    b.add_argument("--n_pairs", type=int, default=20)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--batch_sizes", default="1,4")
    b.add_argument("--demons_pairs", type=int, default=4)
    b.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rep = benchmark(
        a.datalist,
        a.ckpt_path,
        a.split,
        a.n_pairs,
        a.repeats,
        [int(x) for x in a.batch_sizes.split(",") if x],
        a.demons_pairs,
        a.threads,
    )
    print(f"{rep['pairs']} pairs, {rep['repeats']} interleaved repeats, {rep['threads']} thread(s); medians per pair:")
    for c, s in rep["seconds_per_pair"].items():
        cs = rep["cpu_seconds_per_pair"][c]
        ratio = (
            f"   x{rep['ratio_to_bare'][c]:.2f} wall, x{rep['cpu_ratio_to_bare'][c]:.2f} CPU of bare"
            if c != "bare"
            else ""
        )
        print(f"  {c:12s} {s * 1e3:8.1f} ms wall {cs * 1e3:8.1f} ms CPU{ratio}")
    if "demons_seconds_per_pair" in rep:
        print(
            f"  ITK demons   {rep['demons_seconds_per_pair'] * 1e3:8.1f} ms wall "
            f"{rep['demons_cpu_seconds_per_pair'] * 1e3:8.1f} ms CPU   = x{rep['demons_over_bundle']:.1f} wall, "
            f"x{rep['demons_cpu_over_bundle']:.1f} CPU of the best bundle case"
        )


if __name__ == "__main__":
    main()
