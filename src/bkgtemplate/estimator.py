"""The background model estimator: runs of a data store in, a gammapy background IRF out."""

import logging
from copy import copy
from functools import cached_property
import numpy as np
import astropy.units as u
from gammapy.makers import Maker
from gammapy.maps import MapAxes, MapAxis
from gammapy.utils.parallel import ParallelMixin, run_multiprocessing
from .data import RunError, collect_runs, obs_table_rows
from .geometry import Exclusion, fov_solid_angle, offset_solid_angle
from .histograms import EXPOSURE_UNIT, REVERSE_LON_RADEC, BackgroundHistograms, background_irf, fill_run, skipped_table

__all__ = ["BackgroundModelEstimator", "default_energy_axis", "default_fov_axes", "default_offset_axis",
    "make_energy_axis", "make_offset_axis"]

log = logging.getLogger(__name__)

FOV_ALIGNMENTS = ["ALTAZ", "RADEC", REVERSE_LON_RADEC]
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


def _check_nbin(nbin, name):
    if isinstance(nbin, bool) or not isinstance(nbin, (int, np.integer)) or nbin < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {nbin!r}.")
    return int(nbin)


def make_energy_axis(energy_min, energy_max, nbin):
    """Log-spaced energy axis named "energy" (bounds as quantities or floats in TeV)."""
    energy_min, energy_max = u.Quantity(energy_min, "TeV"), u.Quantity(energy_max, "TeV")
    if not 0 < energy_min < energy_max:
        raise ValueError(f"Need 0 < energy_min < energy_max, got energy_min={energy_min}, energy_max={energy_max}.")
    nbin = _check_nbin(nbin, "The number of energy bins")
    return MapAxis.from_energy_bounds(energy_min, energy_max, nbin=nbin, name="energy")


def make_offset_axis(offset_max, nbin):
    """Offset axis named "offset", 0 to ``offset_max`` (quantity or float in deg) in equal bins."""
    offset_max = u.Quantity(offset_max, "deg")
    if not 0 * u.deg < offset_max <= MAX_FOV_RADIUS:
        raise ValueError(f"offset_max must be in (0, {MAX_FOV_RADIUS}] (an IACT field of view), got {offset_max}.")
    nbin = _check_nbin(nbin, "The number of offset bins")
    return MapAxis.from_bounds(0, offset_max.value, nbin=nbin, unit="deg", name="offset")


def _check_axis(axis, name, unit):
    if not isinstance(axis, MapAxis):
        raise TypeError(f"{name} must be a gammapy MapAxis, got {type(axis).__name__}.")
    if axis.name != name:
        raise ValueError(f"The {name} axis is named {axis.name!r}; name it {name!r}.")
    if not axis.unit.is_equivalent(unit):
        raise u.UnitsError(f"The {name} axis has unit {axis.unit}, expected a unit of {unit}.")
    if name != "energy" and np.abs(axis.edges).max() > MAX_FOV_RADIUS:
        raise ValueError(f"The {name} axis reaches {np.abs(axis.edges).max()}, beyond an IACT field of view "
                         f"({MAX_FOV_RADIUS}).")
    if name == "offset" and axis.edges.min() < 0:
        raise ValueError(f"The offset axis starts at {axis.edges.min()}; offsets are >= 0.")
    return axis


def _fill_chunk(runs, estimator, summed):
    """Counts and exposure of each run of a group (or, if ``summed``, their sums), and the runs skipped."""
    obs_ids, counts, exposure, skipped = [], [], [], []
    for run in runs:
        try:
            run_counts, run_exposure = fill_run(run, estimator)
        except RunError as error:
            if estimator.on_error == "raise":
                raise
            log.warning(f"{error} Run skipped.")
            skipped.append((run.obs_id, str(error)))
            continue
        obs_ids.append(run.obs_id)
        if summed and counts:  # one sum per group, added in place: run()'s memory does not grow with the runs
            counts[0] += run_counts
            exposure[0] += run_exposure
        else:
            counts.append(run_counts)
            exposure.append(run_exposure)
    return obs_ids, counts, exposure, skipped


class BackgroundModelEstimator(Maker, ParallelMixin):
    """Estimate a template background model from runs without strong gamma-ray sources.

    The rate is counts / (ONTIME x dE x dOmega) in s-1 MeV-1 sr-1 summed over runs, with ONTIME (gammapy predicts
    background with it) and exact solid angles; a run adds to energy bins above its ``SAFE_ENERGY_LO``; exclusion
    removes events and the excluded fraction of each bin's solid angle (following the field rotation for ALTAZ).

    Parameters
    ----------
    energy_axis : `~gammapy.maps.MapAxis`, optional
        Reconstructed energy axis named "energy". Default is `default_energy_axis`.
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Axis named "offset", for a `~gammapy.irf.Background2D`. Default is `default_offset_axis` without FoV axes.
    fov_lon_axis, fov_lat_axis : `~gammapy.maps.MapAxis`, optional
        Axes named "fov_lon" and "fov_lat", for a `~gammapy.irf.Background3D`. Default is None.
    fov_alignment : {"ALTAZ", "RADEC", "REVERSE_LON_RADEC"}, optional
        Alignment of 3D coordinates (the last: the released H.E.S.S. models'). Default is "ALTAZ".
    exclusion : list of `~regions.SkyRegion` or `~gammapy.maps.WcsNDMap`, optional
        Regions to cut out, or a boolean exclusion mask (True = kept). Default is None.
    safe_threshold : bool, optional
        Use each run's ``SAFE_ENERGY_LO`` from the obs index. Default is True.
    smooth_sigma : float, optional
        Gaussian smoothing along the spatial axes, in bins. Default is None (no smoothing).
    on_error : {"raise", "skip"}, optional
        What to do with a run whose events cannot be read. Default is "raise".
    n_jobs : int, optional
        Number of processes. Default is None (gammapy's default, 1).
    parallel_backend : {"multiprocessing", "ray"}, optional
        Parallel backend. Default is None (gammapy's default, multiprocessing).
    """

    tag = "BackgroundModelEstimator"

    def __init__(self, energy_axis=None, offset_axis=None, fov_lon_axis=None, fov_lat_axis=None, fov_alignment="ALTAZ",
                 exclusion=None, safe_threshold=True, smooth_sigma=None, on_error="raise", n_jobs=None,
                 parallel_backend=None):
        self.energy_axis = _check_axis(energy_axis or default_energy_axis(), "energy", "TeV")
        if (fov_lon_axis is None) != (fov_lat_axis is None) or (fov_lon_axis is not None and offset_axis is not None):
            raise ValueError("Give either offset_axis (2D) or both fov_lon_axis and fov_lat_axis (3D).")
        if fov_lon_axis is None:
            self.spatial_axes = (_check_axis(offset_axis or default_offset_axis(), "offset", "deg"),)
        else:
            self.spatial_axes = tuple(_check_axis(axis, name, "deg") for axis, name in
                                      [(fov_lon_axis, "fov_lon"), (fov_lat_axis, "fov_lat")])
        if str(fov_alignment).upper() not in FOV_ALIGNMENTS:
            raise ValueError(f"Unknown fov_alignment {fov_alignment!r}; choose one of {FOV_ALIGNMENTS}.")
        if on_error not in ON_ERROR:
            raise ValueError(f"Unknown on_error {on_error!r}; choose one of {ON_ERROR}.")
        if smooth_sigma is not None and not smooth_sigma > 0:
            raise ValueError(f"smooth_sigma must be positive (in bins) or None, got {smooth_sigma}.")
        self.fov_alignment = str(fov_alignment).upper()
        self.exclusion = None if exclusion is None else Exclusion(exclusion)
        self.safe_threshold = bool(safe_threshold)
        self.smooth_sigma = smooth_sigma
        self.on_error = on_error
        self.n_jobs = None if n_jobs is None else _check_nbin(n_jobs, "n_jobs")
        self.parallel_backend = parallel_backend

    @property
    def is_3d(self):
        return len(self.spatial_axes) == 2

    @property
    def axes(self):
        """The energy and spatial axes, as `~gammapy.maps.MapAxes`."""
        return MapAxes([self.energy_axis, *self.spatial_axes])

    @cached_property
    def binning(self):
        """Plain arrays of the axes, converted once: edges (TeV, rad), dE (MeV), dOmega (sr), FoV radius (rad)."""
        edges = [axis.edges.to_value("rad") for axis in self.spatial_axes]
        solid_angle = fov_solid_angle(*self.spatial_axes) if self.is_3d else offset_solid_angle(*self.spatial_axes)
        return dict(energy_edges=self.energy_axis.edges.to_value("TeV"),
                    d_energy=self.energy_axis.bin_width.to_value("MeV"),
                    # offsets are binned in sin(offset / 2) ** 2, see `offset_haversine`
                    spatial_edges=edges if self.is_3d else [np.sin(edges[0] / 2) ** 2],
                    solid_angle=solid_angle.to_value("sr").ravel(),
                    max_radius=float(np.linalg.norm([np.abs(edge).max() for edge in edges])))

    def __str__(self):
        axes = ", ".join(f"{axis.name} ({axis.nbin} bins)" for axis in self.axes)
        alignment = f", {self.fov_alignment} aligned" if self.is_3d else ""
        return f"{self.tag}: {axes}{alignment}, n_jobs {self.n_jobs}"

    def _fill(self, data_store, obs_ids, exclusion, summed):
        """The runs, each group's `_fill_chunk` (filled in parallel) and the runs skipped."""
        estimator = self
        if exclusion is not None and not (isinstance(exclusion, (list, tuple)) and not exclusion):
            added = Exclusion(exclusion)  # checks the kind: a SkyCoord or pixel region is a TypeError
            if added.mask is not None or (self.exclusion is not None and self.exclusion.mask is not None):
                raise ValueError("Cannot combine an exclusion mask with other regions; give all regions to the "
                                 "estimator.")
            estimator = copy(self)
            estimator.exclusion = Exclusion([*(self.exclusion.regions if self.exclusion else []), *added.regions])
        runs = collect_runs(data_store, obs_ids, safe_threshold=self.safe_threshold)
        # a few interleaved groups per process: balanced load and a progress bar that moves
        n_chunks = min(len(runs), 8 * self.n_jobs)
        results = run_multiprocessing(_fill_chunk, [(runs[i::n_chunks], estimator, summed) for i in range(n_chunks)],
                                      backend=self.parallel_backend, pool_kwargs=dict(processes=self.n_jobs),
                                      task_name=f"Groups of runs ({len(runs)} runs)")
        skipped = [row for *_, rows in results for row in rows]
        if skipped:
            log.warning(f"{len(skipped)} of {len(runs)} runs skipped: {[row[0] for row in skipped]}")
        if len(skipped) == len(runs):
            raise RunError("No run could be used; see the warnings above for each run.")
        # a model of zeros would look like a result
        if not any(np.any(array > 0) for _, _, exposure, _ in results for array in exposure):
            low, high = min(run.safe_energy_lo for run in runs), max(run.safe_energy_lo for run in runs)
            edges = self.energy_axis.edges
            raise ValueError(f"No exposure kept: the runs' SAFE_ENERGY_LO ({low:.3g}-{high:.3g} TeV) lie above the "
                             f"energy axis ({edges[0]:.3g}-{edges[-1]:.3g}; check the threshold unit), "
                             "or the exclusion covers the field.")
        if not any(np.any(array > 0) for _, counts, _, _ in results for array in counts):
            raise ValueError(f"No event kept in {len(runs) - len(skipped)} runs: no event lies inside the axes "
                             "(energy range, field of view) outside the exclusion; check the axes and the event files.")
        return runs, results, skipped

    def fill(self, data_store, obs_ids=None, exclusion=None):
        """Counts and exposure of each run (`~bkgtemplate.histograms.BackgroundHistograms`), read in parallel, of
        ``obs_ids`` (run numbers or Observations; default all), ``exclusion`` regions added (e.g. field targets)."""
        runs, results, skipped = self._fill(data_store, obs_ids, exclusion, summed=False)
        skipped_ids = {row[0] for row in skipped}
        position = {obs_id: i for i, obs_id in enumerate(run.obs_id for run in runs if run.obs_id not in skipped_ids)}
        counts, exposure = np.empty((2, len(position), *self.axes.shape))
        for obs_ids, run_counts, run_exposure, _ in results:
            # one array each, filled while the workers' results are released: no second copy of every run
            while obs_ids:
                i = position[obs_ids.pop()]
                counts[i], exposure[i] = run_counts.pop(), run_exposure.pop()
        log.info(f"Counts and exposure of {len(position)} runs, {int(counts.sum())} events")
        return BackgroundHistograms(self.axes, counts, u.Quantity(exposure, EXPOSURE_UNIT, copy=False),
                                    obs_table_rows(data_store, [*position]), self.fov_alignment, skipped_table(skipped))

    def run(self, data_store, obs_ids=None):
        """The background model (`~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`) of runs of a store
        (``obs_ids`` as in `fill`); runs are summed as they are filled: the memory does not grow with their number."""
        runs, results, skipped = self._fill(data_store, obs_ids, None, summed=True)
        counts, exposure = (np.sum([array for chunk in results for array in chunk[k]], axis=0) for k in (1, 2))
        return background_irf(self.axes, counts, exposure * EXPOSURE_UNIT, len(runs) - len(skipped), self.fov_alignment,
                              self.smooth_sigma)
