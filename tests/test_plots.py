"""Plots of fitted laws: each figure is written as a non-trivial PNG, without pyplot's global state."""

import matplotlib.image
import numpy as np
import pytest
import tolerances as tol

from jscale import laws
from jscale.laws import plots, published

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@pytest.fixture(scope="module")
def fits():
    budgets = np.geomspace(1e18, 1e21, 4)
    rows = []
    rng = np.random.default_rng(0)
    for C in budgets:
        for n in 1e8 * (C / 1e18) ** 0.45 * np.geomspace(0.2, 5.0, 60):
            d = C / (6 * n)
            rows.append((n, d, float(laws.chinchilla(TRUE, n, d)) * np.exp(rng.normal(0, 2e-3)), C))
    N, D, L, Cs = map(np.array, zip(*rows, strict=True))              # 240 runs
    iso = laws.fit_isoflop(N, D, L, Cs)
    chin = laws.fit_chinchilla(N, D, L)
    ps = published.parscale("pile")
    return dict(iso=iso, iso_boot=laws.bootstrap_isoflop(iso, 50), chin=chin,
                chin_boot=laws.bootstrap(chin, 50),
                parscale=laws.fit_parscale(ps["N"], ps["P"], ps["loss"]))


def _check_png(path, min_bytes=20_000):
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 500 and img.shape[1] >= 600
    assert float(np.std(img[..., :3])) > 0.05                          # not blank
    import os
    assert os.path.getsize(path) > min_bytes


def test_isoflop_curves(fits, tmp_path):
    _check_png(plots.isoflop_curves(fits["iso"], tmp_path / "iso.png", chinchilla=fits["chin"]))


def test_frontier(fits, tmp_path):
    _check_png(plots.frontier(tmp_path / "a" / "frontier.png", iso=fits["iso"],
                              iso_boot=fits["iso_boot"], chinchilla=fits["chin"],
                              chinchilla_boot=fits["chin_boot"]))
    with pytest.raises(ValueError, match="frontier"):
        plots.frontier(tmp_path / "none.png")


def test_fit_vs_observed_and_parscale(fits, tmp_path):
    _check_png(plots.fit_vs_observed(fits["chin"], tmp_path / "fit.png"))
    _check_png(plots.fit_vs_observed(fits["parscale"], tmp_path / "ps_fit.png", color_by="P"))
    _check_png(plots.parscale_curves(fits["parscale"], tmp_path / "ps.png"))
    with pytest.raises(ValueError, match="color_by"):
        plots.fit_vs_observed(fits["chin"], tmp_path / "x.png", color_by="P")
    with pytest.raises(ValueError, match="ParScale"):
        plots.parscale_curves(fits["chin"], tmp_path / "y.png")


def test_no_pyplot_figures_left_open(fits, tmp_path):
    import matplotlib.pyplot as plt
    before = len(plt.get_fignums())
    plots.fit_vs_observed(fits["chin"], tmp_path / "fit.png")
    assert len(plt.get_fignums()) == before


def _fpt(N):
    """FLOPs per token of a family with a large head share (as jscale's tiny models have)."""
    return 6.0 * (np.asarray(N, float) + 257 * 64.0)


@pytest.fixture(scope="module")
def fpt_fits():
    """IsoFLOP profiles whose budgets are C = _fpt(N)·D, not 6ND (240 runs)."""
    budgets = np.geomspace(1e11, 1e13, 4)
    rows = []
    for C in budgets:
        grid = np.geomspace(1e3, 1e7, 4000)
        n_star = grid[np.argmin(laws.chinchilla(TRUE, grid, C / _fpt(grid)))]
        for n in n_star * np.geomspace(0.25, 4.0, 60):
            rows.append((n, C / _fpt(n), float(laws.chinchilla(TRUE, n, C / _fpt(n))), C))
    N, D, L, Cs = map(np.array, zip(*rows, strict=True))
    chin = laws.fit_chinchilla(N, D, L)
    return dict(budgets=budgets, iso=laws.fit_isoflop(N, D, L, Cs), chin=chin,
                chin_boot=laws.bootstrap(chin, 20))


def test_frontier_draws_approach3_in_the_points_convention(fpt_fits, tmp_path):
    """With the runs' FLOPs per token, Approach 3's frontier passes through Approach 2's minima; the
    6ND closed form (what frontier drew before) misses them by far more; axis and legend say which."""
    f = fpt_fits
    b = f["budgets"]

    def n3_at_budgets(data):
        return np.exp(np.interp(np.log(b), np.log(data["C"]), np.log(data["approach3"]["N"])))

    label = "C = flops_per_token(N)·D, the runs' own"
    data = plots.frontier_data(iso=f["iso"], chinchilla=f["chin"], chinchilla_boot=f["chin_boot"],
                               flops_per_token=_fpt, flops_label=label)
    np.testing.assert_allclose(n3_at_budgets(data), f["iso"].N_min,
                               rtol=tol.FRONTIER_SAME_CONVENTION_RTOL)
    six = plots.frontier_data(iso=f["iso"], chinchilla=f["chin"])
    assert np.max(np.abs(n3_at_budgets(six) / f["iso"].N_min - 1)) > 4 * tol.FRONTIER_SAME_CONVENTION_RTOL
    assert data["convention"] == label and label in data["approach3"]["label"]
    assert six["convention"] == "C = 6ND" and "6ND" in six["approach3"]["label"]
    band = data["approach3"]["band_N"]
    assert band.shape == (plots.BAND_POINTS, 2) and np.all(band[:, 0] <= band[:, 1])
    _check_png(plots.frontier(tmp_path / "frontier.png", iso=f["iso"], chinchilla=f["chin"],
                              chinchilla_boot=f["chin_boot"], flops_per_token=_fpt,
                              flops_label=label))
