"""``python -m bundle bench``: cost of the collaborative scheme over vanilla VoxelMorph, on the same batch.

Prints milliseconds per training iteration of

- vanilla VoxelMorph (MSE, one network, one optimizer),
- the collaborative trainer as the authors run it (two displacement forwards per iteration),
- the collaborative trainer with ``reuse_warped=true`` (one displacement forward),

their ratios to vanilla, and the inference time per pair (displacement network only, and with the variance
map), for 2D 128² and 3D 64³. The networks, losses and options come from ``configs/train.yaml``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from monai.bundle import ConfigParser

from scripts.trainer import CollaborativeTrainer

CASES = {"2d": (2, [128, 128]), "3d": (3, [64, 64, 64])}


def _parser(config_file: str, spatial_dims: int, spatial_size: Sequence[int], device: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["spatial_dims"] = spatial_dims
    parser["spatial_size"] = list(spatial_size)
    parser["device"] = f"$torch.device('{device}')"
    return parser


def _timeit(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1000.0


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


def bench(
    dims: Sequence[str] = ("2d", "3d"),
    config_file: str = "configs/train.yaml",
    device: str | None = None,
    batch_size: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
) -> None:
    """Time training iterations and inference and print a line per case (2D 128², 3D 64³).

    Args:
        dims: any of "2d" (128²) and "3d" (64³).
        device: "cpu" or "cuda" (default: cuda when available).
        repeats / warmup: timed and untimed iterations per measurement.
        threads: torch CPU threads (default: torch's choice).
    """
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dims = [dims] if isinstance(dims, str) else list(dims)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch size {batch_size}; {repeats} timed iterations after {warmup} warm-up")
    for key in dims:
        if key not in CASES:
            raise ValueError(f"dims must be among {sorted(CASES)}, got {key!r}")
        spatial_dims, size = CASES[key]
        parser = _parser(config_file, spatial_dims, size, str(dev))
        torch.manual_seed(0)
        batch = {"moving": torch.rand(batch_size, 1, *size), "fixed": torch.rand(batch_size, 1, *size)}
        row = {}
        for label, mode, reuse in (
            ("vanilla", "vanilla", False),
            ("collaborative", "collaborative", False),
            ("collaborative_reuse", "collaborative", True),
        ):
            trainer = _trainer(parser, mode, reuse, dev)
            trainer.state.device, trainer.state.epoch, trainer.state.iteration = dev, 1, 1
            row[label] = _timeit(lambda t=trainer: t._iteration(t, batch), warmup, repeats, dev)
        net = parser.get_parsed_content("network_def", lazy=False).to(dev).eval()
        var = parser.get_parsed_content("variance_def", lazy=False).to(dev).eval()
        warp = parser.get_parsed_content("warp", lazy=False)
        x = torch.cat([batch["moving"], batch["fixed"]], 1).to(dev)

        def infer(with_var: bool):
            with torch.no_grad():
                ddf = net(x)
                if with_var:
                    var(torch.cat([warp(x[:, :1], ddf), x[:, 1:]], 1))

        row["inference"] = _timeit(lambda: infer(False), warmup, repeats, dev) / batch_size
        row["inference_with_variance"] = _timeit(lambda: infer(True), warmup, repeats, dev) / batch_size
        row["ratio"] = row["collaborative"] / row["vanilla"]
        row["ratio_reuse"] = row["collaborative_reuse"] / row["vanilla"]
        print(
            f"{key} {'x'.join(map(str, size))}: train ms/iter vanilla {row['vanilla']:.1f} | collaborative "
            f"{row['collaborative']:.1f} (x{row['ratio']:.2f}) | collaborative reuse_warped "
            f"{row['collaborative_reuse']:.1f} (x{row['ratio_reuse']:.2f}) | inference ms/pair "
            f"{row['inference']:.1f} (with variance map {row['inference_with_variance']:.1f})"
        )

