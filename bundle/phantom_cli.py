"""``python -m bundle phantom OUT_DIR [--kind echo2d|echo3d|mri2d] [--n_train 600] ... [--version 2] [--preview P]``.

Writes the built-in cardiac phantom (NIfTI files + ``datalist.json``) into ``OUT_DIR``; see docs/phantom.md.
"""

from __future__ import annotations


def phantom(
    out_dir: str,
    kind: str = "echo2d",
    n_train: int = 600,
    n_val: int = 200,
    n_test: int = 200,
    size=None,
    seed: int = 0,
    preview: str | None = None,
    workers: int = 1,
    version: int = 2,
) -> str:
    """Write the phantom data set and return the path of its ``datalist.json``.

    Args:
        out_dir: output folder (created; files in it are overwritten).
        kind: ``echo2d`` (default), ``echo3d`` or ``mri2d``.
        n_train, n_val, n_test: pairs per split (defaults are for 2D; the paper's 3D split is 60/20/20).
        size: spatial size, int or list (default 128 for 2D, 64 for echo3d).
        seed: data set seed; the same seed writes byte-identical files.
        preview: path of a PNG gallery of the first training pairs (ED, ES, labels, noise_std, GT displacement).
        workers: processes used to generate the pairs (the output does not depend on it).
        version: phantom version: 2 (default: shared scanner settings per loop, frame-specific artefacts, and the
            residual ground truth ``moving_noise_std`` / ``residual_std`` / ``residual_mean``) or 1 (the original,
            byte-for-byte reproducible).
    """
    from scripts.data.phantom import write_dataset

    if isinstance(size, (list, tuple)):
        size = tuple(int(s) for s in size)
    path = write_dataset(
        out_dir,
        kind=kind,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        size=size,
        seed=seed,
        preview=preview,
        progress=True,
        workers=workers,
        version=version,
    )
    if preview:
        print(f"preview: {preview}")
    return path
