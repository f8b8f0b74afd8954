"""Rate corrections for observing conditions, and their joint likelihood fit.

A `ConditionCorrection` multiplies the rate by ``exp(coefficient x g(value))``:
``"power-law"`` ``g = log(value / reference)``, i.e. rate proportional to
``(MUONEFF / reference) ** index``; ``"cos"`` ``g = cos(value) - reference`` for an azimuth in
deg (the north-south asymmetry the geomagnetic field gives); ``"linear"``
``g = value - reference``. `fit_corrections` fits the coefficients to the runs' counts.
"""

import logging
from dataclasses import dataclass, replace
import numpy as np
from scipy.optimize import minimize
from .condition_bins import AZIMUTH, MUONEFF

__all__ = ["ConditionCorrection", "fit_corrections"]

log = logging.getLogger(__name__)

DEFAULT_CORRECTIONS = {MUONEFF: "power-law", AZIMUTH: "cos"}
"""Default corrections, chosen by held-out performance on the H.E.S.S. DL3 DR1 runs (see
`ObservingConditionsEstimator`)."""
CORRECTION_KINDS = ("power-law", "cos", "linear")


@dataclass(frozen=True)
class ConditionCorrection:
    """A multiplicative correction of the rate, ``exp(coefficient x g(value))``.

    Parameters
    ----------
    column : str
        Obs-index column, e.g. "MUONEFF".
    kind : {"power-law", "cos", "linear"}
        ``g = log(value / reference)`` (rate proportional to ``(value / reference) ** coefficient``),
        ``g = cos(value) - reference`` (value in deg) or ``g = value - reference``.
    reference : float
        Reference value (value for "power-law", cos(value) for "cos"); g is 0 there.
    coefficient : float
        Fitted coefficient (the index for "power-law").
    """

    column: str
    kind: str
    reference: float
    coefficient: float = 0.0

    def __post_init__(self):
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(
                f"Unknown correction kind {self.kind!r} for {self.column}; choose one of {CORRECTION_KINDS}."
            )

    @staticmethod
    def transform(kind, values):
        """The transformed value (before subtracting the reference)."""
        values = np.asarray(values, dtype=float)
        if kind == "power-law":
            if np.any(values <= 0):
                raise ValueError(f"A power-law correction needs positive values, got {values[values <= 0]}.")
            return np.log(values)
        if kind == "cos":
            return np.cos(np.deg2rad(values))
        return values

    @classmethod
    def reference_of(cls, kind, values, weights):
        """Reference: livetime-weighted mean of the transformed value (geometric mean for a power law)."""
        mean = np.average(cls.transform(kind, values), weights=weights)
        return float(np.exp(mean)) if kind == "power-law" else float(mean)

    def variable(self, values):
        """g(value): zero at the reference."""
        if self.kind == "power-law":
            return self.transform(self.kind, values) - np.log(self.reference)
        return self.transform(self.kind, values) - self.reference

    def factor(self, values):
        """Correction factor ``exp(coefficient x g(value))``."""
        return np.exp(self.coefficient * self.variable(values))

    def __str__(self):
        if self.kind == "power-law":
            return f"{self.column} power law: rate x ({self.column} / {self.reference:.4g}) ** {self.coefficient:.3f}"
        if self.kind == "cos":
            return (
                f"{self.column} cos: rate x exp({self.coefficient:.3f} x (cos({self.column}) - {self.reference:.4g}))"
            )
        return f"{self.column} linear: rate x exp({self.coefficient:.3f} x ({self.column} - {self.reference:.4g}))"



def fit_corrections(kinds, values, livetime, counts, exposure, cells, weights_matrix):
    """Correction coefficients that maximise the Poisson likelihood of the runs' counts.

    The bins' rates depend on the coefficients through the corrected exposure, so all
    coefficients are fitted jointly; the references are the runs' livetime-weighted means.

    Parameters
    ----------
    kinds : dict of {str: {"power-law", "cos", "linear"}}
        Correction kind per obs-index column.
    values : dict of {str: `~numpy.ndarray`}
        Value of each corrected column for each run.
    livetime : `~numpy.ndarray`
        Livetime of each run, in s.
    counts : `~numpy.ndarray`
        Counts of each run, shape ``(n_runs, n_pixels)``.
    exposure : `~numpy.ndarray`
        Exposure of each run, shape ``(n_runs, n_pixels)``, in s MeV sr.
    cells : `~numpy.ndarray` of int
        Flat bin of each run.
    weights_matrix : `~numpy.ndarray`
        Interpolation weight of each run on each bin, shape ``(n_runs, n_bins)``.

    Returns
    -------
    corrections : list of `ConditionCorrection`
        Fitted corrections, in the order of ``kinds`` (empty without kinds).
    """
    if not kinds:
        return []
    template = [
        ConditionCorrection(column, kind, ConditionCorrection.reference_of(kind, values[column], livetime))
        for column, kind in kinds.items()
    ]
    g = np.array([c.variable(values[c.column]) for c in template])  # (k, n_runs)
    one_hot = np.zeros((weights_matrix.shape[1], len(cells)))
    one_hot[cells, np.arange(len(cells))] = 1
    counts_cell = one_hot @ counts
    has_data = counts > 0

    def negative_log_likelihood(coefficients):
        factor = np.exp(coefficients @ g)
        exposure_cell = one_hot @ (exposure * factor[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(exposure_cell > 0, counts_cell / exposure_cell, 0.0)
        mu = (weights_matrix @ rate) * factor[:, None] * exposure
        good = mu > 0
        return float(np.sum(mu[good]) - np.sum(counts[good & has_data] * np.log(mu[good & has_data])))

    start = np.zeros(len(template))
    result = minimize(
        negative_log_likelihood,
        start,
        method="Nelder-Mead",
        options=dict(xatol=1e-4, fatol=1e-3, maxiter=2000),
    )
    if not result.success:
        log.warning(f"The correction fit did not converge ({result.message}); using its last values.")
    return [replace(c, coefficient=float(value)) for c, value in zip(template, result.x)]
