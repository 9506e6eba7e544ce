"""``python -m bundle datalist``: preprocess ACDC, CAMUS or a list of paired images into a contract datalist.

Examples::

    python -m bundle datalist --dataset acdc  --root /data/ACDC/database --out data/acdc
    python -m bundle datalist --dataset camus --root /data/CAMUS --out data/camus --views 4CH
    python -m bundle datalist --dataset pairs --root pairs.csv --out data/pairs --split test
    python -m bundle datalist --dataset sunnybrook --root ../shared/realdata/sunnybrook --out data/sunnybrook

then train on it with the matching data variant::

    python -m monai.bundle run training \\
        --config_file "['configs/train.yaml','configs/variants/data/acdc.yaml']" --dataset_dir data/acdc
"""

from __future__ import annotations

import inspect
import logging
import warnings


def datalist(
    dataset: str, root: str, out: str, seed: int = 0, overwrite: bool = False, verbose: bool = True, **options
) -> str:
    """Build ``OUT/datalist.json`` (+ preprocessed NIfTI files) from real data; prints the datalist path.

    Args:
        dataset: ``acdc``, ``camus``, ``sunnybrook`` or ``pairs``.
        root: ACDC folder (with ``training/`` and ``testing/``), CAMUS folder (patientNNNN folders, or one level
            above them), or for ``pairs`` the CSV / JSON list of pairs.
        out: output folder (created; written atomically). Never an input, nor a folder holding one, nor a folder inside
            the ACDC / CAMUS root.
        seed: seed of the patient shuffle for the splits (same seed -> same datalist; acdc, camus, pairs).
        overwrite: replace a non-empty ``out`` that an earlier build wrote (its ``.bundle_written.json`` marker lists
            every file in it); a folder holding anything else is refused and nothing is deleted.
        verbose: log progress and warnings.
        **options: builder options (see docs/data.md):
            acdc:  --split_file F.json  --val_fraction 0.2  --crop_size "[128,128]"  --percentiles "[1,99]"
                   --labels True  --require_myo both|either
            camus: --split_file F.json  --fractions "[0.6,0.2,0.2]"  --views 2CH,4CH  --spatial_size "[128,128]"
                   --percentiles "[0,100]"  --labels True  --keep_atrium True
            sunnybrook: --link F.csv  --test_patients "['SCD0000301']"  --crop_size "[128,128]"
                   --percentiles "[1,99]"  --folds True
            pairs: --split "[0.6,0.2,0.2]" | test | training | validation  --labels None|True|False  --copy False
                   --percentiles "[0.5,99.5]"  --spatial_dims 2|3  --label_values "[0,1,2,3]"
    """
    from scripts.data import DataError
    from scripts.data.builders import BUILDERS, DataWarning, build_datalist

    if verbose:  # the builders log their warnings too: show them once
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        warnings.filterwarnings("ignore", category=DataWarning)
    key = str(dataset).lower()
    if key not in BUILDERS:
        raise SystemExit(f"--dataset must be one of {sorted(BUILDERS)}, got {dataset!r}")
    params = set(inspect.signature(BUILDERS[key]).parameters)
    accepted = params - {"root", "out", "pairs"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise SystemExit(f"unknown option(s) for --dataset {key}: {unknown}; accepted: {sorted(accepted)}")
    try:
        if "seed" in params:  # builders that shuffle (Sunnybrook and echo_cine split by patient / beat: no seed)
            options["seed"] = seed
        path = build_datalist(key, root, out, overwrite=overwrite, **options)
    except (DataError, ValueError) as e:  # bad data or a bad option value: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    return str(path)  # fire prints it
