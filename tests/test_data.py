"""Finding and opening a data store, and reading runs: every bad input gets one clear line."""

import gzip
import logging
from pathlib import Path
import numpy as np
from astropy.io import fits
from astropy.table import Table
from gammapy.data import DataStore
from numpy.testing import assert_allclose, assert_array_equal
import pytest
from bkgtemplate.data import (
    DATASET_NAME,
    DataNotFoundError,
    RunError,
    check_obs_ids,
    collect_runs,
    find_data_dir,
    open_data_store,
    read_events,
)


def one_line(error):
    """The message of a raised error, checked to be one short line."""
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def make_store(folder, suffix=".fits.gz"):
    """A minimal data store: an obs index with runs 1 and 2 and an HDU index with their events."""
    folder.mkdir(parents=True, exist_ok=True)
    Table({"OBS_ID": [1, 2]}).write(folder / f"obs-index{suffix}")
    hdu = Table(
        {
            "OBS_ID": [1, 2],
            "HDU_TYPE": ["events", "events"],
            "HDU_CLASS": ["events", "events"],
            "FILE_DIR": ["data", "data"],
            "FILE_NAME": ["run1.fits", "run2.fits"],
            "HDU_NAME": ["EVENTS", "EVENTS"],
        }
    )
    hdu.write(folder / f"hdu-index{suffix}")
    return folder


def test_explicit_path(tmp_path):
    folder = make_store(tmp_path / "store")
    found = find_data_dir(folder)
    assert isinstance(found, Path)
    assert found == folder.absolute()
    assert find_data_dir(str(folder)) == found


def test_uncompressed_index_files(tmp_path):
    folder = make_store(tmp_path / "store", suffix=".fits")
    assert find_data_dir(folder) == folder


def test_expands_environment_variables_and_home(tmp_path, monkeypatch):
    folder = make_store(tmp_path / DATASET_NAME)
    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_data_dir(f"$GAMMAPY_DATA/{DATASET_NAME}") == folder
    assert find_data_dir(f"${{GAMMAPY_DATA}}/{DATASET_NAME}") == folder
    assert find_data_dir(f"~/{DATASET_NAME}") == folder


def test_default_is_gammapy_data(tmp_path, monkeypatch, caplog):
    folder = make_store(tmp_path / DATASET_NAME)
    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    with caplog.at_level(logging.DEBUG, logger="bkgtemplate.data"):
        assert find_data_dir() == folder
    assert str(folder) in caplog.text


def check_message(error, *parts):
    message = str(error.value)
    assert "\n" not in message
    assert "gammapy download datasets --out" in message
    assert "export GAMMAPY_DATA=" in message
    for part in parts:
        assert part in message


def test_gammapy_data_not_set(monkeypatch):
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="GAMMAPY_DATA is not set") as error:
        find_data_dir()
    check_message(error, f"$GAMMAPY_DATA/{DATASET_NAME}")

    with pytest.raises(DataNotFoundError, match="GAMMAPY_DATA is not set") as error:
        find_data_dir(f"$GAMMAPY_DATA/{DATASET_NAME}")
    check_message(error, f"$GAMMAPY_DATA/{DATASET_NAME}")


def test_gammapy_data_empty(monkeypatch):
    monkeypatch.setenv("GAMMAPY_DATA", "")
    with pytest.raises(DataNotFoundError, match="GAMMAPY_DATA is not set"):
        find_data_dir()


def test_folder_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="does not exist") as error:
        find_data_dir(missing)
    check_message(error, str(missing))

    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="does not exist") as error:
        find_data_dir()
    check_message(error, str(tmp_path / DATASET_NAME))


def test_folder_without_index_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="hdu-index.*obs-index") as error:
        find_data_dir(tmp_path)
    check_message(error, str(tmp_path), "exists but has no")

    Table({"OBS_ID": [1]}).write(tmp_path / "obs-index.fits.gz")
    with pytest.raises(DataNotFoundError, match="has no hdu-index") as error:
        find_data_dir(tmp_path)
    assert "obs-index" not in str(error.value)


def test_error_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_data_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("suffix", [".fits.gz", ".fits"])
def test_open_data_store(tmp_path, suffix):
    folder = make_store(tmp_path / "store", suffix=suffix)
    data_store = open_data_store(folder)
    assert isinstance(data_store, DataStore)
    np.testing.assert_array_equal(data_store.obs_ids, [1, 2])
    assert data_store.hdu_table.base_dir == folder
    location = data_store.hdu_table.hdu_location(obs_id=2, hdu_type="events")
    assert location.file_name == "run2.fits"


def test_open_data_store_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        open_data_store(tmp_path / "nowhere")


def test_hess_dir(hess_dir):
    assert hess_dir.name == DATASET_NAME
    assert find_data_dir(hess_dir) == hess_dir


def test_hess_store(hess_store):
    obs_table = hess_store.obs_table
    assert len(obs_table) == 105
    assert np.sum(obs_table["TARGET_NAME"] == "Off data") == 45
    assert len(hess_store.hdu_table) > 0


def test_index_file_given_instead_of_its_folder(tmp_path):
    folder = make_store(tmp_path / "store")
    with pytest.raises(DataNotFoundError) as error:
        find_data_dir(folder / "obs-index.fits.gz")
    message = one_line(error)
    assert "is an index file" in message and f"give its folder {folder}" in message


def test_empty_index_file_names_the_folder(tmp_path):
    folder = make_store(tmp_path / "store")
    (folder / "obs-index.fits.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError) as error:
        open_data_store(folder)
    message = one_line(error)
    assert f"Cannot read the index files of {folder}" in message and "rewrite them" in message


# --- run selection ---


def test_repeated_runs_are_used_once_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        assert check_obs_ids([3, 1, 3, 2, 1]) == [3, 1, 2]
    assert "Runs [1, 3] appear more than once in obs_ids: each is used once." in caplog.text
    caplog.clear()
    assert check_obs_ids(np.array([5, 4])) == [5, 4]
    assert caplog.text == ""


@pytest.mark.parametrize("obs_ids", [1000, "1000", np.int64(1000), None])
def test_obs_ids_not_a_list(obs_ids):
    with pytest.raises(TypeError) as error:
        check_obs_ids(obs_ids)
    assert f"obs_ids must be a list of run numbers, got {obs_ids!r}" in one_line(error)


def test_obs_ids_default_to_all_runs_of_the_store(simulated_store):
    assert check_obs_ids(None, simulated_store) == [int(i) for i in simulated_store.obs_table["OBS_ID"]]


def test_empty_selection(simulated_store):
    with pytest.raises(ValueError) as error:
        collect_runs(simulated_store, [])
    assert "The run selection is empty" in one_line(error)


def test_unknown_run(simulated_store):
    with pytest.raises(ValueError) as error:
        collect_runs(simulated_store, [1, int(simulated_store.obs_table["OBS_ID"][0])])
    assert "Runs [1] are not in the obs index; drop them from the selection." in one_line(error)


def test_not_a_data_store():
    with pytest.raises(TypeError, match="Expected a gammapy DataStore, got str"):
        collect_runs("store", [1])


# --- obs-index columns ---


def test_missing_ontime_column(archive):
    store = archive.change_obs_index(lambda table: table.remove_column("ONTIME"))
    with pytest.raises(KeyError, match="The obs index has no ONTIME column"):
        collect_runs(store, archive.off_ids)


def test_zero_ontime(archive):
    bad = archive.off_ids[2]

    def zero(table):
        table["ONTIME"][table["OBS_ID"] == bad] = 0

    with pytest.raises(ValueError) as error:
        collect_runs(archive.change_obs_index(zero), archive.off_ids)
    assert f"Runs [{bad}] have ONTIME <= 0 in the obs index" in one_line(error)


def test_ontime_in_minutes_labelled_seconds(archive):
    """ONTIME larger than TSTOP - TSTART cannot be the run's on time: refused, naming the run."""
    bad = archive.off_ids[1]

    def minutes(table):
        row = table["OBS_ID"] == bad
        table["ONTIME"][row] = table["ONTIME"][row] * 60

    with pytest.raises(ValueError) as error:
        collect_runs(archive.change_obs_index(minutes), archive.off_ids)
    assert f"Runs [{bad}] have ONTIME > TSTOP - TSTART in the obs index" in one_line(error)


def test_missing_safe_threshold_falls_back_loudly(archive, caplog):
    store = archive.change_obs_index(lambda table: table.remove_column("SAFE_ENERGY_LO"))
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        runs = collect_runs(store, archive.off_ids[:3])
    assert "no SAFE_ENERGY_LO column: all energy bins are used" in caplog.text
    assert [run.safe_energy_lo for run in runs] == [0, 0, 0]


def test_pointing_without_unit_is_read_in_degrees(archive, caplog):
    obs_ids = archive.off_ids[:3]
    reference = collect_runs(archive.store, obs_ids)

    def drop_units(table):
        table["RA_PNT"].unit = table["DEC_PNT"].unit = None

    store = archive.change_obs_index(drop_units)
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        runs = collect_runs(store, obs_ids)
    assert "Column RA_PNT" in caplog.text and "Column DEC_PNT" in caplog.text
    assert "has no unit: assuming deg (GADF)" in caplog.text
    assert_allclose([run.ra_pnt for run in runs], [run.ra_pnt for run in reference], rtol=1e-12)
    assert_allclose([run.dec_pnt for run in runs], [run.dec_pnt for run in reference], rtol=1e-12)
    # and the runs are read as before: their files' pointing agrees with the obs index
    assert_allclose(read_events(runs[0])[0]["energy"], read_events(reference[0])[0]["energy"])


def hour_angles(runs):
    return np.array([[run.hour_angle, run.dec_apparent, run.latitude] for run in runs])


@pytest.mark.parametrize("keys", [("MJDREFI", "MJDREFF"), ("MJDREFF",), ("GEOLON", "GEOLAT", "ALTITUDE"), ("ALTITUDE",)])
def test_site_and_time_reference_from_the_events_headers(archive, caplog, keys):
    """Without them in the obs index, the EVENTS headers give them: the same hour angles, no warning."""
    obs_ids = archive.off_ids[:4]
    reference = hour_angles(collect_runs(archive.store, obs_ids))

    def drop(table):
        for key in keys:
            del table.meta[key]

    store = archive.change_obs_index(drop)
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        runs = collect_runs(store, obs_ids)
    assert caplog.text == ""
    assert_allclose(hour_angles(runs), reference, rtol=0, atol=1e-12)

    # where neither says, the H.E.S.S. value is assumed with a warning naming the keyword
    for obs_id in obs_ids:
        archive.change_events(obs_id, lambda hdu: [hdu.header.remove(key) for key in keys])
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        collect_runs(store, obs_ids)
    for key in keys:
        assert f"Neither the obs index nor the EVENTS headers give {key}: assuming" in caplog.text


# --- event files ---


def read_run(archive, obs_id):
    return read_events(collect_runs(archive.store, [obs_id])[0])


def set_unit(name, unit):
    def change(hdu):
        hdu.columns.change_attrib(name, "unit", unit)
        index = hdu.columns.names.index(name) + 1
        if unit:
            hdu.header[f"TUNIT{index}"] = unit
        else:
            hdu.header.remove(f"TUNIT{index}", ignore_missing=True)

    return change


def test_directions_in_radians_are_honoured(archive):
    obs_id = archive.off_ids[0]
    events, pointing = read_run(archive, obs_id)

    def to_radians(hdu):
        for name in ("RA", "DEC"):
            hdu.data[name] = np.deg2rad(hdu.data[name].astype(float))
            set_unit(name, "rad")(hdu)

    archive.change_events(obs_id, to_radians)
    in_radians, _ = read_run(archive, obs_id)
    assert_allclose(in_radians["ra"], events["ra"], rtol=1e-6)
    assert_allclose(in_radians["dec"], events["dec"], rtol=1e-6)
    assert_array_equal(in_radians["energy"], events["energy"])


def test_energy_without_unit_is_tev_with_a_warning(archive, caplog):
    obs_id = archive.off_ids[0]
    events, _ = read_run(archive, obs_id)
    path = archive.change_events(obs_id, set_unit("ENERGY", None))
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        without_unit, _ = read_run(archive, obs_id)
    assert f"Column ENERGY of {path} has no unit: assuming TeV (GADF)." in caplog.text
    assert_array_equal(without_unit["energy"], events["energy"])


def test_energy_in_gev_is_converted(archive):
    obs_id = archive.off_ids[0]
    events, _ = read_run(archive, obs_id)

    def to_gev(hdu):
        hdu.data["ENERGY"] = hdu.data["ENERGY"] * 1000
        set_unit("ENERGY", "GeV")(hdu)

    archive.change_events(obs_id, to_gev)
    assert_allclose(read_run(archive, obs_id)[0]["energy"], events["energy"], rtol=1e-6)


@pytest.mark.parametrize("unit", ["TEV", "tev"])
def test_unparsable_energy_unit_names_run_and_file(archive, unit):
    obs_id = archive.off_ids[0]
    path = archive.change_events(obs_id, set_unit("ENERGY", unit))
    with pytest.raises(RunError) as error:
        read_run(archive, obs_id)
    message = one_line(error)
    assert f"Run {obs_id}: unit {unit!r} of column ENERGY in {path} is not a valid unit" in message


def test_index_row_pointing_at_another_runs_file(archive):
    run_a, run_b = archive.off_ids[:2]
    file_b = archive.events_file(run_b)
    path = archive.path / "hdu-index.fits.gz"
    table = Table.read(path)
    rows = table["OBS_ID"] == run_a
    table["FILE_NAME"][rows] = file_b.name
    table.write(path, overwrite=True)
    with pytest.raises(RunError) as error:
        read_run(archive, run_a)
    assert f"Run {run_a}: {file_b} holds run {run_b}; fix the HDU index row of run {run_a}." in one_line(error)


def test_time_counted_from_run_start(archive):
    obs_id = archive.off_ids[0]
    run = collect_runs(archive.store, [obs_id])[0]

    def from_start(hdu):
        hdu.data["TIME"] = hdu.data["TIME"] - run.tstart

    path = archive.change_events(obs_id, from_start)
    with pytest.raises(RunError) as error:
        read_run(archive, obs_id)
    message = one_line(error)
    assert f"Run {obs_id}: event times in {path}" in message and "TIME must count from the mission reference" in message


def test_nan_events_are_dropped_and_reported(archive, caplog):
    obs_id = archive.off_ids[0]
    events, _ = read_run(archive, obs_id)

    def spoil(hdu):
        hdu.data["ENERGY"][:3] = np.nan
        hdu.data["RA"][3:5] = np.nan

    archive.change_events(obs_id, spoil)
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.data"):
        kept, _ = read_run(archive, obs_id)
    assert f"Run {obs_id}: 5 events with NaN energy or direction dropped" in caplog.text
    assert_array_equal(kept["energy"], events["energy"][5:])


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


BREAKERS = [
    (break_missing, "does not exist"),
    (break_truncated, "cannot read events"),
    (break_not_gzip, "cannot read events"),
    (break_no_events_hdu, "has no EVENTS HDU"),
]


@pytest.mark.parametrize("breaker, text", BREAKERS)
def test_broken_run_file_names_run_and_file(archive, breaker, text):
    obs_id = archive.off_ids[1]
    path = archive.events_file(obs_id)
    run = collect_runs(archive.store, [obs_id])[0]
    breaker(path)
    with pytest.raises(RunError) as error:
        read_events(run)
    message = one_line(error)
    assert f"Run {obs_id}" in message and text in message and str(path) in message
