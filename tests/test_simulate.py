"""Tests of the simulated archive (`bkgtemplate.simulate`), of its background truth and of the
truth's bin averages (`expected_rate`, in tests/truth.py).

Expected truth values are computed here with scipy and closed-form solid angles, never with
the package's functions, so that the truth-recovery tests compare the estimator with
something it does not share code with.
"""

import ast
import gzip
import os
import stat
import numpy as np
import astropy.units as u
import pytest
from astropy.coordinates import AltAz, SkyCoord
from astropy.coordinates.erfa_astrom import ErfaAstromInterpolator, erfa_astrom
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose
from scipy import integrate, optimize
from gammapy.data import DataStore
from gammapy.datasets import MapDataset
from gammapy.makers import MapDatasetMaker
from gammapy.maps import MapAxis, WcsGeom
from gammapy.utils.coordinates import FoVAltAzFrame
from bkgtemplate import simulate
from bkgtemplate.simulate import RATE_UNIT, SOURCE_POSITION, BackgroundTruth, simulate_archive
from truth import expected_rate


@pytest.fixture(scope="session")
def data_store(simulated_archive):
    return DataStore.from_dir(simulated_archive)


@pytest.fixture(scope="session")
def off_runs(data_store):
    table = data_store.obs_table
    return Table(table[table["TARGET_NAME"] == "Off data"])


def read_events(path, obs_id):
    with fits.open(path / "data" / f"run_{obs_id:06d}.fits.gz") as hdulist:
        return Table(hdulist["EVENTS"].data)


def ring_solid_angle(r_lo, r_hi):
    """Hand calculation (deg in, sr out)."""
    return 2 * np.pi * (np.cos(np.deg2rad(r_lo)) - np.cos(np.deg2rad(r_hi)))


def small_archive(path, seed):
    path = simulate_archive(path, n_off_runs=2, n_source_runs=1, seed=seed)
    return [read_events(path, obs_id) for obs_id in (1000, 1001, 1002)]


# -- truth ---------------------------------------------------------------------------------


def single_run(zenith=30.0, muoneff=1.1, ontime=1000.0, threshold=1.0):
    table = Table()
    table["ONTIME"] = [ontime] * u.s
    table["ZEN_PNT"] = [zenith] * u.deg
    table["MUONEFF"] = [muoneff]
    table["SAFE_ENERGY_LO"] = [threshold] * u.TeV
    return table


def test_truth_defaults_and_validation():
    truth = BackgroundTruth()
    assert truth.index == 2.7
    assert truth.offset_max == 2.8 * u.deg
    assert BackgroundTruth(radial_width="1 deg").radial_width == 1 * u.deg
    with pytest.raises(ValueError, match="altaz_gradient"):
        BackgroundTruth(altaz_gradient=1 / u.deg)
    with pytest.raises(u.UnitsError, match="norm"):
        BackgroundTruth(norm=1 * u.s)


def test_truth_evaluate():
    truth = BackgroundTruth()
    kwargs = dict(zenith=20 * u.deg, muoneff=1.0)
    rate = truth.evaluate(1 * u.TeV, 0 * u.deg, 0 * u.deg, **kwargs)
    assert rate.unit == RATE_UNIT
    eps = 1 / (1 + (0.15 * np.cos(np.deg2rad(20)) ** -2.5) ** 4)
    assert_allclose(rate.value, 1.3e-4 / np.cos(np.deg2rad(20)) * eps, rtol=1e-12)
    # higher rate toward lower altitude, zero outside the FoV and the energy range
    lower, higher = truth.evaluate(1 * u.TeV, 0 * u.deg, [-1, 1] * u.deg, **kwargs).value
    assert_allclose(lower / higher, 1.1 / 0.9, rtol=1e-12)
    assert truth.evaluate(1 * u.TeV, 2.9 * u.deg, 0 * u.deg, **kwargs) == 0
    assert truth.evaluate(200 * u.TeV, 0 * u.deg, 0 * u.deg, **kwargs) == 0
    # higher normalisation and threshold at higher zenith, rate ~ MUONEFF^1.5
    high = truth.evaluate(10 * u.TeV, 0 * u.deg, 0 * u.deg, zenith=50 * u.deg, muoneff=1.0)
    low = truth.evaluate(10 * u.TeV, 0 * u.deg, 0 * u.deg, zenith=0 * u.deg, muoneff=1.0)
    assert high > low
    assert truth.rolloff_energy(50 * u.deg) > truth.rolloff_energy(20 * u.deg)
    ratio = truth.evaluate(10 * u.TeV, 0 * u.deg, 0 * u.deg, zenith=0 * u.deg, muoneff=1.2) / low
    assert_allclose(ratio, 1.2**1.5, rtol=1e-12)


def test_safe_energy_threshold():
    truth = BackgroundTruth()
    zenith = [0, 20, 45, 55] * u.deg
    threshold = truth.safe_energy_threshold(zenith).to_value("TeV")
    assert np.all(threshold >= 2 * truth.rolloff_energy(zenith).to_value("TeV"))
    assert np.all(threshold < 2 * truth.rolloff_energy(zenith).to_value("TeV") * 10**0.03)
    assert_allclose(np.log10(threshold) / 0.03, np.round(np.log10(threshold) / 0.03), atol=1e-9)
    assert np.all(np.diff(threshold) > 0)


def test_expected_rate_offset_hand_calculation():
    truth = BackgroundTruth()
    energy_axis = MapAxis.from_energy_edges([0.5, 1, 10] * u.TeV)
    offset_axis = MapAxis.from_edges([0, 2.8] * u.deg, name="offset")
    rate = expected_rate(truth, single_run(), energy_axis, offset_axis=offset_axis)
    assert rate.unit == RATE_UNIT
    assert rate.shape == (2, 1)
    assert np.isnan(rate[0, 0])  # below SAFE_ENERGY_LO: no run contributes

    cos_z, e_th = np.cos(np.deg2rad(30)), 0.15 * np.cos(np.deg2rad(30)) ** -2.5
    spectrum = integrate.quad(lambda e: e**-2.7 / (1 + (e_th / e) ** 4), 1, 10, epsrel=1e-12)[0] / 9
    width, r_max = np.deg2rad(1.5), np.deg2rad(2.8)
    ring = integrate.quad(lambda r: np.exp(-0.5 * (r / width) ** 2) * 2 * np.pi * np.sin(r), 0, r_max)[0]
    expected = 1.3e-4 / cos_z * 1.1**1.5 * spectrum * ring / (2 * np.pi * (1 - np.cos(r_max)))
    assert_allclose(rate[1, 0].value, expected, rtol=1e-9)

    no_threshold = expected_rate(truth, single_run(), energy_axis, offset_axis=offset_axis, safe_threshold=False)
    assert np.isfinite(no_threshold).all()

    # a ring across offset_max: the rate integrates to 2.8 deg, the solid angle to 3.5 deg
    across_axis = MapAxis.from_edges([2, 3.5] * u.deg, name="offset")
    across = expected_rate(truth, single_run(), energy_axis, offset_axis=across_axis)
    part = integrate.quad(lambda r: np.exp(-0.5 * (r / width) ** 2) * 2 * np.pi * np.sin(r), np.deg2rad(2), r_max)[0]
    expected = 1.3e-4 / cos_z * 1.1**1.5 * spectrum * part / ring_solid_angle(2, 3.5)
    assert_allclose(across[1, 0].value, expected, rtol=1e-9)


def test_expected_rate_weights_runs_by_ontime_and_threshold():
    truth = BackgroundTruth()
    energy_axis = MapAxis.from_energy_edges([0.5, 1, 10] * u.TeV)
    offset_axis = MapAxis.from_edges([0, 1, 2] * u.deg, name="offset")
    run_a = single_run(zenith=10, muoneff=0.9, ontime=1000, threshold=0.4)
    run_b = single_run(zenith=45, muoneff=1.2, ontime=3000, threshold=1.0)
    both = Table(np.concatenate([run_a.as_array(), run_b.as_array()]))
    for name in ("ONTIME", "ZEN_PNT", "SAFE_ENERGY_LO"):
        both[name].unit = run_a[name].unit
    rate = expected_rate(truth, both, energy_axis, offset_axis=offset_axis)
    rate_a = expected_rate(truth, run_a, energy_axis, offset_axis=offset_axis)
    rate_b = expected_rate(truth, run_b, energy_axis, offset_axis=offset_axis)
    assert_allclose(rate[0], rate_a[0], rtol=1e-12)  # run b is below its threshold there
    assert_allclose(rate[1], (1000 * rate_a[1] + 3000 * rate_b[1]) / 4000, rtol=1e-12)


def test_expected_rate_fov_hand_calculation():
    truth = BackgroundTruth()
    energy_axis = MapAxis.from_energy_edges([1, 10] * u.TeV)
    run = single_run()
    # one bin holding the whole FoV: the gradient averages out, as in the ring
    wide = MapAxis.from_edges([-3, 3] * u.deg, name="fov_lon"), MapAxis.from_edges([-3, 3] * u.deg, name="fov_lat")
    rate = expected_rate(truth, run, energy_axis, fov_lon_axis=wide[0], fov_lat_axis=wide[1])
    ring = expected_rate(truth, run, energy_axis, offset_axis=MapAxis.from_edges([0, 2.8] * u.deg, name="offset"))
    box = np.deg2rad(6) * 2 * np.sin(np.deg2rad(3))
    disk = 2 * np.pi * (1 - np.cos(np.deg2rad(2.8)))
    assert rate.shape == (1, 1, 1)
    assert_allclose(rate[0, 0, 0], ring[0, 0] * disk / box, rtol=1e-9)

    # a bin inside the FoV above the pointing, against scipy
    lon_axis = MapAxis.from_edges([-0.5, 0.5] * u.deg, name="fov_lon")
    lat_axis = MapAxis.from_edges([0.5, 1.5] * u.deg, name="fov_lat")
    rate = expected_rate(truth, run, energy_axis, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis)
    zenith, muoneff = 30 * u.deg, 1.1

    def spatial(lat, lon):
        value = truth.evaluate(1 * u.TeV, lon * u.rad, lat * u.rad, zenith, muoneff)
        return value.value * np.cos(lat)

    lon, lat = np.deg2rad([-0.5, 0.5]), np.deg2rad([0.5, 1.5])
    spatial_mean = integrate.dblquad(spatial, *lon, *lat, epsrel=1e-10)[0]
    spatial_mean /= np.diff(lon)[0] * np.diff(np.sin(lat))[0]
    spectrum = integrate.quad(
        lambda e: truth.evaluate(e * u.TeV, 0 * u.deg, 0 * u.deg, zenith, muoneff).value, 1, 10, epsrel=1e-12
    )[0] / 9
    centre = truth.evaluate(1 * u.TeV, 0 * u.deg, 0 * u.deg, zenith, muoneff).value
    assert_allclose(rate[0, 0, 0].value, spectrum * spatial_mean / centre, rtol=1e-8)
    # more background below the pointing than above it
    lat_below = MapAxis.from_edges([-1.5, -0.5] * u.deg, name="fov_lat")
    below = expected_rate(truth, run, energy_axis, fov_lon_axis=lon_axis, fov_lat_axis=lat_below)
    assert below[0, 0, 0] > rate[0, 0, 0]


def test_expected_rate_fov_bin_across_the_disk_edge():
    """A (fov_lon, fov_lat) bin cut by offset_max, against nested scipy quadrature."""
    truth = BackgroundTruth()
    energy_axis = MapAxis.from_energy_edges([1, 10] * u.TeV)
    lon_axis = MapAxis.from_edges([2.0, 3.0] * u.deg, name="fov_lon")
    lat_axis = MapAxis.from_edges([-1.5, 0.5] * u.deg, name="fov_lat")
    rate = expected_rate(truth, single_run(), energy_axis, fov_lon_axis=lon_axis, fov_lat_axis=lat_axis)
    zenith, muoneff = 30 * u.deg, 1.1
    r_max, lon = np.deg2rad(2.8), np.deg2rad([2.0, 3.0])

    def row(lat):  # integral over fov_lon inside the disk: cos(lat) cos(lon) >= cos(r_max)
        half = np.arccos(min(1.0, np.cos(r_max) / np.cos(lat)))
        f = lambda x: truth.evaluate(1 * u.TeV, x * u.rad, lat * u.rad, zenith, muoneff).value  # noqa: E731
        lo, hi = lon[0], min(lon[1], half)
        return integrate.quad(f, lo, hi, epsabs=0, epsrel=1e-12)[0] * np.cos(lat) if hi > lo else 0.0

    kink = np.arccos(np.cos(r_max) / np.cos(lon[0]))  # where the disk edge meets fov_lon = 2 deg
    integral = integrate.quad(row, np.deg2rad(-1.5), np.deg2rad(0.5), points=[-kink], epsabs=0, epsrel=1e-11)[0]
    area = np.diff(lon)[0] * (np.sin(np.deg2rad(0.5)) - np.sin(np.deg2rad(-1.5)))
    spectrum = integrate.quad(
        lambda e: truth.evaluate(e * u.TeV, 0 * u.deg, 0 * u.deg, zenith, muoneff).value, 1, 10, epsrel=1e-12
    )[0] / 9
    centre = truth.evaluate(1 * u.TeV, 0 * u.deg, 0 * u.deg, zenith, muoneff).value
    assert 0 < rate[0, 0, 0].value
    assert_allclose(rate[0, 0, 0].value, spectrum * integral / area / centre, rtol=1e-8)


def test_truth_input_errors():
    truth = BackgroundTruth()
    with pytest.raises(ValueError, match="offset_axis"):
        expected_rate(truth, single_run(), MapAxis.from_energy_edges([1, 10] * u.TeV))
    with pytest.raises(KeyError, match="MUONEFF"):
        truth.expected_counts(single_run()["ONTIME", "ZEN_PNT"])


# -- archive -------------------------------------------------------------------------------


def test_determinism(tmp_path):
    first = small_archive(tmp_path / "a", seed=3)
    again = small_archive(tmp_path / "b", seed=3)
    other = small_archive(tmp_path / "c", seed=4)
    for events_a, events_b in zip(first, again):
        for name in ("EVENT_ID", "TIME", "RA", "DEC", "ENERGY"):
            assert np.array_equal(events_a[name], events_b[name])
    for name in ("obs-index.fits.gz", "hdu-index.fits.gz", "data/run_001000.fits.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(first[0]) != len(other[0]) or not np.array_equal(first[0]["ENERGY"], other[0]["ENERGY"])


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    (path / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError, match=f"{path}.*overwrite=True"):
        simulate_archive(path, n_off_runs=1, n_source_runs=0)
    assert (path / "keep.txt").exists()
    # a folder it did not write is never replaced, not even with overwrite=True
    with pytest.raises(FileExistsError, match="not an archive simulated by bkgtemplate.*keep.txt"):
        simulate_archive(path, n_off_runs=1, n_source_runs=0, overwrite=True)
    assert (path / "keep.txt").read_text() == "data"
    (path / "keep.txt").unlink()
    simulate_archive(path, n_off_runs=1, n_source_runs=0)
    simulate_archive(path, n_off_runs=2, n_source_runs=0, overwrite=True)
    assert len(Table.read(path / "obs-index.fits.gz")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary folder left


def test_archive_folders_get_the_users_permissions(tmp_path):
    """Not tempfile.mkdtemp's 0700: folders are 0777 and files 0666 less the umask."""
    old = os.umask(0o022)
    try:
        path = simulate_archive(tmp_path / "a022", n_off_runs=1, n_source_runs=0)
        os.umask(0o027)
        other = simulate_archive(tmp_path / "a027", n_off_runs=1, n_source_runs=0)
    finally:
        os.umask(old)
    for folder, mask in ((path, 0o022), (other, 0o027)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        assert stat.S_IMODE((folder / "data").stat().st_mode) == 0o777 & ~mask
        assert stat.S_IMODE((folder / "obs-index.fits.gz").stat().st_mode) == 0o666 & ~mask


def test_interrupted_write_leaves_no_partial_archive(tmp_path, monkeypatch):
    path = simulate_archive(tmp_path / "store", n_off_runs=1, n_source_runs=0, seed=1)
    before = (path / "obs-index.fits.gz").read_bytes()
    calls = []

    def interrupt(data, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return compress(data, **kwargs)

    compress = gzip.compress
    monkeypatch.setattr(gzip, "compress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        simulate_archive(path, n_off_runs=2, n_source_runs=0, seed=2, overwrite=True)
    assert len(calls) == 2
    assert (path / "obs-index.fits.gz").read_bytes() == before  # the old archive is kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # and no temporary folder is left


def test_module_imports_nothing_of_the_estimator():
    """The truth must not share code with the estimator (e.g. its solid angles): from the package,
    only the store's helpers for safe writing are imported."""
    tree = ast.parse(open(simulate.__file__).read())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    relative = [(node.module, [a.name for a in node.names]) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == [("store", ["check_replaceable", "staged_write"])]
    assert {name.split(".")[0] for name in imported} <= {
        "gzip", "io", "logging", "dataclasses", "pathlib", "numpy", "scipy", "astropy", "gammapy",
    }


def test_bin_averages_import_nothing_of_the_estimator():
    """tests/truth.py averages the truth over bins with the truth's own functions: of the package, only simulate."""
    tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "truth.py")).read())
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert {name for name in modules if name.startswith("bkgtemplate")} == {"bkgtemplate.simulate"}
    assert {name.split(".")[0] for name in modules} <= {"numpy", "astropy", "bkgtemplate"}


def test_obs_index(data_store):
    table = data_store.obs_table
    assert len(table) == 30
    units = dict(
        RA_PNT="deg", DEC_PNT="deg", ALT_PNT="deg", AZ_PNT="deg", ZEN_PNT="deg", ONTIME="s", LIVETIME="s",
        TSTART="s", TSTOP="s", RA_OBJ="deg", DEC_OBJ="deg", SAFE_ENERGY_LO="TeV", SAFE_ENERGY_HI="TeV",
    )
    for name, unit in units.items():
        assert table[name].unit == u.Unit(unit), name
    for name in ("OBS_ID", "DEADC", "TARGET_NAME", "MUONEFF", "EVENT_COUNT", "N_TELS", "QUALITY", "DATE-OBS"):
        assert name in table.colnames
    for key in ("MJDREFI", "MJDREFF", "TIMESYS", "TIMEUNIT", "GEOLON", "GEOLAT", "ALTITUDE"):
        assert key in table.meta
    assert table.meta["HDUCLASS"] == "GADF" and table.meta["HDUCLAS2"] == "OBS"
    assert data_store.hdu_table.meta["HDUCLAS2"] == "HDU"
    assert "bkg" not in set(data_store.hdu_table["HDU_TYPE"])

    assert np.sum(table["TARGET_NAME"] == "Off data") == 24
    assert 5 < table["ZEN_PNT"].min() < 10 and 50 < table["ZEN_PNT"].max() < 56
    assert 0.85 <= table["MUONEFF"].min() and table["MUONEFF"].max() <= 1.2
    assert_allclose(table["LIVETIME"], table["ONTIME"] * table["DEADC"], rtol=1e-6)
    assert_allclose(table["TSTOP"] - table["TSTART"], table["ONTIME"], rtol=1e-9)
    assert np.all(np.abs(table["ONTIME"] - 28 * 60) < 120)
    # SAFE_ENERGY_LO rises with zenith
    order = np.argsort(table["ZEN_PNT"])
    assert np.all(np.diff(table["SAFE_ENERGY_LO"][order]) >= 0)
    # ALT/AZ_PNT are astropy's alt-az at mid-run
    obs = data_store.obs(int(table["OBS_ID"][0]), required_irf=["aeff"])
    mid = obs.tmid
    altaz = obs.get_pointing_altaz(mid)
    assert_allclose([altaz.alt.deg, altaz.az.deg], [table["ALT_PNT"][0], table["AZ_PNT"][0]], atol=1e-6)
    years = obs.tstart.decimalyear
    assert 2004 <= years < 2010
    source = table[table["TARGET_NAME"] == "Simulated source"]
    assert_allclose(source["RA_OBJ"], SOURCE_POSITION.ra.deg)
    pointing = SkyCoord(source["RA_PNT"], source["DEC_PNT"])
    assert_allclose(pointing.separation(SOURCE_POSITION).deg, 0.5, atol=1e-9)
    assert 150_000 < table["EVENT_COUNT"].sum() < 300_000


def test_data_store_loads_every_run(data_store):
    observations = data_store.get_observations(required_irf=["aeff", "edisp", "psf"])
    assert len(observations) == 30
    for obs, row in zip(observations, data_store.obs_table):
        assert obs.obs_id == row["OBS_ID"]
        assert len(obs.events.table) == row["EVENT_COUNT"]
        assert obs.aeff is not None and obs.edisp is not None and obs.psf is not None
        assert_allclose(obs.observation_time_duration.to_value("s"), row["ONTIME"], rtol=1e-9)
        assert_allclose(obs.observation_live_time_duration.to_value("s"), row["LIVETIME"], rtol=1e-6)
    obs = observations[0]
    assert obs.events.table.meta["OBS_MODE"] == "POINTING"
    assert 0.85 <= obs.events.table.meta["MUONEFF"] <= 1.2
    assert obs.observatory_earth_location.lat.to_value("deg") == pytest.approx(-23.2718, abs=1e-4)


def test_map_dataset_maker(data_store):
    table = data_store.obs_table
    obs_id = int(table["OBS_ID"][table["TARGET_NAME"] == "Simulated source"][0])
    obs = data_store.obs(obs_id, required_irf=["aeff", "edisp", "psf"])
    energy_axis = MapAxis.from_energy_bounds(0.5, 10, 4, unit="TeV")
    geom = WcsGeom.create(skydir=SOURCE_POSITION, width=2 * u.deg, binsz=0.05, axes=[energy_axis])
    energy_true = MapAxis.from_energy_bounds(0.3, 30, 10, unit="TeV", name="energy_true")
    empty = MapDataset.create(geom, energy_axis_true=energy_true)
    dataset = MapDatasetMaker(selection=["counts", "exposure", "edisp", "psf"]).run(empty, obs)
    assert dataset.counts.data.sum() > 0
    assert np.all(dataset.exposure.data > 0)
    assert dataset.psf is not None and dataset.edisp is not None
    # the source stands out: counts within 0.2 deg of it against a ring of the same area
    separation = geom.separation(SOURCE_POSITION).to_value("deg")
    counts = dataset.counts.data.sum(axis=0)
    on = counts[separation < 0.2].sum()
    off = counts[(separation > 0.6) & (separation < np.hypot(0.6, 0.2))].sum()
    assert on > 3 * off + 30


def test_counts_per_run_match_truth(simulated_archive, off_runs):
    truth = BackgroundTruth()
    expected = truth.expected_counts(off_runs)
    observed = np.array([len(read_events(simulated_archive, int(obs_id))) for obs_id in off_runs["OBS_ID"]])
    pull = (observed - expected) / np.sqrt(expected)
    assert np.all(np.abs(pull) < 4), pull
    assert abs(np.sum(observed - expected)) < 4 * np.sqrt(np.sum(expected))
    # above each run's threshold
    above = []
    for row in off_runs:
        events = read_events(simulated_archive, int(row["OBS_ID"]))
        above.append(np.sum(events["ENERGY"] >= row["SAFE_ENERGY_LO"]))
    expected_above = np.array([
        truth.expected_counts(Table(row), energy_min=row["SAFE_ENERGY_LO"] * u.TeV)[0] for row in off_runs
    ])
    pull = (np.array(above) - expected_above) / np.sqrt(expected_above)
    assert np.all(np.abs(pull) < 4), pull
    assert np.median(expected_above) > 1500


def test_binned_counts_match_expected_rate(simulated_archive, off_runs):
    """rate x dE x dOmega x ONTIME = counts, for the stacked off runs (energy x offset)."""
    truth = BackgroundTruth()
    energy_axis = MapAxis.from_energy_bounds(0.1, 100, 12, unit="TeV")
    offset_axis = MapAxis.from_bounds(0, 2.8, 7, unit="deg", name="offset")
    counts = np.zeros((12, 7))
    for row in off_runs:
        events = read_events(simulated_archive, int(row["OBS_ID"]))
        pointing = SkyCoord(row["RA_PNT"], row["DEC_PNT"], unit="deg")
        offset = SkyCoord(events["RA"], events["DEC"], unit="deg").separation(pointing).deg
        bins = [energy_axis.edges.to_value("TeV"), offset_axis.edges.to_value("deg")]
        counts += np.histogram2d(events["ENERGY"], offset, bins=bins)[0]
    rate = expected_rate(truth, off_runs, energy_axis, offset_axis=offset_axis, safe_threshold=False)
    solid_angle = ring_solid_angle(offset_axis.edges[:-1].value, offset_axis.edges[1:].value) * u.sr
    exposure = np.sum(off_runs["ONTIME"]) * u.s * energy_axis.bin_width[:, None] * solid_angle
    expected = (rate * exposure).to_value("")
    use = expected > 20
    pull = (counts[use] - expected[use]) / np.sqrt(expected[use])
    assert np.all(np.abs(pull) < 4.5), pull
    chi2 = np.sum(pull**2)
    assert chi2 < use.sum() + 5 * np.sqrt(2 * use.sum())


def test_spectral_index(simulated_archive, off_runs):
    """Maximum-likelihood index of the off-run events well above every roll-off."""
    truth = BackgroundTruth()
    e_lo, e_hi = 3.0, truth.energy_max.to_value("TeV")
    energy = np.concatenate(
        [read_events(simulated_archive, int(obs_id))["ENERGY"].astype(float) for obs_id in off_runs["OBS_ID"]]
    )
    energy = energy[(energy >= e_lo) & (energy <= e_hi)]
    mean_log = np.mean(np.log(energy / e_lo))

    def score(index):
        g = 1 - index
        ratio = (e_hi / e_lo) ** g
        return np.log(e_hi / e_lo) * ratio / (ratio - 1) - 1 / g - mean_log  # d(log L) / d(index) / N

    index = optimize.brentq(score, 1.5, 4.0)
    sigma = (index - 1) / np.sqrt(energy.size)
    assert energy.size > 1000
    # the roll-off at 3 TeV is below 2e-3 at 55 deg zenith
    assert abs(index - truth.index) < 4 * sigma, (index, sigma)


def test_altaz_gradient_in_events(data_store, off_runs):
    """More events below the pointing (lower altitude) than above, as much as the truth says."""
    fov_lat, d_alt = [], []
    obs_ids = [int(obs_id) for obs_id in off_runs["OBS_ID"][:4]]
    with erfa_astrom.set(ErfaAstromInterpolator(300 * u.s)):
        for obs in data_store.get_observations(obs_ids, required_irf=["aeff"]):
            events = obs.events
            location = obs.observatory_earth_location
            origin = obs.get_pointing_altaz(events.time)
            frame = FoVAltAzFrame(origin=origin, location=location, obstime=events.time)
            fov = events.radec.transform_to(frame)
            fov_lat.append(fov.fov_lat.deg)
            altaz = events.radec.transform_to(AltAz(obstime=events.time, location=location))
            d_alt.append(altaz.alt.deg - origin.alt.deg)
    fov_lat, d_alt = np.concatenate(fov_lat), np.concatenate(d_alt)
    assert np.all(np.abs(fov_lat) <= 2.8 + 1e-6)

    # expected mean fov_lat of the truth, on a polar grid
    truth = BackgroundTruth()
    r = np.linspace(0, 2.8, 1401)[1:] - 0.001
    phi = np.linspace(0, 2 * np.pi, 721)[:-1]
    rr, pp = np.meshgrid(np.deg2rad(r), phi, indexing="ij")
    lat = np.arcsin(np.sin(rr) * np.sin(pp))
    lon = np.arctan2(np.sin(rr) * np.cos(pp), np.cos(rr))
    weight = truth.evaluate(1 * u.TeV, lon * u.rad, lat * u.rad, 30 * u.deg, 1.0).value * np.sin(rr)
    expected = np.sum(np.rad2deg(lat) * weight) / np.sum(weight)
    assert expected < -0.1

    sigma = np.std(fov_lat) / np.sqrt(fov_lat.size)
    assert abs(np.mean(fov_lat) - expected) < 4 * sigma
    assert np.mean(fov_lat) < -5 * sigma
    assert np.mean(d_alt) < -5 * sigma  # the same in plain alt-az coordinates
