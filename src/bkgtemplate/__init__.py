"""Template background models for IACT data with gammapy 2.x.

The pipeline, one module per stage: `runs` (what each run contributes), `fov` and
`exclusion` (geometry), `histograms` (counts and exposure), `smoothing`, `estimator`
(`BackgroundModelEstimator`), `conditions` (models over zenith and optical efficiency; the
work in `condition_bins`, `corrections`, `run_histograms`, `collection` and
`conditions_estimator`), `evaluation` (held-out checks), `store` (a new gammapy data store) and
`plotting`.
"""

from importlib.metadata import version
from .conditions import BackgroundModelCollection, EmptyBinError, ObservingConditionsEstimator, RunHistograms
from .estimator import (
    BackgroundModelEstimator,
    default_energy_axis,
    default_fov_axes,
    default_offset_axis,
    make_energy_axis,
    make_offset_axis,
)
from .exclusion import Exclusion
from .histograms import BackgroundHistograms, HistogramSpec
from .runs import RunError, RunInfo, collect_runs
from .store import write_background_store

__version__ = version("bkgtemplate")

__all__ = [
    "BackgroundHistograms",
    "BackgroundModelCollection",
    "BackgroundModelEstimator",
    "EmptyBinError",
    "Exclusion",
    "HistogramSpec",
    "ObservingConditionsEstimator",
    "RunError",
    "RunHistograms",
    "RunInfo",
    "collect_runs",
    "default_energy_axis",
    "default_fov_axes",
    "default_offset_axis",
    "make_energy_axis",
    "make_offset_axis",
    "write_background_store",
]
