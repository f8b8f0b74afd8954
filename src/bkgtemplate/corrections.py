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
    """A multiplicative correction of the rate of the runs by the value of an obs-index ``column``.

    ``kind`` is one of `CORRECTION_KINDS` (see the module). ``reference`` is where g is 0 (the
    value for "power-law", cos(value) for "cos"); ``coefficient`` (default 0) is the fitted one
    (the index for "power-law"); ``clip_min`` and ``clip_max`` bound the transformed value
    (log(value), cos(value) or the value; default no clipping). Each number is a float or, for an
    energy-dependent correction, an array with one value per energy bin.
    """

    column: str
    kind: str
    reference: float
    coefficient: float = 0.0
    clip_min: float = -np.inf
    clip_max: float = np.inf

    def __post_init__(self):
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(f"Unknown correction kind {self.kind!r} for {self.column}; choose one of {CORRECTION_KINDS}.")

    def __eq__(self, other):
        if not isinstance(other, ConditionCorrection):
            return NotImplemented
        same = [np.array_equal(getattr(self, name), getattr(other, name)) for name in NUMBERS]
        return (self.column, self.kind) == (other.column, other.kind) and all(same)

    __hash__ = None  # a correction may hold arrays

    @property
    def energy_dependent(self):
        """True if any parameter has one value per energy bin."""
        return any(np.ndim(getattr(self, name)) > 0 for name in NUMBERS)

    @staticmethod
    def transform(kind, values):
        """The transformed value (before subtracting the reference)."""
        values = np.asarray(values, dtype=float)
        if kind == "cos":
            return np.cos(np.deg2rad(values))
        if kind == "power-law" and np.any(values <= 0):
            raise ValueError(f"A power-law correction needs positive values, got {values[values <= 0]}.")
        return np.log(values) if kind == "power-law" else values

    @classmethod
    def reference_of(cls, kind, values, weights):
        """Reference: weighted mean of the transformed value (geometric mean for a power law)."""
        mean = np.average(cls.transform(kind, values), weights=weights)
        return float(np.exp(mean)) if kind == "power-law" else float(mean)

    def variable(self, values):
        """g(value), zero at the reference: shape ``values.shape``, plus an energy axis last if energy-dependent."""
        transformed = self.transform(self.kind, values)
        if self.energy_dependent:
            transformed = transformed[..., np.newaxis]
        reference = np.log(self.reference) if self.kind == "power-law" else np.asarray(self.reference, dtype=float)
        return np.clip(transformed, self.clip_min, self.clip_max) - reference

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
        g = f"cos({self.column})" if self.kind == "cos" else self.column
        return f"{self.column} {self.kind}: rate x exp({self.coefficient:.3f} x ({g} - {self.reference:.4g}))"


def _template(column, kind, values, livetime, measured, energy_dependent):
    """A correction with coefficient 0, its reference (livetime-weighted mean) and clip range from the runs.

    ``measured`` (n_runs, n_energy) flags the runs with exposure in each energy bin: an
    energy-dependent correction gets its reference and range per energy bin from those runs.
    """
    transformed = ConditionCorrection.transform(kind, values)[:, None]
    measured = measured if energy_dependent else np.ones((len(transformed), 1), dtype=bool)
    weights = measured * livetime[:, None]
    total = weights.sum(axis=0)
    # an energy bin no run measured gets the mean of all runs, and a range of that one point
    fallback = np.average(transformed[:, 0], weights=livetime)
    mean = np.where(total > 0, (transformed * weights).sum(axis=0) / np.where(total > 0, total, 1), fallback)
    seen = measured.any(axis=0)
    clip_min = np.where(seen, np.where(measured, transformed, np.inf).min(axis=0), fallback)
    clip_max = np.where(seen, np.where(measured, transformed, -np.inf).max(axis=0), fallback)
    numbers = [np.exp(mean) if kind == "power-law" else mean, np.zeros(len(mean)), clip_min, clip_max]
    return ConditionCorrection(column, kind, *(numbers if energy_dependent else [float(n[0]) for n in numbers]))


def fit_corrections(kinds, values, livetime, counts, exposure, cells, weights_matrix, energy_dependent=()):
    """Correction coefficients that maximise the Poisson likelihood of the runs' counts.

    The bins' rates depend on the coefficients through the corrected exposure, so all
    coefficients are fitted jointly, the rates being profiled out (each bin's rate is its counts
    over its corrected exposure). ``kinds`` maps each corrected column to its kind, ``values`` each
    column to its value per run; ``livetime`` is in s; ``counts`` and ``exposure`` (s MeV sr) have
    shape (n_runs, n_energy, n_pixels); ``cells`` is the flat bin of each run, ``weights_matrix``
    (n_runs, n_bins) its interpolation weight on each bin. Columns in ``energy_dependent``
    (default none) get one coefficient per energy bin. Returns the fitted `ConditionCorrection`
    list, in the order of ``kinds`` (references and clip ranges as in the module docstring).
    """
    if not kinds:
        return []
    n_runs, n_energy = counts.shape[:2]
    measured = exposure.sum(axis=2) > 0
    template = [
        _template(column, kind, values[column], livetime, measured, column in energy_dependent)
        for column, kind in kinds.items()
    ]
    # g of each parameter for each run and energy bin: an energy-dependent correction has one
    # parameter per energy bin, whose g is zero in the other energy bins
    g = []
    for correction in template:
        g_runs = np.broadcast_to(correction.variable(values[correction.column]).reshape(n_runs, -1), (n_runs, n_energy))
        g.extend(g_runs * np.eye(n_energy)[:, None, :] if correction.energy_dependent else [g_runs])
    g = np.array(g)
    one_hot = (cells == np.arange(weights_matrix.shape[1])[:, None]).astype(float)  # (n_bins, n_runs)
    counts_flat = counts.reshape(n_runs, -1)
    counts_cell = one_hot @ counts_flat
    has_data = counts_flat > 0

    def negative_log_likelihood(parameters):
        """The profiled Poisson likelihood and its gradient.

        mu = F X (W R) with R = C / (O (X F)) per bin: besides the direct term (mu - N) dlogF,
        the rates change with the corrected exposure, which adds -(O^T b) X F dlogF with
        b = R / E x W^T ((1 - N / mu) X F).
        """
        factor = np.exp(np.einsum("p,pne->ne", parameters, g))[:, :, None]
        corrected = (exposure * factor).reshape(n_runs, -1)
        exposure_cell = one_hot @ corrected
        filled = exposure_cell > 0
        rate = np.where(filled, counts_cell / np.where(filled, exposure_cell, 1), 0.0)
        mu = (weights_matrix @ rate) * corrected
        good = mu > 0
        # the Poisson deviance / 2 (each term >= 0, small near the optimum): L-BFGS-B's relative ftol
        # compared with it stops at the optimum, and summing small terms loses no precision
        terms = mu - counts_flat - counts_flat * np.log(np.where(good & has_data, mu, 1) / np.where(has_data, counts_flat, 1))
        value = float(np.sum(terms[good]))
        residual = np.where(good, 1 - counts_flat / np.where(good, mu, 1), 0.0)
        b = np.where(filled, rate / np.where(filled, exposure_cell, 1), 0.0) * (weights_matrix.T @ (residual * corrected))
        h = (residual * mu - (one_hot.T @ b) * corrected).reshape(n_runs, n_energy, -1).sum(axis=2)
        return value, np.einsum("ne,pne->p", h, g)

    # parameters in units of their statistical error (about 1 / sqrt(sum of counts x g^2)): the
    # coefficients of rare high-energy events then converge as fast as the others
    information = np.einsum("ne,pne->p", counts.sum(axis=2), g**2)
    scale = 1 / np.sqrt(np.where(information > 0, information, 1))
    def scaled(q):
        value, gradient = negative_log_likelihood(q * scale)
        return value, gradient * scale
    result = minimize(scaled, np.zeros(len(g)), jac=True, method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-6})
    if not result.success:
        log.warning(f"The correction fit did not converge ({result.message}); using its last values.")
    sizes = [n_energy if correction.energy_dependent else 1 for correction in template]
    parameters = np.split(result.x * scale, np.cumsum(sizes)[:-1])
    return [
        replace(correction, coefficient=p.copy() if correction.energy_dependent else float(p[0]))
        for correction, p in zip(template, parameters)
    ]
