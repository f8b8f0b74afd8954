"""Background models over observing conditions: bins in obs-index columns, interpolation, corrections.

A `BackgroundModelCollection` holds one background model per bin of one or more obs-index
columns (zenith ``ZEN_PNT`` by default, or ``MUONEFF``, or any numeric column) and gives a
run the model of its conditions:

- binned columns are either **interpolated** between bin centres (linear in the rate; in
  cos(zenith) for ``ZEN_PNT``, in the value itself for other columns; clipped at the first and
  last centre, never extrapolated) or looked up (the bin holding the run);
- **corrections** multiply the rate by ``exp(coefficient x g(value))`` with a coefficient fitted
  to the runs: ``"power-law"`` ``g = log(value / reference)``, i.e. rate proportional to
  ``(MUONEFF / reference) ** index``; ``"cos"`` ``g = cos(value) - reference`` for an
  azimuth in deg (the north-south asymmetry the geomagnetic field gives); ``"linear"``
  ``g = value - reference``. The references are livetime-weighted means over the runs, so each
  bin's model is the rate at typical conditions.

`ObservingConditionsEstimator` fills every run's counts and exposure once (`RunHistograms`)
and sums them per bin, so that a collection without one run (leave-one-out) costs a
subtraction, not a new pass over the events. The collection is written to FITS with one
BinTable HDU per bin (the IRF's own ``to_table_hdu``), bin edges and centres in its header.
"""

import logging
from dataclasses import dataclass, field, replace
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table
from scipy.optimize import minimize
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxes
from gammapy.utils.parallel import run_multiprocessing
from gammapy.utils.scripts import make_path
from .estimator import BackgroundModelEstimator, _each_chunk, map_run_chunks
from .histograms import EXPOSURE_UNIT, RATE_UNIT, BackgroundHistograms, fill_run
from .runs import RunError, collect_runs, obs_table_rows

__all__ = [
    "BackgroundModelCollection",
    "ConditionCorrection",
    "EmptyBinError",
    "ObservingConditionsEstimator",
    "RunHistograms",
    "assign_bins",
    "column_values",
    "equal_livetime_edges",
    "interpolation_variable",
    "interpolation_weights",
]

log = logging.getLogger(__name__)

ZENITH = "ZEN_PNT"
MUONEFF = "MUONEFF"
AZIMUTH = "AZ_PNT"
TUTORIAL_ZENITH_EDGES = (0.0, 20.0, 40.0, 90.0)
"""Zenith bin edges of the original gammapy tutorial, in deg."""
DEFAULT_BINS = {ZENITH: TUTORIAL_ZENITH_EDGES}
DEFAULT_INTERPOLATE = (ZENITH, MUONEFF)
DEFAULT_CORRECTIONS = {MUONEFF: "power-law", AZIMUTH: "cos"}
"""Default corrections, chosen by held-out performance on the H.E.S.S. DL3 DR1 runs (see
`ObservingConditionsEstimator`)."""
CORRECTION_KINDS = ("power-law", "cos", "linear")
# FITS keywords of a collection (8 characters at most, so no HIERARCH cards)
_COLLECTION_KEY = "BKGCOLL"


def _expand(values, ndim):
    """An energy-axis array shaped to broadcast against (energy, spatial...) data."""
    return np.reshape(values, (-1,) + (1,) * (ndim - 1))


class EmptyBinError(ValueError):
    """A bin of observing conditions holds no run."""


def column_values(table, column):
    """Values of an obs-index column as floats, in the column's own unit (deg for angles).

    Parameters
    ----------
    table : `~astropy.table.Table`
        Obs index (or rows of it).
    column : str
        Column name, e.g. "ZEN_PNT".

    Returns
    -------
    values : `~numpy.ndarray`
        Values, NaN where masked.
    """
    if column not in table.colnames:
        raise KeyError(f"The obs table has no column {column!r}; it has {table.colnames}.")
    col = table[column]
    values = np.array(col, dtype=float)
    if np.ma.is_masked(col):
        values = np.where(np.ma.getmaskarray(col), np.nan, values)
    return values


def _unit(table, column):
    unit = getattr(table[column], "unit", None)
    return "" if unit is None else u.Unit(unit).to_string()


def interpolation_variable(column, values):
    """The variable in which a column is interpolated: cos(zenith) for ZEN_PNT, else the value.

    Parameters
    ----------
    column : str
        Column name.
    values : `~numpy.ndarray`
        Values in the column's unit (deg for ZEN_PNT).

    Returns
    -------
    x : `~numpy.ndarray`
        Interpolation variable.
    """
    values = np.asarray(values, dtype=float)
    if column == ZENITH:
        return np.cos(np.deg2rad(values))
    return values


def _from_interpolation_variable(column, x):
    if column == ZENITH:
        return np.rad2deg(np.arccos(np.clip(x, -1, 1)))
    return np.asarray(x, dtype=float)


def assign_bins(values, edges):
    """Bin of each value: bins include their lower edge, the last bin also its upper edge.

    Values outside all bins get the nearest bin and are flagged.

    Parameters
    ----------
    values : `~numpy.ndarray`
        Values, in the unit of ``edges``.
    edges : `~numpy.ndarray`
        Increasing bin edges.

    Returns
    -------
    index : `~numpy.ndarray` of int
        Bin index of each value.
    outside : `~numpy.ndarray` of bool
        True for values outside ``[edges[0], edges[-1]]`` and for NaN.

    Examples
    --------
    >>> from bkgtemplate.conditions import assign_bins
    >>> assign_bins([0, 19.9, 20, 40, 90, 95], [0, 20, 40, 90])[0]
    array([0, 0, 1, 2, 2, 2])
    """
    values = np.atleast_1d(np.asarray(values, dtype=float))
    edges = np.asarray(edges, dtype=float)
    n_bins = len(edges) - 1
    index = np.searchsorted(edges, values, side="right") - 1
    # the last bin is closed: a value on the last edge belongs to it
    index = np.where(values == edges[-1], n_bins - 1, index)
    outside = ~((values >= edges[0]) & (values <= edges[-1]))
    return np.clip(index, 0, n_bins - 1), outside


def interpolation_weights(x, centres):
    """Linear interpolation partners and weights between bin centres, clipped at the ends.

    Parameters
    ----------
    x : `~numpy.ndarray`
        Values of the interpolation variable (cos(zenith) for ZEN_PNT).
    centres : `~numpy.ndarray`
        Bin centres in the same variable, monotonic in the bin index (increasing or decreasing).

    Returns
    -------
    lo, hi : `~numpy.ndarray` of int
        Partner bins, ``lo <= hi`` (equal where clipped or with a single bin).
    weight : `~numpy.ndarray`
        Weight of bin ``hi``, in [0, 1]; bin ``lo`` has ``1 - weight``.

    Examples
    --------
    >>> import numpy as np
    >>> from bkgtemplate.conditions import interpolation_weights
    >>> lo, hi, w = interpolation_weights(np.cos(np.radians(20)), np.cos(np.radians([10, 30])))
    >>> int(lo[0]), int(hi[0]), round(float(w[0]), 4)
    (0, 1, 0.3798)
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    centres = np.asarray(centres, dtype=float)
    n = len(centres)
    if n == 1:
        zeros = np.zeros(len(x), dtype=int)
        return zeros, zeros, np.zeros(len(x))
    sign = 1.0 if centres[-1] >= centres[0] else -1.0
    c, v = sign * centres, sign * x
    if np.any(np.diff(c) <= 0):
        raise ValueError(f"Bin centres {centres} are not strictly monotonic: cannot interpolate.")
    v = np.clip(v, c[0], c[-1])
    lo = np.clip(np.searchsorted(c, v, side="right") - 1, 0, n - 2)
    weight = (v - c[lo]) / (c[lo + 1] - c[lo])
    hi = lo + 1
    # clipped values sit exactly on an end centre: give them that single bin
    at_top = weight >= 1
    lo = np.where(at_top, hi, lo)
    weight = np.where(at_top, 0.0, weight)
    hi = np.where(weight == 0, lo, hi)
    return lo, hi, weight


def equal_livetime_edges(values, livetime, n_bins):
    """Bin edges that split the runs into bins of about equal livetime.

    Inner edges lie halfway between the two runs on either side of each livetime quantile;
    the outer edges are the smallest and largest values.

    Parameters
    ----------
    values : `~numpy.ndarray`
        Column value of each run.
    livetime : `~numpy.ndarray`
        Livetime of each run, in s.
    n_bins : int
        Number of bins.

    Returns
    -------
    edges : `~numpy.ndarray`
        ``n_bins + 1`` increasing edges.
    """
    values = np.asarray(values, dtype=float)
    livetime = np.asarray(livetime, dtype=float)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}.")
    order = np.argsort(values)
    values, livetime = values[order], livetime[order]
    distinct = np.unique(values)
    if len(distinct) < n_bins:
        raise ValueError(f"{len(distinct)} distinct values cannot fill {n_bins} equal-livetime bins.")
    cumulative = np.cumsum(livetime) / livetime.sum()
    edges = [values[0]]
    for k in range(1, n_bins):
        i = int(np.searchsorted(cumulative, k / n_bins))
        i = min(max(i, 0), len(values) - 2)
        # move to the next distinct value so that no run lies on an edge
        j = i + 1
        while j < len(values) - 1 and values[j] == values[i]:
            j += 1
        edge = 0.5 * (values[i] + values[j])
        if edge <= edges[-1]:
            raise ValueError(f"Cannot split {len(values)} runs into {n_bins} equal-livetime bins.")
        edges.append(edge)
    edges.append(values[-1])
    return np.array(edges)


@dataclass(frozen=True)
class ConditionCorrection:
    """A multiplicative correction of the rate, ``exp(coefficient x g(value))``.

    Parameters
    ----------
    column : str
        Obs-index column, e.g. "MUONEFF".
    kind : {"power-law", "cos", "linear"}
        ``g = log(value / reference)`` (rate proportional to ``(value / reference) ** coefficient``),
        ``g = cos(value) - reference`` (value in deg) or ``g = value - reference``.
    reference : float
        Reference value (value for "power-law", cos(value) for "cos"); g is 0 there.
    coefficient : float
        Fitted coefficient (the index for "power-law").
    """

    column: str
    kind: str
    reference: float
    coefficient: float = 0.0

    def __post_init__(self):
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(
                f"Unknown correction kind {self.kind!r} for {self.column}; choose one of {CORRECTION_KINDS}."
            )

    @staticmethod
    def transform(kind, values):
        """The transformed value (before subtracting the reference)."""
        values = np.asarray(values, dtype=float)
        if kind == "power-law":
            if np.any(values <= 0):
                raise ValueError(f"A power-law correction needs positive values, got {values[values <= 0]}.")
            return np.log(values)
        if kind == "cos":
            return np.cos(np.deg2rad(values))
        return values

    @classmethod
    def reference_of(cls, kind, values, weights):
        """Reference: livetime-weighted mean of the transformed value (geometric mean for a power law)."""
        mean = np.average(cls.transform(kind, values), weights=weights)
        return float(np.exp(mean)) if kind == "power-law" else float(mean)

    def variable(self, values):
        """g(value): zero at the reference."""
        if self.kind == "power-law":
            return self.transform(self.kind, values) - np.log(self.reference)
        return self.transform(self.kind, values) - self.reference

    def factor(self, values):
        """Correction factor ``exp(coefficient x g(value))``."""
        return np.exp(self.coefficient * self.variable(values))

    def __str__(self):
        if self.kind == "power-law":
            return f"{self.column} power law: rate x ({self.column} / {self.reference:.4g}) ** {self.coefficient:.3f}"
        if self.kind == "cos":
            return (
                f"{self.column} cos: rate x exp({self.coefficient:.3f} x (cos({self.column}) - {self.reference:.4g}))"
            )
        return f"{self.column} linear: rate x exp({self.coefficient:.3f} x ({self.column} - {self.reference:.4g}))"


@dataclass
class RunHistograms:
    """Counts and exposure of each run separately, with the runs' obs-index rows.

    The building block of collections and held-out checks: any set of runs can be summed
    without reading events again.

    Parameters
    ----------
    axes : `~gammapy.maps.MapAxes`
        Energy and spatial axes.
    counts : `~numpy.ndarray`
        Counts, shape ``(n_runs, *axes.shape)``.
    exposure : `~astropy.units.Quantity`
        ONTIME x dE x dOmega, shape ``(n_runs, *axes.shape)``, in s MeV sr.
    obs_table : `~astropy.table.Table`
        Obs-index rows of the runs, in the same order.
    fov_alignment : {"ALTAZ", "RADEC"}, optional
        Alignment of 3D field-of-view coordinates. Default is "ALTAZ".
    skipped : `~astropy.table.Table`, optional
        Runs that could not be read, with the reason. Default is an empty table.

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate.conditions import RunHistograms
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> runs = RunHistograms.fill(data_store, [20136, 20137])  # doctest: +SKIP
    >>> runs.counts.shape  # doctest: +SKIP
    (2, 15, 10)
    """

    axes: MapAxes
    counts: np.ndarray
    exposure: u.Quantity
    obs_table: Table
    fov_alignment: str = "ALTAZ"
    skipped: Table = field(default_factory=lambda: Table(names=["OBS_ID", "REASON"], dtype=[int, str]))

    def __post_init__(self):
        if self.counts.shape != self.exposure.shape or self.counts.shape[1:] != self.axes.shape:
            raise ValueError(
                f"Counts {self.counts.shape} and exposure {self.exposure.shape} "
                f"do not match the axes {self.axes.shape}."
            )
        if len(self.obs_table) != len(self.counts):
            raise ValueError(f"{len(self.obs_table)} obs-table rows for {len(self.counts)} runs.")

    @classmethod
    def fill(cls, data_store, obs_ids=None, spec=None, on_error="raise", n_jobs=None, parallel_backend=None):
        """Fill each run's counts and exposure, reading each run's events once.

        Parameters
        ----------
        data_store : `~gammapy.data.DataStore`
            Data store with the runs.
        obs_ids : list of int, optional
            Runs. Default is None (all runs of the store).
        spec : `~bkgtemplate.histograms.HistogramSpec`, optional
            What to histogram. Default is None (that of a default `BackgroundModelEstimator`).
        on_error : {"raise", "skip"}, optional
            What to do with a run whose events cannot be read. Default is "raise".
        n_jobs : int, optional
            Number of processes. Default is None (1).
        parallel_backend : {"multiprocessing", "ray"}, optional
            Parallel backend. Default is None (multiprocessing).

        Returns
        -------
        run_histograms : `RunHistograms`
            The runs that could be read, in the order of ``obs_ids``.
        """
        spec = BackgroundModelEstimator().spec if spec is None else spec
        runs = collect_runs(data_store, obs_ids, safe_threshold=spec.safe_threshold)
        n_jobs = 1 if n_jobs is None else max(1, int(n_jobs))
        results = map_run_chunks(_each_chunk, runs, spec, on_error, n_jobs, parallel_backend)
        by_id = {obs_id: (c, x) for chunk, _ in results for obs_id, c, x in chunk}
        skipped = [row for _, rows in results for row in rows]
        done = [run.obs_id for run in runs if run.obs_id in by_id]
        if not done:
            raise RunError("No run could be used; see the warnings above for each run.")
        if skipped:
            log.warning(f"{len(skipped)} of {len(runs)} runs skipped: {[row[0] for row in skipped]}")
        return cls(
            axes=spec.axes,
            counts=np.array([by_id[obs_id][0] for obs_id in done]),
            exposure=np.array([by_id[obs_id][1] for obs_id in done]) * EXPOSURE_UNIT,
            obs_table=obs_table_rows(data_store, done),
            fov_alignment=spec.fov_alignment,
            skipped=Table(rows=skipped or None, names=["OBS_ID", "REASON"], dtype=[int, str]),
        )

    def __len__(self):
        return len(self.counts)

    @property
    def obs_ids(self):
        """Run numbers, as a list of int."""
        return [int(obs_id) for obs_id in self.obs_table["OBS_ID"]]

    @property
    def livetime(self):
        """LIVETIME of each run (ONTIME if there is no LIVETIME column), in s."""
        return _livetime(self.obs_table)

    def index(self, obs_ids):
        """Positions of runs in this container."""
        position = {obs_id: i for i, obs_id in enumerate(self.obs_ids)}
        missing = [int(obs_id) for obs_id in obs_ids if int(obs_id) not in position]
        if missing:
            raise KeyError(f"Runs {missing} are not in these run histograms.")
        return np.array([position[int(obs_id)] for obs_id in obs_ids], dtype=int)

    def select(self, obs_ids):
        """The histograms of some runs, in the given order.

        Parameters
        ----------
        obs_ids : list of int
            Runs to keep.

        Returns
        -------
        run_histograms : `RunHistograms`
            Selection.
        """
        idx = self.index(obs_ids)
        if not len(idx):
            raise ValueError("The run selection is empty.")
        return replace(self, counts=self.counts[idx], exposure=self.exposure[idx], obs_table=self.obs_table[idx])

    def stack(self, weights=None):
        """Sum over the runs.

        Parameters
        ----------
        weights : `~numpy.ndarray`, optional
            Factor on each run's exposure (a rate correction). Default is None (1).

        Returns
        -------
        histograms : `~bkgtemplate.histograms.BackgroundHistograms`
            Summed counts and exposure.
        """
        exposure = self.exposure.value
        if weights is not None:
            exposure = exposure * np.asarray(weights, dtype=float).reshape((-1,) + (1,) * (exposure.ndim - 1))
        return BackgroundHistograms(
            axes=self.axes,
            counts=self.counts.sum(axis=0),
            exposure=exposure.sum(axis=0) * self.exposure.unit,
            fov_alignment=self.fov_alignment,
            obs_ids=self.obs_ids,
        )


def _livetime(obs_table):
    """LIVETIME of each run (ONTIME if there is no LIVETIME column), in s."""
    for name in ("LIVETIME", "ONTIME"):
        if name in obs_table.colnames:
            return u.Quantity(obs_table[name], "s").to_value("s").astype(float)
    raise KeyError("The obs table has neither LIVETIME nor ONTIME.")


def _bin_weights(edges, centres_x, interpolate, values, n=None):
    """Flat bins and weights, shape (n, 2 ** n_interpolated), of runs with given column values.

    ``centres_x`` are the bin centres in the interpolation variable; columns not in
    ``interpolate`` take the bin holding the value (the nearest one outside all bins).
    """
    columns = list(edges)
    if n is None:
        n = len(next(iter(values.values()))) if values else 1
    shape = tuple(len(e) - 1 for e in edges.values())
    per_column = []
    for column in columns:
        if column in interpolate:
            x = interpolation_variable(column, values[column])
            lo, hi, w = interpolation_weights(x, centres_x[column])
            per_column.append([(lo, 1 - w), (hi, w)])
        else:
            index, _ = assign_bins(values[column], edges[column])
            per_column.append([(index, np.ones(n))])
    bins, weights = [], []
    for combination in np.ndindex(*[len(options) for options in per_column]):
        index = [per_column[k][choice][0] for k, choice in enumerate(combination)]
        weight = np.prod([per_column[k][choice][1] for k, choice in enumerate(combination)], axis=0)
        bins.append(np.ravel_multi_index(index, shape) if columns else np.zeros(n, dtype=int))
        weights.append(np.broadcast_to(weight, (n,)))
    return np.array(bins).T, np.array(weights).T


def _bin_name(columns, index):
    if not columns:
        return "BKG_ALL"
    return "BKG_" + "_".join(f"{column}{i}" for column, i in zip(columns, index))


class BackgroundModelCollection:
    """Background models in bins of observing conditions, and the model for any run.

    Parameters
    ----------
    models : list of `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        One model per bin, in C order over the bins of the columns (the last column varies
        fastest). With corrections, the models are the rates at the corrections' references.
    bin_edges : dict of {str: `~numpy.ndarray`}
        Bin edges of each column, in the column's unit (deg for ZEN_PNT). Empty for a single model.
    centres : dict of {str: `~numpy.ndarray`}, optional
        Centre of each bin of each column, in the column's unit: the livetime-weighted mean of
        the runs' interpolation variable (cos(zenith) for ZEN_PNT) over all runs in that bin of
        the column, turned back into the column's unit. Default is None (middle of the edges).
    interpolate : tuple of str, optional
        Columns interpolated between centres; the others are looked up. Default is ("ZEN_PNT",
        "MUONEFF") where binned.
    corrections : list of `ConditionCorrection`, optional
        Rate corrections. Default is None.
    units : dict of {str: str}, optional
        Unit of each column. Default is None ("deg" for ZEN_PNT and AZ_PNT, else "").
    runs : `~astropy.table.Table`, optional
        Runs that built the collection: OBS_ID, BKG_BIN and LIVETIME. Default is None.

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate.conditions import ObservingConditionsEstimator
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> table = data_store.obs_table
    >>> off = table["OBS_ID"][table["TARGET_NAME"] == "Off data"]
    >>> collection = ObservingConditionsEstimator().run(data_store, off)  # doctest: +SKIP
    >>> bkg = collection.model_for(zenith=30, muoneff=0.95, AZ_PNT=180)  # doctest: +SKIP
    >>> collection.write("bkg-collection.fits", overwrite=True)  # doctest: +SKIP
    """

    def __init__(self, models, bin_edges, centres=None, interpolate=None, corrections=None, units=None, runs=None):
        self.bin_edges = {column: np.asarray(edges, dtype=float) for column, edges in (bin_edges or {}).items()}
        for column, edges in self.bin_edges.items():
            if len(edges) < 2 or np.any(np.diff(edges) <= 0):
                raise ValueError(f"Bin edges of {column} must be increasing with at least one bin, got {edges}.")
        models = list(models)
        if len(models) != int(np.prod(self.shape)):
            raise ValueError(f"{len(models)} models for {int(np.prod(self.shape))} bins of shape {self.shape}.")
        if not all(isinstance(model, (Background2D, Background3D)) for model in models):
            raise TypeError("Models must be gammapy Background2D or Background3D.")
        if any(model.axes != models[0].axes or type(model) is not type(models[0]) for model in models):
            raise ValueError("All models of a collection must have the same kind and axes.")
        self.models = models
        units = dict(units or {})
        self.units = {
            column: units.get(column, "deg" if column in (ZENITH, AZIMUTH) else "") for column in self.columns
        }
        centres = dict(centres or {})
        self.centres = {}
        for column, edges in self.bin_edges.items():
            default = _from_interpolation_variable(
                column, 0.5 * (interpolation_variable(column, edges[:-1]) + interpolation_variable(column, edges[1:]))
            )
            self.centres[column] = np.asarray(centres.get(column, default), dtype=float)
        if interpolate is None:
            interpolate = DEFAULT_INTERPOLATE
        unknown = [c for c in interpolate if c not in self.bin_edges and c not in DEFAULT_INTERPOLATE]
        if unknown:
            raise ValueError(f"Cannot interpolate in {unknown}: binned columns are {self.columns}.")
        self.interpolate = tuple(column for column in self.columns if column in interpolate)
        self.corrections = list(corrections or [])
        self.runs = runs

    @property
    def columns(self):
        """Binned columns, in order."""
        return list(self.bin_edges)

    @property
    def shape(self):
        """Number of bins of each column."""
        return tuple(len(edges) - 1 for edges in self.bin_edges.values())

    @property
    def n_bins(self):
        return len(self.models)

    @property
    def bin_names(self):
        """HDU name of each bin, e.g. "BKG_ZEN_PNT0" ("BKG_ALL" for a single model)."""
        return [_bin_name(self.columns, np.unravel_index(i, self.shape)) for i in range(self.n_bins)]

    @property
    def bin_labels(self):
        """Readable label of each bin, e.g. "ZEN_PNT [0, 20) deg" (for plot legends)."""
        layout = _Layout(edges=self.bin_edges, units=self.units, values={}, cells=np.zeros(0, dtype=int))
        return [layout.describe(i) if self.columns else "all runs" for i in range(self.n_bins)]

    def __str__(self):
        lines = [f"BackgroundModelCollection: {self.n_bins} {type(self.models[0]).__name__} models"]
        for column in self.columns:
            how = "interpolated" if column in self.interpolate else "looked up"
            unit = f" {self.units[column]}" if self.units[column] else ""
            lines.append(
                f"  {column}: edges {np.round(self.bin_edges[column], 4).tolist()}{unit}, "
                f"centres {np.round(self.centres[column], 4).tolist()}{unit} ({how})"
            )
        lines += [f"  correction: {correction}" for correction in self.corrections]
        return "\n".join(lines)

    def __repr__(self):
        return str(self)

    def _values(self, values, required):
        """Values per column from keywords (zenith and muoneff are aliases), as float arrays."""
        out = {}
        for column in required:
            if column not in values or values[column] is None:
                raise ValueError(f"Give a value for {column}: the collection needs {required}.")
            value = values[column]
            if isinstance(value, u.Quantity):
                value = value.to_value(self.units.get(column) or ("deg" if column in (ZENITH, AZIMUTH) else ""))
            out[column] = np.atleast_1d(np.asarray(value, dtype=float))
        return out

    def weights(self, values):
        """Bins and weights that make the model of given conditions.

        Parameters
        ----------
        values : dict of {str: `~numpy.ndarray`}
            Value of every binned column (in its unit) for each of ``n`` runs.

        Returns
        -------
        bins : `~numpy.ndarray` of int
            Flat bin indices, shape ``(n, 2 ** n_interpolated)``.
        weights : `~numpy.ndarray`
            Weights, same shape, summing to 1 for each run.
        """
        values = self._values(values, self.columns)
        centres_x = {column: interpolation_variable(column, self.centres[column]) for column in self.columns}
        return _bin_weights(self.bin_edges, centres_x, self.interpolate, values)

    def correction_factor(self, values):
        """Product of the corrections for each run (1 without corrections)."""
        values = self._values(values, [correction.column for correction in self.corrections])
        factor = 1.0
        for correction in self.corrections:
            factor = factor * correction.factor(values[correction.column])
        return np.atleast_1d(factor)

    def model_for(self, zenith=None, muoneff=None, **values):
        """The background model of one set of observing conditions.

        Interpolated columns are interpolated linearly in the rate between the two nearest bin
        centres (in cos(zenith) for ZEN_PNT), clipped at the first and last centre; other
        columns take the bin that holds the value (the nearest bin outside all bins).
        Corrections multiply the result.

        Parameters
        ----------
        zenith : float or `~astropy.units.Quantity`, optional
            Zenith angle (ZEN_PNT), in deg. Default is None.
        muoneff : float, optional
            Optical efficiency (MUONEFF). Default is None.
        **values : float
            Values of other binned or corrected columns, by column name (e.g. ``AZ_PNT=180``).

        Returns
        -------
        bkg : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
            The model, with the conditions and the weights in its meta.
        """
        values = dict(values)
        if zenith is not None:
            values[ZENITH] = zenith
        if muoneff is not None:
            values[MUONEFF] = muoneff
        needed = list(dict.fromkeys(self.columns + [correction.column for correction in self.corrections]))
        values = {column: v[0] for column, v in self._values(values, needed).items()}
        bins, weights = self.weights({column: values[column] for column in self.columns})
        factor = float(self.correction_factor(values)[0])
        return self._combine(bins[0], weights[0], factor, values)

    def _combine(self, bins, weights, factor, values):
        # Per energy bin, only the models measured there (at or above their EMEASMIN) share
        # the weight: a high-zenith bin has no exposure near low-zenith thresholds, and its
        # extrapolated rate there should not dilute a measured one.
        energy = self.models[0].axes["energy"].edges[:-1].to_value("TeV")
        used = [(self.models[int(i)], w) for i, w in zip(bins, weights) if w > 0]
        measured = np.array([w * (energy >= m.meta.get("EMEASMIN", 0.0) * (1 - 1e-6)) for m, w in used])
        plain = np.array([np.full(len(energy), w) for _, w in used])
        norm = measured.sum(axis=0)
        effective = np.where(norm > 0, measured / np.where(norm > 0, norm, 1), plain)
        data = sum(_expand(w, m.data.ndim) * m.quantity.to_value(RATE_UNIT) for (m, _), w in zip(used, effective))
        template = self.models[int(bins[np.argmax(weights)])]
        meta = {key: value for key, value in template.meta.items() if not key.startswith(("BIN", "NRUNS", "NEVENTS"))}
        meta.update({f"COND{i + 1}": column for i, column in enumerate(values)})
        meta.update({f"CONDVAL{i + 1}": float(value) for i, value in enumerate(values.values())})
        meta.update({f"WBIN{i + 1}": int(index) for i, index in enumerate(bins)})
        meta.update({f"WEIGHT{i + 1}": float(weight) for i, weight in enumerate(weights)})
        meta["CORRFAC"] = factor
        meta["EMEASMIN"] = min(m.meta.get("EMEASMIN", 0.0) for m, _ in used)
        bkg = type(template)(
            axes=template.axes, data=data * factor, unit=RATE_UNIT, meta=meta, fov_alignment=template.fov_alignment
        )
        return bkg

    def assign(self, obs_table):
        """Bins, interpolation partners and weights of runs.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index (or rows of it) with OBS_ID and the binned and corrected columns.

        Returns
        -------
        assignment : `~astropy.table.Table`
            One row per run: OBS_ID; BKG_BIN (flat index of the bin holding the run, nearest
            bin outside all bins) and BKG_HDU (its HDU name); per binned column ``<col>_BIN``;
            per interpolated column ``<col>_LO`` and ``<col>_HI`` (partner bins) and ``<col>_W``
            (weight of ``<col>_HI``); BKG_NORM, the product of the corrections.
        """
        n = len(obs_table)
        values = {column: column_values(obs_table, column) for column in self.columns}
        table = Table({"OBS_ID": np.asarray(obs_table["OBS_ID"], dtype=np.int64)})
        index = []
        outside = np.zeros(n, dtype=bool)
        for column in self.columns:
            idx, out = assign_bins(values[column], self.bin_edges[column])
            index.append(idx)
            outside |= out
            table[f"{column}_BIN"] = idx
            if column in self.interpolate:
                x = interpolation_variable(column, values[column])
                lo, hi, w = interpolation_weights(x, interpolation_variable(column, self.centres[column]))
                table[f"{column}_LO"], table[f"{column}_HI"], table[f"{column}_W"] = lo, hi, w
        if np.any(outside):
            log.warning(
                f"Runs {[int(i) for i in table['OBS_ID'][outside]]} lie outside the bins of {self.columns}: "
                "they get the nearest bin."
            )
        flat = np.ravel_multi_index(index, self.shape) if self.columns else np.zeros(n, dtype=int)
        table["BKG_BIN"] = flat
        table["BKG_HDU"] = [self.bin_names[i] for i in flat]
        corrected = {c.column: column_values(obs_table, c.column) for c in self.corrections}
        table["BKG_NORM"] = self.correction_factor(corrected) * np.ones(n) if self.corrections else np.ones(n)
        return table

    def to_store_inputs(self, obs_table, interpolate=True):
        """Models and assignment for `~bkgtemplate.store.write_background_store`.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index of the store to write (every run gets a model).
        interpolate : bool, optional
            One model per run, interpolated and corrected for its conditions (HDU names
            "BKG_<OBS_ID>"). If False, one model per bin, each run taking the bin that holds it,
            without interpolation or corrections. Default is True.

        Returns
        -------
        models : dict of {str: `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`}
            Models by HDU name.
        assignment : `~astropy.table.Table`
            OBS_ID, BKG_HDU and the columns of `assign` (no name clashes with the obs index).
        """
        assignment = self.assign(obs_table)
        if not interpolate:
            if self.corrections or self.interpolate:
                log.warning(
                    "One model per bin: the interpolation and the corrections "
                    f"({', '.join(c.column for c in self.corrections) or 'none'}) are not applied to the runs."
                )
            models = {name: model for name, model in zip(self.bin_names, self.models)}
            return models, assignment
        needed = list(dict.fromkeys(self.columns + [c.column for c in self.corrections]))
        values = {column: column_values(obs_table, column) for column in needed}
        centres_x = {column: interpolation_variable(column, self.centres[column]) for column in self.columns}
        bins, weights = _bin_weights(
            self.bin_edges, centres_x, self.interpolate, {c: values[c] for c in self.columns}, n=len(obs_table)
        )
        factors = self.correction_factor({c.column: values[c.column] for c in self.corrections})
        factors = np.broadcast_to(factors, (len(obs_table),))
        models = {}
        names = []
        for i, obs_id in enumerate(assignment["OBS_ID"]):
            name = f"BKG_{int(obs_id)}"
            models[name] = self._combine(bins[i], weights[i], float(factors[i]), {c: values[c][i] for c in needed})
            names.append(name)
        assignment["BKG_HDU"] = names
        return models, assignment

    def to_hdulist(self):
        """FITS HDUs: a primary HDU describing the collection, one HDU per bin, and the runs.

        Returns
        -------
        hdulist : `~astropy.io.fits.HDUList`
            Primary HDU (columns, interpolation, corrections), one BinTable HDU per bin (the
            model's ``to_table_hdu`` with BINCOLn, BINIDXn, BINLOn, BINHIn, BINCENn, BINUNIn in the
            header), and a RUNS table if known.
        """
        primary = fits.PrimaryHDU()
        header = primary.header
        header[_COLLECTION_KEY] = (True, "bkgtemplate background model collection")
        header["NBINCOL"] = (len(self.columns), "number of binned obs-index columns")
        for i, column in enumerate(self.columns, start=1):
            header[f"BINCOL{i}"] = column
            header[f"BINUNI{i}"] = self.units[column]
            header[f"NBIN{i}"] = len(self.bin_edges[column]) - 1
            header[f"INTERP{i}"] = (column in self.interpolate, "interpolated between bin centres")
        header["NCORR"] = (len(self.corrections), "number of rate corrections")
        for i, correction in enumerate(self.corrections, start=1):
            header[f"CORCOL{i}"] = correction.column
            header[f"CORKIND{i}"] = correction.kind
            header[f"CORREF{i}"] = correction.reference
            header[f"CORCOEF{i}"] = correction.coefficient
        hdus = [primary]
        for flat, (name, model) in enumerate(zip(self.bin_names, self.models)):
            hdu = model.to_table_hdu()
            hdu.name = name
            index = np.unravel_index(flat, self.shape) if self.columns else ()
            for i, (column, idx) in enumerate(zip(self.columns, index), start=1):
                hdu.header[f"BINCOL{i}"] = column
                hdu.header[f"BINUNI{i}"] = self.units[column]
                hdu.header[f"BINIDX{i}"] = int(idx)
                hdu.header[f"BINLO{i}"] = float(self.bin_edges[column][idx])
                hdu.header[f"BINHI{i}"] = float(self.bin_edges[column][idx + 1])
                hdu.header[f"BINCEN{i}"] = float(self.centres[column][idx])
            hdus.append(hdu)
        if self.runs is not None:
            hdus.append(fits.BinTableHDU(Table(self.runs), name="RUNS"))
        return fits.HDUList(hdus)

    def write(self, filename, overwrite=False):
        """Write to a FITS file (see `to_hdulist`).

        Parameters
        ----------
        filename : str or `~pathlib.Path`
            File name.
        overwrite : bool, optional
            Overwrite an existing file. Default is False.
        """
        self.to_hdulist().writeto(make_path(filename), overwrite=overwrite)

    @classmethod
    def from_hdulist(cls, hdulist):
        """Collection from the HDUs written by `to_hdulist`."""
        header = hdulist[0].header
        if not header.get(_COLLECTION_KEY, False):
            raise ValueError(f"Not a background model collection: the primary header has no {_COLLECTION_KEY}.")
        columns = [header[f"BINCOL{i}"] for i in range(1, header["NBINCOL"] + 1)]
        units = {column: header[f"BINUNI{i}"] for i, column in enumerate(columns, start=1)}
        shape = tuple(header[f"NBIN{i}"] for i in range(1, len(columns) + 1))
        interpolate = tuple(column for i, column in enumerate(columns, start=1) if header[f"INTERP{i}"])
        corrections = [
            ConditionCorrection(
                column=header[f"CORCOL{i}"],
                kind=header[f"CORKIND{i}"],
                reference=float(header[f"CORREF{i}"]),
                coefficient=float(header[f"CORCOEF{i}"]),
            )
            for i in range(1, header["NCORR"] + 1)
        ]
        names = [_bin_name(columns, np.unravel_index(i, shape)) for i in range(int(np.prod(shape)))]
        edges = {column: np.full(n + 1, np.nan) for column, n in zip(columns, shape)}
        centres = {column: np.full(n, np.nan) for column, n in zip(columns, shape)}
        models = []
        for name in names:
            hdu = hdulist[name]
            kind = Background3D if hdu.header.get("HDUCLAS4") == "BKG_3D" else Background2D
            models.append(kind.from_table(Table.read(hdu)))
            for i, column in enumerate(columns, start=1):
                idx = hdu.header[f"BINIDX{i}"]
                edges[column][idx], edges[column][idx + 1] = hdu.header[f"BINLO{i}"], hdu.header[f"BINHI{i}"]
                centres[column][idx] = hdu.header[f"BINCEN{i}"]
        runs = Table.read(hdulist["RUNS"]) if "RUNS" in hdulist else None
        return cls(models, edges, centres, interpolate=interpolate, corrections=corrections, units=units, runs=runs)

    @classmethod
    def read(cls, filename):
        """Read a collection written by `write`.

        Parameters
        ----------
        filename : str or `~pathlib.Path`
            File name.

        Returns
        -------
        collection : `BackgroundModelCollection`
            The collection.
        """
        with fits.open(make_path(filename), memmap=False) as hdulist:
            return cls.from_hdulist(hdulist)


@dataclass
class _Layout:
    """Bins of a set of runs: edges and each run's bin, before any model is built."""

    edges: dict
    units: dict
    values: dict  # column -> per-run values
    cells: np.ndarray  # flat bin of each run

    @property
    def columns(self):
        return list(self.edges)

    @property
    def shape(self):
        return tuple(len(edges) - 1 for edges in self.edges.values())

    @property
    def n_cells(self):
        return int(np.prod(self.shape))

    @classmethod
    def make(cls, edges, units, values, obs_ids, warn=True):
        index, outside = [], np.zeros(len(obs_ids), dtype=bool)
        for column, column_edges in edges.items():
            idx, out = assign_bins(values[column], column_edges)
            index.append(idx)
            outside |= out
        if warn and np.any(outside):
            log.warning(
                f"Runs {[int(i) for i in np.asarray(obs_ids)[outside]]} lie outside the bins of {list(edges)}: "
                "they are put in the nearest bin."
            )
        cells = np.ravel_multi_index(index, tuple(len(e) - 1 for e in edges.values())) if edges else np.zeros(
            len(obs_ids), dtype=int
        )
        return cls(edges=edges, units=units, values=values, cells=np.asarray(cells, dtype=int))

    def describe(self, flat):
        index = np.unravel_index(flat, self.shape)
        parts = []
        for column, idx in zip(self.columns, index):
            lo, hi = self.edges[column][idx], self.edges[column][idx + 1]
            close = "]" if idx == len(self.edges[column]) - 2 else ")"
            unit = f" {self.units[column]}" if self.units[column] else ""
            parts.append(f"{column} [{lo:g}, {hi:g}{close}{unit}")
        return ", ".join(parts)

    def merged(self, flat, livetime, use):
        """Layout with the empty bin ``flat`` merged with a neighbour along the last column with > 1 bin."""
        index = np.unravel_index(flat, self.shape)
        for k in reversed(range(len(self.columns))):
            column = self.columns[k]
            n = self.shape[k]
            if n < 2:
                continue
            idx = index[k]
            # livetime in each bin of this column
            column_index = np.unravel_index(self.cells, self.shape)[k]
            per_bin = np.bincount(column_index[use], weights=livetime[use], minlength=n)
            neighbours = [j for j in (idx - 1, idx + 1) if 0 <= j < n]
            partner = min(neighbours, key=lambda j: (per_bin[j], j))
            # remove the edge between the bin and its partner
            drop = max(idx, partner)
            edges = dict(self.edges)
            edges[column] = np.delete(self.edges[column], drop)
            return column, partner, edges
        return None, None, None


class ObservingConditionsEstimator:
    """Estimate a `BackgroundModelCollection` over observing conditions.

    Each run's counts and exposure are filled once (`RunHistograms`); a bin's model is
    the estimator's model from the sums over the runs in that bin. Corrections are fitted
    jointly by maximising the Poisson likelihood of all runs' counts given the collection
    (the bins' rates depend on the coefficients through the corrected exposure).

    The defaults were chosen by held-out performance on the H.E.S.S. DL3 DR1 runs (see
    `bkgtemplate.evaluation`): the tutorial zenith bins, interpolated linearly in cos(zenith),
    with a fitted MUONEFF power law and a north-south azimuth term (``cos(AZ_PNT)``).

    Parameters
    ----------
    estimator : `~bkgtemplate.BackgroundModelEstimator`, optional
        Axes, exclusion, smoothing and parallel options of the models. Default is None (a
        default `BackgroundModelEstimator`, 2D).
    bins : dict of {str: list of float, `~astropy.units.Quantity` or int}, optional
        Bins per obs-index column: edges (in the column's unit, deg for ZEN_PNT) or a number of
        equal-livetime bins. Several columns make a grid. An empty dict gives one model.
        Default is ``{"ZEN_PNT": [0, 20, 40, 90]}``.
    interpolate : tuple of str, optional
        Binned columns interpolated between bin centres. Default is ("ZEN_PNT", "MUONEFF").
    corrections : dict of {str: {"power-law", "cos", "linear"}}, optional
        Fitted rate corrections per column (see `ConditionCorrection`). Default is
        ``{"MUONEFF": "power-law", "AZ_PNT": "cos"}``; give ``{}`` for none.
    merge_empty : bool, optional
        Merge a bin without runs with its neighbour (the one with less livetime) instead of
        raising `EmptyBinError`. In a grid of several columns the bin is merged along the last
        column that has more than one bin. Default is False.

    Notes
    -----
    Held-out bias ``|median(obs/pred) - 1|`` and scatter ``1.4826 x MAD(obs/pred)`` on the
    H.E.S.S. DL3 DR1 runs (E > 0.5 TeV, offsets < 2 deg, see `bkgtemplate.evaluation`): the 45 off
    runs by leave-one-out, the 45 Crab, PKS 2155-304 and MSH 15-52 runs from all off runs, and
    all 105 runs pooled (with the 15 RX J1713.7-3946 runs):

    ==========================================  =============  =============  =============
    configuration                               off runs       source fields  all pooled
    ==========================================  =============  =============  =============
    one model                                   0.141 / 0.339  0.505 / 0.356  0.060 / 0.553
    tutorial zenith bins, bin of the run        0.052 / 0.297  0.273 / 0.443  0.121 / 0.423
    tutorial bins, interpolated in cos(zenith)  0.003 / 0.150  0.082 / 0.098  0.072 / 0.183
    same + MUONEFF power law                    0.009 / 0.177  0.026 / 0.090  0.045 / 0.127
    same + cos(AZ_PNT)                          0.011 / 0.145  0.029 / 0.094  0.044 / 0.133
    same + both (the default)                   0.002 / 0.158  0.022 / 0.094  0.005 / 0.116
    MUONEFF bins [0.8, 0.97, 1.3] interpolated  0.003 / 0.142  0.185 / 0.159  0.129 / 0.246
    4 equal-livetime zenith bins + both         0.011 / 0.186  0.063 / 0.114  0.063 / 0.142
    ==========================================  =============  =============  =============

    Interpolation in cos(zenith) matters most (the rate above 0.5 TeV doubles from 10 to 50 deg).
    The fitted MUONEFF index (about 0.4) and the north-south term (about -0.1: runs pointing
    north have about 20 % less background than runs pointing south at the same zenith) come
    from the off runs alone. The off-run scatter stays near 0.15 with every configuration: a
    regression of it on all obs-index columns leaves 0.11 in-sample (weather is not in the index).

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate.conditions import ObservingConditionsEstimator
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> table = data_store.obs_table
    >>> off = table["OBS_ID"][table["TARGET_NAME"] == "Off data"]
    >>> maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]})
    >>> collection = maker.run(data_store, off)  # doctest: +SKIP
    >>> print(collection)  # doctest: +SKIP
    """

    tag = "ObservingConditionsEstimator"

    def __init__(self, estimator=None, bins=None, interpolate=None, corrections=None, merge_empty=False):
        if estimator is None:
            estimator = BackgroundModelEstimator()
        if not isinstance(estimator, BackgroundModelEstimator):
            raise TypeError(f"estimator must be a BackgroundModelEstimator, got {type(estimator).__name__}.")
        self.estimator = estimator
        bins = DEFAULT_BINS if bins is None else bins
        self.bins = {}
        for column, spec in bins.items():
            if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
                if spec < 1:
                    raise ValueError(f"The number of bins of {column} must be >= 1, got {spec}.")
                self.bins[column] = int(spec)
                continue
            if isinstance(spec, u.Quantity):
                spec = spec.to_value("deg" if spec.unit.physical_type == "angle" else spec.unit)
            edges = np.asarray(spec, dtype=float)
            if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
                raise ValueError(f"Bin edges of {column} must increase, with at least two edges; got {spec}.")
            self.bins[column] = edges
        self.interpolate = tuple(DEFAULT_INTERPOLATE if interpolate is None else interpolate)
        not_binned = [c for c in self.interpolate if c not in self.bins and c not in DEFAULT_INTERPOLATE]
        if not_binned:
            raise ValueError(f"Cannot interpolate in {not_binned}: they are not binned ({list(self.bins)}).")
        corrections = DEFAULT_CORRECTIONS if corrections is None else corrections
        for column, kind in corrections.items():
            if kind not in CORRECTION_KINDS:
                raise ValueError(f"Unknown correction {kind!r} for {column}; choose one of {CORRECTION_KINDS}.")
        self.corrections = dict(corrections)
        self.merge_empty = bool(merge_empty)

    def __str__(self):
        bins = {c: (v if isinstance(v, int) else v.tolist()) for c, v in self.bins.items()}
        return (
            f"{self.tag}: bins {bins}, interpolate {[c for c in self.interpolate if c in self.bins]}, "
            f"corrections {self.corrections}, merge_empty {self.merge_empty}"
        )

    def run(self, data_store, obs_ids=None):
        """Build the collection from runs of a data store.

        Parameters
        ----------
        data_store : `~gammapy.data.DataStore`
            Data store.
        obs_ids : list of int, optional
            Runs. Default is None (all runs).

        Returns
        -------
        collection : `BackgroundModelCollection`
            The collection.
        """
        return self.make_collection(self.fill_runs(data_store, obs_ids))

    def fill_runs(self, data_store, obs_ids=None):
        """Each run's counts and exposure with the estimator's axes and options (`RunHistograms.fill`)."""
        est = self.estimator
        return RunHistograms.fill(
            data_store,
            obs_ids,
            est.spec,
            on_error=est.on_error,
            n_jobs=est.n_jobs,
            parallel_backend=est.parallel_backend,
        )

    def make_bin_edges(self, obs_table):
        """Bin edges per column, equal-livetime bins computed from the runs of ``obs_table``.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs-index rows of the runs.

        Returns
        -------
        edges : dict of {str: `~numpy.ndarray`}
            Edges per column, in the column's unit.
        """
        edges = {}
        livetime = _livetime(obs_table)
        for column, spec in self.bins.items():
            values = column_values(obs_table, column)
            if isinstance(spec, int):
                edges[column] = equal_livetime_edges(values, livetime, spec)
            else:
                edges[column] = np.asarray(spec, dtype=float)
        return edges

    def make_collection(self, run_histograms):
        """Build the collection from filled run histograms.

        Parameters
        ----------
        run_histograms : `RunHistograms`
            Counts and exposure of each run.

        Returns
        -------
        collection : `BackgroundModelCollection`
            The collection.
        """
        return self._builder(run_histograms).build()

    def leave_one_out(self, run_histograms, obs_ids=None):
        """Collections each built without one run, from the same run histograms.

        The bin sums of all runs are computed once and each run's own counts and exposure are
        subtracted from its bin, which equals building without it. With corrections, the
        coefficients are refitted without the run. Equal-livetime edges are kept from all runs
        (they depend on the runs' conditions, not on their events). A bin left without runs is
        merged with its neighbour.

        Parameters
        ----------
        run_histograms : `RunHistograms`
            Counts and exposure of each run.
        obs_ids : list of int, optional
            Runs to leave out, one at a time. Default is None (every run).

        Yields
        ------
        obs_id, collection : int, `BackgroundModelCollection`
            The run left out and the collection built without it.
        """
        builder = self._builder(run_histograms)
        for obs_id in run_histograms.obs_ids if obs_ids is None else obs_ids:
            use = np.ones(len(run_histograms), dtype=bool)
            use[run_histograms.index([obs_id])[0]] = False
            yield int(obs_id), builder.build(use=use, merge_empty=True)

    def _builder(self, run_histograms):
        edges = self.make_bin_edges(run_histograms.obs_table)
        return _Builder(self, run_histograms, edges)


class _Builder:
    """Builds collections from run histograms for any subset of the runs (``use``)."""

    def __init__(self, maker, run_histograms, edges):
        self.maker = maker
        self.rh = run_histograms
        table = run_histograms.obs_table
        self.obs_ids = np.array(run_histograms.obs_ids)
        self.units = {column: _unit(table, column) for column in edges}
        missing = [column for column in maker.corrections if column not in table.colnames]
        if missing:
            raise KeyError(
                f"The obs table has no {missing} for the corrections {maker.corrections}; "
                "give corrections={} or other columns."
            )
        needed = list(dict.fromkeys(list(edges) + list(maker.corrections)))
        self.values = {column: column_values(table, column) for column in needed}
        for column, values in self.values.items():
            bad = self.obs_ids[~np.isfinite(values)]
            if len(bad):
                raise ValueError(f"Runs {[int(i) for i in bad]} have no valid {column} in the obs table.")
        self.livetime = run_histograms.livetime
        self.layout = _Layout.make(edges, self.units, self.values, self.obs_ids)
        shape = run_histograms.counts.shape
        self.counts = run_histograms.counts.reshape(shape[0], -1)
        self.exposure = run_histograms.exposure.to_value(EXPOSURE_UNIT).reshape(shape[0], -1)
        self._full = None

    def build(self, use=None, merge_empty=None):
        n = len(self.obs_ids)
        use = np.ones(n, dtype=bool) if use is None else np.asarray(use, dtype=bool)
        merge_empty = self.maker.merge_empty if merge_empty is None else merge_empty
        if not use.any():
            raise ValueError("No run to build the collection from.")
        layout = self.layout
        while True:
            n_runs = np.bincount(layout.cells[use], minlength=layout.n_cells)
            empty = np.flatnonzero(n_runs == 0)
            if not len(empty):
                break
            ranges = ", ".join(
                f"{column} {np.nanmin(self.values[column][use]):.4g}-{np.nanmax(self.values[column][use]):.4g}"
                + (f" {self.units[column]}" if self.units[column] else "")
                for column in layout.columns
            )
            if not merge_empty:
                raise EmptyBinError(
                    f"Bin {layout.describe(empty[0])} has no runs (the {int(use.sum())} runs span {ranges}); "
                    "change the bin edges or use merge_empty=True."
                )
            column, partner, edges = layout.merged(empty[0], self.livetime, use)
            if column is None:
                raise EmptyBinError(f"No runs to build any bin from (the runs span {ranges}).")
            log.info(f"Bin {layout.describe(empty[0])} has no runs: merged with {column} bin {partner}.")
            layout = _Layout.make(edges, self.units, self.values, self.obs_ids, warn=False)

        centres_x = self._centres(layout, use)
        weights_matrix = self._weights_matrix(layout, centres_x, use)
        corrections = self._fit_corrections(layout, weights_matrix, use)
        factors = self._factors(corrections)
        counts, exposure = self._cell_sums(layout, use, factors)
        return self._collection(layout, centres_x, corrections, counts, exposure, use)

    def _centres(self, layout, use):
        """Per column and bin: livetime-weighted mean of the interpolation variable."""
        centres = {}
        index = np.unravel_index(layout.cells, layout.shape) if layout.columns else ()
        for k, column in enumerate(layout.columns):
            x = interpolation_variable(column, self.values[column])
            n = layout.shape[k]
            weight = np.bincount(index[k][use], weights=self.livetime[use], minlength=n)
            total = np.bincount(index[k][use], weights=(self.livetime * x)[use], minlength=n)
            centres[column] = total / weight
        return centres

    def _interpolated(self, layout):
        return [column for column in layout.columns if column in self.maker.interpolate]

    def _weights_matrix(self, layout, centres_x, use):
        """Interpolation weights of each used run on each bin, shape (n_used, n_cells)."""
        values = {column: self.values[column][use] for column in layout.columns}
        n_used = int(use.sum())
        bins, weights = _bin_weights(layout.edges, centres_x, self._interpolated(layout), values, n=n_used)
        matrix = np.zeros((n_used, layout.n_cells))
        rows = np.repeat(np.arange(n_used), bins.shape[1])
        np.add.at(matrix, (rows, bins.ravel()), weights.ravel())
        return matrix

    def _references(self, use):
        return {
            column: ConditionCorrection.reference_of(kind, self.values[column][use], self.livetime[use])
            for column, kind in self.maker.corrections.items()
        }

    def _fit_corrections(self, layout, weights_matrix, use):
        if not self.maker.corrections:
            return []
        references = self._references(use)
        template = [
            ConditionCorrection(column, kind, references[column]) for column, kind in self.maker.corrections.items()
        ]
        g = np.array([c.variable(self.values[c.column][use]) for c in template])  # (k, n_used)
        counts, exposure = self.counts[use], self.exposure[use]
        cells = layout.cells[use]
        one_hot = np.zeros((layout.n_cells, len(cells)))
        one_hot[cells, np.arange(len(cells))] = 1
        counts_cell = one_hot @ counts
        has_data = counts > 0

        def negative_log_likelihood(coefficients):
            factor = np.exp(coefficients @ g)
            exposure_cell = one_hot @ (exposure * factor[:, None])
            with np.errstate(divide="ignore", invalid="ignore"):
                rate = np.where(exposure_cell > 0, counts_cell / exposure_cell, 0.0)
            mu = (weights_matrix @ rate) * factor[:, None] * exposure
            good = mu > 0
            return float(np.sum(mu[good]) - np.sum(counts[good & has_data] * np.log(mu[good & has_data])))

        start = np.zeros(len(template))
        result = minimize(
            negative_log_likelihood,
            start,
            method="Nelder-Mead",
            options=dict(xatol=1e-4, fatol=1e-3, maxiter=2000),
        )
        if not result.success:
            log.warning(f"The correction fit did not converge ({result.message}); using its last values.")
        return [replace(c, coefficient=float(value)) for c, value in zip(template, result.x)]

    def _factors(self, corrections):
        factors = np.ones(len(self.obs_ids))
        for correction in corrections:
            factors = factors * correction.factor(self.values[correction.column])
        return factors

    def _cell_sums(self, layout, use, factors):
        """Counts and corrected exposure summed per bin over the used runs."""
        uncorrected = not np.any(factors != 1)
        if uncorrected and layout is self.layout:
            # sums over all runs once, then subtract the runs left out
            if self._full is None:
                self._full = self._sums(layout, np.ones(len(self.obs_ids), dtype=bool), factors)
            counts, exposure = (array.copy() for array in self._full)
            for i in np.flatnonzero(~use):
                counts[layout.cells[i]] -= self.counts[i]
                exposure[layout.cells[i]] -= self.exposure[i]
            # sums of non-negative terms: clip the rounding residue of a subtraction
            return np.maximum(counts, 0), np.maximum(exposure, 0)
        return self._sums(layout, use, factors)

    def _sums(self, layout, use, factors):
        counts = np.zeros((layout.n_cells, self.counts.shape[1]))
        exposure = np.zeros_like(counts)
        np.add.at(counts, layout.cells[use], self.counts[use])
        np.add.at(exposure, layout.cells[use], self.exposure[use] * factors[use, None])
        return counts, exposure

    def _collection(self, layout, centres_x, corrections, counts, exposure, use):
        axes = self.rh.axes
        models = []
        for cell in range(layout.n_cells):
            members = use & (layout.cells == cell)
            histograms = BackgroundHistograms(
                axes=axes,
                counts=counts[cell].reshape(axes.shape),
                exposure=exposure[cell].reshape(axes.shape) * EXPOSURE_UNIT,
                fov_alignment=self.rh.fov_alignment,
                obs_ids=[int(i) for i in self.obs_ids[members]],
            )
            model = self.maker.estimator.make_model(histograms)
            model.meta["LIVETIME"] = float(self.livetime[members].sum())
            models.append(model)
        runs = Table(
            {
                "OBS_ID": self.obs_ids[use].astype(np.int64),
                "BKG_BIN": layout.cells[use].astype(np.int64),
                "LIVETIME": self.livetime[use] * u.s,
            }
        )
        for column in dict.fromkeys(layout.columns + [c.column for c in corrections]):
            runs[column] = self.values[column][use]
        centres = {column: _from_interpolation_variable(column, x) for column, x in centres_x.items()}
        return BackgroundModelCollection(
            models,
            layout.edges,
            centres,
            interpolate=tuple(self._interpolated(layout)),
            corrections=corrections,
            units=layout.units,
            runs=runs,
        )

