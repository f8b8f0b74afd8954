"""The background model estimator: runs of a data store in, a gammapy background IRF out."""

import logging
import numpy as np
import astropy.units as u
from astropy.table import Table
from gammapy.maps import MapAxis
from gammapy.utils.parallel import ParallelMixin, run_multiprocessing
from .exclusion import Exclusion
from .histograms import EXPOSURE_UNIT, BackgroundHistograms, HistogramSpec, fill_run
from .runs import RunError, collect_runs
from .smoothing import smooth_rate

__all__ = [
    "BackgroundModelEstimator",
    "map_run_chunks",
    "default_energy_axis",
    "default_fov_axes",
    "default_offset_axis",
    "make_energy_axis",
    "make_offset_axis",
]

log = logging.getLogger(__name__)

FOV_ALIGNMENTS = ["ALTAZ", "RADEC"]
ON_ERROR = ["raise", "skip"]
MAX_FOV_RADIUS = 10 * u.deg


def default_energy_axis():
    """Reconstructed energy axis: 0.1 to 100 TeV, 5 bins per decade."""
    return MapAxis.from_energy_bounds("0.1 TeV", "100 TeV", nbin=5, per_decade=True, name="energy")


def default_offset_axis():
    """Offset axis: 0 to 2.5 deg in 10 bins."""
    return MapAxis.from_bounds(0, 2.5, nbin=10, unit="deg", name="offset")


def default_fov_axes():
    """Field-of-view axes: -2.5 to 2.5 deg in 20 bins each."""
    return [MapAxis.from_bounds(-2.5, 2.5, nbin=20, unit="deg", name=name) for name in ("fov_lon", "fov_lat")]


def make_energy_axis(energy_min, energy_max, nbin):
    """Log-spaced reconstructed energy axis, with errors that name the bad parameter.

    Parameters
    ----------
    energy_min, energy_max : `~astropy.units.Quantity` or float
        Axis bounds; floats are in TeV.
    nbin : int
        Number of bins.

    Returns
    -------
    axis : `~gammapy.maps.MapAxis`
        Energy axis named "energy".
    """
    energy_min, energy_max = u.Quantity(energy_min, "TeV"), u.Quantity(energy_max, "TeV")
    if not 0 < energy_min < energy_max:
        raise ValueError(f"Need 0 < energy_min < energy_max, got energy_min={energy_min}, energy_max={energy_max}.")
    if int(nbin) < 1:
        raise ValueError(f"The number of energy bins must be at least 1, got {nbin}.")
    return MapAxis.from_energy_bounds(energy_min, energy_max, nbin=int(nbin), name="energy")


def make_offset_axis(offset_max, nbin):
    """Offset axis from 0 to ``offset_max`` in equal bins, with errors that name the bad parameter.

    Parameters
    ----------
    offset_max : `~astropy.units.Quantity` or float
        Largest offset; floats are in deg.
    nbin : int
        Number of bins.

    Returns
    -------
    axis : `~gammapy.maps.MapAxis`
        Offset axis named "offset".
    """
    offset_max = u.Quantity(offset_max, "deg")
    if not 0 * u.deg < offset_max <= MAX_FOV_RADIUS:
        raise ValueError(f"offset_max must be in (0, {MAX_FOV_RADIUS}] (an IACT field of view), got {offset_max}.")
    if int(nbin) < 1:
        raise ValueError(f"The number of offset bins must be at least 1, got {nbin}.")
    return MapAxis.from_bounds(0, offset_max.value, nbin=int(nbin), unit="deg", name="offset")


def _check_axis(axis, name, unit):
    if not isinstance(axis, MapAxis):
        raise TypeError(f"{name} must be a gammapy MapAxis, got {type(axis).__name__}.")
    if axis.name != name:
        raise ValueError(f"The {name} axis is named {axis.name!r}; name it {name!r}.")
    if not axis.unit.is_equivalent(unit):
        raise u.UnitsError(f"The {name} axis has unit {axis.unit}, expected a unit of {unit}.")
    if axis.nbin < 1:
        raise ValueError(f"The {name} axis has no bins.")
    return axis


def _fill_or_skip(run, spec, on_error):
    """Counts and exposure of a run, or, when skipping, the reason it could not be read."""
    try:
        return fill_run(run, spec)
    except RunError as error:
        if on_error == "raise":
            raise
        log.warning(f"{error} Run skipped.")
        return str(error)


def _sum_chunk(runs, spec, on_error):
    """Summed counts and exposure of a group of runs, the runs used and the runs skipped."""
    counts, exposure = np.zeros(spec.axes.shape), np.zeros(spec.axes.shape)
    done, skipped = [], []
    for run in runs:
        result = _fill_or_skip(run, spec, on_error)
        if isinstance(result, str):
            skipped.append((run.obs_id, result))
            continue
        counts += result[0]
        exposure += result[1]
        done.append(run.obs_id)
    return counts, exposure, done, skipped


def _each_chunk(runs, spec, on_error):
    """Counts and exposure of each run of a group kept apart, and the runs skipped."""
    results = [(run.obs_id, _fill_or_skip(run, spec, on_error)) for run in runs]
    skipped = [(obs_id, result) for obs_id, result in results if isinstance(result, str)]
    return [(obs_id, *result) for obs_id, result in results if not isinstance(result, str)], skipped


def map_run_chunks(worker, runs, spec, on_error="raise", n_jobs=1, parallel_backend=None):
    """Apply ``worker(chunk, spec, on_error)`` to groups of runs, in parallel with gammapy.

    A few interleaved groups per process: balanced load, a progress bar that moves, and a
    number of results (hence memory) that does not grow with the number of runs.

    Parameters
    ----------
    worker : callable
        Module-level function of (runs, spec, on_error), e.g. `_sum_chunk`.
    runs : list of `~bkgtemplate.runs.RunInfo`
        Runs.
    spec : `~bkgtemplate.histograms.HistogramSpec`
        What to histogram.
    on_error : {"raise", "skip"}, optional
        What to do with a run whose events cannot be read. Default is "raise".
    n_jobs : int, optional
        Number of processes. Default is 1.
    parallel_backend : {"multiprocessing", "ray"}, optional
        Parallel backend. Default is None (gammapy's default).

    Returns
    -------
    results : list
        The worker's result for each group.
    """
    n_chunks = min(len(runs), 8 * max(1, n_jobs))
    chunks = [runs[i::n_chunks] for i in range(n_chunks)]
    return run_multiprocessing(
        worker,
        [(chunk, spec, on_error) for chunk in chunks if chunk],
        backend=parallel_backend,
        pool_kwargs=dict(processes=n_jobs),
        task_name=f"Groups of runs ({len(runs)} runs)",
    )


class BackgroundModelEstimator(ParallelMixin):
    """Estimate a template background model from runs without strong gamma-ray sources.

    Counts and exposure are accumulated run by run and the rate is their ratio::

        rate = counts / (ONTIME x dE x dOmega)   [s-1 MeV-1 sr-1]

    with ONTIME (not dead-time corrected, as gammapy uses it to predict background) and
    exact bin solid angles. Each run contributes only in energy bins above its
    ``SAFE_ENERGY_LO``; exclusion regions remove events and the excluded fraction of each
    bin's solid angle, following the field rotation for ALTAZ 3D models.

    Parameters
    ----------
    energy_axis : `~gammapy.maps.MapAxis`, optional
        Reconstructed energy axis named "energy". Default is `default_energy_axis`.
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Offset axis named "offset", for a `~gammapy.irf.Background2D`. Default is
        `default_offset_axis` unless FoV axes are given.
    fov_lon_axis, fov_lat_axis : `~gammapy.maps.MapAxis`, optional
        Field-of-view axes named "fov_lon" and "fov_lat", for a `~gammapy.irf.Background3D`.
        Default is None (2D model).
    fov_alignment : {"ALTAZ", "RADEC"}, optional
        Alignment of the 3D field-of-view coordinates. Default is "ALTAZ".
    exclusion : list of `~regions.SkyRegion` or `~gammapy.maps.WcsNDMap`, optional
        Regions to cut out, or a boolean exclusion mask (True = kept). Default is None.
    safe_threshold : bool, optional
        Use each run's ``SAFE_ENERGY_LO`` from the obs index. Default is True.
    smooth_sigma : float, optional
        Gaussian smoothing width along the spatial axes, in bins (see `smooth_rate`).
        Default is None (no smoothing).
    on_error : {"raise", "skip"}, optional
        What to do with a run whose events cannot be read. Default is "raise".
    n_jobs : int, optional
        Number of processes. Default is None (gammapy's default, 1).
    parallel_backend : {"multiprocessing", "ray"}, optional
        Parallel backend. Default is None (gammapy's default, multiprocessing).

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate import BackgroundModelEstimator
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> obs_ids = data_store.obs_table["OBS_ID"][data_store.obs_table["TARGET_NAME"] == "Off data"]
    >>> bkg = BackgroundModelEstimator().run(data_store, obs_ids)
    >>> bkg.axes.names
    ['energy', 'offset']
    """

    tag = "BackgroundModelEstimator"

    def __init__(
        self,
        energy_axis=None,
        offset_axis=None,
        fov_lon_axis=None,
        fov_lat_axis=None,
        fov_alignment="ALTAZ",
        exclusion=None,
        safe_threshold=True,
        smooth_sigma=None,
        on_error="raise",
        n_jobs=None,
        parallel_backend=None,
    ):
        energy_axis = _check_axis(energy_axis or default_energy_axis(), "energy", "TeV")
        if (fov_lon_axis is None) != (fov_lat_axis is None):
            raise ValueError("Give both fov_lon_axis and fov_lat_axis for a 3D model, or neither.")
        if fov_lon_axis is not None:
            if offset_axis is not None:
                raise ValueError("Give either offset_axis (2D) or fov_lon_axis and fov_lat_axis (3D), not both.")
            spatial = (_check_axis(fov_lon_axis, "fov_lon", "deg"), _check_axis(fov_lat_axis, "fov_lat", "deg"))
        else:
            offset_axis = _check_axis(offset_axis or default_offset_axis(), "offset", "deg")
            if offset_axis.edges.min() < 0:
                raise ValueError(f"The offset axis starts at {offset_axis.edges.min()}; offsets are >= 0.")
            spatial = (offset_axis,)
        for axis in spatial:
            if np.abs(axis.edges).max() > MAX_FOV_RADIUS:
                raise ValueError(
                    f"The {axis.name} axis reaches {np.abs(axis.edges).max()}, beyond any IACT field of view ({MAX_FOV_RADIUS})."
                )
        if str(fov_alignment).upper() not in FOV_ALIGNMENTS:
            raise ValueError(f"Unknown fov_alignment {fov_alignment!r}; choose one of {FOV_ALIGNMENTS}.")
        if on_error not in ON_ERROR:
            raise ValueError(f"Unknown on_error {on_error!r}; choose one of {ON_ERROR}.")
        if smooth_sigma is not None and not smooth_sigma > 0:
            raise ValueError(f"smooth_sigma must be positive (in bins) or None, got {smooth_sigma}.")

        self.spec = HistogramSpec(
            energy_axis=energy_axis,
            spatial_axes=spatial,
            fov_alignment=str(fov_alignment).upper(),
            safe_threshold=bool(safe_threshold),
            exclusion=None if exclusion is None else Exclusion(exclusion),
        )
        self.smooth_sigma = smooth_sigma
        self.on_error = on_error
        self.n_jobs = n_jobs
        self.parallel_backend = parallel_backend

    def __str__(self):
        axes = ", ".join(f"{axis.name} ({axis.nbin} bins)" for axis in self.spec.axes)
        alignment = f", {self.spec.fov_alignment} aligned" if self.spec.is_3d else ""
        return f"{self.tag}: {axes}{alignment}, n_jobs {self.n_jobs}"

    def fill_histograms(self, data_store, obs_ids=None):
        """Counts and exposure summed over runs, one run in memory at a time.

        Parameters
        ----------
        data_store : `~gammapy.data.DataStore`
            Data store with the runs.
        obs_ids : list of int or `~gammapy.data.Observations`, optional
            Runs to use. Default is None (all runs of the store).

        Returns
        -------
        histograms : `~bkgtemplate.histograms.BackgroundHistograms`
            Counts, exposure and rate.
        """
        runs = collect_runs(data_store, obs_ids, safe_threshold=self.spec.safe_threshold)
        results = map_run_chunks(_sum_chunk, runs, self.spec, self.on_error, self.n_jobs, self.parallel_backend)
        counts = np.sum([result[0] for result in results], axis=0)
        exposure = np.sum([result[1] for result in results], axis=0)
        done = sorted(obs_id for result in results for obs_id in result[2])
        skipped = Table(rows=[row for result in results for row in result[3]] or None, names=["OBS_ID", "REASON"], dtype=[int, str])
        if len(skipped):
            log.warning(f"{len(skipped)} of {len(runs)} runs skipped: {[int(obs_id) for obs_id in skipped['OBS_ID']]}")
        if not done:
            raise RunError("No run could be used; see the warnings above for each run.")
        log.info(f"Background estimate from {len(done)} runs, {int(counts.sum())} events")
        return BackgroundHistograms(
            axes=self.spec.axes,
            counts=counts,
            exposure=exposure * EXPOSURE_UNIT,
            fov_alignment=self.spec.fov_alignment,
            obs_ids=done,
            skipped=skipped,
        )

    def run(self, data_store, obs_ids=None):
        """Estimate the background model.

        Parameters
        ----------
        data_store : `~gammapy.data.DataStore`
            Data store with the runs.
        obs_ids : list of int or `~gammapy.data.Observations`, optional
            Runs to use. Default is None (all runs of the store).

        Returns
        -------
        bkg : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
            Background model without NaN or inf (see `BackgroundHistograms.to_irf`).
        """
        return self.make_model(self.fill_histograms(data_store, obs_ids))

    def make_model(self, histograms):
        """Turn histograms into a background IRF, smoothing first if configured.

        Parameters
        ----------
        histograms : `~bkgtemplate.histograms.BackgroundHistograms`
            Counts and exposure.

        Returns
        -------
        bkg : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
            Background model.
        """
        rate = None if self.smooth_sigma is None else smooth_rate(histograms, self.smooth_sigma)
        return histograms.to_irf(rate=rate)
