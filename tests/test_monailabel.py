"""End to end: the MONAI Label app (scripts/monailabel_app) in a real ``monailabel start_server`` on 127.0.0.1.

A temporary datastore holds 2 tiny phantom pairs (32 x 32, scripts.data.phantom); the server serves the bundle's
configs/inference.yaml and models/ (the shipped weights). Requests: datastore ids, uploads (the stock datastore and
infer endpoints), an earlier result by id, and bad requests (4xx with a message). The server is killed at the end.

Skipped where MONAI Label is not importable (CI): install it in a separate virtual environment as in
docs/monailabel.md and run ``<venv>/bin/python -m pytest -q -s tests/test_monailabel.py`` (``-s`` prints the round
trip: request, HTTP code, seconds, result file).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "scripts" / "monailabel_app"
HAS_MONAILABEL = importlib.util.find_spec("monailabel") is not None
SKIP_REASON = (
    "monailabel is not installed in this Python (CI has none). Install it next to the CPU torch, in its own venv "
    "(docs/monailabel.md, Install): python -m venv --system-site-packages ~/mlvenv; A=scripts/monailabel_app; "
    "~/mlvenv/bin/pip install -c $A/constraints.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1; "
    "~/mlvenv/bin/pip install -c $A/constraints.txt -r $A/requirements.txt; then "
    "~/mlvenv/bin/python -m pytest -s tests/test_monailabel.py"
)
needs_monailabel = pytest.mark.skipif(not HAS_MONAILABEL, reason=SKIP_REASON)


def e2e(test):
    """An end-to-end test against the real server: slow (a subprocess), skipped without MONAI Label."""
    return pytest.mark.slow(needs_monailabel(test))


START_TIMEOUT_S = 180  # bounded waits: server start, each request
REQUEST_TIMEOUT_S = 120
NAME = re.compile(r"^p0_moving_to_p0_fixed_\d{8}-\d{6}-[0-9a-f]{8}_warped_label\.nii\.gz$")
TRANSCRIPT: list[str] = []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _datastore(tmp: Path) -> Path:
    """2 phantom pairs as p<i>_moving / p<i>_fixed, the moving labels as their 'final' labels."""
    from scripts.data.phantom import write_dataset

    src = tmp / "phantom"
    write_dataset(src, n_train=0, n_val=0, n_test=2, size=32, progress=False)
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, item in enumerate(json.loads((src / "datalist.json").read_text())["test"]):
        shutil.copy(src / item["moving"], studies / f"p{i}_moving.nii.gz")
        shutil.copy(src / item["fixed"], studies / f"p{i}_fixed.nii.gz")
        shutil.copy(src / item["moving_label"], studies / "labels" / "final" / f"p{i}_moving.nii.gz")
        shutil.copy(src / item["fixed_label"], tmp / f"p{i}_fixed_label.nii.gz")
    return studies


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import requests

    tmp = tmp_path_factory.mktemp("monailabel")
    studies = _datastore(tmp)
    app = tmp / "app"  # the shipped app, copied: start_server creates logs/ model/ bin/ in the app folder
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    port = _free_port()
    exe = Path(sys.executable).parent / "monailabel"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--conf", "bundle", str(ROOT), "--conf", "device", "cpu"]
    env = dict(
        os.environ, MONAILABEL_PYEXE=sys.executable, OMP_NUM_THREADS="1", MONAI_LABEL_SESSION_PATH=str(tmp / "sessions")
    )
    log = open(tmp / "server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"monailabel start_server exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-4000:]}"
                )
            try:
                if requests.get(f"{url}/info/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{(tmp / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        TRANSCRIPT.append(f"server up in {time.perf_counter() - t0:.1f} s: {' '.join(cmd[1:])}")
        yield {"url": url, "tmp": tmp, "studies": studies, "results": studies / ".registration"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()
        print("\n--- MONAI Label round trip ---\n" + "\n".join(TRANSCRIPT))


def call(server, method: str, path: str, **kwargs):
    """One request (bounded), recorded in the transcript: method, path, params, HTTP code, seconds, file name."""
    import requests

    t0 = time.perf_counter()
    r = requests.request(method, server["url"] + path, timeout=REQUEST_TIMEOUT_S, **kwargs)
    dt = time.perf_counter() - t0
    params = (kwargs.get("data") or {}).get("params", "")
    files = ",".join(f"{k}=@{v[0]}" for k, v in (kwargs.get("files") or {}).items())
    disp = re.search(r'filename="([^"]+)"', r.headers.get("content-disposition", ""))
    what = disp.group(1) if disp else r.text[:160].replace("\n", " ")
    TRANSCRIPT.append(f"{method} {path} {params} {files} -> {r.status_code} in {dt:.2f} s: {what}".replace("  ", " "))
    return r


def infer(server, query: str, params: dict | None = None, files: dict | None = None):
    return call(server, "POST", f"/infer/registration?{query}", data={"params": json.dumps(params or {})}, files=files)


def load(content: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(content)).dataobj)


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    from scripts.data.phantom import dice

    return float(np.mean([dice(a, b, label) for label in (1, 2, 3)]))


@e2e
def test_info_has_the_label_names(server):
    r = call(server, "GET", "/info/")
    assert r.status_code == 200
    info = r.json()
    names = {"background": 0, "LV blood pool": 1, "LV myocardium": 2, "RV": 3}
    assert info["labels"] == names
    assert info["models"]["registration"]["labels"] == names and info["models"]["registration"]["dimension"] == 2


@e2e
def test_register_datastore_ids(server, task_and_files):
    """Moving and fixed by datastore id: the warped label of the moving image's own label, as the bundle writes it."""
    r = infer(server, "image=p0_fixed&output=image", {"moving": "p0_moving"})
    assert r.status_code == 200, r.text
    name = re.search(r'filename="([^"]+)"', r.headers["content-disposition"]).group(1)
    assert NAME.match(name), name
    warped = load(r.content)
    assert warped.shape == (32, 32) and set(np.unique(warped)) <= {0, 1, 2, 3}
    studies, tmp = server["studies"], server["tmp"]
    fixed_label = np.asarray(nib.load(tmp / "p0_fixed_label.nii.gz").dataobj).squeeze()
    moving_label = np.asarray(nib.load(studies / "labels" / "final" / "p0_moving.nii.gz").dataobj).squeeze()
    before, after = mean_dice(moving_label, fixed_label), mean_dice(warped, fixed_label)
    TRANSCRIPT.append(f"  mean Dice (labels 1-3) with the fixed label: moving {before:.3f} -> warped {after:.3f}")
    assert after > before + 0.05  # the registration helps
    # identical to the bundle's own inference, in this process, on the same files (same phantom seed: same bytes)
    task, ds, _ = task_and_files
    assert Path(ds.get_image_uri("p0_fixed")).read_bytes() == (studies / "p0_fixed.nii.gz").read_bytes()
    path, _ = task({"image": ds.get_image_uri("p0_fixed"), "moving": "p0_moving", "device": "cpu"})
    np.testing.assert_array_equal(warped, np.asarray(nib.load(path).dataobj))
    # the server keeps every file of the request in its own folder
    rid = re.search(r"(\d{8}-\d{6}-[0-9a-f]{8})", name).group(1)
    kept = sorted(p.name for p in (server["results"] / rid).glob("*.nii.gz"))
    assert kept == sorted(name.replace("_warped_label", s) for s in ("_ddf", "_warped", "_warped_label"))
    TRANSCRIPT.append(
        f"  {server['results'].name}/{rid}/: {sorted(p.name for p in (server['results'] / rid).iterdir())}"
    )


@e2e
def test_every_request_has_its_own_files(server):
    first = infer(server, "image=p1_fixed&output=json", {"moving": "p1_moving"})
    assert first.status_code == 200, first.text
    a = first.json()
    digest = {k: hashlib.md5(Path(p).read_bytes()).hexdigest() for k, p in a["files"].items()}
    second = infer(server, "image=p1_fixed&output=json", {"moving": "p1_moving"})
    assert second.status_code == 200, second.text
    b = second.json()
    assert a["result_id"] != b["result_id"] and not set(a["files"].values()) & set(b["files"].values())
    assert {k: hashlib.md5(Path(p).read_bytes()).hexdigest() for k, p in a["files"].items()} == digest
    assert all(Path(p).is_file() for p in b["files"].values()) and a["output"] == "warped_label"


@e2e
def test_uploads(server):
    """The moving image (and its label) uploaded with the stock datastore endpoints, the fixed one in the request."""
    studies = server["studies"]
    with open(studies / "p1_moving.nii.gz", "rb") as f:
        r = call(server, "PUT", "/datastore/image?image=up_moving", files={"file": ("up_moving.nii.gz", f)})
    assert r.status_code == 200 and r.json()["image"] == "up_moving", r.text
    with open(studies / "labels" / "final" / "p1_moving.nii.gz", "rb") as f:
        r = call(server, "PUT", "/datastore/label?image=up_moving&tag=final", files={"label": ("up_moving.nii.gz", f)})
    assert r.status_code == 200, r.text
    with open(studies / "p1_fixed.nii.gz", "rb") as f:
        r = infer(server, "output=image", {"moving": "up_moving"}, files={"file": ("up_fixed.nii.gz", f)})
    assert r.status_code == 200, r.text
    assert "up_moving_to_" in r.headers["content-disposition"] and r.headers["content-disposition"].endswith(
        '_warped_label.nii.gz"'
    )
    by_id = infer(server, "image=p1_fixed&output=image", {"moving": "p1_moving"})
    np.testing.assert_array_equal(load(r.content), load(by_id.content))  # same pair, same result


@e2e
def test_earlier_result_by_id(server):
    r = infer(server, "image=p0_fixed&output=json", {"moving": "p0_moving", "moving_label": "none"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["output"] == "warped" and "warped_label" not in res["files"]
    ddf = infer(server, "image=p0_fixed&output=image", {"result_id": res["result_id"], "output": "ddf"})
    assert ddf.status_code == 200, ddf.text
    arr = load(ddf.content)
    assert arr.shape == (32, 32, 2) and np.abs(arr).max() > 0.1
    np.testing.assert_array_equal(arr, np.asarray(nib.load(res["files"]["ddf"]).dataobj))


@e2e
def test_uncertainty(server):
    r = infer(server, "image=p0_fixed&output=image", {"moving": "p0_moving", "uncertainty": True, "output": "sigma2"})
    assert r.status_code == 200, r.text
    sigma2 = load(r.content)
    assert sigma2.shape == (32, 32) and np.isfinite(sigma2).all() and sigma2.min() > 0


@e2e
@pytest.mark.parametrize(
    "query, params, status, needle",
    [
        ("image=p0_fixed", {}, 400, "'moving'"),
        ("image=p0_fixed", {"moving": "nope"}, 404, "'nope' is not an image id"),
        ("image=nope", {"moving": "p0_moving"}, 404, "'nope' is not an image id"),
        ("image=p0_fixed", {"moving": "p0_moving", "output": "jacobian"}, 400, "'output'"),
        ("image=p0_fixed", {"moving": "p0_moving", "uncertainty": "maybe"}, 400, "'uncertainty'"),
        ("image=p0_fixed", {"moving": "p0_moving", "moving_label": "p1_fixed"}, 404, "has no label"),
        ("image=p0_fixed", {"moving": "p1_fixed", "output": "warped_label"}, 400, "needs a moving label"),
        ("image=p0_fixed", {"moving": "p0_moving", "result_id": "19700101-000000-deadbeef"}, 404, "no earlier"),
        ("image=p0_fixed", {"moving": "big"}, 422, "grid"),
        ("image=p0_fixed", {"moving": "volume"}, 422, "spatial dims"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(server, query, params, status, needle):
    studies = server["studies"]
    if params.get("moving") in ("big", "volume") and not (studies / f"{params['moving']}.nii.gz").exists():
        affine = nib.load(studies / "p0_fixed.nii.gz").affine
        shape = (48, 48) if params["moving"] == "big" else (32, 32, 8)  # another grid / a 3D volume
        img = nib.Nifti1Image(np.random.default_rng(0).uniform(0.1, 0.9, shape).astype(np.float32), affine)
        r = call(
            server,
            "PUT",
            f"/datastore/image?image={params['moving']}",
            files={"file": (f"{params['moving']}.nii.gz", gzip.compress(img.to_bytes()))},
        )
        assert r.status_code == 200, r.text
    r = infer(server, query + "&output=json", params)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()


@e2e
def test_unknown_model_is_404(server):
    r = call(server, "POST", "/infer/segmentation?image=p0_fixed", data={"params": json.dumps({"moving": "p0_moving"})})
    assert r.status_code == 404 and "registration" in r.json()["detail"]


# ----------------------------------------------------------------- the task alone (no server, no MONAI Label needed)
class _Datastore:
    """The three datastore calls the task makes (MONAI Label's LocalDatastore API) over a dict of files."""

    def __init__(self, images: dict, labels: dict):
        self.images, self.labels = images, labels

    def list_images(self):
        return list(self.images)

    def get_image_uri(self, image_id):
        return self.images.get(image_id, "")

    def get_label_uri(self, label_id, label_tag):
        return self.labels.get(label_id, "") if label_tag == "final" else ""


@pytest.fixture(scope="module")
def task_and_files(tmp_path_factory):
    from scripts.monailabel_task import RegistrationInferTask

    tmp = tmp_path_factory.mktemp("task")
    studies = _datastore(tmp)
    ds = _Datastore(
        {f"p{i}_{k}": str(studies / f"p{i}_{k}.nii.gz") for i in (0, 1) for k in ("moving", "fixed")},
        {"p0_moving": str(studies / "labels" / "final" / "p0_moving.nii.gz")},
    )
    task = RegistrationInferTask(ROOT, datastore=lambda: ds, results_dir=tmp / "results", server_paths=False)
    return task, ds, tmp


def test_labels_are_the_label_set():
    from scripts.data.contracts import LABEL_SET
    from scripts.data.phantom import LABELS as PHANTOM
    from scripts.monailabel_task import LABELS

    assert sorted(LABELS.values()) == list(LABEL_SET) == sorted(PHANTOM.values())
    assert LABELS == {"background": 0, "LV blood pool": 1, "LV myocardium": 2, "RV": 3}


def test_task_resolves_datastore_ids_and_names_results_uniquely(task_and_files):
    task, ds, tmp = task_and_files
    request = {"image": ds.get_image_uri("p0_fixed"), "moving": "p0_moving", "device": "cpu"}
    path_a, a = task(dict(request))
    path_b, b = task(dict(request))
    assert a["result_id"] != b["result_id"] and path_a != path_b
    assert Path(path_a).name == f"p0_moving_to_p0_fixed_{a['result_id']}_warped_label.nii.gz"  # own label, auto
    assert a["moving_label"] == ds.get_label_uri("p0_moving", "final")
    assert Path(a["result_dir"]) == tmp / "results" / a["result_id"] and Path(path_a).is_file()
    np.testing.assert_array_equal(np.asarray(nib.load(path_a).dataobj), np.asarray(nib.load(path_b).dataobj))
    # an earlier result by its id, without running the networks again
    path_c, c = task({"image": request["image"], "result_id": a["result_id"], "output": "ddf"})
    assert path_c == a["files"]["ddf"] and c["output"] == "ddf" and nib.load(path_c).shape == (32, 32, 2)


@pytest.mark.parametrize(
    "request_, status, needle",
    [
        ({"moving": "p0_moving", "image": ""}, 404, "'image'"),
        ({}, 400, "'moving'"),
        ({"moving": "p9_moving"}, 404, "'p9_moving' is not an image id of the datastore (the datastore holds 4"),
        ({"moving": "PATH"}, 400, "is a path; this server takes datastore image ids only"),  # server_paths off
        ({"moving": "../../etc/passwd"}, 400, "is a path"),
        ({"moving": "a..b"}, 400, "not a valid id"),  # ids: no '..' before the datastore sees them
        ({"moving": "p0_moving", "label_tag": "../../x"}, 400, "'label_tag'"),
        ({"moving": "p0_moving", "moving_label": "a/../b"}, 400, "'moving_label'"),
        ({"moving": "p0_moving", "device": "meta"}, 400, "'device': 'meta' is not a device of this server"),
        ({"moving": "p0_moving", "device": "cpu:1"}, 400, "'device': 'cpu:1' is not a device of this server"),
        ({"moving": "p0_moving", "output_dir": "/tmp/x"}, 400, "'output_dir'"),
        ({"moving": "p0_moving", "output": "sigma2"}, 400, "needs 'uncertainty': true"),
        ({"moving": "p1_moving", "output": "warped_label"}, 400, "needs a moving label"),
        ({"moving": "p0_moving", "moving_label": True}, 400, "'moving_label'"),
        ({"moving": "p0_moving", "device": "gpu7"}, 400, "'device'"),
        ({"result_id": "../../etc"}, 404, "no earlier result"),
        ({"result_id": "../.."}, 404, "no earlier result"),
    ],
)
def test_task_bad_requests(task_and_files, request_, status, needle):
    from scripts.monailabel_task import RequestError

    task, ds, _ = task_and_files
    req = {"image": ds.get_image_uri("p0_fixed"), "device": "cpu", **request_}
    if req.get("moving") == "PATH":
        req["moving"] = ds.get_image_uri("p0_moving")
    with pytest.raises(RequestError) as e:
        task(req)
    assert e.value.status_code == status and needle in e.value.detail and isinstance(e.value, ValueError)


def test_server_paths_are_confined_to_the_roots(task_and_files, tmp_path):
    """server_paths on: a path inside server_roots is accepted, one outside (or via a symbolic link out of a root)
    is 403, an output_dir that is a file is 400 (issue 23)."""
    from scripts.monailabel_task import RegistrationInferTask, RequestError

    _, ds, tmp = task_and_files
    task = RegistrationInferTask(ROOT, datastore=lambda: ds, results_dir=tmp / "results", server_paths=True,
                                 server_roots=[tmp])  # fmt: skip
    assert task._image(ds.get_image_uri("p0_moving"), "moving") == os.path.realpath(ds.get_image_uri("p0_moving"))
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(ds.get_image_uri("p0_moving"), outside)
    link = tmp / "link.nii.gz"
    link.symlink_to(outside)
    for value in (str(outside), str(link), "/etc/passwd"):
        with pytest.raises(RequestError) as e:
            task._image(value, "moving")
        assert e.value.status_code == 403 and "outside the folders this server may read" in e.value.detail
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")
    for out, status, needle in ((str(a_file), 400, "is a file, not a folder"), ("/tmp/x", 403, "outside")):
        with pytest.raises(RequestError) as e:
            task._results_root({"output_dir": out})
        assert e.value.status_code == status and needle in e.value.detail
    no_roots = RegistrationInferTask(ROOT, datastore=lambda: ds, server_paths=True)
    with pytest.raises(RequestError, match="none configured"):
        no_roots._image(ds.get_image_uri("p0_moving"), "moving")


def test_datastore_wrapper_checks_ids_and_tags_first():
    """SafeIdDatastore (the app's datastore): '../' ids and tags are 400 before the datastore is called."""
    from scripts.monailabel_task import RequestError, SafeIdDatastore

    calls = []

    class Store:
        def add_image(self, image_id, image_filename, image_info):
            calls.append(("add_image", image_id))
            return image_id

        def save_label(self, image_id, label_filename, label_tag, label_info):
            calls.append(("save_label", image_id, label_tag))
            return image_id

        name = "store"

    ds = SafeIdDatastore(Store())
    assert ds.add_image("patient_1", "f", {}) == "patient_1" and ds.name == "store"
    assert ds.add_image("патient_1", "f", {}) == "патient_1"  # non-ASCII ids kept
    for call in (
        lambda: ds.add_image("../../../x", "f", {}),
        lambda: ds.add_image("a/b", "f", {}),
        lambda: ds.save_label("p0", "f", "../../../../x", {}),
        lambda: ds.save_label("p0", "f", label_tag="..", label_info={}),
    ):
        with pytest.raises(RequestError) as e:
            call()
        assert e.value.status_code == 400 and "not a valid id" in e.value.detail
    assert calls == [("add_image", "patient_1"), ("add_image", "патient_1")]
