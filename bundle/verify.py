"""``python -m bundle verify``: every check a bundle reviewer runs, offline, in about a minute on a CPU.

Checks (each reported PASS / FAIL / SKIP; the command exits with status 1 when one fails):

1. ``files``: the files a MONAI bundle must hold (metadata, inference config, logging config, LICENSE, docs).
2. ``metadata``: ``monai.bundle.verify_metadata`` against the local schema ``configs/meta_schema.json`` (the schema
   named by metadata["schema"] would be downloaded; the local copy is used instead: ``download_url`` skips the
   download when the file exists and no hash is given), plus consistency: the version has a changelog entry, the
   network_data_format describes a 2-channel image in and a ``spatial_dims``-channel DDF out.
3. ``json_configs``: configs/*.json equal what ``python -m bundle configs_json`` writes from configs/*.yaml;
   ``configs``: every config parses and its components instantiate (nothing is trained or run): train.yaml,
   train+evaluate, inference.yaml, train+multi_gpu_train (its DDP parts need a process group: only checked to parse
   and to point at the right handlers), and train + each file of configs/variants/**.
4. ``inference_matches_train``: inference.yaml's network_def / variance_def equal train.yaml's.
5. ``net_in_out``: ``monai.bundle.verify_net_in_out`` on train.yaml and inference.yaml.
6. ``weights``: models/*.pt load with ``torch.load(weights_only=True)`` into the networks; every file of models/
   is under the model zoo's 25 MB limit; a ``large_files.yml``, when present (a release with hosted weights), is what
   the zoo's CI downloads: every entry needs a url with a scheme, and a listed file that is present must match its md5.
7. ``torchscript``: ``ckpt_export`` (traced) of models/model.pt (or of fresh weights when none are shipped) equals
   the eager network; ``onnx``: the ONNX export run by onnxruntime equals it (skipped without onnx/onnxruntime).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import re
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ids instantiated per config when present (nothing that starts training, reads a data set or needs a process group)
COMPONENT_IDS = (
    "network_def",
    "variance_def",
    "warp",
    "sim_loss",
    "reg_loss",
    "variance_loss",
    "joint_loss",
    "preprocessing",
    "eval_preprocessing",
)
ZOO_MAX_BYTES = 25 * 1024 * 1024  # the model zoo's limit per committed file
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/train.yaml",
    "configs/inference.yaml",
    "configs/inference.json",
    "configs/train.json",
    "configs/logging.conf",
    "configs/meta_schema.json",
    "LICENSE",
    "docs/data_license.txt",
    "docs/inference.md",
)


class _Report:
    def __init__(self, verbose: bool = True):
        self.rows: list[tuple[str, str, str]] = []
        self.verbose = verbose

    def run(self, name: str, fn: Callable[[], str | None]) -> None:
        t = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                msg = fn() or ""
            status = "SKIP" if msg.startswith("SKIP") else "PASS"
            msg = msg[5:].strip() if status == "SKIP" else msg
        except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
            status, msg = "FAIL", f"{type(e).__name__}: {e}"
            if self.verbose:
                traceback.print_exc()
        self.rows.append((name, status, msg))
        if self.verbose:
            print(f"[{status}] {name} ({time.time() - t:.1f}s) {msg}", flush=True)

    @property
    def ok(self) -> bool:
        return all(s != "FAIL" for _, s, _ in self.rows)


def _parser(files, root: Path, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=[str(f) for f in files])
    parser.read_meta(f=str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    for k, v in override.items():
        parser[k] = v
    return parser


def _instantiate(files, root: Path, ids=COMPONENT_IDS) -> list[str]:
    parser = _parser(files, root)
    done = []
    for i in ids:
        if i in parser:
            parser.get_parsed_content(i)
            done.append(i)
    return done


# --------------------------------------------------------------------------------------------------- checks
def check_files(root: Path) -> str:
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"missing: {missing}")
    return f"{len(REQUIRED_FILES)} files"


def check_metadata(root: Path) -> str:
    from monai.bundle import verify_metadata

    meta_file = root / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(root / "configs" / "meta_schema.json"))
    meta = json.loads(meta_file.read_text())
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"version {meta['version']} has no changelog entry.")
    fmt = meta["network_data_format"]
    img, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    nd = len(img["spatial_shape"])
    if img["num_channels"] != 2:
        raise ValueError("inputs.image.num_channels must be 2 (moving, fixed).")
    if pred["num_channels"] != nd or len(pred["spatial_shape"]) != nd:
        raise ValueError(f"outputs.pred must be a {nd}-channel DDF of {nd} spatial dims.")
    return f"schema (local copy) + consistency, version {meta['version']}"


def check_configs(root: Path) -> str:
    cfg = root / "configs"
    train = cfg / "train.yaml"
    out = []
    out.append("train: " + ",".join(_instantiate([train], root)))
    if (cfg / "evaluate.yaml").is_file():
        _instantiate([train, cfg / "evaluate.yaml"], root)
        out.append("evaluate")
    _instantiate([cfg / "inference.yaml"], root, COMPONENT_IDS + ("sim_loss",))
    out.append("inference")
    if (cfg / "multi_gpu_train.yaml").is_file():
        check_multi_gpu_config(root)
        out.append("multi_gpu_train (parse + handler indices)")
    variants = sorted(glob.glob(str(cfg / "variants" / "**" / "*.yaml"), recursive=True))
    for v in variants:
        try:
            _instantiate([train, v], root)
        except Exception as e:
            raise RuntimeError(f"{Path(v).relative_to(root)}: {e}") from e
    out.append(f"{len(variants)} variants")
    return "; ".join(out)


def check_json_configs(root: Path) -> str:
    from bundle.configs_json import COMMAND, stale

    bad = stale(root / "configs")
    if bad:
        raise ValueError(f"{bad} differ from their YAML source: run `{COMMAND}`.")
    return "configs/*.json equal configs/*.yaml"


def check_multi_gpu_config(root: Path) -> None:
    """The multi-GPU override disables train.yaml's handlers by index on ranks > 0: the indices must still point
    at logging handlers (never at the ValidationHandler or a CheckpointSaver)."""
    cfg = root / "configs"
    parser = _parser([cfg / "train.yaml", cfg / "multi_gpu_train.yaml"], root)
    expect = {
        "train#handlers": {1: "StatsHandler", 2: "TensorBoardStatsHandler", 3: "ProgressBar"},
        "validate#handlers": {0: "StatsHandler", 1: "TensorBoardStatsHandler"},
    }
    for lst, idx in expect.items():
        items = parser[lst]
        for i, name in idx.items():
            target = str(items[i].get("_target_", "")) if isinstance(items[i], dict) else ""
            if not target.endswith(name):
                raise ValueError(
                    f"multi_gpu_train.yaml disables {lst}#{i} on ranks > 0 expecting {name}, "
                    f"but train.yaml has {target or items[i]!r} there."
                )
    parser.get_parsed_content("network_def")


def check_inference_matches_train(root: Path) -> str:
    from monai.bundle import ConfigParser

    train = ConfigParser.load_config_file(str(root / "configs" / "train.yaml"))
    inf = ConfigParser.load_config_file(str(root / "configs" / "inference.yaml"))
    for k in ("network_def", "variance_def", "spatial_dims", "spatial_size", "intensity"):
        if train.get(k) != inf.get(k):
            raise ValueError(f"'{k}' differs: train.yaml {train.get(k)!r} vs inference.yaml {inf.get(k)!r}.")
    for k in ("gamma", "snr_form", "snr_normalization"):
        if train.get(k) != inf.get(k):
            raise ValueError(f"'{k}' differs: train.yaml {train.get(k)!r} vs inference.yaml {inf.get(k)!r}.")
    return "network_def, variance_def, spatial settings, Eq. 4 options"


@functools.lru_cache(maxsize=None)
def _net_in_out(config_file: str, meta_file: str, bundle_root: str, digest: str) -> None:
    """``monai.bundle.verify_net_in_out`` once per process for given file contents (``digest``): the test session
    (tests/test_pack_verify.py, tests/test_export.py) asks for the same verification more than once."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=meta_file, config_file=config_file, device="cpu", bundle_root=bundle_root
    )


def check_net_in_out(root: Path) -> str:
    meta = root / "configs" / "metadata.json"
    for c in ("train.yaml", "inference.yaml"):
        config = root / "configs" / c
        digest = hashlib.sha256(config.read_bytes() + b"\0" + meta.read_bytes()).hexdigest()
        _net_in_out(str(config), str(meta), str(root), digest)
    return "train.yaml, inference.yaml"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_weights(root: Path) -> str:
    import torch
    import yaml

    from scripts.checkpoint import load_weights

    models = root / "models"
    found = []
    parser = _parser([root / "configs" / "inference.yaml"], root)
    for name, net_id, key in (("model.pt", "network_def", "network"), ("variance.pt", "variance_def", "variance")):
        p = models / name
        if p.is_file():
            torch.load(p, map_location="cpu", weights_only=True)
            load_weights(parser.get_parsed_content(net_id, instantiate=True), p, key)
            found.append(name)
    too_big = [
        p.relative_to(root).as_posix() for p in models.rglob("*") if p.is_file() and p.stat().st_size > ZOO_MAX_BYTES
    ]
    lf = root / "large_files.yml"
    listed = set()
    if lf.is_file():
        entries = (yaml.safe_load(lf.read_text()) or {}).get("large_files") or []
        for e in entries:
            listed.add(e["path"])
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(e.get("url") or "")):
                raise ValueError(
                    f"large_files.yml: {e['path']} has url {e.get('url')!r}; the zoo's CI downloads "
                    "every entry: give a real url or remove the entry (and commit the file)."
                )
            p = root / e["path"]
            if p.is_file() and e.get("hash_val") and e.get("hash_type", "md5") == "md5" and _md5(p) != e["hash_val"]:
                raise ValueError(f"{e['path']}: md5 differs from large_files.yml.")
        found.append(f"large_files.yml ({len(entries)} entries)")
    too_big = [f for f in too_big if f not in listed]
    if too_big:
        raise ValueError(f"{too_big} exceed the model zoo's 25 MB per file: host them, list them in large_files.yml.")
    if not found:
        return "SKIP no weights in models/ yet (train, then copy model.pt and variance.pt there)"
    return ", ".join(found)


def _ckpt_for_export(root: Path, tmp: Path) -> tuple[str, str]:
    from bundle.export import fresh_weights

    p = root / "models" / "model.pt"
    if p.is_file():
        return str(p), "models/model.pt"
    return fresh_weights(tmp / "fresh.pt"), "fresh weights (no models/model.pt)"


def _input_shape(root: Path) -> list[int]:
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    return [1, 2, *meta["network_data_format"]["inputs"]["image"]["spatial_shape"]]


def _export_and_compare(root: Path, export_fn, check_fn, filename: str) -> tuple[float, list[int], str]:
    """Export the displacement network with ``export_fn`` into a temporary folder and return the largest
    difference to the eager network that ``check_fn`` measures, with the input shape and the weights used."""
    from bundle.export import build_network

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, what = _ckpt_for_export(root, tmp)
        shape = _input_shape(root)
        cfg = str(root / "configs" / "inference.yaml")
        exported = export_fn(
            ckpt,
            str(tmp / filename),
            shape,
            config_file=cfg,
            meta_file=str(root / "configs" / "metadata.json"),
            bundle_root=str(root),
        )
        err = check_fn(exported, build_network(cfg, ckpt, bundle_root=str(root)), shape)
    return err, shape, what


def check_torchscript(root: Path) -> str:
    from bundle.export import check_torchscript as _check, export_torchscript

    err, shape, what = _export_and_compare(root, export_torchscript, _check, "model.ts")
    return f"traced {shape} from {what}: max |ts - eager| = {err:.2g}"


def check_onnx(root: Path) -> str:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "SKIP onnx / onnxruntime not installed (pip install .[export])"
    from bundle.export import check_onnx as _check, export_onnx

    err, shape, what = _export_and_compare(root, export_onnx, _check, "model.onnx")
    return f"opset 16, {shape} from {what}: max |onnxruntime - eager| = {err:.2g}"


CHECKS = {
    "files": check_files,
    "metadata": check_metadata,
    "json_configs": check_json_configs,
    "configs": check_configs,
    "inference_matches_train": check_inference_matches_train,
    "net_in_out": check_net_in_out,
    "weights": check_weights,
    "torchscript": check_torchscript,
    "onnx": check_onnx,
}


def verify(
    bundle_root: str | None = None,
    checks: str | list[str] | None = None,
    onnx: bool = True,
    verbose: bool = True,
    exit_on_failure: bool = True,
) -> dict:
    """Run the reviewer's checks on the bundle at ``bundle_root`` (default: this repository).

    Args:
        checks: names among ``files, metadata, json_configs, configs, inference_matches_train, net_in_out, weights,
            torchscript, onnx`` (comma-separated or a list); default all.
        onnx: include the ONNX export check.
        exit_on_failure: exit with status 1 when a check fails (the command line); ``False`` returns the results.

    Returns ``{name: (status, message)}``.
    """
    logging.getLogger("monai").setLevel(logging.WARNING)
    root = Path(bundle_root).resolve() if bundle_root else ROOT
    names = list(CHECKS) if checks is None else (checks.split(",") if isinstance(checks, str) else list(checks))
    if not onnx and "onnx" in names:
        names.remove("onnx")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; available: {list(CHECKS)}")
    report = _Report(verbose)
    for n in names:
        report.run(n, lambda n=n: CHECKS[n](root))
    results = {n: (s, m) for n, s, m in report.rows}
    if verbose:
        print(
            f"\n{'OK' if report.ok else 'FAILED'}: "
            f"{sum(s == 'PASS' for s, _ in results.values())} passed, "
            f"{sum(s == 'FAIL' for s, _ in results.values())} failed, "
            f"{sum(s == 'SKIP' for s, _ in results.values())} skipped"
        )
    if exit_on_failure and not report.ok:
        raise SystemExit(1)
    return results if not exit_on_failure else None
