"""Bin-averaged truth of the simulated archive, which the tests compare with the estimator.

`expected_rate` averages the injected rate (`bkgtemplate.simulate.BackgroundTruth`) over runs and
bins as an estimator measures it; the integrals are Gauss-Legendre quadratures of the truth's own
functions with exact solid angles: nothing of the package's geometry or estimator.
"""

import numpy as np
import astropy.units as u
from bkgtemplate.simulate import RATE_UNIT

__all__ = ["box_integrals", "energy_integral", "expected_rate", "gauss_legendre_nodes", "ring_integrals"]

GL_X, GL_W = np.polynomial.legendre.leggauss(8)


def gauss_legendre_nodes(lo, hi, n_panels):
    """Composite 8-point Gauss-Legendre nodes and weights on [lo, hi] along a new last axis."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, float), np.asarray(hi, float))
    t = ((np.arange(n_panels)[:, None] + 0.5 * (1 + GL_X)) / n_panels).ravel()
    width = np.maximum(hi - lo, 0)[..., None]
    return lo[..., None] + width * t, width * np.tile(GL_W, n_panels) / (2 * n_panels)


def energy_integral(truth, lo, hi, zenith):
    """Integral of ``truth.spectrum`` over [lo, hi] (TeV), in TeV: Gauss-Legendre in ln E, panels <= 0.1."""
    lo, hi = (np.log(np.clip(e, truth.energy_min.value, truth.energy_max.value)) for e in (lo, hi))
    log_e, w = gauss_legendre_nodes(lo, hi, max(1, int(np.ceil(np.max(hi - lo, initial=0) / 0.1))))
    return np.sum(truth.spectrum(np.exp(log_e), np.asarray(zenith)[..., None]) * np.exp(log_e) * w, axis=-1)


def ring_integrals(truth, edges):
    """Integrals (sr) of ``truth.spatial`` (sin r dr dphi) and of 1 over the rings between offset ``edges`` (rad)."""
    r_lo, r_hi, r_max = edges[:-1], edges[1:], truth.offset_max.to_value("rad")
    phi, w_phi = gauss_legendre_nodes(0.0, 2 * np.pi, 8)
    r, w_r = (x[..., None] for x in gauss_legendre_nodes(r_lo, np.minimum(r_hi, r_max), 16))
    value = truth.spatial(np.arctan2(np.sin(r) * np.cos(phi), np.cos(r)), np.arcsin(np.sin(r) * np.sin(phi)))
    return np.sum(value * np.sin(r) * w_r * w_phi, axis=(-2, -1)), 2 * np.pi * (np.cos(r_lo) - np.cos(r_hi))


def box_integrals(truth, lon_edges, lat_edges):
    """Integrals (sr) of ``truth.spatial`` (cos lat dlon dlat) and of 1 over (fov_lon, fov_lat) bins (rad)."""
    lon_lo, lon_hi, lat_lo, lat_hi = np.broadcast_arrays(lon_edges[:-1, None, None], lon_edges[1:, None, None],
                                                         lat_edges[None, :-1, None], lat_edges[None, 1:, None])
    # Inside the disk a row spans |lon| <= h(lat); the lon integral kinks where h crosses a
    # lon edge and ends as a square root at |lat| = r_max: split there, lat = r_max sin(theta).
    r_max = truth.offset_max.to_value("rad")
    with np.errstate(invalid="ignore"):
        cross = [np.where(abs(e) < r_max, np.arccos(np.cos(r_max) / np.cos(e)), 0) for e in (lon_lo, lon_hi)]
    cuts = np.concatenate([lat_lo, lat_hi, *cross, -cross[0], -cross[1]], axis=-1)
    cuts = np.sort(np.clip(cuts, np.maximum(lat_lo, -r_max), np.minimum(lat_hi, r_max)), axis=-1)
    theta = np.arcsin(np.clip(cuts / r_max, -1, 1))
    theta, w_theta = gauss_legendre_nodes(theta[..., :-1], theta[..., 1:], 2)
    lat, w_lat = r_max * np.sin(theta), r_max * np.cos(theta) * w_theta
    with np.errstate(invalid="ignore"):
        half = np.nan_to_num(np.arccos(np.clip(np.cos(r_max) / np.cos(lat), -1, 1)))
    lon, w_lon = gauss_legendre_nodes(np.maximum(lon_lo[..., None], -half), np.minimum(lon_hi[..., None], half), 2)
    inner = np.sum(truth.spatial(lon, lat[..., None]) * w_lon, axis=-1)
    area = (lon_hi - lon_lo) * (np.sin(lat_hi) - np.sin(lat_lo))
    return np.sum(inner * np.cos(lat) * w_lat, axis=(-2, -1)), area[..., 0]


def expected_rate(truth, obs_table, energy_axis, offset_axis=None, fov_lon_axis=None, fov_lat_axis=None,
                  safe_threshold=True):
    """Bin-averaged truth of runs as an estimator measures it: sum(ONTIME x integral R) / sum(ONTIME x dE dOmega).

    A run enters an energy bin only at or above its SAFE_ENERGY_LO if ``safe_threshold``; NaN where none does.
    Shape (energy, offset) or (energy, fov_lon, fov_lat) (ALTAZ).
    """
    if (offset_axis is None) == (fov_lon_axis is None or fov_lat_axis is None):
        raise ValueError("Give either offset_axis, or both fov_lon_axis and fov_lat_axis.")
    if len(obs_table) == 0:
        raise ValueError("The obs table is empty: no run to average the truth over.")
    ontime = u.Quantity(obs_table["ONTIME"], "s").value
    zenith = np.deg2rad(u.Quantity(obs_table["ZEN_PNT"], "deg").value)
    norm = truth.norm_at(zenith, obs_table["MUONEFF"])
    edges = energy_axis.edges.to_value("TeV")
    weight = ontime[:, None] * np.ones(len(edges) - 1)
    if safe_threshold:
        weight *= edges[None, :-1] >= u.Quantity(obs_table["SAFE_ENERGY_LO"], "TeV").value[:, None] * (1 - 1e-6)
    energy = energy_integral(truth, edges[None, :-1], edges[None, 1:], zenith[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        spectrum = np.sum(weight * norm[:, None] * energy, axis=0) / (np.sum(weight, axis=0) * np.diff(edges))
    if offset_axis is not None:
        integral, solid_angle = ring_integrals(truth, offset_axis.edges.to_value("rad"))
    else:
        fov_edges = [axis.edges.to_value("rad") for axis in (fov_lon_axis, fov_lat_axis)]
        integral, solid_angle = box_integrals(truth, *fov_edges)
    return spectrum.reshape((-1,) + (1,) * integral.ndim) * (integral / solid_angle) * RATE_UNIT
