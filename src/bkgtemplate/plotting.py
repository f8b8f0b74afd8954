"""Plots of background estimates, background models and their evaluation.

gammapy conventions: a ``plot_*`` function takes ``ax=None`` (falling back to the current
axes), sets its defaults with ``kwargs.setdefault``, labels axes "Quantity [unit]" and returns
``ax``; a ``peek_*`` function draws a small grid of such plots and returns the figure.
gammapy's own `~gammapy.irf.Background2D` plots are used where they do the job.
"""

import logging
import numpy as np
import astropy.units as u
from astropy.table import Table
from astropy.visualization import quantity_support
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxis
from gammapy.maps.axes import UNIT_STRING_FORMAT
from gammapy.visualization.utils import add_colorbar
from .fov import fov_solid_angle, offset_solid_angle

__all__ = [
    "peek_histograms",
    "plot_histogram_map",
    "plot_histogram_spectra",
    "plot_histogram_profiles",
    "plot_models_comparison",
    "plot_model_ratios",
    "plot_fov_map",
    "peek_3d",
    "plot_zenith_dependence",
    "plot_ratio_per_run",
]

log = logging.getLogger(__name__)

MAP_QUANTITIES = ["rate", "counts", "exposure", "ontime", "relative_error"]
# Columns of an obs table with a readable name; EVENT_RATE is derived (EVENT_COUNT / LIVETIME).
COLUMN_LABELS = {
    "ZEN_PNT": "Zenith angle",
    "ALT_PNT": "Altitude",
    "AZ_PNT": "Azimuth",
    "SAFE_ENERGY_LO": "Safe energy threshold",
    "SAFE_ENERGY_HI": "Safe energy maximum",
    "EVENT_RATE": "Event rate",
    "EVENT_COUNT": "Events",
    "MUONEFF": "Muon efficiency",
    "LIVETIME": "Livetime",
    "ONTIME": "Ontime",
    "DEADC": "Dead-time correction",
    "OBS_ID": "Run",
}
# Fewer runs than this get one tick label each in `plot_ratio_per_run`.
MAX_RUN_TICKS = 60
# Energies of the `peek_3d` panels when none are given.
PEEK_3D_ENERGIES = [0.5, 1, 3, 10] * u.TeV
# Decades shown below the largest rate: log-interpolating towards an empty bin gives values of
# 1e-100 and less, which would squeeze the spectra (`plot_models_comparison`) into a line.
SPECTRUM_DECADES = 10
# Decades of the colour scale of a FoV map below its largest rate (`plot_fov_map`).
FOV_MAP_DECADES = 3


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers ("0.3", "1"), for axes spanning a decade or two."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def _label(quantity, unit=None):
    """Axis label "Quantity [unit]" in gammapy's unit format."""
    unit = u.Unit(unit) if unit is not None else u.dimensionless_unscaled
    if unit == u.dimensionless_unscaled:
        return quantity
    return f"{quantity} [{unit.to_string(UNIT_STRING_FORMAT)}]"


def _log_norm(values, decades=None):
    """Log colour scale spanning the finite positive values (NaN would break matplotlib's autoscale).

    With ``decades``, the scale starts at most that many decades below the largest value.
    """
    values = np.asarray(values, dtype=float)
    good = values[np.isfinite(values) & (values > 0)]
    if good.size == 0:
        return LogNorm(vmin=1, vmax=10)
    vmax = good.max()
    vmin = good.min() if decades is None else max(good.min(), vmax * 10.0**-decades)
    return LogNorm(vmin=vmin, vmax=vmax if vmax > vmin else 10 * vmin)


def _positive(values):
    """Values with zero, negative and non-finite entries set to NaN, so log axes leave them out."""
    values = np.array(values, dtype=float)
    values[~(np.isfinite(values) & (values > 0))] = np.nan
    return values


def _bin_label(axis, idx):
    """Bin range as text, "1.00-1.58 TeV"."""
    lo, hi = axis.edges[idx], axis.edges[idx + 1]
    return f"{lo.value:.2f}-{hi.value:.2f} {axis.unit}"


def _bin_index(axis, value):
    """Index of the bin that contains ``value``, clipped to the axis."""
    idx = int(np.searchsorted(axis.edges.to_value(axis.unit), u.Quantity(value).to_value(axis.unit), side="right") - 1)
    return int(np.clip(idx, 0, axis.nbin - 1))


def _spread_indices(candidates, n):
    """Up to ``n`` entries of ``candidates`` spread evenly from first to last."""
    candidates = np.asarray(candidates)
    if candidates.size <= n:
        return list(candidates)
    return list(candidates[np.unique(np.round(np.linspace(0, candidates.size - 1, n)).astype(int))])


def _fov_alignment(bkg):
    alignment = getattr(bkg, "fov_alignment", None)
    return str(getattr(alignment, "value", alignment))


def _energy_offset_maps(histograms, offset_axis=None):
    """Counts, exposure and the quantities derived from them on (energy, offset).

    A 3D estimate is averaged over rings of offset: the counts and exposure of the
    (fov_lon, fov_lat) bins whose centre falls in a ring are summed, so the ring rate is
    the exposure-weighted mean rate. Returns the energy axis, the offset axis and a dict
    of arrays of shape (n_energy, n_offset).
    """
    energy_axis = histograms.axes["energy"]
    d_energy = energy_axis.bin_width.to_value("MeV")[:, np.newaxis]
    counts = np.asarray(histograms.counts, dtype=float)
    exposure = histograms.exposure.to_value("s MeV sr")
    if histograms.is_3d:
        lon_axis, lat_axis = histograms.axes["fov_lon"], histograms.axes["fov_lat"]
        if offset_axis is None:
            r_max = min(np.abs(lon_axis.edges).max(), np.abs(lat_axis.edges).max())
            width = min(lon_axis.bin_width.min(), lat_axis.bin_width.min())
            nbin = max(1, int(np.round((r_max / width).to_value(""))))
            offset_axis = MapAxis.from_bounds(0, r_max.to_value("deg"), nbin=nbin, unit="deg", name="offset")
        lon, lat = np.meshgrid(lon_axis.center.to_value("rad"), lat_axis.center.to_value("rad"), indexing="ij")
        offset = np.arccos(np.clip(np.cos(lon) * np.cos(lat), -1, 1))
        ring = np.searchsorted(offset_axis.edges.to_value("rad"), offset.ravel(), side="right") - 1
        inside = (ring >= 0) & (ring < offset_axis.nbin)
        solid_angle_bins = fov_solid_angle(lon_axis, lat_axis).to_value("sr").ravel()

        def to_rings(values):
            flat = values.reshape(values.shape[0], -1)[:, inside]
            out = np.zeros((values.shape[0], offset_axis.nbin))
            for i_ring in range(offset_axis.nbin):
                out[:, i_ring] = flat[:, ring[inside] == i_ring].sum(axis=1)
            return out

        counts, exposure = to_rings(counts), to_rings(exposure)
        solid_angle = np.bincount(ring[inside], weights=solid_angle_bins[inside], minlength=offset_axis.nbin)
    else:
        offset_axis = histograms.axes["offset"]
        solid_angle = offset_solid_angle(offset_axis).to_value("sr")

    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(exposure > 0, counts / exposure, np.nan)
        relative_error = np.where(counts > 0, 1 / np.sqrt(counts), np.nan)
        ontime = exposure / (d_energy * solid_angle[np.newaxis, :])
    maps = {
        "counts": counts,
        "exposure": exposure,
        "rate": rate,
        "rate_error": rate * relative_error,
        "relative_error": relative_error,
        "ontime": np.where(np.isfinite(ontime), ontime, 0) / 3600,
    }
    return energy_axis, offset_axis, maps


MAP_STYLE = {
    "rate": dict(label="Background rate", unit="s-1 MeV-1 sr-1", cmap="GnBu", log=True),
    "counts": dict(label="Counts", unit="", cmap="viridis", log=True),
    "exposure": dict(label="Exposure", unit="s MeV sr", cmap="viridis", log=True),
    "ontime": dict(label="Ontime per bin", unit="h", cmap="cividis", log=False),
    "relative_error": dict(label="Relative error 1/$\\sqrt{N}$", unit="", cmap="magma_r", log=True),
}


def plot_histogram_map(
    histograms, quantity="rate", ax=None, offset_axis=None, add_cbar=True, kwargs_colorbar=None, **kwargs
):
    """Plot one quantity of a background estimate on (energy, offset).

    A 3D estimate is averaged over rings of offset (counts and exposure summed over the
    (fov_lon, fov_lat) bins whose centre is in the ring). The rate is drawn by
    `~gammapy.irf.Background2D.plot`; empty bins are left blank.

    Parameters
    ----------
    histograms : `~bkgtemplate.histograms.BackgroundHistograms`
        Background estimate, 2D or 3D.
    quantity : {"rate", "counts", "exposure", "ontime", "relative_error"}, optional
        What to draw: the rate in s-1 MeV-1 sr-1, the counts, the exposure in s MeV sr, the
        exposure divided by the bin size dE x dOmega (the ontime that went into the bin, in h,
        which shows the safe thresholds and exclusions), or the relative statistical error
        1 / sqrt(counts). Default is "rate".
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Offset rings for a 3D estimate. Default is None (rings as wide as the FoV bins, out
        to the edge of the FoV axes).
    add_cbar : bool, optional
        Add a colour bar. Default is True.
    kwargs_colorbar : dict, optional
        Keyword arguments passed to `~matplotlib.pyplot.colorbar`. Default is None.
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.pcolormesh`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    if quantity not in MAP_QUANTITIES:
        raise ValueError(f"Unknown quantity {quantity!r}; choose one of {MAP_QUANTITIES}.")
    ax = plt.gca() if ax is None else ax
    energy_axis, offset_axis, maps = _energy_offset_maps(histograms, offset_axis)
    style = MAP_STYLE[quantity]
    values = maps[quantity]
    kwargs_colorbar = dict(kwargs_colorbar or {})
    kwargs_colorbar.setdefault("label", _label(style["label"], style["unit"]))
    kwargs.setdefault("cmap", style["cmap"])
    if style["log"]:
        kwargs.setdefault("norm", _log_norm(values))
    else:
        kwargs.setdefault("vmin", 0)

    if quantity == "rate":
        bkg = Background2D(axes=[energy_axis, offset_axis], data=values, unit=style["unit"])
        bkg.plot(ax=ax, add_cbar=add_cbar, kwargs_colorbar=kwargs_colorbar, **kwargs)
        return ax

    kwargs.setdefault("edgecolors", "face")
    with quantity_support():
        mesh = ax.pcolormesh(energy_axis.edges, offset_axis.edges, np.ma.masked_invalid(values).T, **kwargs)
    energy_axis.format_plot_xaxis(ax=ax)
    offset_axis.format_plot_yaxis(ax=ax)
    if add_cbar:
        add_colorbar(mesh, ax=ax, **kwargs_colorbar)
    return ax


def _default_energy_bins(counts_per_energy, n=4, min_counts=10):
    """Up to ``n`` energy bins spread over those with at least ``min_counts`` events."""
    candidates = np.flatnonzero(counts_per_energy >= min_counts)
    if candidates.size == 0:
        candidates = np.flatnonzero(counts_per_energy > 0)
    return _spread_indices(candidates, n)


def plot_histogram_spectra(histograms, ax=None, offsets=None, offset_axis=None, **kwargs):
    """Plot the background rate of an estimate versus energy in a few offset rings.

    Each point is one bin, with its Poisson error sqrt(N) / exposure.

    Parameters
    ----------
    histograms : `~bkgtemplate.histograms.BackgroundHistograms`
        Background estimate, 2D or 3D (averaged over offset rings, see `plot_histogram_map`).
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    offsets : `~astropy.units.Quantity`, optional
        Offsets; the ring that contains each is drawn. Default is None (up to four rings
        spread over the axis).
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Offset rings for a 3D estimate. Default is None (see `plot_histogram_map`).
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.errorbar`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    ax = plt.gca() if ax is None else ax
    energy_axis, offset_axis, maps = _energy_offset_maps(histograms, offset_axis)
    if offsets is None:
        indices = _spread_indices(np.arange(offset_axis.nbin), 4)
    else:
        indices = [_bin_index(offset_axis, offset) for offset in np.atleast_1d(u.Quantity(offsets))]
    kwargs.setdefault("fmt", "o-")
    kwargs.setdefault("markersize", 3)
    kwargs.setdefault("capsize", 0)
    energy = energy_axis.center.to_value(energy_axis.unit)
    for idx in indices:
        rate, error = maps["rate"][:, idx], maps["rate_error"][:, idx]
        ax.errorbar(energy, _positive(rate), yerr=error, label=_bin_label(offset_axis, idx), **kwargs)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(energy_axis.bounds.to_value(energy_axis.unit))
    ax.set_xlabel(_label("Energy", energy_axis.unit))
    ax.set_ylabel(_label("Background rate", "s-1 MeV-1 sr-1"))
    ax.legend(title="Offset", loc="best", fontsize="small")
    return ax


def plot_histogram_profiles(histograms, ax=None, energies=None, normalize=False, offset_axis=None, **kwargs):
    """Plot the background rate of an estimate versus offset in a few energy bins.

    Parameters
    ----------
    histograms : `~bkgtemplate.histograms.BackgroundHistograms`
        Background estimate, 2D or 3D (averaged over offset rings, see `plot_histogram_map`).
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    energies : `~astropy.units.Quantity`, optional
        Energies; the bin that contains each is drawn. Default is None (up to four bins
        spread over those with at least 100 events).
    normalize : bool, optional
        Divide each profile by the rate of its energy bin averaged over the field of view
        (all counts / all exposure), on a linear scale, so that the shapes of the profiles
        can be compared. Default is False (rate in s-1 MeV-1 sr-1, log scale).
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Offset rings for a 3D estimate. Default is None (see `plot_histogram_map`).
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.errorbar`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    ax = plt.gca() if ax is None else ax
    energy_axis, offset_axis, maps = _energy_offset_maps(histograms, offset_axis)
    if energies is None:
        indices = _default_energy_bins(maps["counts"].sum(axis=1), min_counts=100)
    else:
        indices = [_bin_index(energy_axis, energy) for energy in np.atleast_1d(u.Quantity(energies))]
    kwargs.setdefault("fmt", "o-")
    kwargs.setdefault("markersize", 3)
    kwargs.setdefault("capsize", 0)
    offset = offset_axis.center.to_value(offset_axis.unit)
    for idx in indices:
        rate, error = maps["rate"][idx], maps["rate_error"][idx]
        if normalize:
            exposure = maps["exposure"][idx].sum()
            scale = maps["counts"][idx].sum() / exposure if exposure > 0 else np.nan
            rate, error = rate / scale, error / scale
        ax.errorbar(offset, _positive(rate), yerr=error, label=_bin_label(energy_axis, idx), **kwargs)
    ax.set_xlim(offset_axis.bounds.to_value(offset_axis.unit))
    ax.set_xlabel(_label("Offset", offset_axis.unit))
    if normalize:
        ax.axhline(1, color="k", linestyle="--", linewidth=1)
        ax.set_ylabel("Rate / FoV-averaged rate")
    else:
        ax.set_yscale("log")
        ax.set_ylabel(_label("Background rate", "s-1 MeV-1 sr-1"))
    ax.legend(title="Energy", loc="best", fontsize="small")
    return ax


def peek_histograms(histograms, figsize=(15, 8), offset_axis=None):
    """Summary of a background estimate in six panels.

    Top: the rate on (energy, offset) on a log colour scale, spectra in a few offset rings,
    offset profiles in a few energy bins (normalised to the FoV-averaged rate). Bottom: counts,
    ontime per bin (exposure / dE dOmega) and the relative statistical error 1 / sqrt(counts).
    A 3D estimate is averaged over offset rings (see `plot_histogram_map`).

    Parameters
    ----------
    histograms : `~bkgtemplate.histograms.BackgroundHistograms`
        Background estimate, 2D or 3D.
    figsize : tuple, optional
        Figure size in inches. Default is (15, 8).
    offset_axis : `~gammapy.maps.MapAxis`, optional
        Offset rings for a 3D estimate. Default is None (see `plot_histogram_map`).

    Returns
    -------
    fig : `~matplotlib.figure.Figure`
        The figure.

    Examples
    --------
    >>> from gammapy.data import DataStore
    >>> from bkgtemplate import BackgroundModelEstimator
    >>> from bkgtemplate.plotting import peek_histograms
    >>> data_store = DataStore.from_dir("$GAMMAPY_DATA/hess-dl3-dr1")
    >>> obs_ids = data_store.obs_table["OBS_ID"][data_store.obs_table["TARGET_NAME"] == "Off data"]
    >>> histograms = BackgroundModelEstimator().fill_histograms(data_store, obs_ids)
    >>> fig = peek_histograms(histograms)
    """
    fig, axes = plt.subplots(nrows=2, ncols=3, figsize=figsize)
    plot_histogram_map(histograms, "rate", ax=axes[0, 0], offset_axis=offset_axis)
    plot_histogram_spectra(histograms, ax=axes[0, 1], offset_axis=offset_axis)
    plot_histogram_profiles(histograms, ax=axes[0, 2], normalize=True, offset_axis=offset_axis)
    plot_histogram_map(histograms, "counts", ax=axes[1, 0], offset_axis=offset_axis)
    plot_histogram_map(histograms, "ontime", ax=axes[1, 1], offset_axis=offset_axis)
    plot_histogram_map(histograms, "relative_error", ax=axes[1, 2], offset_axis=offset_axis)
    title = f"Background estimate: {len(histograms.obs_ids)} runs, {int(np.sum(histograms.counts))} events"
    if histograms.is_3d:
        title += f" ({histograms.fov_alignment} 3D, averaged over offset rings)"
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _rate_at_offset(model, energy, offset, n_azimuth=36):
    """Rate of a 2D or 3D model at ``energy`` and ``offset``; a 3D model is averaged over a circle."""
    if isinstance(model, Background2D):
        return model.evaluate(energy=energy, offset=offset)
    phi = np.linspace(0, 2 * np.pi, n_azimuth, endpoint=False)
    rate = model.evaluate(energy=energy[:, np.newaxis], fov_lon=offset * np.cos(phi), fov_lat=offset * np.sin(phi))
    return rate.mean(axis=1)


def _check_models(models, labels):
    models = list(models)
    if not models:
        raise ValueError("No model to plot.")
    for model in models:
        if not isinstance(model, (Background2D, Background3D)):
            raise TypeError(f"Expected gammapy Background2D or Background3D models, got {type(model).__name__}.")
    labels = [f"model {i}" for i in range(len(models))] if labels is None else list(labels)
    if len(labels) != len(models):
        raise ValueError(f"Got {len(labels)} labels for {len(models)} models.")
    return models, labels


def plot_models_comparison(models, labels=None, ax=None, offset="0.5 deg", **kwargs):
    """Plot the spectra of several background models at one offset (log-log).

    Each model is evaluated (as gammapy predicts, log-interpolated) at the centres of its own
    energy bins; a `~gammapy.irf.Background3D` is averaged over the circle of radius ``offset``
    in its field of view. Model ``i`` is drawn in colour ``"Ci"``, the same as in
    `plot_model_ratios`. The y axis shows at most 10 decades below the largest rate: between
    a filled and an empty bin the log interpolation falls to values of 1e-100 and less.

    Parameters
    ----------
    models : list of `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        Background models, e.g. one per zenith bin.
    labels : list of str, optional
        Legend entries. Default is None ("model 0", "model 1", ...).
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    offset : `~astropy.coordinates.Angle` or str, optional
        Offset from the pointing. Default is "0.5 deg".
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.plot`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.

    Examples
    --------
    Spectra and their ratio to the first model, on a shared energy axis:

    >>> import matplotlib.pyplot as plt
    >>> fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, height_ratios=[3, 1])  # doctest: +SKIP
    >>> plot_models_comparison(models, labels, ax=ax1)  # doctest: +SKIP
    >>> plot_model_ratios(models, labels, ax=ax2)  # doctest: +SKIP
    """
    models, labels = _check_models(models, labels)
    ax = plt.gca() if ax is None else ax
    offset = u.Quantity(offset, "deg")
    unit = models[0].unit
    energy_unit = models[0].axes["energy"].unit
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("markersize", 3)
    rates = []
    for i, (model, label) in enumerate(zip(models, labels)):
        energy = model.axes["energy"].center
        rate = _positive(_rate_at_offset(model, energy, offset).to_value(unit))
        if np.all(np.isnan(rate)):
            log.warning(f"Model {label!r} is zero at offset {offset}: nothing drawn for it.")
        rates.append(rate)
        ax.plot(energy.to_value(energy_unit), rate, label=label, color=f"C{i}", **kwargs)
    ax.set_xscale("log")
    ax.set_yscale("log")
    rates = np.concatenate(rates)
    if np.any(np.isfinite(rates)):
        y_max = np.nanmax(rates)
        y_min = np.nanmin(rates[rates >= y_max * 10.0**-SPECTRUM_DECADES])
        ax.set_ylim(y_min / 2, y_max * 2)
    ax.set_xlabel(_label("Energy", energy_unit))
    ax.set_ylabel(_label("Background rate", unit))
    ax.legend(title=f"Offset {offset:.2f}", loc="best", fontsize="small")
    return ax


def plot_model_ratios(models, labels=None, ax=None, offset="0.5 deg", **kwargs):
    """Plot the ratio of background models to the first one, versus energy, at one offset.

    All models are evaluated at the centres of the first model's energy bins (see
    `plot_models_comparison`); the ratio is left out where the first model is zero or more
    than 10 decades below its maximum.

    Parameters
    ----------
    models : list of `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        Background models; the first is the reference.
    labels : list of str, optional
        Legend entries. Default is None ("model 0", "model 1", ...).
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    offset : `~astropy.coordinates.Angle` or str, optional
        Offset from the pointing. Default is "0.5 deg".
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.plot`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes, with one line per model after the first and a dashed line at 1.
    """
    models, labels = _check_models(models, labels)
    ax = plt.gca() if ax is None else ax
    offset = u.Quantity(offset, "deg")
    energy_axis = models[0].axes["energy"]
    energy = energy_axis.center
    reference = _rate_at_offset(models[0], energy, offset)
    reference_ok = reference.value > np.nanmax(reference.value, initial=0) * 10.0**-SPECTRUM_DECADES
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("markersize", 3)
    ax.axhline(1, color="k", linestyle="--", linewidth=1)
    for i, (model, label) in enumerate(zip(models, labels)):
        if i == 0:
            continue
        rate = _rate_at_offset(model, energy, offset).to_value(reference.unit)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reference_ok, rate / reference.value, np.nan)
        ax.plot(energy.to_value(energy_axis.unit), ratio, label=label, color=f"C{i}", **kwargs)
    ax.set_xscale("log")
    ax.set_xlabel(_label("Energy", energy_axis.unit))
    ax.set_ylabel("Ratio")
    if len(models) > 1:
        ax.legend(title=f"Ratio to {labels[0]}", loc="best", fontsize="small")
    return ax


def _is_uniform(axis):
    width = axis.bin_width.value
    return np.allclose(width, width[0], rtol=1e-4)


def plot_fov_map(bkg3d, energy="1 TeV", ax=None, add_cbar=True, kwargs_colorbar=None, **kwargs):
    """Plot a `~gammapy.irf.Background3D` in field-of-view coordinates in one energy bin.

    The bin that contains ``energy`` is drawn as it is stored (no interpolation), FoV lon
    along x and FoV lat along y, on a log colour scale spanning at most three decades below
    the largest rate (lower rates get the lowest colour); zero bins are left blank.

    Parameters
    ----------
    bkg3d : `~gammapy.irf.Background3D`
        Background model.
    energy : `~astropy.units.Quantity` or str, optional
        Energy. Default is "1 TeV".
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    add_cbar : bool, optional
        Add a colour bar labelled with the rate unit. Default is True.
    kwargs_colorbar : dict, optional
        Keyword arguments passed to `~matplotlib.pyplot.colorbar`. Default is None.
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.imshow` (`~matplotlib.pyplot.pcolormesh`
        if the FoV bins are not all of the same width).

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    if not isinstance(bkg3d, Background3D):
        raise TypeError(f"Expected a gammapy Background3D, got {type(bkg3d).__name__}.")
    ax = plt.gca() if ax is None else ax
    energy_axis = bkg3d.axes["energy"]
    lon_axis, lat_axis = bkg3d.axes["fov_lon"], bkg3d.axes["fov_lat"]
    idx = _bin_index(energy_axis, u.Quantity(energy))
    image = _positive(bkg3d.data[idx]).T
    kwargs.setdefault("cmap", "viridis")
    kwargs.setdefault("norm", _log_norm(image, decades=FOV_MAP_DECADES))
    lon_edges, lat_edges = lon_axis.edges.to_value("deg"), lat_axis.edges.to_value("deg")
    if _is_uniform(lon_axis) and _is_uniform(lat_axis):
        kwargs.setdefault("origin", "lower")
        kwargs.setdefault("interpolation", "nearest")
        extent = [lon_edges[0], lon_edges[-1], lat_edges[0], lat_edges[-1]]
        img = ax.imshow(np.ma.masked_invalid(image), extent=extent, **kwargs)
    else:
        img = ax.pcolormesh(lon_edges, lat_edges, np.ma.masked_invalid(image), **kwargs)
    ax.set_aspect("equal")
    ax.set_xlabel(_label("FoV lon", "deg"))
    ax.set_ylabel(_label("FoV lat", "deg"))
    ax.set_title(f"{_bin_label(energy_axis, idx)} ({_fov_alignment(bkg3d)})")
    if add_cbar:
        kwargs_colorbar = dict(kwargs_colorbar or {})
        kwargs_colorbar.setdefault("label", _label("Background rate", bkg3d.unit))
        add_colorbar(img, ax=ax, **kwargs_colorbar).ax.tick_params(which="both", labelsize="small")
    return ax


def peek_3d(bkg3d, energies=None, figsize=None, ncols=4):
    """Field-of-view maps of a `~gammapy.irf.Background3D` in a few energy bins.

    Parameters
    ----------
    bkg3d : `~gammapy.irf.Background3D`
        Background model.
    energies : `~astropy.units.Quantity`, optional
        Energies; the bin that contains each is drawn (see `plot_fov_map`). Default is None,
        which means 0.5, 1, 3 and 10 TeV, those outside the energy axis left out.
    figsize : tuple, optional
        Figure size in inches. Default is None (4.2 x 3.6 per panel).
    ncols : int, optional
        Number of panels per row. Default is 4.

    Returns
    -------
    fig : `~matplotlib.figure.Figure`
        The figure.
    """
    if not isinstance(bkg3d, Background3D):
        raise TypeError(f"Expected a gammapy Background3D, got {type(bkg3d).__name__}.")
    energy_axis = bkg3d.axes["energy"]
    if energies is None:
        lo, hi = energy_axis.bounds
        energies = PEEK_3D_ENERGIES[(PEEK_3D_ENERGIES >= lo) & (PEEK_3D_ENERGIES < hi)]
        if len(energies) == 0:
            energies = energy_axis.center[[energy_axis.nbin // 2]]
    energies = np.atleast_1d(u.Quantity(energies))
    ncols = min(ncols, len(energies))
    nrows = int(np.ceil(len(energies) / ncols))
    figsize = (4.2 * ncols, 3.6 * nrows) if figsize is None else figsize
    fig, axes = plt.subplots(nrows=nrows, ncols=ncols, figsize=figsize, squeeze=False)
    for ax, energy in zip(axes.flat, energies):
        plot_fov_map(bkg3d, energy, ax=ax)
    for ax in axes.flat[len(energies):]:
        ax.set_visible(False)
    fig.suptitle(f"Background3D, FoV alignment {_fov_alignment(bkg3d)}")
    fig.tight_layout()
    return fig


def _column(table, name):
    """Column of an obs table as a quantity; "EVENT_RATE" is EVENT_COUNT / LIVETIME."""
    if name == "EVENT_RATE" and name not in table.colnames:
        return (u.Quantity(table["EVENT_COUNT"]) / u.Quantity(table["LIVETIME"], "s")).to("s-1")
    if name not in table.colnames:
        raise ValueError(f"No column {name!r} in the table; columns are {table.colnames}.")
    return u.Quantity(table[name])


def plot_zenith_dependence(
    obs_table,
    ax=None,
    x="ZEN_PNT",
    y="SAFE_ENERGY_LO",
    highlight=None,
    annotate=None,
    label="runs",
    highlight_label="highlighted",
    **kwargs,
):
    """Scatter plot of one obs-table column against another, e.g. safe threshold versus zenith.

    Parameters
    ----------
    obs_table : `~astropy.table.Table`
        Observation table (e.g. ``data_store.obs_table``), one row per run.
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    x, y : str, optional
        Columns to plot; "EVENT_RATE" is computed as EVENT_COUNT / LIVETIME, in s-1, when the
        table has no such column. An energy column gets a log scale. Defaults are "ZEN_PNT"
        (deg) and "SAFE_ENERGY_LO" (TeV).
    highlight : array of bool, optional
        Runs to mark (e.g. outliers), drawn as red open circles. Default is None.
    annotate : str, optional
        Column whose value is written next to each highlighted run (e.g. "OBS_ID").
        Default is None.
    label, highlight_label : str, optional
        Legend entries of all runs and of the highlighted runs (the legend is drawn only
        when runs are highlighted). Defaults are "runs" and "highlighted".
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.scatter` for all runs.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    ax = plt.gca() if ax is None else ax
    x_values, y_values = _column(obs_table, x), _column(obs_table, y)
    kwargs.setdefault("s", 15)
    if "c" not in kwargs:
        kwargs.setdefault("color", "C0")
    ax.scatter(x_values.value, y_values.value, label=label, **kwargs)
    if highlight is not None:
        highlight = np.asarray(highlight, dtype=bool)
        if highlight.shape != (len(obs_table),):
            raise ValueError(f"highlight has shape {highlight.shape}; expected ({len(obs_table)},).")
        x_high, y_high = x_values.value[highlight], y_values.value[highlight]
        ax.scatter(x_high, y_high, s=80, facecolors="none", edgecolors="C3", linewidths=1.5, label=highlight_label)
        if annotate is not None:
            ax.margins(0.08)
            for text, xx, yy in zip(obs_table[annotate][highlight], x_high, y_high):
                ax.annotate(
                    str(text), (xx, yy), xytext=(4, 4), textcoords="offset points", fontsize="small", color="C3"
                )
        ax.legend(loc="best", fontsize="small")
    if y_values.unit.physical_type == "energy":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLogFormatter())
        ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel(_label(COLUMN_LABELS.get(x, x), x_values.unit))
    ax.set_ylabel(_label(COLUMN_LABELS.get(y, y), y_values.unit))
    return ax


def plot_ratio_per_run(table, ax=None, group=None, **kwargs):
    """Plot observed / predicted background counts per run.

    Each run gets one x position, with its OBS_ID as tick label. Runs are ordered by group
    and OBS_ID, so that groups of distinct runs (e.g. TARGET_NAME) form blocks; when the same
    run appears in several groups (e.g. MODEL), the groups are drawn side by side at the run's
    position. Each group gets a band of mean +- standard deviation of its ratios over the runs
    it covers, and a dashed line marks a ratio of 1. The legend, with each group's mean and
    standard deviation, is placed to the right of the axes.

    Parameters
    ----------
    table : `~astropy.table.Table`
        One row per run (and group), with columns OBS_ID, RATIO (observed / predicted counts)
        and ERR (its statistical error).
    ax : `~matplotlib.axes.Axes`, optional
        Matplotlib axes. Default is None (current axes).
    group : str, optional
        Column that groups and colours the points (e.g. "TARGET_NAME" or "MODEL").
        Default is None (one group).
    **kwargs : dict
        Keyword arguments passed to `~matplotlib.pyplot.errorbar`.

    Returns
    -------
    ax : `~matplotlib.axes.Axes`
        Matplotlib axes.
    """
    required = ["OBS_ID", "RATIO", "ERR"] + ([group] if group is not None else [])
    missing = [name for name in required if name not in table.colnames]
    if missing:
        raise ValueError(f"Table misses columns {missing}; it has {table.colnames}.")
    if len(table) == 0:
        raise ValueError("The table has no rows.")
    ax = plt.gca() if ax is None else ax
    table = Table(table, copy=False)
    groups = np.array([str(value) for value in table[group]]) if group is not None else np.full(len(table), "")
    group_names = list(dict.fromkeys(groups))
    obs_id = np.asarray(table["OBS_ID"], dtype=int)
    # Runs ordered by the first group they appear in, then OBS_ID.
    first_group = {}
    for name, run in zip(groups, obs_id):
        first_group.setdefault(run, group_names.index(name))
    runs = sorted(first_group, key=lambda run: (first_group[run], run))
    position = {run: i for i, run in enumerate(runs)}
    shared = len(runs) < len(table)
    width = 0.6 / len(group_names) if shared else 0

    kwargs.setdefault("fmt", "o")
    kwargs.setdefault("markersize", 4)
    kwargs.setdefault("capsize", 0)
    legend = []
    for i, name in enumerate(group_names):
        color = f"C{i}"
        rows = groups == name
        dodge = (i - (len(group_names) - 1) / 2) * width
        x = np.array([position[run] for run in obs_id[rows]]) + dodge
        ratio = np.asarray(table["RATIO"], dtype=float)[rows]
        ax.errorbar(x, ratio, yerr=np.asarray(table["ERR"], dtype=float)[rows], color=color, **kwargs)
        good = np.isfinite(ratio)
        mean = np.mean(ratio[good]) if good.any() else np.nan
        std = np.std(ratio[good], ddof=1) if good.sum() > 1 else 0.0
        x_lo, x_hi = x.min() - 0.5 - dodge, x.max() + 0.5 - dodge
        ax.fill_between([x_lo, x_hi], mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.hlines(mean, x_lo, x_hi, color=color, linewidth=1)
        stats = f"{mean:.2f} $\\pm$ {std:.2f}"
        if group is None:
            legend.append((Line2D([], [], color=color, marker="o", linestyle="none", markersize=4), "runs"))
            legend.append((Patch(color=color, alpha=0.3), f"mean $\\pm$ std: {stats}"))
        else:
            legend.append((Line2D([], [], color=color, marker="o", linestyle="-", markersize=4), f"{name}: {stats}"))
    ax.axhline(1, color="k", linestyle="--", linewidth=1)
    ax.set_xlim(-0.7, len(runs) - 0.3)
    if len(runs) <= MAX_RUN_TICKS:
        ax.set_xticks(np.arange(len(runs)))
        ax.set_xticklabels([str(run) for run in runs], rotation=90, fontsize="x-small")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
        ax.xaxis.set_major_formatter(
            plt.FuncFormatter(lambda x, _: str(runs[int(round(x))]) if 0 <= round(x) < len(runs) else "")
        )
        ax.tick_params(axis="x", labelrotation=90, labelsize="x-small")
    ax.set_xlabel(COLUMN_LABELS["OBS_ID"] + " (OBS_ID)")
    ax.set_ylabel("Observed / predicted counts")
    if group is not None:
        legend.append((Patch(color="0.5", alpha=0.3), "band: mean $\\pm$ std"))
    ax.legend(
        [handle for handle, _ in legend],
        [text for _, text in legend],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize="small",
        title=group,
    )
    return ax
