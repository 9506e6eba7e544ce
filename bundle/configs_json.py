"""``python -m bundle configs_json``: write ``configs/<name>.json`` from each ``configs/<name>.yaml``.

The YAML files are the source of truth (they carry the comments); the JSON files exist because parts of MONAI read
JSON only: ``monai.bundle.load(..., workflow_type="train" | "inference")`` looks for ``configs/<workflow_type>.json``
to build ``network_def``. The JSON holds the same content, key for key, with no comments. Edit the YAML, then run
``python -m bundle configs_json``; ``python -m bundle configs_json --check`` (and tests/test_zoo.py) fails when a
committed JSON file differs from what the YAML gives.

Only the top-level ``configs/*.yaml`` are converted (``configs/variants/**`` are overrides read by
``python -m bundle experiment`` and ``monai.bundle run`` in YAML).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m bundle configs_json"


def to_json_text(yaml_file: str | Path) -> str:
    """The JSON text of one YAML config (4-space indent, key order of the YAML, UTF-8, trailing newline)."""
    with open(yaml_file, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    if not isinstance(content, dict):
        raise ValueError(f"{yaml_file}: a bundle config must be a mapping, not {type(content).__name__}.")
    return json.dumps(content, indent=4, ensure_ascii=False) + "\n"


def yaml_configs(config_dir: str | Path | None = None) -> list[Path]:
    """The YAML configs that have a JSON twin: every ``*.yaml`` directly in ``config_dir`` (default configs/)."""
    return sorted(Path(config_dir or ROOT / "configs").glob("*.yaml"))


def stale(config_dir: str | Path | None = None) -> list[str]:
    """Names of the JSON files that are missing or differ from their YAML (empty when all are up to date)."""
    out = []
    for y in yaml_configs(config_dir):
        j = y.with_suffix(".json")
        if not j.is_file() or j.read_text(encoding="utf-8") != to_json_text(y):
            out.append(j.name)
    return out


def configs_json(config_dir: str | None = None, check: bool = False) -> list[str]:
    """Write (or with ``check=True`` only compare) ``configs/<name>.json`` for each ``configs/<name>.yaml``.

    Args:
        config_dir: folder of the configs (default: this bundle's configs/).
        check: do not write; exit with status 1 and the list of stale files when one differs.

    Returns the JSON paths written (or, with ``check``, the stale ones: none on success).
    """
    if check:
        bad = stale(config_dir)
        if bad:
            raise SystemExit(f"stale JSON configs {bad}: they must equal their YAML source; run `{COMMAND}`.")
        print("JSON configs are up to date with the YAML.")
        return []
    written = []
    for y in yaml_configs(config_dir):
        j = y.with_suffix(".json")
        text = to_json_text(y)
        if not j.is_file() or j.read_text(encoding="utf-8") != text:
            j.write_text(text, encoding="utf-8")
            print(f"wrote {j}")
        written.append(str(j))
    return written
