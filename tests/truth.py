"""Bin-averaged truth of the simulated archive, which the tests compare with the estimator.

`expected_rate` averages the injected rate (`bkgtemplate.simulate.BackgroundTruth`) over runs and
bins as an estimator measures it; the integrals are Gauss-Legendre quadratures of the truth's own
functions with exact solid angles: nothing of the package's geometry or estimator.
"""

import numpy as np
import astropy.units as u
from bkgtemplate.simulate import RATE_UNIT, gauss_legendre_nodes

__all__ = ["box_integrals", "expected_rate"]


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
    energy = truth.energy_integral(edges[None, :-1], edges[None, 1:], zenith[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        spectrum = np.sum(weight * norm[:, None] * energy, axis=0) / (np.sum(weight, axis=0) * np.diff(edges))
    if offset_axis is not None:
        integral, solid_angle = truth.ring_integrals(offset_axis.edges.to_value("rad"))
    else:
        fov_edges = [axis.edges.to_value("rad") for axis in (fov_lon_axis, fov_lat_axis)]
        integral, solid_angle = box_integrals(truth, *fov_edges)
    return spectrum.reshape((-1,) + (1,) * integral.ndim) * (integral / solid_angle) * RATE_UNIT
