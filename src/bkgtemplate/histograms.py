"""Counts and exposure histograms: filled run by run, summed, turned into a rate.

The filling is written as pure functions of a `RunInfo` and a `HistogramSpec`, so that
runs can be processed in any order and in parallel and the sums are the same.
"""

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
import numpy as np
import astropy.units as u
from astropy.table import Table
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxes, MapAxis
from .exclusion import Exclusion, bin_points, ring_points
from .fov import (
    SIDEREAL_RATE,
    _offset_haversine,
    _sky_to_fov_altaz,
    fov_altaz_to_radec,
    fov_radec_to_sky,
    fov_solid_angle,
    offset_solid_angle,
    parallactic_angle,
    sky_to_fov_radec,
)
from .runs import read_events

__all__ = ["HistogramSpec", "BackgroundHistograms", "fill_run"]

log = logging.getLogger(__name__)

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")
EXPOSURE_UNIT = u.Unit("s MeV sr")
# Relative slack when comparing bin edges with SAFE_ENERGY_LO (float32 values in the files).
THRESHOLD_RTOL = 1e-6
# gammapy's alignment of the released H.E.S.S. DR1 models (set by Observation.bkg): RADEC with
# the longitude not reversed, i.e. the mirror image of gammapy's FoVICRSFrame.
REVERSE_LON_RADEC = "REVERSE_LON_RADEC"
# Axes with at most this many edges are binned by comparisons rather than a binary search.
MAX_COMPARED_EDGES = 64


@dataclass(frozen=True)
class HistogramSpec:
    """What to histogram: the axes, the FoV alignment, thresholds and exclusion.

    Parameters
    ----------
    energy_axis : `~gammapy.maps.MapAxis`
        Reconstructed energy axis.
    spatial_axes : tuple of `~gammapy.maps.MapAxis`
        ``(offset,)`` for a 2D model or ``(fov_lon, fov_lat)`` for a 3D model.
    fov_alignment : {"ALTAZ", "RADEC", "REVERSE_LON_RADEC"}
        Alignment of 3D field-of-view coordinates; "REVERSE_LON_RADEC" is how gammapy reads
        the released H.E.S.S. DR1 models.
    safe_threshold : bool
        Use only energy bins above each run's ``SAFE_ENERGY_LO``.
    exclusion : `~bkgtemplate.exclusion.Exclusion` or None
        Regions cut out of counts and exposure.
    exclusion_spacing : float
        Spacing of the points that estimate excluded solid-angle fractions, in rad.
    rotation_step : float
        Largest field rotation within one time step for ALTAZ exclusion, in rad.
    """

    energy_axis: MapAxis
    spatial_axes: tuple
    fov_alignment: str = "ALTAZ"
    safe_threshold: bool = True
    exclusion: Exclusion = None
    exclusion_spacing: float = np.deg2rad(0.02)
    rotation_step: float = np.deg2rad(1.0)

    @property
    def is_3d(self):
        return len(self.spatial_axes) == 2

    @property
    def axes(self):
        return MapAxes([self.energy_axis, *self.spatial_axes])

    @property
    def solid_angle(self):
        if self.is_3d:
            return fov_solid_angle(*self.spatial_axes)
        return offset_solid_angle(self.spatial_axes[0])

    @property
    def max_radius(self):
        """Largest angular distance of a bin corner from the pointing, in rad."""
        if self.is_3d:
            lon, lat = (np.abs(axis.edges.to_value("rad")).max() for axis in self.spatial_axes)
            return float(np.hypot(lon, lat))
        return float(self.spatial_axes[0].edges.to_value("rad").max())

    @cached_property
    def _binning(self):
        """Plain arrays of the axes that every run uses, converted from quantities once per spec."""
        spatial_edges = [axis.edges.to_value("rad") for axis in self.spatial_axes]
        if not self.is_3d:
            # offsets are binned in sin(offset / 2) ** 2, see `_spatial_index`
            spatial_edges = [np.sin(spatial_edges[0] / 2) ** 2]
        return dict(
            energy_edges=self.energy_axis.edges.to_value("TeV"),
            d_energy=self.energy_axis.bin_width.to_value("MeV"),
            spatial_edges=spatial_edges,
            solid_angle=self.solid_angle.to_value("sr").ravel(),
        )


def _used_energy_bins(run, spec):
    if not spec.safe_threshold:
        return np.ones(spec.energy_axis.nbin, dtype=bool)
    e_lo = spec._binning["energy_edges"][:-1]
    return e_lo >= run.safe_energy_lo * (1 - THRESHOLD_RTOL)


def _parallactic(run, time):
    hour_angle = run.hour_angle + SIDEREAL_RATE * (np.asarray(time) - run.tstart)
    return parallactic_angle(hour_angle, run.dec_apparent, run.latitude)


def _spatial_index(run, spec, ra, dec, time):
    """Flat spatial index of each event in the axes padded with an under- and an overflow bin."""
    edges = spec._binning["spatial_edges"]
    if not spec.is_3d:
        # sin(offset / 2) ** 2 increases with the offset: binned without inverse trigonometry
        return _padded_index(_offset_haversine(ra, dec, run.ra_pnt, run.dec_pnt), edges[0])
    if spec.fov_alignment == "ALTAZ":
        lon, lat = _sky_to_fov_altaz(ra, dec, run.ra_pnt, run.dec_pnt, _parallactic(run, time))
    else:
        lon, lat = sky_to_fov_radec(ra, dec, run.ra_pnt, run.dec_pnt)
        if spec.fov_alignment == REVERSE_LON_RADEC:
            lon = -lon
    return _padded_index(lon, edges[0]) * (len(edges[1]) + 1) + _padded_index(lat, edges[1])


def _padded_index(values, edges):
    """Bin index + 1 of each value: 0 below the first edge, ``len(edges)`` at or above the last.

    For a few edges, one comparison per edge: branch-free, and several times faster than
    `numpy.searchsorted` on unsorted values. NaN falls in the under- or the overflow bin.
    """
    if len(edges) > MAX_COMPARED_EDGES:
        return np.searchsorted(edges, values, side="right")
    values = np.asarray(values, dtype=float)
    index = np.zeros(values.shape, dtype=np.int8)
    for edge in edges:
        index += values >= edge
    return index.astype(np.intp)


def _kept_fraction(run, spec):
    """Fraction of each spatial bin's solid angle outside the exclusion, averaged over the run."""
    n_spatial = int(np.prod([axis.nbin for axis in spec.spatial_axes]))
    if spec.is_3d:
        edges = [axis.edges.to_value("rad") for axis in spec.spatial_axes]
        lon, lat, index = bin_points(*edges, spec.exclusion_spacing)
        if spec.fov_alignment == REVERSE_LON_RADEC:
            lon = -lon
    else:
        lon, lat, index = ring_points(spec.spatial_axes[0].edges.to_value("rad"), spec.exclusion_spacing)
    angles = [None]
    if spec.is_3d and spec.fov_alignment == "ALTAZ":
        angles = _rotation_steps(run, spec.rotation_step)
    kept = np.zeros(n_spatial)
    for angle in angles:
        lon_radec, lat_radec = (lon, lat) if angle is None else fov_altaz_to_radec(lon, lat, angle)
        ra, dec = fov_radec_to_sky(lon_radec, lat_radec, run.ra_pnt, run.dec_pnt)
        excluded = spec.exclusion.excluded(ra, dec, run.ra_pnt, run.dec_pnt)
        kept += np.bincount(index, weights=~excluded, minlength=n_spatial)
    return kept / np.bincount(index, minlength=n_spatial) / len(angles)


def _rotation_steps(run, max_step):
    """Parallactic angles at the middle of equal time steps in which the field turns by < ``max_step``."""
    grid = np.linspace(run.tstart, run.tstop, 61)
    rotation = np.abs(np.diff(np.unwrap(_parallactic(run, grid)))).sum()
    n_steps = max(1, int(np.ceil(rotation / max_step)))
    edges = np.linspace(run.tstart, run.tstop, n_steps + 1)
    return _parallactic(run, (edges[:-1] + edges[1:]) / 2)


def fill_run(run, spec):
    """Counts and exposure of one run.

    Parameters
    ----------
    run : `~bkgtemplate.runs.RunInfo`
        The run.
    spec : `HistogramSpec`
        What to histogram.

    Returns
    -------
    counts : `~numpy.ndarray`
        Event counts per bin.
    exposure : `~numpy.ndarray`
        ONTIME x dE x dOmega (kept fraction) per bin, in s MeV sr; zero in energy bins
        below the run's safe threshold.
    """
    events, (ra_pnt, dec_pnt) = read_events(run)
    run = replace(run, ra_pnt=ra_pnt, dec_pnt=dec_pnt)
    binning = spec._binning

    # one bincount over axes padded with under- and overflow bins, which are then cut off
    padded = tuple(len(edges) + 1 for edges in [binning["energy_edges"], *binning["spatial_edges"]])
    flat = _padded_index(events["energy"], binning["energy_edges"]) * int(np.prod(padded[1:]))
    flat += _spatial_index(run, spec, events["ra"], events["dec"], events["time"])
    excluding = spec.exclusion is not None and spec.exclusion.touches(run.ra_pnt, run.dec_pnt, spec.max_radius)
    if excluding:
        flat[spec.exclusion.excluded(events["ra"], events["dec"], run.ra_pnt, run.dec_pnt)] = 0
    inner = (slice(1, -1),) * len(padded)
    counts = np.bincount(flat, minlength=int(np.prod(padded))).reshape(padded)[inner].astype(float)

    used = _used_energy_bins(run, spec)
    counts[~used] = 0
    d_energy = binning["d_energy"] * used
    solid_angle = binning["solid_angle"] * (_kept_fraction(run, spec) if excluding else 1.0)
    exposure = run.ontime * np.outer(d_energy, solid_angle).reshape(counts.shape)
    return counts, exposure


def _extrapolate_ends(rate, log_energy, slopes):
    """Fill the zeros before the first and after the last positive rate with power laws.

    ``slopes`` are the logarithmic slopes used below and above the measured range.
    """
    measured = np.flatnonzero(rate > 0)
    if len(measured) == 0:
        return rate
    rate = rate.copy()
    for end, outside, slope in [
        (measured[0], slice(0, measured[0]), slopes[0]),
        (measured[-1], slice(measured[-1] + 1, None), slopes[1]),
    ]:
        rate[outside] = rate[end] * np.exp(slope * (log_energy[outside] - log_energy[end]))
    return rate


@dataclass
class BackgroundHistograms:
    """Counts and exposure of a background estimate, and the rate they give.

    Parameters
    ----------
    axes : `~gammapy.maps.MapAxes`
        Energy and spatial axes (offset, or fov_lon and fov_lat).
    counts : `~numpy.ndarray`
        Event counts per bin.
    exposure : `~astropy.units.Quantity`
        ONTIME x dE x dOmega per bin, in s MeV sr.
    fov_alignment : {"ALTAZ", "RADEC"}
        Alignment of 3D field-of-view coordinates.
    obs_ids : list of int
        Runs that contributed.
    skipped : `~astropy.table.Table`
        Runs skipped, with the reason.
    """

    axes: MapAxes
    counts: np.ndarray
    exposure: u.Quantity
    fov_alignment: str = "ALTAZ"
    obs_ids: list = field(default_factory=list)
    skipped: Table = field(default_factory=lambda: Table(names=["OBS_ID", "REASON"], dtype=[int, str]))

    @property
    def is_3d(self):
        return "fov_lon" in self.axes.names

    @property
    def rate(self):
        """Background rate counts / exposure, NaN where there is no exposure, in s-1 MeV-1 sr-1."""
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(self.exposure.value > 0, self.counts / self.exposure.value, np.nan)
        return (rate / self.exposure.unit).to(RATE_UNIT)

    @property
    def rate_error(self):
        """Poisson error sqrt(counts) / exposure, in s-1 MeV-1 sr-1."""
        return self.rate * np.where(self.counts > 0, 1 / np.sqrt(np.maximum(self.counts, 1)), np.nan)

    @property
    def relative_error(self):
        """Relative statistical error 1 / sqrt(counts), NaN where there are no counts."""
        with np.errstate(divide="ignore"):
            return np.where(self.counts > 0, 1 / np.sqrt(self.counts), np.nan)

    def to_irf(self, rate=None):
        """Background IRF with the missing bins filled.

        Bins without counts or exposure between measured energies are filled by gammapy's
        ``interp_missing_data`` along energy (linear in log rate). Below the first and above
        the last measured energy of each spatial bin the rate is extrapolated as a power law
        with the slope of the field-of-view averaged spectrum at that end (`_end_slopes`):
        gammapy interpolates the model in log rate between bin centres, so a zero next to a
        measured bin would make it predict almost no background in the outer half of that
        bin. Spatial bins
        never observed are set to zero. ``EMEASMIN`` in the meta is the lowest energy (TeV)
        with exposure: below it the model is an extrapolation.

        Parameters
        ----------
        rate : `~astropy.units.Quantity`, optional
            Rate to use instead of counts / exposure (e.g. a smoothed one). Default is None.

        Returns
        -------
        bkg : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
            The model, with no NaN or inf.
        """
        rate = self.rate if rate is None else rate.to(RATE_UNIT)
        data = np.where(np.isfinite(rate.value), rate.value, 0.0)
        kwargs = dict(axes=self.axes, data=data, unit=RATE_UNIT)
        if self.is_3d:
            bkg = Background3D(fov_alignment=self.fov_alignment, **kwargs)
        else:
            bkg = Background2D(**kwargs)
        missing = bkg.data == 0
        bkg.interp_missing_data(axis_name="energy")
        filled = np.nan_to_num(bkg.data, nan=0.0, posinf=0.0, neginf=0.0)
        log_energy = np.log(self.axes["energy"].center.to_value("TeV"))
        bkg.data = np.apply_along_axis(_extrapolate_ends, 0, filled, log_energy, self._end_slopes(log_energy))
        n_filled = int(np.sum(missing & (bkg.data > 0)))
        n_zero = int(np.sum(bkg.data == 0))
        if n_filled or n_zero:
            log.info(f"{n_filled} empty bins filled along energy, {n_zero} of {bkg.data.size} bins set to zero")
        bkg.meta.update(self.meta)
        return bkg

    def _end_slopes(self, log_energy, min_counts=10):
        """Spectral slopes at the low and high end of the field-of-view averaged rate.

        Each from the two outermost energy bins with at least ``min_counts`` events (single
        events would make the slope arbitrary), and never rising away from the measured range.
        """
        counts = self.counts.reshape(len(self.counts), -1).sum(axis=1)
        exposure = self.exposure.value.reshape(len(self.counts), -1).sum(axis=1)
        good = np.flatnonzero((counts >= min_counts) & (exposure > 0))
        if len(good) < 2:
            return 0.0, 0.0
        log_rate = np.log(counts[good] / exposure[good])
        low = (log_rate[1] - log_rate[0]) / (log_energy[good[1]] - log_energy[good[0]])
        high = (log_rate[-1] - log_rate[-2]) / (log_energy[good[-1]] - log_energy[good[-2]])
        return min(low, 0.0), min(high, 0.0)

    @property
    def meta(self):
        """Header keywords: number of runs and events, lowest energy with exposure, FOVALIGN."""
        meta = {"NRUNS": len(self.obs_ids), "NEVENTS": int(self.counts.sum())}
        measured = self.exposure.value.reshape(len(self.exposure), -1).sum(axis=1) > 0
        if measured.any():
            meta["EMEASMIN"] = float(self.axes["energy"].edges[:-1][measured][0].to_value("TeV"))
        if self.is_3d:
            meta["FOVALIGN"] = self.fov_alignment
        return meta
