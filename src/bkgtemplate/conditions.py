"""Background models in bins of obs-index columns (or the derived NORTH_PNT), interpolated between bin centres (in
cos(zenith) for ZEN_PNT, never extrapolated) or looked up, times fitted corrections."""

import logging
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table
from gammapy.irf import Background2D, Background3D
from gammapy.makers import Maker
from gammapy.utils.scripts import make_path
from .corrections import CORRECTION_KINDS, ConditionCorrection, fit_corrections
from .estimator import BackgroundModelEstimator, default_fov_axes
from .histograms import RATE_UNIT
from .store import staged_write

__all__ = ["BackgroundModelCollection", "EmptyBinError", "ObservingConditionsEstimator", "assign_bins",
    "column_values", "equal_livetime_edges", "interpolation_weights", "north_component", "with_fov_lat_slope"]

log = logging.getLogger(__name__)

ZENITH, MUONEFF, AZIMUTH, NORTH = "ZEN_PNT", "MUONEFF", "AZ_PNT", "NORTH_PNT"
UNITS = {ZENITH: "deg", AZIMUTH: "deg"}  # of the binned columns in labels; the others have none
TUTORIAL_ZENITH_EDGES = (0.0, 20.0, 40.0, 90.0)  # deg, as the original gammapy tutorial
DEFAULT_INTERPOLATE = (ZENITH, MUONEFF)
DEFAULT_CORRECTIONS = {ZENITH: "cos", MUONEFF: "power-law"}  # best held out on DR1 off runs and fields (notebook 3)
ENERGY_DEPENDENT = (ZENITH,)  # corrected columns with one coefficient per energy bin
COLLECTION_KEY = "BKGCOLL"  # FITS keywords have at most 8 characters
NORM_ENERGY = 1 * u.TeV  # energy at which CORRFAC and BKG_NORM report a correction


class EmptyBinError(ValueError):
    """A bin of observing conditions holds no run."""


def north_component(zenith, azimuth):
    """North component ``sin(zenith) cos(azimuth)`` of the pointing (deg), 0 at the zenith.

    With cos(zenith), it gives the angle between the shower axis and the geomagnetic field."""
    return np.sin(np.deg2rad(zenith)) * np.cos(np.deg2rad(azimuth))


SOURCES = {NORTH: (ZENITH, AZIMUTH)}  # the obs-index columns of each derived column


def column_values(table, column):
    """Values of an obs-index column (or NORTH_PNT) as floats, in its own unit, NaN where masked."""
    if column == NORTH and column not in table.colnames:
        return north_component(*(column_values(table, source) for source in SOURCES[column]))
    if column not in table.colnames:
        raise KeyError(f"The obs table has no column {column!r}; it has {table.colnames}.")
    col = table[column]
    if np.asarray(col).dtype.kind not in "iufb":
        raise TypeError(f"Column {column} of the obs table holds {col.dtype} values; bin a numeric column.")
    return np.where(np.ma.getmaskarray(col), np.nan, np.asarray(col, dtype=float))


def _condition_values(table, columns):
    """Values of ``columns`` for the runs of ``table``; runs without a finite value are refused by OBS_ID."""
    values = {column: column_values(table, column) for column in columns}
    obs_ids = np.asarray(table["OBS_ID"] if "OBS_ID" in table.colnames else np.arange(len(table)))
    for column, array in values.items():
        bad = obs_ids[~np.isfinite(array)]
        if len(bad):
            raise ValueError(f"Runs {[int(i) for i in bad]} have no valid {column} in the obs table; fix or drop them.")
    return values


def _to_x(column, values):
    """The variable a column is interpolated in: cos(zenith) for ZEN_PNT (deg), else the value."""
    return ConditionCorrection.transform("cos" if column == ZENITH else "linear", values)


def _from_x(column, x):
    return np.rad2deg(np.arccos(np.clip(x, -1, 1))) if column == ZENITH else np.asarray(x, dtype=float)


def _check_edges(column, spec):
    try:
        edges = np.asarray(spec.to_value("deg") if isinstance(spec, u.Quantity) else spec, dtype=float)
    except (TypeError, ValueError):
        edges = np.array([])
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"Bin edges of {column} must increase, with at least two (or give a number of bins); "
                         f"got {spec!r}.")
    return edges


def assign_bins(values, edges):
    """Bin of each value (with its lower edge; the last with both) and whether it lies outside (then: the nearest)."""
    values, edges = np.atleast_1d(np.asarray(values, dtype=float)), np.asarray(edges, dtype=float)
    index = np.where(values == edges[-1], len(edges) - 2, np.searchsorted(edges, values, side="right") - 1)
    return np.clip(index, 0, len(edges) - 2), ~((values >= edges[0]) & (values <= edges[-1]))


def interpolation_weights(x, centres):
    """Linear interpolation partners ``lo <= hi`` and the weight of ``hi``, clipped at the end ``centres``."""
    x, centres = np.atleast_1d(np.asarray(x, dtype=float)), np.asarray(centres, dtype=float)
    sign = 1.0 if centres[-1] >= centres[0] else -1.0
    if np.any(np.diff(sign * centres) <= 0):
        raise ValueError(f"Bin centres {centres} are not strictly monotonic: cannot interpolate.")
    position = np.interp(sign * x, sign * centres, np.arange(len(centres)))  # fractional bin index
    lo = np.floor(position).astype(int)
    weight = position - lo
    return lo, np.where(weight > 0, lo + 1, lo), weight


def equal_livetime_edges(values, livetime, n_bins):
    """``n_bins + 1`` edges that split runs into bins of about equal livetime: the smallest and
    largest values, and halfway between the two distinct values either side of each quantile."""
    order = np.argsort(values)
    values, livetime = np.asarray(values, float)[order], np.asarray(livetime, float)[order]
    distinct = np.unique(values)
    if not 1 <= n_bins <= len(distinct):
        raise ValueError(f"{len(distinct)} distinct values cannot fill {n_bins} equal-livetime bins.")
    quantile = np.searchsorted(np.cumsum(livetime) / livetime.sum(), np.arange(1, n_bins) / n_bins)
    below = values[np.minimum(quantile, len(values) - 2)]
    above = distinct[np.minimum(np.searchsorted(distinct, below, side="right"), len(distinct) - 1)]
    edges = np.concatenate([values[:1], 0.5 * (below + above), values[-1:]])
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"Cannot split {len(values)} runs into {n_bins} equal-livetime bins.")
    return edges


def _bin_weights(edges, values, n, centres=None, interpolate=()):
    """Flat bins and weights (n, 2 ** n_interpolated; ``bins[:, 0]``: own bin if none interpolated), and outside."""
    bins, weights, outside = np.zeros((n, 1), dtype=int), np.ones((n, 1)), np.zeros(n, dtype=bool)
    for column, column_edges in edges.items():
        partners, out = assign_bins(values[column], column_edges)
        partners, shares, outside = partners[:, None], np.ones((n, 1)), outside | out
        if column in interpolate:
            lo, hi, w = interpolation_weights(_to_x(column, values[column]), _to_x(column, centres[column]))
            partners, shares = np.stack([lo, hi], axis=1), np.stack([1 - w, w], axis=1)
        # C order over the columns, as np.ravel_multi_index
        bins = (bins[:, :, None] * (len(column_edges) - 1) + partners[:, None, :]).reshape(n, -1)
        weights = (weights[:, :, None] * shares[:, None, :]).reshape(n, -1)
    return bins, weights, outside


def with_fov_lat_slope(model, slope, fov_axes):
    """ALTAZ `Background3D` on ``fov_axes``: the 2D ``model``'s rate x exp(slope x fov_lat), slope per energy, 1/deg."""
    slope, energy = np.asarray(slope, dtype=float), model.axes["energy"]
    if not isinstance(model, Background2D) or slope.shape != (energy.nbin,):
        raise ValueError(f"A fov_lat slope needs 2D models and one slope per energy bin ({energy.nbin}); got a "
                         f"{type(model).__name__} and slopes of shape {slope.shape}.")
    lon, lat = np.meshgrid(*(axis.center.to_value("deg") for axis in fov_axes), indexing="ij")
    rate = model.evaluate(energy=energy.center[:, None, None], offset=np.hypot(lon, lat) * u.deg).to_value(RATE_UNIT)
    data, meta = rate * np.exp(slope[:, None, None] * lat), {**model.meta, "FOVSHAPE": "2D x exp(slope x fov_lat)"}
    return Background3D([energy, *fov_axes], data=data, unit=RATE_UNIT, meta=meta, fov_alignment="ALTAZ")


def _correction_factors(corrections, values, n_runs, n_energy):
    """Product of the corrections for each run and energy bin."""
    factors = [c.factor(values[c.column]).reshape(n_runs, -1) for c in corrections]
    return np.prod(np.broadcast_arrays(np.ones((n_runs, n_energy)), *factors), axis=0)


class BackgroundModelCollection:
    """Background models in bins of observing conditions, and the model for any run.

    Parameters
    ----------
    models : list of `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        One per bin, in C order over the columns' bins; with corrections, the rate at their references.
    bin_edges : dict of {str: `~numpy.ndarray`}
        Bin edges of each column, in the column's unit (deg for ZEN_PNT). Empty for one model.
    centres : dict of {str: `~numpy.ndarray`}
        Centre of each bin of each column (empty for one model).
    interpolate : tuple of str, optional
        Columns interpolated between centres, the others looked up. Default is ("ZEN_PNT", "MUONEFF").
    corrections : list of `~bkgtemplate.corrections.ConditionCorrection`, optional
        Rate corrections. Default is None.
    runs : `~astropy.table.Table`, optional
        Runs that built it: OBS_ID, BKG_BIN, LIVETIME and their conditions. Default is None.
    """

    def __init__(self, models, bin_edges, centres, interpolate=None, corrections=None, runs=None):
        self.bin_edges = {column: _check_edges(column, edges) for column, edges in (bin_edges or {}).items()}
        self.models = list(models)
        if len(self.models) != int(np.prod(self.shape)):
            raise ValueError(f"{len(self.models)} models for {int(np.prod(self.shape))} bins of shape {self.shape}.")
        if not all(isinstance(model, (Background2D, Background3D)) for model in self.models):
            raise TypeError("Models must be gammapy Background2D or Background3D.")
        if any(model.axes != self.models[0].axes or type(model) is not type(self.models[0]) for model in self.models):
            raise ValueError("All models of a collection must have the same kind and axes.")
        self.centres = {column: np.asarray(centres[column], dtype=float) for column in self.columns}
        interpolate = DEFAULT_INTERPOLATE if interpolate is None else interpolate
        self.interpolate = tuple(c for c in self.columns if c in interpolate)
        self.corrections = list(corrections or [])
        self.runs = runs

    columns = property(lambda self: list(self.bin_edges), doc="Binned columns, in order.")
    shape = property(lambda self: tuple(len(e) - 1 for e in self.bin_edges.values()), doc="Bins per column.")
    n_bins = property(lambda self: len(self.models), doc="Number of bins (and models).")

    @property
    def condition_columns(self):
        """Columns whose values a run's model needs: the binned and the corrected ones."""
        return list(dict.fromkeys(self.columns + [correction.column for correction in self.corrections]))

    @property
    def bin_names(self):
        """HDU name of each bin, e.g. "BKG_ZEN_PNT0" ("BKG_ALL" for a single model)."""
        return ["BKG_" + ("_".join(f"{c}{i}" for c, i in zip(self.columns, idx)) or "ALL")
                for idx in np.ndindex(self.shape)]

    @property
    def bin_labels(self):
        """Readable label of each bin, e.g. "ZEN_PNT 0-20 deg" (for plot legends)."""
        return [", ".join(f"{c} {self.bin_edges[c][i]:g}-{self.bin_edges[c][i + 1]:g} {UNITS.get(c, '')}".strip()
                          for c, i in zip(self.columns, idx)) or "all runs" for idx in np.ndindex(self.shape)]

    def __str__(self):
        lines = [f"BackgroundModelCollection: {self.n_bins} {type(self.models[0]).__name__} models"]
        for c in self.columns:
            how, unit = "interpolated" if c in self.interpolate else "looked up", f" {UNITS.get(c, '')}".rstrip()
            edges, centres = np.round(self.bin_edges[c], 4).tolist(), np.round(self.centres[c], 4).tolist()
            lines.append(f"  {c}: edges {edges}{unit}, centres {centres}{unit} ({how})")
        return "\n".join(lines + [f"  correction: {correction}" for correction in self.corrections])

    __repr__ = __str__

    def _factors(self, values, n):
        """Corrections for ``n`` runs per energy bin (n, n_energy), and at 1 TeV (n,)."""
        energy = self.models[0].axes["energy"]
        factors = _correction_factors(self.corrections, values, n, energy.nbin)
        norm = np.clip(np.searchsorted(energy.edges, NORM_ENERGY, side="right") - 1, 0, energy.nbin - 1)
        return factors, factors[:, norm]

    def model_for(self, zenith=None, muoneff=None, **values):
        """The model (conditions and interpolation weights in its meta) of ``zenith`` (deg, float or Quantity),
        ``muoneff`` and other binned or corrected columns by name (e.g. ``AZ_PNT=180``, a source of NORTH_PNT)."""
        values.update({k: v for k, v in [(ZENITH, zenith), (MUONEFF, muoneff)] if v is not None})
        values = {k: u.Quantity(v).to_value("deg") if isinstance(v, u.Quantity) else v for k, v in values.items()}
        given = [c for c in self.condition_columns if c in values or all(s in values for s in SOURCES.get(c, (c,)))]
        missing = [c for c in self.condition_columns if c not in given]
        if missing:
            raise ValueError(f"Give a value for {missing}: the collection needs {self.condition_columns}.")
        # a table of one row; a single-model collection needs no value, so the row holds no condition
        table = Table({column: [float(value)] for column, value in values.items()} if values else {"OBS_ID": [0]})
        return self._models(_condition_values(table, self.condition_columns), 1)[0]

    def _models(self, values, n):
        """The model of each of ``n`` runs with condition ``values``."""
        bins, weights, _ = _bin_weights(self.bin_edges, values, n, self.centres, self.interpolate)
        factors, norms = self._factors(values, n)
        energy = self.models[0].axes["energy"].edges[:-1].to_value("TeV")
        expand = (-1,) + (1,) * (self.models[0].data.ndim - 1)
        models = []
        for i, (run_bins, run_weights) in enumerate(zip(bins, weights)):
            # per energy bin, only the models measured there (>= their EMEASMIN) share the weight: a high-zenith
            # bin's extrapolated rate near low-zenith thresholds must not dilute a measured one
            used = [(self.models[int(b)], w) for b, w in zip(run_bins, run_weights) if w > 0]
            measured = np.array([w * (energy >= m.meta.get("EMEASMIN", 0.0) * (1 - 1e-6)) for m, w in used])
            total = measured.sum(axis=0)
            shares = np.where(total > 0, measured / np.where(total > 0, total, 1), [[w] for _, w in used])
            data = sum(w.reshape(expand) * m.quantity.to_value(RATE_UNIT) for (m, _), w in zip(used, shares))
            template = self.models[int(run_bins[np.argmax(run_weights)])]
            meta = {k: v for k, v in template.meta.items() if not k.startswith(("BIN", "NRUNS", "NEVENTS"))}
            meta.update({f"COND{k}": column for k, column in enumerate(values, start=1)})
            meta.update({f"CONDVAL{k}": float(value[i]) for k, value in enumerate(values.values(), start=1)})
            meta.update({f"WBIN{k}": int(b) for k, b in enumerate(run_bins, start=1)})
            meta.update({f"WEIGHT{k}": float(w) for k, w in enumerate(run_weights, start=1)})
            meta.update(CORRFAC=float(norms[i]), EMEASMIN=min(m.meta.get("EMEASMIN", 0.0) for m, _ in used))
            data, alignment = data * factors[i].reshape(expand), template.fov_alignment
            models.append(type(template)(template.axes, data=data, unit=RATE_UNIT, meta=meta, fov_alignment=alignment))
        return models

    def to_store_inputs(self, obs_table, interpolate=True, fov_lat_slope=None, fov_axes=None):
        """Models by HDU name and the obs index's new columns for `~bkgtemplate.store.write_background_store`.

        Per run: OBS_ID, <col>_BIN, <col>_LO/_HI/_W (weight of _HI, interpolated columns), BKG_BIN (flat bin, or the
        nearest), BKG_NORM (corrections at 1 TeV), BKG_HDU ("BKG_<OBS_ID>", or the bin's if not ``interpolate``).
        With ``fov_lat_slope`` (1/deg per energy bin, e.g. the off runs' `BackgroundHistograms.fov_lat_slope`), each
        model is `with_fov_lat_slope` on ``fov_axes`` (default `default_fov_axes`): 3D, the lower/upper gradient added.
        """
        values = _condition_values(obs_table, self.condition_columns)
        obs_ids = np.asarray(obs_table["OBS_ID"], dtype=np.int64)
        bins, _, outside = _bin_weights(self.bin_edges, values, len(obs_table))
        if outside.any():
            log.warning(f"Runs {obs_ids[outside].tolist()} lie outside the bins of {self.columns}: nearest bin used.")
        assignment = Table({"OBS_ID": obs_ids})
        for column in self.columns:
            assignment[f"{column}_BIN"] = assign_bins(values[column], self.bin_edges[column])[0]
            if column in self.interpolate:
                lo_hi_w = interpolation_weights(_to_x(column, values[column]), _to_x(column, self.centres[column]))
                assignment[f"{column}_LO"], assignment[f"{column}_HI"], assignment[f"{column}_W"] = lo_hi_w
        assignment["BKG_BIN"], assignment["BKG_NORM"] = bins[:, 0], self._factors(values, len(obs_ids))[1]
        if not interpolate:
            if self.corrections or self.interpolate:
                log.warning("One model per bin: the interpolation and the corrections are not applied to the runs.")
            assignment["BKG_HDU"] = np.array(self.bin_names)[bins[:, 0]]
            names, models = self.bin_names, self.models
        else:
            assignment["BKG_HDU"] = names = [f"BKG_{obs_id}" for obs_id in obs_ids]
            models = self._models(values, len(obs_ids))
        if fov_lat_slope is not None:
            fov_axes = fov_axes or default_fov_axes()  # once, not per model
            models = [with_fov_lat_slope(model, fov_lat_slope, fov_axes) for model in models]
        return dict(zip(names, models)), assignment

    def write(self, filename, overwrite=False):
        """Write to a FITS file, atomically: primary header NBINS, NCORR, BINCOLi, INTERPi; one HDU per bin (the
        model's, with BINCOLi, BINIDXi, BINLOi, BINHIi, BINCENi), then CORRECTIONS and RUNS tables if any."""
        header = fits.Header({COLLECTION_KEY: True, "NBINS": self.n_bins, "NCORR": len(self.corrections)})
        header["NBINCOL"] = len(self.columns)
        for i, c in enumerate(self.columns, start=1):
            header.update({f"BINCOL{i}": c, f"INTERP{i}": c in self.interpolate})
        hdus = [fits.PrimaryHDU(header=header)]
        for name, model, index in zip(self.bin_names, self.models, np.ndindex(self.shape)):
            hdus.append(model.to_table_hdu())
            hdus[-1].name = name
            for i, (c, k) in enumerate(zip(self.columns, index), start=1):
                edges, centre = self.bin_edges[c], self.centres[c][k]
                keys = {"COL": c, "IDX": k, "LO": edges[k], "HI": edges[k + 1], "CEN": centre}
                hdus[-1].header.update({f"BIN{key}{i}": value for key, value in keys.items()})
        if self.corrections:
            n_energy = self.models[0].axes["energy"].nbin
            hdus.append(fits.BinTableHDU(ConditionCorrection.to_table(self.corrections, n_energy), name="CORRECTIONS"))
        if self.runs is not None:
            hdus.append(fits.BinTableHDU(Table(self.runs), name="RUNS"))
        with staged_write(make_path(filename), overwrite=overwrite) as path:
            fits.HDUList(hdus).writeto(path)

    @classmethod
    def read(cls, filename):
        """Read a collection written by `write`."""
        filename = make_path(filename)
        try:
            with fits.open(filename, memmap=False) as hdulist:
                hdulist.verify("exception")
                return cls._from_hdulist(hdulist)
        except (OSError, KeyError, ValueError, fits.VerifyError) as error:
            message = f"Cannot read a background model collection from {filename} ({error}); rewrite it."
            raise ValueError(message) from None

    @classmethod
    def _from_hdulist(cls, hdulist):
        header = hdulist[0].header
        if not header.get(COLLECTION_KEY, False):
            raise ValueError(f"not a background model collection (no {COLLECTION_KEY} in the primary header)")
        if len(hdulist) < 1 + header["NBINS"] + bool(header["NCORR"]):
            raise ValueError(f"the file is truncated: {len(hdulist)} HDUs for {header['NBINS']} bins and corrections")
        bin_hdus = hdulist[1 : 1 + header["NBINS"]]
        columns = [header[f"BINCOL{i}"] for i in range(1, header["NBINCOL"] + 1)]
        edges, centres = {}, {}
        for i, column in enumerate(columns, start=1):
            edges[column] = np.unique([hdu.header[f"BIN{key}{i}"] for hdu in bin_hdus for key in ("LO", "HI")])
            by_index = {hdu.header[f"BINIDX{i}"]: hdu.header[f"BINCEN{i}"] for hdu in bin_hdus}
            centres[column] = [by_index[k] for k in sorted(by_index)]
        kinds = [Background3D if hdu.header.get("HDUCLAS4") == "BKG_3D" else Background2D for hdu in bin_hdus]
        corrections = ConditionCorrection.from_table(Table.read(hdulist["CORRECTIONS"])) if header["NCORR"] else []
        return cls([kind.from_table(Table.read(hdu)) for kind, hdu in zip(kinds, bin_hdus)], edges, centres,
                   [column for i, column in enumerate(columns, start=1) if header[f"INTERP{i}"]], corrections,
                   Table.read(hdulist["RUNS"]) if "RUNS" in hdulist else None)


class ObservingConditionsEstimator(Maker):
    """Estimate a `BackgroundModelCollection` over observing conditions.

    A bin's model is the estimator's model of its runs (each run filled once); corrections are fitted jointly to
    all runs (`~bkgtemplate.corrections.fit_corrections`), a ZEN_PNT one per energy bin.

    Parameters
    ----------
    estimator : `~bkgtemplate.BackgroundModelEstimator`, optional
        Axes, exclusion, smoothing and parallel options. Default is ``BackgroundModelEstimator()``.
    bins : dict of {str: list of float or int}, optional
        Per obs-index column, edges in its unit (deg for ZEN_PNT) or a number of equal-livetime bins; several
        columns make a grid, ``{}`` one model. Default is ``{"ZEN_PNT": [0, 20, 40, 90]}``.
    interpolate : tuple of str, optional
        Binned columns interpolated between bin centres. Default is ("ZEN_PNT", "MUONEFF").
    corrections : dict of {str: {"power-law", "cos", "linear"}}, optional
        Fitted rate corrections per column (see `~bkgtemplate.corrections`). Default is
        ``{"ZEN_PNT": "cos", "MUONEFF": "power-law"}``; ``{}`` for none.
    merge_empty : bool, optional
        Merge a bin without runs into its neighbour of less livetime, not raise `EmptyBinError`. Default is False.
    """

    tag = "ObservingConditionsEstimator"

    def __init__(self, estimator=None, bins=None, interpolate=None, corrections=None, merge_empty=False):
        self.estimator = BackgroundModelEstimator() if estimator is None else estimator
        if not isinstance(self.estimator, BackgroundModelEstimator):
            raise TypeError(f"estimator must be a BackgroundModelEstimator, got {type(self.estimator).__name__}.")
        self.bins = {}
        for column, spec in ({ZENITH: TUTORIAL_ZENITH_EDGES} if bins is None else bins).items():
            is_number = isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and spec >= 1
            self.bins[column] = int(spec) if is_number else _check_edges(column, spec)
        self.interpolate = tuple(DEFAULT_INTERPOLATE if interpolate is None else interpolate)
        not_binned = [c for c in self.interpolate if c not in self.bins and c not in DEFAULT_INTERPOLATE]
        if not_binned:
            raise ValueError(f"Cannot interpolate in {not_binned}: they are not binned ({list(self.bins)}).")
        self.corrections = dict(DEFAULT_CORRECTIONS if corrections is None else corrections)
        for column, kind in self.corrections.items():
            if kind not in CORRECTION_KINDS:
                raise ValueError(f"Unknown correction {kind!r} for {column}; choose one of {CORRECTION_KINDS}.")
        self.merge_empty = bool(merge_empty)

    def run(self, data_store, obs_ids=None):
        """Build the collection from runs of a data store (all runs by default)."""
        return self.make_collection(self.estimator.fill(data_store, obs_ids))

    def make_collection(self, histograms):
        """Build the collection from each run's counts and exposure (`BackgroundModelEstimator.fill`)."""
        return self._build(histograms, self._edges(histograms), self.merge_empty)

    def leave_one_out(self, histograms, obs_ids=None):
        """Yield ``(obs_id, collection)`` without each run of ``obs_ids`` (default all; empty bins merged)."""
        edges = self._edges(histograms)  # equal-livetime edges from all runs
        for obs_id in histograms.obs_ids if obs_ids is None else obs_ids:
            others = [i for i in histograms.obs_ids if i != int(obs_id)]
            yield int(obs_id), self._build(histograms.select(others), edges, merge_empty=True)

    def _edges(self, histograms):
        """Bin edges of each column; a number of bins gives equal-livetime edges for the runs."""
        edges = dict(self.bins)
        for column, n in self.bins.items():
            if isinstance(n, int):
                values = column_values(histograms.obs_table, column)
                edges[column] = equal_livetime_edges(values, histograms.livetime, n)
        return edges

    def _build(self, histograms, edges, merge_empty):
        table, obs_ids, livetime = histograms.obs_table, np.array(histograms.obs_ids), histograms.livetime
        values = _condition_values(table, dict.fromkeys(list(edges) + list(self.corrections)))
        edges, cells, outside = self._fill_bins(edges, values, livetime, merge_empty)
        if np.any(outside):
            log.warning(f"Runs {obs_ids[outside].tolist()} lie outside the bins of {list(edges)}: nearest bin used.")
        centres = {}
        for column, column_edges in edges.items():
            index, x = assign_bins(values[column], column_edges)[0], _to_x(column, values[column])
            centres[column] = _from_x(column, np.bincount(index, livetime * x) / np.bincount(index, livetime))
        interpolate = tuple(c for c in edges if c in self.interpolate)
        bins, weights, _ = _bin_weights(edges, values, len(obs_ids), centres, interpolate)
        matrix = np.zeros((len(obs_ids), int(np.prod([len(e) - 1 for e in edges.values()]))))
        np.add.at(matrix, (np.arange(len(obs_ids))[:, None], bins), weights)
        counts, exposure = histograms.counts, histograms.exposure.value
        corrections = fit_corrections(self.corrections, values, livetime, counts, exposure, cells, matrix,
                                      ENERGY_DEPENDENT)
        factors = _correction_factors(corrections, values, *counts.shape[:2])
        models = []
        for cell in range(matrix.shape[1]):
            members = cells == cell
            models.append(histograms.select(obs_ids[members]).to_irf(factors[members], self.estimator.smooth_sigma))
            models[-1].meta["LIVETIME"] = float(livetime[members].sum())
        runs = Table({"OBS_ID": obs_ids.astype(np.int64), "BKG_BIN": cells, "LIVETIME": livetime * u.s, **values})
        return BackgroundModelCollection(models, edges, centres, interpolate, corrections, runs)

    @staticmethod
    def _fill_bins(edges, values, livetime, merge_empty):
        """Edges, each run's flat bin and outside flag; empty bins merged into a neighbour or EmptyBinError."""
        while True:
            shape = tuple(len(e) - 1 for e in edges.values())
            bins, _, outside = _bin_weights(edges, values, len(livetime))
            cells = bins[:, 0]
            empty = np.flatnonzero(np.bincount(cells, minlength=int(np.prod(shape))) == 0)
            if not len(empty):
                return edges, cells, outside
            index = np.unravel_index(empty[0], shape)
            label = ", ".join(f"{c} [{edges[c][i]:g}, {edges[c][i + 1]:g}]" for c, i in zip(edges, index))
            if not merge_empty:
                spans = ", ".join(f"{c} {np.min(values[c]):.4g}-{np.max(values[c]):.4g}" for c in edges)
                raise EmptyBinError(f"Bin {label} has no runs (the {len(livetime)} runs span {spans}); change the bin "
                                    "edges or use merge_empty=True.")
            # merge along the last column with several bins (every run has a bin, so one has several)
            k = max(k for k, n in enumerate(shape) if n > 1)
            column = list(edges)[k]
            per_bin = np.bincount(np.unravel_index(cells, shape)[k], livetime, minlength=shape[k])
            neighbours = [j for j in (index[k] - 1, index[k] + 1) if 0 <= j < shape[k]]
            partner = min(neighbours, key=lambda j: (per_bin[j], j))
            log.info(f"Bin {label} has no runs: merged with {column} bin {partner}.")
            edges = {**edges, column: np.delete(edges[column], max(index[k], partner))}
