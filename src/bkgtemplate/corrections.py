"""Rate corrections ``exp(coefficient x g(value))`` for observing conditions, and their joint likelihood fit."""

import logging
from dataclasses import dataclass, replace
import numpy as np
from astropy.table import Table
from scipy.optimize import minimize

__all__ = ["CORRECTION_KINDS", "ConditionCorrection", "fit_corrections"]

log = logging.getLogger(__name__)

CORRECTION_KINDS = ("power-law", "cos", "linear")
NUMBERS = ("reference", "coefficient", "clip_min", "clip_max")  # one each, or one per energy bin


@dataclass(frozen=True, eq=False)
class ConditionCorrection:
    """A rate correction ``exp(coefficient x g)`` by the value of an obs-index ``column``.

    g: log(value / reference) ("power-law"), cos(value) - reference ("cos", deg) or value - reference ("linear"), the
    value clipped to [clip_min, clip_max] (the runs' range: never extrapolated); numbers: one, or one per energy bin."""

    column: str
    kind: str
    reference: float
    coefficient: float = 0.0
    clip_min: float = -np.inf
    clip_max: float = np.inf

    def __post_init__(self):
        if self.kind not in CORRECTION_KINDS:
            raise ValueError(f"Unknown correction kind {self.kind!r} for {self.column}; choose one of "
                             f"{CORRECTION_KINDS}.")

    @property
    def energy_dependent(self):
        """True if any number has one value per energy bin."""
        return any(np.ndim(getattr(self, name)) > 0 for name in NUMBERS)

    @staticmethod
    def transform(kind, values):
        """The transformed value: log(value), cos(value) or the value."""
        values = np.asarray(values, dtype=float)
        if kind == "cos":
            return np.cos(np.deg2rad(values))
        if kind == "power-law" and np.any(values <= 0):
            raise ValueError(f"A power-law correction needs positive values, got {values[values <= 0]}.")
        return np.log(values) if kind == "power-law" else values

    def variable(self, values):
        """g of each value, with an energy axis last if energy-dependent."""
        transformed = self.transform(self.kind, values)
        if self.energy_dependent:
            transformed = transformed[..., np.newaxis]
        reference = np.log(self.reference) if self.kind == "power-law" else np.asarray(self.reference, dtype=float)
        return np.clip(transformed, self.clip_min, self.clip_max) - reference

    def factor(self, values):
        """Correction factor ``exp(coefficient x g)`` of each value (shape as `variable`)."""
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
            corrections.append(cls(str(row["COLUMN"]), str(row["KIND"]), **numbers))
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


def _template(column, kind, values, livetime, measured):
    """A correction with coefficient 0, reference (livetime-weighted mean of the transformed value) and
    clip range from the runs measured in each column of ``measured`` (one, or one per energy bin)."""
    transformed = ConditionCorrection.transform(kind, values)
    x = np.ma.masked_array(np.broadcast_to(transformed[:, None], measured.shape), ~measured)
    # an energy bin no run measured gets the mean of all runs, and a range of that one point
    fallback = np.average(transformed, weights=livetime)
    mean = np.ma.average(x, axis=0, weights=np.broadcast_to(livetime[:, None], x.shape)).filled(fallback)
    clip = [x.min(axis=0).filled(fallback), x.max(axis=0).filled(fallback)]
    numbers = [np.exp(mean) if kind == "power-law" else mean, np.zeros(len(mean)), *clip]
    return ConditionCorrection(column, kind, *(numbers if measured.shape[1] > 1 else [float(n[0]) for n in numbers]))


def fit_corrections(kinds, values, livetime, counts, exposure, cells, weights_matrix, energy_dependent=()):
    """Corrections (in the order of ``kinds``) of largest Poisson likelihood, each bin's rate profiled out.

    ``counts``, ``exposure`` (s MeV sr): (n_runs, n_energy, spatial...); ``cells``: each run's flat bin;
    ``weights_matrix`` (n_runs, n_bins): its interpolation weights; ``energy_dependent`` columns: one per energy bin."""
    if not kinds:
        return []
    n_runs, n_energy = counts.shape[:2]
    exposure = exposure.reshape(n_runs, n_energy, -1)
    measured, everywhere = exposure.sum(axis=2) > 0, np.ones((n_runs, 1), dtype=bool)
    template = [_template(c, kind, values[c], livetime, measured if c in energy_dependent else everywhere)
                for c, kind in kinds.items()]
    # g of each parameter for each run and energy bin: an energy-dependent correction has one
    # parameter per energy bin, whose g is zero in the other energy bins
    g = []
    for correction in template:
        g_runs = np.broadcast_to(correction.variable(values[correction.column]).reshape(n_runs, -1), (n_runs, n_energy))
        g.extend(g_runs * np.eye(n_energy)[:, None, :] if correction.energy_dependent else [g_runs])
    # in units of about the statistical error of each parameter, 1 / sqrt(sum of counts x g^2), the
    # coefficients of energy bins with few counts converge as fast as the others
    information = np.einsum("ne,pne->p", counts.reshape(n_runs, n_energy, -1).sum(axis=2), np.square(g))
    scale = 1 / np.sqrt(np.where(information > 0, information, 1))
    g = np.array(g) * scale[:, None, None]
    one_hot = (cells == np.arange(weights_matrix.shape[1])[:, None]).astype(float)  # (n_bins, n_runs)
    counts_flat = counts.reshape(n_runs, -1)
    counts_cell = one_hot @ counts_flat
    has_data = counts_flat > 0

    def deviance(parameters):
        """Half the Poisson deviance and its gradient. mu = F X (W R) with R = C / (O (X F)) per bin:
        besides the direct term (mu - N) dlogF, the rates change with the corrected exposure, which
        adds -(O^T b) X F dlogF with b = R / E x W^T ((1 - N / mu) X F)."""
        factor = np.exp(np.einsum("p,pne->ne", parameters, g))[:, :, None]
        corrected = (exposure * factor).reshape(n_runs, -1)
        exposure_cell = one_hot @ corrected
        filled = exposure_cell > 0
        rate = np.where(filled, counts_cell / np.where(filled, exposure_cell, 1), 0.0)
        mu = (weights_matrix @ rate) * corrected
        good = mu > 0
        # terms >= 0, small near the optimum: the sum keeps its precision, and L-BFGS-B's
        # tolerance relative to it (not to the log-likelihood) lets the fit reach the optimum
        ratio = np.where(good & has_data, mu, 1) / np.where(has_data, counts_flat, 1)
        value = float(np.sum((mu - counts_flat - counts_flat * np.log(ratio))[good]))
        residual = np.where(good, 1 - counts_flat / np.where(good, mu, 1), 0.0)
        b = np.where(filled, rate / np.where(filled, exposure_cell, 1), 0.0)
        b *= weights_matrix.T @ (residual * corrected)
        h = (residual * mu - (one_hot.T @ b) * corrected).reshape(n_runs, n_energy, -1).sum(axis=2)
        return value, np.einsum("ne,pne->p", h, g)

    result = minimize(deviance, np.zeros(len(g)), jac=True, method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-6})
    if not result.success:
        log.warning(f"The correction fit did not converge ({result.message}); using its last values.")
    sizes = [n_energy if correction.energy_dependent else 1 for correction in template]
    parameters = np.split(result.x * scale, np.cumsum(sizes)[:-1])
    return [replace(correction, coefficient=p.copy() if correction.energy_dependent else float(p[0]))
            for correction, p in zip(template, parameters)]
