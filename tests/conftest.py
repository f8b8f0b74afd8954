"""Shared fixtures, and the check that real-data tests were not skipped where they must run.

Real-data tests use the ``hess_dir`` or ``hess_store`` fixture (or carry ``@pytest.mark.hess``):
they get the ``hess`` marker and are skipped, with the reason, when the H.E.S.S. DL3 DR1 data
is absent. With ``BKGTEMPLATE_REQUIRE_HESS=1`` (set by ``.ci/run`` when the data is there) such a
skip is turned into a failure, so CI cannot pass without the real-data tests having run.
Likewise, tests marked ``ci`` need an optional piece (ray, chromium) and skip, with the reason,
where it is absent; with ``CI=true`` (set by ``.ci/run``, which installs them) such a skip fails.
"""

import os
import shutil
import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")  # also for the kernels nbval starts

import pytest  # noqa: E402

HESS_FIXTURES = {"hess_dir", "hess_store"}
REQUIRE_HESS_ENV = "BKGTEMPLATE_REQUIRE_HESS"
CI_ENV = "CI"
HESS_RAN = pytest.StashKey[dict]()


def _require_hess():
    return os.environ.get(REQUIRE_HESS_ENV, "") not in ("", "0")


def _in_ci():
    return os.environ.get(CI_ENV, "").lower() not in ("", "0", "false")


def _skip_reason(report):
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr


def pytest_configure(config):
    config.stash[HESS_RAN] = {"ran": 0, "skipped": 0}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hess)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if hasattr(report, "wasxfail"):
        return report
    # a ci test that also needs the real data may skip for its absence where that is allowed
    hess_optional = item.get_closest_marker("hess") is not None and not _require_hess()
    if report.skipped and item.get_closest_marker("ci") is not None and _in_ci() and not hess_optional:
        report.outcome = "failed"
        report.longrepr = (
            f"{CI_ENV}={os.environ[CI_ENV]} but this test (marked ci) was skipped: {_skip_reason(report)}"
        )
        return report
    if item.get_closest_marker("hess") is None:
        return report
    counts = item.config.stash[HESS_RAN]
    if report.skipped:
        counts["skipped"] += 1
        if _require_hess():
            report.outcome = "failed"
            report.longrepr = (
                f"{REQUIRE_HESS_ENV} is set but this real-data (hess) test was skipped: "
                f"{_skip_reason(report)}"
            )
    elif report.when == "call":
        counts["ran"] += 1
    return report


def pytest_terminal_summary(terminalreporter, config):
    counts = config.stash[HESS_RAN]
    required = "required" if _require_hess() else "not required"
    terminalreporter.write_line(
        f"bkgtemplate: real-data (hess) tests ran={counts['ran']} "
        f"skipped={counts['skipped']} ({required})"
    )


@pytest.fixture(scope="session")
def hess_dir():
    """Folder of the H.E.S.S. DL3 DR1 data (``$GAMMAPY_DATA/hess-dl3-dr1``); skips if absent."""
    from bkgtemplate.data import DataNotFoundError, find_data_dir

    try:
        return find_data_dir()
    except DataNotFoundError as error:
        pytest.skip(f"real H.E.S.S. data absent: {error}")


@pytest.fixture(scope="session")
def hess_store(hess_dir):
    """`~gammapy.data.DataStore` of the H.E.S.S. DL3 DR1 data; skips if absent."""
    from bkgtemplate.data import open_data_store

    return open_data_store(hess_dir)


@pytest.fixture(scope="session")
def simulated_archive(tmp_path_factory):
    """The default simulated archive (24 off runs, 6 source runs, seed 0), simulated once."""
    from bkgtemplate.simulate import simulate_archive

    return simulate_archive(tmp_path_factory.mktemp("sim") / "archive", seed=0)


@pytest.fixture(scope="session")
def simulated_store(simulated_archive):
    """`~gammapy.data.DataStore` of the simulated archive."""
    from gammapy.data import DataStore

    return DataStore.from_dir(simulated_archive)


class Archive:
    """A private copy of the simulated archive that a test may break, with helpers to break it."""

    def __init__(self, path):
        self.path = path

    @property
    def store(self):
        """A `~gammapy.data.DataStore` of the archive as it is now (index files re-read)."""
        from gammapy.data import DataStore

        return DataStore.from_dir(self.path)

    @property
    def off_ids(self):
        table = self.store.obs_table
        return [int(obs_id) for obs_id in table["OBS_ID"][table["TARGET_NAME"] == "Off data"]]

    def events_file(self, obs_id):
        location = self.store.hdu_table.hdu_location(obs_id, hdu_type="events")
        return self.path / location.file_dir / location.file_name

    def change_obs_index(self, change):
        """Apply ``change(table)`` to the obs index and write it back; returns the new store."""
        from astropy.table import Table

        path = self.path / "obs-index.fits.gz"
        table = Table.read(path)
        change(table)
        table.write(path, overwrite=True)
        return self.store

    def change_events(self, obs_id, change):
        """Apply ``change(hdu)`` to the EVENTS HDU of a run's file and write it back."""
        from astropy.io import fits

        path = self.events_file(obs_id)
        with fits.open(path) as hdulist:
            hdulist = fits.HDUList([hdu.copy() for hdu in hdulist])
        change(hdulist["EVENTS"])
        hdulist.writeto(path, overwrite=True)
        return path


@pytest.fixture
def archive(simulated_archive, tmp_path):
    """`Archive`: a private copy of the simulated archive (the session's copy is never touched)."""
    return Archive(shutil.copytree(simulated_archive, tmp_path / "archive"))


def _synthetic_histograms(zenith, muoneff=None, azimuth=None, livetime=None, rate=None, exposure=1e9):
    """Per-run histograms in 2 x 2 bins with counts = rate x shape x exposure exactly (no noise)."""
    import numpy as np
    import astropy.units as u
    from astropy.table import Table
    from gammapy.maps import MapAxes, MapAxis
    from bkgtemplate.histograms import BackgroundHistograms

    n = len(zenith)
    energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=2, name="energy")
    axes = MapAxes([energy, MapAxis.from_bounds(0, 2, nbin=2, unit="deg", name="offset")])
    muoneff = np.ones(n) if muoneff is None else np.asarray(muoneff, float)
    azimuth = np.full(n, 180.0) if azimuth is None else np.asarray(azimuth, float)
    livetime = np.full(n, 1000.0) if livetime is None else np.asarray(livetime, float)
    rate = np.full(n, 1e-6) if rate is None else np.asarray(rate, float)
    exposure = np.broadcast_to(np.asarray(exposure, float).reshape(-1, 1, 1), (n, *axes.shape)).copy()
    shape = np.array([[1.0, 0.5], [0.1, 0.05]])  # a shape in energy and offset that all runs share
    table = Table(
        {
            "OBS_ID": np.arange(1, n + 1),
            "ZEN_PNT": np.asarray(zenith, float) * u.deg,
            "MUONEFF": muoneff,
            "AZ_PNT": azimuth * u.deg,
            "LIVETIME": livetime * u.s,
            "ONTIME": livetime * 1.05 * u.s,
        }
    )
    counts = rate[:, None, None] * shape * exposure
    return BackgroundHistograms(axes=axes, counts=counts, exposure=exposure * u.Unit("s MeV sr"), obs_table=table)


@pytest.fixture
def synthetic_histograms():
    """Factory of synthetic per-run histograms: ``synthetic_histograms(zenith, muoneff=None,
    azimuth=None, livetime=None, rate=None, exposure=1e9)`` (deg, s, s-1 MeV-1 sr-1, s MeV sr)."""
    return _synthetic_histograms
