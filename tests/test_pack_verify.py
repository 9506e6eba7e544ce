"""python -m bundle pack -> monai.bundle.download / load round trip in a temp folder; python -m bundle verify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from bundle.pack import bundle_name, pack
from bundle.verify import verify

ROOT = Path(__file__).resolve().parents[1]
COPY = ("configs", "scripts", "bundle", "docs", "LICENSE", "README.md")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A copy of the bundle with fresh weights in models/, packed into dist/."""
    base = tmp_path_factory.mktemp("pack")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "data", "dist")
    for name in COPY:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.is_file():
            shutil.copy2(p, src / name)
    (src / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (src / "scripts" / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (src / "runs").mkdir()
    (src / "runs" / "log.txt").write_text("not packed")
    (src / "models").mkdir()
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(src / "configs" / "inference.yaml"))
    torch.manual_seed(0)
    net, var = parser.get_parsed_content("network_def"), parser.get_parsed_content("variance_def")
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    torch.save(net.state_dict(), src / "models" / "model.pt")
    torch.save(var.state_dict(), src / "models" / "variance.pt")
    archive = pack(out_dir=str(base / "dist"), bundle_root=str(src))
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    return {"base": base, "src": src, "archive": Path(archive), "name": bundle_name(meta), "meta": meta}


def test_archive_content(packed):
    archive, name = packed["archive"], packed["name"]
    assert archive.name == f"{name}_v{packed['meta']['version']}.zip"
    assert (archive.parent / f"{archive.name}.sha256").is_file()
    names = zipfile.ZipFile(archive).namelist()
    assert all(n.startswith(f"{name}/") for n in names)
    for must in (
        "configs/metadata.json",
        "configs/inference.yaml",
        "configs/train.yaml",
        "configs/inference.json",
        "configs/train.json",
        "models/model.pt",
        "models/variance.pt",
        "scripts/inference.py",
        "LICENSE",
        "docs/inference.md",
    ):
        assert f"{name}/{must}" in names, must
    assert not [n for n in names if "__pycache__" in n or "/runs/" in n or "/tests/" in n or n.endswith(".pyc")]
    # the weights travel inside the archive: no large_files.yml (the zoo's CI would download its entries)
    assert f"{name}/large_files.yml" not in names and not (packed["src"] / "large_files.yml").exists()
    with pytest.raises(ValueError, match="version"):
        pack(out_dir=str(packed["base"] / "dist2"), bundle_root=str(packed["src"]), version="9.9.9")


def test_pack_hosted_weights(packed, tmp_path):
    """--weights_url: the weights stay out of the archive, whose large_files.yml lists them with url and md5 (what
    the zoo's CI and monai.bundle download_large_files read); the source tree is not touched."""
    import hashlib

    base = "https://example.org/releases/v0.1.0"
    archive = pack(out_dir=str(tmp_path), bundle_root=str(packed["src"]), weights_url=base)
    name = packed["name"]
    z = zipfile.ZipFile(archive)
    assert not [n for n in z.namelist() if n.startswith(f"{name}/models/")]
    lf = yaml.safe_load(z.read(f"{name}/large_files.yml"))["large_files"]
    assert {e["path"] for e in lf} == {"models/model.pt", "models/variance.pt"}
    for e in lf:
        assert e["url"] == f"{base}/{e['path'].split('/', 1)[1]}" and e["hash_type"] == "md5"
        assert e["hash_val"] == hashlib.md5((packed["src"] / e["path"]).read_bytes()).hexdigest()
    assert not (packed["src"] / "large_files.yml").exists()
    with pytest.raises(ValueError, match="scheme"):
        pack(out_dir=str(tmp_path / "x"), bundle_root=str(packed["src"]), weights_url="releases/v0.1.0")


def test_verify_rejects_large_files_without_url(packed, tmp_path):
    """An entry with an empty url fails the zoo's CI (`unknown url type: ''` once the file is removed): verify
    refuses it, and a wrong md5, before a reviewer sees it."""
    src = tmp_path / "b"
    shutil.copytree(packed["src"], src)
    (src / "large_files.yml").write_text(
        yaml.safe_dump({"large_files": [{"path": "models/model.pt", "url": "", "hash_val": "", "hash_type": "md5"}]})
    )
    res = verify(bundle_root=str(src), checks="weights", verbose=False, exit_on_failure=False)
    assert res["weights"][0] == "FAIL" and "url" in res["weights"][1]
    (src / "large_files.yml").write_text(
        yaml.safe_dump(
            {
                "large_files": [
                    {
                        "path": "models/model.pt",
                        "url": "https://example.org/model.pt",
                        "hash_val": "0" * 32,
                        "hash_type": "md5",
                    }
                ]
            }
        )
    )
    res = verify(bundle_root=str(src), checks="weights", verbose=False, exit_on_failure=False)
    assert res["weights"][0] == "FAIL" and "md5" in res["weights"][1]


def test_download_load_round_trip(packed, tmp_path):
    from monai.bundle import ConfigParser, download, load

    name, url = packed["name"], packed["archive"].as_uri()
    download(name=name, bundle_dir=str(tmp_path), url=url, progress=False)
    bundle = tmp_path / name
    assert (bundle / "configs" / "inference.yaml").is_file()
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    net = parser.get_parsed_content("network_def")
    net = load(name=name, bundle_dir=str(tmp_path), model=net, device="cpu", progress=False)
    ref = torch.load(packed["src"] / "models" / "model.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v.cpu(), ref[k]), k
    # load() itself downloads from the URL given in an args file, and builds network_def from configs/inference.json
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"url": url}))
    net2 = load(
        name=name,
        bundle_dir=str(tmp_path / "second"),
        args_file=str(args),
        device="cpu",
        progress=False,
        workflow_type="inference",
    )
    assert isinstance(net2, torch.nn.Module)
    for k, v in net2.state_dict().items():
        assert torch.equal(v.cpu(), ref[k]), k


@pytest.mark.slow
def test_extracted_bundle_runs_and_verifies(packed, tmp_path):
    """Inference from the unpacked archive alone (its own scripts), then the reviewer's checks on it."""
    from monai.bundle import download

    download(name=packed["name"], bundle_dir=str(tmp_path), url=packed["archive"].as_uri(), progress=False)
    bundle = tmp_path / packed["name"]
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    for k, a in (("m", img), ("f", np.roll(img, 2, 0))):
        nib.save(nib.Nifti1Image(a, np.diag([1.2, 1.2, 1.0, 1.0])), str(tmp_path / f"{k}.nii.gz"))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.yaml",
        "--moving",
        str(tmp_path / "m.nii.gz"),
        "--fixed",
        str(tmp_path / "f.nii.gz"),
        "--uncertainty",
        "true",
        "--output_dir",
        str(tmp_path / "out"),
        "--spatial_size",
        "[32,32]",
        "--overlay",
        "false",
    ]
    r = subprocess.run(
        cmd,
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=400,
        env={**__import__("os").environ, "PYTHONPATH": str(bundle)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "f_sigma2.nii.gz").is_file()
    res = verify(
        bundle_root=str(bundle),
        checks="files,metadata,configs,weights,torchscript",
        verbose=False,
        exit_on_failure=False,
    )
    assert all(s == "PASS" for s, _ in res.values()), res


def test_verify_repository():
    """What `python -m bundle verify` runs on the repository (weights are checked when shipped), but ``configs``."""
    checks = ["files", "metadata", "inference_matches_train", "net_in_out", "weights"]
    res = verify(checks=",".join(checks), verbose=False, exit_on_failure=False)
    assert list(res) == checks and all(s in ("PASS", "SKIP") for s, _ in res.values()), res
    assert res["net_in_out"] == ("PASS", "train.yaml, inference.yaml")


@pytest.mark.slow
def test_verify_repository_configs():
    """``configs``: every config and every file of configs/variants/** instantiates (seconds per variant)."""
    res = verify(checks="configs", verbose=False, exit_on_failure=False)
    assert res["configs"][0] == "PASS", res
    n_variants = len(list((ROOT / "configs" / "variants").rglob("*.yaml")))
    assert f"{n_variants} variants" in res["configs"][1], res


def test_verify_detects_bad_metadata(tmp_path):
    src = tmp_path / "b"
    shutil.copytree(ROOT / "configs", src / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["channel_def"]
    meta.pop("copyright")
    (src / "configs" / "metadata.json").write_text(json.dumps(meta))
    res = verify(bundle_root=str(src), checks="metadata", verbose=False, exit_on_failure=False)
    assert res["metadata"][0] == "FAIL"
    with pytest.raises(SystemExit):
        verify(bundle_root=str(src), checks="metadata", verbose=False)
