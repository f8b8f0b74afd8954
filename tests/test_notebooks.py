"""The notebooks as users run them: papermill with other parameters, bad input, no real data.

nbval (``pytest --nbval-lax notebooks``) runs them with their defaults; these tests run them
the way the README tells users to rerun them.
"""

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from gammapy.data import DataStore
from gammapy.irf import Background2D, Background3D
import papermill
from bkgtemplate.conditions import BackgroundModelCollection

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def execute(name, output_dir, **parameters):
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(output_dir / f"executed-{name}"),
        parameters={"output_dir": str(output_dir), **parameters},
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )


def tree_hashes(folder):
    """sha256 of every file below ``folder`` (decompressed for .gz: gzip headers hold a date)."""
    hashes = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            hashes[str(path.relative_to(folder))] = hashlib.sha256(content).hexdigest()
    return hashes


@pytest.mark.slow
def test_chain_with_other_parameters(hess_dir, tmp_path):
    """zenith_edges_deg=[0, 30, 60] and energy_bins=12 reach the files; the input is untouched."""
    before = tree_hashes(hess_dir)
    data = str(hess_dir)
    execute("01_select_off_runs.ipynb", tmp_path, data_dir=data)
    execute("02_estimate_background.ipynb", tmp_path, data_dir=data, energy_bins=12)
    execute("03_zenith_dependence.ipynb", tmp_path, data_dir=data, zenith_edges_deg=[0, 30, 60])
    execute("04_write_index_tables.ipynb", tmp_path, data_dir=data)
    execute("05_validate_background.ipynb", tmp_path, data_dir=data, pixel_size_deg=0.04)
    execute("06_3d_models_and_source_runs.ipynb", tmp_path, data_dir=data, fov_bins=10)

    off_runs = Table.read(tmp_path / "off-runs.ecsv")
    assert len(off_runs) == 45
    assert Background2D.read(tmp_path / "bkg_2d_all.fits").axes["energy"].nbin == 12

    collection = BackgroundModelCollection.read(tmp_path / "bkg_2d_zenith.fits")
    np.testing.assert_allclose(collection.bin_edges["ZEN_PNT"], [0, 30, 60])
    assert all(model.axes["energy"].nbin == 12 for model in collection.models)
    with fits.open(tmp_path / "bkg_2d_zenith.fits") as hdulist:
        assert sum(hdu.header.get("HDUCLAS4") == "BKG_2D" for hdu in hdulist) == 2

    store = DataStore.from_dir(tmp_path / "store")
    bkg = store.obs(off_runs["OBS_ID"][0], required_irf="all-optional").bkg
    assert bkg.axes["energy"].nbin == 12
    assert len(Table.read(tmp_path / "validation.ecsv")) > 0
    assert Background3D.read(tmp_path / "bkg_3d_altaz.fits").axes["fov_lon"].nbin == 10
    assert tree_hashes(hess_dir) == before


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as error:
        execute("02_estimate_background.ipynb", tmp_path, data_dir="/no/such/dir")
    message = f"{error.value.ename}: {error.value.evalue}"
    assert "DataNotFoundError" in message
    assert "/no/such/dir" in message
    assert "gammapy download datasets" in message


def test_missing_earlier_output_names_the_notebook(hess_dir, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as error:
        execute("02_estimate_background.ipynb", tmp_path, data_dir=str(hess_dir))
    assert "run 01_select_off_runs.ipynb" in error.value.evalue


MODEL_FILES = ["bkg_2d_all.fits", "bkg_2d_zenith.fits", "bkg_3d_altaz.fits", "bkg_2d_source_runs.fits", "store"]


@pytest.mark.slow
def test_main_job_runs_on_the_simulated_archive(tmp_path):
    """What `make run` does without data: every notebook, end to end, on the simulated archive;
    run twice into the same folder, it writes the same model files."""
    command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--simulated", "--output-dir", str(tmp_path)]
    models = []
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "SIMULATED archive" in result.stderr
        summary = result.stdout.split("\nSummary\n")[1]  # the data said again at the end
        assert f"Data: the SIMULATED archive at {tmp_path / 'simulated-archive'}" in summary
        assert f"{tmp_path / 'store'}/" in summary and f"{tmp_path / 'bkg_2d_zenith.fits'}" in summary
        models.append({name: tree_hashes(tmp_path / name) if (tmp_path / name).is_dir() else tree_hashes(tmp_path)[name] for name in MODEL_FILES})

    executed = sorted(path.name for path in (tmp_path / "executed").glob("*.ipynb"))
    assert executed == sorted(path.name for path in NOTEBOOKS.glob("0*.ipynb"))
    assert (tmp_path / "validation.ecsv").exists()
    assert (tmp_path / "store" / "hdu-index.fits.gz").exists()
    assert models[0] == models[1]
