"""``python -m bundle bench``: what a training iteration and an inference cost, measured fairly on a shared machine.

Cases, all on the same batch and with the networks, losses and options of ``configs/train.yaml``:

- ``vanilla``: VoxelMorph alone (MSE, one network, one optimizer), the bare ``_iteration``;
- ``collaborative``: the collaborative step as the authors run it (two displacement forwards per iteration);
- ``collaborative_reuse``: the same with ``reuse_warped=true`` (one displacement forward);
- ``engine`` (``--engine true``): the real ``train#trainer`` of the config, with its data loader
  (``num_workers``, caching) and its handlers, timed from one completed iteration to the next; validation is
  switched off (it is a per-epoch cost, see docs/speed.md);
- ``inference`` / ``inference_with_variance``: the displacement network alone, and with the variance map.

The cases are **interleaved** (A B C … A B C …, ``--rounds`` times, ``--block`` iterations each), so that a load
change on the machine hits every case alike; the report gives medians and interquartile ranges per iteration, the
ratios collaborative / vanilla for both schedules and engine / bare step (the bare step is ``collaborative`` on the
same batch, i.e. the engine's own mode), the load average before and after, the threads and the device. On CUDA
the same code path times with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from monai.bundle import ConfigParser

from scripts.trainer import CollaborativeTrainer

CASES = {"2d": (2, [128, 128]), "3d": (3, [64, 64, 64])}
TRAIN_CASES = ("vanilla", "collaborative", "collaborative_reuse")


def _parser(
    config_file: str, spatial_dims: int, spatial_size: Sequence[int], device: str, override: dict | None = None
) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    for k, v in (override or {}).items():
        parser[k] = v
    parser["spatial_dims"] = spatial_dims
    parser["spatial_size"] = list(spatial_size)
    parser["device"] = f"$torch.device('{device}')"
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block(fn: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _trainer(parser: ConfigParser, mode: str, reuse: bool, device: torch.device) -> CollaborativeTrainer:
    network = parser.get_parsed_content("network_def", instantiate=True, lazy=False).to(device)
    var = parser.get_parsed_content("variance_def", instantiate=True, lazy=False).to(device)
    vanilla = mode == "vanilla"
    return CollaborativeTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[],
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-4),
        sim_loss=torch.nn.MSELoss() if vanilla else parser.get_parsed_content("sim_loss", lazy=False),
        reg_loss=parser.get_parsed_content("reg_loss", lazy=False),
        lambda_reg=0.01,
        variance_network=None if vanilla else var,
        variance_optimizer=None if vanilla else torch.optim.Adam(var.parameters(), 1e-4),
        variance_loss=parser.get_parsed_content("variance_loss", lazy=False),
        mode=mode,
        reuse_warped=reuse,
    )


class _EngineCase:
    """The config's own ``train#trainer`` on a small phantom, re-run for ``block`` iterations per call; the time of
    an iteration is the gap between two consecutive ``ITERATION_COMPLETED`` events (data, step and handlers)."""

    def __init__(self, parser: ConfigParser, spatial_dims: int, block: int, workdir: str) -> None:
        from ignite.engine import Events

        kind = "echo2d" if spatial_dims == 2 else "echo3d"
        parser["dataset_dir"] = os.path.join(workdir, "data")
        parser["output_dir"] = os.path.join(workdir, "run")
        parser["phantom"] = {
            "kind": kind,
            "n_train": max(block + 1, 4),
            "n_val": 1,
            "n_test": 0,
            "seed": 0,
            "progress": False,
        }
        parser["max_epochs"] = 1
        parser["epoch_length"] = block + 1
        parser["val_interval"] = 10**9  # validation is a per-epoch cost, not an iteration's
        os.makedirs(parser.get_parsed_content("output_dir"), exist_ok=True)
        self.trainer = parser.get_parsed_content("train#trainer")
        self.stamps: list[float] = []
        self.device = self.trainer.state.device
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._stamp)
        self.batch = next(iter(self.trainer.data_loader))

    def _stamp(self, engine) -> None:
        _sync(torch.device(engine.state.device))
        self.stamps.append(time.perf_counter())

    def __call__(self) -> list[float]:
        self.stamps = []
        self.trainer.state.epoch, self.trainer.state.iteration = 0, 0
        self.trainer.run()
        return [(b - a) * 1000.0 for a, b in zip(self.stamps[:-1], self.stamps[1:])]


def _summary(xs: Sequence[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "n": len(xs)}


def bench(**kwargs) -> None:
    """Command line: ``python -m bundle bench [--dims 2d] [--rounds 5] [--block 4] [--engine true] [--quick true]``;
    see :func:`measure` for the arguments."""
    measure(**kwargs)


def measure(
    dims: Sequence[str] = ("2d", "3d"),
    config_file: str = "configs/train.yaml",
    device: str | None = None,
    batch_size: int = 1,
    rounds: int = 5,
    block: int = 4,
    warmup: int = 2,
    threads: int | None = None,
    engine: bool = True,
    quick: bool = False,
    override: dict | None = None,
) -> dict:
    """Time training iterations (interleaved) and inference; print a report per case and return it.

    Args:
        dims: any of "2d" (128²) and "3d" (64³).
        config_file: the training config whose networks, losses, loader and handlers are timed.
        device: "cpu" or "cuda" (default: cuda when available).
        batch_size: batch of the bare steps and of the engine's loader.
        rounds / block: interleaved rounds, timed iterations per case and round.
        warmup: untimed iterations per case before the first round.
        threads: torch CPU threads (default: torch's choice).
        engine: also time the config's real trainer (2D only: the 3D phantom is slow to write).
        quick: 2 rounds of 2 iterations, no warm-up (the smoke test).
        override: config overrides for every case, e.g. ``--override "{'num_workers': 2}"``.
    """
    from monai.utils import str2bool

    engine = str2bool(engine) if isinstance(engine, str) else bool(engine)
    if str2bool(quick) if isinstance(quick, str) else bool(quick):
        rounds, block, warmup = 2, 2, 0
    rounds, block, warmup = int(rounds), int(block), int(warmup)
    if rounds < 1 or block < 1 or warmup < 0:
        raise ValueError(f"rounds and block must be >= 1 and warmup >= 0, got {rounds}, {block}, {warmup}.")
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dims = [dims] if isinstance(dims, str) else list(dims)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load0 = os.getloadavg()
    print(
        f"device: {name}; batch size {batch_size}; {rounds} interleaved rounds x {block} iterations per case "
        f"after {warmup} warm-up; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
    )
    report: dict = {"device": name, "rounds": rounds, "block": block, "load_before": load0}
    with tempfile.TemporaryDirectory() as workdir:
        for key in dims:
            if key not in CASES:
                raise ValueError(f"dims must be among {sorted(CASES)}, got {key!r}")
            report[key] = _bench_dims(
                key, config_file, dev, batch_size, rounds, block, warmup, engine, workdir, dict(override or {})
            )
    report["load_after"] = os.getloadavg()
    print(f"load average after: {report['load_after'][0]:.2f}")
    return report


def _bench_dims(key, config_file, dev, batch_size, rounds, block, warmup, engine, workdir, override) -> dict:
    spatial_dims, size = CASES[key]
    parser = _parser(config_file, spatial_dims, size, str(dev), override)
    torch.manual_seed(0)
    eng = None
    if engine and spatial_dims == 2:
        eparser = _parser(config_file, spatial_dims, size, str(dev), override)
        eparser["batch_size"] = batch_size
        eng = _EngineCase(eparser, spatial_dims, block, os.path.join(workdir, key))
        batch = {k: eng.batch[k] for k in ("moving", "fixed")}
    else:
        batch = {"moving": torch.rand(batch_size, 1, *size), "fixed": torch.rand(batch_size, 1, *size)}
    batch = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in batch.items()}

    fns: dict[str, Callable[[], list[float]]] = {}
    for label, mode, reuse in (
        ("vanilla", "vanilla", False),
        ("collaborative", "collaborative", False),
        ("collaborative_reuse", "collaborative", True),
    ):
        t = _trainer(parser, mode, reuse, dev)
        t.state.device, t.state.epoch, t.state.iteration = dev, 1, 1
        fns[label] = lambda t=t: _block(lambda: t._iteration(t, batch), block, dev)
    if eng is not None:
        fns["engine"] = eng

    net = parser.get_parsed_content("network_def", lazy=False).to(dev).eval()
    var = parser.get_parsed_content("variance_def", lazy=False).to(dev).eval()
    warp = parser.get_parsed_content("warp", lazy=False)
    x = torch.cat([batch["moving"], batch["fixed"]], 1).to(dev)

    def infer(with_var: bool) -> None:
        with torch.no_grad():
            ddf = net(x)
            if with_var:
                var(torch.cat([warp(x[:, :1], ddf), x[:, 1:]], 1))

    fns["inference"] = lambda: [v / batch_size for v in _block(lambda: infer(False), block, dev)]
    fns["inference_with_variance"] = lambda: [v / batch_size for v in _block(lambda: infer(True), block, dev)]

    for fn in fns.values():  # warm-up, untimed
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order: list[str] = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(rounds), desc=f"bench {key}", leave=False):
        for label, fn in fns.items():
            samples[label] += fn()
            order.append(label)
    stats = {k: _summary(v) for k, v in samples.items()}
    ratios = {
        "collaborative/vanilla": stats["collaborative"]["median"] / stats["vanilla"]["median"],
        "collaborative_reuse/vanilla": stats["collaborative_reuse"]["median"] / stats["vanilla"]["median"],
    }
    if "engine" in stats:
        ratios["engine/bare"] = stats["engine"]["median"] / stats["collaborative"]["median"]
    print(f"{key} {'x'.join(map(str, size))}: median ms per iteration (IQR), n samples")
    for label, s in stats.items():
        unit = "ms/pair" if label.startswith("inference") else "ms/iter"
        print(f"  {label:<24} {s['median']:9.1f} {unit} ({s['q1']:.1f}-{s['q3']:.1f}), n={s['n']}")
    print("  ratios: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    return {"stats": stats, "ratios": ratios, "order": order}
