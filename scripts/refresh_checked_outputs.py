"""Refresh the outputs that nbval compares, and strip all others, in the committed notebooks.

Each notebook is executed as ``make test`` runs it (default parameters, ``notebooks/`` as the
working directory, so its files go to ``notebooks/output``), in order, since each reads what
the previous ones wrote. The text printed by cells tagged ``nbval-check-output`` is copied into
the committed notebook; every other output is removed. Run it after a change that moves a
checked figure, read the diff of the notebooks, and commit what is right::

    GAMMAPY_DATA=../shared/gammapy-data .venv/bin/python scripts/refresh_checked_outputs.py
"""

import argparse
import logging
import tempfile
from pathlib import Path
import nbformat
import papermill

log = logging.getLogger("refresh_checked_outputs")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CHECKED = "nbval-check-output"


def checked_outputs(cell):
    """The outputs nbval compares: printed text and results, no warnings on stderr."""
    outputs = cell.get("outputs", [])
    return [o for o in outputs if o["output_type"] == "execute_result" or o.get("name") == "stdout"]


def refresh(notebook, executed):
    """Copy the checked outputs of ``executed`` into ``notebook`` (matched by cell id), strip the rest."""
    outputs = {cell["id"]: cell for cell in executed.cells if cell["cell_type"] == "code"}
    for cell in notebook.cells:
        if cell["cell_type"] != "code":
            continue
        if CHECKED in cell["metadata"].get("tags", []):
            cell["outputs"] = checked_outputs(outputs[cell["id"]])
            cell["execution_count"] = outputs[cell["id"]]["execution_count"]
        else:
            cell["outputs"], cell["execution_count"] = [], None
    return notebook


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names (default: all, in order)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = [NOTEBOOKS / name for name in args.notebooks] or sorted(NOTEBOOKS.glob("0*.ipynb"))
    with tempfile.TemporaryDirectory() as folder:
        for path in paths:
            log.info(f"Executing {path.name}")
            executed_path = Path(folder) / path.name
            papermill.execute_notebook(path, executed_path, cwd=NOTEBOOKS, progress_bar=False)
            notebook = nbformat.read(path, as_version=4)
            nbformat.write(refresh(notebook, nbformat.read(executed_path, as_version=4)), path)
    log.info(f"Refreshed {len(paths)} notebooks: check `git diff {NOTEBOOKS.name}` before committing.")


if __name__ == "__main__":
    main()
