"""Shared fixtures, and the check that real-data tests were not skipped where they must run.

Real-data tests use the ``hess_dir`` or ``hess_store`` fixture (or carry ``@pytest.mark.hess``):
they get the ``hess`` marker and are skipped, with the reason, when the H.E.S.S. DL3 DR1 data
is absent. With ``BKGTEMPLATE_REQUIRE_HESS=1`` (set by ``.ci/run`` when the data is there) such a
skip is turned into a failure, so CI cannot pass without the real-data tests having run.
Likewise, tests marked ``ci`` need an optional piece (ray, chromium) and skip, with the reason,
where it is absent; with ``CI=true`` (set by ``.ci/run``, which installs them) such a skip fails.
"""

import os
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
