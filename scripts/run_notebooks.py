"""Execute the tutorial notebooks in order with papermill (what `make run` does).

The notebooks run on the H.E.S.S. DL3 DR1 data found by `bkgtemplate.data.find_data_dir`
(``--data-dir``, else ``$GAMMAPY_DATA/hess-dl3-dr1``). Without it they run on a simulated
archive written to ``<output-dir>/simulated-archive``. Executed notebooks go to
``<output-dir>/executed/``; what the notebooks write goes to ``<output-dir>``.

Usage::

    python scripts/run_notebooks.py --output-dir output
"""

import argparse
import logging
import sys
import time
from pathlib import Path
import papermill
from bkgtemplate.data import DataNotFoundError, find_data_dir

log = logging.getLogger("run_notebooks")

REPO = Path(__file__).resolve().parent.parent
SIMULATED_SOURCE_TARGETS = ["Simulated source"]
SIMULATED_EXCLUSION_RADII_DEG = {"Simulated source": 0.5}  # a point source, PSF sigma 0.1 deg


def simulated_data_dir(output_dir):
    """Write the simulated archive (seed 0) and return its folder."""
    from bkgtemplate.simulate import simulate_archive

    path = simulate_archive(output_dir / "simulated-archive", seed=0, overwrite=True)
    return find_data_dir(path)


def notebook_parameters(notebook, candidates):
    """The candidates that the notebook's ``parameters`` cell declares; the others are dropped."""
    declared = papermill.inspect_notebook(str(notebook))
    dropped = sorted(set(candidates) - set(declared))
    if dropped:
        log.debug(f"{notebook.name}: no parameter {', '.join(dropped)}, not passed")
    return {name: value for name, value in candidates.items() if name in declared}


def run_notebooks(notebooks, output_dir, data_dir=None, simulated=False):
    """Execute ``notebooks`` in order; stop at the first one that fails.

    Parameters
    ----------
    notebooks : list of `~pathlib.Path`
        Notebooks, executed in the given order with their folder as working directory.
    output_dir : `~pathlib.Path`
        Folder for the notebooks' outputs; executed notebooks go to ``output_dir/executed``.
    data_dir : str or `~pathlib.Path`, optional
        Data store folder. Default is None, which means ``$GAMMAPY_DATA/hess-dl3-dr1`` and,
        if that is absent, a simulated archive.
    simulated : bool, optional
        Use the simulated archive even if the real data is there. Default is False.

    Returns
    -------
    executed : list of `~pathlib.Path`
        The executed notebooks.
    """
    output_dir = Path(output_dir).absolute()
    executed_dir = output_dir / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)

    parameters = {"output_dir": str(output_dir)}
    if not simulated:
        try:
            parameters["data_dir"] = str(find_data_dir(data_dir))
            log.info(f"Data: {parameters['data_dir']}")
        except DataNotFoundError as error:
            if data_dir is not None:
                raise
            log.warning(f"{error}")
            simulated = True
    if simulated:
        log.warning(
            "Falling back to the SIMULATED archive: results are not H.E.S.S. results "
            f"(writing it to {output_dir / 'simulated-archive'})"
        )
        parameters["data_dir"] = str(simulated_data_dir(output_dir))
        parameters["source_targets"] = SIMULATED_SOURCE_TARGETS
        parameters["exclusion_radii_deg"] = SIMULATED_EXCLUSION_RADII_DEG

    executed = []
    for notebook in notebooks:
        out = executed_dir / notebook.name
        nb_parameters = notebook_parameters(notebook, parameters)
        log.info(f"Running {notebook.name} with {nb_parameters}")
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(out),
                parameters=nb_parameters,
                cwd=str(notebook.parent),
                kernel_name="python3",
                progress_bar=False,
            )
        except papermill.PapermillExecutionError as error:
            log.error(f"{notebook.name} failed, see {out}: {error.ename}: {error.evalue}")
            raise
        log.info(f"{notebook.name} done in {time.perf_counter() - start:.0f} s")
        executed.append(out)
    return executed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="output", help="Default is 'output'.")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Data store folder. Default is $GAMMAPY_DATA/hess-dl3-dr1, else simulated data.",
    )
    parser.add_argument(
        "--simulated", action="store_true", help="Use the simulated archive in any case."
    )
    parser.add_argument(
        "--notebooks-dir", default=str(REPO / "notebooks"), help="Default is notebooks/."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    notebooks = sorted(Path(args.notebooks_dir).glob("0*.ipynb"))
    if not notebooks:
        log.warning(f"No notebooks 0*.ipynb in {args.notebooks_dir}: nothing to run")
        return 0

    start = time.perf_counter()
    try:
        executed = run_notebooks(notebooks, args.output_dir, args.data_dir, args.simulated)
    except DataNotFoundError as error:
        log.error(f"{error}")
        return 1
    except papermill.PapermillExecutionError:
        return 1
    output_dir = Path(args.output_dir).absolute()
    print(f"\n{len(executed)} notebooks executed in {time.perf_counter() - start:.0f} s.")
    print(f"Executed notebooks: {output_dir / 'executed'}")
    print(f"Results (models, tables, the new data store): {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
