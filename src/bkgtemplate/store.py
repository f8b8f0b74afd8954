"""Store: a new gammapy data store in which every run has its background model; it holds only the models and two
index files pointing at the input files through relative FILE_DIRs."""

import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table, vstack
from gammapy.data.data_store import MissingRequiredHDU
from gammapy.irf import Background2D, Background3D
from gammapy.irf.io import COMMON_HEADERS
from gammapy.maps import MapAxis
from gammapy.utils.scripts import make_path
from .data import collect_runs
from .geometry import fov_radec_to_altaz
from .histograms import RATE_UNIT, rotation_steps

__all__ = ["check_replaceable", "gammapy_fov_alignment", "sky_aligned", "staged_write", "write_background_store"]

log = logging.getLogger(__name__)

BKG_DIR = "bkg"
# Uncompressed: reading one HDU from a gzipped file decompresses every HDU before it.
BKG_FILE = "background.fits"
HDU_INDEX_FILE = "hdu-index.fits.gz"
OBS_INDEX_FILE = "obs-index.fits.gz"
# Marks the stores written here (both index headers); overwrite=True replaces nothing else.
CREATOR = "bkgtemplate.store"
STORE_FILES = {BKG_DIR, f"{BKG_DIR}/{BKG_FILE}", HDU_INDEX_FILE, OBS_INDEX_FILE}


@contextmanager
def staged_write(path, overwrite=False):
    """Yield a temporary `~pathlib.Path` beside ``path``, moved into place at the end; on any error nothing changes, and
    without ``overwrite`` an existing file or non-empty folder is never replaced, even one that appears meanwhile."""
    path = make_path(path).absolute()
    if _exists(path) and not overwrite and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent))
    stage, aside = tmp / path.name, tmp / "previous"
    try:
        yield stage
        _move_into_place(stage, path, aside, overwrite)
    except BaseException:
        if _exists(aside):
            log.error(f"The previous {path} could not be put back: it is in {aside}")
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; rmdir removes only an empty folder
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _exists(path):
    return path.exists() or path.is_symlink()


def _move_into_place(stage, path, aside, overwrite):
    # a hard link (file) or rename (folder) fails on an existing target: nothing that appeared is replaced
    if not _exists(stage):
        raise FileNotFoundError(f"Nothing was written to {stage}")
    try:
        if not (overwrite and _exists(path)):
            os.rename(stage, path) if stage.is_dir() else os.link(stage, path)
        elif not (stage.is_dir() or path.is_dir()):
            os.replace(stage, path)
        else:
            os.rename(path, aside)
            try:
                os.rename(stage, path)
            except BaseException:
                os.rename(aside, path)
                raise
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(f"{path} appeared while writing: not replaced") from error
        raise


def write_background_store(data_store, models, assignment, output_dir, overwrite=False):
    """Write a new data store in which every run has its background model; return its folder.

    Models go to ``bkg/background.fits`` (one HDU per model), the HDU index gets one ``bkg`` row per run and
    relative FILE_DIRs, the obs index the extra columns of ``assignment``. An ALTAZ 3D model of a run that gammapy
    reads as sky-aligned (`gammapy_fov_alignment`) is written `sky_aligned`. All is checked before anything is written.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Input data store. Never written to.
    models : dict of {str: `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`}
        Models by HDU name (case-insensitive in FITS): finite rates >= 0 convertible to s-1 MeV-1 sr-1.
    assignment : `~astropy.table.Table`
        OBS_ID and BKG_HDU (key in ``models``) for every run of the obs index; other columns are added to it.
    output_dir : str or `~pathlib.Path`
        Folder of the new store; must not be, be inside, or contain the input folder.
    overwrite : bool, optional
        Replace a non-empty ``output_dir`` holding only a store written here (CREATOR). Default is False.
    """
    if data_store.obs_table is None:
        raise ValueError("The data store has no obs index: cannot assign models to runs")
    input_dir = Path(data_store.hdu_table.base_dir).resolve()
    output_dir = make_path(output_dir).resolve()
    _check_models(models)
    run_models, extra = _check_assignment(assignment, models, data_store.obs_table)
    _check_output_dir(output_dir, input_dir, overwrite)
    models, run_models = _as_gammapy_reads(data_store, dict(models), run_models)
    model_hdus = {name: model.to_table_hdu(format="gadf-dl3") for name, model in models.items()}
    for name, hdu in model_hdus.items():
        hdu.name = name
    hdu_table = _make_hdu_index(data_store.hdu_table, run_models, models, model_hdus, input_dir, output_dir)
    obs_table = Table(data_store.obs_table, copy=True)
    rows = {obs_id: i for i, obs_id in enumerate(run_models)}
    for name in extra:
        obs_table[name] = assignment[name][[rows[int(obs_id)] for obs_id in obs_table["OBS_ID"]]]
    # built in memory first: what FITS cannot hold fails before anything is written
    index_hdus = {HDU_INDEX_FILE: _index_hdu(hdu_table, "HDU"), OBS_INDEX_FILE: _index_hdu(obs_table, "OBS")}

    with staged_write(output_dir, overwrite=overwrite) as stage:
        (stage / BKG_DIR).mkdir(parents=True)
        fits.HDUList([fits.PrimaryHDU(), *model_hdus.values()]).writeto(stage / BKG_DIR / BKG_FILE)
        for filename, hdu in index_hdus.items():
            fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(stage / filename)
    n_3d = sum(model.tag == "bkg_3d" for model in models.values())
    n_old = len(data_store.hdu_table) - len(hdu_table) + len(run_models)
    log.info(f"Wrote background store {output_dir}: {len(models)} models ({len(models) - n_3d} 2D, {n_3d} 3D) for "
             f"{len(run_models)} runs, {n_old} old bkg rows replaced, events and IRFs read from {input_dir}; "
             f"models assigned to no run: {sorted(set(models) - set(run_models.values()))}")
    return output_dir


def gammapy_fov_alignment(data_store, obs_id):
    """The FoV alignment that gammapy's ``Observation.bkg`` gives an ALTAZ `~gammapy.irf.Background3D` of a run: its own
    rule, asked with a probe model ("REVERSE_LON_RADEC" for legacy H.E.S.S. headers, "ALTAZ" if it cannot open it)."""
    axes = [MapAxis.from_edges([1, 10], unit="TeV", name="energy")]
    axes += [MapAxis.from_edges([-1, 1], unit="deg", name=name) for name in ("fov_lon", "fov_lat")]
    try:
        observation = data_store.obs(obs_id, required_irf="all-optional")
        observation.bkg = Background3D(axes=axes, data=np.ones((1, 1, 1)), unit=RATE_UNIT, fov_alignment="ALTAZ")
        return observation.bkg.fov_alignment.value
    except (MissingRequiredHDU, OSError, KeyError) as error:
        log.debug(f"Run {obs_id}: gammapy cannot open it ({error}); its model is written as given")
        return "ALTAZ"


def sky_aligned(bkg, run, rotation_step=np.deg2rad(1.0)):
    """An ALTAZ `~gammapy.irf.Background3D` averaged over the field rotation of `RunInfo` ``run``, as REVERSE_LON_RADEC
    (bin centres followed in steps in which the field turns by less than ``rotation_step``, rad)."""
    lon, lat = np.meshgrid(*(bkg.axes[name].center.to_value("rad") for name in ("fov_lon", "fov_lat")), indexing="ij")
    energy = bkg.axes["energy"].center[:, None, None]
    rates = []
    for angle in rotation_steps(run, rotation_step):
        # REVERSE_LON_RADEC is gammapy's RADEC frame (FoVICRSFrame) with the longitude not reversed
        lon_altaz, lat_altaz = fov_radec_to_altaz(-lon, lat, angle)
        rate = bkg.evaluate(energy=energy, fov_lon=lon_altaz * u.rad, fov_lat=lat_altaz * u.rad)
        rates.append(rate.to_value(RATE_UNIT))
    meta = {**bkg.meta, "FOVROT": f"ALTAZ model averaged over the field rotation of run {run.obs_id}"}
    return Background3D(axes=bkg.axes, data=np.mean(rates, axis=0), unit=RATE_UNIT, meta=meta,
                        fov_alignment="REVERSE_LON_RADEC")


def _as_gammapy_reads(data_store, models, run_models):
    """Models and assignment in which every ALTAZ 3D model of a run under gammapy's DR1 rule is sky-aligned."""
    altaz = {name for name, model in models.items() if model.tag == "bkg_3d" and model.fov_alignment.value == "ALTAZ"}
    flipped = [obs_id for obs_id, name in run_models.items()
               if name in altaz and gammapy_fov_alignment(data_store, obs_id) != "ALTAZ"]
    if not flipped:
        return models, run_models
    log.info(f"{len(flipped)} runs have gammapy's REVERSE_LON_RADEC rule: their ALTAZ models are written sky-aligned")
    users = {name: list(run_models.values()).count(name) for name in altaz}
    run_models, new = dict(run_models), {}
    for run in collect_runs(data_store, flipped, safe_threshold=False):
        name = run_models[run.obs_id]
        new_name = name if users[name] == 1 else f"{name}_{run.obs_id}"
        new[new_name], run_models[run.obs_id] = sky_aligned(models[name], run), new_name
    used = set(run_models.values())
    models = {**{name: model for name, model in models.items() if name not in altaz or name in used}, **new}
    _check_models(models)
    return models, run_models


def _check_models(models):
    if not models:
        raise ValueError("No background models given")
    upper = {"PRIMARY": "PRIMARY"}
    for name, model in models.items():
        if not (isinstance(name, str) and name.isascii() and 0 < len(name) <= 68 and name == name.strip()):
            raise ValueError(f"Invalid HDU name {name!r}: need 1-68 ASCII characters without surrounding spaces")
        if name.upper() in upper:
            raise ValueError(f"HDU name {name!r} clashes with {upper[name.upper()]!r}: FITS ignores case")
        upper[name.upper()] = name
        if not isinstance(model, (Background2D, Background3D)):
            raise TypeError(f"Model {name!r} is a {type(model).__name__}, need Background2D or Background3D")
        if not u.Unit(model.unit).is_equivalent(RATE_UNIT):
            raise u.UnitsError(f"Model {name!r} has unit '{u.Unit(model.unit).to_string('fits')}', not a rate "
                               f"convertible to {RATE_UNIT.to_string('fits')}")
        data = np.asarray(model.data, dtype=float)
        n_nan, n_inf, n_neg = np.isnan(data).sum(), np.isinf(data).sum(), (data < 0).sum()
        if n_nan or n_inf or n_neg:
            raise ValueError(f"Model {name!r} has {n_nan} NaN, {n_inf} infinite and {n_neg} negative rates in "
                             f"{data.size} bins: a background rate must be finite and >= 0")


def _list_runs(obs_ids, limit=20):
    obs_ids = sorted(int(obs_id) for obs_id in obs_ids)
    return ", ".join(map(str, obs_ids[:limit])) + (f", ... ({len(obs_ids)} runs)" if len(obs_ids) > limit else "")


def _as_str(values):
    values = np.asarray(values)
    return np.char.strip((np.char.decode(values, "ascii") if values.dtype.kind == "S" else values).astype(str))


def _check_assignment(assignment, models, obs_table):
    """Check the assignment and return ({obs_id: hdu_name}, extra column names)."""
    if missing := [name for name in ("OBS_ID", "BKG_HDU") if name not in assignment.colnames]:
        raise ValueError(f"Assignment lacks columns {missing}; it has {assignment.colnames}")
    if assignment["OBS_ID"].dtype.kind not in "iu":
        raise TypeError(f"Assignment column OBS_ID has dtype {assignment['OBS_ID'].dtype}: need integers")
    obs_ids, hdu_names = np.asarray(assignment["OBS_ID"], dtype=np.int64), _as_str(assignment["BKG_HDU"])
    unique, counts = np.unique(obs_ids, return_counts=True)
    input_ids = np.asarray(obs_table["OBS_ID"], dtype=np.int64)
    for runs, text in [
        (unique[counts > 1], "Runs assigned more than once"),
        (np.setdiff1d(input_ids, obs_ids), "Runs of the obs index without a model"),
        (np.setdiff1d(obs_ids, input_ids), "Runs assigned but not in the obs index"),
    ]:
        if len(runs):
            raise ValueError(f"{text}: {_list_runs(runs)}")
    if np.any(unknown := ~np.isin(hdu_names, list(models))):
        raise ValueError(f"Unknown BKG_HDU {sorted(set(hdu_names[unknown]))} for runs {_list_runs(obs_ids[unknown])}; "
                         f"models are {sorted(models)}")
    extra = [name for name in assignment.colnames if name not in ("OBS_ID", "BKG_HDU")]
    if clash := [name for name in extra if name in obs_table.colnames]:
        raise ValueError(f"Assignment columns {clash} already exist in the obs index; rename them")
    return dict(zip(obs_ids.tolist(), hdu_names.tolist())), extra


def _check_output_dir(output_dir, input_dir, overwrite):
    if output_dir.is_relative_to(input_dir):
        raise ValueError(f"Output folder {output_dir} is inside the input store {input_dir}: never write there")
    if input_dir.is_relative_to(output_dir):
        raise ValueError(f"Output folder {output_dir} contains the input store {input_dir}")
    if _exists(output_dir) and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder: not replaced")
    if overwrite:  # without overwrite, staged_write refuses a non-empty folder
        what = f"Output folder {output_dir} is not a store written by bkgtemplate"
        check_replaceable(output_dir, CREATOR, STORE_FILES, what)


def check_replaceable(folder, creator, patterns, what):
    """Raise `FileExistsError` (starting with ``what``) unless ``folder`` is empty or holds only files matching the
    glob ``patterns`` and an obs index with ``CREATOR = creator``."""
    if not (folder.is_dir() and any(folder.iterdir())):
        return
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    foreign = [name for name in files if not any(fnmatch(name, pattern) for pattern in patterns)]
    try:
        marked = fits.getheader(folder / OBS_INDEX_FILE, "OBS_INDEX").get("CREATOR") == creator
    except (OSError, KeyError):
        marked = False
    if foreign or not marked:
        why = f"it holds {foreign[:5]}" if foreign else f"its obs index lacks CREATOR = '{creator}'"
        raise FileExistsError(f"{what} ({why}): not replaced; choose another folder or empty it yourself")


def _make_hdu_index(hdu_table, run_models, models, model_hdus, input_dir, output_dir):
    """HDU index: input rows without the bkg ones, FILE_DIRs relative, one bkg row per run after its other rows."""
    table = Table(hdu_table, copy=True)
    for name in [name for name in table.colnames if table[name].dtype.kind in "SU"]:
        table[name] = _as_str(table[name])
    table = table[table["HDU_TYPE"] != "bkg"]
    relative = {d: Path(os.path.relpath((input_dir / d).resolve(), output_dir)).as_posix()
                for d in set(table["FILE_DIR"])}
    table["FILE_DIR"] = np.array([d if os.path.isabs(d) else relative[d] for d in table["FILE_DIR"]], dtype=str)
    paths = {os.path.normpath(output_dir / d / f) for d, f in zip(table["FILE_DIR"], table["FILE_NAME"])}
    if any(Path(path).is_relative_to(output_dir) for path in paths):
        raise ValueError(f"The input HDU index points at files inside the output folder {output_dir}")
    if missing := sorted(path for path in paths if not os.path.exists(path)):
        log.warning(f"{len(missing)} of {len(paths)} files in the HDU index do not exist (e.g. {missing[0]})")
    names, n = list(run_models.values()), len(run_models)
    new = Table([list(run_models), ["bkg"] * n, [models[name].tag for name in names], [BKG_DIR] * n, [BKG_FILE] * n,
                 names, [model_hdus[name].filebytes() for name in names]], dtype=[np.int64] + [str] * 5 + [np.int64],
                names=["OBS_ID", "HDU_TYPE", "HDU_CLASS", "FILE_DIR", "FILE_NAME", "HDU_NAME", "SIZE"])
    for name in set(table.colnames) - set(new.colnames):
        new[name] = np.zeros((len(new),) + table[name].shape[1:], dtype=table[name].dtype)
    combined = vstack([table, new[table.colnames]], join_type="exact", metadata_conflicts="silent")
    combined.meta = table.meta
    rank = {obs_id: i for i, obs_id in enumerate(dict.fromkeys([*map(int, table["OBS_ID"]), *run_models]))}
    return combined[np.argsort([rank[int(obs_id)] for obs_id in combined["OBS_ID"]], kind="stable")]


def _index_hdu(table, hduclas2):
    bad = [(k, v) for k in table.colnames if table[k].dtype.kind == "U" for v in np.ravel(table[k]) if not v.isascii()]
    if bad:
        raise ValueError(f"{hduclas2} index column {bad[0][0]} holds non-ASCII {str(bad[0][1])!r}, which FITS "
                         "cannot hold: use ASCII names (FILE_DIR comes from the input and output folder paths)")
    table = Table(table, copy=False)
    table.meta = {k: v for k, v in table.meta.items() if k.upper() not in ("BASE_DIR", "EXTNAME")}
    table.meta.update(COMMON_HEADERS, HDUCLAS1="INDEX", HDUCLAS2=hduclas2, CREATOR=CREATOR)
    hdu = fits.table_to_hdu(table)
    hdu.name = f"{hduclas2}_INDEX"
    return hdu
