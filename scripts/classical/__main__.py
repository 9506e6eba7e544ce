"""``python -m scripts.classical --method M --datalist D [--split test] --out DIR [--threads 1] [--limit N]``

Registers every pair of a datalist split with one classical method and writes ``DIR/<id>_ddf.nii.gz`` (for
``python -m monai.bundle run evaluating ... --ddf_dir DIR``), ``DIR/timing.csv`` and ``DIR/classical_<M>.json``.
``--list`` prints the methods, whether their package is installed, and their default parameters.
The older form ``python -m scripts.classical DATALIST OUT_DIR --method demons`` still works.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from collections.abc import Sequence

import numpy as np

from scripts.classical import (
    BUNDLE_METHODS,
    DEFAULTS,
    METHODS,
    available,
    check_params,
    register_datalist,
    tool_version,
)


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param needs KEY=VALUE, got {text!r}.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string, e.g. variant=diffeomorphic


def _list() -> str:
    lines = []
    for m in METHODS:
        state = (
            "bundle (itk)"
            if m in BUNDLE_METHODS
            else (tool_version(m) or 'not installed: pip install -e ".[classical]"')
        )
        lines.append(f"{m:<16} {state}\n    {json.dumps(DEFAULTS[m], default=list)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.classical",
        description="Classical registration of a datalist split (evaluate OUT with configs/evaluate.yaml --ddf_dir).",
    )
    ap.add_argument("legacy", nargs="*", metavar="DATALIST OUT_DIR", help="older positional form of --datalist / --out")
    ap.add_argument("--method", default="bspline", choices=METHODS)
    ap.add_argument("--datalist", help="datalist JSON (or its folder)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", help="output folder (the --ddf_dir of the evaluation)")
    ap.add_argument("--threads", type=int, default=None, help="threads of the tool (1: fair per-pair timing)")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs only (writes OUT/datalist.json of them)")
    ap.add_argument("--resume", action="store_true", help="keep pairs already in OUT (DDF file + timing row)")
    ap.add_argument("--spatial-size", type=int, nargs="+", default=None)
    ap.add_argument("--intensity", default="none", choices=("none", "percentile"))
    ap.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a default parameter (python literal), repeatable, e.g. --param iterations=(50,30)",
    )
    ap.add_argument("--no-warped", action="store_true", help="do not write <id>_warped(_label).nii.gz")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="list the methods and their defaults, then exit")
    args = ap.parse_args(argv)
    if args.list:
        print(_list())
        return
    if args.legacy:
        if len(args.legacy) != 2 or args.datalist or args.out:
            ap.error("give either DATALIST OUT_DIR or --datalist D --out DIR.")
        args.datalist, args.out = args.legacy
    if not args.datalist or not args.out:
        ap.error("--datalist and --out are required.")
    params = dict(args.param)
    if args.threads is not None:
        params["num_threads"] = args.threads
    if args.method not in BUNDLE_METHODS and not available(args.method):
        sys.exit(
            f"classical method {args.method!r} needs an optional package that is not installed: "
            f'pip install -e ".[classical]" (ANTsPy: see docs/classical.md).'
        )
    try:
        check_params(args.method, params)
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO)
    res = register_datalist(
        args.datalist,
        args.split,
        args.out,
        method=args.method,
        spatial_size=args.spatial_size,
        intensity=args.intensity,
        save_warped=not args.no_warped,
        progress=not args.no_progress,
        limit=args.limit,
        resume=args.resume,
        **params,
    )
    wall, cpu = np.median([r["seconds"] for r in res]), np.median([r["cpu_seconds"] for r in res])
    print(f"{args.method}: {len(res)} pairs, median {wall:.3f} s wall / {cpu:.3f} s CPU per pair -> {args.out}")


if __name__ == "__main__":
    main()
