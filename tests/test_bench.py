"""`python -m bundle bench` interleaves its cases and reports medians and ratios computed from them (it is a
benchmark, not a timed test: nothing here asserts a speed)."""

import pytest

from bundle.bench import measure


@pytest.fixture(scope="module")
def report():
    return measure(dims="2d", quick=True, device="cpu")


def test_every_case_is_timed_in_every_round(report):
    r = report["2d"]
    cases = ["vanilla", "collaborative", "collaborative_reuse", "engine", "inference", "inference_with_variance"]
    assert list(r["stats"]) == cases
    # quick: 2 rounds x 2 iterations per case; the engine's gaps between 3 completed iterations give 2 per round
    assert all(s["n"] == 4 for s in r["stats"].values())
    # interleaved A B C ... A B C ..., not A A B B
    assert r["order"] == cases * 2
    for s in r["stats"].values():
        assert s["q1"] <= s["median"] <= s["q3"]


def test_ratios_come_from_the_printed_medians(report, capsys):
    st, ratios = report["2d"]["stats"], report["2d"]["ratios"]
    assert ratios["collaborative/vanilla"] == pytest.approx(st["collaborative"]["median"] / st["vanilla"]["median"])
    assert ratios["collaborative_reuse/vanilla"] == pytest.approx(
        st["collaborative_reuse"]["median"] / st["vanilla"]["median"]
    )
    assert ratios["engine/bare"] == pytest.approx(st["engine"]["median"] / st["collaborative"]["median"])
    # the collaborative step does strictly more work than the vanilla one (two networks, two optimizers)
    assert ratios["collaborative/vanilla"] > 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dims must be among"):
        measure(dims="4d", quick=True, engine=False)
    with pytest.raises(ValueError, match="rounds and block"):
        measure(dims="2d", rounds=0, engine=False)
