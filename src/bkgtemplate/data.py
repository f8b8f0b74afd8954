"""Data: find a DL3 data store, open it, and read each run's obs-index row and EVENTS columns (no IRFs),
checked against each other: a bad run raises `RunError` naming the run and the file."""

import gzip
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.coordinates import EarthLocation, HADec, SkyCoord, angular_separation
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from gammapy.data import DataStore, Observations
from gammapy.utils.scripts import make_path

__all__ = ["DATASET_NAME", "DataNotFoundError", "RunError", "RunInfo", "check_obs_ids", "collect_runs",
           "find_data_dir", "obs_table_rows", "open_data_store", "read_events"]

log = logging.getLogger(__name__)

DATASET_NAME = "hess-dl3-dr1"  # folder of the H.E.S.S. DL3 DR1 release inside $GAMMAPY_DATA

INDEX_STEMS = ("hdu-index", "obs-index")
INDEX_SUFFIXES = (".fits.gz", ".fits")
GADF_UNITS = {"ONTIME": "s", "TSTART": "s", "TSTOP": "s", "RA_PNT": "deg", "DEC_PNT": "deg", "SAFE_ENERGY_LO": "TeV"}
# Used only when neither the obs index nor the EVENTS headers say, with a warning.
HESS_DEFAULTS = dict(GEOLON=16.5002222222222, GEOLAT=-23.2717777777778, ALTITUDE=1835.0, MJDREFI=51910, MJDREFF=0.0)
MAX_POINTING_MISMATCH_DEG = 0.1
TIME_SLACK = 1.0  # s: event times may sit on the run's edges to rounding


class DataNotFoundError(FileNotFoundError):
    """The dataset folder, or its index files, could not be found."""


class RunError(Exception):
    """A run that cannot be used; the message names the run and the file."""


def _how_to_get():
    # `gammapy download datasets --out DIR` extracts into DIR/<release>/, not DIR itself.
    from gammapy.scripts.download import RELEASE

    return f"get it with `gammapy download datasets --out <dir>` then `export GAMMAPY_DATA=<dir>/{RELEASE}`"


def _index_files(folder):
    """{stem: path} of the index files of a folder; a stem without a file is left out."""
    found = {stem: [folder / f"{stem}{suffix}" for suffix in INDEX_SUFFIXES] for stem in INDEX_STEMS}
    return {stem: files[0] for stem, paths in found.items() if (files := [path for path in paths if path.is_file()])}


def find_data_dir(path=None):
    """Find the folder of a DL3 data store (``obs-index.fits(.gz)`` and ``hdu-index.fits(.gz)``), absolute.

    Parameters
    ----------
    path : str or `~pathlib.Path`, optional
        The folder; variables and ``~`` are expanded. Default is None, ``$GAMMAPY_DATA/hess-dl3-dr1``.
    """
    if path is None:
        if not os.environ.get("GAMMAPY_DATA"):
            raise DataNotFoundError(f"H.E.S.S. DL3 DR1 data not found: GAMMAPY_DATA is not set (looked for "
                                    f"$GAMMAPY_DATA/{DATASET_NAME}); {_how_to_get()}")
        path = Path(os.environ["GAMMAPY_DATA"]) / DATASET_NAME
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if unset := re.findall(r"\$\{?(\w+)", expanded):
        raise DataNotFoundError(f"Data not found: {', '.join(unset)} is not set (path tried: {path}); {_how_to_get()}")
    folder = Path(expanded).absolute()
    if folder.is_file() and folder.name.startswith(INDEX_STEMS):
        raise DataNotFoundError(f"Data not found: {folder} is an index file; give its folder {folder.parent}.")
    if not folder.is_dir():
        raise DataNotFoundError(f"Data not found: folder {folder} does not exist; {_how_to_get()}")
    if missing := [f"{stem}.fits(.gz)" for stem in INDEX_STEMS if stem not in _index_files(folder)]:
        raise DataNotFoundError(f"Data not found: folder {folder} exists but has no {' and '.join(missing)}; "
                                f"{_how_to_get()}")
    log.debug(f"Data store found in {folder}")
    return folder


def open_data_store(path=None):
    """Open the `~gammapy.data.DataStore` in the folder `find_data_dir` finds for ``path``."""
    folder = find_data_dir(path)
    index = _index_files(folder)
    try:
        return DataStore.from_dir(folder, hdu_table_filename=index["hdu-index"], obs_table_filename=index["obs-index"])
    except OSError as error:
        raise DataNotFoundError(f"Cannot read the index files of {folder} ({error}); check or rewrite them.") from None


@dataclass(frozen=True)
class RunInfo:
    """What the estimator needs from one run, small enough to send to a worker (rad, s MET, TeV)."""

    obs_id: int
    path: str
    hdu: str
    ontime: float
    safe_energy_lo: float
    ra_pnt: float
    dec_pnt: float
    tstart: float
    tstop: float
    hour_angle: float
    dec_apparent: float
    latitude: float


def check_obs_ids(obs_ids, data_store=None):
    """Run numbers (a list, `~gammapy.data.Observations` or None: all of ``data_store``) as distinct ints."""
    if obs_ids is None and data_store is not None:
        obs_ids = data_store.obs_table["OBS_ID"]
    elif isinstance(obs_ids, Observations):
        obs_ids = obs_ids.ids
    if obs_ids is None or isinstance(obs_ids, (str, bytes, int, np.integer)):
        raise TypeError(f"obs_ids must be a list of run numbers, got {obs_ids!r}; e.g. give [{obs_ids}].")
    try:
        ids = [int(obs_id) for obs_id in obs_ids]
    except (TypeError, ValueError):
        raise TypeError(f"obs_ids must be a list of run numbers, got {list(obs_ids)[:5]!r}.") from None
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        repeated = sorted({obs_id for obs_id in ids if ids.count(obs_id) > 1})
        log.warning(f"Runs {repeated} appear more than once in obs_ids: each is used once.")
    if not unique:
        raise ValueError("The run selection is empty: check the selection cuts (no run passed).")
    return unique


def _column(table, name, unit, obs_ids=None, what=None):
    """A column in ``unit`` (GADF's, with a warning, if it has none), NaN where masked or absent (error if ``what``)."""
    if name not in table.colnames:
        if what:
            raise KeyError(f"The obs index has no {name} column; add {what} for every run.")
        return np.full(len(table), np.nan)
    column = table[name]
    if column.unit is None:
        source = table.meta.get("BASE_DIR", "the obs index")
        log.warning(f"Column {name} of {source} has no unit: assuming {GADF_UNITS[name]} (GADF).")
    values = u.Quantity(np.asarray(column, float), column.unit or GADF_UNITS[name]).to_value(unit)
    values = np.where(np.ma.getmaskarray(column), np.nan, values)
    if what and not np.isfinite(values).all():
        bad = np.array(obs_ids)[~np.isfinite(values)].tolist()
        raise ValueError(f"Runs {bad} have no valid {name} in the obs index; fix or drop them.")
    return values


def _site_and_reference(meta, headers):
    """Observatory location and time reference: obs-index header, else each run's EVENTS header."""
    values = {}
    for key, default in HESS_DEFAULTS.items():
        found = [meta.get(key, header.get(key)) for header in headers]
        if any(value is None for value in found):
            log.warning(f"Neither the obs index nor the EVENTS headers give {key}: assuming {default} (H.E.S.S.).")
            found = [default] * len(headers)
        values[key] = np.array(found, dtype=float)
    location = EarthLocation.from_geodetic(values["GEOLON"], values["GEOLAT"], values["ALTITUDE"])
    scale = str(meta.get("TIMESYS", "TT")).lower()
    return location, Time(values["MJDREFI"] + values["MJDREFF"], format="mjd", scale=scale)


def obs_table_rows(data_store, obs_ids):
    """Obs-index rows of ``obs_ids`` in that order, as a `~astropy.table.Table`."""
    # one pass over the index: ObservationTable.select_obs_id searches it once per run
    position = {obs_id: idx for idx, obs_id in reversed(list(enumerate(data_store.obs_table["OBS_ID"].tolist())))}
    if missing := [obs_id for obs_id in obs_ids if obs_id not in position]:
        raise ValueError(f"Runs {missing} are not in the obs index; drop them from the selection.")
    return Table(data_store.obs_table[[position[obs_id] for obs_id in obs_ids]])


def collect_runs(data_store, obs_ids=None, safe_threshold=True):
    """The `RunInfo` of the runs ``obs_ids`` (default all), their hour angles from one vectorised astropy call."""
    if not isinstance(data_store, DataStore):
        raise TypeError(f"Expected a gammapy DataStore, got {type(data_store).__name__}.")
    obs_ids = check_obs_ids(obs_ids, data_store)
    rows = obs_table_rows(data_store, obs_ids)
    ontime = _column(rows, "ONTIME", "s", obs_ids, "the on time in s (not dead-time corrected)")
    ra = _column(rows, "RA_PNT", "rad", obs_ids, "the pointing RA")
    dec = _column(rows, "DEC_PNT", "rad", obs_ids, "the pointing Dec")
    tstart = _column(rows, "TSTART", "s", obs_ids, "the run start time (MET, s)")
    tstop = np.where(np.isfinite(tstop := _column(rows, "TSTOP", "s")), tstop, tstart + ontime)
    for name, bad in [("ONTIME <= 0", ontime <= 0), ("ONTIME > TSTOP - TSTART", ontime > tstop - tstart + 1)]:
        if bad.any():
            raise ValueError(f"Runs {np.array(obs_ids)[bad].tolist()} have {name} in the obs index; "
                             "fix the units or drop them.")
    threshold = _column(rows, "SAFE_ENERGY_LO", "TeV") if safe_threshold else np.zeros(len(rows))
    if "SAFE_ENERGY_LO" not in rows.colnames and safe_threshold:
        log.warning("The obs index has no SAFE_ENERGY_LO column: all energy bins are used for every run.")
    else:
        for obs_id in np.array(obs_ids)[~np.isfinite(threshold)]:
            log.warning(f"Run {obs_id} has no SAFE_ENERGY_LO: all its energy bins are used.")
    threshold = np.where(np.isfinite(threshold), threshold, 0.0)

    # one pass over the HDU index: its own lookup searches the whole table once per run
    hdu_table = data_store.hdu_table
    is_events = np.char.strip(np.asarray(hdu_table["HDU_TYPE"]).astype(str)) == "events"
    rows_of = {}
    for row, obs_id in zip(np.flatnonzero(is_events), np.asarray(hdu_table["OBS_ID"])[is_events].tolist()):
        rows_of.setdefault(obs_id, []).append(int(row))
    if missing := [obs_id for obs_id in obs_ids if len(rows_of.get(obs_id, [])) != 1]:
        raise RunError(f"Runs {missing} have no or several events rows in the HDU index; fix the index or drop them.")
    locations = [hdu_table.location_info(int(rows_of[obs_id][0])) for obs_id in obs_ids]
    meta = data_store.obs_table.meta
    headers = [_events_header(hdu) if not all(key in meta for key in HESS_DEFAULTS) else {} for hdu in locations]
    location, reference = _site_and_reference(meta, headers)
    times = reference + tstart * u.s
    hadec = SkyCoord(ra * u.rad, dec * u.rad).transform_to(HADec(location=location, obstime=times))
    # converted once: indexing a SkyCoord or an EarthLocation per run costs more than reading a run
    latitude = np.broadcast_to(location.lat.rad, len(obs_ids))
    # in the order of RunInfo's fields from ontime on
    values = np.c_[ontime, threshold, ra, dec, tstart, tstop, hadec.ha.rad, hadec.dec.rad, latitude].tolist()
    return [RunInfo(obs_id, str(_full_path(hdu)), hdu.hdu_name, *row)
            for obs_id, hdu, row in zip(obs_ids, locations, values)]


def _full_path(location):
    # HDULocation.path() falls back to a path relative to nothing when the file is missing
    return make_path(location.base_dir) / location.file_dir / location.file_name


def _events_header(location):
    try:
        return fits.getheader(_full_path(location), location.hdu_name)
    except (OSError, KeyError, EOFError, zlib.error):
        return {}


def _scale(columns, name, path, default, to, obs_id):
    """Factor from the unit of an events column to ``to``; a column without a unit is in the GADF ``default``."""
    if not (text := columns[name].unit):
        log.warning(f"Column {name} of {path} has no unit: assuming {default} (GADF).")
        text = default
    try:
        return u.Unit(text).to(to)
    except ValueError:
        raise RunError(f"Run {obs_id}: unit {text!r} of column {name} in {path} is not a valid unit; "
                       f"fix the file (e.g. '{default}').") from None


def read_events(run):
    """Events ``energy`` (TeV), ``ra``, ``dec`` (rad), ``time`` (s) without NaNs, and the header's pointing (rad), of a
    file that must match the run's index rows (OBS_ID, pointing within 0.1 deg, times within TSTART-TSTOP)."""
    path = Path(run.path)
    if not path.is_file():
        raise RunError(f"Run {run.obs_id}: events file {path} does not exist.")
    try:
        with fits.open(path, memmap=False) as hdulist:
            try:  # not `in hdulist`, which reads (and decompresses) every HDU of the file
                hdu = hdulist[run.hdu]
            except KeyError:
                _check_complete(path, run)
                raise RunError(f"Run {run.obs_id}: {path} has no {run.hdu} HDU.") from None
            header, data = hdu.header, hdu.data
            energy_scale = _scale(data.columns, "ENERGY", path, "TeV", "TeV", run.obs_id)
            angle_scale = _scale(data.columns, "RA", path, "deg", "rad", run.obs_id)
            # each column converted in one pass, and not at all when it is already in TeV
            energy = data["ENERGY"] if energy_scale == 1 else np.multiply(data["ENERGY"], energy_scale, dtype=float)
            events = {"energy": energy, "ra": np.multiply(data["RA"], angle_scale, dtype=float),
                      "dec": np.multiply(data["DEC"], angle_scale, dtype=float), "time": data["TIME"].astype(float)}
            # the header keeps the pointing in double precision, the obs index often in float32
            pointing = tuple(np.deg2rad(header.get(key, np.rad2deg(value)))
                             for key, value in [("RA_PNT", run.ra_pnt), ("DEC_PNT", run.dec_pnt)])
            file_obs_id = header.get("OBS_ID", run.obs_id)
    except RunError:
        raise
    except Exception as error:  # any failure to read a run is that run's error
        raise RunError(f"Run {run.obs_id}: cannot read events from {path} ({type(error).__name__}: {error}).") from None
    if int(file_obs_id) != run.obs_id:
        raise RunError(f"Run {run.obs_id}: {path} holds run {file_obs_id}; fix the HDU index row of run {run.obs_id}.")
    separation = np.rad2deg(angular_separation(*pointing, run.ra_pnt, run.dec_pnt))
    if separation > MAX_POINTING_MISMATCH_DEG:
        raise RunError(f"Run {run.obs_id}: the pointing of {path} is {separation:.2f} deg from the obs index's; "
                       "fix RA_PNT/DEC_PNT (units?) in one of them.")
    time = events["time"]
    if len(time) and (time.min() < run.tstart - TIME_SLACK or time.max() > run.tstop + TIME_SLACK):
        raise RunError(f"Run {run.obs_id}: event times in {path} ({time.min():.0f}-{time.max():.0f} s) lie "
                       f"outside TSTART-TSTOP ({run.tstart:.0f}-{run.tstop:.0f} s); "
                       "TIME must count from the mission reference.")
    finite = np.isfinite(events["energy"]) & np.isfinite(events["ra"]) & np.isfinite(events["dec"])
    if not finite.all():
        log.warning(f"Run {run.obs_id}: {np.sum(~finite)} events with NaN energy or direction dropped.")
        events = {name: values[finite] for name, values in events.items()}
    return events, pointing


def _check_complete(path, run):
    """Raise a `RunError` if a gzipped file ends early (astropy then just lists fewer HDUs)."""
    if path.suffix != ".gz":
        return
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise RunError(f"Run {run.obs_id}: cannot read events from {path} (truncated: {error}).") from None
