"""Rate corrections for observing conditions, and their joint likelihood fit.

A `ConditionCorrection` multiplies the rate by ``exp(coefficient x g(value))``:
``"power-law"`` ``g = log(value / reference)``, i.e. rate proportional to
``(MUONEFF / reference) ** index``; ``"cos"`` ``g = cos(value) - reference`` for an angle in
deg (cos(zenith), or the north-south asymmetry of an azimuth); ``"linear"``
``g = value - reference``. The coefficient is one number, or one per energy bin (an
*energy-dependent* correction, e.g. how the rate at each energy changes with cos(zenith)).
The transformed value is clipped to the range of the runs that built the correction (at each
energy, those with exposure there), so that a correction is never extrapolated beyond them.
`fit_corrections` fits the coefficients to the runs' counts.
"""

import logging
from dataclasses import dataclass, replace
import numpy as np
from astropy.table import Table
from scipy.optimize import minimize

__all__ = ["CORRECTION_KINDS", "ConditionCorrection", "fit_corrections"]

log = logging.getLogger(__name__)

CORRECTION_KINDS = ("power-law", "cos", "linear")
NUMBERS = ("reference", "coefficient", "clip_min", "clip_max")
"""The numbers of a correction: one each, or one per energy bin."""


@dataclass(frozen=True, eq=False)
class ConditionCorrection:
    """A multiplicative correction of the rate, ``exp(coefficient x g(value))``.

    Parameters
    ----------
    column : str
        Obs-index column, e.g. "MUONEFF".
    kind : {"power-law", "cos", "linear"}
        ``g = log(value / reference)`` (rate proportional to ``(value / reference) ** coefficient``),
        ``g = cos(value) - reference`` (value in deg) or ``g = value - reference``.
    reference : float or `~numpy.ndarray`
        Reference value (value for "power-law", cos(value) for "cos"), where g is 0; one per
        energy bin for an energy-dependent correction.
    coefficient : float or `~numpy.ndarray`, optional
        Fitted coefficient (the index for "power-law"); one per energy bin for an
        energy-dependent correction. Default is 0.
    clip_min, clip_max : float or `~numpy.ndarray`, optional
        Range of the transformed value (log(value) for "power-law", cos(value) for "cos", the
        value for "linear") over the runs that built the correction, per energy bin or for
        all; values outside are clipped to it. Default is no clipping.
    """

    column: str
    kind: str
    reference: float
    coefficient: float = 0.0
    clip_min: float = -np.inf
    clip_max: float = np.inf

    def __post_init__(self):
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(
                f"Unknown correction kind {self.kind!r} for {self.column}; choose one of {CORRECTION_KINDS}."
            )

    def __eq__(self, other):
        if not isinstance(other, ConditionCorrection):
            return NotImplemented
        return (self.column, self.kind) == (other.column, other.kind) and all(
            np.array_equal(getattr(self, name), getattr(other, name)) for name in NUMBERS
        )

    __hash__ = None  # a correction may hold arrays

    @property
    def energy_dependent(self):
        """True if any parameter has one value per energy bin."""
        return any(np.ndim(getattr(self, name)) > 0 for name in NUMBERS)

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
        """Reference: weighted mean of the transformed value (geometric mean for a power law)."""
        mean = np.average(cls.transform(kind, values), weights=weights)
        return float(np.exp(mean)) if kind == "power-law" else float(mean)

    def _reference_transformed(self):
        return np.log(self.reference) if self.kind == "power-law" else np.asarray(self.reference, dtype=float)

    def variable(self, values):
        """g(value), zero at the reference: shape ``values.shape``, plus an energy axis last if energy-dependent."""
        transformed = self.transform(self.kind, values)
        if self.energy_dependent:
            transformed = transformed[..., np.newaxis]
        return np.clip(transformed, self.clip_min, self.clip_max) - self._reference_transformed()

    def factor(self, values):
        """Correction factor ``exp(coefficient x g(value))`` (see `variable` for the shape)."""
        return np.exp(self.coefficient * self.variable(values))

    @staticmethod
    def to_table(corrections, n_energy):
        """Table of corrections: COLUMN, KIND, ENERGY_DEPENDENT and the numbers per energy bin."""
        table = Table({"COLUMN": [c.column for c in corrections], "KIND": [c.kind for c in corrections]})
        table["ENERGY_DEPENDENT"] = [c.energy_dependent for c in corrections]
        for name in NUMBERS:
            table[name.upper()] = [np.broadcast_to(getattr(c, name), (n_energy,)) for c in corrections]
        return table

    @classmethod
    def from_table(cls, table):
        """Corrections from a table written by `to_table`."""
        corrections = []
        for row in table:
            numbers = {name: np.array(row[name.upper()], dtype=float) for name in NUMBERS}
            if not row["ENERGY_DEPENDENT"]:
                numbers = {name: float(array[0]) for name, array in numbers.items()}
            corrections.append(cls(column=str(row["COLUMN"]), kind=str(row["KIND"]), **numbers))
        return corrections

    def __str__(self):
        if self.energy_dependent:
            # energy bins whose runs span a range; in the others the correction is 1
            coefficients, clip_min, clip_max = np.broadcast_arrays(self.coefficient, self.clip_min, self.clip_max)
            fitted = coefficients[clip_max > clip_min]
            span = f"{fitted.min():.3f} to {fitted.max():.3f}" if len(fitted) else "none fitted"
            return f"{self.column} {self.kind}, energy-dependent: coefficient per energy bin {span}"
        if self.kind == "power-law":
            return f"{self.column} power law: rate x ({self.column} / {self.reference:.4g}) ** {self.coefficient:.3f}"
        if self.kind == "cos":
            return (
                f"{self.column} cos: rate x exp({self.coefficient:.3f} x (cos({self.column}) - {self.reference:.4g}))"
            )
        return f"{self.column} linear: rate x exp({self.coefficient:.3f} x ({self.column} - {self.reference:.4g}))"


def _template(column, kind, values, livetime, measured, energy_dependent):
    """A correction with its references and clip ranges from the runs, coefficient 0.

    ``measured`` (n_runs, n_energy) flags the runs with exposure in each energy bin; an
    energy-dependent correction gets its reference (livetime-weighted mean) and range per bin
    from those runs.
    """
    transformed = ConditionCorrection.transform(kind, values)
    if not energy_dependent:
        reference = ConditionCorrection.reference_of(kind, values, livetime)
        return ConditionCorrection(column, kind, reference, 0.0, float(transformed.min()), float(transformed.max()))
    # an energy bin no run measured gets the mean of all runs, and a range of that one point
    weights = measured * livetime[:, None]
    total = weights.sum(axis=0)
    fallback = np.average(transformed, weights=livetime)
    mean = np.where(total > 0, transformed @ weights / np.where(total > 0, total, 1), fallback)
    seen = measured.any(axis=0)
    clip_min = np.where(seen, np.where(measured, transformed[:, None], np.inf).min(axis=0), fallback)
    clip_max = np.where(seen, np.where(measured, transformed[:, None], -np.inf).max(axis=0), fallback)
    reference = np.exp(mean) if kind == "power-law" else mean
    return ConditionCorrection(column, kind, reference, np.zeros(len(mean)), clip_min, clip_max)


def fit_corrections(kinds, values, livetime, counts, exposure, cells, weights_matrix, energy_dependent=()):
    """Correction coefficients that maximise the Poisson likelihood of the runs' counts.

    The bins' rates depend on the coefficients through the corrected exposure, so all
    coefficients are fitted jointly, the rates being profiled out (each bin's rate is its counts
    over its corrected exposure). References are livetime-weighted means over the runs (per
    energy bin over the runs with exposure there, for energy-dependent corrections), and each
    correction is clipped to the runs' range.

    Parameters
    ----------
    kinds : dict of {str: {"power-law", "cos", "linear"}}
        Correction kind per obs-index column.
    values : dict of {str: `~numpy.ndarray`}
        Value of each corrected column for each run.
    livetime : `~numpy.ndarray`
        Livetime of each run, in s.
    counts : `~numpy.ndarray`
        Counts of each run, shape ``(n_runs, n_energy, n_pixels)``.
    exposure : `~numpy.ndarray`
        Exposure of each run, same shape, in s MeV sr.
    cells : `~numpy.ndarray` of int
        Flat bin of each run.
    weights_matrix : `~numpy.ndarray`
        Interpolation weight of each run on each bin, shape ``(n_runs, n_bins)``.
    energy_dependent : tuple of str, optional
        Columns whose correction gets one coefficient per energy bin. Default is ().

    Returns
    -------
    corrections : list of `ConditionCorrection`
        Fitted corrections, in the order of ``kinds`` (empty without kinds).
    """
    if not kinds:
        return []
    n_runs, n_energy = counts.shape[:2]
    measured = exposure.sum(axis=2) > 0
    template = [
        _template(column, kind, values[column], livetime, measured, column in energy_dependent)
        for column, kind in kinds.items()
    ]
    # g of each correction for each run and energy bin, and its slice of the parameter vector
    g = np.array(
        [np.broadcast_to(c.variable(values[c.column]).reshape(n_runs, -1), (n_runs, n_energy)) for c in template]
    )
    sizes = [n_energy if c.energy_dependent else 1 for c in template]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    one_hot = np.zeros((weights_matrix.shape[1], n_runs))
    one_hot[cells, np.arange(n_runs)] = 1
    counts_flat = counts.reshape(n_runs, -1)
    counts_cell = one_hot @ counts_flat
    has_data = counts_flat > 0

    def log_factor(parameters):
        coefficients = np.array(
            [np.broadcast_to(parameters[a:b], (n_energy,)) for a, b in zip(starts[:-1], starts[1:])]
        )
        return np.einsum("ke,kne->ne", coefficients, g)

    def negative_log_likelihood(parameters):
        """The profiled Poisson likelihood and its gradient.

        mu = F X (W R) with R = C / (O (X F)) per bin: besides the direct term (mu - N) dlogF,
        the rates change with the corrected exposure, which adds -(O^T b) X F dlogF with
        b = R / E x W^T ((1 - N / mu) X F).
        """
        factor = np.exp(log_factor(parameters))[:, :, None]
        corrected = (exposure * factor).reshape(n_runs, -1)
        exposure_cell = one_hot @ corrected
        filled = exposure_cell > 0
        rate = np.where(filled, counts_cell / np.where(filled, exposure_cell, 1), 0.0)
        mu = (weights_matrix @ rate) * corrected
        good = mu > 0
        value = float(np.sum(mu[good]) - np.sum(counts_flat[good & has_data] * np.log(mu[good & has_data])))
        residual = np.where(good, 1 - counts_flat / np.where(good, mu, 1), 0.0)
        b = np.where(filled, rate / np.where(filled, exposure_cell, 1), 0.0) * (weights_matrix.T @ (residual * corrected))
        h = (residual * mu - (one_hot.T @ b) * corrected).reshape(n_runs, n_energy, -1).sum(axis=2)
        per_energy = np.einsum("ne,kne->ke", h, g)
        gradient = np.concatenate([row if size > 1 else [row.sum()] for row, size in zip(per_energy, sizes)])
        return value, gradient

    result = minimize(negative_log_likelihood, np.zeros(starts[-1]), jac=True, method="L-BFGS-B")
    if not result.success:
        log.warning(f"The correction fit did not converge ({result.message}); using its last values.")
    fitted = []
    for correction, a, b in zip(template, starts[:-1], starts[1:]):
        coefficient = result.x[a:b].copy() if correction.energy_dependent else float(result.x[a])
        fitted.append(replace(correction, coefficient=coefficient))
    return fitted
