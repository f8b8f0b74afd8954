"""Bad input gets one clear line naming the run, file or parameter; nothing is half written.

Each case runs on a copy of the simulated archive (the original is never touched), or on the
H.E.S.S. data where it fits. The store writer's cases are in test_store.py.
"""

import gzip
import logging
import shutil
import numpy as np
import astropy.units as u
import pytest
from astropy.io import fits
from astropy.table import Table
from gammapy.data import DataStore
from gammapy.maps import MapAxis
from bkgtemplate import BackgroundModelEstimator, RunError, make_energy_axis, make_offset_axis
from bkgtemplate.conditions import EmptyBinError, ObservingConditionsEstimator
from bkgtemplate.data import DataNotFoundError, find_data_dir


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.fixture
def archive(simulated_archive, tmp_path):
    """A private copy of the simulated archive that a test may break."""
    return shutil.copytree(simulated_archive, tmp_path / "archive")


def off_ids(data_store):
    table = data_store.obs_table
    return list(table["OBS_ID"][table["TARGET_NAME"] == "Off data"])


def run_file(archive, data_store, obs_id):
    location = data_store.hdu_table.hdu_location(obs_id, hdu_type="events")
    return archive / location.file_dir / location.file_name


def rewrite_obs_index(archive, change):
    path = archive / "obs-index.fits.gz"
    table = Table.read(path)
    change(table)
    table.write(path, overwrite=True)
    return DataStore.from_dir(archive)


# --- data folder ---


def test_data_dir_missing(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        find_data_dir(tmp_path / "nowhere")
    assert "nowhere" in one_line(error) and "gammapy download datasets" in one_line(error)


def test_data_dir_without_index_files(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        find_data_dir(tmp_path)
    assert "obs-index" in one_line(error)


def test_gammapy_data_unset(monkeypatch):
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as error:
        find_data_dir()
    assert "GAMMAPY_DATA is not set" in one_line(error)


# --- selections ---


def test_selection_without_runs(simulated_store):
    with pytest.raises(ValueError) as error:
        BackgroundModelEstimator().fill_histograms(simulated_store, [])
    assert "run selection is empty" in one_line(error)


def test_zenith_bin_without_runs(simulated_store):
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 60, 80]}, corrections={})
    with pytest.raises(EmptyBinError) as error:
        maker.run(simulated_store, off_ids(simulated_store))
    message = one_line(error)
    assert "ZEN_PNT [60, 80]" in message and "merge_empty=True" in message
    collection = ObservingConditionsEstimator(
        bins={"ZEN_PNT": [0, 20, 40, 60, 80]}, corrections={}, merge_empty=True
    ).run(simulated_store, off_ids(simulated_store))
    assert collection.n_bins < 4


# --- broken run files ---


def break_missing(path):
    path.unlink()


def break_truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def break_not_gzip(path):
    path.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)


def break_no_events_hdu(path):
    with fits.open(path) as hdulist:
        kept = fits.HDUList([hdu.copy() for hdu in hdulist if hdu.name != "EVENTS"])
    with gzip.open(path, "wb") as stream:
        kept.writeto(stream)


@pytest.mark.parametrize(
    "breaker, text",
    [
        (break_missing, "does not exist"),
        (break_truncated, "cannot read events"),
        (break_not_gzip, "cannot read events"),
        (break_no_events_hdu, "has no EVENTS HDU"),
    ],
)
def test_broken_run_file(archive, breaker, text, caplog):
    data_store = DataStore.from_dir(archive)
    obs_ids = off_ids(data_store)[:4]
    bad = obs_ids[1]
    path = run_file(archive, data_store, bad)
    breaker(path)

    with pytest.raises(RunError) as error:
        BackgroundModelEstimator().fill_histograms(data_store, obs_ids)
    message = one_line(error)
    assert f"Run {bad}" in message and text in message and path.name in message

    with caplog.at_level(logging.WARNING):
        result = BackgroundModelEstimator(on_error="skip").fill_histograms(data_store, obs_ids)
    assert list(result.skipped["OBS_ID"]) == [bad]
    assert result.obs_ids == sorted(set(obs_ids) - {bad})
    assert f"1 of 4 runs skipped: [{bad}]" in caplog.text
    # the skipped run adds nothing: the result equals the estimate without it
    reference = BackgroundModelEstimator().fill_histograms(data_store, result.obs_ids)
    np.testing.assert_allclose(result.counts, reference.counts)
    np.testing.assert_allclose(result.exposure, reference.exposure)


# --- obs-index columns ---


def test_missing_ontime_column(archive):
    data_store = rewrite_obs_index(archive, lambda table: table.remove_column("ONTIME"))
    with pytest.raises(KeyError) as error:
        BackgroundModelEstimator().fill_histograms(data_store, off_ids(data_store))
    assert "no ONTIME column" in str(error.value)


def test_zero_ontime(archive):
    def zero(table):
        table["ONTIME"][2] = 0

    data_store = rewrite_obs_index(archive, zero)
    bad = data_store.obs_table["OBS_ID"][2]
    with pytest.raises(ValueError) as error:
        BackgroundModelEstimator().fill_histograms(data_store, data_store.obs_table["OBS_ID"])
    assert f"Runs [{bad}] have ONTIME <= 0" in one_line(error)


def test_missing_safe_threshold_falls_back_loudly(archive, caplog):
    data_store = rewrite_obs_index(archive, lambda table: table.remove_column("SAFE_ENERGY_LO"))
    with caplog.at_level(logging.WARNING):
        result = BackgroundModelEstimator().fill_histograms(data_store, off_ids(data_store)[:3])
    assert "no SAFE_ENERGY_LO column: all energy bins are used" in caplog.text
    assert np.all(result.exposure > 0)


def test_missing_zenith_for_conditions(archive):
    data_store = rewrite_obs_index(archive, lambda table: table.remove_column("ZEN_PNT"))
    with pytest.raises((KeyError, ValueError)) as error:
        ObservingConditionsEstimator(corrections={}).run(data_store, off_ids(data_store))
    assert "ZEN_PNT" in str(error.value)


def test_nan_events_are_dropped_and_reported(archive, caplog):
    data_store = DataStore.from_dir(archive)
    obs_id = off_ids(data_store)[0]
    path = run_file(archive, data_store, obs_id)
    with fits.open(path) as hdulist:
        hdulist["EVENTS"].data["ENERGY"][:3] = np.nan
        hdulist["EVENTS"].data["RA"][3:5] = np.nan
        hdulist.writeto(path, overwrite=True)
    with caplog.at_level(logging.WARNING):
        result = BackgroundModelEstimator().fill_histograms(data_store, [obs_id])
    assert f"Run {obs_id}: 5 events with NaN energy or direction dropped" in caplog.text
    assert np.isfinite(result.counts).all()


# --- parameters ---


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: make_energy_axis(10, 1, 5), "Need 0 < energy_min < energy_max"),
        (lambda: make_energy_axis(1, 1, 5), "Need 0 < energy_min < energy_max"),
        (lambda: make_energy_axis(0.1, 100, 0), "number of energy bins must be at least 1"),
        (lambda: make_offset_axis(2.5, 0), "number of offset bins must be at least 1"),
        (lambda: make_offset_axis(20, 10), "offset_max must be in (0, 10.0 deg]"),
        (lambda: BackgroundModelEstimator(fov_alignment="HORIZON"), "Unknown fov_alignment 'HORIZON'"),
        (lambda: ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 40, 20]}), "must increase"),
    ],
)
def test_parameters_out_of_range(make, text):
    with pytest.raises(ValueError) as error:
        make()
    assert text in one_line(error)
