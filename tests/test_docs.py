"""One truth in the docs: README.md (the front page), docs/README.md (the model card) and docs/testing.md agree where
they state the same fact, and every file they point a user at exists."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.schedule import SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
FRONT = (ROOT / "README.md").read_text()
CARD = (ROOT / "docs" / "README.md").read_text()
TESTING = (ROOT / "docs" / "testing.md").read_text()


def _quick_run(text: str) -> str:
    """The quick run's command (the training command with --epoch_length 40), whitespace and backslashes folded."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        cmd = " ".join(block.replace("\\\n", " ").split())
        for line in re.split(r"(?=python -m )", cmd):
            line = line.split(" #")[0].strip()
            if "run training" in line and "--epoch_length 40" in line and "--resume" not in line:
                return line
    raise AssertionError("no quick-run command")


def _options(cmd: str) -> dict:
    toks = cmd.split()
    return {t: toks[i + 1] for i, t in enumerate(toks[:-1]) if t.startswith("--")}


def test_main_and_test_commands_are_the_same_on_both_pages():
    for text in (FRONT, CARD):
        assert "python -m monai.bundle run training --config_file configs/train.yaml\n" in text
    for cmd in ("python -m pytest -q tests", 'python -m pytest -m "not slow" -q'):
        assert cmd in FRONT and cmd in TESTING


def test_quick_run_and_its_figures_agree():
    front, card = _options(_quick_run(FRONT)), _options(_quick_run(CARD))
    assert front == card, (front, card)
    assert front["--dataset_dir"] == "data/phantom_small_v2"
    for fact in ("0.559", "0.756"):
        assert fact in FRONT and fact in CARD


def test_the_cpu_schedule_is_stated_as_the_code_runs_it():
    cpu = SCHEDULES["cpu"]
    iterations = cpu["max_epochs"] * cpu["epoch_length"]
    assert f"{iterations:,} iterations" in FRONT
    lr = f"{cpu['learning_rate']:.0e}".replace("e-0", "e-")  # 1e-3
    card = f"{cpu['max_epochs']} × {cpu['epoch_length']} iterations, Adam {lr}"
    assert card in CARD, card
    assert f"× 0.1 after epoch {cpu['lr_milestones'][0]}" in CARD
    paper = SCHEDULES["paper"]
    assert f"{paper['max_epochs']} × {paper['epoch_length']} iterations" in FRONT


def test_every_file_the_front_page_names_exists():
    named = set(re.findall(r"(?<![\w/.])((?:configs|models|docs)/[\w./-]+\.(?:yaml|md|pt|json))", FRONT))
    named |= {m.rstrip("/") for m in re.findall(r"`(models/[\w/]+/)`", FRONT)}
    assert named, "no file named"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == []
