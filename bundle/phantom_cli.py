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
    overwrite=False,
) -> str:
    """Write the phantom data set and return the path of its ``datalist.json``.

    Args:
        out_dir: output folder (created). A folder that already holds files is used only if it holds a phantom
            written by this command (its ``datalist.json`` has a ``phantom`` entry); a datalist or other files of
            yours are never replaced unless ``--overwrite true`` (a file given as the folder is refused).
        kind: ``echo2d`` (default), ``echo3d`` or ``mri2d``.
        n_train, n_val, n_test: pairs per split (defaults are for 2D; the paper's 3D split is 60/20/20).
        size: spatial size, int or list (default 128 for 2D, 64 for echo3d).
        seed: data set seed; the same seed writes byte-identical files.
        preview: path of a PNG gallery of the first training pairs (ED, ES, labels, noise_std, GT displacement).
        workers: processes used to generate the pairs (the output does not depend on it).
        version: phantom version: 2 (default: shared scanner settings per loop, frame-specific artefacts, and the
            residual ground truth ``moving_noise_std`` / ``residual_std`` / ``residual_mean``) or 1 (the original,
            byte-for-byte reproducible).
        overwrite: true: write into a folder that holds files this command did not write (same-named files,
            ``datalist.json`` included, are replaced).
    """
    from scripts.data.phantom import write_dataset

    check_phantom_args(out_dir, n_train, n_val, n_test, overwrite)

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


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"--{name} must be a whole number >= 0 (pairs in that split), got {v!r}.")
    return v


def check_phantom_args(out_dir, n_train, n_val, n_test, overwrite=False) -> None:
    """Refuse negative / non-integer counts, a file given as ``out_dir`` and a folder holding files this command
    did not write (unless ``overwrite``), naming the file."""
    import json
    from pathlib import Path

    from scripts.utils import as_flag

    counts = [_count(k, v) for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))]
    if sum(counts) == 0:
        raise ValueError("--n_train, --n_val and --n_test are all 0: nothing to write.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out_dir}: a file, not a folder; choose a folder path.")
    if not out.is_dir() or as_flag(overwrite):
        return
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    dl = out / "datalist.json"
    ours = False
    if dl.is_file():
        try:
            content = json.loads(dl.read_text(encoding="utf-8"))
            ours = isinstance(content, dict) and isinstance(content.get("phantom"), dict)
        except (OSError, ValueError):
            ours = False
    if not ours:
        what = f"{dl} (not a phantom datalist written by this command)" if dl.exists() else f"{', '.join(entries[:5])}"
        raise ValueError(
            f"out_dir {out_dir} already holds {what}: refusing to write the phantom over it. Choose an empty or new "
            "folder, or pass --overwrite true to replace same-named files there."
        )
