"""Held-out evaluation: observed over predicted counts for runs a model was not built from.

For each run, the prediction is the run's model x ONTIME integrated over the kept part of the
field of view (outside the exclusion regions), over energy bins whose lower edge is at or above
both the run's safe threshold and ``e_min`` (0.5 TeV), and over spatial bins whose centre is
less than ``offset_max`` (2 deg) from the pointing::

    N_pred = sum over bins of rate x exposure,  exposure = ONTIME x dE x dOmega x kept fraction

with the exposure histogram filled by the estimator's machinery in the model's own axes and
alignment. The observed counts ``N_obs`` are the events in the same bins. Per run,
``RATIO = N_obs / N_pred`` and ``ERR = sqrt(N_obs) / N_pred``; over runs, the bias is
``|median(RATIO) - 1|`` and the scatter the robust run-to-run spread ``1.4826 x MAD(RATIO)``.

Two held-out samples (see `held_out_evaluation`): every off run predicted by a collection built
from the other off runs (leave-one-out), and the source-field runs predicted by the collection
built from all off runs, with a circle around each target cut out (`target_regions`).

Exclusion radii, chosen on the H.E.S.S. DR1 fields from the counts over the off-run model in
0.1 deg rings around the target (E > 0.5 TeV) and from the median ratio of each field's runs as
the circle grows: Crab and PKS 2155-304 show an excess out to 0.4 deg, and their median ratio
changes by less than 1 % when the circle grows beyond 0.5 deg (0.5 deg used); MSH 15-52 is
extended to about 0.6 deg (0.8 deg used, ratio stable from 0.5 to 1.3 deg); RX J1713.7-3946 is a
shell of about 0.6 deg radius (1.0 deg used). RX J1713.7-3946 is reported on its own and kept out
of the "source fields" summary: its ratio does not change when the circle grows from 0.6 to 1.6
deg (1.38 to 1.36 with the tutorial zenith bins, interpolated), i.e. the whole Galactic-plane
field (diffuse emission; CTB 37A/B and HESS J1708-410 within 2 deg) sits above the background of
the extragalactic off runs, which a model built from them cannot know (the released models,
built from many more runs, also under-predict it by 9 %).
"""

import logging
from dataclasses import replace
import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
from gammapy.irf import Background3D
from gammapy.utils.pbar import progress_bar
from regions import CircleSkyRegion
from .collection import BackgroundModelCollection
from .condition_bins import column_values
from .exclusion import Exclusion
from .histograms import EXPOSURE_UNIT, RATE_UNIT, HistogramSpec, fill_run
from .run_histograms import RunHistograms
from .runs import collect_runs, obs_table_rows

__all__ = [
    "DEFAULT_EXCLUSION_RADIUS",
    "EXCLUSION_RADII",
    "SEPARATE_FIELDS",
    "evaluate_models",
    "evaluate_predictions",
    "evaluate_released",
    "evaluation_histograms",
    "evaluation_mask",
    "held_out_evaluation",
    "predicted_counts",
    "robust_summary",
    "split_runs",
    "summarize",
    "target_regions",
]

log = logging.getLogger(__name__)

OFF_TARGET = "Off data"
DEFAULT_E_MIN = 0.5 * u.TeV
DEFAULT_OFFSET_MAX = 2.0 * u.deg
DEFAULT_EXCLUSION_RADIUS = 0.5 * u.deg
"""Radius cut out around point-like targets (Crab, PKS 2155-304)."""
EXCLUSION_RADII = {"MSH 15-52": 0.8 * u.deg, "RX J1713.7-3946": 1.0 * u.deg}
"""Radius cut out around the extended targets of the H.E.S.S. DR1 release."""
SEPARATE_FIELDS = ("RX J1713.7-3946",)
"""Fields reported on their own, not in the "source fields" summary (see the module notes)."""
OFF_SAMPLE = "off (leave-one-out)"
FIELD_SAMPLE = "source fields"
# relative slack when comparing bin edges with energy cuts (float32 values in the files)
_RTOL = 1e-6


def _names(column):
    return np.array([name.decode() if isinstance(name, bytes) else str(name) for name in column])


def split_runs(obs_table, off_target=OFF_TARGET):
    """Off runs and source-field runs of an obs index, by TARGET_NAME.

    Parameters
    ----------
    obs_table : `~astropy.table.Table`
        Obs index.
    off_target : str, optional
        TARGET_NAME of the off runs. Default is "Off data".

    Returns
    -------
    off_ids, field_ids : list of int
        Run numbers.
    """
    names = _names(obs_table["TARGET_NAME"])
    obs_ids = np.asarray(obs_table["OBS_ID"], dtype=int)
    return [int(i) for i in obs_ids[names == off_target]], [int(i) for i in obs_ids[names != off_target]]


def target_regions(obs_table, radius=None, off_target=OFF_TARGET):
    """A circle around the target of each source field.

    The target of a TARGET_NAME is its most frequent (RA_OBJ, DEC_OBJ), weighted by livetime: a
    few runs of a field (survey pointings) carry their own pointing as RA_OBJ.

    Parameters
    ----------
    obs_table : `~astropy.table.Table`
        Obs index with TARGET_NAME, RA_OBJ and DEC_OBJ.
    radius : `~astropy.units.Quantity` or dict of {str: `~astropy.units.Quantity`}, optional
        Radius for all targets, or per TARGET_NAME (others get `DEFAULT_EXCLUSION_RADIUS`).
        Default is None (`EXCLUSION_RADII`, and 0.5 deg for the others).
    off_target : str, optional
        TARGET_NAME of the off runs, which get no circle. Default is "Off data".

    Returns
    -------
    regions : list of `~regions.CircleSkyRegion`
        One circle per target.
    """
    radii = dict(EXCLUSION_RADII) if radius is None else radius
    names = _names(obs_table["TARGET_NAME"])
    livetime = column_values(obs_table, "LIVETIME" if "LIVETIME" in obs_table.colnames else "ONTIME")
    ra, dec = column_values(obs_table, "RA_OBJ"), column_values(obs_table, "DEC_OBJ")
    regions, seen = [], set()
    for name in dict.fromkeys(names):
        if name == off_target:
            continue
        rows = (names == name) & np.isfinite(ra) & np.isfinite(dec)
        if not rows.any():
            log.warning(f"Target {name!r} has no RA_OBJ/DEC_OBJ: nothing cut out around it.")
            continue
        positions = np.round(np.c_[ra[rows], dec[rows]], 4)
        unique, inverse = np.unique(positions, axis=0, return_inverse=True)
        best = unique[np.argmax(np.bincount(inverse.ravel(), weights=livetime[rows]))]
        r = u.Quantity(radii.get(name, DEFAULT_EXCLUSION_RADIUS) if isinstance(radii, dict) else radii, "deg")
        # several TARGET_NAMEs of one target (PKS 2155-304 steady and flare) give one circle
        key = (best[0], best[1], round(r.value, 6))
        if key not in seen:
            seen.add(key)
            regions.append(CircleSkyRegion(SkyCoord(best[0], best[1], unit="deg"), r))
    return regions


def evaluation_mask(axes, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX):
    """Bins that enter the held-out counts.

    Parameters
    ----------
    axes : `~gammapy.maps.MapAxes`
        Energy and spatial axes (offset, or fov_lon and fov_lat).
    e_min : `~astropy.units.Quantity`, optional
        Energy bins whose lower edge is below it are left out. Default is 0.5 TeV.
    offset_max : `~astropy.units.Quantity`, optional
        Spatial bins whose centre is this far from the pointing or farther are left out.
        Default is 2 deg.

    Returns
    -------
    mask : `~numpy.ndarray` of bool
        Shape ``axes.shape``.
    """
    e_min = u.Quantity(e_min, "TeV")
    # a centre on offset_max (to rounding) is out
    offset_max = u.Quantity(offset_max, "deg").to_value("rad") * (1 - _RTOL)
    energy = axes["energy"].edges[:-1].to_value("TeV") >= e_min.to_value("TeV") * (1 - _RTOL)
    if "offset" in axes.names:
        spatial = axes["offset"].center.to_value("rad") < offset_max
    else:
        lon = axes["fov_lon"].center.to_value("rad")
        lat = axes["fov_lat"].center.to_value("rad")
        spatial = np.arccos(np.clip(np.cos(lon)[:, None] * np.cos(lat)[None, :], -1, 1)) < offset_max
    return energy.reshape((-1,) + (1,) * spatial.ndim) & spatial[None]


def predicted_counts(model, exposure, mask):
    """Background counts a model predicts: sum of rate x exposure over the masked bins.

    Parameters
    ----------
    model : `~gammapy.irf.Background2D` or `~gammapy.irf.Background3D`
        Model, rate in s-1 MeV-1 sr-1 per ONTIME.
    exposure : `~astropy.units.Quantity`
        ONTIME x dE x dOmega of the run in the model's bins, in s MeV sr.
    mask : `~numpy.ndarray` of bool
        Bins to sum (see `evaluation_mask`).

    Returns
    -------
    n_pred : float
        Predicted counts.
    """
    if exposure.shape != model.data.shape:
        raise ValueError(
            f"Exposure of shape {exposure.shape} does not match the model's axes {model.axes.names} "
            f"{model.data.shape}: fill it in the model's own axes."
        )
    rate = model.quantity.to_value(RATE_UNIT)
    return float(np.sum((rate * exposure.to_value(EXPOSURE_UNIT))[mask]))


def _row(obs_row, n_obs, n_pred, sample):
    ratio = n_obs / n_pred if n_pred > 0 else np.nan
    err = np.sqrt(max(n_obs, 1.0)) / n_pred if n_pred > 0 else np.nan
    name = obs_row["TARGET_NAME"] if "TARGET_NAME" in obs_row.colnames else ""
    return {
        "OBS_ID": int(obs_row["OBS_ID"]),
        "TARGET_NAME": name.decode() if isinstance(name, bytes) else str(name),
        "ZEN_PNT": float(obs_row["ZEN_PNT"]) if "ZEN_PNT" in obs_row.colnames else np.nan,
        "MUONEFF": float(obs_row["MUONEFF"]) if "MUONEFF" in obs_row.colnames else np.nan,
        "AZ_PNT": float(obs_row["AZ_PNT"]) if "AZ_PNT" in obs_row.colnames else np.nan,
        "N_OBS": float(n_obs),
        "N_PRED": float(n_pred),
        "RATIO": ratio,
        "ERR": err,
        "SAMPLE": sample,
    }


_COLUMNS = ["OBS_ID", "TARGET_NAME", "ZEN_PNT", "MUONEFF", "AZ_PNT", "N_OBS", "N_PRED", "RATIO", "ERR", "SAMPLE"]
_DTYPES = [int, str, float, float, float, float, float, float, float, str]


def _table(rows):
    table = Table(rows=[[row[c] for c in _COLUMNS] for row in rows] or None, names=_COLUMNS, dtype=_DTYPES)
    table["ZEN_PNT"].unit = table["AZ_PNT"].unit = "deg"
    return table


def _model_for_run(models, obs_row):
    if isinstance(models, BackgroundModelCollection):
        values = {column: float(column_values(obs_row, column)) for column in models.condition_columns}
        return models.model_for(**values)
    if isinstance(models, dict):
        return models[int(obs_row["OBS_ID"])]
    if callable(models):
        return models(int(obs_row["OBS_ID"]))
    return models


def evaluate_predictions(run_histograms, models, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX, sample=""):
    """Observed and predicted counts of runs whose histograms are filled in the models' axes.

    Parameters
    ----------
    run_histograms : `~bkgtemplate.conditions.RunHistograms`
        Counts and exposure of each run, in the models' axes (exclusion applied).
    models : `~bkgtemplate.conditions.BackgroundModelCollection`, dict, callable or IRF
        A collection (each run gets ``model_for`` its conditions), a dict or a function of
        OBS_ID giving each run's model, or one model for all runs.
    e_min : `~astropy.units.Quantity`, optional
        Lowest energy (bin lower edges). Default is 0.5 TeV.
    offset_max : `~astropy.units.Quantity`, optional
        Largest offset of the bin centres. Default is 2 deg.
    sample : str, optional
        Label written in the SAMPLE column. Default is "".

    Returns
    -------
    table : `~astropy.table.Table`
        One row per run: OBS_ID, TARGET_NAME, ZEN_PNT, MUONEFF, AZ_PNT, N_OBS, N_PRED, RATIO,
        ERR (sqrt(N_OBS) / N_PRED) and SAMPLE.
    """
    mask = evaluation_mask(run_histograms.axes, e_min, offset_max)
    rows = []
    for i, obs_row in enumerate(run_histograms.obs_table):
        model = _model_for_run(models, obs_row)
        n_pred = predicted_counts(model, run_histograms.exposure[i], mask)
        rows.append(_row(obs_row, float(run_histograms.counts[i][mask].sum()), n_pred, sample))
    return _table(rows)


def robust_summary(ratios):
    """Bias and robust scatter of observed / predicted ratios.

    Parameters
    ----------
    ratios : `~numpy.ndarray`
        Ratio of each run (NaN ignored).

    Returns
    -------
    summary : dict
        ``n_runs``, ``median``, ``bias`` = |median - 1| and ``scatter`` = 1.4826 x median(|ratio - median|).

    Examples
    --------
    >>> from bkgtemplate.evaluation import robust_summary
    >>> robust_summary([0.9, 1.0, 1.2])["bias"]
    0.0
    """
    ratios = np.asarray(ratios, dtype=float)
    ratios = ratios[np.isfinite(ratios)]
    if not len(ratios):
        return {"n_runs": 0, "median": np.nan, "bias": np.nan, "scatter": np.nan}
    median = float(np.median(ratios))
    return {
        "n_runs": int(len(ratios)),
        "median": median,
        "bias": abs(median - 1),
        "scatter": float(1.4826 * np.median(np.abs(ratios - median))),
    }


def summarize(table, by="SAMPLE"):
    """Bias and scatter per group of runs.

    Parameters
    ----------
    table : `~astropy.table.Table`
        Per-run table with RATIO (see `evaluate_predictions`).
    by : str or None, optional
        Column to group by. Default is "SAMPLE"; None for all runs together.

    Returns
    -------
    summary : `~astropy.table.Table`
        One row per group: the group, N_RUNS, MEDIAN, BIAS and SCATTER.
    """
    groups = [("all", np.ones(len(table), dtype=bool))] if by is None else [
        (value, _names(table[by]) == value) for value in dict.fromkeys(_names(table[by]))
    ]
    rows = []
    for value, rows_mask in groups:
        stats = robust_summary(table["RATIO"][rows_mask])
        rows.append([value, stats["n_runs"], stats["median"], stats["bias"], stats["scatter"]])
    names = [by or "GROUP", "N_RUNS", "MEDIAN", "BIAS", "SCATTER"]
    return Table(rows=rows or None, names=names, dtype=[str, int, float, float, float])


def evaluation_histograms(maker, data_store, obs_ids, exclusion=None):
    """Each run's histograms in a maker's axes, with extra exclusion regions cut out.

    Parameters
    ----------
    maker : `~bkgtemplate.ObservingConditionsEstimator`
        Its estimator gives the axes and options.
    data_store : `~gammapy.data.DataStore`
        Data store.
    obs_ids : list of int
        Runs (off and source-field runs alike; regions far from a run do not touch it).
    exclusion : list of `~regions.SkyRegion`, optional
        Regions cut out in addition to the estimator's own (e.g. `target_regions`). Default is None.

    Returns
    -------
    run_histograms : `~bkgtemplate.conditions.RunHistograms`
        Counts and exposure of each run.
    """
    estimator = maker.estimator
    spec = _with_exclusion(estimator.spec, exclusion)
    return RunHistograms.fill(
        data_store,
        obs_ids,
        spec,
        on_error=estimator.on_error,
        n_jobs=estimator.n_jobs,
        parallel_backend=estimator.parallel_backend,
    )


def _with_exclusion(spec, exclusion):
    if not exclusion:
        return spec
    if spec.exclusion is None:
        return replace(spec, exclusion=Exclusion(exclusion))
    if spec.exclusion.mask is not None:
        raise ValueError("Cannot add evaluation regions to an exclusion mask; give regions to the estimator.")
    return replace(spec, exclusion=Exclusion(list(spec.exclusion.regions) + list(exclusion)))


def held_out_evaluation(
    maker,
    run_histograms,
    off_ids,
    field_ids=None,
    e_min=DEFAULT_E_MIN,
    offset_max=DEFAULT_OFFSET_MAX,
    separate_fields=SEPARATE_FIELDS,
):
    """Observed / predicted counts of runs not used to build the collection.

    Each off run is predicted by the collection built from the other off runs (leave-one-out,
    `~bkgtemplate.ObservingConditionsEstimator.leave_one_out`); the source-field runs by the
    collection built from all off runs.

    Parameters
    ----------
    maker : `~bkgtemplate.ObservingConditionsEstimator`
        Configuration to evaluate.
    run_histograms : `~bkgtemplate.conditions.RunHistograms`
        Histograms of the off and source-field runs in the maker's axes, targets cut out
        (`evaluation_histograms`).
    off_ids : list of int
        Off runs, which build the collections.
    field_ids : list of int, optional
        Source-field runs. Default is None (none).
    e_min, offset_max : `~astropy.units.Quantity`, optional
        Energy and offset cuts (see `evaluation_mask`). Defaults are 0.5 TeV and 2 deg.
    separate_fields : tuple of str, optional
        TARGET_NAMEs whose runs get their name as SAMPLE instead of "source fields". Default is
        ("RX J1713.7-3946",).

    Returns
    -------
    table : `~astropy.table.Table`
        Per-run table (see `evaluate_predictions`), SAMPLE "off (leave-one-out)", "source fields"
        or the name of a separate field. Summarise it with `summarize`.
    """
    off = run_histograms.select(off_ids)
    mask = evaluation_mask(off.axes, e_min, offset_max)
    rows = []
    for i, (obs_id, collection) in enumerate(maker.leave_one_out(off)):
        obs_row = off.obs_table[i]
        model = _model_for_run(collection, obs_row)
        n_pred = predicted_counts(model, off.exposure[i], mask)
        rows.append(_row(obs_row, float(off.counts[i][mask].sum()), n_pred, OFF_SAMPLE))
    tables = [_table(rows)]
    if field_ids:
        collection = maker.make_collection(off)
        fields = evaluate_predictions(run_histograms.select(field_ids), collection, e_min, offset_max, FIELD_SAMPLE)
        fields["SAMPLE"] = [name if name in separate_fields else FIELD_SAMPLE for name in fields["TARGET_NAME"]]
        tables.append(fields)
    return vstack(tables)


def _model_spec(model, exclusion, safe_threshold=True):
    if isinstance(model, Background3D):
        spatial = (model.axes["fov_lon"], model.axes["fov_lat"])
        alignment = model.fov_alignment.value
    else:
        spatial = (model.axes["offset"],)
        alignment = "ALTAZ"
    return HistogramSpec(
        energy_axis=model.axes["energy"],
        spatial_axes=spatial,
        fov_alignment=alignment,
        safe_threshold=safe_threshold,
        exclusion=None if not exclusion else Exclusion(exclusion),
    )


def evaluate_models(
    data_store, models, obs_ids, exclusion=None, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX, sample=""
):
    """Observed / predicted counts of runs with any per-run models, in each model's own axes.

    Each run's counts and exposure are filled with a `~bkgtemplate.HistogramSpec` in the axes
    and FoV alignment of its model (RADEC for the released H.E.S.S. models), with the same
    safe threshold and exclusion as the package's models.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Data store.
    models : dict or callable
        Model of each run: a dict by OBS_ID, or a function of OBS_ID.
    obs_ids : list of int
        Runs.
    exclusion : list of `~regions.SkyRegion`, optional
        Regions cut out. Default is None.
    e_min, offset_max : `~astropy.units.Quantity`, optional
        Energy and offset cuts (see `evaluation_mask`). Defaults are 0.5 TeV and 2 deg.
    sample : str, optional
        Label in the SAMPLE column. Default is "".

    Returns
    -------
    table : `~astropy.table.Table`
        Per-run table (see `evaluate_predictions`).
    """
    runs = collect_runs(data_store, obs_ids)
    obs_rows = obs_table_rows(data_store, [run.obs_id for run in runs])
    rows = []
    for run, obs_row in progress_bar(list(zip(runs, obs_rows)), desc="Runs"):
        model = models[run.obs_id] if isinstance(models, dict) else models(run.obs_id)
        counts, exposure = fill_run(run, _model_spec(model, exclusion))
        mask = evaluation_mask(model.axes, e_min, offset_max)
        n_pred = predicted_counts(model, exposure * EXPOSURE_UNIT, mask)
        rows.append(_row(obs_row, float(counts[mask].sum()), n_pred, sample))
    return _table(rows)


def evaluate_released(
    data_store, obs_ids, exclusion=None, e_min=DEFAULT_E_MIN, offset_max=DEFAULT_OFFSET_MAX, sample="released"
):
    """Observed / predicted counts with the background models shipped in the data store.

    Parameters
    ----------
    data_store : `~gammapy.data.DataStore`
        Data store whose runs have a ``bkg`` HDU.
    obs_ids : list of int
        Runs.
    exclusion : list of `~regions.SkyRegion`, optional
        Regions cut out. Default is None.
    e_min, offset_max : `~astropy.units.Quantity`, optional
        Energy and offset cuts (see `evaluation_mask`). Defaults are 0.5 TeV and 2 deg.
    sample : str, optional
        Label in the SAMPLE column. Default is "released".

    Returns
    -------
    table : `~astropy.table.Table`
        Per-run table (see `evaluate_predictions`).
    """

    def released(obs_id):
        return data_store.obs(obs_id, required_irf="all-optional").bkg

    return evaluate_models(data_store, released, obs_ids, exclusion, e_min, offset_max, sample)
