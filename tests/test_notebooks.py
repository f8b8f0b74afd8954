"""The notebooks as users run them: papermill with other parameters, bad input, no real data.

nbval (``pytest --nbval-lax notebooks``) runs them with their defaults; these tests run them
the way the README tells users to rerun them.
"""

import ast
import gzip
import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
import nbformat
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
    """zenith_edges_deg=[0, 30, 60] and energy_bins=12 reach the files; notebooks 5 and 6 analyse other fields;
    notebook 4 writes its 2D models with the off runs' fov_lat gradient in 3D; with model_dimension="3d" it
    writes a store in which every run has a finite, non-negative Background3D; the input is untouched."""
    before = tree_hashes(hess_dir)
    data = str(hess_dir)
    execute("01_select_off_runs.ipynb", tmp_path, data_dir=data)
    execute("02_estimate_background.ipynb", tmp_path, data_dir=data, energy_bins=12)
    execute("03_zenith_dependence.ipynb", tmp_path, data_dir=data, zenith_edges_deg=[0, 30, 60])
    execute("04_write_index_tables.ipynb", tmp_path, data_dir=data)
    execute("04_write_index_tables.ipynb", tmp_path, data_dir=data, model_dimension="3d")
    # one field each, other than the defaults' (their runs are the notebooks' costliest part)
    execute("05_validate_background.ipynb", tmp_path, data_dir=data, pixel_size_deg=0.04, source_targets=["Crab"])
    execute("06_3d_models_and_source_runs.ipynb", tmp_path, data_dir=data, fov_bins=10, field="PKS 2155-304 (steady)")

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
    assert isinstance(bkg, Background3D) and bkg.axes["energy"].nbin == 12  # the gradient, written in 3D
    store_3d = DataStore.from_dir(tmp_path / "store-3d")
    assert len(store_3d.obs_table) == len(DataStore.from_dir(hess_dir).obs_table) == 105
    for obs_id in store_3d.obs_table["OBS_ID"]:
        bkg_3d = store_3d.obs(int(obs_id), required_irf="all-optional").bkg
        assert isinstance(bkg_3d, Background3D) and bkg_3d.axes["energy"].nbin == 12, obs_id
        assert np.all(np.isfinite(bkg_3d.data)) and np.all(bkg_3d.data >= 0) and bkg_3d.data.max() > 0, obs_id
    validation = Table.read(tmp_path / "validation.ecsv")
    assert set(validation["TARGET_NAME"]) == {"Crab"} and len(validation) == 2 * 4  # 4 runs, ours and released
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
# the notebooks that write them (each reads the earlier ones' files, which a first run leaves)
MODEL_NOTEBOOKS = [
    "02_estimate_background.ipynb",
    "03_zenith_dependence.ipynb",
    "04_write_index_tables.ipynb",
    "06_3d_models_and_source_runs.ipynb",
]


def model_hashes(folder):
    return {name: tree_hashes(folder / name) if (folder / name).is_dir() else tree_hashes(folder)[name] for name in MODEL_FILES}


@pytest.mark.slow
def test_main_job_runs_on_the_simulated_archive(tmp_path):
    """What `make run` does without data: every notebook, end to end, on the simulated archive;
    the notebooks that write the model files, run again into the same folder with the same
    parameters, write the same files."""
    command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--simulated", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIMULATED archive" in result.stderr
    summary = result.stdout.split("\nSummary\n")[1]  # the data said again at the end
    assert f"Data: the SIMULATED archive at {tmp_path / 'simulated-archive'}" in summary
    assert f"{tmp_path / 'store'}/" in summary and f"{tmp_path / 'bkg_2d_zenith.fits'}" in summary

    executed = sorted(path.name for path in (tmp_path / "executed").glob("*.ipynb"))
    assert executed == sorted(path.name for path in NOTEBOOKS.glob("0*.ipynb"))
    assert (tmp_path / "validation.ecsv").exists()
    assert (tmp_path / "store" / "hdu-index.fits.gz").exists()

    # the parameters the script gave these notebooks (the simulated archive's data_dir,
    # source_targets, exclusion_radii_deg), as papermill recorded them
    parameters = {}
    for name in MODEL_NOTEBOOKS:
        parameters |= nbformat.read(tmp_path / "executed" / name, as_version=4).metadata["papermill"]["parameters"]
    assert parameters["data_dir"] == str(tmp_path / "simulated-archive")
    assert parameters["source_targets"] == ["Simulated source"]
    first = model_hashes(tmp_path)
    run_notebooks = runpy.run_path(str(REPO / "scripts" / "run_notebooks.py"))["run_notebooks"]
    run_notebooks([NOTEBOOKS / name for name in MODEL_NOTEBOOKS], tmp_path, parameters)
    assert model_hashes(tmp_path) == first


def readme_rerun_example():
    """The bash block of the README's section "Rerunning a notebook with other parameters"."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Rerunning a notebook with other parameters", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def git(folder, *args):
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_readme_rerun_example(hess_dir, tmp_path):
    """The README's papermill example, verbatim, from a fresh shell in a clone-like copy after the
    notebooks before the one it names have run (what `make run` leaves in output/): it runs,
    writes its own folder, leaves `make run`'s products and `git status` as they were."""
    example = readme_rerun_example()
    name = re.search(r"papermill notebooks/(\S+\.ipynb) ", example).group(1)
    repo = tmp_path / "repo"
    for path in git(REPO, "ls-files", "-z").split("\0"):
        if path and (REPO / path).is_file():
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, repo / path)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "copy")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "papermill").symlink_to(Path(sys.executable).parent / "papermill")

    output = repo / "output"
    earlier = sorted(path for path in (repo / "notebooks").glob("0*.ipynb") if path.name < name)
    run_notebooks = runpy.run_path(str(REPO / "scripts" / "run_notebooks.py"))["run_notebooks"]
    run_notebooks(earlier, output, {"data_dir": str(hess_dir)})
    products = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in output.rglob("*") if path.is_file()}
    status = git(repo, "status", "--porcelain", "--ignored")

    # a fresh shell, GAMMAPY_DATA unset, in this project's layout (the data in ../shared)
    env = {k: v for k, v in os.environ.items() if k != "GAMMAPY_DATA"}
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "gammapy-data").symlink_to(hess_dir.parent)
    result = subprocess.run(["bash", "-e", "-c", example], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    rerun = output / "rerun"
    executed = nbformat.read(rerun / name, as_version=4)
    assert executed.metadata["papermill"]["parameters"]["output_dir"] == str(rerun)
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in products} == products
    assert git(repo, "status", "--porcelain", "--ignored") == status


def parameter_problems(notebook):
    """Parameters of ``notebook`` that `papermill --help-notebook` shows without a type or help,
    or does not show at all (papermill 2.7 drops a line annotated ``X | None``)."""
    cells = nbformat.read(notebook, as_version=4).cells
    source = "\n".join(cell.source for cell in cells if "parameters" in cell.metadata.get("tags", []))
    assigned = []
    for statement in ast.parse(source).body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        assigned += [target.id for target in targets if isinstance(target, ast.Name)]
    inspected = papermill.inspect_notebook(str(notebook))
    unseen = [name for name in assigned if name not in inspected]
    problems = [f"{name}: not seen by papermill (for X | None write Optional[X])" for name in unseen]
    for name, parameter in inspected.items():
        if parameter["inferred_type_name"] in ("None", ""):
            problems.append(f"{name}: no type hint")
        if not parameter["help"].strip():
            problems.append(f"{name}: no trailing comment")
    return problems


def test_parameter_problems(tmp_path):
    notebook = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    cell = nbformat.v4.new_code_cell(
        "from typing import Optional\n"
        "energy_bins: int = 15  # number of energy bins\n"
        "smooth = False\n"
        "bins: Optional[int] = None  # bins or None\n"
        "edges: list[float] | None = None  # dropped by papermill\n"
    )
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell]
    nbformat.write(notebook, tmp_path / "nb.ipynb")
    assert parameter_problems(tmp_path / "nb.ipynb") == [
        "edges: not seen by papermill (for X | None write Optional[X])",
        "smooth: no type hint",
        "smooth: no trailing comment",
    ]


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_help_notebook_shows_types_and_help(notebook):
    """`papermill --help-notebook` shows each parameter's type and meaning: type hints and
    one-line trailing comments in the parameters cell."""
    assert papermill.inspect_notebook(str(notebook)), f"{notebook.name} has no parameters cell"
    assert not parameter_problems(notebook), f"{notebook.name}: {parameter_problems(notebook)}"
    command = [sys.executable, "-m", "papermill", "--help-notebook", str(notebook)]
    shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "Unknown type" not in shown, shown


@pytest.mark.parametrize(
    "notebook, parameters, message",
    [
        ("02_estimate_background.ipynb", {"energy_bins": "ten"}, "energy_bins must be"),
        ("03_zenith_dependence.ipynb", {"zenith_edges_deg": 30}, "zenith_edges_deg must be a list of bin edges in deg, got 30"),
        ("03_zenith_dependence.ipynb", {"zenith_edges_deg": "0,20,40"}, "zenith_edges_deg must be a list of bin edges in deg"),
        ("04_write_index_tables.ipynb", {"model_dimension": "3D model"}, "model_dimension must be '2d' or '3d', got '3D model'"),
        ("04_write_index_tables.ipynb", {"fov_gradient": "yes"}, "fov_gradient must be True or False, got 'yes'"),
    ],
)
def test_wrong_parameter_type_names_the_parameter(tmp_path, notebook, parameters, message):
    """A papermill parameter of the wrong type stops the notebook with one line naming it (issue 13)."""
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(
            NOTEBOOKS / notebook, tmp_path / notebook, parameters={"output_dir": str(tmp_path), **parameters},
            cwd=NOTEBOOKS, kernel_name="python3", progress_bar=False,
        )
    assert message in str(error.value.evalue) and "\n" not in str(error.value.evalue)
