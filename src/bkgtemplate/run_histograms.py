"""Counts and exposure of each run separately (`RunHistograms`), filled once and summed at will.

Collections over observing conditions and held-out checks sum any set of runs from these
without reading events again: leaving one run out costs a subtraction, not a new pass over
the events.
"""

import logging
from dataclasses import dataclass, field, replace
import numpy as np
import astropy.units as u
from astropy.table import Table
from gammapy.maps import MapAxes
from .condition_bins import _livetime
from .estimator import BackgroundModelEstimator, _each_chunk, map_run_chunks
from .histograms import EXPOSURE_UNIT, BackgroundHistograms
from .runs import RunError, collect_runs, obs_table_rows

__all__ = ["RunHistograms"]

log = logging.getLogger(__name__)


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

