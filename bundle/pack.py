"""``python -m bundle pack``: a versioned zip archive of the bundle that ``monai.bundle.download`` / ``load`` accept.

The archive ``<out_dir>/<name>_v<version>.zip`` holds one top folder ``<name>/`` (the MONAI model-zoo layout, which
``monai.bundle.download(..., url=...)`` extracts into ``bundle_dir/<name>``) with::

    configs/  models/  scripts/  bundle/  docs/  LICENSE  README.md  large_files.yml

and nothing else: no caches, runs, data, dist, tests, .git, egg-info or TensorBoard logs. ``large_files.yml`` (written
at the bundle root before packing, as the model zoo places it) lists each weight file with its md5 so that
``python -m monai.bundle download_large_files --bundle_path <bundle>`` can fetch (``weights_url``) or check them.
A ``.sha256`` file is written next to the archive.

Consume it::

    python -m monai.bundle download --name heteroscedastic_cardiac_registration --bundle_dir ./bundles \\
        --url file:///abs/path/dist/heteroscedastic_cardiac_registration_v0.1.0.zip
    # then, in Python (weights with torch.load(weights_only=True) into the bundle's network_def):
    monai.bundle.load(name="heteroscedastic_cardiac_registration", bundle_dir="./bundles", model=net)
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

INCLUDE = ("configs", "models", "scripts", "bundle", "docs", "LICENSE", "README.md", "large_files.yml")
EXCLUDE = (
    "__pycache__", "*.pyc", "*.pyo", ".git", ".gitignore", ".pytest_cache", ".ipynb_checkpoints", "*.egg-info",
    "runs", "data", "dist", "tests", "events.out.tfevents*", ".DS_Store", "*.swp", "*~",
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
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (torch.load(weights_only=True) gave {type(obj).__name__}).")


def write_large_files(root: Path, weights_url: str | None = None) -> Path:
    """Write ``large_files.yml`` at the bundle root: path, url, hash_val (md5), hash_type of each weight file."""
    import yaml

    entries = []
    for p in sorted((root / "models").rglob("*")):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            _check_weights(p)
            rel = p.relative_to(root).as_posix()
            url = f"{weights_url.rstrip('/')}/{p.relative_to(root / 'models').as_posix()}" if weights_url else ""
            entries.append({"path": rel, "url": url, "hash_val": _hash(p, "md5"), "hash_type": "md5"})
    out = root / "large_files.yml"
    with open(out, "w") as f:
        f.write("# Weights of the bundle with their md5 (written by `python -m bundle pack`).\n")
        f.write("# python -m monai.bundle download_large_files --bundle_path . fetches missing ones from `url`.\n")
        yaml.safe_dump({"large_files": entries}, f, sort_keys=False)
    return out


def pack(out_dir: str = "dist", version: str | None = None, name: str | None = None, bundle_root: str | None = None,
         weights_url: str | None = None, require_weights: bool = False) -> str:
    """Build ``<out_dir>/<name>_v<version>.zip`` from the bundle at ``bundle_root`` (default: this repository).

    Args:
        out_dir: where to write the archive (relative paths are relative to the current directory).
        version: must equal configs/metadata.json's ``version`` when given (bump it and its changelog there first).
        name: the bundle folder name inside the archive (default: metadata ``name`` in snake case).
        weights_url: base URL of the released weights, written in large_files.yml (default: empty url).
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
    write_large_files(root, weights_url)

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
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}_v{version}.zip"
    tmp = archive.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in files:
            info = zipfile.ZipInfo(f"{name}/{f.relative_to(root).as_posix()}", date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, f.read_bytes())
    os.replace(tmp, archive)
    digest = _hash(archive, "sha256")
    (out / f"{archive.name}.sha256").write_text(f"{digest}  {archive.name}\n")
    print(f"{archive} ({len(files)} files, sha256 {digest})")
    return str(archive)
