"""A seeded simulated GADF DL3 archive with a known background truth.

`BackgroundTruth` is the detected background rate R(E, fov_lon, fov_lat; zenith, muoneff)
in s-1 MeV-1 sr-1: a power law in reconstructed energy with a low-energy roll-off that
moves up with zenith, a normalisation rising with zenith and MUONEFF, a radial fall-off
in offset and a gradient along the altitude direction of gammapy's ``FoVAltAzFrame``
(more background toward lower altitude). `BackgroundTruth.expected_rate` integrates it
over the bins of a model exactly as a template estimator averages it (ONTIME-weighted,
per-run safe thresholds), so an estimate made from the simulated events can be compared
with the truth bin by bin.

`simulate_archive` draws events from the truth for off runs and for wobble runs on a
simulated point source, and writes a data store gammapy reads with
``DataStore.from_dir(path)``. Event FoV coordinates are turned into RA/Dec with gammapy's
own frames, not with the fast formulas of `bkgtemplate.fov`, so that tests of the
estimator do not share code with the simulation.
"""

import gzip
import io
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.coordinates import ICRS, AltAz, EarthLocation, SkyCoord
from astropy.coordinates.erfa_astrom import ErfaAstromInterpolator, erfa_astrom
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from gammapy.irf import PSF3D, EffectiveAreaTable2D, EnergyDispersion2D
from gammapy.maps import MapAxis
from gammapy.utils.coordinates import FoVAltAzFrame
from .geometry import fov_solid_angle, offset_solid_angle

__all__ = [
    "RATE_UNIT",
    "HESS_SITE",
    "MJDREF",
    "SAFE_THRESHOLD_STEP",
    "SOURCE_POSITION",
    "SOURCE_AMPLITUDE",
    "SOURCE_INDEX",
    "BackgroundTruth",
    "simulate_archive",
]

log = logging.getLogger(__name__)

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")
"""Unit of background rates, as in GADF ``BKG`` HDUs."""

HESS_SITE = dict(GEOLON=16.5002222222222, GEOLAT=-23.2717777777778, ALTITUDE=1835.0)
"""H.E.S.S. site: longitude and latitude in deg, altitude in m."""

SOURCE_POSITION = SkyCoord(60.0, -30.0, unit="deg", frame="icrs")
"""Position of the simulated point source observed by the source runs."""

MJDREF = (51910, 0.000742870370370241)
"""Reference time (MJDREFI, MJDREFF) in TT of the archive, as in H.E.S.S. DL3 DR1."""

SAFE_THRESHOLD_STEP = 0.03
"""Safe thresholds are rounded up to this step in log10(E / TeV), like H.E.S.S. DR1 values."""

SOURCE_AMPLITUDE = 2e-11 * u.Unit("cm-2 s-1 TeV-1")
"""Differential flux at 1 TeV of the simulated point source (about 60 % of the Crab)."""

SOURCE_INDEX = 2.5
"""Power-law index of the simulated point source."""

# Simulated IRFs: analytic, shared by all runs except for the aeff threshold.
_AEFF_MAX = 1e5 * u.m**2
_AEFF_OFFSET_WIDTH = 2.0 * u.deg
_EDISP_SIGMA = 0.1
_PSF_SIGMA = 0.1 * u.deg
_WOBBLE_OFFSET = 0.5 * u.deg

_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
_ERFA_INTERPOLATION = 300 * u.s
_GZIP_LEVEL = 1


def _quadrature(lo, hi, n_sub):
    """Composite 8-point Gauss-Legendre nodes and weights on [lo, hi], broadcast over arrays.

    Returns arrays of shape ``lo.shape + (8 * n_sub,)``; an empty interval (hi <= lo) gets
    zero weights.
    """
    lo = np.asarray(lo, dtype=float)
    hi = np.maximum(np.asarray(hi, dtype=float), lo)
    edges = lo[..., None] + (hi - lo)[..., None] * np.linspace(0, 1, n_sub + 1)
    a, b = edges[..., :-1, None], edges[..., 1:, None]
    x = 0.5 * (a + b) + 0.5 * (b - a) * _GL_X
    w = 0.5 * (b - a) * _GL_W * np.ones_like(x)
    shape = lo.shape + (-1,)
    return x.reshape(shape), w.reshape(shape)


def _offset(fov_lon, fov_lat):
    """Angular distance from the FoV origin (rad), by the haversine formula (stable near 0)."""
    hav = np.sin(fov_lat / 2) ** 2 + np.cos(fov_lat) * np.sin(fov_lon / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))


def _quantity(value, unit, name):
    """``value`` as a Quantity in ``unit``, raising `~astropy.units.UnitsError` naming ``name``."""
    try:
        return u.Quantity(value).to(unit)
    except u.UnitConversionError as error:
        raise u.UnitsError(f"{name} = {value!r} is not convertible to {unit}.") from error


def _obs_column(obs_table, name, unit=None):
    if name not in obs_table.colnames:
        raise KeyError(f"The obs table has no {name} column; it is needed to evaluate the truth.")
    column = obs_table[name]
    if unit is None:
        return np.asarray(column, dtype=float)
    return u.Quantity(column.quantity if column.unit else column.data * u.Unit(unit)).to_value(unit)


@dataclass(frozen=True)
class BackgroundTruth:
    """Known background rate of the simulated archive, in s-1 MeV-1 sr-1.

    .. math::

        R = N \\, (\\cos z)^{-a_z} \\, m^{a_\\mu} \\, (E / E_0)^{-\\Gamma}
            \\, \\frac{1}{1 + (E_\\mathrm{th}(z) / E)^k}
            \\, \\exp\\left(-\\frac{r^2}{2 \\sigma^2}\\right) \\, (1 - g \\, \\mathrm{fov\\_lat})

    with :math:`E_\\mathrm{th}(z) = E_\\mathrm{th,0} (\\cos z)^{-a_\\mathrm{th}}`, the offset
    :math:`r` from the pointing and ``fov_lat`` in deg in gammapy's ``FoVAltAzFrame``
    (positive toward higher altitude). The rate is zero for :math:`r` above ``offset_max``
    and outside [``energy_min``, ``energy_max``]: that is the range the events are drawn in.
    It does not change during a run: each run is described by its mid-run zenith angle.

    Parameters
    ----------
    norm : `~astropy.units.Quantity`, optional
        Rate at ``reference_energy``, zenith 0, MUONEFF 1, at the FoV centre and without the
        roll-off. Default is '1.3e-4 s-1 MeV-1 sr-1'.
    reference_energy : `~astropy.units.Quantity`, optional
        Reference energy :math:`E_0`. Default is '1 TeV'.
    index : float, optional
        Power-law index :math:`\\Gamma`. Default is 2.7.
    threshold_energy : `~astropy.units.Quantity`, optional
        Roll-off energy at zenith 0, :math:`E_\\mathrm{th,0}`. Default is '0.15 TeV'.
    threshold_zenith_index : float, optional
        :math:`a_\\mathrm{th}` in :math:`E_\\mathrm{th} \\propto (\\cos z)^{-a_\\mathrm{th}}`.
        Default is 2.5.
    rolloff_index : float, optional
        Sharpness :math:`k` of the roll-off. Default is 4.
    zenith_index : float, optional
        :math:`a_z`, normalisation rising with zenith at fixed energy. Default is 1.
    muoneff_index : float, optional
        :math:`a_\\mu`, rate proportional to MUONEFF to this power. Default is 1.5.
    radial_width : `~astropy.units.Quantity`, optional
        Width :math:`\\sigma` of the Gaussian fall-off in offset. Default is '1.5 deg'.
    offset_max : `~astropy.units.Quantity`, optional
        Largest offset of an event. Default is '2.8 deg'.
    altaz_gradient : `~astropy.units.Quantity`, optional
        Gradient :math:`g` along ``fov_lat`` of the ``FoVAltAzFrame``; must stay below
        ``1 / offset_max``. Default is '0.1 deg-1'.
    energy_min, energy_max : `~astropy.units.Quantity`, optional
        Energy range of the events. Default is '0.1 TeV' and '100 TeV'.
    safe_threshold_factor : float, optional
        Each run's ``SAFE_ENERGY_LO`` is this factor times :math:`E_\\mathrm{th}(z)`, rounded
        up to a step of 0.03 in log10(E / TeV). Default is 2.

    Examples
    --------
    >>> import astropy.units as u
    >>> from bkgtemplate.simulate import BackgroundTruth
    >>> truth = BackgroundTruth()
    >>> rate = truth.evaluate(1 * u.TeV, 0 * u.deg, 0 * u.deg, zenith=20 * u.deg, muoneff=1.0)
    >>> rate.unit
    Unit("1 / (MeV s sr)")
    """

    norm: u.Quantity = field(default_factory=lambda: 1.3e-4 * RATE_UNIT)
    reference_energy: u.Quantity = field(default_factory=lambda: 1.0 * u.TeV)
    index: float = 2.7
    threshold_energy: u.Quantity = field(default_factory=lambda: 0.15 * u.TeV)
    threshold_zenith_index: float = 2.5
    rolloff_index: float = 4.0
    zenith_index: float = 1.0
    muoneff_index: float = 1.5
    radial_width: u.Quantity = field(default_factory=lambda: 1.5 * u.deg)
    offset_max: u.Quantity = field(default_factory=lambda: 2.8 * u.deg)
    altaz_gradient: u.Quantity = field(default_factory=lambda: 0.1 / u.deg)
    energy_min: u.Quantity = field(default_factory=lambda: 0.1 * u.TeV)
    energy_max: u.Quantity = field(default_factory=lambda: 100.0 * u.TeV)
    safe_threshold_factor: float = 2.0

    def __post_init__(self):
        units = dict(
            norm=RATE_UNIT,
            reference_energy=u.TeV,
            threshold_energy=u.TeV,
            radial_width=u.deg,
            offset_max=u.deg,
            altaz_gradient=u.Unit("deg-1"),
            energy_min=u.TeV,
            energy_max=u.TeV,
        )
        for name, unit in units.items():
            object.__setattr__(self, name, _quantity(getattr(self, name), unit, name))
        if not 0 < self.offset_max.to_value("deg") < 180:
            raise ValueError(f"offset_max = {self.offset_max} must be in (0, 180) deg.")
        if abs(self.altaz_gradient * self.offset_max) >= 1:
            raise ValueError(
                f"altaz_gradient = {self.altaz_gradient} makes the rate negative inside "
                f"offset_max = {self.offset_max}: use |altaz_gradient| < 1 / offset_max."
            )
        if not 0 < self.energy_min < self.energy_max:
            raise ValueError(f"Need 0 < energy_min < energy_max, got {self.energy_min} and {self.energy_max}.")

    def to_dict(self):
        """Parameters as a dict of floats and strings (quantities as strings), e.g. for metadata."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    # -- factors -------------------------------------------------------------------------

    def rolloff_energy(self, zenith):
        """Roll-off energy :math:`E_\\mathrm{th}(z)`.

        Parameters
        ----------
        zenith : `~astropy.units.Quantity`
            Zenith angle.

        Returns
        -------
        energy : `~astropy.units.Quantity`
            Roll-off energy, in TeV.
        """
        cos_z = np.cos(_quantity(zenith, u.rad, "zenith").value)
        return self.threshold_energy * cos_z ** (-self.threshold_zenith_index)

    def efficiency(self, energy, zenith):
        """Low-energy roll-off :math:`1 / (1 + (E_\\mathrm{th}(z) / E)^k)`, dimensionless."""
        ratio = (self.rolloff_energy(zenith) / _quantity(energy, u.TeV, "energy")).to_value("")
        return 1.0 / (1.0 + ratio**self.rolloff_index)

    def normalisation(self, zenith, muoneff):
        """Rate at the reference energy and FoV centre without roll-off, in s-1 MeV-1 sr-1."""
        cos_z = np.cos(_quantity(zenith, u.rad, "zenith").value)
        return self.norm * cos_z ** (-self.zenith_index) * np.asarray(muoneff, float) ** self.muoneff_index

    def safe_energy_threshold(self, zenith):
        """Safe energy threshold of a run: ``safe_threshold_factor`` x E_th(z), rounded up.

        Parameters
        ----------
        zenith : `~astropy.units.Quantity`
            Zenith angle.

        Returns
        -------
        energy : `~astropy.units.Quantity`
            Threshold in TeV, on a grid of step 0.03 in log10(E / TeV).
        """
        log_e = np.log10(self.safe_threshold_factor * self.rolloff_energy(zenith).to_value("TeV"))
        steps = np.ceil(np.round(log_e / SAFE_THRESHOLD_STEP, 9))
        return 10 ** (steps * SAFE_THRESHOLD_STEP) * u.TeV

    def _spectrum(self, energy, zenith):
        """Energy dependence (E/E0)^-index x efficiency, dimensionless; TeV and rad floats."""
        e_th = self.threshold_energy.to_value("TeV") * np.cos(zenith) ** (-self.threshold_zenith_index)
        inside = (energy >= self.energy_min.to_value("TeV")) & (energy <= self.energy_max.to_value("TeV"))
        power = (energy / self.reference_energy.to_value("TeV")) ** (-self.index)
        return np.where(inside, power / (1.0 + (e_th / energy) ** self.rolloff_index), 0.0)

    def _spatial(self, fov_lon, fov_lat):
        """Spatial factor, dimensionless; FoV coordinates in rad (FoVAltAzFrame)."""
        offset = _offset(fov_lon, fov_lat)
        width = self.radial_width.to_value("rad")
        gradient = self.altaz_gradient.to_value("rad-1")
        inside = offset <= self.offset_max.to_value("rad")
        return np.where(inside, np.exp(-0.5 * (offset / width) ** 2) * (1 - gradient * fov_lat), 0.0)

    def evaluate(self, energy, fov_lon, fov_lat, zenith, muoneff):
        """Background rate at the given reconstructed energy and FoV position.

        All inputs broadcast against each other.

        Parameters
        ----------
        energy : `~astropy.units.Quantity`
            Reconstructed energy.
        fov_lon, fov_lat : `~astropy.units.Quantity`
            Coordinates in gammapy's ``FoVAltAzFrame`` (longitude reversed, origin at the
            pointing, ``fov_lat`` positive toward higher altitude).
        zenith : `~astropy.units.Quantity`
            Zenith angle of the pointing.
        muoneff : float or `~numpy.ndarray`
            Muon efficiency (``MUONEFF``), dimensionless.

        Returns
        -------
        rate : `~astropy.units.Quantity`
            Rate, in s-1 MeV-1 sr-1.
        """
        energy = _quantity(energy, u.TeV, "energy").value
        zenith = _quantity(zenith, u.rad, "zenith").value
        spectrum = self._spectrum(energy, zenith)
        spatial = self._spatial(
            _quantity(fov_lon, u.rad, "fov_lon").value, _quantity(fov_lat, u.rad, "fov_lat").value
        )
        return self.normalisation(zenith * u.rad, muoneff) * spectrum * spatial

    # -- integrals -----------------------------------------------------------------------

    def _energy_integral(self, energy_lo, energy_hi, zenith):
        """Integral of `_spectrum` over [energy_lo, energy_hi] (TeV arrays), in TeV.

        Composite Gauss-Legendre in log E with sub-intervals of at most 0.1 in ln E.
        """
        e_min, e_max = self.energy_min.to_value("TeV"), self.energy_max.to_value("TeV")
        lo = np.log(np.clip(energy_lo, e_min, e_max))
        hi = np.maximum(np.log(np.clip(energy_hi, e_min, e_max)), lo)
        n_sub = max(1, math.ceil(np.max(hi - lo, initial=0) / 0.1))
        log_e, weights = _quadrature(lo, hi, n_sub)
        energy = np.exp(log_e)
        values = self._spectrum(energy, np.asarray(zenith)[..., None]) * energy
        return np.sum(values * weights, axis=-1)

    def _ring_integral(self, offset_lo, offset_hi):
        """Integral of `_spatial` over offset rings (rad arrays), in sr.

        The altitude gradient averages to zero on a full ring, since fov_lat is odd in the
        position angle.
        """
        r_max = self.offset_max.to_value("rad")
        lo = np.clip(offset_lo, 0, r_max)
        hi = np.clip(offset_hi, 0, r_max)
        n_sub = max(1, math.ceil(np.max(hi - lo, initial=0) / np.deg2rad(0.1)))
        r, weights = _quadrature(lo, hi, n_sub)
        width = self.radial_width.to_value("rad")
        values = np.exp(-0.5 * (r / width) ** 2) * 2 * np.pi * np.sin(r)
        return np.sum(values * weights, axis=-1)

    def _box_integral(self, lon_edges, lat_edges, n_nodes=2):
        """Integral of `_spatial` over (fov_lon, fov_lat) bins (edges in rad), in sr.

        Outer Gauss-Legendre in fov_lat, split where the disk edge crosses the bin's lon
        edges so that the fov_lon limits are smooth in each piece; inner Gauss-Legendre in
        fov_lon over the part of the row inside the disk. ``n_nodes`` 8-point panels per piece.
        """
        r_max = self.offset_max.to_value("rad")
        cos_max = np.cos(r_max)
        lon_lo = lon_edges[:-1][:, None] * np.ones(len(lat_edges) - 1)
        lon_hi = lon_edges[1:][:, None] * np.ones(len(lat_edges) - 1)
        lat_lo = np.clip(lat_edges[:-1][None, :] * np.ones((len(lon_edges) - 1, 1)), -r_max, r_max)
        lat_hi = np.clip(lat_edges[1:][None, :] * np.ones((len(lon_edges) - 1, 1)), -r_max, r_max)

        # latitudes at which the disk edge crosses a lon edge: cos(lat) cos(lon) = cos(r_max)
        def crossing(lon):
            with np.errstate(invalid="ignore"):
                lat = np.arccos(np.clip(cos_max / np.cos(lon), -1, 1))
            return np.where(np.abs(lon) < r_max, lat, 0.0)

        cuts = [lat_lo, lat_hi]
        for lon in (lon_lo, lon_hi):
            lat = crossing(lon)
            cuts += [lat, -lat]
        cuts = np.sort(np.clip(np.stack(cuts, axis=-1), lat_lo[..., None], lat_hi[..., None]), axis=-1)
        # lat = r_max sin(theta) removes the square-root behaviour of the row width at |lat| = r_max
        theta = np.arcsin(np.clip(cuts / r_max, -1, 1))
        theta, w_theta = _quadrature(theta[..., :-1], theta[..., 1:], n_nodes)  # (n_lon, n_lat, 5, m)
        lat, w_lat = r_max * np.sin(theta), w_theta * r_max * np.cos(theta)

        with np.errstate(invalid="ignore"):
            half = np.arccos(np.clip(cos_max / np.cos(lat), -1, 1))
        lo = np.maximum(lon_lo[..., None, None], -half)
        hi = np.minimum(lon_hi[..., None, None], half)
        lon, w_lon = _quadrature(lo, hi, n_nodes)  # (..., m, m)
        values = self._spatial(lon, lat[..., None]) * np.cos(lat[..., None])
        inner = np.sum(values * w_lon, axis=-1)
        return np.sum(inner * w_lat, axis=(-2, -1))

    def expected_counts(self, obs_table, energy_min=None, energy_max=None):
        """Expected number of background events of each run (truth x ONTIME).

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index rows with ONTIME, ZEN_PNT and MUONEFF.
        energy_min, energy_max : `~astropy.units.Quantity`, optional
            Reconstructed-energy range. Default is None, the truth's ``energy_min`` and
            ``energy_max``.

        Returns
        -------
        counts : `~numpy.ndarray`
            Expected counts over the whole FoV, one per run.
        """
        energy_min = self.energy_min if energy_min is None else _quantity(energy_min, u.TeV, "energy_min")
        energy_max = self.energy_max if energy_max is None else _quantity(energy_max, u.TeV, "energy_max")
        ontime = _obs_column(obs_table, "ONTIME", "s")
        zenith = np.deg2rad(_obs_column(obs_table, "ZEN_PNT", "deg"))
        muoneff = _obs_column(obs_table, "MUONEFF")
        energy = self._energy_integral(
            energy_min.to_value("TeV") * np.ones_like(zenith), energy_max.to_value("TeV"), zenith
        )
        solid_angle = self._ring_integral(0.0, self.offset_max.to_value("rad"))
        norm = self.normalisation(zenith * u.rad, muoneff).to_value(RATE_UNIT)
        return ontime * norm * energy * 1e6 * solid_angle

    def expected_rate(
        self,
        obs_table,
        energy_axis,
        offset_axis=None,
        fov_lon_axis=None,
        fov_lat_axis=None,
        safe_threshold=True,
    ):
        """Bin-averaged truth of a set of runs, as a template estimator measures it.

        In each bin, ``sum_r(ONTIME_r * integral of R_r dE dOmega) / sum_r(ONTIME_r * dE * dOmega)``,
        where a run enters an energy bin only if the bin's lower edge is at or above its
        ``SAFE_ENERGY_LO`` (when ``safe_threshold``). Integrals are numerical (relative
        accuracy better than 1e-6), solid angles exact.

        Parameters
        ----------
        obs_table : `~astropy.table.Table`
            Obs index rows of the runs, with ONTIME, ZEN_PNT, MUONEFF and, when
            ``safe_threshold``, SAFE_ENERGY_LO.
        energy_axis : `~gammapy.maps.MapAxis`
            Reconstructed-energy axis.
        offset_axis : `~gammapy.maps.MapAxis`, optional
            Offset axis, for a radial (2D) model. Default is None.
        fov_lon_axis, fov_lat_axis : `~gammapy.maps.MapAxis`, optional
            FoV axes of an ALTAZ-aligned 3D model (gammapy's ``FoVAltAzFrame``). Default is None.
        safe_threshold : bool, optional
            Apply each run's ``SAFE_ENERGY_LO``. Default is True.

        Returns
        -------
        rate : `~astropy.units.Quantity`
            Rate in s-1 MeV-1 sr-1, shape (energy, offset) or (energy, fov_lon, fov_lat);
            NaN in energy bins to which no run contributes.
        """
        if (offset_axis is None) == (fov_lon_axis is None or fov_lat_axis is None):
            raise ValueError("Give either offset_axis, or both fov_lon_axis and fov_lat_axis.")
        if len(obs_table) == 0:
            raise ValueError("The obs table is empty: no run to average the truth over.")
        ontime = _obs_column(obs_table, "ONTIME", "s")
        zenith = np.deg2rad(_obs_column(obs_table, "ZEN_PNT", "deg"))
        muoneff = _obs_column(obs_table, "MUONEFF")
        edges = energy_axis.edges.to_value("TeV")

        if safe_threshold:
            threshold = _obs_column(obs_table, "SAFE_ENERGY_LO", "TeV")
            use = edges[None, :-1] >= threshold[:, None] * (1 - 1e-6)
        else:
            use = np.ones((len(ontime), len(edges) - 1), dtype=bool)

        norm = self.normalisation(zenith * u.rad, muoneff).to_value(RATE_UNIT)
        energy = self._energy_integral(edges[None, :-1], edges[None, 1:], zenith[:, None]) * 1e6  # MeV
        weight = ontime[:, None] * use
        numerator = np.sum(weight * norm[:, None] * energy, axis=0)
        denominator = np.sum(weight, axis=0) * np.diff(edges) * 1e6
        with np.errstate(invalid="ignore", divide="ignore"):
            spectrum = np.where(denominator > 0, numerator / denominator, np.nan)

        if offset_axis is not None:
            offset_edges = offset_axis.edges.to_value("rad")
            spatial = self._ring_integral(offset_edges[:-1], offset_edges[1:])
            spatial = spatial / offset_solid_angle(offset_axis).to_value("sr")
        else:
            spatial = self._box_integral(fov_lon_axis.edges.to_value("rad"), fov_lat_axis.edges.to_value("rad"))
            spatial = spatial / fov_solid_angle(fov_lon_axis, fov_lat_axis).to_value("sr")
        spectrum = spectrum.reshape((-1,) + (1,) * spatial.ndim)
        return spectrum * spatial * RATE_UNIT


# -- archive -------------------------------------------------------------------------------


def _location():
    return EarthLocation(
        lon=HESS_SITE["GEOLON"] * u.deg, lat=HESS_SITE["GEOLAT"] * u.deg, height=HESS_SITE["ALTITUDE"] * u.m
    )


def _reference_time():
    return Time(MJDREF[0] + MJDREF[1], format="mjd", scale="tt")


def _plan_runs(rng, n_off_runs, n_source_runs, truth):
    """Draw the run list (pointings, times, conditions) as an obs-index table."""
    location = _location()
    n_runs = n_off_runs + n_source_runs
    # nights in 2004-2009, runs around local midnight (UTC+1.1 h); source runs in its season
    start = Time("2004-01-01T00:00:00", scale="utc").mjd
    days = np.floor(start + rng.uniform(0, 6 * 365.25, n_off_runs))
    hours = rng.uniform(19.5, 26.5, n_off_runs)
    off_times = Time(days + hours / 24, format="mjd", scale="utc")
    # zenith stratified over 5-55 deg so that every zenith band has runs
    zenith = 5 + 50 * (rng.permutation(n_off_runs) + rng.uniform(0, 1, n_off_runs)) / max(n_off_runs, 1)
    azimuth = rng.uniform(0, 360, n_off_runs)
    off_altaz = SkyCoord(
        alt=(90 - zenith) * u.deg, az=azimuth * u.deg, frame=AltAz(obstime=off_times, location=location)
    )
    off_icrs = off_altaz.transform_to(ICRS())

    years = rng.integers(2004, 2010, n_source_runs)
    season = np.array([Time(f"{year}-11-01T00:00:00", scale="utc").mjd for year in years], dtype=float)
    source_days = np.floor(season + rng.uniform(0, 50, n_source_runs))
    hour_angle = rng.uniform(-40, 40, n_source_runs) * u.deg
    day_start = Time(source_days, format="mjd", scale="utc")
    lst = day_start.sidereal_time("mean", longitude=location.lon)
    delta = (SOURCE_POSITION.ra + hour_angle - lst).wrap_at(360 * u.deg).to_value("deg")
    source_times = day_start + delta / 360 * 86164.0905 * u.s
    position_angle = (np.arange(n_source_runs) % 4) * 90 * u.deg
    source_icrs = SOURCE_POSITION.directional_offset_by(position_angle, _WOBBLE_OFFSET)

    mid = Time(np.concatenate([off_times.tt.mjd, source_times.tt.mjd]), format="mjd", scale="tt")
    ra = np.concatenate([off_icrs.ra.deg, source_icrs.ra.deg])
    dec = np.concatenate([off_icrs.dec.deg, source_icrs.dec.deg])
    is_source = np.arange(n_runs) >= n_off_runs
    order = np.argsort(mid.mjd)
    mid, ra, dec, is_source = mid[order], ra[order], dec[order], is_source[order]

    ontime = np.round(rng.uniform(1620, 1690, n_runs))
    deadc = rng.uniform(0.88, 0.96, n_runs)
    muoneff = rng.uniform(0.85, 1.2, n_runs)
    tstart = np.round((mid - _reference_time()).to_value("s") - ontime / 2)
    mid = _reference_time() + (tstart + ontime / 2) * u.s
    pointing = SkyCoord(ra, dec, unit="deg").transform_to(AltAz(obstime=mid, location=location))
    galactic = SkyCoord(ra, dec, unit="deg").galactic
    zen_pnt = 90 - pointing.alt.deg
    safe_lo = truth.safe_energy_threshold(zen_pnt * u.deg).to_value("TeV")

    table = Table()
    table["OBS_ID"] = np.arange(n_runs, dtype=np.int64) + 1000
    table["RA_PNT"] = ra * u.deg
    table["DEC_PNT"] = dec * u.deg
    table["GLON_PNT"] = galactic.l.deg * u.deg
    table["GLAT_PNT"] = galactic.b.deg * u.deg
    table["ALT_PNT"] = pointing.alt.deg * u.deg
    table["AZ_PNT"] = pointing.az.deg * u.deg
    table["ZEN_PNT"] = zen_pnt * u.deg
    table["ONTIME"] = ontime * u.s
    table["LIVETIME"] = ontime * deadc * u.s
    table["DEADC"] = deadc
    table["TSTART"] = tstart * u.s
    table["TSTOP"] = (tstart + ontime) * u.s
    table["DATE-OBS"] = [isot[:10] for isot in (_reference_time() + tstart * u.s).utc.isot]
    table["N_TELS"] = np.full(n_runs, 4, dtype=np.int64)
    table["TELLIST"] = np.full(n_runs, "1,2,3,4")
    table["QUALITY"] = np.zeros(n_runs, dtype=np.int64)
    table["MUONEFF"] = muoneff
    table["EVENT_COUNT"] = np.zeros(n_runs, dtype=np.int64)
    table["TARGET_NAME"] = np.where(is_source, "Simulated source", "Off data")
    n_off = np.cumsum(~is_source)
    table["OBJECT"] = [
        "Simulated source" if source else f"Off field {n:02d}" for source, n in zip(is_source, n_off)
    ]
    table["RA_OBJ"] = np.where(is_source, SOURCE_POSITION.ra.deg, ra) * u.deg
    table["DEC_OBJ"] = np.where(is_source, SOURCE_POSITION.dec.deg, dec) * u.deg
    table["SAFE_ENERGY_LO"] = safe_lo * u.TeV
    table["SAFE_ENERGY_HI"] = np.full(n_runs, 100.0) * u.TeV
    table.meta.update(
        {
            "EXTNAME": "OBS_INDEX",
            "HDUCLASS": "GADF",
            "HDUDOC": "https://github.com/open-gamma-ray-astro/gamma-astro-data-formats",
            "HDUVERS": "0.2",
            "HDUCLAS1": "INDEX",
            "HDUCLAS2": "OBS",
            "MJDREFI": MJDREF[0],
            "MJDREFF": MJDREF[1],
            "TIMEUNIT": "s",
            "TIMESYS": "TT",
            "TIMEREF": "local",
            **HESS_SITE,
        }
    )
    return table


def _sample_power_law(rng, n, index, e_min, e_max):
    """Energies (TeV) from a power law E^-index on [e_min, e_max] by inverse CDF."""
    g = 1 - index
    uniform = rng.uniform(0, 1, n)
    return (e_min**g + uniform * (e_max**g - e_min**g)) ** (1 / g)


def _sample_spectrum(rng, n, index, e_th, rolloff_index, e_min, e_max):
    """``n`` energies (TeV) from E^-index / (1 + (e_th / E)^k) by rejection."""
    samples = []
    n_left = n
    while n_left > 0:
        energy = _sample_power_law(rng, max(2 * n_left, 1000) * 4, index, e_min, e_max)
        keep = rng.uniform(0, 1, energy.size) < 1 / (1 + (e_th / energy) ** rolloff_index)
        samples.append(energy[keep][:n_left])
        n_left -= samples[-1].size
    return np.concatenate(samples) if samples else np.zeros(0)


def _sample_fov(rng, n, truth):
    """``n`` FoV-ALTAZ positions (rad) from the truth's spatial factor by rejection."""
    r_max = truth.offset_max.to_value("rad")
    width = truth.radial_width.to_value("rad")
    gradient = truth.altaz_gradient.to_value("rad-1")
    bound = 1 + abs(gradient) * r_max
    lons, lats = [], []
    n_left = n
    while n_left > 0:
        size = max(3 * n_left, 1000)
        cos_r = 1 - rng.uniform(0, 1, size) * (1 - np.cos(r_max))
        phi = rng.uniform(0, 2 * np.pi, size)
        sin_r = np.sqrt(1 - cos_r**2)
        lon = np.arctan2(sin_r * np.cos(phi), cos_r)
        lat = np.arcsin(sin_r * np.sin(phi))
        offset = np.arccos(cos_r)
        weight = np.exp(-0.5 * (offset / width) ** 2) * (1 - gradient * lat) / bound
        keep = rng.uniform(0, 1, size) < weight
        lons.append(lon[keep][:n_left])
        lats.append(lat[keep][:n_left])
        n_left -= lons[-1].size
    return np.concatenate(lons), np.concatenate(lats)


def _fov_altaz_to_icrs(fov_lon, fov_lat, ra_pnt, dec_pnt, times, location):
    """FoV-ALTAZ coordinates (rad) to RA/Dec (deg) with gammapy's FoVAltAzFrame, per-event time."""
    with erfa_astrom.set(ErfaAstromInterpolator(_ERFA_INTERPOLATION)):
        altaz = AltAz(obstime=times, location=location)
        origin = SkyCoord(ra_pnt, dec_pnt, unit="deg").transform_to(altaz)
        frame = FoVAltAzFrame(origin=origin, location=location, obstime=times)
        icrs = SkyCoord(fov_lon=fov_lon * u.rad, fov_lat=fov_lat * u.rad, frame=frame).transform_to(ICRS())
    return icrs.ra.deg, icrs.dec.deg


def _aeff(truth, zenith):
    energy_axis = MapAxis.from_energy_bounds(0.01, 300, nbin=90, unit="TeV", name="energy_true")
    offset_axis = MapAxis.from_bounds(0, 4.5, nbin=9, unit="deg", name="offset")
    energy = energy_axis.center[:, None]
    offset = offset_axis.center[None, :]
    data = (
        _AEFF_MAX
        * truth.efficiency(energy, zenith)
        * np.exp(-0.5 * (offset / _AEFF_OFFSET_WIDTH).to_value("") ** 2)
    )
    return EffectiveAreaTable2D(axes=[energy_axis, offset_axis], data=data.value, unit=data.unit)


def _edisp():
    energy_axis = MapAxis.from_energy_bounds(0.01, 300, nbin=45, unit="TeV", name="energy_true")
    migra_axis = MapAxis.from_bounds(0.2, 5, nbin=150, node_type="edges", name="migra")
    offset_axis = MapAxis.from_bounds(0, 4.5, nbin=3, unit="deg", name="offset")
    return EnergyDispersion2D.from_gauss(energy_axis, migra_axis, offset_axis, bias=0, sigma=_EDISP_SIGMA)


def _psf():
    energy_axis = MapAxis.from_energy_bounds(0.01, 300, nbin=5, unit="TeV", name="energy_true")
    offset_axis = MapAxis.from_bounds(0, 4.5, nbin=3, unit="deg", name="offset")
    rad_axis = MapAxis.from_bounds(0, 1, nbin=100, unit="deg", name="rad")
    sigma = _PSF_SIGMA.to_value("rad")
    rad = rad_axis.center.to_value("rad")
    density = np.exp(-0.5 * (rad / sigma) ** 2) / (2 * np.pi * sigma**2)
    data = np.ones((energy_axis.nbin, offset_axis.nbin, 1)) * density
    return PSF3D(axes=[energy_axis, offset_axis, rad_axis], data=data, unit="sr-1")


def _source_events(rng, run, aeff, truth):
    """Gamma-like events from the point source: spectrum x aeff x LIVETIME, Gaussian PSF and edisp."""
    zenith = run["ZEN_PNT"] * u.deg
    pointing = SkyCoord(run["RA_PNT"], run["DEC_PNT"], unit="deg")
    offset = pointing.separation(SOURCE_POSITION)
    e_min, e_max = truth.energy_min.to_value("TeV"), truth.energy_max.to_value("TeV")
    energy_axis = MapAxis.from_energy_bounds(e_min, e_max, nbin=600, unit="TeV", name="energy_true")
    energy = energy_axis.center
    flux = SOURCE_AMPLITUDE * (energy / u.TeV).to_value("") ** (-SOURCE_INDEX)
    rate = np.sum(flux * aeff.evaluate(energy_true=energy, offset=offset) * energy_axis.bin_width)
    n_events = rng.poisson((rate * run["LIVETIME"] * u.s).to_value(""))
    e_th = truth.rolloff_energy(zenith).to_value("TeV")
    energy_true = _sample_spectrum(rng, n_events, SOURCE_INDEX, e_th, truth.rolloff_index, e_min, e_max)
    migra = 1 + _EDISP_SIGMA * rng.standard_normal(n_events)
    energy_reco = energy_true * migra
    separation = _PSF_SIGMA * np.sqrt(-2 * np.log1p(-rng.uniform(0, 1, n_events)))
    position_angle = rng.uniform(0, 360, n_events) * u.deg
    position = SOURCE_POSITION.directional_offset_by(position_angle, separation)
    keep = (energy_reco >= e_min) & (energy_reco <= e_max)
    return energy_reco[keep], position.ra.deg[keep], position.dec.deg[keep]


def _events_header(run):
    header = fits.Header()
    header["HDUCLASS"] = "GADF"
    header["HDUDOC"] = "https://github.com/open-gamma-ray-astro/gamma-astro-data-formats"
    header["HDUVERS"] = "0.3"
    header["HDUCLAS1"] = "EVENTS"
    header["TELESCOP"] = "HESS", "simulated H.E.S.S.-like array"
    header["INSTRUME"] = "bkgtemplate simulation"
    header["CREATOR"] = "bkgtemplate.simulate"
    header["OBS_ID"] = int(run["OBS_ID"])
    header["TSTART"] = float(run["TSTART"]), "MET of observation start time (s)"
    header["TSTOP"] = float(run["TSTOP"]), "MET of observation stop time (s)"
    header["MJDREFI"] = MJDREF[0]
    header["MJDREFF"] = MJDREF[1]
    header["TIMEUNIT"] = "s"
    header["TIMESYS"] = "TT"
    header["TIMEREF"] = "local"
    header["ONTIME"] = float(run["ONTIME"]), "total good time including dead time (s)"
    header["LIVETIME"] = float(run["LIVETIME"]), "live time (s)"
    header["DEADC"] = float(run["DEADC"]), "LIVETIME / ONTIME"
    header["OBJECT"] = str(run["OBJECT"])
    header["RA_OBJ"] = float(run["RA_OBJ"]), "RA of target object (deg)"
    header["DEC_OBJ"] = float(run["DEC_OBJ"]), "Dec of target object (deg)"
    header["OBS_MODE"] = "POINTING"
    header["RA_PNT"] = float(run["RA_PNT"]), "pointing RA (deg)"
    header["DEC_PNT"] = float(run["DEC_PNT"]), "pointing Dec (deg)"
    header["ALT_PNT"] = float(run["ALT_PNT"]), "altitude at mid-run (deg)"
    header["AZ_PNT"] = float(run["AZ_PNT"]), "azimuth at mid-run (deg)"
    header["RADESYS"] = "ICRS"
    header["N_TELS"] = int(run["N_TELS"])
    header["TELLIST"] = str(run["TELLIST"])
    header["GEOLON"] = HESS_SITE["GEOLON"], "longitude of observatory (deg)"
    header["GEOLAT"] = HESS_SITE["GEOLAT"], "latitude of observatory (deg)"
    header["ALTITUDE"] = HESS_SITE["ALTITUDE"], "altitude of observatory (m)"
    header["MUONEFF"] = float(run["MUONEFF"]), "muon efficiency"
    header["EUNIT"] = "TeV"
    return header


def _irf_hdu(irf, name):
    hdu = irf.to_table_hdu()
    hdu.name = name
    return hdu


def _write_gzip(hdulist, filename):
    """Write ``hdulist`` gzip-compressed at a fast level, with no time stamp (reproducible bytes)."""
    buffer = io.BytesIO()
    hdulist.writeto(buffer)
    Path(filename).write_bytes(gzip.compress(buffer.getvalue(), compresslevel=_GZIP_LEVEL, mtime=0))


def _run_hdulist(run, events, aeff_hdu, edisp_hdu, psf_hdu):
    header = _events_header(run)
    columns = [
        fits.Column("EVENT_ID", "K", array=np.arange(1, len(events["TIME"]) + 1)),
        fits.Column("TIME", "D", unit="s", array=events["TIME"]),
        fits.Column("RA", "E", unit="deg", array=events["RA"]),
        fits.Column("DEC", "E", unit="deg", array=events["DEC"]),
        fits.Column("ENERGY", "E", unit="TeV", array=events["ENERGY"]),
    ]
    events_hdu = fits.BinTableHDU.from_columns(columns, header=header, name="EVENTS")

    gti_header = fits.Header()
    keys = ("HDUCLASS", "HDUDOC", "HDUVERS", "TSTART", "TSTOP", "MJDREFI", "MJDREFF", "TIMEUNIT", "TIMESYS", "TIMEREF")
    for key in keys:
        gti_header[key] = header[key]
    gti_header["HDUCLAS1"] = "GTI"
    gti_columns = [
        fits.Column("START", "D", unit="s", array=[float(run["TSTART"])]),
        fits.Column("STOP", "D", unit="s", array=[float(run["TSTOP"])]),
    ]
    gti_hdu = fits.BinTableHDU.from_columns(gti_columns, header=gti_header, name="GTI")

    aeff_hdu.header["OBS_ID"] = int(run["OBS_ID"])
    return fits.HDUList([fits.PrimaryHDU(), events_hdu, gti_hdu, aeff_hdu, edisp_hdu, psf_hdu])


def _hdu_index(obs_table, file_names):
    rows = []
    for obs_id, file_name in zip(obs_table["OBS_ID"], file_names):
        for hdu_type, hdu_class, hdu_name in (
            ("events", "events", "EVENTS"),
            ("gti", "gti", "GTI"),
            ("aeff", "aeff_2d", "AEFF"),
            ("edisp", "edisp_2d", "EDISP"),
            ("psf", "psf_table", "PSF"),
        ):
            rows.append((int(obs_id), hdu_type, hdu_class, "data", file_name, hdu_name))
    table = Table(rows=rows, names=["OBS_ID", "HDU_TYPE", "HDU_CLASS", "FILE_DIR", "FILE_NAME", "HDU_NAME"])
    table.meta.update(
        {
            "EXTNAME": "HDU_INDEX",
            "HDUCLASS": "GADF",
            "HDUDOC": "https://github.com/open-gamma-ray-astro/gamma-astro-data-formats",
            "HDUVERS": "0.2",
            "HDUCLAS1": "INDEX",
            "HDUCLAS2": "HDU",
        }
    )
    return table


def _check_target(path, overwrite):
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory: choose another path for the archive.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True to replace it.")


def simulate_archive(path, n_off_runs=24, n_source_runs=6, seed=0, overwrite=False, truth=None):
    """Write a seeded simulated GADF DL3 archive whose background is `BackgroundTruth`.

    Off runs (``TARGET_NAME`` "Off data") point at zenith angles spread over 5-55 deg with
    random azimuths; source runs ("Simulated source") are wobble runs 0.5 deg from
    `SOURCE_POSITION` and hold, besides the background, gamma-like events of a point source
    (power law of index 2.5, folded with the run's effective area and live time, Gaussian
    PSF of 0.1 deg and energy resolution of 10 %). Runs last about 28 min between 2004
    and 2009 at the H.E.S.S. site; MUONEFF is spread over 0.85-1.2. Background events are
    drawn in the ALTAZ FoV frame and turned into RA/Dec with gammapy's ``FoVAltAzFrame`` at
    each event's time (astropy's ``ErfaAstromInterpolator`` at 300 s, exact to far below a
    milliarcsecond). The store has no ``bkg`` HDUs: it is the input of a background model.

    Runs are numbered from 1000 in time order. The files are written to a temporary folder
    next to ``path`` and moved into place at the end, so an interrupted call leaves no
    partial archive; the same seed gives byte-identical files.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Folder of the data store; created, or replaced if ``overwrite``.
    n_off_runs : int, optional
        Number of off runs. Default is 24.
    n_source_runs : int, optional
        Number of wobble runs on the simulated source. Default is 6.
    seed : int, optional
        Seed of `numpy.random.default_rng`; the same seed gives the same archive.
        Default is 0.
    overwrite : bool, optional
        Replace a non-empty ``path``. Default is False.
    truth : `BackgroundTruth`, optional
        Background truth. Default is None, ``BackgroundTruth()``.

    Returns
    -------
    path : `~pathlib.Path`
        Folder of the data store, with ``obs-index.fits.gz``, ``hdu-index.fits.gz`` and
        ``data/run_XXXXXX.fits.gz``.

    Notes
    -----
    With the defaults the archive holds about 275 000 background events (about 9 000-16 000
    per low-zenith run, a quarter of them above ``SAFE_ENERGY_LO``) and a few hundred source
    events per source run, 5.5 MB in all. It takes about 3 s (more on a loaded machine),
    plus 1-2 s in a fresh Python session for astropy to load its Earth-rotation table.

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate.simulate import simulate_archive
    >>> path = simulate_archive("simulated-archive", overwrite=True)  # doctest: +SKIP
    >>> observations = DataStore.from_dir(path).get_observations(
    ...     required_irf=["aeff", "edisp", "psf"])  # doctest: +SKIP
    """
    path = Path(path).expanduser().resolve()
    truth = BackgroundTruth() if truth is None else truth
    if not isinstance(truth, BackgroundTruth):
        raise TypeError(f"Expected a BackgroundTruth, got {type(truth).__name__}.")
    if n_off_runs < 0 or n_source_runs < 0 or n_off_runs + n_source_runs == 0:
        raise ValueError(f"Need at least one run, got n_off_runs={n_off_runs}, n_source_runs={n_source_runs}.")
    _check_target(path, overwrite)

    rng = np.random.default_rng(seed)
    obs_table = _plan_runs(rng, n_off_runs, n_source_runs, truth)
    obs_table.meta["SIMSEED"] = int(seed)
    mu = truth.expected_counts(obs_table)
    location = _location()
    # identical for all runs: converted to HDUs once
    edisp_hdu, psf_hdu = _irf_hdu(_edisp(), "EDISP"), _irf_hdu(_psf(), "PSF")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / "data").mkdir()
        file_names = []
        for idx, run in enumerate(obs_table):
            zenith = run["ZEN_PNT"] * u.deg
            n_bkg = rng.poisson(mu[idx])
            energy = _sample_spectrum(
                rng,
                n_bkg,
                truth.index,
                truth.rolloff_energy(zenith).to_value("TeV"),
                truth.rolloff_index,
                truth.energy_min.to_value("TeV"),
                truth.energy_max.to_value("TeV"),
            )
            fov_lon, fov_lat = _sample_fov(rng, n_bkg, truth)
            time = rng.uniform(run["TSTART"], run["TSTOP"], n_bkg)
            times = _reference_time() + time * u.s
            ra, dec = _fov_altaz_to_icrs(fov_lon, fov_lat, run["RA_PNT"], run["DEC_PNT"], times, location)

            aeff = _aeff(truth, zenith)
            if run["TARGET_NAME"] == "Simulated source":
                src_energy, src_ra, src_dec = _source_events(rng, run, aeff, truth)
                src_time = rng.uniform(run["TSTART"], run["TSTOP"], src_energy.size)
                energy = np.concatenate([energy, src_energy])
                ra = np.concatenate([ra, src_ra])
                dec = np.concatenate([dec, src_dec])
                time = np.concatenate([time, src_time])
            order = np.argsort(time, kind="stable")
            events = dict(TIME=time[order], RA=ra[order], DEC=dec[order], ENERGY=energy[order])
            obs_table["EVENT_COUNT"][idx] = len(order)

            file_name = f"run_{int(run['OBS_ID']):06d}.fits.gz"
            hdulist = _run_hdulist(run, events, _irf_hdu(aeff, "AEFF"), edisp_hdu, psf_hdu)
            _write_gzip(hdulist, tmp / "data" / file_name)
            file_names.append(file_name)
            log.debug(f"Run {run['OBS_ID']}: {n_bkg} background and {len(order) - n_bkg} source events")

        for table, name in ((obs_table, "obs-index"), (_hdu_index(obs_table, file_names), "hdu-index")):
            hdulist = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)])
            _write_gzip(hdulist, tmp / f"{name}.fits.gz")

        _check_target(path, overwrite)
        if path.exists():
            old = path.with_name(f".{path.name}.{tmp.name}.old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    log.info(
        f"Simulated archive written to {path}: {len(obs_table)} runs "
        f"({n_off_runs} off, {n_source_runs} source), {int(np.sum(obs_table['EVENT_COUNT']))} events, seed {seed}"
    )
    return path
