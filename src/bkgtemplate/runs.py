"""Runs: what the estimator needs to know about each run, and reading its events.

Only the obs-index row and the EVENTS columns are read: a whole gammapy
`~gammapy.data.Observation` would also load IRFs the background estimate does not use.
"""

import logging
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.coordinates import EarthLocation, HADec, SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from gammapy.data import DataStore, Observations

__all__ = ["RunError", "RunInfo", "collect_runs", "obs_ids_of", "obs_table_rows", "read_events"]

log = logging.getLogger(__name__)

HESS_LOCATION = dict(GEOLON=16.5002222222222, GEOLAT=-23.2717777777778, ALTITUDE=1835.0)


class RunError(Exception):
    """A run that cannot be used; the message names the run and the file."""


@dataclass(frozen=True)
class RunInfo:
    """Everything the estimator needs from one run, small enough to send to a worker.

    Angles are in rad, times in s, energies in TeV.
    """

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


def obs_ids_of(data_store, obs_ids=None):
    """Run numbers to use: ``obs_ids``, the ids of `~gammapy.data.Observations`, or all runs.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Data store.
    obs_ids : list of int or `~gammapy.data.Observations`, optional
        Selection. Default is None, all runs of the store.

    Returns
    -------
    obs_ids : list of int
        Run numbers.
    """
    if obs_ids is None:
        obs_ids = data_store.obs_table["OBS_ID"]
    elif isinstance(obs_ids, Observations):
        obs_ids = obs_ids.ids
    obs_ids = [int(obs_id) for obs_id in obs_ids]
    if not obs_ids:
        raise ValueError("The run selection is empty: check the selection cuts (no run passed).")
    return obs_ids


def _column(table, name, unit, obs_ids):
    if name not in table.colnames:
        return None
    column = table[name]
    values = column.quantity.to_value(unit) if column.unit else np.asarray(column, float)
    if np.ma.is_masked(column):
        values = np.where(column.mask, np.nan, values)
    return np.asarray(values, dtype=float)


def _require(table, name, unit, obs_ids, what):
    values = _column(table, name, unit, obs_ids)
    if values is None:
        raise KeyError(f"The obs index has no {name} column; add {what} for every run.")
    bad = [obs_id for obs_id, value in zip(obs_ids, values) if not np.isfinite(value)]
    if bad:
        raise ValueError(f"Runs {bad} have no valid {name} in the obs index; fix or drop them.")
    return values


def _location(table):
    meta = {**HESS_LOCATION, **{k: table.meta[k] for k in HESS_LOCATION if k in table.meta}}
    if not all(k in table.meta for k in HESS_LOCATION):
        log.warning("The obs index has no GEOLON/GEOLAT/ALTITUDE: assuming the H.E.S.S. site for the field rotation.")
    return EarthLocation(
        lon=float(meta["GEOLON"]) * u.deg,
        lat=float(meta["GEOLAT"]) * u.deg,
        height=float(meta["ALTITUDE"]) * u.m,
    )


def _reference_time(table):
    mjdref = float(table.meta.get("MJDREFI", 51910)) + float(table.meta.get("MJDREFF", 0.0))
    scale = str(table.meta.get("TIMESYS", "TT")).lower()
    return Time(mjdref, format="mjd", scale=scale)


def _events_rows(hdu_table):
    """HDU-index rows of type "events", per OBS_ID, found in one pass over the table."""
    rows = {}
    hdu_types = np.char.strip(np.asarray(hdu_table["HDU_TYPE"]).astype(str))
    obs_id_column = np.asarray(hdu_table["OBS_ID"])
    for row in np.flatnonzero(hdu_types == "events"):
        rows.setdefault(int(obs_id_column[row]), []).append(int(row))
    return rows


def collect_runs(data_store, obs_ids=None, safe_threshold=True):
    """Collect the `RunInfo` of the selected runs from the obs and HDU index tables.

    The hour angle at the run start is computed for all runs in one vectorised astropy
    call; the estimator follows the field rotation from there.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Data store.
    obs_ids : list of int or `~gammapy.data.Observations`, optional
        Selection. Default is None, all runs.
    safe_threshold : bool, optional
        Read each run's ``SAFE_ENERGY_LO``. Default is True.

    Returns
    -------
    runs : list of `RunInfo`
        One entry per run, in the order of ``obs_ids``.
    """
    if not isinstance(data_store, DataStore):
        raise TypeError(f"Expected a gammapy DataStore, got {type(data_store).__name__}.")
    obs_ids = obs_ids_of(data_store, obs_ids)
    obs_table = data_store.obs_table
    missing = sorted(set(obs_ids) - set(int(i) for i in obs_table["OBS_ID"]))
    if missing:
        raise ValueError(f"Runs {missing} are not in the obs index of {data_store.obs_table.meta.get('BASE_DIR', 'the data store')}.")
    rows = obs_table_rows(data_store, obs_ids)

    ontime = _require(rows, "ONTIME", "s", obs_ids, "the on time in s (not dead-time corrected)")
    bad = [obs_id for obs_id, value in zip(obs_ids, ontime) if value <= 0]
    if bad:
        raise ValueError(f"Runs {bad} have ONTIME <= 0 in the obs index; drop them from the selection.")
    ra = _require(rows, "RA_PNT", "rad", obs_ids, "the pointing RA")
    dec = _require(rows, "DEC_PNT", "rad", obs_ids, "the pointing Dec")
    tstart = _require(rows, "TSTART", "s", obs_ids, "the run start time (MET, s)")
    tstop = _column(rows, "TSTOP", "s", obs_ids)
    tstop = tstart + ontime if tstop is None else np.where(np.isfinite(tstop), tstop, tstart + ontime)

    threshold = np.zeros(len(rows))
    if safe_threshold:
        values = _column(rows, "SAFE_ENERGY_LO", "TeV", obs_ids)
        if values is None:
            log.warning("The obs index has no SAFE_ENERGY_LO column: all energy bins are used for every run.")
        else:
            for obs_id in np.array(obs_ids)[~np.isfinite(values)]:
                log.warning(f"Run {obs_id} has no SAFE_ENERGY_LO: all its energy bins are used.")
            threshold = np.where(np.isfinite(values), values, 0.0)

    location = _location(obs_table)
    times = _reference_time(obs_table) + tstart * u.s
    hadec = SkyCoord(ra * u.rad, dec * u.rad).transform_to(HADec(location=location, obstime=times))
    # converted once: indexing a SkyCoord or an EarthLocation per run costs more than reading a run
    hour_angle, dec_apparent, latitude = hadec.ha.rad, hadec.dec.rad, float(location.lat.rad)
    events_rows = _events_rows(data_store.hdu_table)

    runs = []
    for idx, obs_id in enumerate(obs_ids):
        rows = events_rows.get(obs_id, [])
        if len(rows) == 1:
            hdu = data_store.hdu_table.location_info(rows[0])
        else:
            # none or several: gammapy's lookup, with its warning
            hdu = data_store.hdu_table.hdu_location(obs_id, hdu_type="events")
        if hdu is None:
            raise RunError(f"Run {obs_id} has no events row in the HDU index; drop it from the selection.")
        runs.append(
            RunInfo(
                obs_id=obs_id,
                path=str(hdu.path()),
                hdu=hdu.hdu_name,
                ontime=float(ontime[idx]),
                safe_energy_lo=float(threshold[idx]),
                ra_pnt=float(ra[idx]),
                dec_pnt=float(dec[idx]),
                tstart=float(tstart[idx]),
                tstop=float(tstop[idx]),
                hour_angle=float(hour_angle[idx]),
                dec_apparent=float(dec_apparent[idx]),
                latitude=latitude,
            )
        )
    return runs


def read_events(run):
    """Read the event columns the estimator needs, dropping events with NaN values.

    Parameters
    ----------
    run : `RunInfo`
        Run to read.

    Returns
    -------
    events : dict of `~numpy.ndarray`
        ``energy`` in TeV, ``ra`` and ``dec`` in rad, ``time`` in s.
    pointing : tuple of float
        RA_PNT and DEC_PNT of the EVENTS header (obs-index values if absent), in rad.
    """
    path = Path(run.path)
    if not path.is_file():
        raise RunError(f"Run {run.obs_id}: events file {path} does not exist.")
    try:
        with fits.open(path, memmap=False) as hdulist:
            try:
                hdu = hdulist[run.hdu]
            except KeyError:
                _check_complete(path, run)
                raise RunError(f"Run {run.obs_id}: {path} has no {run.hdu} HDU.") from None
            header, data = hdu.header, hdu.data
            energy, energy_unit = data["ENERGY"], u.Unit(data.columns["ENERGY"].unit or "TeV")
            # each column converted in one pass, and not at all when it is already in TeV
            events = {
                "energy": energy if energy_unit == u.TeV else u.Quantity(energy, energy_unit).to_value("TeV"),
                "ra": np.deg2rad(data["RA"], dtype=float),
                "dec": np.deg2rad(data["DEC"], dtype=float),
                "time": data["TIME"].astype(float),
            }
            # the header keeps the pointing in double precision, the obs index often in float32
            pointing = (
                np.deg2rad(header.get("RA_PNT", np.rad2deg(run.ra_pnt))),
                np.deg2rad(header.get("DEC_PNT", np.rad2deg(run.dec_pnt))),
            )
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, KeyError, TypeError) as error:
        raise RunError(f"Run {run.obs_id}: cannot read events from {path} ({error}).") from error

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


def obs_table_rows(data_store, obs_ids):
    """Obs-index rows of ``obs_ids`` in that order, as a `~astropy.table.Table`."""
    # one pass over the index: ObservationTable.select_obs_id searches it once per run
    table = data_store.obs_table
    position = {}
    for idx, obs_id in enumerate(np.asarray(table["OBS_ID"]).tolist()):
        position.setdefault(int(obs_id), idx)
    missing = [obs_id for obs_id in obs_ids if obs_id not in position]
    if missing:
        raise ValueError(f"Run {missing[0]} is not in the obs index.")
    return Table(table[[position[obs_id] for obs_id in obs_ids]])
