"""Held-out evaluation: masks, predicted counts, robust summaries; the default on the HESS runs."""

import numpy as np
import astropy.units as u
from astropy.table import Table
from numpy.testing import assert_allclose, assert_array_equal
import pytest
from gammapy.irf import Background2D
from gammapy.maps import MapAxes, MapAxis
from bkgtemplate import BackgroundModelEstimator, make_energy_axis
from bkgtemplate.conditions import ObservingConditionsEstimator
from bkgtemplate.evaluation import (
    evaluate_models,
    evaluation_mask,
    held_out_evaluation,
    predicted_counts,
    robust_summary,
    summarize,
    target_regions,
)
from bkgtemplate.histograms import BackgroundHistograms

RATE = u.Unit("s-1 MeV-1 sr-1")
OFF = "off (leave-one-out)"
# the H.E.S.S. DR1 targets cut out of their fields (deg); RX J1713.7-3946 is reported on its own
HESS_RADII = {
    "Crab": 0.5,
    "PKS 2155-304 (steady)": 0.5,
    "PKS 2155-304 (flare)": 0.5,
    "MSH 15-52": 0.8,
    "RX J1713.7-3946": 1.0,
}
SOURCE_FIELDS = ["Crab", "PKS 2155-304 (steady)", "PKS 2155-304 (flare)", "MSH 15-52"]
# the tutorial's energy axis (notebook 2: 10 bins per decade, an edge at 0.5 TeV, the evaluation cut)
TUTORIAL_ESTIMATOR = BackgroundModelEstimator(energy_axis=make_energy_axis(0.1, 100, 30))
ALL_CORRECTIONS = {"ZEN_PNT": "cos", "NORTH_PNT": "linear", "MUONEFF": "power-law"}


def small_axes():
    energy = MapAxis.from_edges([0.3, 0.5, 1, 10], unit="TeV", name="energy", interp="log")
    offset = MapAxis.from_edges([0, 1, 2, 2.5], unit="deg", name="offset")
    return MapAxes([energy, offset])


def test_evaluation_mask_2d():
    mask = evaluation_mask(small_axes())
    # energy bins from 0.5 TeV (lower edges 0.3, 0.5, 1), offset centres 0.5, 1.5, 2.25 deg
    assert_array_equal(mask, [[False, False, False], [True, True, False], [True, True, False]])
    assert evaluation_mask(small_axes(), e_min="0.2 TeV", offset_max="3 deg").all()


def test_evaluation_mask_3d_uses_bin_centres():
    energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=1, name="energy")
    lon = MapAxis.from_bounds(-2.5, 2.5, nbin=5, unit="deg", name="fov_lon")
    lat = MapAxis.from_bounds(-2.5, 2.5, nbin=5, unit="deg", name="fov_lat")
    mask = evaluation_mask(MapAxes([energy, lon, lat]))
    # centres at -2..2 deg: the 3 x 3 core; (0, +-2) and (+-2, 0) are at 2 deg, not below it
    assert mask.sum() == 9
    assert mask[0, 2, 2] and mask[0, 1, 3] and not mask[0, 0, 2]


def test_predicted_counts_invariant():
    axes = small_axes()
    rate = np.arange(1, 10, dtype=float).reshape(3, 3) * 1e-6
    bkg = Background2D(axes=axes, data=rate, unit=RATE)
    exposure = np.full((3, 3), 2e6) * u.Unit("s MeV sr")
    mask = evaluation_mask(axes)
    assert_allclose(predicted_counts(bkg, exposure, mask), 2 * (4 + 5 + 7 + 8), rtol=1e-12)
    # units: a rate in another unit predicts the same counts
    bkg_per_tev = Background2D(axes=axes, data=rate * 1e6, unit="s-1 TeV-1 sr-1")
    assert_allclose(predicted_counts(bkg_per_tev, exposure, mask), 2 * (4 + 5 + 7 + 8), rtol=1e-12)
    with pytest.raises(ValueError, match=r"Exposure \(2, 3\) does not match the model's axes"):
        predicted_counts(bkg, exposure[:2], mask)


def test_robust_summary_hand_values():
    stats = robust_summary([0.9, 1.0, 1.2, np.nan])
    assert stats["n_runs"] == 3
    assert_allclose([stats["median"], stats["bias"], stats["scatter"]], [1.0, 0.0, 0.14826], rtol=1e-12, atol=1e-15)
    stats = robust_summary([1.1, 1.2, 1.3, 1.5])
    assert_allclose([stats["bias"], stats["scatter"]], [0.25, 1.4826 * 0.1], rtol=1e-12)


def synthetic_runs(rates, names, zenith=None):
    axes = small_axes()
    n = len(rates)
    exposure = np.full((n, 3, 3), 1e9)
    counts = np.asarray(rates, float)[:, None, None] * exposure
    table = Table(
        {
            "OBS_ID": np.arange(1, n + 1),
            "TARGET_NAME": names,
            "ZEN_PNT": np.full(n, 20.0) if zenith is None else zenith,
            "MUONEFF": np.ones(n),
            "AZ_PNT": np.full(n, 180.0),
            "LIVETIME": np.full(n, 1000.0),
        }
    )
    return BackgroundHistograms(axes=axes, counts=counts, exposure=exposure * u.Unit("s MeV sr"), obs_table=table)


def test_held_out_evaluation_and_summary():
    names = ["Off data"] * 4 + ["Crab", "RX J1713.7-3946"]
    runs = synthetic_runs([1e-6, 1e-6, 1e-6, 1e-6, 1.2e-6, 1.5e-6], names, zenith=[10, 15, 30, 35, 20, 25])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40]}, corrections={})
    table = held_out_evaluation(maker, runs, off_ids=[1, 2, 3, 4], field_ids=[5, 6])
    assert list(table["SAMPLE"]) == [OFF] * 4 + ["Crab", "RX J1713.7-3946"]
    assert_allclose(table["RATIO"], [1, 1, 1, 1, 1.2, 1.5], rtol=1e-12)
    # the 4 bins from 0.5 TeV within 2 deg, 1e9 s MeV sr each, at the off runs' rate 1e-6
    assert_allclose(table["N_PRED"], 4 * 1e3, rtol=1e-12)
    assert_allclose(table["ERR"], np.sqrt(table["N_OBS"]) / table["N_PRED"], rtol=1e-12)
    assert list(table["TARGET_NAME"]) == names
    summary = summarize(table)
    assert list(summary["SAMPLE"]) == [OFF, "Crab", "RX J1713.7-3946"]
    assert_allclose(summary["BIAS"], [0, 0.2, 0.5], atol=1e-12)
    assert list(summary["N_RUNS"]) == [4, 1, 1]
    assert summarize(table, by=None)["N_RUNS"][0] == 6


def test_target_regions():
    table = Table(
        {
            "TARGET_NAME": ["Off data", "A", "A", "A", "B (flare)", "B (steady)", "MSH 15-52"],
            "RA_OBJ": [10.0, 20.0, 20.0, 21.0, 30.0, 30.0, 228.6125],
            "DEC_OBJ": [0.0, 5.0, 5.0, 5.0, -1.0, -1.0, -59.27],
            "LIVETIME": [1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0],
        }
    )
    radii = {"A": 0.5, "B (flare)": 0.5, "B (steady)": 0.5 * u.deg, "MSH 15-52": 0.8}
    regions = target_regions(table, radii)
    # A: the livetime-weighted most frequent position; B's two samples once; MSH 15-52 with its radius
    assert len(regions) == 3
    assert_allclose([regions[0].center.ra.deg, regions[0].radius.to_value("deg")], [21.0, 0.5])
    assert_allclose([regions[1].center.ra.deg, regions[1].center.dec.deg], [30.0, -1.0])
    assert_allclose(regions[2].radius.to_value("deg"), 0.8)
    # only the named targets get a circle
    (only,) = target_regions(table, {"B (flare)": 0.3})
    assert_allclose([only.center.ra.deg, only.radius.to_value("deg")], [30.0, 0.3])
    assert target_regions(table, {}) == []
    with pytest.raises(ValueError, match=r"Targets \['Crab'\] are not in the obs table's TARGET_NAME"):
        target_regions(table, {"Crab": 0.5})


@pytest.fixture(scope="module")
def hess_evaluation(hess_store):
    """Each run's histograms in the default axes, targets cut out: every run's events read once."""
    table = hess_store.obs_table
    off = [int(i) for i in table["OBS_ID"][table["TARGET_NAME"] == "Off data"]]
    fields = [int(i) for i in table["OBS_ID"][table["TARGET_NAME"] != "Off data"]]
    regions = target_regions(table, HESS_RADII)
    runs = TUTORIAL_ESTIMATOR.fill(hess_store, off + fields, exclusion=regions)
    return runs, off, fields, regions


def held_out_samples(table):
    """Summary per sample, the source fields together, and the off and source-field runs together."""
    summary = {row["SAMPLE"]: row for row in summarize(table)}
    sources = robust_summary(table["RATIO"][np.isin(table["SAMPLE"], SOURCE_FIELDS)])
    pooled = robust_summary(table["RATIO"][np.isin(table["SAMPLE"], [OFF, *SOURCE_FIELDS])])
    return summary, sources, pooled


def test_hess_default_configuration_held_out(hess_evaluation):
    runs, off, fields, _ = hess_evaluation
    table = held_out_evaluation(ObservingConditionsEstimator(TUTORIAL_ESTIMATOR), runs, off, fields)
    summary, sources, pooled = held_out_samples(table)
    assert [summary[s]["N_RUNS"] for s in (OFF, *SOURCE_FIELDS, "RX J1713.7-3946")] == [45, 4, 6, 15, 20, 15]
    assert sources["n_runs"] == 45
    # the default (zenith slope and MUONEFF) as measured when notebook 3 chose it (issue 16): off runs
    # left out one at a time 0.002 / 0.155; Crab, PKS 2155-304 and MSH 15-52 runs, never used to build
    # the models, 0.048 / 0.075
    assert_allclose([summary[OFF]["BIAS"], summary[OFF]["SCATTER"]], [0.002, 0.155], atol=0.003)
    assert_allclose([sources["bias"], sources["scatter"]], [0.048, 0.075], atol=0.003)
    # every field the issue names predicted within 8 %; with the north-south term as well, the Crab runs
    # (pointing north, where only two off runs are) sit 26 % above the prediction
    medians = {name: summary[name]["MEDIAN"] for name in ("Crab", "PKS 2155-304 (steady)", "MSH 15-52")}
    assert all(abs(median - 1) < 0.08 for median in medians.values()), medians
    with_north = summarize(held_out_evaluation(ObservingConditionsEstimator(TUTORIAL_ESTIMATOR, corrections=ALL_CORRECTIONS),
                                               runs, off, fields))
    crab = [row["MEDIAN"] for row in with_north if row["SAMPLE"] == "Crab"][0]
    assert crab > 1.2 and max(abs(m - 1) for m in medians.values()) < abs(crab - 1) / 2


def test_hess_default_beats_tutorial_single_model_and_fixed_corrections(hess_evaluation):
    runs, off, fields, _ = hess_evaluation
    pooled = {}
    for name, maker in {
        "single": ObservingConditionsEstimator(TUTORIAL_ESTIMATOR, bins={}, corrections={}),
        "tutorial": ObservingConditionsEstimator(TUTORIAL_ESTIMATOR, interpolate=(), corrections={}),
        # energy-independent corrections in MUONEFF and cos(AZ_PNT): the default before issue 4's round
        "fixed": ObservingConditionsEstimator(TUTORIAL_ESTIMATOR, corrections={"MUONEFF": "power-law", "AZ_PNT": "cos"}),
        "default": ObservingConditionsEstimator(TUTORIAL_ESTIMATOR),
    }.items():
        pooled[name] = held_out_samples(held_out_evaluation(maker, runs, off, fields))[2]
    scatter = {name: stats["scatter"] for name, stats in pooled.items()}
    assert scatter["default"] < scatter["fixed"] < scatter["tutorial"] < scatter["single"], scatter
    assert scatter["default"] < 0.5 * scatter["tutorial"], scatter


def test_hess_released_models_in_their_own_axes(hess_store, hess_evaluation):
    _, _, _, regions = hess_evaluation
    released = lambda obs_id: hess_store.obs(obs_id, required_irf="all-optional").bkg  # noqa: E731
    table = evaluate_models(hess_store, released, [23523, 23526, 29024], exclusion=regions)
    # 3D RADEC models, exposure filled in their 50 x 50 bins: within 10 % on these runs
    assert_allclose(table["RATIO"], 1, atol=0.1)
    assert (table["N_OBS"] > 500).all()


@pytest.mark.slow
def test_hess_msh_15_52_significance_width_with_the_default_store(hess_store, hess_evaluation, tmp_path):
    """Issue 16's measure, as notebook 5 makes it: MSH 15-52's 20 runs (never used to build a model), counts above
    max(0.5 TeV, the run's threshold) within 2 deg, FoVBackgroundMaker norm and tilt per run outside 0.4 deg of the
    target, ExcessMapEstimator at 0.1 deg on the stack. With the default models (the tutorial's collection, written
    with the off runs' fov_lat slope) the width is at most the released models' + 0.02; the radial models miss it."""
    from gammapy.data import DataStore
    from gammapy.datasets import MapDataset
    from gammapy.estimators import ExcessMapEstimator
    from gammapy.makers import FoVBackgroundMaker, MapDatasetMaker, SafeMaskMaker
    from gammapy.maps import WcsGeom
    from gammapy.modeling.models import PowerLawNormSpectralModel
    from bkgtemplate import default_fov_axes, write_background_store

    runs, off, _, _ = hess_evaluation
    collection = ObservingConditionsEstimator(TUTORIAL_ESTIMATOR).make_collection(runs.select(off))
    lon, lat = default_fov_axes()
    altaz = BackgroundModelEstimator(energy_axis=TUTORIAL_ESTIMATOR.energy_axis, fov_lon_axis=lon, fov_lat_axis=lat)
    slope = altaz.fill(hess_store, off).fov_lat_slope()
    table = hess_store.obs_table
    ids = [int(i) for i in table["OBS_ID"][table["TARGET_NAME"] == "MSH 15-52"]]
    stores = {"released": hess_store}
    for name, kwargs in [("default", {"fov_lat_slope": slope}), ("radial", {})]:
        models, assignment = collection.to_store_inputs(table, **kwargs)
        stores[name] = DataStore.from_dir(write_background_store(hess_store, models, assignment, tmp_path / name))
    circle = target_regions(table, {"MSH 15-52": 0.4})[0]
    energy = MapAxis.from_energy_bounds(0.5 * u.TeV, 32 * u.TeV, nbin=6, name="energy")
    geom = WcsGeom.create(skydir=circle.center, width=4 * u.deg, binsz=0.02, frame="icrs", axes=[energy])
    exclusion = ~geom.to_image().region_mask([circle])
    maker, safe = MapDatasetMaker(selection=["counts"]), SafeMaskMaker(methods=["offset-max"], offset_max=2 * u.deg)
    stacked = {name: MapDataset.create(geom, name=name) for name in stores}
    for obs_id in ids:
        observation = hess_store.obs(obs_id)
        counts = safe.run(maker.run(MapDataset.create(geom, name=str(obs_id)), observation), observation)
        counts.mask_safe &= geom.energy_mask(energy_min=table.select_obs_id(obs_id)["SAFE_ENERGY_LO"].quantity[0])
        for name, store in stores.items():
            dataset = counts.copy(name=f"{obs_id}-{name}")
            dataset.background = maker.make_background(geom, store.obs(obs_id, required_irf="all-optional"))
            norm_and_tilt = PowerLawNormSpectralModel()
            norm_and_tilt.tilt.frozen = False
            stacked[name].stack(FoVBackgroundMaker(method="fit", exclusion_mask=exclusion,
                                                   spectral_model=norm_and_tilt).run(dataset))
    estimator = ExcessMapEstimator(correlation_radius=0.1 * u.deg, energy_edges=energy.edges[[0, -1]],
                                   selection_optional=[])
    width = {}
    for name, dataset in stacked.items():
        significance = estimator.run(dataset)["sqrt_ts"].data[0]
        predicted = np.where(dataset.mask_safe.data, dataset.background.data, 0).sum(axis=0)
        values = significance[exclusion.data & (predicted > 0) & np.isfinite(significance)]
        width[name] = values.std()
    assert width["default"] <= width["released"] + 0.02, width
    assert width["radial"] > width["released"] + 0.02, width
