"""``python -m bundle pack``: a versioned zip archive of the bundle that ``monai.bundle.download`` / ``load`` accept.

The archive ``<out_dir>/<name>_v<version>.zip`` holds one top folder ``<name>/`` (the MONAI model-zoo layout, which
``monai.bundle.download(..., url=...)`` extracts into ``bundle_dir/<name>``) with::

    configs/  models/  scripts/  bundle/  docs/  LICENSE  README.md

and nothing else: no caches, runs, data, dist, tests, .git, egg-info or TensorBoard logs. A ``.sha256`` file is
written next to the archive.

Weights: the files of ``models/`` are small (< 1 MB each, the model zoo accepts files up to 25 MB) and are committed
with the bundle, so the repository has no ``large_files.yml`` (the zoo's CI downloads every entry of that file, and
an entry without a real url fails it: docs/zoo.md). For a release whose weights are hosted elsewhere, ``pack
--weights_url URL`` leaves them out of the archive and writes, inside the archive only, a ``large_files.yml`` that
lists each with ``URL/<file>`` and its md5, so that ``python -m monai.bundle download_large_files --bundle_path
<bundle>`` fetches and checks them.

Consume it::

    python -m monai.bundle download --name heteroscedastic_cardiac_registration --bundle_dir ./bundles \\
        --url file:///abs/path/dist/heteroscedastic_cardiac_registration_v0.1.0.zip
    # then, in Python: the displacement network (configs/inference.json's network_def) with models/model.pt
    # (the bundle folder on sys.path, for its scripts/ package)
    monai.bundle.load(name="heteroscedastic_cardiac_registration", bundle_dir="./bundles", workflow_type="inference")
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)

INCLUDE = ("configs", "models", "scripts", "bundle", "docs", "LICENSE", "README.md")
EXCLUDE = (
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".git",
    ".gitignore",
    ".pytest_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
    "runs",
    "data",
    "dist",
    "tests",
    "events.out.tfevents*",
    ".DS_Store",
    "*.swp",
    "*~",
)
WEIGHT_SUFFIXES = (".pt", ".ts", ".onnx")


def bundle_name(meta: dict) -> str:
    """The archive's folder name: the metadata ``name`` in snake case."""
    name = meta.get("name") or "bundle"
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def _excluded(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDE)


def _hash(path: Path, kind: str = "md5") -> str:
    h = hashlib.new(kind)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_weights(path: Path) -> None:
    if path.suffix != ".pt":
        return
    from scripts.checkpoint import read_checkpoint

    obj = read_checkpoint(path, "cpu")  # empty, truncated, pickled objects, TorchScript: an error naming the file
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (torch.load(weights_only=True) gave {type(obj).__name__}).")


def weight_files(root: Path) -> list[Path]:
    """The weight files of ``models/`` (``.pt``, ``.ts``, ``.onnx``); every ``.pt`` must be a plain state dict."""
    files = [p for p in sorted((root / "models").rglob("*")) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    for p in files:
        _check_weights(p)
    return files


def large_files_text(root: Path, weights_url: str) -> str:
    """The ``large_files.yml`` of a release whose weights are hosted at ``weights_url``: path, url, md5 of each."""
    import yaml

    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", weights_url or ""):
        raise ValueError(f"weights_url must be a url with a scheme (https://..., file:///...), got {weights_url!r}.")
    entries = [
        {
            "path": p.relative_to(root).as_posix(),
            "url": f"{weights_url.rstrip('/')}/{p.relative_to(root / 'models').as_posix()}",
            "hash_val": _hash(p, "md5"),
            "hash_type": "md5",
        }
        for p in weight_files(root)
    ]
    head = (
        "# Weights of this release, hosted outside the archive (written by `python -m bundle pack --weights_url`).\n"
        "# python -m monai.bundle download_large_files --bundle_path . fetches and checks them.\n"
    )
    return head + yaml.safe_dump({"large_files": entries}, sort_keys=False)


def _write(z: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    """One archive member with a fixed date and mode (the same bundle gives the same archive bytes)."""
    info = zipfile.ZipInfo(arcname, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    z.writestr(info, data)


def pack(
    out_dir: str = "dist",
    version: str | None = None,
    name: str | None = None,
    bundle_root: str | None = None,
    weights_url: str | None = None,
    require_weights: bool = False,
) -> str:
    """Build ``<out_dir>/<name>_v<version>.zip`` from the bundle at ``bundle_root`` (default: this repository).

    Args:
        out_dir: where to write the archive (relative paths are relative to the current directory).
        version: must equal configs/metadata.json's ``version`` when given (bump it and its changelog there first).
        name: the bundle folder name inside the archive (default: metadata ``name`` in snake case).
        weights_url: base url of weights hosted elsewhere: they are left out of the archive, which gets a
            ``large_files.yml`` listing ``<weights_url>/<file>`` with its md5 (default: weights inside the archive).
        require_weights: fail when models/model.pt or models/variance.pt is missing (for releases).

    Returns the archive path.
    """
    root = Path(bundle_root).resolve() if bundle_root else ROOT
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if version is not None and str(version) != meta["version"]:
        raise ValueError(
            f"version {version} != configs/metadata.json version {meta['version']}: update metadata.json "
            "(version and changelog) first."
        )
    version = meta["version"]
    if version not in meta.get("changelog", {}):
        raise ValueError(f"configs/metadata.json: version {version} has no changelog entry.")
    missing = [w for w in ("model.pt", "variance.pt") if not (root / "models" / w).is_file()]
    if missing:
        if require_weights:
            raise FileNotFoundError(f"{root / 'models'}: missing {missing} (require_weights=True).")
        logger.warning("packing without %s: the archive will hold configs and code only", missing)
        print(f"warning: models/ has no {missing}; the archive holds no weights for them.")
    name = name or bundle_name(meta)
    hosted = set(weight_files(root)) if weights_url else set()
    extra = {"large_files.yml": large_files_text(root, weights_url)} if weights_url else {}

    files = []
    for top in INCLUDE:
        p = root / top
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                rel_dir = Path(dirpath).relative_to(root)
                dirnames[:] = sorted(d for d in dirnames if not _excluded(rel_dir / d))
                files += [Path(dirpath) / f for f in sorted(filenames) if not _excluded(rel_dir / f)]
    files = [f for f in files if f not in hosted]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}_v{version}.zip"
    tmp = archive.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in files:
            _write(z, f"{name}/{f.relative_to(root).as_posix()}", f.read_bytes())
        for rel, text in extra.items():
            _write(z, f"{name}/{rel}", text.encode())
    os.replace(tmp, archive)
    digest = _hash(archive, "sha256")
    (out / f"{archive.name}.sha256").write_text(f"{digest}  {archive.name}\n")
    print(f"{archive} ({len(files) + len(extra)} files, sha256 {digest})")
    return str(archive)
