"""Bins of observing conditions: which bin holds a run, and interpolation between bin centres.

Pure functions on obs-index columns (zenith ``ZEN_PNT``, ``MUONEFF`` or any numeric column):
`column_values` reads a column, `assign_bins` finds the bin of each value,
`interpolation_weights` gives the two bins a value is interpolated between (in cos(zenith) for
``ZEN_PNT``, see `interpolation_variable`) and `equal_livetime_edges` makes bins of equal
livetime. Besides the obs-index columns, `column_values` derives ``NORTH_PNT``, the north
component of the pointing direction (see `north_component`). Used by
`~bkgtemplate.conditions.BackgroundModelCollection` and
`~bkgtemplate.conditions.ObservingConditionsEstimator`.
"""

import logging
from dataclasses import dataclass
import numpy as np
import astropy.units as u

__all__ = [
    "DERIVED_COLUMNS",
    "EmptyBinError",
    "assign_bins",
    "column_values",
    "equal_livetime_edges",
    "interpolation_variable",
    "interpolation_weights",
    "north_component",
    "source_columns",
]

log = logging.getLogger(__name__)

ZENITH = "ZEN_PNT"
MUONEFF = "MUONEFF"
AZIMUTH = "AZ_PNT"
NORTH = "NORTH_PNT"
TUTORIAL_ZENITH_EDGES = (0.0, 20.0, 40.0, 90.0)
"""Zenith bin edges of the original gammapy tutorial, in deg."""
DEFAULT_BINS = {ZENITH: TUTORIAL_ZENITH_EDGES}
DEFAULT_INTERPOLATE = (ZENITH, MUONEFF)


class EmptyBinError(ValueError):
    """A bin of observing conditions holds no run."""


def north_component(zenith, azimuth):
    """North component of the unit vector toward the pointing, ``sin(zenith) cos(azimuth)``.

    It is +sin(zenith) pointing north, -sin(zenith) pointing south and 0 at the zenith, where
    the azimuth has no meaning. The geomagnetic field acts on the showers through the angle
    between their axis and the field, whose cosine is a sum of cos(zenith) and this term (for
    a field in the magnetic meridian); a correction in it is the north-south asymmetry of the
    background that vanishes toward the zenith.

    Parameters
    ----------
    zenith, azimuth : `~numpy.ndarray`
        Zenith angle and azimuth (from north through east), in deg.

    Returns
    -------
    north : `~numpy.ndarray`
        North component, in [-1, 1].

    Examples
    --------
    >>> from bkgtemplate.conditions import north_component
    >>> north_component([30, 30, 0], [0, 180, 90]).round(3)
    array([ 0.5, -0.5,  0. ])
    """
    zenith, azimuth = np.deg2rad(np.asarray(zenith, dtype=float)), np.deg2rad(np.asarray(azimuth, dtype=float))
    return np.sin(zenith) * np.cos(azimuth)


DERIVED_COLUMNS = {NORTH: ((ZENITH, AZIMUTH), north_component)}
"""Columns `column_values` computes from obs-index columns: name -> (source columns, function)."""


def source_columns(column):
    """The obs-index columns a column is read from: its sources if derived, else itself."""
    return DERIVED_COLUMNS[column][0] if column in DERIVED_COLUMNS else (column,)


def column_values(table, column):
    """Values of an obs-index column as floats, in the column's own unit (deg for angles).

    A column in `DERIVED_COLUMNS` that the table lacks is computed from its source columns.

    Parameters
    ----------
    table : `~astropy.table.Table` or `~astropy.table.Row`
        Obs index (or rows of it, or one row).
    column : str
        Column name, e.g. "ZEN_PNT", or a derived column ("NORTH_PNT").

    Returns
    -------
    values : `~numpy.ndarray`
        Values, NaN where masked.
    """
    if column not in table.colnames and column in DERIVED_COLUMNS:
        sources, function = DERIVED_COLUMNS[column]
        return function(*(column_values(table, source) for source in sources))
    if column not in table.colnames:
        raise KeyError(f"The obs table has no column {column!r}; it has {table.colnames}.")
    col = table[column]
    values = np.array(col, dtype=float)
    if np.ma.is_masked(col):
        values = np.where(np.ma.getmaskarray(col), np.nan, values)
    return values


def _unit(table, column):
    if column not in table.colnames and column in DERIVED_COLUMNS:
        return ""
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


def _describe_bin(edges, units, flat):
    """Readable label of flat bin ``flat``, e.g. "ZEN_PNT [0, 20) deg"."""
    shape = tuple(len(column_edges) - 1 for column_edges in edges.values())
    index = np.unravel_index(flat, shape)
    parts = []
    for column, idx in zip(edges, index):
        lo, hi = edges[column][idx], edges[column][idx + 1]
        close = "]" if idx == len(edges[column]) - 2 else ")"
        unit = f" {units[column]}" if units[column] else ""
        parts.append(f"{column} [{lo:g}, {hi:g}{close}{unit}")
    return ", ".join(parts)


@dataclass
class _Layout:
    """Bins of a set of runs: edges and each run's bin, before any model is built."""

    edges: dict
    units: dict
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
        return cls(edges=edges, units=units, cells=np.asarray(cells, dtype=int))

    def describe(self, flat):
        return _describe_bin(self.edges, self.units, flat)

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

