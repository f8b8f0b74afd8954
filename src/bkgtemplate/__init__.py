"""Template background models for IACT data with gammapy 2.x, one module per stage: `data`, `geometry`,
`histograms`, `estimator`, `conditions`, `corrections`, `store`, `evaluation`, `plotting`, `simulate`."""

from importlib.metadata import version
from .conditions import BackgroundModelCollection, EmptyBinError, ObservingConditionsEstimator
from .data import DataNotFoundError, RunError, find_data_dir, open_data_store
from .estimator import (BackgroundModelEstimator, default_energy_axis, default_fov_axes, default_offset_axis,
    make_energy_axis, make_offset_axis)
from .histograms import BackgroundHistograms
from .store import write_background_store

__version__ = version("bkgtemplate")

__all__ = ["BackgroundHistograms", "BackgroundModelCollection", "BackgroundModelEstimator", "DataNotFoundError",
    "EmptyBinError", "ObservingConditionsEstimator", "RunError", "default_energy_axis", "default_fov_axes",
    "default_offset_axis", "find_data_dir", "make_energy_axis", "make_offset_axis", "open_data_store",
    "write_background_store"]
