"""Background models over observing conditions: bins in obs-index columns, interpolation, corrections.

A `BackgroundModelCollection` holds one background model per bin of one or more obs-index
columns (zenith ``ZEN_PNT`` by default, or ``MUONEFF``, or any numeric column, or the derived
``NORTH_PNT``, the north component of the pointing direction) and gives a run the model of its
conditions:

- binned columns are either **interpolated** between bin centres (linear in the rate; in
  cos(zenith) for ``ZEN_PNT``, in the value itself for other columns; clipped at the first and
  last centre, never extrapolated) or looked up (the bin holding the run);
- **corrections** multiply the rate by ``exp(coefficient x g(value))`` with a coefficient fitted
  to the runs: ``"power-law"`` ``g = log(value / reference)``, i.e. rate proportional to
  ``(MUONEFF / reference) ** index``; ``"cos"`` ``g = cos(value) - reference`` for an angle in
  deg (cos(zenith)); ``"linear"`` ``g = value - reference`` (``NORTH_PNT``, the north-south
  asymmetry the geomagnetic field gives). A correction is *energy-dependent* when it has one
  coefficient per energy bin (the default for ``ZEN_PNT``: how fast the rate at each energy
  changes with zenith). The references are livetime-weighted means over the runs, so each
  bin's model is the rate at typical conditions, and a correction is clipped to the range of
  the runs that measured each energy (never extrapolated).

`ObservingConditionsEstimator` fills every run's counts and exposure once (`RunHistograms`)
and sums them per bin, so that a collection without one run (leave-one-out) costs a
subtraction, not a new pass over the events. The collection is written to FITS with one
BinTable HDU per bin (the IRF's own ``to_table_hdu``), bin edges and centres in its header.

This module gathers the names of the modules that do the work:

- `~bkgtemplate.condition_bins`: bins, interpolation weights, equal-livetime edges;
- `~bkgtemplate.corrections`: `ConditionCorrection` and the fit of its coefficients;
- `~bkgtemplate.run_histograms`: `RunHistograms`, each run's counts and exposure;
- `~bkgtemplate.collection`: `BackgroundModelCollection` and its FITS I/O;
- `~bkgtemplate.conditions_estimator`: `ObservingConditionsEstimator`.
"""

from .collection import BackgroundModelCollection
from .condition_bins import (
    AZIMUTH,
    DEFAULT_BINS,
    DEFAULT_INTERPOLATE,
    DERIVED_COLUMNS,
    MUONEFF,
    NORTH,
    TUTORIAL_ZENITH_EDGES,
    ZENITH,
    EmptyBinError,
    assign_bins,
    column_values,
    equal_livetime_edges,
    interpolation_variable,
    interpolation_weights,
    north_component,
)
from .conditions_estimator import ObservingConditionsEstimator
from .corrections import CORRECTION_KINDS, DEFAULT_CORRECTIONS, DEFAULT_ENERGY_DEPENDENT, ConditionCorrection
from .run_histograms import RunHistograms

__all__ = [
    "BackgroundModelCollection",
    "ConditionCorrection",
    "EmptyBinError",
    "ObservingConditionsEstimator",
    "RunHistograms",
    "assign_bins",
    "column_values",
    "equal_livetime_edges",
    "interpolation_variable",
    "interpolation_weights",
    "north_component",
]
