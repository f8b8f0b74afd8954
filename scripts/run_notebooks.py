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


def choose_data(output_dir, data_dir=None, simulated=False):
    """The data the notebooks run on: the real data if found, else the simulated archive.

    Parameters
    ----------
    output_dir : `~pathlib.Path`
        Folder for the notebooks' outputs; the simulated archive goes to its ``simulated-archive``.
    data_dir : str or `~pathlib.Path`, optional
        Data store folder. Default is None, which means ``$GAMMAPY_DATA/hess-dl3-dr1`` and,
        if that is absent, a simulated archive.
    simulated : bool, optional
        Use the simulated archive even if the real data is there. Default is False.

    Returns
    -------
    parameters : dict
        ``data_dir`` and, for the simulated archive, ``source_targets`` and ``exclusion_radii_deg``.
    description : str
        Which data that is, for the summary.
    """
    reason = "asked for with --simulated"
    if not simulated:
        try:
            path = find_data_dir(data_dir)
            log.info(f"Data: {path}")
            return {"data_dir": str(path)}, f"real data at {path}"
        except DataNotFoundError as error:
            if data_dir is not None:
                raise
            log.warning(f"{error}")
            reason = f"no real data: {error}"
    archive = output_dir / "simulated-archive"
    log.warning(f"Falling back to the SIMULATED archive: results are not H.E.S.S. results (writing it to {archive})")
    parameters = {
        "data_dir": str(simulated_data_dir(output_dir)),
        "source_targets": SIMULATED_SOURCE_TARGETS,
        "exclusion_radii_deg": SIMULATED_EXCLUSION_RADII_DEG,
    }
    return parameters, f"the SIMULATED archive at {archive} ({reason}); results are not H.E.S.S. results"


def run_notebooks(notebooks, output_dir, parameters):
    """Execute ``notebooks`` in order; stop at the first one that fails.

    Parameters
    ----------
    notebooks : list of `~pathlib.Path`
        Notebooks, executed in the given order with their folder as working directory.
    output_dir : `~pathlib.Path`
        Folder for the notebooks' outputs; executed notebooks go to ``output_dir/executed``.
    parameters : dict
        Parameters for the notebooks (``output_dir`` is added); a notebook gets those its
        ``parameters`` cell declares.

    Returns
    -------
    executed : list of `~pathlib.Path`
        The executed notebooks.
    """
    output_dir = Path(output_dir).absolute()
    executed_dir = output_dir / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"output_dir": str(output_dir), **parameters}

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


PRODUCT_KINDS = {".fits": "models", ".ecsv": "tables", ".csv": "tables"}


def products(output_dir, since):
    """What the notebooks wrote into ``output_dir`` since the time ``since`` (s since the epoch),
    grouped: {kind: [path, ...]}; a folder with an ``hdu-index`` file is one data store."""
    found = {}
    skip = {output_dir / "executed", output_dir / "simulated-archive"}
    stores = sorted(index.parent for index in output_dir.rglob("hdu-index.fits*"))
    for path in sorted(output_dir.rglob("*")):
        if not path.is_file() or path.stat().st_mtime < since:
            continue
        if any(folder == path or folder in path.parents for folder in skip):
            continue
        store = next((store for store in stores if store in path.parents), None)
        if store is not None:
            found.setdefault("data stores", []).append(store)
            continue
        suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
        found.setdefault(PRODUCT_KINDS.get(suffix, "other files"), []).append(path)
    return {kind: sorted(set(paths)) for kind, paths in found.items()}


def summary(output_dir, data, executed, since):
    """The closing summary of `make run`: the data used and where every product is."""
    lines = ["", "Summary", f"  Data: {data}", f"  Executed notebooks ({len(executed)}): {output_dir / 'executed'}"]
    for kind, paths in sorted(products(output_dir, since).items()):
        lines.append(f"  {kind.capitalize()}:")
        lines += [f"    {path}{'/' if path.is_dir() else ''}" for path in paths]
    return "\n".join(lines)


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

    output_dir = Path(args.output_dir).absolute()
    start, since = time.perf_counter(), time.time() - 1  # 1 s: coarse file time stamps
    try:
        parameters, data = choose_data(output_dir, args.data_dir, args.simulated)
        executed = run_notebooks(notebooks, output_dir, parameters)
    except DataNotFoundError as error:
        log.error(f"{error}")
        return 1
    except papermill.PapermillExecutionError:
        return 1
    print(f"\n{len(executed)} notebooks executed in {time.perf_counter() - start:.0f} s.")
    print(summary(output_dir, data, executed, since))
    return 0


if __name__ == "__main__":
    sys.exit(main())
