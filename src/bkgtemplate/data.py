"""Data: find the H.E.S.S. DL3 DR1 release and open it as a gammapy data store.

The data is looked for at an explicit path or, by default, at ``$GAMMAPY_DATA/hess-dl3-dr1``,
the layout that ``gammapy download datasets`` produces. A missing dataset raises
`DataNotFoundError` with one line that says which path was tried and how to get the data.
"""

import logging
import os
import re
from pathlib import Path
from gammapy.data import DataStore

__all__ = ["DATASET_NAME", "DataNotFoundError", "find_data_dir", "open_data_store"]

log = logging.getLogger(__name__)

DATASET_NAME = "hess-dl3-dr1"
"""Folder of the H.E.S.S. DL3 DR1 release inside ``$GAMMAPY_DATA``."""

INDEX_STEMS = ("hdu-index", "obs-index")
INDEX_SUFFIXES = (".fits.gz", ".fits")


class DataNotFoundError(FileNotFoundError):
    """The dataset folder, or its index files, could not be found."""


def _how_to_get():
    # `gammapy download datasets --out DIR` extracts into DIR/<release>/, not DIR itself.
    from gammapy.scripts.download import RELEASE

    return (
        f"get it with `gammapy download datasets --out <dir>` "
        f"then `export GAMMAPY_DATA=<dir>/{RELEASE}`"
    )


def _index_files(folder):
    """Index files of a data store folder, {stem: path}; a stem without a file is left out."""
    found = {}
    for stem in INDEX_STEMS:
        for suffix in INDEX_SUFFIXES:
            filename = folder / f"{stem}{suffix}"
            if filename.is_file():
                found[stem] = filename
                break
    return found


def find_data_dir(path=None):
    """Find the folder of a DL3 data store (obs and HDU index files).

    Parameters
    ----------
    path : str or `~pathlib.Path`, optional
        Folder holding ``obs-index.fits(.gz)`` and ``hdu-index.fits(.gz)``. Environment
        variables (``$GAMMAPY_DATA``) and ``~`` are expanded. Default is None, which means
        ``$GAMMAPY_DATA/hess-dl3-dr1``.

    Returns
    -------
    path : `~pathlib.Path`
        The folder, absolute.

    Raises
    ------
    DataNotFoundError
        If an environment variable in the path is not set, the folder does not exist, or it
        lacks one of the two index files. The message names the path tried.

    Examples
    --------
    >>> from bkgtemplate.data import find_data_dir
    >>> find_data_dir()  # doctest: +SKIP
    PosixPath('/home/user/gammapy-data/hess-dl3-dr1')
    >>> find_data_dir("$GAMMAPY_DATA/hess-dl3-dr1").name  # doctest: +SKIP
    'hess-dl3-dr1'
    """
    if path is None:
        if not os.environ.get("GAMMAPY_DATA"):
            raise DataNotFoundError(
                f"H.E.S.S. DL3 DR1 data not found: GAMMAPY_DATA is not set "
                f"(looked for $GAMMAPY_DATA/{DATASET_NAME}); {_how_to_get()}"
            )
        path = Path(os.environ["GAMMAPY_DATA"]) / DATASET_NAME

    tried = str(path)
    expanded = os.path.expanduser(os.path.expandvars(tried))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise DataNotFoundError(
            f"Data not found: {', '.join(unset)} is not set (path tried: {tried}); {_how_to_get()}"
        )

    folder = Path(expanded).absolute()
    if not folder.is_dir():
        raise DataNotFoundError(f"Data not found: folder {folder} does not exist; {_how_to_get()}")

    missing = [stem for stem in INDEX_STEMS if stem not in _index_files(folder)]
    if missing:
        names = " and ".join(f"{stem}.fits(.gz)" for stem in missing)
        raise DataNotFoundError(
            f"Data not found: folder {folder} exists but has no {names}; {_how_to_get()}"
        )

    log.debug(f"Data store found in {folder}")
    return folder


def open_data_store(path=None):
    """Open a DL3 data store found with `find_data_dir`.

    Parameters
    ----------
    path : str or `~pathlib.Path`, optional
        Folder of the data store, see `find_data_dir`. Default is None, which means
        ``$GAMMAPY_DATA/hess-dl3-dr1``.

    Returns
    -------
    data_store : `~gammapy.data.DataStore`
        The data store, read from its index files (``.fits.gz`` or ``.fits``).

    Raises
    ------
    DataNotFoundError
        If the folder or its index files are missing.

    Examples
    --------
    >>> from bkgtemplate.data import open_data_store
    >>> data_store = open_data_store()  # doctest: +SKIP
    >>> len(data_store.obs_table)  # doctest: +SKIP
    105
    """
    folder = find_data_dir(path)
    index = _index_files(folder)
    return DataStore.from_dir(
        folder,
        hdu_table_filename=index["hdu-index"],
        obs_table_filename=index["obs-index"],
    )
