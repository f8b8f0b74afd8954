import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import astropy.units as u  # noqa: E402
from astropy.table import Table  # noqa: E402
from numpy.testing import assert_allclose  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from gammapy.irf import Background2D, Background3D  # noqa: E402
from gammapy.maps import MapAxes, MapAxis  # noqa: E402
from bkgtemplate.histograms import BackgroundHistograms  # noqa: E402
from bkgtemplate.plotting import (  # noqa: E402
    peek_histograms,
    plot_models_comparison,
    plot_ratio_per_run,
    plot_zenith_dependence,
)

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")
ENERGY_AXIS = MapAxis.from_energy_edges([0.1, 1, 10, 100] * u.TeV, name="energy")
OFFSET_AXIS = MapAxis.from_edges([0, 1, 2] * u.deg, name="offset")
FOV_AXES = [MapAxis.from_edges([-2, -1, 0, 1, 2] * u.deg, name=name) for name in ("fov_lon", "fov_lat")]
# Sums over the two runs of `histograms`, by hand: counts, exposure (1e6 s MeV sr), rate, 1 / sqrt(counts).
COUNTS = np.array([[400, 100], [400, 100], [4, 0]])
EXPOSURE = np.array([[1, 2], [40, 80], [400, 800]]) * 1e6
RATE = np.array([[4e-4, 5e-5], [1e-5, 1.25e-6], [1e-8, 0]])
RELATIVE_ERROR = np.array([[0.05, 0.1], [0.05, 0.1], [0.5, np.nan]])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def histograms():
    """Two runs; the second has no exposure in the lowest energy bin (below its safe threshold)."""
    counts = np.array([[[400, 100], [100, 25], [4, 0]], [[0, 0], [300, 75], [0, 0]]], dtype=float)
    exposure = np.array([[[1, 2], [10, 20], [100, 200]], [[0, 0], [30, 60], [300, 600]]]) * 1e6 * u.Unit("s MeV sr")
    return BackgroundHistograms(MapAxes([ENERGY_AXIS, OFFSET_AXIS]), counts, exposure, Table({"OBS_ID": [1, 2]}))


@pytest.fixture
def bkg2d():
    data = np.array([[1e-3, 5e-4], [1e-5, 5e-6], [0, 1e-8]])  # a zero: gammapy's log interpolation returns ~1e-38 there
    return Background2D(axes=[ENERGY_AXIS, OFFSET_AXIS], data=data, unit=RATE_UNIT)


def _errors(container):
    """Half lengths of the error bars of an errorbar container."""
    return np.array([np.ptp(segment[:, 1]) / 2 for segment in container.lines[2][0].get_segments()])


def test_peek_histograms(histograms):
    fig = peek_histograms(histograms)
    panels, colorbars = fig.axes[:4], fig.axes[4:]
    assert len(colorbars) == 4 and all(len(ax.collections) == 1 for ax in panels)
    for ax, expected in zip(panels, [COUNTS, EXPOSURE, RATE, RELATIVE_ERROR]):
        shown = np.ma.filled(np.ma.asarray(ax.collections[0].get_array(), dtype=float), np.nan)
        assert_allclose(shown.reshape(2, 3), expected.T, rtol=1e-12)
        assert ax.get_xlabel() == "Energy [$\\mathrm{TeV}$]" and ax.get_ylabel().startswith("Offset [")
        assert ax.get_xscale() == "log"
    labels = [ax.get_ylabel() for ax in colorbars]
    assert labels[0] == "Counts" and labels[3].startswith("Relative error")
    assert labels[1].startswith("Exposure [") and "MeV" in labels[1] and "sr" in labels[1]
    assert labels[2].startswith("Background rate [") and "MeV^{-1}" in labels[2]
    assert fig._suptitle.get_text() == "2 runs, 1004 events"

    volume = np.ones((1, 3, 4, 4))
    histograms_3d = BackgroundHistograms(MapAxes([ENERGY_AXIS, *FOV_AXES]), volume, volume * u.Unit("s MeV sr"), Table({"OBS_ID": [1]}))
    with pytest.raises(ValueError, match="3D"):
        peek_histograms(histograms_3d)


def test_plot_models_comparison(bkg2d):
    flat = Background3D(axes=[ENERGY_AXIS, *FOV_AXES], data=np.full((3, 4, 4), 2e-6), unit=RATE_UNIT)
    flat.data[:, 0, 0] = 0  # a corner the 0.5 deg circle does not reach
    fig, ax = plt.subplots()
    assert plot_models_comparison([bkg2d, flat], ["2d", "3d"], ax=ax, offset="0.5 deg") is ax
    assert len(ax.lines) == 2
    # the 2D model at the centre of its first offset bin is the stored column, its zero left out
    assert_allclose(ax.lines[0].get_ydata(), [1e-3, 1e-5, np.nan], rtol=1e-6)
    assert_allclose(ax.lines[1].get_ydata(), 2e-6, rtol=1e-6)
    assert_allclose(ax.lines[0].get_xdata(), ENERGY_AXIS.center.to_value("TeV"), rtol=1e-12)
    assert [line.get_color() for line in ax.lines] == ["C0", "C1"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["2d", "3d"]
    assert ax.get_legend().get_title().get_text() == "Offset 0.50 deg"
    assert ax.get_xlabel() == "Energy [$\\mathrm{TeV}$]" and ax.get_ylabel().startswith("Background rate [")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="one label each"):
        plot_models_comparison([bkg2d], ["a", "b"])
    with pytest.raises(ValueError, match="Table"):
        plot_models_comparison([Table()])


def test_plot_zenith_dependence():
    table = Table(
        {
            "ZEN_PNT": [10.0, 20.0, 40.0, 50.0] * u.deg,
            "SAFE_ENERGY_LO": [0.3, 0.3, 0.6, 1.0] * u.TeV,
            "EVENT_COUNT": [1000, 1200, 800, 300],
            "LIVETIME": [100.0, 100.0, 100.0, 100.0] * u.s,
            "MUONEFF": [0.08, 0.07, 0.09, 0.06],
        }
    )
    fig, axes = plt.subplots(1, 2)
    assert plot_zenith_dependence(table, ax=axes[0], y="EVENT_RATE", color_by="MUONEFF") is axes[0]
    (points,) = axes[0].collections
    assert_allclose(points.get_offsets(), [[10, 10], [20, 12], [40, 8], [50, 3]], rtol=1e-12)
    assert_allclose(points.get_array(), table["MUONEFF"], rtol=1e-12)
    assert axes[0].get_xlabel().startswith("Zenith angle [") and axes[0].get_ylabel() == "Event rate [$\\mathrm{s^{-1}}$]"
    assert fig.axes[-1].get_ylabel() == "Muon efficiency"  # the colour bar
    plot_zenith_dependence(table, ax=axes[1])
    assert_allclose(axes[1].collections[0].get_offsets()[:, 1], [0.3, 0.3, 0.6, 1.0], rtol=1e-12)
    assert axes[1].get_ylabel() == "Safe energy threshold [$\\mathrm{TeV}$]" and axes[1].get_yscale() == "log"
    with pytest.raises(ValueError, match="'AZ_PNT'"):
        plot_zenith_dependence(table, y="AZ_PNT")


def test_plot_ratio_per_run():
    table = Table(
        {
            "OBS_ID": [12, 10, 11, 10, 11, 12],
            "RATIO": [0.8, 1.0, 1.2, 2.0, 2.2, 1.8],
            "ERR": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1],
            "MODEL": ["a", "a", "a", "b", "b", "b"],
        }
    )
    fig, axes = plt.subplots(1, 2)
    assert plot_ratio_per_run(table, ax=axes[0], group="MODEL") is axes[0]
    ax = axes[0]
    # runs 10, 11, 12 at 0, 1, 2; the models shared by all runs side by side, 0.3 apart
    for container, rows, x in zip(ax.containers, [slice(0, 3), slice(3, 6)], [[1.85, -0.15, 0.85], [0.15, 1.15, 2.15]]):
        assert_allclose(container.lines[0].get_xdata(), x, rtol=1e-12)
        assert_allclose(container.lines[0].get_ydata(), table["RATIO"][rows], rtol=1e-12)
        assert_allclose(_errors(container), table["ERR"][rows], rtol=1e-9)
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "11", "12"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a: 1.00 $\\pm$ 0.20", "b: 2.00 $\\pm$ 0.20"]
    assert any(np.all(np.asarray(line.get_ydata()) == 1) for line in ax.lines)
    assert ax.get_ylabel() == "Observed / predicted counts"
    plot_ratio_per_run(table[:3], ax=axes[1])  # one group: positions by OBS_ID, no shift
    assert_allclose(axes[1].containers[0].lines[0].get_xdata(), [2, 0, 1], rtol=1e-12)
    with pytest.raises(ValueError, match="ERR"):
        plot_ratio_per_run(table[["OBS_ID", "RATIO"]])
