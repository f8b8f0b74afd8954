import logging
from pathlib import Path
import numpy as np
from astropy.table import Table
from gammapy.data import DataStore
import pytest
from bkgtemplate.data import DATASET_NAME, DataNotFoundError, find_data_dir, open_data_store


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
