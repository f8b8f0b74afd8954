"""Smoothing of a background estimate across neighbouring field-of-view bins.

Counts and exposure are smoothed separately with the same Gaussian kernel along the
spatial axes only, and their ratio is the smoothed rate: a local, exposure-weighted mean
of the rate that conserves the counts and leaves the energy dependence untouched (a
steep spectrum would be biased by smoothing across energy bins).
"""

import logging
import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["smooth_rate"]

log = logging.getLogger(__name__)


def smooth_rate(histograms, sigma=1.0):
    """Smoothed background rate.

    Parameters
    ----------
    histograms : `~bkgtemplate.histograms.BackgroundHistograms`
        Counts and exposure.
    sigma : float, optional
        Width of the Gaussian kernel along each spatial axis, in bins. Default is 1.

    Returns
    -------
    rate : `~astropy.units.Quantity`
        Smoothed rate, NaN where the smoothed exposure is zero, in s-1 MeV-1 sr-1.
    """
    if sigma <= 0:
        raise ValueError(f"smooth_sigma must be positive (in bins), got {sigma}.")
    # energy is axis 0 and is not smoothed
    sigmas = (0,) + (sigma,) * (histograms.counts.ndim - 1)
    counts = gaussian_filter(histograms.counts, sigmas, mode="nearest")
    exposure = gaussian_filter(histograms.exposure.value, sigmas, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(exposure > 0, counts / exposure, np.nan)
    return (rate / histograms.exposure.unit).to(histograms.rate.unit)
