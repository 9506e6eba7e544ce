"""``python -m bundle zoo_ci --zoo PATH``: the MONAI model zoo's own CI script on this bundle, offline.

It runs the zoo's ``ci/verify_bundle.py`` **unmodified** (``-m full`` by default: files, version / changelog,
metadata against the schema, workflow properties of the inference config, network input / output shapes, and the
TorchScript step) on a copy of the bundle laid out as a zoo pull request adds it, in a temporary folder:

1. ``ci/`` and ``models/model_info.json`` come from the zoo (``--zoo``: a checkout or a bare git dir, e.g. the one
   ``git clone --mirror https://github.com/Project-MONAI/model-zoo`` gives); nothing is written into it.
2. the bundle goes to ``models/heteroscedastic_cardiac_registration/``: the files git tracks or would track (weights
   included, they are under the zoo's 25 MB limit; no ``large_files.yml``: docs/zoo.md).
3. the bundle's name is added to ``exclude_verify_torchscript_list`` of ``ci/bundle_custom_data.py``, the zoo's
   mechanism for bundles whose network cannot be scripted (here MONAI's ``Warp``: "cannot statically infer the
   expected size of a list"), as a zoo PR does for this bundle; ``models/model.ts`` is a traced export instead.
4. offline, the schema named in metadata.json is the local ``configs/meta_schema.json``, placed where the zoo's
   ``ci/prepare_schema.py`` (run unmodified) would download it; its ``download_url`` skips an existing file.

Exits with the status of ``verify_bundle.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "heteroscedastic_cardiac_registration"


def _git_dir(zoo: Path) -> Path:
    if (zoo / ".git").exists():
        return zoo / ".git"
    if (zoo / "HEAD").is_file() and (zoo / "objects").is_dir():
        return zoo
    raise FileNotFoundError(f"{zoo}: not a model-zoo checkout nor a bare git dir (no .git, no HEAD/objects).")


def _bundle_files(src: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [f for f in out if (src / f).is_file()]


def prepare(zoo: str, work_dir: str | None = None, bundle_root: str | None = None) -> Path:
    """Lay out the zoo's ci/ and this bundle in ``work_dir`` (default: a new temporary folder); return it."""
    git = _git_dir(Path(zoo).resolve())
    src = Path(bundle_root).resolve() if bundle_root else ROOT
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="zoo_ci_"))
    work.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", f"--git-dir={git}", "archive", "HEAD", "ci", "models/model_info.json"], capture_output=True, check=True
    ).stdout
    tar_path = work / "zoo.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as t:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.10.12 / 3.11.4
            t.extractall(work, filter="data")
        else:
            t.extractall(work)
    tar_path.unlink()
    dst = work / "models" / NAME
    for f in _bundle_files(src):
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)
    custom = work / "ci" / "bundle_custom_data.py"
    text = custom.read_text()
    anchor = "exclude_verify_torchscript_list = ["
    if anchor not in text:
        raise ValueError(f"{custom}: no '{anchor}' (the zoo changed its exclusion mechanism).")
    custom.write_text(text.replace(anchor, f'{anchor}\n    "{NAME}",', 1))
    shutil.copy2(src / "configs" / "meta_schema.json", work / "models" / "meta_schema_20240725.json")
    return work


def zoo_ci(zoo: str, mode: str = "full", work_dir: str | None = None, bundle_root: str | None = None) -> None:
    """Run the zoo's ci/prepare_schema.py and ci/verify_bundle.py -m ``mode`` (full | min) on this bundle."""
    work = prepare(zoo, work_dir, bundle_root)
    env = {**os.environ, "PYTHONPATH": ""}
    print(f"model-zoo CI in {work}", flush=True)
    for cmd in (
        [sys.executable, "ci/prepare_schema.py", "--l", NAME],
        [sys.executable, "ci/verify_bundle.py", "-b", NAME, "-m", mode],
    ):
        print("$ " + " ".join(cmd[1:]), flush=True)
        r = subprocess.run(cmd, cwd=work, env=env)
        if r.returncode:
            raise SystemExit(r.returncode)
    print(f"model-zoo ci/verify_bundle.py -m {mode}: OK")
