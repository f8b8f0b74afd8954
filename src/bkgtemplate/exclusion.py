"""Exclusion regions: which events and which part of each bin's solid angle are cut out.

Exclusion is given as sky regions (`regions.SkyRegion`, typically circles around known
sources) or as a gammapy exclusion mask (a boolean `~gammapy.maps.WcsNDMap`, True where
events are kept). Events inside are dropped, and the exposure of every bin is reduced by
the excluded fraction of its solid angle, estimated on a fine grid of equal-area points.
"""

import logging
import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.wcs import WCS
from gammapy.maps import WcsNDMap
from regions import CircleSkyRegion, SkyRegion

__all__ = ["Exclusion", "ring_points", "bin_points"]

log = logging.getLogger(__name__)


class Exclusion:
    """Sky regions or a mask to cut out of the background estimate.

    Parameters
    ----------
    exclusion : list of `~regions.SkyRegion`, `~regions.SkyRegion` or `~gammapy.maps.WcsNDMap`
        Regions to exclude, or a boolean exclusion mask (True = kept, as in gammapy).
    """

    def __init__(self, exclusion):
        if isinstance(exclusion, SkyRegion):
            exclusion = [exclusion]
        if isinstance(exclusion, WcsNDMap):
            if exclusion.data.dtype != bool:
                raise TypeError("The exclusion mask must be boolean (True where events are kept).")
            self.mask, self.regions = exclusion, []
        elif all(isinstance(region, SkyRegion) for region in exclusion):
            self.mask, self.regions = None, list(exclusion)
        else:
            raise TypeError(
                f"exclusion must be sky regions or a boolean WcsNDMap, got {type(exclusion).__name__}."
            )

    def touches(self, ra_pnt, dec_pnt, radius):
        """Whether the exclusion may overlap a field of view (all angles in rad)."""
        if self.mask is not None:
            return True
        pointing = SkyCoord(ra_pnt * u.rad, dec_pnt * u.rad)
        for region in self.regions:
            if not isinstance(region, CircleSkyRegion):
                return True
            separation = region.center.separation(pointing).to_value("rad")
            if separation < radius + region.radius.to_value("rad"):
                return True
        return False

    def excluded(self, ra, dec, ra_pnt, dec_pnt):
        """Whether sky positions are excluded.

        Parameters
        ----------
        ra, dec : `~numpy.ndarray`
            Positions, in rad.
        ra_pnt, dec_pnt : float
            Pointing position, in rad; centre of the projection used for non-circular regions.

        Returns
        -------
        excluded : `~numpy.ndarray` of bool
            True for positions inside the exclusion.
        """
        if self.mask is not None:
            coords = SkyCoord(ra * u.rad, dec * u.rad, frame="icrs")
            kept = self.mask.get_by_coord({"skycoord": coords}, fill_value=1)
            return kept == 0
        excluded = np.zeros(np.shape(ra), dtype=bool)
        coords = None
        for region in self.regions:
            if isinstance(region, CircleSkyRegion):
                # exact great-circle distance: cheaper and exact for the common case
                center = region.center.icrs
                separation = angular_separation(ra, dec, center.ra.rad, center.dec.rad)
                excluded |= separation < region.radius.to_value("rad")
            else:
                if coords is None:
                    coords = SkyCoord(ra * u.rad, dec * u.rad, frame="icrs")
                excluded |= region.contains(coords, _tangent_wcs(ra_pnt, dec_pnt))
        return excluded


def _tangent_wcs(ra_pnt, dec_pnt):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [np.rad2deg(ra_pnt), np.rad2deg(dec_pnt)]
    wcs.wcs.cdelt = [-0.01, 0.01]
    wcs.wcs.crpix = [0.0, 0.0]
    return wcs


def ring_points(offset_edges, spacing):
    """Equal-area sample points in each offset ring.

    Parameters
    ----------
    offset_edges : `~numpy.ndarray`
        Ring edges, in rad.
    spacing : float
        Approximate distance between points, in rad.

    Returns
    -------
    fov_lon, fov_lat : `~numpy.ndarray`
        Point coordinates, in rad.
    ring : `~numpy.ndarray` of int
        Ring index of each point; all points of a ring carry the same solid angle.
    """
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
    """Equal-area sample points in each (fov_lon, fov_lat) bin.

    Parameters
    ----------
    lon_edges, lat_edges : `~numpy.ndarray`
        Bin edges, in rad.
    spacing : float
        Approximate distance between points, in rad.

    Returns
    -------
    fov_lon, fov_lat : `~numpy.ndarray`
        Point coordinates, in rad.
    index : `~numpy.ndarray` of int
        Flat bin index (lon major) of each point; all points of a bin carry equal solid angle.
    """
    n_sub = max(2, int(np.ceil(np.max(np.diff(lon_edges)) / spacing)))
    fractions = (np.arange(n_sub) + 0.5) / n_sub
    lon = (lon_edges[:-1, None] + np.diff(lon_edges)[:, None] * fractions).ravel()
    sin_lat_edges = np.sin(lat_edges)
    sin_lat = (sin_lat_edges[:-1, None] + np.diff(sin_lat_edges)[:, None] * fractions).ravel()
    lon, lat = np.meshgrid(lon, np.arcsin(sin_lat), indexing="ij")
    i_lon = np.repeat(np.arange(len(lon_edges) - 1), n_sub)
    i_lat = np.repeat(np.arange(len(lat_edges) - 1), n_sub)
    index = (i_lon[:, None] * (len(lat_edges) - 1) + i_lat[None, :]).ravel()
    return lon.ravel(), lat.ravel(), index
