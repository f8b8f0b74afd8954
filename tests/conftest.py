"""Shared fixtures, and the check that real-data tests were not skipped where they must run.

Real-data tests use the ``hess_dir`` or ``hess_store`` fixture (or carry ``@pytest.mark.hess``):
they get the ``hess`` marker and are skipped, with the reason, when the H.E.S.S. DL3 DR1 data
is absent. With ``BKGTEMPLATE_REQUIRE_HESS=1`` (set by ``.ci/run`` when the data is there) such a
skip is turned into a failure, so CI cannot pass without the real-data tests having run.
Likewise, tests marked ``ci`` need an optional piece (ray, chromium) and skip, with the reason,
where it is absent; with ``CI=true`` (set by ``.ci/run``, which installs them) such a skip fails.

Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``) the notebook cells that nbval
collects form one group, so one worker runs them in collection order: each notebook reads the
previous one's files from ``notebooks/output``. A skip becomes a failure in the worker that ran
the test (``pytest_runtest_makereport``); the real-data tests are counted from the reports the
controller receives (``pytest_runtest_logreport``), so the count covers all workers.
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
NOTEBOOK_GROUP = "notebooks"


def _require_hess():
    return os.environ.get(REQUIRE_HESS_ENV, "") not in ("", "0")


def _in_ci():
    return os.environ.get(CI_ENV, "").lower() not in ("", "0", "false")


def _skip_reason(report):
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr


def pytest_configure(config):
    config.pluginmanager.register(HessCount(), "bkgtemplate-hess-count")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hess)
    # the slow tests first (a stable sort: the notebook cells keep their order), so that under xdist the worker
    # without the notebooks starts them at once and the run does not end on one long test
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """With ``--dist loadgroup``: xdist's loadgroup scheduling, in which all notebook cells
    (node ids ``<notebook>.ipynb::Cell <n>``) are one group. Not an ``xdist_group`` mark added to
    them: pytest-xdist 3.8 applies those by rewriting node ids, which pytest 9.2 ignores, so the
    cells would go to both workers (pytest-xdist issue 1386)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class NotebooksInOneGroup(LoadGroupScheduling):
        def _split_scope(self, nodeid):
            if nodeid.split("::", 1)[0].endswith(".ipynb"):
                return NOTEBOOK_GROUP
            return super()._split_scope(nodeid)

    return NotebooksInOneGroup(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Turns skips into failures where they are not allowed; runs where the test runs (an xdist
    worker), and marks the report (``turned_skip``, which xdist passes on) for the count."""
    report = yield
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    # a ci test that also needs the real data may skip for its absence where that is allowed
    hess = item.get_closest_marker("hess") is not None
    if item.get_closest_marker("ci") is not None and _in_ci() and not (hess and not _require_hess()):
        message = f"{CI_ENV}={os.environ[CI_ENV]} but this test (marked ci) was skipped"
    elif hess and _require_hess():
        message = f"{REQUIRE_HESS_ENV} is set but this real-data (hess) test was skipped"
    else:
        return report
    report.outcome = "failed"
    report.longrepr = f"{message}: {_skip_reason(report)}"
    report.turned_skip = True
    return report


class HessCount:
    """Counts the real-data (hess) tests that ran and those skipped (failures where required),
    from the reports of the process that reports them: the controller under xdist, which gets
    every worker's reports, else the only process."""

    def __init__(self):
        self.ran = self.skipped = 0

    def pytest_runtest_logreport(self, report):
        if "hess" not in report.keywords or hasattr(report, "wasxfail"):
            return
        if report.skipped or getattr(report, "turned_skip", False):
            self.skipped += 1
        elif report.when == "call":
            self.ran += 1

    def pytest_terminal_summary(self, terminalreporter):
        required = "required" if _require_hess() else "not required"
        terminalreporter.write_line(
            f"bkgtemplate: real-data (hess) tests ran={self.ran} skipped={self.skipped} ({required})"
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
