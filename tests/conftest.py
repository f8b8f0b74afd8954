"""Shared fixtures, and the check that real-data tests were not skipped where they must run.

Real-data tests use the ``hess_dir`` or ``hess_store`` fixture (or carry ``@pytest.mark.hess``):
they get the ``hess`` marker and are skipped, with the reason, when the H.E.S.S. DL3 DR1 data
is absent. With ``BKGTEMPLATE_REQUIRE_HESS=1`` (set by ``.ci/run`` when the data is there) such a
skip is turned into a failure, so CI cannot pass without the real-data tests having run.
"""

import os
import shutil
import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")  # also for the kernels nbval starts

import pytest  # noqa: E402

HESS_FIXTURES = {"hess_dir", "hess_store"}
REQUIRE_HESS_ENV = "BKGTEMPLATE_REQUIRE_HESS"
HESS_RAN = pytest.StashKey[dict]()


def _require_hess():
    return os.environ.get(REQUIRE_HESS_ENV, "") not in ("", "0")


def pytest_configure(config):
    config.stash[HESS_RAN] = {"ran": 0, "skipped": 0}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hess)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if item.get_closest_marker("hess") is None or hasattr(report, "wasxfail"):
        return report
    counts = item.config.stash[HESS_RAN]
    if report.skipped:
        counts["skipped"] += 1
        if _require_hess():
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.outcome = "failed"
            report.longrepr = (
                f"{REQUIRE_HESS_ENV} is set but this real-data (hess) test was skipped: {reason}"
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
