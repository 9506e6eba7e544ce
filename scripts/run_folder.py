"""Ownership of a training output folder (issue 23): one run per folder, a lock while it writes, resume only the run
that wrote it, with the same settings.

:func:`claim_training_folder` is the first step of ``configs/train.yaml``'s ``run`` / ``training`` list (before any
checkpoint, TensorBoard event file or model is written):

- **lock**: ``OUTPUT/.lock`` (PID, host, start time, command) is created exclusively and removed when the process ends.
  A second training into the folder is refused naming the PID that holds it; the lock of a process that no longer
  exists (``kill -9``, a crash) is taken over with a warning.
- **a new run into a used folder** (``model.pt``, ``variance.pt``, ``run_settings.json`` or checkpoints there) is
  refused, naming the folder, what it holds and the ways out: ``--resume true`` to continue
  that run, ``--overwrite true`` to move its results aside into ``OUTPUT.replaced-YYYYmmdd-HHMMSS`` (a sibling folder;
  nothing is deleted), or another ``--output_dir``.
- **settings**: a fresh run records its settings (network, data, batch size, seed, learning rates, losses, schedule:
  :data:`RECORDED_IDS`) in ``OUTPUT/run_settings.json``. ``--resume true`` compares the current ones with that record
  and refuses a difference, listing each one, unless ``--resume_allow_changes`` names it (e.g.
  ``--resume_allow_changes "['learning_rate']"``): an allowed change is applied from the resumed epoch on (the
  learning rates are set in the restored optimizers) and recorded in the file's ``changes`` list.

The settings are read from the config parser that evaluates the expression (:func:`current_parser`); called from
plain Python (no parser on the stack) only the lock and the folder checks apply.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RunFolderError",
    "LOCK_NAME",
    "SETTINGS_NAME",
    "RECORDED_IDS",
    "claim_training_folder",
    "make_folder",
    "acquire_lock",
    "release_lock",
    "current_parser",
    "allowed_learning_rates",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
SETTINGS_NAME = "run_settings.json"
#: config ids recorded by a fresh run and compared by ``--resume true`` (absent ids are skipped)
RECORDED_IDS = (
    "network_def",
    "variance_def",
    "dataset_dir",
    "phantom",
    "intensity",
    "spatial_dims",
    "spatial_size",
    "batch_size",
    "epoch_length",
    "seed",
    "learning_rate",
    "variance_learning_rate",
    "lr_milestones",
    "lr_decay",
    "gamma",
    "beta",
    "lambda_reg",
    "snr_form",
    "snr_normalization",
    "snr_use_fixed",
    "snr_percentiles",
    "snr_clip",
    "mode",
    "variance_source",
    "variance_every",
    "disp_warmup_epochs",
    "var_warmup_epochs",
    "reuse_warped",
    "couple_variance_grad",
    "sim_loss",
    "reg_loss",
    "variance_loss",
    "warp",
    "amp",
)
#: ids whose change a resume applies without being told (they do not change what is trained)
_NOT_RECORDED_NOTE = "max_epochs, val_interval, num_workers, logging and device may change on a resume"


class RunFolderError(RuntimeError):
    """An output folder that this run may not use (another run's results, a lock, changed settings)."""


# ----------------------------------------------------------------------------------------------------- folders
def make_folder(path: str | os.PathLike, option: str = "--output_dir") -> str:
    """``os.makedirs(path, exist_ok=True)`` with a clear error when ``path`` (or a parent) is a file."""
    p = Path(path)
    for q in [p, *p.parents]:
        if q.exists() and not q.is_dir():
            what = "it" if q == p else f"its parent {q}"
            raise RunFolderError(f"{option} {path}: {what} is a file, not a folder; choose a folder path.")
    try:
        os.makedirs(p, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{option} {path}: cannot create the folder ({e.strerror or e}).") from e
    return str(path)


# -------------------------------------------------------------------------------------------------------- lock
_held: dict[str, dict] = {}  # lock path -> its content, for this process


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    now = _proc_start(pid)
    return not (start and now and now != start)  # the PID was reused by another process


def acquire_lock(folder: str | os.PathLike, what: str = "training") -> Path:
    """Create ``folder/.lock`` exclusively for this process (removed at exit); refuse a live holder, take over a
    stale one with a warning."""
    lock = Path(folder) / LOCK_NAME
    key = str(lock.resolve())
    if key in _held:
        return lock
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _proc_start(os.getpid()),
        "what": what,
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    # the lock appears with its content (a hard link of a complete temporary file): never half-written
    tmp = Path(folder) / f".lock.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        return _take(lock, key, tmp, me, folder)
    finally:
        tmp.unlink(missing_ok=True)


def _take(lock: Path, key: str, tmp: Path, me: dict, folder) -> Path:
    for _ in range(3):
        try:
            os.link(tmp, lock)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
                pid = int(other["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                other, pid = {}, None
            if pid is not None and other.get("host") not in (None, me["host"]):
                raise RunFolderError(
                    f"{folder} is locked by process {pid} on host {other.get('host')} ({lock}); if that run is over, "
                    f"delete {lock} and try again."
                ) from None
            if pid == os.getpid() and other.get("host") == me["host"]:
                pid = None  # this process's own (a folder copied while it held the lock): take it
            elif pid is not None and _alive(pid, other.get("start")):
                raise RunFolderError(
                    f"{folder} is in use: process {pid} ({other.get('what', 'a command')} since "
                    f"{other.get('since', '?')}: {other.get('command', '?')}) holds {lock}. Wait for it to end, or "
                    "choose another --output_dir."
                ) from None
            else:
                logger.warning(
                    "%s: taking over the stale lock %s of %s (no such process any more)",
                    folder,
                    lock,
                    f"process {pid}" if pid is not None else "an unreadable holder",
                )
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        _held[key] = me
        return lock
    raise RunFolderError(f"{folder}: could not take the lock {lock} (another process keeps taking it).")


def release_lock(folder: str | os.PathLike) -> None:
    """Remove ``folder/.lock`` if this process holds it."""
    lock = Path(folder) / LOCK_NAME
    key = str(lock.resolve())
    if _held.pop(key, None) is None:
        return
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release_lock(Path(key).parent)


# ---------------------------------------------------------------------------------------------------- settings
def current_parser():
    """The ``monai.bundle.ConfigParser`` evaluating the calling config expression (``None`` outside one)."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, ConfigParser):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _datalist_digest(dataset_dir: Any) -> str | None:
    if not isinstance(dataset_dir, str):
        return None
    p = Path(dataset_dir)
    p = p if p.suffix == ".json" else p / "datalist.json"
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def current_settings(parser=None, ids: Sequence[str] = RECORDED_IDS) -> dict:
    """The values of ``ids`` in the parser's config: plain values resolved (``@x`` references, expressions), component
    definitions (``network_def``, ``sim_loss`` ...) as written (nothing is instantiated)."""
    parser = parser if parser is not None else current_parser()
    if parser is None:
        return {}
    out: dict[str, Any] = {}
    for i in ids:
        try:
            raw = parser[i]
        except (KeyError, IndexError, ValueError):
            continue
        if isinstance(raw, (dict, list)):
            out[i] = _jsonable(raw)
            continue
        try:
            value = parser.get_parsed_content(i)
        except Exception as e:  # an expression that cannot be evaluated here: keep its text
            logger.debug("run settings: %s not resolved (%s)", i, e)
            value = raw
        if i == "dataset_dir" and isinstance(value, str):
            digest = _datalist_digest(value)
            value = str(Path(value).resolve())
            if digest is not None:
                out["datalist_sha256"] = digest
        out[i] = _jsonable(value)
    return out


def _fmt(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 100 else s[:97] + "..."


def _as_names(v: Any) -> list[str]:
    if v is None or v is False:
        return []
    if isinstance(v, str):
        s = v.strip().strip("[]")
        return [x.strip().strip("'\"") for x in s.split(",") if x.strip().strip("'\"")]
    if isinstance(v, Iterable):
        return [str(x) for x in v]
    raise RunFolderError(f"--resume_allow_changes must be a list of option names, got {v!r}")


def allowed_learning_rates(allow_changes: Any = None, **rates: float) -> dict[str, float]:
    """The learning rates (by checkpoint entry) whose change ``allow_changes`` allows: applied after a resume."""
    names = set(_as_names(allow_changes))
    option = {"optimizer": "learning_rate", "optimizer_variance": "variance_learning_rate"}
    return {k: float(v) for k, v in rates.items() if v is not None and option.get(k, k) in names}


# ------------------------------------------------------------------------------------------------------- claim
def _results(output_dir: Path, ckpt_dir: Path | None) -> list[Path]:
    """A run's results: its weights and checkpoints (a run that failed before its first checkpoint left none: its
    ``run_settings.json`` and logs are replaced by the next run without asking)."""
    found = [output_dir / n for n in ("model.pt", "variance.pt") if (output_dir / n).exists()]
    if ckpt_dir is not None and ckpt_dir.is_dir():
        found += sorted(ckpt_dir.glob("checkpoint*.pt"))
    return found


def _inside(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _move_aside(output_dir: Path, ckpt_dir: Path | None, log_dir: Path | None) -> list[str]:
    """Move the previous run's results into ``OUTPUT.replaced-<timestamp>`` (a checkpoint / log folder outside OUTPUT
    into ``<it>.replaced-<timestamp>``); returns ``src -> dst`` lines."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    def target(p: Path) -> Path:
        t = p.with_name(f"{p.name}.replaced-{stamp}")
        n = 1
        while t.exists():
            n += 1
            t = p.with_name(f"{p.name}.replaced-{stamp}-{n}")
        return t

    backup = target(output_dir)
    moved: list[str] = []
    entries = [output_dir / n for n in ("model.pt", "variance.pt", SETTINGS_NAME, "eval")]
    for d in (ckpt_dir, log_dir):
        if d is not None and Path(d).resolve() != output_dir.resolve():  # a log_dir = output_dir is not moved whole
            entries.append(d)
    for src in entries:
        if not src.exists():
            continue
        if _inside(src, output_dir):
            dst = backup / src.resolve().relative_to(output_dir.resolve())
        else:
            dst = target(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        moved.append(f"{src} -> {dst}")
    return moved


def _record(path: Path, content: Mapping) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def claim_training_folder(
    output_dir: str,
    ckpt_dir: str | None = None,
    log_dir: str | None = None,
    resume: Any = False,
    overwrite: Any = False,
    allow_changes: Any = None,
    settings: Mapping | None = None,
) -> str:
    """Lock ``output_dir`` for this training and check it may be used (see the module docstring); returns it.

    ``settings``: the settings to record / compare (default: :func:`current_settings` of the config being run).
    """
    from scripts.utils import as_flag

    resume, overwrite = as_flag(resume), as_flag(overwrite)
    if resume and overwrite:
        raise RunFolderError("--resume true and --overwrite true contradict each other: choose one.")
    make_folder(output_dir, "--output_dir")
    out = Path(output_dir)
    ck = Path(ckpt_dir) if ckpt_dir else None
    lg = Path(log_dir) if log_dir else None
    acquire_lock(out, "training")
    try:
        now = dict(settings) if settings is not None else current_settings()
        record_path = out / SETTINGS_NAME
        found = _results(out, ck)
        if not resume:
            if found:
                shown = ", ".join(str(p.relative_to(out)) if _inside(p, out) else str(p) for p in found[:5])
                if not overwrite:
                    raise RunFolderError(
                        f"--output_dir {output_dir} already holds another run's results ({shown}"
                        f"{' ...' if len(found) > 5 else ''}). A new training would replace them. Either continue "
                        "that run with --resume true, pass --overwrite true to move its results aside into "
                        f"{out.name}.replaced-<date-time> (nothing is deleted), or choose another --output_dir."
                    )
                moved = _move_aside(out, ck, lg)
                logger.warning(
                    "--overwrite true: the previous run's results were moved aside:\n  %s", "\n  ".join(moved)
                )
            _record(
                record_path,
                {
                    "created": datetime.datetime.now().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv),
                    "settings": now,
                    "changes": [],
                },
            )
            return output_dir
        # --resume true
        if not record_path.is_file():
            logger.warning(
                "--resume true: %s has no %s (a run of an older version): its settings cannot be compared",
                output_dir,
                SETTINGS_NAME,
            )
            return output_dir
        try:
            record = json.loads(record_path.read_text())
            before = dict(record["settings"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunFolderError(
                f"{record_path}: unreadable record of the run's settings ({e}); it is needed to resume safely. "
                "Start a new run (--overwrite true moves this one aside) or restore the file."
            ) from None
        if not now:
            return output_dir
        allowed = set(_as_names(allow_changes))
        # an id the record lacks (a newer version records more; a datalist the run itself wrote after recording)
        # cannot be compared: only ids of the record count
        diffs = [
            (k, before[k], now.get(k, "<absent>"))
            for k in sorted(before)
            if before[k] != now.get(k, "<absent>") and not (k == "datalist_sha256" and k not in now)
        ]
        refused = [
            d for d in diffs if d[0] not in allowed and not (d[0] == "datalist_sha256" and "dataset_dir" in allowed)
        ]
        if refused:
            lines = "\n  ".join(f"{k}: {_fmt(a)} (recorded) -> {_fmt(b)} (now)" for k, a, b in refused)
            names = [k if k != "datalist_sha256" else "dataset_dir" for k, _, _ in refused]
            raise RunFolderError(
                f"--resume true: the settings differ from those of the run that wrote {output_dir} "
                f"(recorded in {record_path}):\n  {lines}\nResume with the recorded settings, start a new run "
                "(another --output_dir, or --overwrite true to move this one aside), or allow the change(s) with "
                f'--resume_allow_changes "{sorted(set(names))!r}" (applied from the resumed epoch on; the run is '
                f"then no longer the uninterrupted one). ({_NOT_RECORDED_NOTE}.)"
            )
        new_ids = {k: v for k, v in now.items() if k not in before}
        if new_ids and not diffs:  # e.g. the digest of the phantom the run wrote after recording: compared next time
            record["settings"] = {**before, **new_ids}
            _record(record_path, record)
        if diffs:
            logger.warning(
                "--resume true with allowed change(s): %s",
                "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs),
            )
            record.setdefault("changes", []).append(
                {
                    "when": datetime.datetime.now().isoformat(timespec="seconds"),
                    "changed": {k: {"from": a, "to": b} for k, a, b in diffs},
                }
            )
            record["settings"] = now
            _record(record_path, record)
        return output_dir
    except BaseException as e:
        release_lock(out)
        if isinstance(e, RunFolderError):
            logger.error("%s", e)  # MONAI wraps the exception of a config expression: say it plainly first
        raise
