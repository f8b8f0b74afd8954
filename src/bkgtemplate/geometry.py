"""Geometry: event coordinates in the field of view, exact bin solid angles, exclusion regions.

The transforms reproduce gammapy's ``FoVICRSFrame`` and ``FoVAltAzFrame`` by hand: astropy's frames would dominate
the estimator's time (``tests/test_geometry.py`` checks them against gammapy)."""

import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord, angular_separation
from gammapy.maps import WcsGeom, WcsNDMap
from regions import CircleSkyRegion, SkyRegion

__all__ = ["SIDEREAL_RATE", "Exclusion", "bin_points", "fov_altaz_to_radec", "fov_radec_to_altaz",
    "fov_radec_to_sky", "fov_solid_angle", "offset_haversine", "offset_solid_angle", "parallactic_angle",
    "ring_points", "sky_to_fov_altaz", "sky_to_fov_radec"]

SIDEREAL_RATE = 2 * np.pi * 1.00273781191135448 / 86400.0  # Earth rotation relative to the stars, rad s-1


def _unit_vector(lon, lat):
    cos_lat = np.cos(lat)
    return cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)


def _lon_lat(x, y, z):
    return np.arctan2(y, x), np.arctan2(z, np.hypot(x, y))


def _rotate(a, b, angle):
    """Rotate the components ``(a, b)`` of unit vectors by ``angle`` (rad) about the third axis."""
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    return cos_a * a - sin_a * b, sin_a * a + cos_a * b


def _fov_radec_vector(ra, dec, ra_pnt, dec_pnt):
    """Unit vector of sky positions in the RADEC-aligned FoV frame (x to the pointing, y not reversed)."""
    # each per-event sine and cosine once: in float64 they cost more than the rest together
    x, y, z = _unit_vector(ra - ra_pnt, dec)
    x, z = _rotate(x, z, -dec_pnt)
    return x, y, z


def sky_to_fov_radec(ra, dec, ra_pnt, dec_pnt):
    """Sky to RADEC-aligned ``(fov_lon, fov_lat)``, as `gammapy.utils.coordinates.sky_to_fov` (all in rad)."""
    lon, lat = _lon_lat(*_fov_radec_vector(ra, dec, ra_pnt, dec_pnt))
    return -lon, lat


def sky_to_fov_altaz(ra, dec, ra_pnt, dec_pnt, parallactic):
    """Sky to ALTAZ-aligned FoV coordinates (rad), `fov_radec_to_altaz` of `sky_to_fov_radec` in one step."""
    x, y, z = _fov_radec_vector(ra, dec, ra_pnt, dec_pnt)
    y, z = _rotate(y, z, parallactic)
    return _lon_lat(x, y, z)


def offset_haversine(ra, dec, ra_pnt, dec_pnt):
    """``sin(offset / 2) ** 2`` from the pointing (rad): the haversine, exact at small offsets, no arcsin."""
    sin_d_dec, sin_d_ra = np.sin((dec - dec_pnt) / 2), np.sin((ra - ra_pnt) / 2)
    return sin_d_dec * sin_d_dec + np.cos(dec_pnt) * np.cos(dec) * (sin_d_ra * sin_d_ra)


def fov_radec_to_sky(fov_lon, fov_lat, ra_pnt, dec_pnt):
    """RADEC-aligned field-of-view to sky coordinates (inverse of `sky_to_fov_radec`), in rad."""
    x, y, z = _unit_vector(-np.asarray(fov_lon), fov_lat)
    x, z = _rotate(x, z, dec_pnt)
    d_ra, dec = _lon_lat(x, y, z)
    return np.mod(ra_pnt + d_ra, 2 * np.pi), dec


def fov_radec_to_altaz(fov_lon, fov_lat, parallactic):
    """RADEC- to ALTAZ-aligned FoV coordinates (rad): rotation by the parallactic angle, longitude reflected."""
    x, y, z = _unit_vector(fov_lon, fov_lat)
    y, z = _rotate(y, z, -parallactic)
    lon, lat = _lon_lat(x, y, z)
    return -lon, lat


def fov_altaz_to_radec(fov_lon, fov_lat, parallactic):
    """ALTAZ-aligned to RADEC-aligned field-of-view coordinates (inverse of `fov_radec_to_altaz`)."""
    x, y, z = _unit_vector(-np.asarray(fov_lon), fov_lat)
    y, z = _rotate(y, z, parallactic)
    return _lon_lat(x, y, z)


def parallactic_angle(hour_angle, dec, lat):
    """Parallactic angle (rad) of a position at ``hour_angle`` and ``dec`` seen from latitude ``lat`` (rad)."""
    return np.arctan2(np.sin(hour_angle), np.tan(lat) * np.cos(dec) - np.sin(dec) * np.cos(hour_angle))


def offset_solid_angle(offset_axis):
    """Exact solid angle of each ring of an offset `~gammapy.maps.MapAxis`, ``2 pi (cos r1 - cos r2)``, in sr."""
    edges = offset_axis.edges.to_value("rad")
    return 2 * np.pi * (np.cos(edges[:-1]) - np.cos(edges[1:])) * u.sr


def fov_solid_angle(fov_lon_axis, fov_lat_axis):
    """Exact solid angle of each (fov_lon, fov_lat) bin, ``dlon (sin lat2 - sin lat1)``, shape (n_lon, n_lat), in sr."""
    d_lon = np.diff(fov_lon_axis.edges.to_value("rad"))
    d_sin_lat = np.diff(np.sin(fov_lat_axis.edges.to_value("rad")))
    return np.outer(d_lon, d_sin_lat) * u.sr


def ring_points(offset_edges, spacing):
    """Equal-area points ``(fov_lon, fov_lat, ring index)`` in each offset ring (edges, spacing and points in rad)."""
    lon, lat, ring = [], [], []
    for idx, (r_lo, r_hi) in enumerate(zip(offset_edges[:-1], offset_edges[1:])):
        n_r = max(2, int(np.ceil((r_hi - r_lo) / spacing)))
        n_phi = max(8, int(np.ceil(2 * np.pi * r_hi / spacing)))
        cos_r = np.linspace(np.cos(r_lo), np.cos(r_hi), 2 * n_r + 1)[1::2]
        phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
        r, phi = np.meshgrid(np.arccos(cos_r), phi, indexing="ij")
        x, y, z = np.cos(r), np.sin(r) * np.sin(phi), np.sin(r) * np.cos(phi)
        lon.append(np.arctan2(y, x).ravel())
        lat.append(np.arcsin(z).ravel())
        ring.append(np.full(r.size, idx))
    return np.concatenate(lon), np.concatenate(lat), np.concatenate(ring)


def bin_points(lon_edges, lat_edges, spacing):
    """Equal-area points ``(fov_lon, fov_lat, flat bin index)`` in each (fov_lon, fov_lat) bin (all in rad)."""
    n_sub = max(2, int(np.ceil(np.max(np.diff(lon_edges)) / spacing)))
    fractions = (np.arange(n_sub) + 0.5) / n_sub
    lon, sin_lat = ((edges[:-1, None] + np.diff(edges)[:, None] * fractions).ravel()
                    for edges in (lon_edges, np.sin(lat_edges)))
    lon, lat = np.meshgrid(lon, np.arcsin(sin_lat), indexing="ij")
    n_lat = len(lat_edges) - 1
    index = np.add.outer(np.repeat(np.arange(len(lon_edges) - 1) * n_lat, n_sub), np.repeat(np.arange(n_lat), n_sub))
    return lon.ravel(), lat.ravel(), index.ravel()


class Exclusion:
    """Sky regions (one or a list) or a boolean `~gammapy.maps.WcsNDMap` mask (True = kept) to cut out."""

    def __init__(self, exclusion):
        if isinstance(exclusion, SkyRegion):
            exclusion = [exclusion]
        if isinstance(exclusion, WcsNDMap):
            if exclusion.data.dtype != bool:
                raise TypeError("The exclusion mask must be boolean (True where events are kept).")
            self.mask, self.regions = exclusion, []
            return
        if not isinstance(exclusion, (list, tuple)) or not exclusion:
            raise TypeError(f"exclusion must be a sky region, a list of sky regions or a boolean WcsNDMap, "
                            f"got {type(exclusion).__name__}.")
        if bad := [type(region).__name__ for region in exclusion if not isinstance(region, SkyRegion)]:
            raise TypeError(f"exclusion must hold sky regions (regions.SkyRegion), got {bad[0]}; "
                            "convert pixel regions with .to_sky(wcs) and give a SkyCoord as a CircleSkyRegion.")
        self.mask, self.regions = None, list(exclusion)

    def touches(self, ra_pnt, dec_pnt, radius):
        """Whether the exclusion may overlap a field of view of ``radius`` around the pointing (rad)."""
        pointing = SkyCoord(ra_pnt * u.rad, dec_pnt * u.rad)
        near = [region.center.separation(pointing) < radius * u.rad + region.radius
                for region in self.regions if isinstance(region, CircleSkyRegion)]
        return self.mask is not None or len(near) < len(self.regions) or any(near)

    def excluded(self, ra, dec, ra_pnt, dec_pnt):
        """Whether sky positions (rad) are excluded; non-circular regions are projected around the pointing."""
        coords = SkyCoord(ra * u.rad, dec * u.rad, frame="icrs")
        if self.mask is not None:
            return self.mask.get_by_coord({"skycoord": coords}, fill_value=1) == 0
        excluded = np.zeros(np.shape(ra), dtype=bool)
        for region in self.regions:
            if isinstance(region, CircleSkyRegion):
                # exact great-circle distance: cheaper than a projection, and exact
                center = region.center.icrs
                excluded |= angular_separation(ra, dec, center.ra.rad, center.dec.rad) < region.radius.to_value("rad")
            else:
                skydir = (np.rad2deg(ra_pnt), np.rad2deg(dec_pnt))
                excluded |= region.contains(coords, WcsGeom.create(skydir=skydir, binsz=0.01, proj="TAN").wcs)
        return excluded
