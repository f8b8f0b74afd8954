"""A seeded simulated GADF DL3 archive with a known background truth (`BackgroundTruth`, `simulate_archive`); the truth
shares no code with the estimator: events go through gammapy's ``FoVAltAzFrame``, integrals by quadrature."""

import gzip
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.coordinates.erfa_astrom import ErfaAstromInterpolator, erfa_astrom
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from scipy.integrate import quad
from gammapy.irf import PSF3D, EffectiveAreaTable2D, EnergyDispersion2D
from gammapy.maps import MapAxis
from gammapy.utils.coordinates import FoVAltAzFrame
# for safe writing only: nothing of the estimator's geometry, so that the truth is independent
from .store import check_replaceable, staged_write

__all__ = ["RATE_UNIT", "SOURCE_POSITION", "BackgroundTruth", "simulate_archive"]

log = logging.getLogger(__name__)

RATE_UNIT = u.Unit("s-1 MeV-1 sr-1")  # as in GADF BKG HDUs
SOURCE_POSITION = SkyCoord(60.0, -30.0, unit="deg", frame="icrs")  # the point source of the source runs

HESS_SITE = dict(GEOLON=16.5002222222222, GEOLAT=-23.2717777777778, ALTITUDE=1835.0)  # deg, deg, m
SITE = EarthLocation.from_geodetic(HESS_SITE["GEOLON"], HESS_SITE["GEOLAT"], HESS_SITE["ALTITUDE"])
MJDREF = (51910, 0.000742870370370241)  # TT, as in H.E.S.S. DL3 DR1
T_REF = Time(MJDREF[0] + MJDREF[1], format="mjd", scale="tt")
SOURCE_AMPLITUDE, SOURCE_INDEX = 2e-11 * u.Unit("cm-2 s-1 TeV-1"), 2.5  # about 60 % of the Crab
EDISP_SIGMA, PSF_SIGMA, WOBBLE = 0.1, 0.1 * u.deg, 0.5 * u.deg
TIME_META = dict(MJDREFI=MJDREF[0], MJDREFF=MJDREF[1], TIMEUNIT="s", TIMESYS="TT", TIMEREF="local")
RUN_KEYS = ("ONTIME", "LIVETIME", "DEADC", "RA_PNT", "DEC_PNT", "ALT_PNT", "AZ_PNT", "RA_OBJ", "DEC_OBJ", "MUONEFF")
CREATOR = "bkgtemplate.simulate"  # marks the archives simulated here: overwrite=True replaces nothing else
GADF = dict(HDUCLASS="GADF", HDUDOC="https://github.com/open-gamma-ray-astro/gamma-astro-data-formats")


@dataclass(frozen=True)
class BackgroundTruth:
    """Known background rate of the simulated archive, in s-1 MeV-1 sr-1 (quantities in any convertible unit).

    R = norm (cos z)^-zenith_index MUONEFF^muoneff_index (E / reference_energy)^-index / (1 + (E_th(z) / E)^
    rolloff_index) exp(-r^2 / (2 radial_width^2)) (1 - altaz_gradient fov_lat), E_th(z) = threshold_energy (cos z)^
    -threshold_zenith_index, fov_lat in gammapy's ``FoVAltAzFrame``; zero beyond offset_max, energy_min, energy_max.
    SAFE_ENERGY_LO is safe_threshold_factor x E_th(z), rounded up to 0.03 in log10(E / TeV) like H.E.S.S. DR1."""

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
        units = dict(norm=RATE_UNIT, reference_energy="TeV", threshold_energy="TeV", radial_width="deg",
                     offset_max="deg", altaz_gradient="deg-1", energy_min="TeV", energy_max="TeV")
        for name, unit in units.items():
            try:
                object.__setattr__(self, name, u.Quantity(getattr(self, name)).to(unit))
            except u.UnitConversionError as error:
                raise u.UnitsError(f"{name} = {getattr(self, name)!r} is not convertible to {unit}.") from error
        if not 0 < self.offset_max.to_value("deg") < 180:
            raise ValueError(f"offset_max = {self.offset_max} must be in (0, 180) deg.")
        if abs(self.altaz_gradient * self.offset_max) >= 1:
            raise ValueError(f"altaz_gradient = {self.altaz_gradient} makes the rate negative inside "
                             f"offset_max = {self.offset_max}: use |altaz_gradient| < 1 / offset_max.")
        if not 0 < self.energy_min < self.energy_max:
            raise ValueError(f"Need 0 < energy_min < energy_max, got {self.energy_min} and {self.energy_max}.")

    def rolloff_energy(self, zenith):
        """Roll-off energy E_th(z) in TeV at zenith angle ``zenith`` (Quantity)."""
        return self.threshold_energy * np.cos(u.Quantity(zenith, "deg")) ** -self.threshold_zenith_index

    def efficiency(self, energy, zenith):
        """Roll-off factor 1 / (1 + (E_th(z) / E)^k), dimensionless."""
        ratio = (self.rolloff_energy(zenith) / u.Quantity(energy, "TeV")).to_value("")
        return 1 / (1 + ratio**self.rolloff_index)

    def safe_energy_threshold(self, zenith):
        """SAFE_ENERGY_LO (TeV) of a run at ``zenith``: safe_threshold_factor x E_th(z), rounded up."""
        log_e = np.log10(self.safe_threshold_factor * self.rolloff_energy(zenith).to_value("TeV"))
        return 10 ** (np.ceil(np.round(log_e / 0.03, 9)) * 0.03) * u.TeV

    def norm_at(self, zenith, muoneff):
        """Rate (RATE_UNIT) at E0 and the FoV centre without roll-off; zenith in rad."""
        return self.norm.value * np.cos(zenith) ** -self.zenith_index * np.asarray(muoneff, float) ** self.muoneff_index

    def spectrum(self, energy, zenith):
        """Dimensionless energy factor; energy in TeV, zenith in rad."""
        inside = (energy >= self.energy_min.value) & (energy <= self.energy_max.value)
        power = (energy / self.reference_energy.value) ** -self.index
        return np.where(inside, power * self.efficiency(energy * u.TeV, zenith * u.rad), 0.0)

    def spatial(self, fov_lon, fov_lat):
        """Dimensionless FoV factor; coordinates in rad, offset by the haversine formula."""
        hav = np.sin(fov_lat / 2) ** 2 + np.cos(fov_lat) * np.sin(fov_lon / 2) ** 2
        offset = 2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))
        value = np.exp(-0.5 * (offset / self.radial_width.to_value("rad")) ** 2)
        value = value * (1 - self.altaz_gradient.to_value("rad-1") * fov_lat)
        return np.where(offset <= self.offset_max.to_value("rad"), value, 0.0)

    def evaluate(self, energy, fov_lon, fov_lat, zenith, muoneff):
        """Rate at ``energy``, ``FoVAltAzFrame`` (fov_lon, fov_lat), ``zenith`` and ``muoneff`` (broadcast)."""
        zenith = u.Quantity(zenith, "rad").value
        spectrum = self.spectrum(u.Quantity(energy, "TeV").value, zenith)
        spatial = self.spatial(u.Quantity(fov_lon, "rad").value, u.Quantity(fov_lat, "rad").value)
        return self.norm_at(zenith, muoneff) * spectrum * spatial * RATE_UNIT

    def expected_counts(self, obs_table, energy_min=None, energy_max=None):
        """Expected background events of each run (ONTIME x integral of R over the FoV and energy range, the truth's
        unless given); ``obs_table`` needs ONTIME, ZEN_PNT and MUONEFF."""
        zenith = np.deg2rad(u.Quantity(obs_table["ZEN_PNT"], "deg").value)
        norm = self.norm_at(zenith, obs_table["MUONEFF"]) * u.Quantity(obs_table["ONTIME"], "s").value
        bounds = (self.energy_min.value, self.energy_max.value)
        e_lo, e_hi = (np.clip(u.Quantity(default if e is None else e, "TeV").value, *bounds)
                      for e, default in [(energy_min, self.energy_min), (energy_max, self.energy_max)])
        # in ln E; over the disk the alt-az gradient integrates to zero, leaving the radial profile
        energy = [quad(lambda x: self.spectrum(np.exp(x), z) * np.exp(x), *np.log([e_lo, e_hi]))[0] for z in zenith]
        sigma, r_max = self.radial_width.to_value("rad"), self.offset_max.to_value("rad")
        solid_angle = 2 * np.pi * quad(lambda r: np.exp(-0.5 * (r / sigma) ** 2) * np.sin(r), 0, r_max)[0]
        return norm * np.array(energy) * 1e6 * solid_angle


def _plan_runs(rng, n_off, n_source, truth):
    """The obs-index table: off runs at random alt-az, wobble runs on `SOURCE_POSITION`."""
    n_runs = n_off + n_source
    # nights in 2004-2009 around local midnight; zenith stratified over 5-55 deg
    days = np.floor(Time("2004-01-01T00:00:00", scale="utc").mjd + rng.uniform(0, 6 * 365.25, n_off))
    off_times = Time(days + rng.uniform(19.5, 26.5, n_off) / 24, format="mjd", scale="utc")
    zenith = 5 + 50 * (rng.permutation(n_off) + rng.uniform(0, 1, n_off)) / max(n_off, 1)
    frame = AltAz(obstime=off_times, location=SITE)
    off = SkyCoord(alt=(90 - zenith) * u.deg, az=rng.uniform(0, 360, n_off) * u.deg, frame=frame).icrs
    # source runs in November-December, within 40 deg of hour angle from culmination
    season = [Time(f"{year}-11-01T00:00:00", scale="utc").mjd for year in rng.integers(2004, 2010, n_source)]
    day_start = Time(np.floor(np.array(season, float) + rng.uniform(0, 50, n_source)), format="mjd", scale="utc")
    hour_angle = SOURCE_POSITION.ra + rng.uniform(-40, 40, n_source) * u.deg
    delta = (hour_angle - day_start.sidereal_time("mean", longitude=SITE.lon)).wrap_at(360 * u.deg)
    source_times = day_start + delta.to_value("deg") / 360 * 86164.0905 * u.s
    source = SOURCE_POSITION.directional_offset_by((np.arange(n_source) % 4) * 90 * u.deg, WOBBLE)
    mid = np.concatenate([off_times.tt.mjd, source_times.tt.mjd])
    order = np.argsort(mid)
    ra = np.concatenate([off.ra.deg, source.ra.deg])[order]
    dec = np.concatenate([off.dec.deg, source.dec.deg])[order]
    is_source = (np.arange(n_runs) >= n_off)[order]
    ontime = np.round(rng.uniform(1620, 1690, n_runs))
    deadc, muoneff = rng.uniform(0.88, 0.96, n_runs), rng.uniform(0.85, 1.2, n_runs)
    tstart = np.round((Time(mid[order], format="mjd", scale="tt") - T_REF).to_value("s") - ontime / 2)
    mid = T_REF + (tstart + ontime / 2) * u.s
    altaz = SkyCoord(ra, dec, unit="deg").transform_to(AltAz(obstime=mid, location=SITE))
    table = Table({
        "OBS_ID": np.arange(n_runs, dtype=np.int64) + 1000, "RA_PNT": ra * u.deg, "DEC_PNT": dec * u.deg,
        "ALT_PNT": altaz.alt.to("deg"), "AZ_PNT": altaz.az.to("deg"),
        "ZEN_PNT": 90 * u.deg - altaz.alt, "ONTIME": ontime * u.s, "LIVETIME": ontime * deadc * u.s,
        "DEADC": deadc, "TSTART": tstart * u.s, "TSTOP": (tstart + ontime) * u.s,
        "DATE-OBS": [isot[:10] for isot in (T_REF + tstart * u.s).utc.isot],
        "N_TELS": np.full(n_runs, 4), "QUALITY": np.zeros(n_runs, int), "MUONEFF": muoneff,
        "EVENT_COUNT": np.zeros(n_runs, int), "TARGET_NAME": np.where(is_source, "Simulated source", "Off data"),
        "RA_OBJ": np.where(is_source, SOURCE_POSITION.ra.deg, ra) * u.deg,
        "DEC_OBJ": np.where(is_source, SOURCE_POSITION.dec.deg, dec) * u.deg,
        "SAFE_ENERGY_LO": truth.safe_energy_threshold(90 * u.deg - altaz.alt),
        "SAFE_ENERGY_HI": np.full(n_runs, 100.0) * u.TeV,
    })
    table.meta.update(EXTNAME="OBS_INDEX", **GADF, HDUVERS="0.2", HDUCLAS1="INDEX", HDUCLAS2="OBS", **TIME_META,
                      **HESS_SITE, CREATOR=CREATOR)
    return table


def _sample_energy(rng, n, index, zenith, truth):
    """``n`` energies (TeV) from E^-index x `BackgroundTruth.efficiency`: power law by inverse CDF, then rejection."""
    g, e_min, e_max, samples = 1 - index, truth.energy_min.value, truth.energy_max.value, [np.zeros(0)]
    while n > 0:
        energy = (e_min**g + rng.uniform(0, 1, max(2 * n, 1000) * 4) * (e_max**g - e_min**g)) ** (1 / g)
        samples.append(energy[rng.uniform(0, 1, energy.size) < truth.efficiency(energy * u.TeV, zenith)][:n])
        n -= samples[-1].size
    return np.concatenate(samples)


def _sample_fov(rng, n, truth):
    """``n`` FoV-ALTAZ positions (rad): uniform on the spherical cap, then rejection on the truth."""
    r_max = truth.offset_max.to_value("rad")
    bound, samples = 1 + abs(truth.altaz_gradient.to_value("rad-1")) * r_max, [np.zeros((2, 0))]
    while n > 0:
        size = max(3 * n, 1000)
        cos_r = 1 - rng.uniform(0, 1, size) * (1 - np.cos(r_max))
        phi, sin_r = rng.uniform(0, 2 * np.pi, size), np.sqrt(1 - cos_r**2)
        lon, lat = np.arctan2(sin_r * np.cos(phi), cos_r), np.arcsin(sin_r * np.sin(phi))
        keep = rng.uniform(0, 1, size) < truth.spatial(lon, lat) / bound
        samples.append(np.stack([lon[keep], lat[keep]])[:, :n])
        n -= samples[-1].shape[1]
    return np.concatenate(samples, axis=1)


def _irfs(truth, zenith):
    """AEFF (the truth's roll-off at ``zenith``, Gaussian in offset), Gaussian EDISP and PSF."""
    energy = [MapAxis.from_energy_bounds(0.01, 300, n, "TeV", name="energy_true") for n in (90, 45, 5)]
    offset = [MapAxis.from_bounds(0, 4.5, n, unit="deg", name="offset") for n in (9, 3)]
    area = truth.efficiency(energy[0].center[:, None], zenith) * np.exp(-0.5 * (offset[0].center / 2 / u.deg) ** 2)
    aeff = EffectiveAreaTable2D(axes=[energy[0], offset[0]], data=1e5 * area.to_value(""), unit="m2")
    migra = MapAxis.from_bounds(0.2, 5, nbin=150, node_type="edges", name="migra")
    edisp = EnergyDispersion2D.from_gauss(energy[1], migra, offset[1], bias=0, sigma=EDISP_SIGMA)
    rad, sigma = MapAxis.from_bounds(0, 1, 100, unit="deg", name="rad"), PSF_SIGMA.to_value("rad")
    density = np.exp(-0.5 * (rad.center.to_value("rad") / sigma) ** 2) / (2 * np.pi * sigma**2)
    psf = PSF3D(axes=[energy[2], offset[1], rad], data=np.ones((5, 3, 1)) * density, unit="sr-1")
    return aeff, edisp, psf


def _source_events(rng, run, aeff, zenith, truth):
    """Time, RA, Dec (deg) and energy of the point source's events: power law x AEFF x LIVETIME, smeared."""
    e_axis = MapAxis.from_energy_bounds(truth.energy_min, truth.energy_max, nbin=600, name="energy_true")
    flux = SOURCE_AMPLITUDE * (e_axis.center / u.TeV).to_value("") ** -SOURCE_INDEX
    offset = SkyCoord(run["RA_PNT"], run["DEC_PNT"], unit="deg").separation(SOURCE_POSITION)
    area = aeff.evaluate(energy_true=e_axis.center, offset=offset)
    n = rng.poisson((np.sum(flux * area * e_axis.bin_width) * run["LIVETIME"] * u.s).to_value(""))
    energy = _sample_energy(rng, n, SOURCE_INDEX, zenith, truth) * (1 + EDISP_SIGMA * rng.standard_normal(n))
    separation = PSF_SIGMA * np.sqrt(-2 * np.log1p(-rng.uniform(0, 1, n)))
    sky = SOURCE_POSITION.directional_offset_by(rng.uniform(0, 360, n) * u.deg, separation)
    keep = (energy >= truth.energy_min.value) & (energy <= truth.energy_max.value)
    time = rng.uniform(run["TSTART"], run["TSTOP"], keep.sum())
    return time, sky.ra.deg[keep], sky.dec.deg[keep], energy[keep]


def _run_hdus(rng, run, n, truth):
    """{HDU_CLASS: HDU} of a run: EVENTS (``n`` background events, plus the source's in a source run), GTI, IRFs."""
    zenith, pointing = run["ZEN_PNT"] * u.deg, SkyCoord(run["RA_PNT"], run["DEC_PNT"], unit="deg")
    irfs = _irfs(truth, zenith)
    energy = _sample_energy(rng, n, truth.index, zenith, truth)
    fov_lon, fov_lat = _sample_fov(rng, n, truth)
    time = rng.uniform(run["TSTART"], run["TSTOP"], n)
    with erfa_astrom.set(ErfaAstromInterpolator(300 * u.s)):  # error far below a milliarcsecond
        times = T_REF + time * u.s
        origin = pointing.transform_to(AltAz(obstime=times, location=SITE))
        frame = FoVAltAzFrame(origin=origin, location=SITE, obstime=times)
        sky = SkyCoord(fov_lon=fov_lon * u.rad, fov_lat=fov_lat * u.rad, frame=frame).icrs
    columns = [time, sky.ra.deg, sky.dec.deg, energy]
    if run["TARGET_NAME"] == "Simulated source":
        columns = [np.concatenate(pair) for pair in zip(columns, _source_events(rng, run, irfs[0], zenith, truth))]
    time, ra, dec, energy = (column[np.argsort(columns[0], kind="stable")] for column in columns)
    times = dict(TSTART=float(run["TSTART"]), TSTOP=float(run["TSTOP"]), **TIME_META)
    meta = dict(EXTNAME="EVENTS", **GADF, HDUVERS="0.3", HDUCLAS1="EVENTS", OBS_ID=int(run["OBS_ID"]), **times,
                **HESS_SITE, N_TELS=4, OBS_MODE="POINTING", RADESYS="ICRS", TELESCOP="HESS",
                CREATOR=CREATOR, **{key: float(run[key]) for key in RUN_KEYS})
    events = Table({"EVENT_ID": np.arange(1, time.size + 1), "TIME": time * u.s, "RA": ra.astype("f4") * u.deg,
                    "DEC": dec.astype("f4") * u.deg, "ENERGY": energy.astype("f4") * u.TeV}, meta=meta)
    gti = Table({"START": [times["TSTART"]] * u.s, "STOP": [times["TSTOP"]] * u.s},
                meta=dict(EXTNAME="GTI", **GADF, HDUVERS="0.3", HDUCLAS1="GTI", **times))
    hdus = {"events": fits.table_to_hdu(events), "gti": fits.table_to_hdu(gti)}
    return {**hdus, **{irf.tag: irf.to_table_hdu() for irf in irfs}}


def _write_gzip(hdus, filename):
    """HDUs gzipped without a time stamp, so that a seed always gives the same bytes."""
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(buffer)
    Path(filename).write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0))


def simulate_archive(path, n_off_runs=24, n_source_runs=6, seed=0, overwrite=False, truth=None):
    """Write a seeded simulated GADF DL3 archive whose background is `BackgroundTruth`; return its folder.

    Off runs ("Off data") point at zenith 5-55 deg; source runs ("Simulated source") wobble 0.5 deg around
    `SOURCE_POSITION` with a power-law point source. Runs last about 28 min; the same seed gives the same bytes.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Folder of the data store; created, or replaced if ``overwrite``.
    n_off_runs, n_source_runs : int, optional
        Numbers of off runs and source runs. Default is 24 and 6.
    seed : int, optional
        Seed of `numpy.random.default_rng`. Default is 0.
    overwrite : bool, optional
        Replace a non-empty ``path`` that holds nothing but an archive simulated here. Default is False.
    truth : `BackgroundTruth`, optional
        Background truth. Default is None, ``BackgroundTruth()``.
    """
    path = Path(path).expanduser().resolve()
    truth = BackgroundTruth() if truth is None else truth
    if not isinstance(truth, BackgroundTruth):
        raise TypeError(f"Expected a BackgroundTruth, got {type(truth).__name__}.")
    if n_off_runs < 0 or n_source_runs < 0 or n_off_runs + n_source_runs == 0:
        raise ValueError(f"Need at least one run, got n_off_runs={n_off_runs}, n_source_runs={n_source_runs}.")
    if overwrite:
        check_replaceable(path, CREATOR, ["data", "data/run_*", "obs-index.fits.gz", "hdu-index.fits.gz"],
                          f"{path} is not an archive simulated by bkgtemplate")
    rng = np.random.default_rng(seed)
    table = _plan_runs(rng, n_off_runs, n_source_runs, truth)
    table.meta["SIMSEED"] = int(seed)
    mu, hdu_rows = truth.expected_counts(table), []
    with staged_write(path, overwrite) as tmp:
        (tmp / "data").mkdir(parents=True)
        for idx, run in enumerate(table):
            hdus = _run_hdus(rng, run, rng.poisson(mu[idx]), truth)
            table["EVENT_COUNT"][idx] = hdus["events"].header["NAXIS2"]
            file_name = f"run_{int(run['OBS_ID']):06d}.fits.gz"
            _write_gzip(hdus.values(), tmp / "data" / file_name)
            hdu_rows += [(run["OBS_ID"], cls.split("_")[0], cls, "data", file_name, hdu.name)
                         for cls, hdu in hdus.items()]
        hdu_table = Table(rows=hdu_rows, names=["OBS_ID", "HDU_TYPE", "HDU_CLASS", "FILE_DIR", "FILE_NAME", "HDU_NAME"],
                          meta=dict(EXTNAME="HDU_INDEX", **GADF, HDUVERS="0.2", HDUCLAS1="INDEX", HDUCLAS2="HDU"))
        _write_gzip([fits.table_to_hdu(table)], tmp / "obs-index.fits.gz")
        _write_gzip([fits.table_to_hdu(hdu_table)], tmp / "hdu-index.fits.gz")
    log.info(f"Simulated archive written to {path}: {len(table)} runs ({n_off_runs} off, {n_source_runs} source), "
             f"{int(np.sum(table['EVENT_COUNT']))} events, seed {seed}")
    return path
