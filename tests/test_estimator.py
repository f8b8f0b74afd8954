"""The estimator on the real H.E.S.S. off runs: independent check, parallel paths, errors."""

import numpy as np
import astropy.units as u
from numpy.testing import assert_allclose
import pytest
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxis
from bkgtemplate import BackgroundModelEstimator, RunError, default_energy_axis, default_offset_axis


@pytest.fixture(scope="session")
def off_ids(hess_store):
    table = hess_store.obs_table
    return [int(obs_id) for obs_id in table["OBS_ID"][table["TARGET_NAME"] == "Off data"]]


@pytest.fixture(scope="session")
def hess_2d(hess_store, off_ids):
    return BackgroundModelEstimator().fill_histograms(hess_store, off_ids)


def direct_2d_rate(data_store, obs_ids, energy_axis, offset_axis):
    """The original tutorial's loop, with this project's conventions: gammapy observations,
    SkyCoord separations, np.histogram2d, ONTIME, exact ring areas and safe thresholds."""
    e_edges = energy_axis.edges.to_value("TeV")
    r_edges = offset_axis.edges.to_value("deg")
    counts = np.zeros((energy_axis.nbin, offset_axis.nbin))
    exposure = np.zeros_like(counts)
    ring = 2 * np.pi * (np.cos(np.deg2rad(r_edges[:-1])) - np.cos(np.deg2rad(r_edges[1:])))
    d_energy = np.diff(e_edges) * 1e6
    for obs in data_store.get_observations(obs_ids, required_irf=[]):
        events = obs.events
        offset = events.radec.separation(obs.pointing.fixed_icrs).deg
        run_counts, _, _ = np.histogram2d(events.energy.to_value("TeV"), offset, bins=[e_edges, r_edges])
        row = data_store.obs_table[data_store.obs_table["OBS_ID"] == obs.obs_id][0]
        used = e_edges[:-1] >= row["SAFE_ENERGY_LO"] * (1 - 1e-6)
        counts += run_counts * used[:, None]
        exposure += row["ONTIME"] * np.outer(d_energy * used, ring)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, counts / exposure


def test_2d_agrees_with_direct_histogram(hess_store, off_ids, hess_2d):
    counts, rate = direct_2d_rate(hess_store, off_ids, default_energy_axis(), default_offset_axis())
    assert_allclose(hess_2d.counts, counts, atol=0)
    assert_allclose(hess_2d.rate.to_value("s-1 MeV-1 sr-1"), rate, rtol=1e-10)
    assert hess_2d.counts.sum() > 1e5
    assert len(hess_2d.obs_ids) == 45


def test_model_is_finite_and_matches_rate(hess_store, off_ids, hess_2d):
    bkg = BackgroundModelEstimator().make_model(hess_2d)
    assert isinstance(bkg, Background2D)
    assert np.isfinite(bkg.data).all()
    assert bkg.unit == u.Unit("s-1 MeV-1 sr-1")
    measured = np.isfinite(hess_2d.rate.value) & (hess_2d.counts > 0)
    assert_allclose(bkg.quantity[measured], hess_2d.rate[measured], rtol=1e-12)
    # invariant: rate x exposure gives back the counts
    assert_allclose((bkg.quantity * hess_2d.exposure)[measured].to_value(""), hess_2d.counts[measured], rtol=1e-10)


def test_serial_and_multiprocessing_agree(hess_store, off_ids, hess_2d):
    parallel = BackgroundModelEstimator(n_jobs=2).fill_histograms(hess_store, off_ids)
    assert_allclose(parallel.counts, hess_2d.counts, atol=0)
    assert_allclose(parallel.exposure, hess_2d.exposure, rtol=1e-12)


@pytest.mark.ci
def test_serial_and_ray_agree(hess_store, off_ids, hess_2d):
    ray = pytest.importorskip("ray", reason="ray absent: pip install -e '.[distributed]' (CI does)")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        estimator = BackgroundModelEstimator(n_jobs=2, parallel_backend="ray")
        result = estimator.fill_histograms(hess_store, off_ids[:12])
    finally:
        ray.shutdown()
    serial = BackgroundModelEstimator().fill_histograms(hess_store, off_ids[:12])
    assert_allclose(result.counts, serial.counts, atol=0)
    assert_allclose(result.exposure, serial.exposure, rtol=1e-12)


def test_3d_altaz_model(hess_store, off_ids):
    axes = [MapAxis.from_bounds(-2.5, 2.5, 10, unit="deg", name=name) for name in ("fov_lon", "fov_lat")]
    estimator = BackgroundModelEstimator(fov_lon_axis=axes[0], fov_lat_axis=axes[1])
    bkg = estimator.run(hess_store, off_ids[:10])
    assert isinstance(bkg, Background3D)
    assert bkg.fov_alignment.value == "ALTAZ"
    assert bkg.meta["FOVALIGN"] == "ALTAZ"
    assert np.isfinite(bkg.data).all()
    # the FOVALIGN keyword is written and read back
    table_hdu = bkg.to_table_hdu()
    assert table_hdu.header["FOVALIGN"] == "ALTAZ"
    assert Background3D.from_table(bkg.to_table()).fov_alignment.value == "ALTAZ"


def test_exclusion_keeps_counts_and_exposure_consistent(hess_store, off_ids):
    """Cutting a circle out of every off field lowers counts and exposure by the same fraction."""
    from regions import CircleSkyRegion
    from astropy.coordinates import SkyCoord

    obs_ids = off_ids[:6]
    table = hess_store.obs_table.select_obs_id(obs_ids)
    regions = [
        CircleSkyRegion(SkyCoord(row["RA_PNT"], row["DEC_PNT"], unit="deg").directional_offset_by(0 * u.deg, 1 * u.deg), 0.5 * u.deg)
        for row in table
    ]
    full = BackgroundModelEstimator().fill_histograms(hess_store, obs_ids)
    cut = BackgroundModelEstimator(exclusion=regions).fill_histograms(hess_store, obs_ids)
    assert cut.counts.sum() < full.counts.sum()
    kept_exposure = cut.exposure.sum() / full.exposure.sum()
    kept_counts = cut.counts[3:].sum() / full.counts[3:].sum()
    assert 0.9 < kept_exposure < 1
    # background is roughly flat within 1.5 deg: counts follow the exposure within statistics
    assert_allclose(kept_counts, kept_exposure, rtol=0.03)


def test_skip_bad_runs(hess_store, off_ids, caplog):
    estimator = BackgroundModelEstimator(on_error="skip")
    result = estimator.fill_histograms(hess_store, off_ids[:2])
    assert len(result.skipped) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fov_alignment="GALACTIC"), ValueError, r"Unknown fov_alignment 'GALACTIC'; choose one of \['ALTAZ', 'RADEC'\]"),
        (dict(on_error="ignore"), ValueError, r"Unknown on_error 'ignore'"),
        (dict(offset_axis=MapAxis.from_bounds(0, 15, 3, unit="deg", name="offset")), ValueError, r"offset axis reaches 15.0 deg"),
        (dict(offset_axis=MapAxis.from_bounds(0, 2, 3, unit="deg", name="theta")), ValueError, r"The offset axis is named 'theta'"),
        (dict(energy_axis=MapAxis.from_bounds(0, 2, 3, unit="deg", name="energy")), u.UnitsError, r"energy axis has unit deg"),
        (dict(smooth_sigma=0), ValueError, r"smooth_sigma must be positive"),
        (dict(fov_lon_axis=MapAxis.from_bounds(-2, 2, 4, unit="deg", name="fov_lon")), ValueError, r"Give both fov_lon_axis and fov_lat_axis"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        BackgroundModelEstimator(**kwargs)


def test_empty_selection(hess_store):
    with pytest.raises(ValueError, match="The run selection is empty"):
        BackgroundModelEstimator().fill_histograms(hess_store, [])


def test_unknown_run(hess_store):
    with pytest.raises(ValueError, match=r"Runs \[1\] are not in the obs index"):
        BackgroundModelEstimator().fill_histograms(hess_store, [1])
