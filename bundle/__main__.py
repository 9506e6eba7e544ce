"""``python -m bundle <command> [args]``: the bundle's command line, built with python-fire.

Each command lives in its own module and is imported only when it is called, so ``python -m bundle phantom``
does not pay for ITK or ONNX.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS = {
    "phantom": ("bundle.phantom_cli", "phantom", "write the built-in cardiac phantom data set (and a preview)"),
    "datalist": (
        "bundle.datalist_cli",
        "datalist",
        "build a datalist from ACDC, CAMUS, Sunnybrook, an echo cine or a list of pairs",
    ),
    "bench": ("bundle.bench", "bench", "time vanilla vs collaborative training iterations and inference"),
    "compare": ("bundle.compare", "compare", "paired t-tests and a Markdown table across evaluated runs"),
    "curves": ("bundle.curves", "curves", "learning curves (tables, plateaus, plot) from runs' TensorBoard logs"),
    "experiment": ("bundle.experiment", "experiment", "train and evaluate a matrix of arch x loss x seed"),
    "pack": ("bundle.pack", "pack", "build a versioned bundle archive with checksums"),
    "verify": ("bundle.verify", "verify", "run every check a bundle reviewer runs"),
    "configs_json": ("bundle.configs_json", "configs_json", "write configs/*.json from the YAML configs (--check)"),
    "zoo_ci": ("bundle.zoo_ci", "zoo_ci", "run the MONAI model zoo's ci/verify_bundle.py on the bundle (--zoo PATH)"),
    "sigma_target": (
        "bundle.sigma_target",
        "sigma_target",
        "sigma_hat against residual_std at the true and at the estimated displacement (phantom)",
    ),
    "calibrate": (
        "bundle.calibrate",
        "calibrate",
        "fit the sigma scale on the validation split (variance_scale.json beside the variance weights)",
    ),
    "qc_report": (
        "bundle.calibrate",
        "qc_report",
        "Spearman and worst-10 % AUROC of the qc_* columns against the per-pair error of evaluations",
    ),
    "instance_bench": (
        "bundle.instance_bench",
        "instance_bench",
        "Dice / EPE / time per pair at 0, 10, 50 steps of test-time instance optimisation",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m bundle <command> [--help] [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        sys.exit(f"unknown command {name!r}\n\n{_usage()}")
    module, func, _ = COMMANDS[name]
    import fire

    from scripts.errors import install

    install()  # the bundle's own errors as one line (BUNDLE_DEBUG=1: the traceback)

    command = argv[1:]
    head = command[: command.index("--")] if "--" in command else command
    if "-h" in head or "--help" in head:  # fire's help page, also for a **kwargs command (it would get help=True)
        command = ["--", "--help"]
    fire.Fire(getattr(importlib.import_module(module), func), command=command, name=f"python -m bundle {name}")


if __name__ == "__main__":
    main()
