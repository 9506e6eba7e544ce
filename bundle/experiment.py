"""``python -m bundle experiment``: the paper's comparison (Tables 1, 2, 4) as a matrix of bundle runs.

Every combination of architecture x loss variant x seed is trained with the bundle's own workflow and evaluated with
its evaluation workflow, each in a subprocess::

    python -m monai.bundle run training   --config_file "[train.yaml, data, loss, arch]" --output_dir RUN --seed k ...
    python -m monai.bundle run evaluating --config_file "[train.yaml, data, loss, arch, evaluate.yaml]" ...

with ``RUN = <out>/<data>/<arch>/<loss>/seed<k>``; all runs share the same data (the phantom's seed is fixed) and the
same seeds. Then one Markdown report ``<out>/report.md``: Table 1 (mean ± std of Dice / HD / ASD per method, best in
bold, second best †), Table 2 (paired t-tests of ours vs the best other method) and, with ``--gamma_sweep``, Table 4
(γ of Eq. 4). With ``--oracle true`` every collaborative loss variant also gets its oracle row (the same weight form
computed from the phantom's true ``residual_std`` instead of σ̂: configs/variants/loss/oracle.yaml laid over the
variant), the bound any variance estimator can reach, beside the others in Table 1 (never a competitor in Table 2),
and paired tests over seeds and over pairs of ours vs MSE and of each oracle vs its method (bundle/report.py).
Resumable: a run whose ``eval/summary.json`` exists is skipped; a run with epoch checkpoints but no
``checkpoint_final.pt`` resumes training with ``--resume true``; a finished but unevaluated run is only evaluated.

Example (the lead's full matrix)::

    python -m bundle experiment --data phantom_echo --arch voxelmorph transmorph --loss all --seeds 3 \\
        --max_epochs 300 --out runs/ [--gamma_sweep 0 0.25 0.5 1] [--num_workers 4 ...any bundle override]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bundle.cli_args import HELP_FLAGS, multi_value_flags, print_help
from bundle.report import ORACLE_OVERLAY, OURS, is_oracle_row, oracle_name, write_report  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]  # the bundle root
CONFIGS = ROOT / "configs"
VARIANTS = CONFIGS / "variants"

# Table 1 of the paper: the baselines and ours, in the paper's order
LOSSES_ALL = ("mse", "ncc", "mi", "nll", "beta_nll", "adareg", "adaframe", "ours")
# Supp. Mat. Table 5: displacement uncertainty (VoxelMorph only)
LOSSES_SUPP = ("ours_dispunc", "vxm_diff")
VOXELMORPH_ONLY = {"ours_dispunc", "vxm_diff"}  # their network_def is a VoxelMorph with an uncertainty head
# asd_rev = medpy asd(reference, prediction), as the authors compute it
DEFAULT_METRICS = ("dice", "hd", "asd_rev", "epe_heart")


def _as_list(x) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [s.strip() for s in x.replace(" ", ",").split(",") if s.strip()]
    if isinstance(x, (int, float)):
        return [str(x)]
    out = []
    for v in x:
        out += _as_list(v)
    return out


def check_variant_name(kind: str, name) -> str:
    """A variant is a name of a file in configs/variants/<kind>/ (letters, digits, ``_ . -``), never a path: a
    separator or ``..`` is refused (``--loss ../x`` would read a YAML from outside configs/variants)."""
    n = str(name)
    if (
        not n
        or "/" in n
        or "\\" in n
        or ".." in n
        or n.startswith(".")
        or not n.replace("_", "").replace("-", "").replace(".", "").isalnum()
    ):
        avail = sorted(q.stem for q in (VARIANTS / kind).glob("*.yaml"))
        raise ValueError(
            f"--{kind} {name!r}: a variant is a name of configs/variants/{kind}/ (letters, digits, _ . -), not a "
            f"path; available: {avail}."
        )
    return n


def check_override_values(overrides: dict, allow_expressions=False) -> None:
    """Refuse an override value starting with ``$`` (a Python expression MONAI would evaluate) or ``%`` (the content
    of another config file) unless ``allow_expressions``: the experiment forwards every value to its runs."""
    if _flag(allow_expressions):
        return
    bad = [f"--{k} {v!r}" for k, v in overrides.items() if isinstance(v, str) and v.lstrip()[:1] in ("$", "%")]
    if bad:
        raise ValueError(
            f"{', '.join(bad)}: a value starting with '$' (Python code) or '%' (another config file) is evaluated by "
            "monai.bundle in every run; pass --allow_expressions true if you mean it."
        )


def resolve_losses(loss) -> list[str]:
    """'all' (Table 1), 'supp' (Supp. Table 5), 'everything', or names / comma-separated names."""
    out: list[str] = []
    for name in _as_list(loss) or ["all"]:
        group = {"all": LOSSES_ALL, "supp": LOSSES_SUPP, "everything": LOSSES_ALL + LOSSES_SUPP}.get(name)
        for n in group or (check_variant_name("loss", name),):
            if not (VARIANTS / "loss" / f"{n}.yaml").is_file():
                raise FileNotFoundError(f"no loss variant {n!r} (configs/variants/loss/{n}.yaml).")
            if n not in out:
                out.append(n)
    return out


def _variant(kind: str, name: str) -> Path:
    p = VARIANTS / kind / f"{check_variant_name(kind, name)}.yaml"
    if not p.is_file():
        avail = sorted(q.stem for q in (VARIANTS / kind).glob("*.yaml"))
        raise FileNotFoundError(f"no {kind} variant {name!r} ({p}); available: {avail}.")
    return p


def config_files(data: str, arch: str, loss: str, evaluate: bool = False, overlays: Sequence[str] = ()) -> list[str]:
    """The config list of one run: train.yaml, data, loss, the loss ``overlays`` (e.g. ``oracle``), arch (the arch
    after the loss: it sets the smoothness multiplier of whichever regulariser the loss chose), evaluate.yaml. The
    VoxelMorph-only uncertainty variants carry their own network and take no arch file."""
    files = [CONFIGS / "train.yaml", _variant("data", data), _variant("loss", loss)]
    files += [_variant("loss", o) for o in overlays]
    if loss not in VOXELMORPH_ONLY:
        files.append(_variant("arch", arch))
    if evaluate:
        files.append(CONFIGS / "evaluate.yaml")
    return [str(f) for f in files]


def _loss_settings(loss: str) -> dict:
    """The top-level settings of a loss variant over train.yaml's (``mode``, ``variance_source``, ...)."""
    import yaml

    with open(CONFIGS / "train.yaml") as f:
        base = yaml.safe_load(f) or {}
    with open(_variant("loss", loss)) as f:
        return dict(base, **(yaml.safe_load(f) or {}))


def has_oracle(loss: str) -> bool:
    """Whether ``loss`` has an oracle row: a collaborative variant that learns σ̂ (not itself an oracle), on the
    displacement network of the arch files (not a VoxelMorph-only uncertainty variant)."""
    cfg = _loss_settings(loss)
    return (
        loss not in VOXELMORPH_ONLY
        and cfg.get("mode", "collaborative") == "collaborative"
        and cfg.get("variance_source", "network") == "network"
    )


def _flag(value) -> bool:
    from monai.utils import str2bool

    return str2bool(value) if isinstance(value, (str, bool)) else bool(value)


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _overrides(d: dict) -> list[str]:
    args = []
    for k, v in d.items():
        if v is None:
            continue
        args += [f"--{k}", _fmt_value(v)]
    return args


MULTI_VALUE = ("arch", "loss", "gamma_sweep", "metrics")


# the variant files live below configs/: name the metadata and logging files explicitly
_META = ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]


class Run:
    """One cell of the matrix."""

    def __init__(
        self,
        data: str,
        arch: str,
        loss: str,
        seed: int,
        out: Path,
        name: str | None = None,
        overrides: dict | None = None,
        overlays: Sequence[str] = (),
    ) -> None:
        self.data, self.arch, self.loss, self.seed = data, arch, loss, int(seed)
        self.name = name or loss  # row name in the tables (e.g. ours_gamma0.25, oracle)
        self.dir = out / data / arch / self.name / f"seed{self.seed}"
        self.overrides = dict(overrides or {})
        self.overlays = tuple(overlays)  # loss variant files laid over the loss (e.g. the oracle)

    @property
    def summary(self) -> Path:
        return self.dir / "eval" / "summary.json"

    @property
    def metrics_csv(self) -> Path:
        return self.dir / "eval" / "metrics.csv"

    def state(self) -> str:
        """'done' (evaluated) | 'trained' (final checkpoint, not evaluated) | 'partial' (epoch checkpoints) | 'new'."""
        if self.summary.is_file() and self.metrics_csv.is_file():
            return "done"
        ckpt = self.dir / "checkpoints"
        if (ckpt / "checkpoint_final.pt").is_file() and (self.dir / "model.pt").is_file():
            return "trained"
        if ckpt.is_dir() and any(ckpt.glob("checkpoint_epoch=*.pt")):
            return "partial"
        return "new"

    def commands(self, common: dict, python: str = sys.executable, resume: bool = False) -> dict[str, list[str]]:
        base = dict(common, **self.overrides)
        train = [
            python,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            str(config_files(self.data, self.arch, self.loss, overlays=self.overlays)),
            "--bundle_root",
            str(ROOT),
            "--output_dir",
            str(self.dir),
            "--seed",
            str(self.seed),
        ] + _META
        # evaluation-only options (e.g. --n_panels) go to the evaluation alone: training refuses an id it lacks
        train_ids = config_ids(config_files(self.data, self.arch, self.loss, overlays=self.overlays))
        train += _overrides({k: v for k, v in base.items() if str(k).split("#")[0] in train_ids or k in RUN_ARGS})
        if resume:
            train += ["--resume", "true"]
        evaluate = [
            python,
            "-m",
            "monai.bundle",
            "run",
            "evaluating",
            "--config_file",
            str(config_files(self.data, self.arch, self.loss, True, self.overlays)),
            "--bundle_root",
            str(ROOT),
            "--output_dir",
            str(self.dir),
            "--seed",
            str(self.seed),
            "--eval_name",
            f"{self.arch}/{self.name}/seed{self.seed}",
        ] + _META
        evaluate += _overrides({k: v for k, v in base.items() if k not in ("max_epochs", "epoch_length")})
        return {"train": train, "evaluate": evaluate}


def _run(cmd: list[str], log: Path, timeout: float | None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[experiment] timed out after {timeout} s\n")
            return 124


def _read_phantom_section(data: str) -> dict | None:
    import yaml

    with open(_variant("data", data)) as f:
        content = yaml.safe_load(f) or {}
    if "phantom" not in content:  # the default data of train.yaml
        with open(CONFIGS / "train.yaml") as f:
            content = dict(yaml.safe_load(f), **content)
    ph = content.get("phantom")
    return dict(ph) if isinstance(ph, dict) else None


def prepare_toy_data(data: str, out: Path, n_train=None, n_val=None, n_test=None, size=None) -> tuple[Path, dict]:
    """Write a (small) phantom once under ``out/data/`` and return its folder and the overrides that point to it."""
    phantom = _read_phantom_section(data)
    if phantom is None:
        raise ValueError(
            f"data variant {data!r} is not a phantom: --n_train/--n_val/--n_test/--size apply only to "
            "the built-in phantom."
        )
    for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v is not None:
            phantom[k] = int(v)
    tag = "_".join(f"{k}{phantom[k]}" for k in ("n_train", "n_val", "n_test"))
    if size is not None:
        tag += f"_s{size}"
    folder = out / "data" / f"{data}_{tag}"
    from scripts.data.phantom import spatial_size, write_dataset

    shape = spatial_size(phantom["kind"], size)
    if not (folder / "datalist.json").is_file():
        write_dataset(str(folder), **{k: v for k, v in phantom.items() if k != "size"}, size=size, progress=False)
    return folder, {"dataset_dir": str(folder), "spatial_size": list(shape)}


def build_runs(
    data: str,
    archs: Sequence[str],
    losses: Sequence[str],
    seeds: int,
    out: Path,
    sweep_names: Sequence[tuple[str, float]] = (),
    oracle: bool = False,
) -> tuple[list[Run], list[str], list[str]]:
    """``(runs, skipped combinations, table rows)`` of the matrix; with ``oracle`` each loss variant with
    :func:`has_oracle` is followed by its oracle row (the variant with the oracle overlay)."""
    cells: dict[str, tuple[str, tuple[str, ...]]] = {}  # row name -> (loss variant, overlays)
    for lo in losses:
        cells.setdefault(lo, (lo, ()))
        if oracle and has_oracle(lo):
            cells.setdefault(oracle_name(lo), (lo, (ORACLE_OVERLAY,)))  # = the stand-alone oracle*.yaml if any
    runs: list[Run] = []
    skipped: list[str] = []
    for a in archs:
        for name, (lo, overlays) in cells.items():
            if lo in VOXELMORPH_ONLY and a != "voxelmorph":
                skipped.append(f"{a} x {lo}: the displacement-uncertainty head is built on VoxelMorph")
                continue
            runs += [Run(data, a, lo, k, out, name=name, overlays=overlays) for k in range(seeds)]
        for name, g in sweep_names:
            runs += [Run(data, a, OURS, k, out, name=name, overrides={"gamma": g}) for k in range(seeds)]
    rows = list(cells)
    return runs, skipped, rows


# set by the experiment for every run (Run.commands): never an override
RESERVED = ("config_file", "bundle_root", "output_dir", "seed", "meta_file", "logging_file", "eval_name")
RUN_ARGS = ("tracking", "args_file")  # options of `monai.bundle run` itself, not config ids


def config_ids(files: Sequence[str]) -> set[str]:
    """The top-level ids defined in the config ``files``."""
    import yaml

    ids: set[str] = set()
    for f in files:
        with open(f) as fh:
            ids |= set(yaml.safe_load(fh) or {})
    return ids


def check_overrides(overrides: dict, runs: Sequence[Run]) -> None:
    """Refuse an override that no run's config defines (a typo would otherwise train with the default) or that the
    experiment sets itself. ``a#b#c`` overrides are checked by their first part ``a``."""
    if not overrides:
        return
    reserved = sorted(k for k in overrides if k in RESERVED)
    if reserved:
        raise ValueError(f"--{', --'.join(reserved)}: set by the experiment for every run, not an override.")
    files = {f for r in runs for f in config_files(r.data, r.arch, r.loss, True, r.overlays)}
    ids = config_ids(sorted(files))
    unknown = sorted(k for k in overrides if str(k).split("#")[0] not in ids and k not in RUN_ARGS)
    if unknown:
        import difflib

        hints = {k: difflib.get_close_matches(str(k).split("#")[0], ids, n=3) for k in unknown}
        raise ValueError(
            "unknown option(s) "
            + ", ".join(f"--{k}" + (f" (did you mean {', '.join(h)}?)" if h else "") for k, h in hints.items())
            + ": neither an option of `bundle experiment` (--help) nor an id of the runs' configs "
            f"({', '.join(Path(f).name for f in sorted(files))})."
        )


def experiment(
    *rest,
    data: str = "phantom_echo",
    arch=("voxelmorph",),
    loss="all",
    seeds: int = 1,
    max_epochs: int | None = None,
    epoch_length: int | None = None,
    out: str = "runs",
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    size: int | None = None,
    gamma_sweep=None,
    metrics=DEFAULT_METRICS,
    key: str = "dice",
    timeout: float | None = None,
    dry_run: bool = False,
    oracle: bool = False,
    allow_expressions: bool = False,
    **overrides,
) -> str:
    """Train and evaluate every (architecture, loss variant, seed) and write ``<out>/report.md``.

    Args:
        data: a data variant (configs/variants/data/<data>.yaml): phantom_echo, phantom_mri, phantom_echo3d, acdc,
            camus, pairs.
        arch: architecture variants (configs/variants/arch): voxelmorph, transmorph.
        loss: 'all' (Table 1: mse ncc mi nll beta_nll adareg adaframe ours), 'supp' (ours_dispunc vxm_diff,
            VoxelMorph only), 'everything', or names (configs/variants/loss/<name>.yaml).
        seeds: seeds 0..seeds-1 for every combination (the data are the same for all).
        max_epochs, epoch_length: passed to every training run (default: the config's).
        out: output folder; runs go to <out>/<data>/<arch>/<loss>/seed<k>.
        n_train, n_val, n_test, size: a smaller phantom (written once under <out>/data/) instead of the
            config's data set; size also sets the network input size.
        gamma_sweep: γ values of Eq. 4 for Table 4 (extra 'ours' runs named ours_gamma<γ>).
        metrics: columns of the tables (evaluation metric names); key: the metric of Table 2 and the ranking.
        timeout: seconds per subprocess (None: no limit).
        dry_run: print the commands and write nothing.
        oracle: also run the oracle of every collaborative loss variant (row ``oracle`` for ours, ``oracle_<form>``
            for ours_<form>): its weight form from the true ``residual_std`` (needs a phantom version 2 datalist).
        overrides: any other ``--id value`` is passed to every run as a bundle override (e.g. --num_workers 0); the
            id (or its first part before ``#``) must be defined in the runs' config files, else nothing starts.
            A value starting with ``$`` (Python) or ``%`` (another file) is refused unless ``allow_expressions``.
        allow_expressions: true: forward ``$`` / ``%`` override values to monai.bundle (they run as Python there).
    """
    from tqdm.auto import tqdm

    if any(h in overrides for h in HELP_FLAGS):  # python-fire hands `--help` / `-h` to **overrides: help, no run
        print_help(experiment)
        return ""
    dry_run, oracle = _flag(dry_run), _flag(oracle)  # `--dry_run false` arrives as the string 'false'
    check_override_values(overrides, allow_expressions)  # before anything is written
    if rest:  # `--arch a b --gamma_sweep 0 0.5`: python-fire splits multi-value flags, regroup them from argv
        multi = multi_value_flags(sys.argv, rest, MULTI_VALUE)
        arch = multi.get("arch", arch)
        loss = multi.get("loss", loss)
        gamma_sweep = multi.get("gamma_sweep", gamma_sweep)
        metrics = multi.get("metrics", metrics)
    archs = _as_list(arch) or ["voxelmorph"]
    for a in archs:
        _variant("arch", a)
    _variant("data", data)
    losses = resolve_losses(loss)
    metrics = _as_list(metrics) or list(DEFAULT_METRICS)
    seeds = int(seeds)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    sweep = [float(g) for g in _as_list(gamma_sweep)]
    out_p = Path(out).resolve()

    common: dict = {"max_epochs": max_epochs, "epoch_length": epoch_length}
    common.update(overrides)
    if any(v is not None for v in (n_train, n_val, n_test, size)):
        if dry_run:
            common.update(dataset_dir=str(out_p / "data" / f"{data}_toy"))
        else:
            _, data_over = prepare_toy_data(data, out_p, n_train, n_val, n_test, size)
            common.update(data_over)

    sweep_names = [(f"ours_gamma{g:g}", g) for g in sweep]
    runs, skipped, rows = build_runs(data, archs, losses, seeds, out_p, sweep_names, oracle)
    check_overrides(overrides, runs)

    if dry_run:
        for r in runs:
            st = r.state()
            for what, cmd in r.commands(common, resume=st == "partial").items():
                print(f"[{st}] {what}: {' '.join(cmd)}")
        return ""

    failed: list[tuple[Run, str]] = []
    t0 = time.time()
    bar = tqdm(runs, desc="experiment", unit="run")
    for r in bar:
        bar.set_postfix_str(f"{r.arch}/{r.name}/seed{r.seed}")
        st = r.state()
        if st == "done":
            continue
        log = r.dir / "experiment.log"
        cmds = r.commands(common, resume=st == "partial")
        if st != "trained":
            rc = _run(cmds["train"], log, timeout)
            if rc != 0:
                failed.append((r, f"training exited with {rc}"))
                continue
        rc = _run(cmds["evaluate"], log, timeout)
        if rc != 0 or not r.summary.is_file():
            failed.append((r, f"evaluation exited with {rc}"))
    bar.close()

    settings = {
        "max_epochs": max_epochs,
        "epoch_length": epoch_length,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "size": size,
        **{k: v for k, v in overrides.items()},
    }
    report = write_report(runs, out_p, data, archs, rows, sweep_names, metrics, key, seeds, failed, skipped, settings)
    status = {
        "report": str(report),
        "seconds": round(time.time() - t0, 1),
        "runs": [{"dir": str(r.dir), "state": r.state()} for r in runs],
        "failed": [{"dir": str(r.dir), "why": w} for r, w in failed],
        "skipped": skipped,
    }
    (out_p / "experiment.json").write_text(json.dumps(status, indent=2))
    if failed:
        print(
            f"{len(failed)} run(s) failed, see {out_p / 'experiment.json'} and the runs' experiment.log",
            file=sys.stderr,
        )
    print(report.read_text())
    return str(report) if not failed else sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    import fire

    os.chdir(ROOT)
    fire.Fire(experiment)
