"""Store: a new gammapy data store in which every run has its background model.

The new store holds only what is new (the background models and two index files); its index
points at the original event and IRF files where they are, through FILE_DIRs relative to the
new store's folder, so nothing is copied and the input store is never written to.
"""

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.table import Table, vstack
from gammapy.irf import Background2D, Background3D
from gammapy.utils.scripts import make_path

__all__ = ["staged_write", "write_background_store"]

log = logging.getLogger(__name__)

BKG_DIR = "bkg"
# Uncompressed: reading one HDU from a gzipped file decompresses every HDU before it.
BKG_FILE = "background.fits"
HDU_INDEX_FILE = "hdu-index.fits.gz"
OBS_INDEX_FILE = "obs-index.fits.gz"

_GADF_HEADERS = {
    "HDUCLASS": "GADF",
    "HDUDOC": "https://github.com/open-gamma-ray-astro/gamma-astro-data-formats",
    "HDUVERS": "0.2",
}
_HDU_INDEX_COLUMNS = ["OBS_ID", "HDU_TYPE", "HDU_CLASS", "FILE_DIR", "FILE_NAME", "HDU_NAME", "SIZE"]
# Header keys FITS builds itself, or that this module sets: never copied from a model's meta.
_RESERVED_KEYS = {"EXTNAME", "BASE_DIR", "CHECKSUM", "DATASUM"}
_MAX_LISTED = 20


def write_background_store(data_store, models, assignment, output_dir, overwrite=False):
    """Write a new data store in which every run has its background model.

    The new store holds the background models in ``bkg/background.fits`` (one BinTable HDU
    per model, named by its key in ``models``), an HDU index and an obs index. The HDU index has
    every row of the input one except its ``bkg`` rows, plus exactly one ``bkg`` row per run; the
    kept rows point at the original event and IRF files through FILE_DIRs relative to the new
    store's folder, so the files are used where they are. The obs index is the input one plus
    the extra columns of ``assignment``.

    Everything is written to a temporary sibling folder that is renamed into place at the end:
    an error leaves either the previous store or the new one, never part of one.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Input data store; its ``hdu_table.base_dir`` is the input folder. Never written to.
    models : dict of {str: `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`}
        Background models (rate in s-1 MeV-1 sr-1) by HDU name, e.g. ``"BKG_ZEN_00_20"``.
        HDU names are case-insensitive in FITS, so they must differ in more than case.
    assignment : `~astropy.table.Table`
        One row per run of the input obs index, with columns OBS_ID and BKG_HDU (the key in
        ``models`` of the run's background). Any other column (e.g. ZEN_BIN, MODEL_ZEN) is
        added to the new obs index.
    output_dir : str or `~pathlib.Path`
        Folder of the new store. It must not be, or be inside, the input folder.
    overwrite : bool, optional
        Replace an existing non-empty ``output_dir``. The previous store is removed only after
        the new one is in place. Default is False.

    Returns
    -------
    path : `~pathlib.Path`
        Folder of the new store (resolved), to open with `~gammapy.data.DataStore.from_dir`.

    Raises
    ------
    ValueError
        If runs are missing from or repeated in ``assignment``, name unknown models, or if
        ``output_dir`` overlaps the input store.
    TypeError
        If a model is not a `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`.
    FileExistsError
        If ``output_dir`` exists, is not empty and ``overwrite`` is False.

    Notes
    -----
    Relative FILE_DIRs are computed between resolved (symlink-free) paths, because ``..`` in a
    path is resolved by the operating system from the physical folder. The new store keeps
    working when it is moved together with the input data (same relative layout); FILE_DIRs
    that were absolute in the input index stay absolute. ``HDUIndexTable.read`` sets BASE_DIR
    to the index file's folder, so no BASE_DIR is written.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import Table, vstack
    >>> from gammapy.data import DataStore
    >>> from gammapy.irf import Background2D
    >>> from gammapy.maps import MapAxis
    >>> from bkgtemplate.store import write_background_store
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> energy = MapAxis.from_energy_bounds("0.1 TeV", "100 TeV", nbin=12, name="energy")
    >>> offset = MapAxis.from_bounds(0, 2.5, nbin=5, unit="deg", name="offset")
    >>> bkg = Background2D(axes=[energy, offset], data=np.full((12, 5), 1e-6),
    ...                    unit="s-1 MeV-1 sr-1", meta={"ZEN_LO": 0.0, "ZEN_HI": 90.0})
    >>> obs_ids = data_store.obs_table["OBS_ID"]
    >>> assignment = Table({"OBS_ID": obs_ids, "BKG_HDU": ["BKG_ALL"] * len(obs_ids)})
    >>> path = write_background_store(data_store, {"BKG_ALL": bkg}, assignment,
    ...                               "hess-dl3-dr1-bkg")  # doctest: +SKIP
    >>> DataStore.from_dir(path).obs(23523, required_irf="all-optional").bkg  # doctest: +SKIP
    """
    hdu_table = data_store.hdu_table
    obs_table = data_store.obs_table
    if obs_table is None:
        raise ValueError("The data store has no obs index: cannot assign models to runs")

    input_dir = Path(hdu_table.base_dir).resolve()
    output_dir = make_path(output_dir).resolve()
    _check_models(models)
    run_models, extra = _check_assignment(assignment, models, obs_table)
    _check_output_dir(output_dir, input_dir, overwrite)

    model_hdus = {name: _model_hdu(model, name) for name, model in models.items()}
    sizes = {name: hdu.filebytes() for name, hdu in model_hdus.items()}
    new_hdu_table, n_dropped = _make_hdu_index(hdu_table, run_models, models, sizes, input_dir, output_dir)
    _check_file_paths(new_hdu_table, output_dir)
    new_obs_table = _make_obs_index(obs_table, assignment, extra)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", suffix=".tmp", dir=output_dir.parent))
    stage, aside = tmp_root / "new", tmp_root / "old"
    try:
        # A plain mkdir inside the private temp folder gets the user's usual permissions.
        (stage / BKG_DIR).mkdir(parents=True)
        _write_models(model_hdus, stage / BKG_DIR / BKG_FILE)
        _write_index(new_hdu_table, stage / HDU_INDEX_FILE, "HDU_INDEX", "HDU")
        _write_index(new_obs_table, stage / OBS_INDEX_FILE, "OBS_INDEX", "OBS")
        _move_into_place(stage, output_dir, aside)
    except BaseException:
        if aside.exists():
            log.error(f"The previous store could not be put back: it is in {aside}")
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    shutil.rmtree(tmp_root, ignore_errors=True)

    n_3d = sum(isinstance(model, Background3D) for model in models.values())
    unused = sorted(set(models) - set(run_models.values()))
    log.info(
        f"Wrote background store {output_dir}: {len(models)} models ({len(models) - n_3d} 2D, "
        f"{n_3d} 3D) for {len(run_models)} runs, {n_dropped} old bkg rows replaced, events and "
        f"IRFs read from {input_dir}"
        + (f"; models assigned to no run: {unused}" if unused else "")
    )
    return output_dir


def _check_models(models):
    if not models:
        raise ValueError("No background models given")
    upper = {}
    for name, model in models.items():
        if not isinstance(name, str) or not name or name != name.strip() or not name.isascii() or len(name) > 68:
            raise ValueError(
                f"Invalid HDU name {name!r}: need an ASCII str of 1-68 characters without surrounding spaces"
            )
        if name.upper() == "PRIMARY":
            raise ValueError(f"Invalid HDU name {name!r}: reserved by FITS")
        if not isinstance(model, (Background2D, Background3D)):
            raise TypeError(
                f"Model {name!r} is a {type(model).__name__}, need Background2D or Background3D"
            )
        if name.upper() in upper:
            raise ValueError(f"HDU names {upper[name.upper()]!r} and {name!r} differ only in case")
        upper[name.upper()] = name


def _list_runs(obs_ids):
    obs_ids = sorted(int(_) for _ in obs_ids)
    text = ", ".join(str(_) for _ in obs_ids[:_MAX_LISTED])
    if len(obs_ids) > _MAX_LISTED:
        text += f", ... ({len(obs_ids)} runs)"
    return text


def _as_str(values):
    values = np.asarray(values)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii")
    return np.char.strip(values.astype(str))


def _check_assignment(assignment, models, obs_table):
    """Check the assignment and return ({obs_id: hdu_name}, extra column names)."""
    missing_columns = [_ for _ in ("OBS_ID", "BKG_HDU") if _ not in assignment.colnames]
    if missing_columns:
        raise ValueError(f"Assignment lacks columns {missing_columns}; it has {assignment.colnames}")

    obs_ids = np.asarray(assignment["OBS_ID"], dtype=np.int64)
    hdu_names = _as_str(assignment["BKG_HDU"])
    unique, counts = np.unique(obs_ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"Runs assigned more than once: {_list_runs(unique[counts > 1])}")

    input_ids = np.asarray(obs_table["OBS_ID"], dtype=np.int64)
    missing = np.setdiff1d(input_ids, obs_ids)
    if missing.size:
        raise ValueError(f"Runs of the obs index without a model: {_list_runs(missing)}")
    unknown_runs = np.setdiff1d(obs_ids, input_ids)
    if unknown_runs.size:
        raise ValueError(f"Runs assigned but not in the obs index: {_list_runs(unknown_runs)}")

    unknown = ~np.isin(hdu_names, list(models))
    if np.any(unknown):
        raise ValueError(
            f"Unknown BKG_HDU {sorted(set(hdu_names[unknown]))} for runs {_list_runs(obs_ids[unknown])}; "
            f"models are {sorted(models)}"
        )

    extra = [_ for _ in assignment.colnames if _ not in ("OBS_ID", "BKG_HDU")]
    clash = [_ for _ in extra if _ in obs_table.colnames]
    if clash:
        raise ValueError(f"Assignment columns {clash} already exist in the obs index; rename them")
    return dict(zip(obs_ids.tolist(), hdu_names.tolist())), extra


def _check_output_dir(output_dir, input_dir, overwrite):
    if output_dir == input_dir or output_dir.is_relative_to(input_dir):
        raise ValueError(
            f"Output folder {output_dir} is inside the input store {input_dir}: never write there"
        )
    if input_dir.is_relative_to(output_dir):
        raise ValueError(f"Output folder {output_dir} contains the input store {input_dir}")
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            raise FileExistsError(f"Output path {output_dir} exists and is not a folder")
        if any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"Output folder {output_dir} exists and is not empty: pass overwrite=True to replace it"
            )


def _check_file_paths(hdu_table, output_dir):
    """Refuse kept rows that point into the folder about to be replaced; warn about missing files."""
    is_new = hdu_table["HDU_TYPE"] == "bkg"
    paths = {
        Path(os.path.normpath(output_dir / file_dir / file_name))
        for file_dir, file_name in zip(hdu_table["FILE_DIR"][~is_new], hdu_table["FILE_NAME"][~is_new])
    }
    inside = sorted(path.name for path in paths if path.is_relative_to(output_dir))
    if inside:
        raise ValueError(f"Input files {inside[:5]} lie inside the output folder {output_dir}")
    missing = sorted(str(path) for path in paths if not path.exists())
    if missing:
        log.warning(
            f"{len(missing)} of {len(paths)} files in the HDU index do not exist (e.g. {missing[0]}): "
            "the new store cannot read them either"
        )


def _relative_dir(file_dir, input_dir, output_dir):
    if os.path.isabs(file_dir):
        return file_dir
    target = (input_dir / file_dir).resolve()
    try:
        return Path(os.path.relpath(target, output_dir)).as_posix()
    except ValueError:  # e.g. another drive on Windows
        return target.as_posix()


def _make_hdu_index(hdu_table, run_models, models, sizes, input_dir, output_dir):
    """New HDU index table (without BASE_DIR) and the number of dropped bkg rows."""
    table = Table(hdu_table, copy=True)
    table.meta.pop("BASE_DIR", None)
    for name in table.colnames:
        if table[name].dtype.kind in "SU":
            table[name] = _as_str(table[name])

    is_bkg = table["HDU_TYPE"] == "bkg"
    n_dropped = int(is_bkg.sum())
    table = table[~is_bkg]

    new_dirs = {_: _relative_dir(_, input_dir, output_dir) for _ in set(table["FILE_DIR"])}
    table["FILE_DIR"] = np.array([new_dirs[_] for _ in table["FILE_DIR"]], dtype=str)

    obs_ids = list(run_models)
    new = Table(
        {
            "OBS_ID": np.array(obs_ids, dtype=np.int64),
            "HDU_TYPE": ["bkg"] * len(obs_ids),
            "HDU_CLASS": [models[run_models[_]].tag for _ in obs_ids],
            "FILE_DIR": [BKG_DIR] * len(obs_ids),
            "FILE_NAME": [BKG_FILE] * len(obs_ids),
            "HDU_NAME": [run_models[_] for _ in obs_ids],
            "SIZE": np.array([sizes[run_models[_]] for _ in obs_ids], dtype=np.int64),
        }
    )
    for name in table.colnames:
        if name not in new.colnames:
            new[name] = np.zeros((len(new),) + table[name].shape[1:], dtype=table[name].dtype)
    combined = vstack([table, new[table.colnames]], join_type="exact", metadata_conflicts="silent")
    combined.meta = table.meta

    # Keep the input order; each run's bkg row goes after its other rows.
    rank = {}
    for obs_id in list(table["OBS_ID"]) + obs_ids:
        rank.setdefault(int(obs_id), len(rank))
    run_rank = np.array([rank[int(_)] for _ in combined["OBS_ID"]])
    order = np.lexsort((np.arange(len(combined)), run_rank))
    return combined[order], n_dropped


def _make_obs_index(obs_table, assignment, extra):
    table = Table(obs_table, copy=True)
    table.meta.pop("BASE_DIR", None)
    index = {int(obs_id): i for i, obs_id in enumerate(assignment["OBS_ID"])}
    rows = np.array([index[int(_)] for _ in table["OBS_ID"]], dtype=int)
    for name in extra:
        table[name] = assignment[name][rows]
    return table


def _header_value(key, value):
    """A FITS header (value, comment) for a meta entry, or None if it cannot be written."""
    if isinstance(value, u.Quantity) and value.isscalar:
        return value.value, f"[{value.unit.to_string('fits')}]"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bool, int, float)):
        return value, None
    log.warning(f"Model meta {key!r} of type {type(value).__name__} not written: not a FITS header value")
    return None


def _model_hdu(model, name):
    """BinTable HDU of one model with its GADF headers and the scalar entries of its meta."""
    table = model.to_table()
    mandatory = dict(_GADF_HEADERS)
    mandatory.update(
        HDUCLAS1="RESPONSE",
        HDUCLAS2="BKG",
        HDUCLAS3="POINT-LIKE" if model.is_pointlike else "FULL-ENCLOSURE",
        HDUCLAS4=model.tag.upper(),
    )
    if isinstance(model, Background3D):
        # gammapy reads a missing FOVALIGN as RADEC: always state it.
        mandatory["FOVALIGN"] = model.fov_alignment.value

    meta = {key: value for key, value in table.meta.items() if key.upper() not in _RESERVED_KEYS}
    table.meta = {}
    hdu = fits.table_to_hdu(table)
    hdu.name = name
    header = hdu.header
    for key, value in mandatory.items():
        header[key] = value
    for key, value in meta.items():
        if key.upper() in mandatory or key.upper() == "FOVALIGN":
            continue
        if key.lower() in ("comments", "comment", "history") and isinstance(value, (list, tuple)):
            for line in value:
                header.add_history(str(line)) if key.lower() == "history" else header.add_comment(str(line))
            continue
        card = _header_value(key, value)
        if card is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VerifyWarning)  # long keys become HIERARCH cards
                header[key] = card
    return hdu


def _write_models(model_hdus, filename):
    fits.HDUList([fits.PrimaryHDU(), *model_hdus.values()]).writeto(filename)
    log.debug(f"Wrote {len(model_hdus)} background models to {filename}")


def _write_index(table, filename, extname, hduclas2):
    table = Table(table, copy=False)
    table.meta = dict(table.meta)
    table.meta.pop("EXTNAME", None)
    table.meta.update(_GADF_HEADERS, HDUCLAS1="INDEX", HDUCLAS2=hduclas2)
    hdu = fits.table_to_hdu(table)
    hdu.name = extname
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(filename)
    log.debug(f"Wrote {extname} with {len(table)} rows to {filename}")


def _move_into_place(stage, output_dir, aside):
    """Rename ``stage`` to ``output_dir``, moving an existing ``output_dir`` to ``aside`` first."""
    moved_aside = False
    if output_dir.exists() or output_dir.is_symlink():
        os.replace(output_dir, aside)
        moved_aside = True
    try:
        os.replace(stage, output_dir)
    except BaseException:
        if moved_aside:
            os.replace(aside, output_dir)
        raise


from contextlib import contextmanager  # noqa: E402  (temporary: replaced by the store rewrite)


@contextmanager
def staged_write(path, overwrite=False):
    """Yield a temporary sibling path to write ``path`` into; move it into place on success."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp_root / path.name
        os.replace(tmp_root / path.name, path)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
