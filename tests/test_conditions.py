"""Models over observing conditions: bins, interpolation weights, corrections, FITS, empty bins."""

import logging
import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose, assert_array_equal
import pytest
from gammapy.irf import Background2D, Background3D
from gammapy.maps import MapAxes, MapAxis
from bkgtemplate import BackgroundModelEstimator
from bkgtemplate.conditions import (
    BackgroundModelCollection,
    EmptyBinError,
    ObservingConditionsEstimator,
    assign_bins,
    column_values,
    equal_livetime_edges,
    interpolation_weights,
    north_component,
    with_fov_lat_slope,
)
from bkgtemplate.corrections import ConditionCorrection

RATE = u.Unit("s-1 MeV-1 sr-1")


def assert_same_corrections(corrections, expected):
    assert [(c.column, c.kind) for c in corrections] == [(c.column, c.kind) for c in expected]
    for correction, other in zip(corrections, expected):
        for name in ("reference", "coefficient", "clip_min", "clip_max"):
            assert_array_equal(getattr(correction, name), getattr(other, name))


def axes_2d():
    energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=2, name="energy")
    offset = MapAxis.from_bounds(0, 2, nbin=2, unit="deg", name="offset")
    return MapAxes([energy, offset])


def constant_model(value, axes=None):
    axes = axes or axes_2d()
    return Background2D(axes=axes, data=np.full(axes.shape, float(value)), unit=RATE)


def test_assign_bins_at_edges():
    edges = [0, 20, 40, 90]
    index, outside = assign_bins([0, 19.999, 20, 39.9, 40, 89.9, 90], edges)
    assert_array_equal(index, [0, 0, 1, 1, 2, 2, 2])  # lower edge included, last edge closed
    assert not outside.any()
    index, outside = assign_bins([-1, 95, np.nan], edges)
    assert_array_equal(index[:2], [0, 2])  # nearest bin
    assert outside.all()


def test_interpolation_weights_cos_zenith_hand_values():
    centres = np.cos(np.radians([10, 30]))
    lo, hi, w = interpolation_weights(np.cos(np.radians([20, 5, 60, 10, 30])), centres)
    expected = (np.cos(np.radians(10)) - np.cos(np.radians(20))) / (np.cos(np.radians(10)) - np.cos(np.radians(30)))
    assert_allclose(expected, 0.37985, rtol=1e-4)
    assert_allclose(w, [expected, 0, 0, 0, 0], atol=1e-12)
    assert_array_equal(lo, [0, 0, 1, 0, 1])
    assert_array_equal(hi, [1, 0, 1, 0, 1])  # clipped at the ends: one bin, never extrapolated


def test_interpolation_weights_muoneff_hand_values():
    lo, hi, w = interpolation_weights([0.95, 1.15, 1.3, 0.8], [0.9, 1.1, 1.2])
    assert_array_equal(lo, [0, 1, 2, 0])
    assert_array_equal(hi, [1, 2, 2, 0])
    assert_allclose(w, [0.25, 0.5, 0, 0], atol=1e-12)
    with pytest.raises(ValueError, match="not strictly monotonic"):
        interpolation_weights([1.0], [0.9, 1.1, 1.0])


def test_equal_livetime_edges():
    assert_allclose(equal_livetime_edges([1, 2, 3, 4], [1, 1, 1, 1], 2), [1, 2.5, 4])
    assert_allclose(equal_livetime_edges([4, 1, 3, 2], [1, 3, 1, 1], 2), [1, 1.5, 4])
    with pytest.raises(ValueError, match="cannot fill 3"):
        equal_livetime_edges([1, 1, 2], [1, 1, 1], 3)


def collection_2x2():
    """ZEN_PNT (interpolated) x MUONEFF (interpolated) grid with constant rates 1, 2, 3, 4."""
    models = [constant_model(value) for value in (1, 2, 3, 4)]
    return BackgroundModelCollection(
        models,
        bin_edges={"ZEN_PNT": [0, 20, 40], "MUONEFF": [0.8, 1.0, 1.2]},
        centres={"ZEN_PNT": [10, 30], "MUONEFF": [0.9, 1.1]},
        corrections=[ConditionCorrection("AZ_PNT", "cos", reference=0.0, coefficient=-0.1)],
        runs=Table({"OBS_ID": [1, 2], "BKG_BIN": [0, 3]}),
    )


def test_model_for_interpolates_and_clips():
    w_zen = (np.cos(np.radians(10)) - np.cos(np.radians(20))) / (np.cos(np.radians(10)) - np.cos(np.radians(30)))
    collection = collection_2x2()
    bkg = collection.model_for(zenith=20 * u.deg, muoneff=0.95, AZ_PNT=90)
    # bilinear: rate = 1 + 2 w_zen (zenith partner) + 1 w_mu (muoneff partner), cos(90) = 0
    assert_allclose(bkg.data, 1 + 2 * w_zen + 1 * 0.25, rtol=1e-12)
    assert bkg.unit == RATE
    assert_allclose(collection.model_for(zenith=5, muoneff=0.7, AZ_PNT=90).data, 1, rtol=1e-12)
    assert_allclose(collection.model_for(zenith=60, muoneff=1.5, AZ_PNT=0).data, 4 * np.exp(-0.1), rtol=1e-12)
    with pytest.raises(ValueError, match=r"Give a value for \['MUONEFF'\]: the collection needs"):
        collection.model_for(zenith=20, AZ_PNT=0)


def test_model_for_lookup_without_interpolation():
    models = [constant_model(value) for value in (1, 3)]
    collection = BackgroundModelCollection(models, {"ZEN_PNT": [0, 20, 40]}, {"ZEN_PNT": [10, 30]}, interpolate=())
    assert_allclose(collection.model_for(zenith=19.9).data, 1)
    assert_allclose(collection.model_for(zenith=20).data, 3)  # on the edge: upper bin
    assert collection.bin_names == ["BKG_ZEN_PNT0", "BKG_ZEN_PNT1"]
    assert collection.bin_labels == ["ZEN_PNT 0-20 deg", "ZEN_PNT 20-40 deg"]


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_fits_round_trip(tmp_path, kind):
    collection = collection_2x2()
    if kind == "3d":
        energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=2, name="energy")
        lon = MapAxis.from_bounds(-1, 1, nbin=2, unit="deg", name="fov_lon")
        lat = MapAxis.from_bounds(-1, 1, nbin=3, unit="deg", name="fov_lat")
        rng = np.random.default_rng(1)
        collection.models = [
            Background3D(axes=[energy, lon, lat], data=rng.uniform(1, 2, (2, 2, 3)), unit=RATE, fov_alignment="ALTAZ")
            for _ in range(4)
        ]
    filename = tmp_path / "collection.fits"
    collection.write(filename)
    with pytest.raises(OSError):
        collection.write(filename)
    read = BackgroundModelCollection.read(filename)

    assert read.columns == ["ZEN_PNT", "MUONEFF"]
    assert read.interpolate == ("ZEN_PNT", "MUONEFF")
    for column in read.columns:
        assert_allclose(read.bin_edges[column], collection.bin_edges[column], rtol=1e-12)
        assert_allclose(read.centres[column], collection.centres[column], rtol=1e-12)
    assert_same_corrections(read.corrections, collection.corrections)
    assert_array_equal(read.runs["OBS_ID"], [1, 2])
    for original, model in zip(collection.models, read.models):
        assert type(model) is type(original)
        assert_allclose(model.quantity.to_value(RATE), original.quantity.to_value(RATE), rtol=1e-6)
    if kind == "3d":
        assert read.models[0].fov_alignment.value == "ALTAZ"
    assert_allclose(
        read.model_for(zenith=20, muoneff=0.95, AZ_PNT=30).data,
        collection.model_for(zenith=20, muoneff=0.95, AZ_PNT=30).data,
        rtol=1e-6,
    )

    with fits.open(filename) as hdulist:
        assert [hdu.name for hdu in hdulist[1:]] == [
            "BKG_ZEN_PNT0_MUONEFF0",
            "BKG_ZEN_PNT0_MUONEFF1",
            "BKG_ZEN_PNT1_MUONEFF0",
            "BKG_ZEN_PNT1_MUONEFF1",
            "CORRECTIONS",
            "RUNS",
        ]
        header = hdulist["BKG_ZEN_PNT1_MUONEFF0"].header
        assert (header["BINCOL1"], header["BINIDX1"], header["BINLO1"], header["BINHI1"]) == ("ZEN_PNT", 1, 20, 40)
        assert_allclose([header["BINCEN1"], header["BINCEN2"]], [30, 0.9])
        assert (header["BINCOL2"], header["BINLO2"], header["BINHI2"]) == ("MUONEFF", 0.8, 1.0)
        corrections = Table.read(hdulist["CORRECTIONS"])
        assert list(corrections["COLUMN"]) == ["AZ_PNT"] and not corrections["ENERGY_DEPENDENT"][0]
        assert_allclose(corrections["COEFFICIENT"][0], [-0.1, -0.1])  # one value per energy bin
    # gammapy reads one bin on its own
    irf = Background3D if kind == "3d" else Background2D
    bkg = irf.read(filename, hdu="BKG_ZEN_PNT1_MUONEFF1")
    assert_allclose(bkg.quantity.to_value(RATE), collection.models[3].quantity.to_value(RATE), rtol=1e-6)


def test_collection_rates_are_sums_per_bin(synthetic_histograms):
    runs = synthetic_histograms([10, 15, 30, 35], rate=[1e-6, 2e-6, 3e-6, 5e-6], exposure=[1e9, 3e9, 1e9, 1e9])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]}, corrections={}, merge_empty=True)
    collection = maker.make_collection(runs)
    # bin 0: (1e-6 x 1e9 + 2e-6 x 3e9) / 4e9 = 1.75e-6 in the bin with shape 1
    assert_allclose(collection.models[0].quantity[0, 0].to_value(RATE), 1.75e-6, rtol=1e-12)
    assert_allclose(collection.models[1].quantity[0, 0].to_value(RATE), 4e-6, rtol=1e-12)
    assert_allclose(collection.bin_edges["ZEN_PNT"], [0, 20, 90])  # empty [40, 90] merged
    # centres: livetime-weighted mean cos(zenith), back in deg
    assert_allclose(
        collection.centres["ZEN_PNT"][0], np.degrees(np.arccos(np.cos(np.radians([10, 15])).mean())), rtol=1e-12
    )
    # invariant: rate x exposure over the runs of a bin gives back their counts
    predicted = collection.models[1].quantity.to_value(RATE) * runs.exposure.value[2:].sum(0)
    assert_allclose(predicted, runs.counts[2:].sum(0), rtol=1e-12)
    assert list(collection.runs["BKG_BIN"]) == [0, 0, 1, 1]


def test_empty_bin_error_names_bin_and_range(synthetic_histograms):
    runs = synthetic_histograms([5, 10, 25, 30])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]}, corrections={})
    message = r"Bin ZEN_PNT \[40, 90\] has no runs \(the 4 runs span ZEN_PNT 5-30\); change the bin edges or use merge_empty=True"
    with pytest.raises(EmptyBinError, match=message):
        maker.make_collection(runs)
    grid = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40], "MUONEFF": [0.8, 1.0, 1.2]}, corrections={})
    with pytest.raises(EmptyBinError, match=r"ZEN_PNT \[0, 20\], MUONEFF \[1, 1.2\] has no runs .*MUONEFF 0.9-0.9"):
        grid.make_collection(synthetic_histograms([5, 10, 25, 30], muoneff=[0.9] * 4))


def test_merge_empty_with_neighbour_of_less_livetime(synthetic_histograms):
    runs = synthetic_histograms([5, 10, 50, 55], livetime=[1000, 1000, 3000, 3000])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 60, 90]}, corrections={}, merge_empty=True)
    collection = maker.make_collection(runs)
    # [20, 40) is empty; [0, 20) has less livetime than [40, 60): merged with it; then [60, 90] too
    assert_allclose(collection.bin_edges["ZEN_PNT"], [0, 40, 90])
    assert collection.n_bins == 2


def test_runs_outside_bins_warn(caplog, synthetic_histograms):
    runs = synthetic_histograms([5, 15, 25, 35])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [10, 20, 30]}, corrections={})
    with caplog.at_level(logging.WARNING, logger="bkgtemplate.conditions"):
        collection = maker.make_collection(runs)
    assert "Runs [1, 4] lie outside the bins" in caplog.text
    assert list(collection.runs["BKG_BIN"]) == [0, 0, 1, 1]


def test_equal_livetime_bins_from_runs(synthetic_histograms):
    runs = synthetic_histograms([5, 10, 25, 30, 45, 50])
    collection = ObservingConditionsEstimator(bins={"ZEN_PNT": 3}, corrections={}).make_collection(runs)
    assert_allclose(collection.bin_edges["ZEN_PNT"], [5, 17.5, 37.5, 50])


@pytest.mark.parametrize("corrections", [{}, {"MUONEFF": "power-law"}])
def test_leave_one_out_equals_rebuild(corrections, synthetic_histograms):
    rng = np.random.default_rng(3)
    runs = synthetic_histograms(
        [5, 10, 15, 25, 30, 35, 45, 50],
        muoneff=rng.uniform(0.85, 1.2, 8),
        rate=rng.uniform(1e-6, 2e-6, 8),
        livetime=rng.uniform(900, 1800, 8),
    )
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]}, corrections=corrections)
    for obs_id, collection in maker.leave_one_out(runs):
        others = [i for i in runs.obs_ids if i != obs_id]
        direct = maker.make_collection(runs.select(others))
        assert_allclose(collection.centres["ZEN_PNT"], direct.centres["ZEN_PNT"], rtol=1e-12)
        for model, expected in zip(collection.models, direct.models):
            assert_allclose(model.data, expected.data, rtol=1e-9)
        assert [c.coefficient for c in collection.corrections] == pytest.approx(
            [c.coefficient for c in direct.corrections], abs=1e-6
        )


def test_leave_one_out_merges_a_bin_left_empty(synthetic_histograms):
    runs = synthetic_histograms([5, 10, 25, 30, 50])
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]}, corrections={})
    collections = dict(maker.leave_one_out(runs, obs_ids=[5]))
    assert_allclose(collections[5].bin_edges["ZEN_PNT"], [0, 20, 90])


def test_store_inputs():
    collection = collection_2x2()
    table = Table({"OBS_ID": [7, 8], "ZEN_PNT": [20.0, 35.0], "MUONEFF": [0.95, 1.05], "AZ_PNT": [90.0, 0.0]})
    models, per_bin = collection.to_store_inputs(table, interpolate=False)
    assert sorted(models) == sorted(collection.bin_names)
    assert list(per_bin["BKG_BIN"]) == [2, 3]  # zenith bin 1, MUONEFF bins 0 and 1
    assert list(per_bin["BKG_HDU"]) == ["BKG_ZEN_PNT1_MUONEFF0", "BKG_ZEN_PNT1_MUONEFF1"]
    assert_allclose(per_bin["BKG_NORM"], np.exp([0, -0.1]), rtol=1e-12)
    # the obs index says which models each run got: bins, interpolation partners and weights (issue 5)
    assert per_bin.colnames == ["OBS_ID", "ZEN_PNT_BIN", "ZEN_PNT_LO", "ZEN_PNT_HI", "ZEN_PNT_W", "MUONEFF_BIN",
                                "MUONEFF_LO", "MUONEFF_HI", "MUONEFF_W", "BKG_BIN", "BKG_NORM", "BKG_HDU"]
    cos = np.cos(np.radians([10, 20, 30, 35]))
    # 35 deg lies beyond the last centre (30 deg): clipped to its model
    assert_allclose(per_bin["ZEN_PNT_W"], [(cos[0] - cos[1]) / (cos[0] - cos[2]), 0], rtol=1e-12)
    assert list(per_bin["ZEN_PNT_LO"]) == [0, 1] and list(per_bin["ZEN_PNT_HI"]) == [1, 1]
    assert_allclose(per_bin["MUONEFF_W"], [0.25, 0.75], rtol=1e-12)
    models, per_run = collection.to_store_inputs(table)
    assert list(per_run["BKG_HDU"]) == ["BKG_7", "BKG_8"] and sorted(models) == ["BKG_7", "BKG_8"]
    assert_allclose(models["BKG_8"].data, collection.model_for(zenith=35, muoneff=1.05, AZ_PNT=0).data, rtol=1e-12)


def test_store_inputs_with_a_fov_lat_slope():
    """With fov_lat_slope each model becomes an ALTAZ 3D model: the 2D rate at each offset x exp(slope x fov_lat), by
    hand for a rate exp(-offset / 0.5 deg) (gammapy's log interpolation in offset is exact for it); per run (times
    the run's correction) and per bin; 3D models and a slope per wrong number of energy bins are refused."""
    energy = MapAxis.from_energy_bounds("1 TeV", "10 TeV", nbin=2, name="energy")
    offset = MapAxis.from_bounds(0, 3, nbin=12, unit="deg", name="offset")
    profile = np.exp(-offset.center.to_value("deg") / 0.5)
    model = Background2D(axes=[energy, offset], data=np.outer([1.0, 0.1], profile), unit=RATE)
    correction = ConditionCorrection("ZEN_PNT", "cos", np.cos(np.radians(30)), -6.0, clip_min=0.0, clip_max=1.0)
    collection = BackgroundModelCollection([model], {}, {}, corrections=[correction])
    fov = [MapAxis.from_bounds(-2, 2, nbin=8, unit="deg", name=name) for name in ("fov_lon", "fov_lat")]
    lon, lat = np.meshgrid(fov[0].center.value, fov[1].center.value, indexing="ij")
    slope = [-0.05, 0.02]
    expected = [k * np.exp(-np.hypot(lon, lat) / 0.5) * np.exp(s * lat) for k, s in zip([1.0, 0.1], slope)]
    table = Table({"OBS_ID": [1], "ZEN_PNT": [40.0]})

    bkg = collection.to_store_inputs(table, fov_lat_slope=slope, fov_axes=fov)[0]["BKG_1"]
    factor = np.exp(-6.0 * (np.cos(np.radians(40)) - np.cos(np.radians(30))))
    assert isinstance(bkg, Background3D) and bkg.fov_alignment.value == "ALTAZ"
    assert_allclose(bkg.data, factor * np.array(expected), rtol=1e-6)
    assert bkg.data[0, :, :4].sum() > 1.05 * bkg.data[0, :, 4:].sum()  # a negative slope: the lower half brighter
    per_bin = collection.to_store_inputs(table, interpolate=False, fov_lat_slope=slope, fov_axes=fov)[0]["BKG_ALL"]
    assert_allclose(per_bin.data, expected, rtol=1e-6)

    with pytest.raises(ValueError, match="one slope per energy bin"):
        collection.to_store_inputs(table, fov_lat_slope=[0.1, 0.2, 0.3], fov_axes=fov)
    with pytest.raises(ValueError, match="needs 2D models"):
        with_fov_lat_slope(bkg, slope, fov)


def test_bad_maker_and_collection_configuration():
    with pytest.raises(ValueError, match="Unknown correction 'spline'"):
        ObservingConditionsEstimator(corrections={"MUONEFF": "spline"})
    with pytest.raises(ValueError, match="must increase"):
        ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 40, 20]})
    with pytest.raises(ValueError, match="Cannot interpolate in"):
        ObservingConditionsEstimator(interpolate=("AZ_PNT",))
    with pytest.raises(TypeError, match="BackgroundModelEstimator"):
        ObservingConditionsEstimator(estimator="2d")
    with pytest.raises(ValueError, match="3 models for 4 bins"):
        BackgroundModelCollection([constant_model(1)] * 3, {"ZEN_PNT": [0, 1, 2], "MUONEFF": [0, 1, 2]}, {})


@pytest.fixture(scope="module")
def tutorial_off(hess_store):
    table = hess_store.obs_table
    off = [int(i) for i in table["OBS_ID"][table["TARGET_NAME"] == "Off data"]]
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": [0, 20, 40, 90]}, interpolate=(), corrections={})
    return maker, maker.estimator.fill(hess_store, off)


def test_hess_leave_one_out_subtraction_equals_direct_rebuild(hess_store, tutorial_off):
    maker, runs = tutorial_off
    full = maker.make_collection(runs)
    zenith = np.asarray(runs.obs_table["ZEN_PNT"], float)
    in_bin = np.flatnonzero((zenith >= 20) & (zenith < 40))
    obs_id = runs.obs_ids[in_bin[0]]
    (_, collection), = maker.leave_one_out(runs, obs_ids=[obs_id])
    others = [runs.obs_ids[i] for i in in_bin[1:]]
    direct = BackgroundModelEstimator().run(hess_store, others)
    assert_allclose(collection.models[1].data, direct.data, rtol=1e-10)
    for i in (0, 2):
        assert_allclose(collection.models[i].data, full.models[i].data, rtol=0)
    assert collection.models[1].meta["NRUNS"] == len(others)


def test_hess_default_collection_store_round_trip(hess_store, tutorial_off, tmp_path):
    from gammapy.data import DataStore
    from bkgtemplate.store import write_background_store

    table = hess_store.obs_table
    # same estimator axes as the tutorial maker: its run histograms serve the default too
    corrections = {"ZEN_PNT": "cos", "NORTH_PNT": "linear", "MUONEFF": "power-law"}
    collection = ObservingConditionsEstimator(corrections=corrections).make_collection(tutorial_off[1])
    zenith, north, muoneff = collection.corrections
    assert [c.column for c in collection.corrections] == ["ZEN_PNT", "NORTH_PNT", "MUONEFF"]
    # at a fixed energy above threshold the rate rises with zenith (falls with cos(zenith)):
    # between 20 and 40 deg by a factor 1.5 to 3 in each energy bin from 0.4 to 25 TeV
    energy = collection.models[0].axes["energy"].edges[:-1].to_value("TeV")
    rise = zenith.factor([40.0])[0] / zenith.factor([20.0])[0]
    assert np.all((rise[(energy >= 0.39) & (energy < 25)] > 1.5) & (rise[(energy >= 0.39) & (energy < 25)] < 3.2))
    assert -0.5 < north.coefficient < -0.1  # pointing north: less background
    assert 0 < muoneff.coefficient < 1.0

    collection.write(tmp_path / "collection.fits")
    read = BackgroundModelCollection.read(tmp_path / "collection.fits")
    models, assignment = read.to_store_inputs(table)
    path = write_background_store(hess_store, models, assignment, tmp_path / "store")
    store = DataStore.from_dir(path)
    row = table[table["OBS_ID"] == 23523][0]
    expected = collection.model_for(zenith=row["ZEN_PNT"], muoneff=row["MUONEFF"], AZ_PNT=row["AZ_PNT"])
    bkg = store.obs(23523, required_irf="all-optional").bkg
    assert_allclose(bkg.quantity.to_value(RATE), expected.quantity.to_value(RATE), rtol=1e-6)


def test_interpolation_uses_only_models_measured_at_each_energy():
    """Below a high-zenith bin's lowest measured energy, the low-zenith model alone is used."""
    axes = MapAxes([MapAxis.from_energy_bounds("1 TeV", "100 TeV", nbin=4, name="energy"), axes_2d()["offset"]])
    low, high = constant_model(1, axes), constant_model(3, axes)
    energy_edges = low.axes["energy"].edges.to_value("TeV")
    low.meta["EMEASMIN"], high.meta["EMEASMIN"] = energy_edges[0], energy_edges[2]
    collection = BackgroundModelCollection([low, high], {"ZEN_PNT": [0, 20, 40]}, centres={"ZEN_PNT": [10, 30]})
    # halfway in cos(zenith): plain weights 0.5 / 0.5 where both are measured
    zenith = np.rad2deg(np.arccos((np.cos(np.deg2rad(10)) + np.cos(np.deg2rad(30))) / 2))
    data = collection.model_for(zenith=zenith).data
    assert data.shape[0] == 4
    assert_allclose(data[:2], 1)
    assert_allclose(data[2:], 2)


def test_north_component_hand_values_and_derived_column():
    assert_allclose(north_component([30, 30, 0, 60], [0, 180, 90, 90]), [0.5, -0.5, 0, 0], atol=1e-12)
    table = Table({"ZEN_PNT": [30.0, 90.0] * u.deg, "AZ_PNT": [60.0, 0.0] * u.deg})
    assert_allclose(column_values(table, "NORTH_PNT"), [0.25, 1.0], atol=1e-12)
    assert_allclose(column_values(table[0], "NORTH_PNT"), 0.25, atol=1e-12)  # one row too
    with pytest.raises(KeyError, match="no column 'AZ_PNT'"):
        column_values(Table({"ZEN_PNT": [30.0]}), "NORTH_PNT")


def test_energy_dependent_fits_round_trip(tmp_path):
    correction = ConditionCorrection(
        "ZEN_PNT", "cos", reference=np.array([0.9, 0.85]), coefficient=np.array([-4.0, -2.0]),
        clip_min=np.array([0.7, 0.6]), clip_max=np.array([1.0, 1.0]),
    )
    north = ConditionCorrection("NORTH_PNT", "linear", reference=0.1, coefficient=-0.3, clip_min=-0.8, clip_max=0.8)
    collection = BackgroundModelCollection(
        [constant_model(1), constant_model(2)],
        {"ZEN_PNT": [0, 20, 40]},
        centres={"ZEN_PNT": [10, 50]},
        corrections=[correction, north],
    )
    collection.write(tmp_path / "c.fits")
    read = BackgroundModelCollection.read(tmp_path / "c.fits")
    assert_same_corrections(read.corrections, [correction, north])
    assert read.corrections[0].energy_dependent and not read.corrections[1].energy_dependent
    # NORTH_PNT from ZEN_PNT and AZ_PNT, or given directly
    bkg = read.model_for(zenith=30, AZ_PNT=0)
    x = np.clip(np.cos(np.radians(30)), [0.7, 0.6], 1.0) - [0.9, 0.85]
    w = (np.cos(np.radians(10)) - np.cos(np.radians(30))) / (np.cos(np.radians(10)) - np.cos(np.radians(50)))
    expected = (1 + w) * np.exp(np.array([-4.0, -2.0]) * x) * np.exp(-0.3 * (0.5 - 0.1))
    assert_allclose(bkg.data, expected[:, None] * np.ones((2, 2)), rtol=1e-12)
    assert_allclose(read.model_for(zenith=30, NORTH_PNT=0.5).data, bkg.data, rtol=1e-12)
    assert_allclose(bkg.meta["CORRFAC"], expected[0] / (1 + w), rtol=1e-12)  # at 1 TeV: energy bin [1, 3.16] TeV
    with pytest.raises(ValueError, match=r"Give a value for \['NORTH_PNT'\]: the collection needs \['ZEN_PNT', 'NORTH_PNT'\]"):
        read.model_for(zenith=30)


# --- bad input (issue 13) ---


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_negative_livetime_in_the_obs_index_names_the_runs(archive):
    bad = archive.off_ids[3]

    def negative(table):
        table["LIVETIME"][table["OBS_ID"] == bad] = -1000

    store = archive.change_obs_index(negative)
    maker = ObservingConditionsEstimator(bins={"ZEN_PNT": 3}, corrections={})
    with pytest.raises(ValueError) as error:
        maker.run(store, archive.off_ids)
    assert f"Runs [{bad}] have LIVETIME <= 0 or NaN; fix or drop them." in one_line(error)


def test_missing_zenith_column(archive):
    store = archive.change_obs_index(lambda table: table.remove_column("ZEN_PNT"))
    with pytest.raises(KeyError) as error:
        ObservingConditionsEstimator(corrections={}).run(store, archive.off_ids)
    assert "The obs table has no column 'ZEN_PNT'" in str(error.value)


@pytest.mark.parametrize("column", ["ZEN_PNT", "MUONEFF"])
def test_nan_condition_of_a_run_outside_the_build_set(column):
    """A run to assign with NaN zenith or MUONEFF is refused by name, never given a NaN model."""
    collection = collection_2x2()
    table = Table({"OBS_ID": [7, 8, 9], "ZEN_PNT": [20.0, 35.0, 30.0], "MUONEFF": [0.95, 1.05, 1.0], "AZ_PNT": [90.0, 0.0, 0.0]})
    table[column][1] = np.nan
    message = rf"Runs \[8\] have no valid {column} in the obs table; fix or drop them."
    with pytest.raises(ValueError, match=message):
        collection.to_store_inputs(table)
    with pytest.raises(ValueError, match=message):
        collection.to_store_inputs(table, interpolate=False)
    values = {"zenith": 20.0, "muoneff": 0.95, "AZ_PNT": 0.0}
    values["zenith" if column == "ZEN_PNT" else "muoneff"] = np.nan
    with pytest.raises(ValueError, match=rf"no valid {column}"):
        collection.model_for(**values)


def test_text_column_in_bins(synthetic_histograms):
    runs = synthetic_histograms([5, 10, 25, 30])
    runs.obs_table["SEASON"] = ["wet", "dry", "wet", "dry"]
    maker = ObservingConditionsEstimator(bins={"SEASON": [0, 1, 2]}, corrections={})
    with pytest.raises(TypeError) as error:
        maker.make_collection(runs)
    assert "Column SEASON of the obs table holds" in one_line(error) and "bin a numeric column" in one_line(error)


def test_truncated_collection_file(tmp_path):
    filename = tmp_path / "collection.fits"
    collection_2x2().write(filename)
    data = filename.read_bytes()
    filename.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError) as error:
        BackgroundModelCollection.read(filename)
    message = one_line(error)
    assert f"Cannot read a background model collection from {filename}" in message
    assert "truncated" in message.lower() and "CORRECTIONS" not in message


def test_single_model_collection_serves_every_run(synthetic_histograms):
    """Without bins, one model from all runs; every run to assign gets it (a one-bin weight each)."""
    runs = synthetic_histograms([10, 20, 30, 40], rate=[1e-6, 2e-6, 3e-6, 4e-6])
    collection = ObservingConditionsEstimator(bins={}, corrections={}).make_collection(runs)
    assert collection.n_bins == 1 and collection.shape == ()
    counts, exposure = runs.sum()
    assert_allclose(collection.models[0].quantity.to_value(RATE), counts / exposure.value, rtol=1e-12)
    models, assignment = collection.to_store_inputs(runs.obs_table)
    assert list(assignment["BKG_HDU"]) == ["BKG_1", "BKG_2", "BKG_3", "BKG_4"]
    for model in models.values():
        assert_allclose(model.data, collection.models[0].data, rtol=1e-12)
    assert_allclose(collection.model_for().data, collection.models[0].data, rtol=1e-12)
