"""Counts and exposure run by run: `fill_run` (pure, so runs fill in parallel) for one, `BackgroundHistograms` for
many, summed on demand (a model of all runs but one costs a sum, not a pass over the events)."""

from dataclasses import dataclass, field, replace
import numpy as np
import astropy.units as u
from astropy.table import Table
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxes
from .data import read_events
from .geometry import (SIDEREAL_RATE, bin_points, fov_altaz_to_radec, fov_radec_to_sky, offset_haversine,
    parallactic_angle, ring_points, sky_to_fov_altaz, sky_to_fov_radec)

__all__ = ["EDGE_RTOL", "EXPOSURE_UNIT", "RATE_UNIT", "REVERSE_LON_RADEC", "BackgroundHistograms", "background_irf",
    "fill_run", "skipped_table"]

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")
EXPOSURE_UNIT = u.Unit("s MeV sr")
# Relative slack when comparing bin edges with cuts (SAFE_ENERGY_LO: float32 values in the files).
EDGE_RTOL = 1e-6
# gammapy's alignment of the released H.E.S.S. DR1 models (set by Observation.bkg): RADEC with
# the longitude not reversed, i.e. the mirror image of gammapy's FoVICRSFrame.
REVERSE_LON_RADEC = "REVERSE_LON_RADEC"
# Axes with at most this many edges are binned by comparisons rather than a binary search.
MAX_COMPARED_EDGES = 64
# Spacing of the points that estimate excluded fractions of bins, largest field rotation per ALTAZ time step (rad).
EXCLUSION_SPACING = np.deg2rad(0.02)
ROTATION_STEP = np.deg2rad(1.0)


def _parallactic(run, time):
    hour_angle = run.hour_angle + SIDEREAL_RATE * (np.asarray(time) - run.tstart)
    return parallactic_angle(hour_angle, run.dec_apparent, run.latitude)


def _padded_index(values, edges):
    """Bin index + 1 of each value: 0 below the first edge (or NaN), ``len(edges)`` at or above the last."""
    # for a few edges, one comparison per edge: several times faster than numpy.searchsorted on unsorted values
    if len(edges) > MAX_COMPARED_EDGES:
        return np.searchsorted(edges, values, side="right")
    values = np.asarray(values, dtype=float)
    index = np.zeros(values.shape, dtype=np.int8)
    for edge in edges:
        index += values >= edge
    return index.astype(np.intp)


def _spatial_index(run, estimator, ra, dec, time):
    """Flat spatial index of each event in the axes padded with an under- and an overflow bin."""
    edges = estimator.binning["spatial_edges"]
    if not estimator.is_3d:
        return _padded_index(offset_haversine(ra, dec, run.ra_pnt, run.dec_pnt), edges[0])
    if estimator.fov_alignment == "ALTAZ":
        lon, lat = sky_to_fov_altaz(ra, dec, run.ra_pnt, run.dec_pnt, _parallactic(run, time))
    else:
        lon, lat = sky_to_fov_radec(ra, dec, run.ra_pnt, run.dec_pnt)
        if estimator.fov_alignment == REVERSE_LON_RADEC:
            lon = -lon
    return _padded_index(lon, edges[0]) * (len(edges[1]) + 1) + _padded_index(lat, edges[1])


def rotation_steps(run, max_step):
    """Parallactic angles (rad) at the middle of equal time steps in which the field turns by < ``max_step``."""
    grid = np.linspace(run.tstart, run.tstop, 61)
    rotation = np.abs(np.diff(np.unwrap(_parallactic(run, grid)))).sum()
    edges = np.linspace(run.tstart, run.tstop, max(1, int(np.ceil(rotation / max_step))) + 1)
    return _parallactic(run, (edges[:-1] + edges[1:]) / 2)


def _kept_fraction(run, estimator):
    """Fraction of each spatial bin's solid angle outside the exclusion, averaged over the run."""
    n_spatial = len(estimator.binning["solid_angle"])
    edges = [axis.edges.to_value("rad") for axis in estimator.spatial_axes]
    lon, lat, index = (bin_points if estimator.is_3d else ring_points)(*edges, EXCLUSION_SPACING)
    lon = -lon if estimator.fov_alignment == REVERSE_LON_RADEC else lon  # rings are symmetric in lon
    angles = rotation_steps(run, ROTATION_STEP) if estimator.is_3d and estimator.fov_alignment == "ALTAZ" else [None]
    kept = np.zeros(n_spatial)
    for angle in angles:
        lon_radec, lat_radec = (lon, lat) if angle is None else fov_altaz_to_radec(lon, lat, angle)
        ra, dec = fov_radec_to_sky(lon_radec, lat_radec, run.ra_pnt, run.dec_pnt)
        excluded = estimator.exclusion.excluded(ra, dec, run.ra_pnt, run.dec_pnt)
        kept += np.bincount(index, weights=~excluded, minlength=n_spatial)
    return kept / np.bincount(index, minlength=n_spatial) / len(angles)


def fill_run(run, estimator):
    """Counts and exposure (ONTIME x dE x dOmega x kept fraction, s MeV sr) of one `~bkgtemplate.data.RunInfo` as a
    `~bkgtemplate.BackgroundModelEstimator` sets them up; both are zero below the run's safe threshold."""
    events, (ra_pnt, dec_pnt) = read_events(run)
    run = replace(run, ra_pnt=ra_pnt, dec_pnt=dec_pnt)
    binning, exclusion = estimator.binning, estimator.exclusion
    # one bincount over axes padded with under- and overflow bins, which are then cut off
    padded = tuple(len(edges) + 1 for edges in [binning["energy_edges"], *binning["spatial_edges"]])
    flat = _padded_index(events["energy"], binning["energy_edges"]) * int(np.prod(padded[1:]))
    flat += _spatial_index(run, estimator, events["ra"], events["dec"], events["time"])
    excluding = exclusion is not None and exclusion.touches(run.ra_pnt, run.dec_pnt, binning["max_radius"])
    if excluding:
        flat[exclusion.excluded(events["ra"], events["dec"], run.ra_pnt, run.dec_pnt)] = 0
    inner = (slice(1, -1),) * len(padded)
    counts = np.bincount(flat, minlength=int(np.prod(padded))).reshape(padded)[inner].astype(float)
    threshold = run.safe_energy_lo if estimator.safe_threshold else -np.inf
    used = binning["energy_edges"][:-1] >= threshold * (1 - EDGE_RTOL)
    counts[~used] = 0
    solid_angle = binning["solid_angle"] * (_kept_fraction(run, estimator) if excluding else 1.0)
    return counts, run.ontime * np.outer(binning["d_energy"] * used, solid_angle).reshape(counts.shape)


def skipped_table(rows=None):
    """Table of runs that could not be read: OBS_ID and REASON."""
    return Table(rows=rows or None, names=["OBS_ID", "REASON"], dtype=[int, str])


def background_irf(axes, counts, exposure, n_runs, fov_alignment="ALTAZ", smooth_sigma=None):
    """`~gammapy.irf.Background2D` or `~gammapy.irf.Background3D` of summed counts and exposure (s MeV sr), with meta
    NRUNS, NEVENTS and EMEASMIN (lowest energy with exposure, TeV); ``smooth_sigma`` is in spatial bins."""
    # empty energy bins beyond the data follow the FoV-averaged slope: a zero would collapse gammapy's log interpolation
    exposure = u.Quantity(exposure, EXPOSURE_UNIT).value
    if smooth_sigma is not None:
        if not smooth_sigma > 0:
            raise ValueError(f"smooth_sigma must be positive (in bins), got {smooth_sigma}.")
        sigmas = (0,) + (smooth_sigma,) * (counts.ndim - 1)
        counts, exposure = (gaussian_filter(a, sigmas, mode="nearest") for a in (counts, exposure))
    with np.errstate(divide="ignore", invalid="ignore"):
        data = np.where(exposure > 0, counts / exposure, 0.0)
    kwargs = dict(axes=axes, data=data, unit=RATE_UNIT)  # counts / (s MeV sr)
    bkg = Background3D(fov_alignment=fov_alignment, **kwargs) if "fov_lon" in axes.names else Background2D(**kwargs)
    bkg.interp_missing_data(axis_name="energy")
    filled = np.nan_to_num(bkg.data, nan=0.0, posinf=0.0, neginf=0.0)
    log_energy = np.log(axes["energy"].center.to_value("TeV"))
    fov_counts, fov_exposure = (array.reshape(len(array), -1).sum(axis=1) for array in (counts, exposure))
    slopes = _end_slopes(fov_counts, fov_exposure, log_energy)
    bkg.data = np.apply_along_axis(_extrapolate_ends, 0, filled, log_energy, slopes)
    bkg.meta.update({"NRUNS": n_runs, "NEVENTS": int(counts.sum())})
    measured = fov_exposure > 0
    if measured.any():
        bkg.meta["EMEASMIN"] = float(axes["energy"].edges[:-1][measured][0].to_value("TeV"))
    return bkg


def _extrapolate_ends(rate, log_energy, slopes):
    """Zeros before the first and after the last positive rate filled with power laws of ``slopes``."""
    measured = np.flatnonzero(rate > 0)
    if len(measured) == 0:
        return rate
    first, last = measured[0], measured[-1]
    rate = rate.copy()
    rate[:first] = rate[first] * np.exp(slopes[0] * (log_energy[:first] - log_energy[first]))
    rate[last + 1:] = rate[last] * np.exp(slopes[1] * (log_energy[last + 1:] - log_energy[last]))
    return rate


def _end_slopes(counts, exposure, log_energy, min_counts=10):
    """Slopes of the FoV-averaged rate (counts and exposure summed over the FoV) at both ends, never rising away."""
    good = np.flatnonzero((counts >= min_counts) & (exposure > 0))
    if len(good) < 2:
        return 0.0, 0.0
    log_rate = np.log(counts[good] / exposure[good])
    low = (log_rate[1] - log_rate[0]) / (log_energy[good[1]] - log_energy[good[0]])
    high = (log_rate[-1] - log_rate[-2]) / (log_energy[good[-1]] - log_energy[good[-2]])
    return min(low, 0.0), min(high, 0.0)


@dataclass
class BackgroundHistograms:
    """Counts and exposure (ONTIME x dE x dOmega, s MeV sr), shape ``(n_runs, *axes.shape)``, of each run, with its
    obs-index row; ``skipped`` lists unreadable runs; sums on demand, e.g. ``.select(ids).to_irf()``."""

    axes: MapAxes
    counts: np.ndarray
    exposure: u.Quantity
    obs_table: Table
    fov_alignment: str = "ALTAZ"
    skipped: Table = field(default_factory=skipped_table)

    def __post_init__(self):
        if self.counts.shape != self.exposure.shape or self.counts.shape[1:] != self.axes.shape:
            raise ValueError(f"Counts {self.counts.shape} and exposure {self.exposure.shape} do not match "
                             f"(n_runs, {self.axes.shape}).")
        if len(self.obs_table) != len(self.counts):
            raise ValueError(f"{len(self.obs_table)} obs-table rows for {len(self.counts)} runs.")

    def __len__(self):
        return len(self.counts)

    @property
    def obs_ids(self):
        """Run numbers, as a list of int."""
        return [int(obs_id) for obs_id in self.obs_table["OBS_ID"]]

    @property
    def livetime(self):
        """LIVETIME of each run (ONTIME if there is no LIVETIME column), in s."""
        name = "LIVETIME" if "LIVETIME" in self.obs_table.colnames else "ONTIME"
        livetime = u.Quantity(self.obs_table[name], "s").to_value("s").astype(float)
        if np.any(bad := ~(livetime > 0)):
            raise ValueError(f"Runs {np.array(self.obs_ids)[bad].tolist()} have {name} <= 0 or NaN; fix or drop them.")
        return livetime

    def select(self, obs_ids):
        """The histograms of some runs, in the given order."""
        position = {obs_id: i for i, obs_id in enumerate(self.obs_ids)}
        if missing := [int(obs_id) for obs_id in obs_ids if int(obs_id) not in position]:
            raise KeyError(f"Runs {missing} are not in these histograms.")
        if not len(obs_ids):
            raise ValueError("The run selection is empty.")
        idx = [position[int(obs_id)] for obs_id in obs_ids]
        return replace(self, counts=self.counts[idx], exposure=self.exposure[idx], obs_table=self.obs_table[idx])

    def sum(self, weights=None):
        """Counts and exposure summed over the runs; ``weights`` multiply each run's exposure (a rate correction)."""
        exposure = self.exposure.to_value(EXPOSURE_UNIT)
        if weights is not None:
            exposure = exposure * np.reshape(weights, np.shape(weights) + (1,) * (exposure.ndim - np.ndim(weights)))
        return self.counts.sum(axis=0), exposure.sum(axis=0) * EXPOSURE_UNIT

    @property
    def rate(self):
        """Summed rate counts / exposure, NaN where there is no exposure, in s-1 MeV-1 sr-1."""
        counts, exposure = self.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.where(exposure.value > 0, counts / exposure.value, np.nan) / exposure.unit).to(RATE_UNIT)

    @property
    def relative_error(self):
        """Relative statistical error of the summed rate, 1 / sqrt(counts), NaN without counts."""
        counts = self.counts.sum(axis=0)
        with np.errstate(divide="ignore"):
            return np.where(counts > 0, 1 / np.sqrt(counts), np.nan)

    def fov_lat_slope(self, offset_max=2.0, smooth_bins=2.0):
        """d ln(rate) / d fov_lat per energy bin (1/deg) of ALTAZ histograms: log(upper / lower half's rate within
        ``offset_max`` deg) over the distance of their mean fov_lat, averaged over neighbouring energy bins (Gaussian
        of ``smooth_bins``) with inverse-variance weights: where few events measure it, it follows its neighbours."""
        if "fov_lat" not in self.axes.names or self.fov_alignment != "ALTAZ":
            raise ValueError(f"fov_lat_slope needs ALTAZ 3D histograms, not {self.axes.names} ({self.fov_alignment}).")
        counts, exposure = self.sum()
        lon, lat = np.meshgrid(*(self.axes[c].center.to_value("deg") for c in ("fov_lon", "fov_lat")), indexing="ij")
        halves = [(np.hypot(lon, lat) < offset_max) & side for side in (lat < 0, lat > 0)]
        (n_low, n_up), (x_low, x_up) = ([a[:, half].sum(axis=1) for half in halves] for a in (counts, exposure.value))
        distance = lat[halves[1]].mean() - lat[halves[0]].mean()
        measured = (n_low > 0) & (n_up > 0) & (x_low * x_up > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(measured, np.log(n_up * x_low / (n_low * x_up)) / distance, 0.0)
            weight = np.where(measured, distance**2 / (1 / n_low + 1 / n_up), 0.0)  # 1 / variance (Poisson)
        smoothed = [gaussian_filter1d(a, smooth_bins, mode="nearest") for a in (weight * slope, weight)]
        return np.divide(*smoothed, out=np.zeros(len(weight)), where=smoothed[1] > 0)

    def to_irf(self, weights=None, smooth_sigma=None):
        """The model of the summed runs (`background_irf`); ``weights`` (per run, or run and energy) scale exposure."""
        return background_irf(self.axes, *self.sum(weights), len(self), self.fov_alignment, smooth_sigma)
