"""Held-out evaluation: per run ``RATIO = N_obs / N_pred`` (``ERR = sqrt(N_obs) / N_pred``) of the events in, and the
rate x exposure summed over, the bins above the safe threshold and ``e_min`` and within ``offset_max``, for runs a model
was not built from; over runs, bias ``|median(RATIO) - 1|`` and scatter ``1.4826 x MAD(RATIO)``."""

import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
from gammapy.utils.pbar import progress_bar
from regions import CircleSkyRegion
from .conditions import column_values
from .data import collect_runs, obs_table_rows
from .estimator import BackgroundModelEstimator
from .histograms import EDGE_RTOL, EXPOSURE_UNIT, RATE_UNIT, fill_run

__all__ = ["evaluate_models", "evaluation_mask", "held_out_evaluation", "predicted_counts", "robust_summary",
    "summarize", "target_regions"]

DEFAULT_E_MIN = 0.5 * u.TeV
DEFAULT_OFFSET_MAX = 2.0 * u.deg


def target_regions(obs_table, radii):
    """A `~regions.CircleSkyRegion` around the target of each field named in ``radii`` (TARGET_NAME: radius in deg), at
    the field's most frequent (RA_OBJ, DEC_OBJ) by LIVETIME (else ONTIME), as a few runs carry their own pointing as
    RA_OBJ; fields of one target (e.g. steady and flare samples) give one circle."""
    names = np.asarray(obs_table["TARGET_NAME"]).astype(str)
    if unknown := sorted(set(radii) - set(names)):
        raise ValueError(f"Targets {unknown} are not in the obs table's TARGET_NAME; names: {sorted(set(names))}.")
    livetime = column_values(obs_table, "LIVETIME" if "LIVETIME" in obs_table.colnames else "ONTIME")
    ra, dec = column_values(obs_table, "RA_OBJ"), column_values(obs_table, "DEC_OBJ")
    regions = {}
    for name, radius in radii.items():
        rows = (names == name) & np.isfinite(ra) & np.isfinite(dec)
        if not rows.any():
            raise ValueError(f"Target {name!r} has no RA_OBJ/DEC_OBJ in the obs table: give its position another way.")
        positions, inverse = np.unique(np.round(np.c_[ra[rows], dec[rows]], 4), axis=0, return_inverse=True)
        best = positions[np.argmax(np.bincount(inverse.ravel(), weights=livetime[rows]))]
        radius = u.Quantity(radius, "deg")
        regions.setdefault((*best, radius.value), CircleSkyRegion(SkyCoord(*best, unit="deg"), radius))
    return list(regions.values())


def evaluation_mask(axes, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX):
    """Boolean array (``axes.shape``) of the bins counted: energy lower edge >= ``e_min``, centre < ``offset_max``."""
    energy = axes["energy"].edges[:-1].to_value("TeV") >= u.Quantity(e_min, "TeV").value * (1 - EDGE_RTOL)
    offset_max = u.Quantity(offset_max, "deg").to_value("rad") * (1 - EDGE_RTOL)
    if "offset" in axes.names:
        spatial = axes["offset"].center.to_value("rad") < offset_max
    else:
        lon, lat = axes["fov_lon"].center.to_value("rad"), axes["fov_lat"].center.to_value("rad")
        spatial = np.arccos(np.clip(np.cos(lon)[:, None] * np.cos(lat)[None, :], -1, 1)) < offset_max
    return energy.reshape((-1,) + (1,) * spatial.ndim) & spatial[None]


def predicted_counts(model, exposure, mask):
    """Background counts a model predicts: the sum of rate x exposure (s MeV sr) over the masked bins."""
    if exposure.shape != model.data.shape:
        raise ValueError(f"Exposure {exposure.shape} does not match the model's axes {model.axes.names} "
                         f"{model.data.shape}.")
    return float(np.sum((model.quantity.to_value(RATE_UNIT) * exposure.to_value(EXPOSURE_UNIT))[mask]))


def _table(obs_table, n_obs, n_pred, sample=""):
    """The table of `held_out_evaluation` (ZEN_PNT, MUONEFF, AZ_PNT NaN where absent)."""
    n_obs, n_pred, n_runs = np.asarray(n_obs, float), np.asarray(n_pred, float), len(obs_table)
    table = Table({"OBS_ID": np.asarray(obs_table["OBS_ID"], dtype=int)})
    names = obs_table["TARGET_NAME"] if "TARGET_NAME" in obs_table.colnames else [""] * n_runs
    table["TARGET_NAME"] = np.asarray(names).astype(str)
    for name in ("ZEN_PNT", "MUONEFF", "AZ_PNT"):
        table[name] = column_values(obs_table, name) if name in obs_table.colnames else np.full(n_runs, np.nan)
    table["ZEN_PNT"].unit = table["AZ_PNT"].unit = "deg"
    table["N_OBS"], table["N_PRED"] = n_obs, n_pred
    with np.errstate(divide="ignore", invalid="ignore"):
        table["RATIO"] = np.where(n_pred > 0, n_obs / n_pred, np.nan)
        table["ERR"] = np.where(n_pred > 0, np.sqrt(np.maximum(n_obs, 1.0)) / n_pred, np.nan)
    table["SAMPLE"] = np.array([sample] * n_runs, dtype=str)
    return table


def robust_summary(ratios):
    """``n_runs``, ``median``, ``bias`` = |median - 1| and ``scatter`` = 1.4826 x MAD of ratios (NaN ignored)."""
    ratios = np.asarray(ratios, dtype=float)
    ratios = ratios[np.isfinite(ratios)]
    if not len(ratios):
        return {"n_runs": 0, "median": np.nan, "bias": np.nan, "scatter": np.nan}
    median = float(np.median(ratios))
    scatter = float(1.4826 * np.median(np.abs(ratios - median)))
    return {"n_runs": len(ratios), "median": median, "bias": abs(median - 1), "scatter": scatter}


def summarize(table, by="SAMPLE"):
    """N_RUNS, MEDIAN, BIAS and SCATTER of the RATIO column per value of ``by`` (None: all runs)."""
    values = np.full(len(table), "all") if by is None else np.asarray(table[by]).astype(str)
    rows = [[value, *robust_summary(table["RATIO"][values == value]).values()] for value in dict.fromkeys(values)]
    names = [by or "GROUP", "N_RUNS", "MEDIAN", "BIAS", "SCATTER"]
    return Table(rows=rows or None, names=names, dtype=[str, int, float, float, float])


def held_out_evaluation(maker, histograms, off_ids, field_ids=None, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX):
    """Observed / predicted counts of runs not used to build the collection of the ObservingConditionsEstimator.

    ``histograms`` hold the off runs ``off_ids`` and the source-field runs ``field_ids`` (Default is None), targets
    cut out. Each off run is predicted by the collection of the other off runs (SAMPLE "off (leave-one-out)"), each
    source-field run by that of all off runs (SAMPLE = its TARGET_NAME); cuts as in `evaluation_mask`. Returns one
    row per run: OBS_ID, TARGET_NAME, ZEN_PNT, MUONEFF, AZ_PNT, N_OBS, N_PRED, RATIO, ERR, SAMPLE (see `summarize`)."""
    off = histograms.select(off_ids)
    held_out = zip(progress_bar(off.obs_ids, desc="Leave-one-out"), maker.leave_one_out(off))
    predicted = [(off.select([obs_id]), collection) for _, (obs_id, collection) in held_out]
    if field_ids:
        predicted.append((histograms.select(field_ids), maker.make_collection(off)))
    mask = evaluation_mask(histograms.axes, e_min, offset_max)
    tables = []
    for runs, collection in predicted:
        models = collection.to_store_inputs(runs.obs_table)[0].values()
        n_pred = [predicted_counts(model, exposure, mask) for model, exposure in zip(models, runs.exposure)]
        tables.append(_table(runs.obs_table, runs.counts[:, mask].sum(axis=1), n_pred))
    table = vstack(tables)
    table["SAMPLE"] = np.where(np.isin(table["OBS_ID"], off.obs_ids), "off (leave-one-out)", table["TARGET_NAME"])
    return table


def evaluate_models(data_store, models, obs_ids, exclusion=None, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX,
                    sample=""):
    """Observed / predicted counts of runs, each filled in the axes and alignment of its own model, as in
    `held_out_evaluation`; ``models`` is a dict or a function of OBS_ID (e.g. the released models:
    ``lambda obs_id: data_store.obs(obs_id, required_irf="all-optional").bkg``)."""
    runs = collect_runs(data_store, obs_ids)
    n_obs, n_pred = [], []
    for run in progress_bar(runs, desc="Runs"):
        model = models[run.obs_id] if isinstance(models, dict) else models(run.obs_id)
        spatial = {f"{name}_axis": model.axes[name] for name in model.axes.names[1:]}  # offset, or fov_lon and fov_lat
        estimator = BackgroundModelEstimator(model.axes["energy"], fov_alignment=model.fov_alignment.value,
                                             exclusion=exclusion or None, **spatial)
        counts, exposure = fill_run(run, estimator)
        mask = evaluation_mask(model.axes, e_min, offset_max)
        n_obs.append(counts[mask].sum())
        n_pred.append(predicted_counts(model, exposure * EXPOSURE_UNIT, mask))
    return _table(obs_table_rows(data_store, [run.obs_id for run in runs]), n_obs, n_pred, sample)
