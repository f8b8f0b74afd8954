"""Field-of-view geometry: event coordinates in the camera frame and exact bin solid angles.

The fast vectorised transforms here reproduce gammapy's ``FoVICRSFrame`` and
``FoVAltAzFrame`` conventions (longitude reversed, origin at the pointing). They are
written by hand because astropy's frame machinery costs milliseconds per call and
much more per event, which would dominate the estimator; ``tests/test_fov.py`` checks
them against gammapy's frames.
"""

import logging
import numpy as np
import astropy.units as u

__all__ = [
    "SIDEREAL_RATE",
    "sky_to_fov_radec",
    "fov_radec_to_sky",
    "fov_radec_to_altaz",
    "fov_altaz_to_radec",
    "parallactic_angle",
    "offset_solid_angle",
    "fov_solid_angle",
]

log = logging.getLogger(__name__)

SIDEREAL_RATE = 2 * np.pi * 1.00273781191135448 / 86400.0
"""Earth rotation rate relative to the stars, in rad s-1."""


def sky_to_fov_radec(ra, dec, ra_pnt, dec_pnt):
    """Sky coordinates to RADEC-aligned field-of-view coordinates.

    Same convention as `gammapy.utils.coordinates.sky_to_fov`: the pointing is at
    (0, 0) and the longitude is reversed.

    Parameters
    ----------
    ra, dec : `~numpy.ndarray`
        Event coordinates, in rad.
    ra_pnt, dec_pnt : float
        Pointing position, in rad.

    Returns
    -------
    fov_lon, fov_lat : `~numpy.ndarray`
        Field-of-view coordinates, in rad.
    """
    x, y, z = _fov_radec_vector(ra, dec, ra_pnt, dec_pnt)
    return -np.arctan2(y, x), np.arctan2(z, np.hypot(x, y))


def _fov_radec_vector(ra, dec, ra_pnt, dec_pnt):
    """Unit vector of sky positions in the RADEC-aligned FoV frame (x to the pointing, y not reversed)."""
    d_ra = ra - ra_pnt
    # each per-event sine and cosine once: in float64 they cost more than the rest together
    cos_dec, sin_dec, cos_d_ra = np.cos(dec), np.sin(dec), np.cos(d_ra)
    x = np.cos(dec_pnt) * cos_dec * cos_d_ra + np.sin(dec_pnt) * sin_dec
    y = cos_dec * np.sin(d_ra)
    z = np.cos(dec_pnt) * sin_dec - np.sin(dec_pnt) * cos_dec * cos_d_ra
    return x, y, z


def _sky_to_fov_altaz(ra, dec, ra_pnt, dec_pnt, parallactic):
    """`fov_radec_to_altaz` of `sky_to_fov_radec` in one step, rotating the unit vector.

    Same result to rounding, without converting to RADEC-aligned angles and back.
    """
    x, y, z = _fov_radec_vector(ra, dec, ra_pnt, dec_pnt)
    cos_q, sin_q = np.cos(parallactic), np.sin(parallactic)
    y_rot = sin_q * z - cos_q * y
    z_rot = sin_q * y + cos_q * z
    return -np.arctan2(y_rot, x), np.arctan2(z_rot, np.hypot(x, y_rot))


def _offset_haversine(ra, dec, ra_pnt, dec_pnt):
    """``sin(offset / 2) ** 2`` of sky positions from the pointing, increasing with the offset.

    The haversine formula: three per-event sines and cosines, and exact at small offsets.
    """
    sin_d_dec, sin_d_ra = np.sin((dec - dec_pnt) / 2), np.sin((ra - ra_pnt) / 2)
    return sin_d_dec * sin_d_dec + np.cos(dec_pnt) * np.cos(dec) * (sin_d_ra * sin_d_ra)


def fov_radec_to_sky(fov_lon, fov_lat, ra_pnt, dec_pnt):
    """RADEC-aligned field-of-view coordinates to sky coordinates (inverse of `sky_to_fov_radec`).

    Parameters
    ----------
    fov_lon, fov_lat : `~numpy.ndarray`
        Field-of-view coordinates, in rad.
    ra_pnt, dec_pnt : float
        Pointing position, in rad.

    Returns
    -------
    ra, dec : `~numpy.ndarray`
        Sky coordinates, in rad.
    """
    lon = -np.asarray(fov_lon)
    cos_lat = np.cos(fov_lat)
    x = cos_lat * np.cos(lon)
    y = cos_lat * np.sin(lon)
    z = np.sin(fov_lat)
    x_sky = np.cos(dec_pnt) * x - np.sin(dec_pnt) * z
    z_sky = np.sin(dec_pnt) * x + np.cos(dec_pnt) * z
    ra = np.mod(ra_pnt + np.arctan2(y, x_sky), 2 * np.pi)
    return ra, np.arctan2(z_sky, np.hypot(x_sky, y))


def _rotate(fov_lon, fov_lat, angle):
    """Rotate field-of-view coordinates about the pointing direction by ``angle`` (rad)."""
    cos_lat = np.cos(fov_lat)
    x = cos_lat * np.cos(fov_lon)
    y = cos_lat * np.sin(fov_lon)
    z = np.sin(fov_lat)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    y_rot = cos_a * y - sin_a * z
    z_rot = sin_a * y + cos_a * z
    return np.arctan2(y_rot, x), np.arctan2(z_rot, np.hypot(x, y_rot))


def fov_radec_to_altaz(fov_lon, fov_lat, parallactic):
    """RADEC-aligned to ALTAZ-aligned field-of-view coordinates.

    The two frames differ by a rotation by the parallactic angle and, because the
    azimuth and the right ascension turn in opposite senses on the sky, a reflection
    of the longitude (gammapy's ``FoVAltAzFrame`` versus ``FoVICRSFrame``).

    Parameters
    ----------
    fov_lon, fov_lat : `~numpy.ndarray`
        RADEC-aligned field-of-view coordinates, in rad.
    parallactic : float or `~numpy.ndarray`
        Parallactic angle of the pointing, in rad (see `parallactic_angle`).

    Returns
    -------
    fov_lon, fov_lat : `~numpy.ndarray`
        ALTAZ-aligned field-of-view coordinates, in rad.
    """
    lon, lat = _rotate(fov_lon, fov_lat, -parallactic)
    return -lon, lat


def fov_altaz_to_radec(fov_lon, fov_lat, parallactic):
    """ALTAZ-aligned to RADEC-aligned field-of-view coordinates (inverse of `fov_radec_to_altaz`)."""
    return _rotate(-np.asarray(fov_lon), fov_lat, parallactic)


def parallactic_angle(hour_angle, dec, lat):
    """Parallactic angle of a sky position.

    Parameters
    ----------
    hour_angle : `~numpy.ndarray`
        Hour angle, in rad.
    dec : float
        Declination, in rad.
    lat : float
        Geodetic latitude of the observatory, in rad.

    Returns
    -------
    angle : `~numpy.ndarray`
        Parallactic angle, in rad.
    """
    return np.arctan2(
        np.sin(hour_angle),
        np.tan(lat) * np.cos(dec) - np.sin(dec) * np.cos(hour_angle),
    )


def offset_solid_angle(offset_axis):
    """Exact solid angle of each ring of an offset axis, ``2 pi (cos r1 - cos r2)``.

    Parameters
    ----------
    offset_axis : `~gammapy.maps.MapAxis`
        Offset axis.

    Returns
    -------
    solid_angle : `~astropy.units.Quantity`
        Solid angle of each ring, in sr.
    """
    edges = offset_axis.edges.to_value("rad")
    return 2 * np.pi * (np.cos(edges[:-1]) - np.cos(edges[1:])) * u.sr


def fov_solid_angle(fov_lon_axis, fov_lat_axis):
    """Exact solid angle of each (fov_lon, fov_lat) bin, ``dlon (sin lat2 - sin lat1)``.

    Parameters
    ----------
    fov_lon_axis, fov_lat_axis : `~gammapy.maps.MapAxis`
        Field-of-view axes.

    Returns
    -------
    solid_angle : `~astropy.units.Quantity`
        Solid angle of each bin, shape (n_lon, n_lat), in sr.
    """
    d_lon = np.diff(fov_lon_axis.edges.to_value("rad"))
    d_sin_lat = np.diff(np.sin(fov_lat_axis.edges.to_value("rad")))
    return np.outer(d_lon, d_sin_lat) * u.sr
