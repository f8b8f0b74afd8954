"""`ObservingConditionsEstimator`: build a `BackgroundModelCollection` from runs.

Each run's counts and exposure are filled once (`RunHistograms`) and summed per bin of
observing conditions, so that a collection without one run (leave-one-out) costs a
subtraction, not a new pass over the events.
"""

import logging
import numpy as np
import astropy.units as u
from astropy.table import Table
from .collection import BackgroundModelCollection
from .condition_bins import (
    DEFAULT_BINS,
    DEFAULT_INTERPOLATE,
    EmptyBinError,
    _bin_weights,
    _from_interpolation_variable,
    _Layout,
    _livetime,
    _unit,
    column_values,
    equal_livetime_edges,
    interpolation_variable,
    source_columns,
)
from .corrections import CORRECTION_KINDS, DEFAULT_CORRECTIONS, DEFAULT_ENERGY_DEPENDENT, fit_corrections
from .estimator import BackgroundModelEstimator
from .histograms import EXPOSURE_UNIT, BackgroundHistograms
from .run_histograms import RunHistograms

__all__ = ["ObservingConditionsEstimator"]

log = logging.getLogger(__name__)


class ObservingConditionsEstimator:
    """Estimate a `BackgroundModelCollection` over observing conditions.

    Each run's counts and exposure are filled once (`RunHistograms`); a bin's model is
    the estimator's model from the sums over the runs in that bin. Corrections are fitted
    jointly by maximising the Poisson likelihood of all runs' counts given the collection
    (the bins' rates depend on the coefficients through the corrected exposure).

    The defaults were chosen by held-out performance on the H.E.S.S. DL3 DR1 runs (see
    `bkgtemplate.evaluation`): the tutorial zenith bins, interpolated linearly in cos(zenith);
    an energy-dependent correction in cos(zenith), which follows how fast the rate changes
    with zenith at each energy (steepest near the thresholds, where a bin's model is measured
    only by its lowest-zenith runs); a north-south term in ``NORTH_PNT`` =
    sin(zenith) cos(azimuth); and a MUONEFF power law.

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
        Fitted rate corrections per column (see `ConditionCorrection`), obs-index columns or
        the derived ``NORTH_PNT``. Default is
        ``{"ZEN_PNT": "cos", "NORTH_PNT": "linear", "MUONEFF": "power-law"}``; give ``{}`` for none.
    energy_dependent : tuple of str, optional
        Corrected columns whose correction gets one coefficient per energy bin; the others get
        one coefficient. Default is None (("ZEN_PNT",) if ZEN_PNT is corrected).
    merge_empty : bool, optional
        Merge a bin without runs with its neighbour (the one with less livetime) instead of
        raising `EmptyBinError`. In a grid of several columns the bin is merged along the last
        column that has more than one bin. Default is False.

    Notes
    -----
    Held-out bias ``|median(obs/pred) - 1|`` and scatter ``1.4826 x MAD(obs/pred)`` on the
    H.E.S.S. DL3 DR1 runs (E > 0.5 TeV, offsets < 2 deg, the default axes, see
    `bkgtemplate.evaluation`): the 45 off runs by leave-one-out, the 45 Crab, PKS 2155-304 and
    MSH 15-52 runs from all off runs, and these 90 runs together:

    ===============================================  =============  =============  =============
    configuration                                    off runs       source fields  together
    ===============================================  =============  =============  =============
    one model                                        0.141 / 0.339  0.505 / 0.355  0.149 / 0.653
    tutorial zenith bins, bin of the run             0.053 / 0.297  0.273 / 0.443  0.064 / 0.356
    tutorial bins, interpolated in cos(zenith)       0.003 / 0.150  0.082 / 0.099  0.040 / 0.133
    same + MUONEFF power law + cos(AZ_PNT)           0.003 / 0.158  0.022 / 0.094  0.018 / 0.108
    same + MUONEFF power law + NORTH_PNT             0.003 / 0.157  0.046 / 0.093  0.026 / 0.114
    same + energy-dependent zenith (the default)     0.003 / 0.111  0.001 / 0.085  0.000 / 0.095
    one model + the default corrections              0.009 / 0.125  0.021 / 0.090  0.017 / 0.101
    4 equal-livetime zenith bins + same              0.021 / 0.105  0.034 / 0.088  0.026 / 0.098
    released H.E.S.S. models (off runs not held out) 0.003 / 0.087  0.044 / 0.068  0.034 / 0.084
    ===============================================  =============  =============  =============

    Interpolation in cos(zenith) and the energy-dependent zenith correction matter most (the
    rate above 0.5 TeV doubles from 20 to 40 deg). ``NORTH_PNT`` describes the north-south
    asymmetry better than ``cos(AZ_PNT)``, which also acts on runs pointing at the zenith. The
    off runs predicted by a collection built from all of them (not held out) scatter by 0.110
    as well: the rest is run-to-run variation (weather) that the obs index does not record.
    A scatter from 45 runs is uncertain by about 0.015, and its third decimal moves by 0.002
    with the tolerance of the correction fit.

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

    def __init__(
        self, estimator=None, bins=None, interpolate=None, corrections=None, energy_dependent=None, merge_empty=False
    ):
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
        if energy_dependent is None:
            energy_dependent = [column for column in DEFAULT_ENERGY_DEPENDENT if column in self.corrections]
        uncorrected = [column for column in energy_dependent if column not in self.corrections]
        if uncorrected:
            raise ValueError(
                f"energy_dependent names {uncorrected}, which have no correction; "
                f"corrections are {list(self.corrections)}."
            )
        self.energy_dependent = tuple(energy_dependent)
        self.merge_empty = bool(merge_empty)

    def __str__(self):
        bins = {c: (v if isinstance(v, int) else v.tolist()) for c, v in self.bins.items()}
        return (
            f"{self.tag}: bins {bins}, interpolate {[c for c in self.interpolate if c in self.bins]}, "
            f"corrections {self.corrections}, energy-dependent {list(self.energy_dependent)}, "
            f"merge_empty {self.merge_empty}"
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
        missing = [
            source for column in maker.corrections for source in source_columns(column) if source not in table.colnames
        ]
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
        # (run, energy, pixel): corrections act per energy bin
        shape = run_histograms.counts.shape
        self.counts = run_histograms.counts.reshape(shape[0], shape[1], -1)
        self.exposure = run_histograms.exposure.to_value(EXPOSURE_UNIT).reshape(shape[0], shape[1], -1)
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
        corrections = fit_corrections(
            self.maker.corrections,
            {column: self.values[column][use] for column in self.maker.corrections},
            self.livetime[use],
            self.counts[use],
            self.exposure[use],
            layout.cells[use],
            weights_matrix,
            energy_dependent=self.maker.energy_dependent,
        )
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

    def _factors(self, corrections):
        """Correction factor of each run in each energy bin, shape (n_runs, n_energy)."""
        factors = np.ones(self.counts.shape[:2])
        for correction in corrections:
            factors = factors * correction.factor(self.values[correction.column]).reshape(len(self.obs_ids), -1)
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
        counts = np.zeros((layout.n_cells,) + self.counts.shape[1:])
        exposure = np.zeros_like(counts)
        np.add.at(counts, layout.cells[use], self.counts[use])
        np.add.at(exposure, layout.cells[use], self.exposure[use] * factors[use, :, None])
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

