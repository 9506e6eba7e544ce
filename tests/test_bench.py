"""`python -m bundle bench` interleaves its cases and reports medians and ratios computed from them (it is a
benchmark, not a timed test: nothing here asserts a speed).

The fast tier times the bare steps on 32x32 images (``bundle.bench.CASES`` patched: the bookkeeping does not depend
on the size); the real engine case (a 128x128 phantom written to disk, the config's loader and handlers) is slow."""

import pytest

import bundle.bench as bench
from bundle.bench import measure

BARE = ["vanilla", "collaborative", "collaborative_reuse", "inference", "inference_with_variance"]


@pytest.fixture(scope="module")
def report():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "CASES", {**bench.CASES, "2d": (2, [32, 32])})
        return measure(dims="2d", quick=True, device="cpu", engine=False)


def _check_schedule(r: dict, cases: list[str]) -> None:
    assert list(r["stats"]) == cases
    # quick: 2 rounds x 2 iterations per case (the engine's gaps between 3 completed iterations also give 2 per round)
    assert all(s["n"] == 4 for s in r["stats"].values())
    # interleaved A B C ... A B C ..., not A A B B
    assert r["order"] == cases * 2
    for s in r["stats"].values():
        assert 0 < s["q1"] <= s["median"] <= s["q3"]


def test_every_case_is_timed_in_every_round(report):
    assert report["rounds"] == 2 and report["block"] == 2
    _check_schedule(report["2d"], BARE)
    assert "engine/bare" not in report["2d"]["ratios"]


def test_ratios_come_from_the_printed_medians(report):
    st, ratios = report["2d"]["stats"], report["2d"]["ratios"]
    assert set(ratios) == {"collaborative/vanilla", "collaborative_reuse/vanilla"}
    assert ratios["collaborative/vanilla"] == pytest.approx(st["collaborative"]["median"] / st["vanilla"]["median"])
    assert ratios["collaborative_reuse/vanilla"] == pytest.approx(
        st["collaborative_reuse"]["median"] / st["vanilla"]["median"]
    )


def test_report_prints_the_medians(capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "CASES", {**bench.CASES, "2d": (2, [16, 16])})
        r = measure(dims="2d", quick=True, device="cpu", engine=False)
    out = capsys.readouterr().out
    assert "2 interleaved rounds x 2 iterations per case after 0 warm-up" in out and "2d 16x16:" in out
    for label, s in r["2d"]["stats"].items():
        unit = "ms/pair" if label.startswith("inference") else "ms/iter"
        assert f"  {label:<24} {s['median']:9.1f} {unit} ({s['q1']:.1f}-{s['q3']:.1f}), n=4" in out
    assert f"collaborative/vanilla x{r['2d']['ratios']['collaborative/vanilla']:.2f}" in out


@pytest.mark.slow
def test_engine_case_is_interleaved_with_the_bare_steps():
    """The config's real train#trainer (128x128 phantom, loader, handlers), timed between completed iterations."""
    r = measure(dims="2d", quick=True, device="cpu")["2d"]
    _check_schedule(r, BARE[:3] + ["engine"] + BARE[3:])
    assert r["ratios"]["engine/bare"] == pytest.approx(
        r["stats"]["engine"]["median"] / r["stats"]["collaborative"]["median"]
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dims must be among"):
        measure(dims="4d", quick=True, engine=False)
    with pytest.raises(ValueError, match="rounds and block"):
        measure(dims="2d", rounds=0, engine=False)
