import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import astropy.units as u  # noqa: E402
from astropy.table import Table  # noqa: E402
from numpy.testing import assert_allclose  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from gammapy.irf import Background2D, Background3D  # noqa: E402
from gammapy.maps import MapAxes, MapAxis  # noqa: E402
from bkgtemplate.fov import fov_solid_angle, offset_solid_angle  # noqa: E402
from bkgtemplate.histograms import BackgroundHistograms  # noqa: E402
from bkgtemplate.plotting import (  # noqa: E402
    _energy_offset_maps,
    peek_3d,
    peek_histograms,
    plot_fov_map,
    plot_histogram_map,
    plot_histogram_profiles,
    plot_histogram_spectra,
    plot_model_ratios,
    plot_models_comparison,
    plot_ratio_per_run,
    plot_zenith_dependence,
)

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")
ONTIME = 3600.0  # s


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def energy_axis():
    return MapAxis.from_energy_edges([0.1, 1, 10, 100] * u.TeV, name="energy")


@pytest.fixture
def offset_axis():
    return MapAxis.from_edges([0, 1, 2] * u.deg, name="offset")


@pytest.fixture
def fov_axes():
    return [MapAxis.from_edges([-2, -1, 0, 1, 2] * u.deg, name=name) for name in ("fov_lon", "fov_lat")]


@pytest.fixture
def histograms_2d(energy_axis, offset_axis):
    counts = np.array([[400.0, 100.0], [100.0, 25.0], [4.0, 0.0]])
    volume = np.outer(energy_axis.bin_width.to_value("MeV"), offset_solid_angle(offset_axis).to_value("sr"))
    return BackgroundHistograms(
        axes=MapAxes([energy_axis, offset_axis]),
        counts=counts,
        exposure=ONTIME * volume * u.Unit("s MeV sr"),
        obs_ids=[1, 2],
    )


@pytest.fixture
def histograms_3d(energy_axis, fov_axes):
    """Counts = 1e-6 s-1 MeV-1 sr-1 x exposure in every bin: a flat rate."""
    volume = energy_axis.bin_width.to_value("MeV")[:, None, None] * fov_solid_angle(*fov_axes).to_value("sr")
    exposure = ONTIME * volume
    return BackgroundHistograms(
        axes=MapAxes([energy_axis, *fov_axes]),
        counts=1e-6 * exposure,
        exposure=exposure * u.Unit("s MeV sr"),
        obs_ids=[1],
    )


@pytest.fixture
def bkg2d(energy_axis, offset_axis):
    data = np.array([[1e-3, 5e-4], [1e-5, 5e-6], [1e-8, 1e-8]])
    return Background2D(axes=[energy_axis, offset_axis], data=data, unit=RATE_UNIT)


@pytest.fixture
def bkg3d(energy_axis, fov_axes):
    data = np.full((3, 4, 4), 2e-6)
    data[2, 0, 0] = 0  # an empty corner
    return Background3D(axes=[energy_axis, *fov_axes], data=data, unit=RATE_UNIT, fov_alignment="ALTAZ")


@pytest.fixture
def obs_table():
    return Table(
        {
            "OBS_ID": [10, 11, 12, 13],
            "ZEN_PNT": [10.0, 20.0, 40.0, 50.0] * u.deg,
            "SAFE_ENERGY_LO": [0.3, 0.3, 0.6, 1.0] * u.TeV,
            "EVENT_COUNT": [1000, 1200, 800, 300],
            "LIVETIME": [100.0, 100.0, 100.0, 100.0] * u.s,
        }
    )


@pytest.fixture
def ratio_table():
    return Table(
        {
            "OBS_ID": [10, 11, 12, 13],
            "RATIO": [1.0, 1.2, 0.8, 1.0],
            "ERR": [0.1, 0.1, 0.1, 0.1],
            "TARGET_NAME": ["Off data", "Off data", "Crab", "Crab"],
        }
    )


def _is_colorbar(ax):
    return hasattr(ax, "_colorbar")


def _colorbar_labels(fig):
    return [ax.get_ylabel() for ax in fig.axes if _is_colorbar(ax)]


def _panels(fig):
    return [ax for ax in fig.axes if not _is_colorbar(ax)]


@pytest.mark.parametrize(
    "quantity, label",
    [
        ("rate", "Background rate"),
        ("counts", "Counts"),
        ("exposure", "Exposure"),
        ("ontime", "Ontime"),
        ("relative_error", "Relative error"),
    ],
)
def test_plot_histogram_map(histograms_2d, quantity, label):
    fig, ax = plt.subplots()
    out = plot_histogram_map(histograms_2d, quantity, ax=ax)
    assert out is ax
    assert len(ax.collections) == 1
    assert ax.get_xlabel().startswith("Energy [")
    # gammapy writes deg as a LaTeX degree sign
    assert ax.get_ylabel().startswith("FoV Offset [") and "circ" in ax.get_ylabel()
    assert ax.get_xscale() == "log"
    (cbar_label,) = _colorbar_labels(fig)
    assert cbar_label.startswith(label)


def test_plot_histogram_map_units_in_colorbar(histograms_2d):
    fig, axes = plt.subplots(1, 2)
    plot_histogram_map(histograms_2d, "rate", ax=axes[0])
    plot_histogram_map(histograms_2d, "ontime", ax=axes[1])
    rate_label, ontime_label = _colorbar_labels(fig)
    assert "MeV" in rate_label and "sr" in rate_label
    assert ontime_label.endswith("[$\\mathrm{h}$]")


def test_plot_histogram_map_bad_quantity(histograms_2d):
    with pytest.raises(ValueError, match="'flux'"):
        plot_histogram_map(histograms_2d, "flux")


def test_energy_offset_maps_2d(histograms_2d):
    _, _, maps = _energy_offset_maps(histograms_2d)
    # exposure is ONTIME x dE x dOmega, so the ontime per bin is ONTIME everywhere
    assert_allclose(maps["ontime"], ONTIME / 3600, rtol=1e-12)
    assert_allclose(maps["relative_error"][0], [0.05, 0.1], rtol=1e-12)
    assert np.isnan(maps["relative_error"][2, 1])


def test_energy_offset_maps_3d_ring_average(histograms_3d):
    _, offset_axis, maps = _energy_offset_maps(histograms_3d)
    # rings as wide as the FoV bins, out to the edge of the FoV axes
    assert_allclose(offset_axis.edges.to_value("deg"), [0, 1, 2], rtol=1e-12)
    assert_allclose(maps["rate"], 1e-6, rtol=1e-10)
    assert_allclose(maps["ontime"], ONTIME / 3600, rtol=1e-10)
    # bin centres at offsets 0.71 (4 bins), 1.58 (8 bins) and 2.12 deg (the 4 corners, outside)
    inner = histograms_3d.counts[:, 1:3, 1:3].sum(axis=(1, 2))
    corners = histograms_3d.counts[:, [0, 0, 3, 3], [0, 3, 0, 3]].sum(axis=1)
    assert_allclose(maps["counts"][:, 0], inner, rtol=1e-10)
    assert_allclose(maps["counts"].sum(axis=1), histograms_3d.counts.sum(axis=(1, 2)) - corners, rtol=1e-10)


def test_plot_histogram_spectra(histograms_2d):
    ax = plot_histogram_spectra(histograms_2d, offsets=[0.5] * u.deg)
    assert len(ax.containers) == 1
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "Background rate" in ax.get_ylabel()
    assert ax.get_legend().get_texts()[0].get_text() == "0.00-1.00 deg"


def test_plot_histogram_profiles_normalized(histograms_3d):
    ax = plot_histogram_profiles(histograms_3d, energies=[0.5, 5] * u.TeV, normalize=True)
    assert len(ax.containers) == 2
    for container in ax.containers:
        # a flat rate: every ring at the FoV-averaged rate
        assert_allclose(container.lines[0].get_ydata(), 1, rtol=1e-10)
    assert ax.get_ylabel() == "Rate / FoV-averaged rate"


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_peek_histograms(histograms_2d, histograms_3d, kind):
    histograms = histograms_2d if kind == "2d" else histograms_3d
    fig = peek_histograms(histograms)
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert len(panels) == 6
    assert len(_colorbar_labels(fig)) == 4
    assert all(ax.has_data() for ax in panels)
    assert "runs" in fig._suptitle.get_text()
    assert ("ALTAZ" in fig._suptitle.get_text()) == (kind == "3d")


def test_plot_models_comparison(bkg2d, bkg3d):
    fig, ax = plt.subplots()
    out = plot_models_comparison([bkg2d, bkg3d], ["2d", "3d"], ax=ax, offset="0.5 deg")
    assert out is ax
    assert len(ax.lines) == 2
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("Energy [") and "TeV" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("Background rate [")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["2d", "3d"]
    # the 3D model is flat: its azimuth average is the constant (empty corner not on the circle)
    assert_allclose(ax.lines[1].get_ydata(), 2e-6, rtol=1e-6)
    # the 2D model at the centre of its first offset bin is the stored value
    plot_models_comparison([bkg2d], offset="0.5 deg", ax=ax)
    assert_allclose(ax.lines[2].get_ydata(), bkg2d.data[:, 0], rtol=1e-6)


def test_plot_models_comparison_errors(bkg2d):
    with pytest.raises(ValueError, match="2 labels for 1 models"):
        plot_models_comparison([bkg2d], ["a", "b"])
    with pytest.raises(TypeError, match="Table"):
        plot_models_comparison([Table()])


def test_plot_model_ratios(bkg2d):
    double = Background2D(axes=bkg2d.axes, data=2 * bkg2d.data, unit=bkg2d.unit)
    ax = plot_model_ratios([bkg2d, double], ["ref", "double"], offset="0.5 deg")
    # the line at 1 and one line per model after the first
    assert len(ax.lines) == 2
    assert_allclose(ax.lines[1].get_ydata(), 2, rtol=1e-6)
    assert ax.get_ylabel() == "Ratio"
    assert ax.get_legend().get_title().get_text() == "Ratio to ref"


def test_plot_fov_map(bkg3d):
    fig, ax = plt.subplots()
    out = plot_fov_map(bkg3d, "5 TeV", ax=ax)
    assert out is ax
    assert len(ax.images) == 1
    assert_allclose(ax.images[0].get_extent(), [-2, 2, -2, 2])
    assert ax.get_xlabel().startswith("FoV lon [") and ax.get_ylabel().startswith("FoV lat [")
    assert "ALTAZ" in ax.get_title() and "1.00-10.00 TeV" in ax.get_title()
    (cbar_label,) = _colorbar_labels(fig)
    assert cbar_label.startswith("Background rate [") and "MeV" in cbar_label


def test_plot_fov_map_irregular_bins(energy_axis):
    fov = [MapAxis.from_edges([-2, -0.5, 0, 0.5, 2] * u.deg, name=name) for name in ("fov_lon", "fov_lat")]
    bkg = Background3D(axes=[energy_axis, *fov], data=np.ones((3, 4, 4)), unit=RATE_UNIT)
    ax = plot_fov_map(bkg, "1 TeV", add_cbar=False)
    assert len(ax.images) == 0 and len(ax.collections) == 1


def test_peek_3d(bkg3d):
    fig = peek_3d(bkg3d)
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    # 0.5, 1, 3 and 10 TeV are in the axis 0.1-100 TeV
    assert len(panels) == 4
    assert all(len(ax.images) == 1 for ax in panels)
    assert "ALTAZ" in fig._suptitle.get_text()

    fig = peek_3d(bkg3d, energies=[0.5, 5, 50] * u.TeV, ncols=2)
    visible = [ax for ax in _panels(fig) if ax.get_visible()]
    assert len(visible) == 3


def test_peek_3d_wrong_type(bkg2d):
    with pytest.raises(TypeError, match="Background2D"):
        peek_3d(bkg2d)


def test_plot_zenith_dependence(obs_table):
    fig, ax = plt.subplots()
    out = plot_zenith_dependence(obs_table, ax=ax)
    assert out is ax
    assert len(ax.collections) == 1
    assert ax.get_xlabel().startswith("Zenith angle [")
    assert ax.get_ylabel().startswith("Safe energy threshold [") and "TeV" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
    assert ax.get_legend() is None


def test_plot_zenith_dependence_event_rate_highlight(obs_table):
    highlight = np.array([False, False, False, True])
    ax = plot_zenith_dependence(obs_table, y="EVENT_RATE", highlight=highlight, annotate="OBS_ID")
    assert len(ax.collections) == 2
    assert_allclose(ax.collections[0].get_offsets()[:, 1], [10, 12, 8, 3])
    assert_allclose(ax.collections[1].get_offsets(), [[50, 3]])
    assert ax.get_ylabel().startswith("Event rate [")
    assert [text.get_text() for text in ax.texts] == ["13"]
    assert len(ax.get_legend().get_texts()) == 2


def test_plot_zenith_dependence_errors(obs_table):
    with pytest.raises(ValueError, match="'MUONEFF'"):
        plot_zenith_dependence(obs_table, y="MUONEFF")
    with pytest.raises(ValueError, match="highlight"):
        plot_zenith_dependence(obs_table, highlight=[True])


def test_plot_ratio_per_run(ratio_table):
    fig, ax = plt.subplots()
    out = plot_ratio_per_run(ratio_table, ax=ax)
    assert out is ax
    assert len(ax.containers) == 1
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "11", "12", "13"]
    assert ax.get_ylabel() == "Observed / predicted counts"
    assert "1.00 $\\pm$ 0.16" in ax.get_legend().get_texts()[1].get_text()
    # the line at 1 is there
    assert any(np.all(np.asarray(line.get_ydata()) == 1) for line in ax.lines)


def test_plot_ratio_per_run_groups(ratio_table):
    ax = plot_ratio_per_run(ratio_table, group="TARGET_NAME")
    # one errorbar set and one band per group; groups ordered as they first appear
    assert len(ax.containers) == 2
    texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert texts[0].startswith("Off data: 1.10") and texts[1].startswith("Crab: 0.90")
    assert ax.get_legend().get_title().get_text() == "TARGET_NAME"


def test_plot_ratio_per_run_shared_runs(ratio_table):
    table = Table(ratio_table)
    table["MODEL"] = "a"
    other = Table(ratio_table)
    other["MODEL"] = "b"
    from astropy.table import vstack

    ax = plot_ratio_per_run(vstack([table, other]), group="MODEL")
    x_a = ax.containers[0].lines[0].get_xdata()
    x_b = ax.containers[1].lines[0].get_xdata()
    # the same runs at the same positions, the two models side by side
    assert_allclose(x_b - x_a, 0.3)
    assert len(ax.get_xticklabels()) == 4


def test_plot_ratio_per_run_missing_column(ratio_table):
    with pytest.raises(ValueError, match="'ERR'"):
        plot_ratio_per_run(ratio_table[["OBS_ID", "RATIO"]])


@pytest.fixture(scope="session")
def hess_store_or_skip(request):
    """The shared ``hess_store`` fixture, or a local fallback that skips when the data is absent."""
    try:
        return request.getfixturevalue("hess_store")
    except pytest.FixtureLookupError:
        from bkgtemplate.data import DataNotFoundError, find_data_dir, open_data_store

        try:
            return open_data_store(find_data_dir())
        except DataNotFoundError as error:
            pytest.skip(f"real H.E.S.S. data absent: {error}")


@pytest.mark.hess
def test_peek_histograms_hess(hess_store_or_skip, tmp_path):
    from bkgtemplate import BackgroundModelEstimator

    obs_table = hess_store_or_skip.obs_table
    obs_ids = obs_table["OBS_ID"][obs_table["TARGET_NAME"] == "Off data"]
    histograms = BackgroundModelEstimator().fill_histograms(hess_store_or_skip, obs_ids)
    fig = peek_histograms(histograms)
    fig.savefig(tmp_path / "peek.png")
    assert (tmp_path / "peek.png").stat().st_size > 10_000
    panels = _panels(fig)
    assert all(ax.has_data() for ax in panels)
    assert "45 runs" in fig._suptitle.get_text()
    # spectra and profiles: four curves each on the default axes
    assert len(panels[1].containers) == 4 and len(panels[2].containers) == 4

    fig, ax = plt.subplots()
    plot_zenith_dependence(obs_table[obs_table["TARGET_NAME"] == "Off data"], ax=ax, y="EVENT_RATE")
    assert len(ax.collections[0].get_offsets()) == 45
