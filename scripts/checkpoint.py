"""Checkpoints that survive a kill, and a resume that continues a run exactly where it stopped.

- :class:`CheckpointSaver`: MONAI's saver whose files (the per-epoch ``checkpoint_epoch=N.pt``, the final checkpoint
  and the best-metric ``model.pt`` / ``variance.pt``) are written to a temporary file in the same folder, flushed to
  disk and renamed over the target (:class:`AtomicDiskSaver`): a kill at any moment leaves the previous file or the
  new one, never a 0-byte or half file. It also keeps its key-metric tracking list in the training checkpoints
  (:class:`ValidationState`) and re-applies ``n_saved`` to the files already on disk after a resume.
- :class:`RNGState`: an Ignite handler whose ``state_dict`` holds the random states (torch CPU/CUDA, numpy, python)
  and the position in the training data order (the random state the current DataLoader iterator was drawn with and
  how many batches it has given), so that the resumed run draws the same batches as the uninterrupted one.
- :class:`ValidationState`: the evaluator's ``best_metric`` / ``best_metric_epoch`` and the key-metric savers'
  tracking lists, so a resumed run never replaces ``model.pt`` by a worse epoch.
- :class:`ResumeFromLatest`: loads the newest *intact* ``checkpoint_epoch=N.pt`` (``torch.load(weights_only=True)``
  succeeds and holds the expected keys), logging each newer file it skipped and why.
- :func:`read_checkpoint` / :func:`load_weights`: every weights read, with errors that name the file and say whether
  it is missing, empty, truncated or not a weights-only file.

The behaviour and the commands are documented in docs/training.md.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver as _MonaiCheckpointSaver

from scripts.utils import as_flag

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicDiskSaver",
    "CheckpointSaver",
    "CorruptCheckpointError",
    "RNGState",
    "ResumeFromLatest",
    "ValidationState",
    "checkpoint_dict",
    "checkpoint_problem",
    "load_weights",
    "newest_intact_checkpoint",
    "read_checkpoint",
]

_EPOCH = re.compile(r"_epoch=(\d+)\.pt$")
_TMP_SUFFIX = ".tmp"


def _unwrap(net: torch.nn.Module | None) -> torch.nn.Module | None:
    return getattr(net, "module", net)


# ------------------------------------------------------------------------------------------------------ reading
class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read: empty, truncated, or not a weights-only file."""


def read_checkpoint(path: str | os.PathLike, map_location=None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        FileNotFoundError: ``path`` is not a file.
        CorruptCheckpointError: the file is empty (0 bytes), truncated / damaged (a save that was interrupted, a
            partial copy), a TorchScript archive, or holds arbitrary Python objects that a weights-only load refuses
            to unpickle.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p}: a folder, not a checkpoint file; give the .pt file (e.g. {p / 'model.pt'}).")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    size = p.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(
            f"{p}: the checkpoint is empty (0 bytes): its save was interrupted or the copy failed. Use another "
            "checkpoint (a training run keeps the last n_saved in its checkpoints/ folder) or retrain."
        )
    if _is_torchscript(p):
        raise CorruptCheckpointError(
            f"{p}: a TorchScript archive (torch.jit.save, e.g. the exported models/model.ts), not a state dict: the "
            "bundle loads weights saved as torch.save(network.state_dict(), ...) (models/model.pt, a run's model.pt "
            "/ variance.pt or checkpoint_final.pt). Give that file; a TorchScript archive is run with torch.jit.load."
        )
    try:
        return torch.load(p, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (re-raised with the file named)
        text = str(e).strip()
        msg = text.splitlines()[0][:200] if text else type(e).__name__
        if "weights only load failed" in text.lower() and "global" in text.lower():
            msg = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), msg)[:200]
            raise CorruptCheckpointError(
                f"{p}: not a weights-only checkpoint: it holds Python objects that torch.load(weights_only=True) "
                f"refuses to unpickle (for safety). Save a state dict instead. ({msg})"
            ) from e
        raise CorruptCheckpointError(
            f"{p}: truncated or corrupt checkpoint ({size} bytes; {type(e).__name__}: {msg}). Its save was probably "
            "interrupted or the file was copied partially: use another checkpoint or retrain."
        ) from e


def _is_torchscript(p: Path) -> bool:
    """A zip archive with TorchScript's ``<name>/constants.pkl`` or ``<name>/code/`` entries (torch.jit.save)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


def checkpoint_problem(obj: Any, keys: Iterable[str] = ()) -> str | None:
    """Why a loaded training checkpoint cannot be resumed from (``None`` if it can): not a mapping, or a missing /
    non-state-dict entry among ``keys``."""
    if not isinstance(obj, Mapping):
        return f"expected a dict of state dicts, got {type(obj).__name__}"
    missing = [k for k in keys if k not in obj]
    if missing:
        return f"missing entries {missing} (has {sorted(obj)})"
    bad = [k for k in keys if not isinstance(obj[k], Mapping)]
    if bad:
        return f"entries {bad} are not state dicts"
    return None


def _epoch_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``*_epoch=N.pt`` files of ``ckpt_dir``, newest first."""
    found = []
    for p in Path(ckpt_dir).glob("*.pt"):
        m = _EPOCH.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda t: t[0], reverse=True)


def newest_intact_checkpoint(
    ckpt_dir: str | os.PathLike, keys: Iterable[str] = (), map_location=None
) -> tuple[Path | None, Any, list[tuple[Path, str]]]:
    """The newest ``*_epoch=N.pt`` of ``ckpt_dir`` that loads with ``weights_only=True`` and holds ``keys``.

    Returns ``(path, loaded checkpoint, [(skipped newer path, reason), ...])``; ``(None, None, skipped)`` when no
    file is intact. Each skipped file is logged as a warning with the reason.
    """
    keys = tuple(keys)
    skipped: list[tuple[Path, str]] = []
    for _, p in _epoch_checkpoints(ckpt_dir):
        try:
            obj = read_checkpoint(p, map_location)
        except (CorruptCheckpointError, OSError) as e:
            reason = str(e)
        else:
            reason = checkpoint_problem(obj, keys)
            if reason is None:
                return p, obj, skipped
            reason = f"{p}: {reason}"
        logger.warning("resume: skipping %s", reason)
        skipped.append((p, reason))
    return None, None, skipped


# ------------------------------------------------------------------------------------------------------ writing
class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes ``.<name>.XXXX.tmp`` in the target folder, ``fsync``s it and renames it over
    the target (``os.replace``, atomic on POSIX and Windows), with the permissions of a normally created file.

    ``filename``: a fixed file name that replaces the one Ignite computes (``model.pt``, ``checkpoint_final.pt``);
    for such a file :meth:`remove` does nothing, because Ignite removes the old file *before* writing the new one
    and the rename already replaces it: the previous best model exists until the new one is complete.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, **kwargs) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=self.dirname)
        try:
            with os.fdopen(fd, "wb") as f:
                func(checkpoint, f, **self.kwargs)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise OSError(
                    e.errno, f"cannot write {path}: {e.strerror or e} (the previous file, if any, is kept)"
                ) from e
            raise
        _fsync_dir(self.dirname)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


def _fsync_dir(dirname: Path) -> None:
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(dirname: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.pt.XXXX.tmp`` files an :class:`AtomicDiskSaver` leaves when killed mid-save."""
    stale = sorted(Path(dirname).glob(f".*.pt.*{_TMP_SUFFIX}")) if Path(dirname).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
        logger.warning("removed %s: the temporary file of a checkpoint save that was interrupted", p)
    return stale


class CheckpointSaver(_MonaiCheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) with atomic writes (:class:`AtomicDiskSaver`) for the
    interval, final and key-metric files, and the state needed to resume it:

    - ``state_dict`` / ``load_state_dict``: the key-metric tracking list (score and file of the best so far), kept
      in the training checkpoints by :class:`ValidationState`;
    - :meth:`resume_files`: after a resume, the files already on disk join the keep-last-``n_saved`` list (older
      ones are removed now), so ``n_saved`` holds across resumes;
    - ``attach`` removes the temporary files of an interrupted save.

    ``None`` entries of ``save_dict`` (no variance network / optimizer, e.g. ``mode: vanilla``) are skipped; a saver
    left with nothing to save attaches nothing (``variance.pt`` is then simply not written) and has no key-metric
    state, so one config serves every variant.
    """

    def __init__(self, save_dir: str, save_dict: Mapping | None, **kwargs) -> None:
        save_dict = {k: v for k, v in (save_dict or {}).items() if v is not None}
        self.enabled = bool(save_dict)
        if not self.enabled:
            self.save_dir, self.save_dict, self.n_saved = save_dir, {}, kwargs.get("n_saved")
            self.epoch_level = kwargs.get("epoch_level", True)
            self._final_checkpoint = self._key_metric_checkpoint = self._interval_checkpoint = None
            logger.debug("CheckpointSaver(%s, %s): nothing to save, not attached", save_dir, kwargs)
            return
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attr, filename in fixed.items():
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(self.save_dir, filename)
        self.n_saved = kwargs.get("n_saved")

    @property
    def key_metric_filename(self) -> str | None:
        ckpt = self._key_metric_checkpoint
        return None if ckpt is None else ckpt.save_handler.filename

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if idist.get_rank() == 0:
            remove_stale_temporaries(self.save_dir)
        super().attach(engine)

    def state_dict(self) -> dict:
        """The key-metric tracking list: ``{"_saved": [(score, filename), ...]}`` (empty without a key metric)."""
        if self._key_metric_checkpoint is None:
            return {"_saved": []}
        return {"_saved": [(float(p), str(f)) for p, f in self._key_metric_checkpoint._saved]}

    def load_state_dict(self, state_dict: Mapping) -> None:
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict({"_saved": [tuple(x) for x in state_dict["_saved"]]})

    def resume_files(self, step: int) -> None:
        """Make the interval files on disk with a step (epoch or iteration) <= ``step`` the keep-last-``n_saved``
        list of a resumed run, removing those beyond ``n_saved``; newer files (e.g. a corrupt one that resume
        skipped) are left to be replaced when their step is saved again."""
        ckpt = self._interval_checkpoint
        if ckpt is None:
            return
        pattern = re.compile(rf"_{re.escape(ckpt.score_name)}=(\d+)\.pt$")
        prefix = ckpt.filename_prefix
        found = []
        for p in Path(self.save_dir).glob("*.pt"):
            m = pattern.search(p.name)
            if m and int(m.group(1)) <= step and (not prefix or p.name.startswith(prefix + "_")):
                found.append((int(m.group(1)), p.name))
        found.sort()
        n_old = 0 if self.n_saved is None else max(0, len(found) - self.n_saved)
        old, keep = found[:n_old], found[n_old:]
        for _, name in old:
            ckpt.save_handler.remove(name)
            logger.info("removed %s (keep the last %s checkpoints across resumes)", name, self.n_saved)
        ckpt._saved = [Checkpoint.Item(s, name) for s, name in keep]


# ------------------------------------------------------------------------------------------- state in checkpoints
def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(s: Mapping) -> None:
    keys = s["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))


def _python_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _set_python_state(s: Mapping) -> None:
    random.setstate((int(s["version"]), tuple(int(x) for x in s["state"].tolist()), s["gauss_next"]))


def _data_state(loader) -> dict:
    """What decides the order of a DataLoader's next iterator: the torch global RNG (base seed, and the permutation
    of a ``RandomSampler`` without generator), the loader's / sampler's own generators, a ``DistributedSampler``'s
    epoch."""
    sampler = getattr(loader, "sampler", None)
    gen_l, gen_s = getattr(loader, "generator", None), getattr(sampler, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "loader_generator": gen_l.get_state() if isinstance(gen_l, torch.Generator) else None,
        "sampler_generator": gen_s.get_state() if isinstance(gen_s, torch.Generator) else None,
        "sampler_epoch": getattr(sampler, "epoch", None) if isinstance(getattr(sampler, "epoch", None), int) else None,
    }


def _set_data_state(loader, s: Mapping, sampler_epoch: bool = True) -> None:
    torch.set_rng_state(s["torch"].cpu())
    sampler = getattr(loader, "sampler", None)
    if s.get("loader_generator") is not None and isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.set_state(s["loader_generator"].cpu())
    if s.get("sampler_generator") is not None and isinstance(getattr(sampler, "generator", None), torch.Generator):
        sampler.generator.set_state(s["sampler_generator"].cpu())
    if sampler_epoch and s.get("sampler_epoch") is not None and hasattr(sampler, "epoch"):
        sampler.epoch = int(s["sampler_epoch"])


class RNGState:
    """Ignite handler (attach it to the trainer, e.g. in its ``train_handlers``) and checkpoint entry: the random
    states of the process and the training data order, for an exact resume.

    ``state_dict()`` holds torch's CPU (and CUDA) generators, numpy's and python's global states, the DataLoader's
    and sampler's generators, and, when the checkpoint falls inside a pass over the data (``epoch_length`` shorter
    than the loader: Ignite keeps one iterator across epochs), the state that iterator was drawn with and how many
    batches it gave. ``load_state_dict`` restores the random states; at the first ``EPOCH_STARTED`` of the resumed
    run it rebuilds that iterator and skips the batches already used, so the batches that follow are the ones the
    uninterrupted run had. Random transforms run in the main process (``num_workers=0``) keep their own state in
    the dataset and are not covered.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self._iter_state: dict | None = None  # the data state the current iterator was created with
        self._iter_start = 0  # engine iteration at its creation
        self._pending: Mapping | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self._new_iterator)

    # ignite creates the data iterator after EPOCH_STARTED when it has none, and after DATALOADER_STOP_ITERATION
    def _new_iterator(self, engine: Engine) -> None:
        self._iter_state = _data_state(engine.state.dataloader)
        self._iter_start = engine.state.iteration

    def _epoch_started(self, engine: Engine) -> None:
        if self._pending is not None:
            self._restore_order(engine, self._pending)
            self._pending = None
        elif engine._dataloader_iter is None:
            self._new_iterator(engine)

    def _restore_order(self, engine: Engine, state: Mapping) -> None:
        it = state.get("data_iterator")
        if it is not None and engine._dataloader_iter is None:
            _set_data_state(engine.state.dataloader, it["state"])
            engine._setup_engine()  # the iterator the interrupted run was in (ignite creates it the same way)
            for _ in range(int(it["consumed"])):
                next(engine._dataloader_iter)
            self._iter_state, self._iter_start = dict(it["state"]), engine.state.iteration - int(it["consumed"])
            logger.info("resume: data order restored (%d batches of the current pass skipped)", int(it["consumed"]))
        self._set_global(state)
        if it is None:
            self._new_iterator(engine)

    def state_dict(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(),
            "python": _python_state(),
            "data_iterator": None,
        }
        engine = self.engine
        if engine is not None and engine.state.dataloader is not None:
            state["data"] = _data_state(engine.state.dataloader)
            consumed = engine.state.iteration - self._iter_start
            try:
                length = len(engine.state.dataloader)
            except TypeError:  # iterable dataset: no position to restore
                length = 0
            if self._iter_state is not None and 0 < consumed < length:
                state["data_iterator"] = {"state": self._iter_state, "consumed": consumed}
        return state

    def _set_global(self, state: Mapping) -> None:
        if self.engine is not None and self.engine.state.dataloader is not None and state.get("data") is not None:
            # not the sampler's epoch: the workflow has already set it for the epoch that starts
            _set_data_state(self.engine.state.dataloader, state["data"], sampler_epoch=False)
        torch.set_rng_state(state["torch"].cpu())
        cuda = list(state.get("cuda") or [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([c.cpu() for c in cuda])
        _set_numpy_state(state["numpy"])
        _set_python_state(state["python"])

    def load_state_dict(self, state_dict: Mapping) -> None:
        self._set_global(state_dict)
        if self.engine is not None:
            self._pending = state_dict


class ValidationState:
    """Checkpoint entry for the best-metric state of validation: the evaluator's ``best_metric`` /
    ``best_metric_epoch`` and the tracking list (best score, file) of each key-metric :class:`CheckpointSaver`
    among ``savers`` (other entries, e.g. ``None`` or logging handlers, are ignored), keyed by its file name."""

    def __init__(self, evaluator: Engine, savers: Iterable = ()) -> None:
        self.evaluator = evaluator
        self.savers = {
            s.key_metric_filename: s
            for s in (savers or [])
            if isinstance(s, CheckpointSaver) and s.key_metric_filename is not None
        }

    def state_dict(self) -> dict:
        st = self.evaluator.state
        return {
            "best_metric": float(getattr(st, "best_metric", -1)),
            "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1)),
            "savers": {name: s.state_dict() for name, s in self.savers.items()},
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        saved = state_dict.get("savers", {})
        for name, saver in self.savers.items():
            if name in saved:
                saver.load_state_dict(saved[name])
            else:
                logger.warning(
                    "resume: no best-metric state for %s in the checkpoint: the next validation writes it", name
                )


# ------------------------------------------------------------------------------------------------------- resume
_OPTIONAL = (RNGState, ValidationState)


class ResumeFromLatest:
    """Ignite handler: when ``enabled``, restore ``load_dict`` (networks, optimizers, trainer, and the
    :class:`RNGState` / :class:`ValidationState` entries) from the newest intact ``checkpoint_epoch=N.pt`` of
    ``ckpt_dir`` when the engine starts. ``learning_rates`` (optimizer entry -> lr): set in the restored optimizers
    (a change allowed by ``--resume_allow_changes``, scripts/run_folder.py).

    Newer files that are empty, truncated or lack an entry are skipped with a warning naming them and the reason;
    no intact file is a ``FileNotFoundError`` at ``attach`` (before any training). ``saver``: the training
    :class:`CheckpointSaver`, whose keep-last-``n_saved`` list is rebuilt from the files on disk. A checkpoint
    without RNG / validation state (older versions) resumes with a warning that the run will not be exact.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping,
        enabled: bool = True,
        map_location=None,
        saver: CheckpointSaver | None = None,
        learning_rates: Mapping[str, float] | None = None,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.learning_rates = dict(learning_rates or {})  # optimizer entry -> lr set after the restore
        self.load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.enabled = as_flag(enabled)
        self.map_location = map_location
        self.saver = saver
        self.path: Path | None = None
        self._checkpoint = None

    @property
    def required_keys(self) -> list[str]:
        return [k for k, v in self.load_dict.items() if not isinstance(v, _OPTIONAL)]

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if idist.get_rank() == 0:
            remove_stale_temporaries(self.ckpt_dir)
        path, ckpt, skipped = newest_intact_checkpoint(self.ckpt_dir, self.required_keys, self.map_location)
        if path is None:
            why = "".join(f"\n  skipped {r}" for _, r in skipped)
            raise FileNotFoundError(
                f"resume=true but {self.ckpt_dir} holds no intact checkpoint_epoch=N.pt: nothing to resume from.{why}"
            )
        self.path, self._checkpoint = path, ckpt
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        ckpt, self._checkpoint = self._checkpoint, None
        if ckpt is None:  # a second run of the same engine: nothing to restore again
            return
        missing = [k for k in self.load_dict if k not in ckpt]
        if missing:
            logger.warning(
                "resume: %s has no %s: the resumed run will not repeat the uninterrupted one exactly",
                self.path,
                missing,
            )
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={k: v for k, v in self.load_dict.items() if k in ckpt}, checkpoint=ckpt)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.path} is at epoch {engine.state.epoch}, beyond max_epochs={prior_max_epochs}: pass a larger "
                "--max_epochs to continue training."
            )
        engine.state.max_epochs = prior_max_epochs
        for key, lr in self.learning_rates.items():  # an allowed change (--resume_allow_changes): from now on
            opt = self.load_dict.get(key)
            for group in getattr(opt, "param_groups", []):
                group["lr"] = float(lr)
            if opt is not None:
                logger.info("resume: %s learning rate set to %g (allowed change)", key, float(lr))
        if self.saver is not None:
            saver_step = engine.state.epoch if self.saver.epoch_level else engine.state.iteration
            self.saver.resume_files(saver_step)
        logger.info("resumed from %s (epoch %d, iteration %d)", self.path, engine.state.epoch, engine.state.iteration)


# ------------------------------------------------------------------------------------------------------ weights
def load_weights(
    network: torch.nn.Module | None,
    path: str | os.PathLike | None,
    key: str = "network",
    map_location=None,
    strict: bool = True,
) -> torch.nn.Module | None:
    """Load weights saved by the bundle into ``network`` with ``torch.load(weights_only=True)``.

    Accepts a bare state dict (``models/model.pt``, a run's ``model.pt`` / ``variance.pt``) or a training checkpoint
    holding ``key`` (``checkpoint_final.pt``: ``network`` / ``variance``); a ``module.`` prefix left by
    DistributedDataParallel is removed. A missing, empty or truncated file, or weights that do not fit the network,
    are clear errors naming the file. ``None`` network -> ``None`` (variants without a variance network).
    """
    if network is None:
        return None
    p = Path(path) if path is not None else None
    if p is None or not p.is_file():
        siblings = sorted(x.name for x in p.parent.glob("*.pt")) if p is not None and p.parent.is_dir() else []
        raise FileNotFoundError(
            f"weights for '{key}' not found: {path}. Train first (python -m monai.bundle run training ...) and copy "
            "model.pt / variance.pt into models/, or pass --ckpt_path / --variance_ckpt_path"
            + (f" (.pt files in {p.parent}: {siblings})." if siblings else ".")
        )
    obj = read_checkpoint(p, map_location)
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a state dict, got {type(obj).__name__}.")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        _unwrap(network).load_state_dict(obj, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(
            f"{p}: the weights do not fit the '{key}' network of the config (check spatial_dims and the "
            f"architecture variant): {e}"
        ) from e
    logger.info("loaded %s weights from %s", key, p)
    return network


def checkpoint_dict(**objects) -> dict:
    """``save_dict`` / ``load_dict`` without the ``None`` entries (e.g. no variance net in vanilla mode); the savers
    and :class:`ResumeFromLatest` skip them too, so a plain dict in a config does the same."""
    return {k: v for k, v in objects.items() if v is not None}
