"""`python -m bundle bench` runs and prints the figures it promises (it is a benchmark, not a timed test)."""

import re

from bundle.bench import bench


def test_bench_prints_ratio_and_inference(capsys):
    bench(dims="2d", repeats=1, warmup=0, device="cpu")
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("2d 128x128"))
    numbers = {k: float(v) for k, v in re.findall(r"(vanilla|collaborative|reuse_warped|pair) (\d+\.\d+)", line)}
    assert set(numbers) == {"vanilla", "collaborative", "reuse_warped", "pair"}
    assert all(v > 0 for v in numbers.values())
    ratios = [float(r) for r in re.findall(r"\(x(\d+\.\d+)\)", line)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
