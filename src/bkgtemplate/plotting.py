"""Plots that gammapy's Background2D and 3D lack. A ``plot_*`` takes ``ax`` (Default is None: the current axes) and
``**kwargs`` for its matplotlib call, and returns ``ax``."""

import numpy as np
import astropy.units as u
import matplotlib.pyplot as plt
from gammapy.irf import Background2D, Background3D
from gammapy.maps.axes import UNIT_STRING_FORMAT
from gammapy.visualization import add_colorbar

__all__ = ["peek_histograms", "plot_models_comparison", "plot_ratio_per_run", "plot_zenith_dependence"]

COLUMN_LABELS = {"ZEN_PNT": "Zenith angle", "SAFE_ENERGY_LO": "Safe energy threshold", "EVENT_RATE": "Event rate",
                 "MUONEFF": "Muon efficiency"}
SPECTRUM_DECADES = 10  # gammapy log-interpolates zeros as ~1e-38: rates this far below a model's maximum are left out


def _label(name, unit=""):
    unit = u.Unit(unit)
    return name if unit == u.dimensionless_unscaled else f"{name} [{unit.to_string(UNIT_STRING_FORMAT)}]"


def peek_histograms(histograms, figsize=(12, 8)):
    """Figure of energy x offset maps of the summed counts, exposure, rate and relative error 1/sqrt(N) of 2D
    histograms, empty bins blank (`~gammapy.irf.Background2D.plot` shows the model); ``figsize``: Default is (12, 8)."""
    if "offset" not in histograms.axes.names:
        raise ValueError("Only 2D (energy, offset) histograms are drawn here; for 3D use histograms.to_irf().peek().")
    (energy_axis, offset_axis), (counts, exposure) = histograms.axes, histograms.sum()
    panels = [("Counts", u.Quantity(counts), "viridis"), ("Exposure", exposure, "cividis"),
              ("Background rate", histograms.rate, "GnBu"),
              ("Relative error 1/$\\sqrt{N}$", u.Quantity(histograms.relative_error), "magma_r")]
    fig, axes = plt.subplots(2, 2, figsize=figsize, layout="tight")
    for ax, (name, values, cmap) in zip(axes.flat, panels):
        mesh = ax.pcolormesh(energy_axis.edges.value, offset_axis.edges.value, values.value.T, cmap=cmap, norm="log")
        ax.set(xscale="log", xlabel=_label("Energy", energy_axis.unit), ylabel=_label("Offset", offset_axis.unit))
        add_colorbar(mesh, ax=ax, label=_label(name, values.unit))
    fig.suptitle(f"{len(histograms)} runs, {int(counts.sum())} events")
    return fig


def plot_models_comparison(models, labels=None, ax=None, offset="0.5 deg", **kwargs):
    """Spectra of Background2D or 3D models at their energy bin centres and one ``offset`` (a 3D one averaged over that
    circle; Default is "0.5 deg"), model i in colour "Ci", with ``labels`` (Default is None: "model i")."""
    models = list(models)
    labels = [f"model {i}" for i in range(len(models))] if labels is None else list(labels)
    if not models or len(labels) != len(models) or not all(isinstance(m, (Background2D, Background3D)) for m in models):
        kinds = [type(m).__name__ for m in models]
        raise ValueError(f"Expected Background2D/3D models, one label each; got {kinds}, {labels}.")
    ax, offset = plt.gca() if ax is None else ax, u.Quantity(offset, "deg")
    unit, energy_unit = models[0].unit, models[0].axes["energy"].unit
    kwargs.setdefault("marker", "o")
    phi = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    for i, (model, label) in enumerate(zip(models, labels)):
        energy = model.axes["energy"].center
        if isinstance(model, Background2D):
            rate = model.evaluate(energy=energy, offset=offset).to_value(unit)
        else:
            circle = dict(fov_lon=offset * np.cos(phi), fov_lat=offset * np.sin(phi))
            rate = model.evaluate(energy=energy[:, None], **circle).mean(1).to_value(unit)
        rate[~(rate > np.nanmax(rate, initial=0) * 10.0**-SPECTRUM_DECADES)] = np.nan
        ax.plot(energy.to_value(energy_unit), rate, label=label, **{"color": f"C{i}", **kwargs})
    ax.set(xscale="log", yscale="log", xlabel=_label("Energy", energy_unit), ylabel=_label("Background rate", unit))
    ax.legend(title=f"Offset {offset:.2f}", fontsize="small")
    return ax


def _column(table, name):
    if name == "EVENT_RATE" and name not in table.colnames:
        return (u.Quantity(table["EVENT_COUNT"]) / u.Quantity(table["LIVETIME"], "s")).to("s-1")
    if name not in table.colnames:
        raise ValueError(f"No column {name!r} in the table; columns are {table.colnames}.")
    return u.Quantity(table[name])


def plot_zenith_dependence(table, ax=None, x="ZEN_PNT", y="SAFE_ENERGY_LO", color_by=None, **kwargs):
    """Scatter of obs-table columns ``y`` against ``x`` coloured by ``color_by`` (Default is None), e.g. the safe
    threshold versus zenith (the defaults); "EVENT_RATE" is EVENT_COUNT / LIVETIME (s-1) if absent; energy: log axis."""
    ax = plt.gca() if ax is None else ax
    x_values, y_values = _column(table, x), _column(table, y)
    colour = None if color_by is None else _column(table, color_by)
    points = ax.scatter(x_values.value, y_values.value, **({} if colour is None else {"c": colour.value}), **kwargs)
    if colour is not None:
        add_colorbar(points, ax=ax, label=_label(COLUMN_LABELS.get(color_by, color_by), colour.unit))
    ax.set(xlabel=_label(COLUMN_LABELS.get(x, x), x_values.unit), ylabel=_label(COLUMN_LABELS.get(y, y), y_values.unit),
           yscale="log" if y_values.unit.physical_type == "energy" else "linear")
    return ax


def plot_ratio_per_run(table, ax=None, group=None, **kwargs):
    """Observed / predicted counts (RATIO, ERR) per OBS_ID of an evaluation table, ordered by the column ``group``
    (Default is None) and OBS_ID; a band shows each group's mean +- std; groups that share runs are side by side."""
    if len(table) == 0 or {"OBS_ID", "RATIO", "ERR", group or "OBS_ID"} - set(table.colnames):
        raise ValueError(f"Expected rows with OBS_ID, RATIO, ERR and group {group!r}; got {len(table)} of "
                         f"{table.colnames}.")
    ax = plt.gca() if ax is None else ax
    groups = np.array([str(value) for value in table[group]]) if group else np.full(len(table), "runs")
    names = list(dict.fromkeys(groups))
    obs_id = np.asarray(table["OBS_ID"], dtype=int)
    ratio, error = np.asarray(table["RATIO"], dtype=float), np.asarray(table["ERR"], dtype=float)
    runs = list(dict.fromkeys(obs_id[np.lexsort((obs_id, [names.index(name) for name in groups]))]))
    width = 0.6 / len(names) if len(runs) < len(table) else 0.0
    kwargs.setdefault("fmt", "o")
    for i, name in enumerate(names):
        rows = groups == name
        x = np.array([runs.index(run) for run in obs_id[rows]]) + (i - (len(names) - 1) / 2) * width
        finite = ratio[rows][np.isfinite(ratio[rows])]
        mean, std = np.mean(finite), np.std(finite, ddof=1) if len(finite) > 1 else 0.0
        label = f"{name}: {mean:.2f} $\\pm$ {std:.2f}"
        ax.errorbar(x, ratio[rows], error[rows], label=label, **{"color": f"C{i}", **kwargs})
        ax.fill_between([x.min() - 0.5, x.max() + 0.5], mean - std, mean + std, color=f"C{i}", alpha=0.15, linewidth=0)
    ax.axhline(1, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(runs)), [str(run) for run in runs], rotation=90, fontsize="x-small")
    ax.set(xlim=(-0.7, len(runs) - 0.3), xlabel="Run (OBS_ID)", ylabel="Observed / predicted counts")
    ax.legend(title="mean $\\pm$ std", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return ax
