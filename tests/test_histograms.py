"""Counts and exposure of single runs, and the per-run container, checked against hand calculations."""

import numpy as np
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, HADec, SkyCoord
from astropy.table import Table
from astropy.time import Time
from numpy.testing import assert_allclose
import pytest
from gammapy.maps import MapAxes, MapAxis
from gammapy.utils.coordinates import FoVAltAzFrame
from regions import CircleSkyRegion
from bkgtemplate.data import RunInfo
from bkgtemplate import BackgroundModelEstimator
from bkgtemplate.geometry import fov_solid_angle
from bkgtemplate.histograms import BackgroundHistograms, fill_run

HESS = EarthLocation(lon=16.5002 * u.deg, lat=-23.2718 * u.deg, height=1835 * u.m)
POINTING = SkyCoord(228.61, -58.77, unit="deg")
MJDREF = Time(51910.00074287037, format="mjd", scale="tt")
TSTART = 101962602.0
ONTIME = 1682.0
ENERGY = MapAxis.from_edges([0.5, 1, 2, 4] * u.TeV, name="energy")
OFFSET = MapAxis.from_edges([0, 0.5, 1.0, 2.0] * u.deg, name="offset")


def write_run(path, energy, sky, time=None, safe_energy_lo=0.0):
    """A one-HDU events file and the RunInfo pointing at it."""
    time = np.full(len(energy), TSTART + ONTIME / 2) if time is None else time
    table = Table(
        {"TIME": time * u.s, "RA": sky.ra.to("deg"), "DEC": sky.dec.to("deg"), "ENERGY": energy * u.TeV},
        meta={"EXTNAME": "EVENTS"},
    )
    table.write(path, format="fits", overwrite=True)
    hadec = POINTING.transform_to(HADec(location=HESS, obstime=MJDREF + TSTART * u.s))
    return RunInfo(
        obs_id=1,
        path=str(path),
        hdu="EVENTS",
        ontime=ONTIME,
        safe_energy_lo=safe_energy_lo,
        ra_pnt=POINTING.ra.rad,
        dec_pnt=POINTING.dec.rad,
        tstart=TSTART,
        tstop=TSTART + ONTIME,
        hour_angle=hadec.ha.rad,
        dec_apparent=hadec.dec.rad,
        latitude=HESS.lat.rad,
    )


def ring_area(r1, r2):
    return 2 * np.pi * (np.cos(np.deg2rad(r1)) - np.cos(np.deg2rad(r2)))


def test_counts_and_exposure_hand_values(tmp_path):
    # events at offsets 0.2, 0.7, 0.7, 1.5 deg and energies in bins 0, 1, 1, 2; one beyond the axes
    offsets = [0.2, 0.7, 0.7, 1.5, 2.2] * u.deg
    sky = POINTING.directional_offset_by([0, 90, 200, 300, 10] * u.deg, offsets)
    run = write_run(tmp_path / "run.fits", np.array([0.7, 1.5, 1.2, 3.0, 1.0]), sky)
    counts, exposure = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET))

    expected = np.zeros((3, 3))
    expected[0, 0] = expected[2, 2] = 1
    expected[1, 1] = 2
    assert_allclose(counts, expected)

    d_energy = np.array([0.5, 1, 2]) * 1e6  # MeV
    solid_angle = np.array([ring_area(0, 0.5), ring_area(0.5, 1), ring_area(1, 2)])
    assert_allclose(exposure, ONTIME * d_energy[:, None] * solid_angle[None, :], rtol=1e-12)


def test_safe_threshold_masks_counts_and_exposure(tmp_path):
    sky = POINTING.directional_offset_by([0, 0, 0] * u.deg, [0.3, 0.3, 0.3] * u.deg)
    # the threshold as float32, as in the files: 1 TeV is the lower edge of bin 1 and must count
    run = write_run(tmp_path / "run.fits", np.array([0.7, 1.5, 3.0]), sky, safe_energy_lo=float(np.float32(1.0)))
    counts, exposure = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET))
    assert_allclose(counts[:, 0], [0, 1, 1])
    assert np.all(exposure[0] == 0) and np.all(exposure[1:] > 0)

    counts, exposure = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET, safe_threshold=False))
    assert_allclose(counts[:, 0], [1, 1, 1])
    assert np.all(exposure > 0)


def test_exclusion_circle_at_pointing_removes_inner_rings(tmp_path):
    sky = POINTING.directional_offset_by([0, 0] * u.deg, [0.3, 1.5] * u.deg)
    run = write_run(tmp_path / "run.fits", np.array([0.7, 0.7]), sky)
    exclusion = [CircleSkyRegion(POINTING, 1.0 * u.deg)]
    counts, exposure = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET, exclusion=exclusion))
    assert_allclose(counts[0], [0, 0, 1])
    _, full = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET))
    assert_allclose(exposure[:, :2], 0, atol=0)
    assert_allclose(exposure[:, 2], full[:, 2], rtol=1e-12)


def test_exclusion_circle_inside_ring_hand_fraction(tmp_path):
    # a circle of radius 0.2 deg centred at offset 1.5 deg lies fully inside the 1-2 deg ring
    center = POINTING.directional_offset_by(40 * u.deg, 1.5 * u.deg)
    inside = center.directional_offset_by([0, 180] * u.deg, [0.1, 0.05] * u.deg)
    outside = POINTING.directional_offset_by(220 * u.deg, 1.5 * u.deg)
    sky = SkyCoord([inside.ra[0], inside.ra[1], outside.ra], [inside.dec[0], inside.dec[1], outside.dec])
    run = write_run(tmp_path / "run.fits", np.array([0.7, 0.7, 0.7]), sky)
    exclusion = [CircleSkyRegion(center, 0.2 * u.deg)]
    counts, exposure = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET, exclusion=exclusion))
    _, full = fill_run(run, BackgroundModelEstimator(ENERGY, OFFSET))

    assert_allclose(counts[0], [0, 0, 1])
    expected_kept = 1 - ring_area(0, 0.2) / ring_area(1, 2)
    assert_allclose(exposure[:, 2] / full[:, 2], expected_kept, rtol=1e-3)
    assert_allclose(exposure[:, :2], full[:, :2], rtol=1e-12)


def test_altaz_3d_bins_follow_gammapy_frame(tmp_path):
    """Events land in the (fov_lon, fov_lat) bins gammapy's FoVAltAzFrame puts them in."""
    rng = np.random.default_rng(3)
    n = 400
    time = TSTART + rng.uniform(0, ONTIME, n)
    sky = POINTING.directional_offset_by(rng.uniform(0, 360, n) * u.deg, rng.uniform(0, 2.0, n) * u.deg)
    run = write_run(tmp_path / "run.fits", np.full(n, 0.7), sky, time=time)
    lon_axis = MapAxis.from_bounds(-2, 2, 8, unit="deg", name="fov_lon")
    lat_axis = MapAxis.from_bounds(-2, 2, 8, unit="deg", name="fov_lat")
    counts, _ = fill_run(run, BackgroundModelEstimator(ENERGY, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis, fov_alignment="ALTAZ"))

    obstime = MJDREF + time * u.s
    origin = POINTING.transform_to(AltAz(location=HESS, obstime=obstime))
    fov = sky.transform_to(FoVAltAzFrame(origin=origin, location=HESS, obstime=obstime))
    expected, _, _ = np.histogram2d(
        fov.fov_lon.wrap_at(180 * u.deg).deg, fov.fov_lat.deg, bins=[lon_axis.edges.value, lat_axis.edges.value]
    )
    # events within 0.002 deg of an edge may fall either side
    assert np.abs(counts[0] - expected).sum() <= 2
    assert counts[0].sum() == expected.sum()


@pytest.mark.parametrize("alignment", ["ALTAZ", "RADEC"])
def test_3d_excluded_solid_angle_is_the_circle_area(tmp_path, alignment):
    """However the field rotates, the excluded solid angle summed over bins is the circle's area."""
    sky = POINTING.directional_offset_by([0] * u.deg, [0.3] * u.deg)
    run = write_run(tmp_path / "run.fits", np.array([0.7]), sky)
    lon_axis = MapAxis.from_bounds(-2, 2, 20, unit="deg", name="fov_lon")
    lat_axis = MapAxis.from_bounds(-2, 2, 20, unit="deg", name="fov_lat")
    center = POINTING.directional_offset_by(70 * u.deg, 1.0 * u.deg)
    estimator = BackgroundModelEstimator(ENERGY, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis, fov_alignment=alignment)
    excluded = BackgroundModelEstimator(
        ENERGY, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis, fov_alignment=alignment, exclusion=[CircleSkyRegion(center, 0.4 * u.deg)]
    )
    _, full = fill_run(run, estimator)
    _, cut = fill_run(run, excluded)
    d_energy = ENERGY.bin_width[0].to_value("MeV")
    excluded_solid_angle = (full[0] - cut[0]).sum() / (ONTIME * d_energy)
    assert_allclose(excluded_solid_angle, ring_area(0, 0.4), rtol=5e-3)
    assert_allclose(full[0], ONTIME * d_energy * fov_solid_angle(lon_axis, lat_axis).value, rtol=1e-12)


def test_reverse_lon_radec_mirrors_radec(tmp_path):
    """gammapy's alignment of the released H.E.S.S. models is RADEC with fov_lon mirrored."""
    rng = np.random.default_rng(5)
    sky = POINTING.directional_offset_by(rng.uniform(0, 360, 300) * u.deg, rng.uniform(0, 2.0, 300) * u.deg)
    run = write_run(tmp_path / "run.fits", np.full(300, 0.7), sky)
    lon_axis = MapAxis.from_bounds(-2, 2, 8, unit="deg", name="fov_lon")
    lat_axis = MapAxis.from_bounds(-2, 2, 8, unit="deg", name="fov_lat")
    exclusion = [CircleSkyRegion(POINTING.directional_offset_by(60 * u.deg, 1 * u.deg), 0.5 * u.deg)]
    radec, reverse = (
        fill_run(run, BackgroundModelEstimator(ENERGY, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis, fov_alignment=alignment, exclusion=exclusion))
        for alignment in ("RADEC", "REVERSE_LON_RADEC")
    )
    for a, b in zip(radec, reverse):
        assert_allclose(a, b[:, ::-1, :], rtol=1e-12)
    assert radec[0].sum() > 0 and not np.allclose(radec[1], reverse[1])


def one_run(axes, counts, exposure):
    """A container of one run with these counts and exposure (s MeV sr)."""
    return BackgroundHistograms(
        axes, np.asarray(counts, float)[None], np.asarray(exposure, float)[None] * u.Unit("s MeV sr"), Table({"OBS_ID": [1]})
    )


def test_model_extrapolates_unmeasured_energies_as_power_laws():
    """Zeros next to measured bins would make gammapy's log interpolation collapse."""
    energy = MapAxis.from_energy_bounds("0.1 TeV", "100 TeV", nbin=6, name="energy")
    offset = MapAxis.from_edges([0, 1, 2] * u.deg, name="offset")
    axes = MapAxes([energy, offset])
    e = energy.center.to_value("TeV")[:, None]
    exposure = np.ones((6, 2))
    exposure[:2] = 0  # below every run's threshold
    counts = np.where(exposure > 0, 1e4 * e**-2.7 * [1, 2], 0)
    counts[5] = 0  # no event in the last bin
    bkg = one_run(axes, counts, exposure).to_irf()
    # the slopes of the summed spectrum (index 2.7) continue each offset's own rate
    assert_allclose(bkg.quantity.to_value("s-1 MeV-1 sr-1"), 1e4 * e**-2.7 * [1, 2], rtol=1e-10)
    assert_allclose(bkg.meta["EMEASMIN"], energy.edges[2].to_value("TeV"))

    # a single event does not set the slope: the last bin with >= 10 events and its neighbour do
    counts[4] = [1, 0]
    rate = one_run(axes, counts, exposure).to_irf().data
    assert rate[5, 0] < rate[4, 0] and rate[5, 1] < rate[3, 1]


def three_runs():
    axes = MapAxes([ENERGY, OFFSET])
    rng = np.random.default_rng(7)
    counts = rng.poisson(50, (3, *axes.shape)).astype(float)
    exposure = rng.uniform(1, 2, (3, *axes.shape)) * 1e9 * u.Unit("s MeV sr")
    table = Table({"OBS_ID": [11, 12, 13], "LIVETIME": [1000.0, 1200.0, 900.0] * u.s})
    return BackgroundHistograms(axes, counts, exposure, table)


def test_select_and_weighted_sum():
    runs = three_runs()
    two = runs.select([13, 11])
    assert two.obs_ids == [13, 11] and len(two) == 2
    assert_allclose(two.counts, runs.counts[[2, 0]], rtol=0)
    counts, exposure = two.sum(weights=[2, 1])
    assert_allclose(counts, runs.counts[[0, 2]].sum(0), rtol=0)
    assert_allclose(exposure.to_value("s MeV sr"), 2 * runs.exposure.value[2] + runs.exposure.value[0], rtol=1e-12)
    # weights per run and energy bin
    weights = np.array([[1, 2, 3], [1, 1, 1]])
    _, exposure = two.sum(weights=weights)
    expected = runs.exposure.value[2] * np.array([1, 2, 3])[:, None] + runs.exposure.value[0]
    assert_allclose(exposure.value, expected, rtol=1e-12)
    with pytest.raises(KeyError, match=r"Runs \[9\] are not in these histograms"):
        runs.select([9])
    with pytest.raises(ValueError, match="The run selection is empty"):
        runs.select([])


def test_summed_rate_error_and_livetime():
    runs = three_runs()
    counts, exposure = runs.counts.sum(0), runs.exposure.value.sum(0)
    assert runs.rate.unit == u.Unit("s-1 MeV-1 sr-1")
    assert_allclose(runs.rate.to_value("s-1 MeV-1 sr-1"), counts / exposure, rtol=1e-12)
    assert_allclose(runs.relative_error, 1 / np.sqrt(counts), rtol=1e-12)
    assert_allclose(runs.livetime, [1000, 1200, 900])
    # invariant: the model's rate x the summed exposure gives back the counts
    bkg = runs.to_irf()
    assert_allclose(bkg.quantity.to_value("s-1 MeV-1 sr-1") * exposure, counts, rtol=1e-12)
    assert bkg.meta["NRUNS"] == 3 and bkg.meta["NEVENTS"] == counts.sum()


def test_livetime_refuses_non_positive_values():
    runs = three_runs()
    runs.obs_table["LIVETIME"][1] = -5
    with pytest.raises(ValueError, match=r"Runs \[12\] have LIVETIME <= 0 or NaN"):
        runs.livetime


def test_smoothing_keeps_a_flat_rate_and_spreads_a_peak():
    """Counts and exposure are smoothed alike: a flat rate stays flat, a peak spreads to its neighbours."""
    axes = MapAxes([ENERGY, OFFSET])
    exposure = np.outer([1.0, 2.0, 3.0], [1.0, 3.0, 5.0]) * 1e9
    runs = one_run(axes, 2e-9 * exposure, exposure)
    smoothed = runs.to_irf(smooth_sigma=1.0)
    assert_allclose(smoothed.quantity.to_value("s-1 MeV-1 sr-1"), 2e-9, rtol=1e-12)
    peaked = np.zeros(axes.shape)
    peaked[:, 1] = 100
    data = one_run(axes, peaked, np.ones(axes.shape) * 1e9).to_irf(smooth_sigma=1.0).data
    assert np.all(data[:, 0] > 0) and np.all(data[:, 1] < 100e-9)
    with pytest.raises(ValueError, match="smooth_sigma must be positive"):
        runs.to_irf(smooth_sigma=-1)


def test_fov_lat_slope_by_hand():
    """log(upper / lower half's rate) over the distance of their mean fov_lat, by hand for expected counts of a
    rate exp(g x fov_lat); a bin without events takes its neighbours' slope; only ALTAZ 3D histograms have one."""
    energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=5, name="energy")
    lon_axis, lat_axis = (MapAxis.from_bounds(-2.5, 2.5, 10, unit="deg", name=name) for name in ("fov_lon", "fov_lat"))
    lon, lat = np.meshgrid(lon_axis.center.value, lat_axis.center.value, indexing="ij")
    g = -0.04  # per deg: the lower half brighter
    exposure = np.ones((5, 10, 10)) * np.arange(1, 6)[:, None, None]
    counts = 1e6 * exposure * np.exp(g * lat)
    counts[2] = 0  # no event in the middle energy bin
    slope = one_run(MapAxes([energy, lon_axis, lat_axis]), counts, exposure).fov_lat_slope(offset_max=2.0)
    inner = np.hypot(lon, lat) < 2.0
    lower, upper = inner & (lat < 0), inner & (lat > 0)
    expected = np.log(np.exp(g * lat[upper]).sum() / np.exp(g * lat[lower]).sum()) / (lat[upper].mean() - lat[lower].mean())
    assert_allclose(slope, expected, rtol=1e-9)  # the same in every bin, the empty one included
    assert abs(expected - g) < 0.002  # the definition measures the slope
    with pytest.raises(ValueError, match="fov_lat_slope needs ALTAZ 3D histograms"):
        three_runs().fov_lat_slope()
