"""Corrections of the rate with observing conditions: hand values, and fits that recover known
coefficients from synthetic runs whose counts are rate x exposure exactly."""

import numpy as np
import astropy.units as u
from astropy.table import Table
from numpy.testing import assert_allclose
import pytest
from bkgtemplate.conditions import ObservingConditionsEstimator
from bkgtemplate.corrections import CORRECTION_KINDS, ConditionCorrection

RATE = u.Unit("s-1 MeV-1 sr-1")


def test_corrections_hand_values():
    power = ConditionCorrection("MUONEFF", "power-law", reference=1.0, coefficient=2.0)
    assert_allclose(power.factor([0.9, 1.0]), [0.81, 1.0], rtol=1e-12)
    north_south = ConditionCorrection("AZ_PNT", "cos", reference=0.0, coefficient=-0.1)
    assert_allclose(north_south.factor([0, 90, 180]), np.exp([-0.1, 0, 0.1]), rtol=1e-12)
    with pytest.raises(ValueError, match="Unknown correction kind"):
        ConditionCorrection("MUONEFF", "spline", 1.0)


def test_correction_fit_recovers_known_index(synthetic_histograms):
    muoneff = np.array([0.85, 0.9, 1.0, 1.1, 1.2, 0.95])
    azimuth = np.array([0, 180, 0, 180, 90, 270])
    true = (muoneff / 1.0) ** 1.5 * np.exp(-0.1 * np.cos(np.radians(azimuth)))
    runs = synthetic_histograms([10, 12, 14, 16, 18, 11], muoneff=muoneff, azimuth=azimuth, rate=1e-6 * true)
    maker = ObservingConditionsEstimator(bins={}, corrections={"MUONEFF": "power-law", "AZ_PNT": "cos"})
    collection = maker.make_collection(runs)
    index, north_south = collection.corrections
    assert_allclose([index.coefficient, north_south.coefficient], [1.5, -0.1], atol=2e-3)
    # the model of each run gives back its counts
    for i, row in enumerate(runs.obs_table):
        bkg = collection.model_for(muoneff=row["MUONEFF"], AZ_PNT=row["AZ_PNT"])
        assert_allclose(bkg.quantity.to_value(RATE) * runs.exposure.value[i], runs.counts[i], rtol=5e-3)


def zenith_runs(synthetic_histograms, zenith, slopes, reference=0.9, exposure=None):
    """Runs whose rate in energy bin e is 1e-6 x shape x exp(slopes[e] x (cos(zenith) - reference)), exactly."""
    runs = synthetic_histograms(zenith)
    x = np.cos(np.radians(np.asarray(zenith, float)))
    factor = np.exp(np.asarray(slopes)[None, :] * (x[:, None] - reference))
    if exposure is not None:
        runs.exposure = runs.exposure * np.asarray(exposure, float)[:, :, None]
    runs.counts = 1e-6 * np.array([[1.0, 0.5], [0.1, 0.05]]) * factor[:, :, None] * runs.exposure.value
    return runs


def test_energy_dependent_correction_recovers_known_slopes(synthetic_histograms):
    zenith = [5, 15, 25, 35, 45, 50]
    runs = zenith_runs(synthetic_histograms, zenith, slopes=[-4.0, -1.5])
    collection = ObservingConditionsEstimator(bins={}, corrections={"ZEN_PNT": "cos"}).make_collection(runs)
    (correction,) = collection.corrections
    assert correction.energy_dependent
    assert_allclose(correction.coefficient, [-4.0, -1.5], atol=2e-3)
    # the reference is the livetime-weighted mean cos(zenith) of the runs (equal livetimes here)
    assert_allclose(correction.reference, np.mean(np.cos(np.radians(zenith))), rtol=1e-12)
    for i, z in enumerate(zenith):
        bkg = collection.model_for(zenith=z)
        assert_allclose(bkg.quantity.to_value(RATE) * runs.exposure.value[i], runs.counts[i], rtol=5e-3)


def test_correction_clipped_to_the_runs_that_measured_each_energy(synthetic_histograms):
    zenith = [10, 20, 30, 40]
    # the 40 deg run has no exposure in the first energy bin (below its threshold)
    exposure = np.ones((4, 2))
    exposure[3, 0] = 0
    runs = zenith_runs(synthetic_histograms, zenith, slopes=[-3.0, -3.0], exposure=exposure)
    collection = ObservingConditionsEstimator(bins={}, corrections={"ZEN_PNT": "cos"}).make_collection(runs)
    (correction,) = collection.corrections
    assert_allclose(correction.clip_min, np.cos(np.radians([30, 40])), rtol=1e-12)
    assert_allclose(correction.clip_max, np.cos(np.radians(10)), rtol=1e-12)
    # beyond the measured range the factor stays at its edge: never extrapolated
    assert_allclose(correction.factor([30, 55])[1, 0], correction.factor([30])[0, 0], rtol=1e-12)
    assert_allclose(correction.factor([40, 55])[:, 1], correction.factor([40, 40])[:, 1], rtol=1e-12)
    assert_allclose(correction.factor([0])[0], correction.factor([10])[0], rtol=1e-12)
    # a scalar correction is clipped to the range of all runs
    muoneff = ObservingConditionsEstimator(bins={}, corrections={"MUONEFF": "power-law"}).make_collection(
        synthetic_histograms([10, 20], muoneff=[0.9, 1.1], rate=[1e-6 * 0.9**2, 1e-6 * 1.1**2])
    )
    (index,) = muoneff.corrections
    assert_allclose(index.coefficient, 2, atol=2e-3)
    assert_allclose(index.factor(1.5), index.factor(1.1), rtol=1e-12)


def test_table_round_trip_and_energy_dependence():
    # clip ranges are in the transformed value: log(MUONEFF) for a power law
    scalar = ConditionCorrection("MUONEFF", "power-law", reference=1.0, coefficient=1.5, clip_min=np.log(0.8), clip_max=np.log(1.2))
    per_energy = ConditionCorrection(
        "ZEN_PNT", "cos", reference=np.array([0.9, 0.85]), coefficient=np.array([-4.0, -2.0]),
        clip_min=np.array([0.7, 0.6]), clip_max=np.array([1.0, 1.0]),
    )
    table = ConditionCorrection.to_table([scalar, per_energy], n_energy=2)
    assert isinstance(table, Table) and len(table) == 2
    assert list(table["COLUMN"]) == ["MUONEFF", "ZEN_PNT"]
    assert list(table["ENERGY_DEPENDENT"]) == [False, True]
    for read, expected in zip(ConditionCorrection.from_table(table), [scalar, per_energy]):
        assert (read.column, read.kind) == (expected.column, expected.kind)
        for name in ("reference", "coefficient", "clip_min", "clip_max"):
            assert_allclose(getattr(read, name), getattr(expected, name), rtol=0)
    assert not scalar.energy_dependent and per_energy.energy_dependent
    # a per-energy factor has one column per energy bin; values beyond the clip range stay at its edge
    assert_allclose(per_energy.factor([30.0]), np.exp([-4.0, -2.0] * (np.clip(np.cos(np.radians(30)), [0.7, 0.6], 1) - [0.9, 0.85]))[None], rtol=1e-12)
    assert_allclose(scalar.factor([1.5, 0.5]), [1.2**1.5, 0.8**1.5], rtol=1e-12)
    assert set(CORRECTION_KINDS) == {"power-law", "cos", "linear"}


@pytest.mark.parametrize("bins", [{}, {"ZEN_PNT": [0, 30, 60]}])
def test_fit_reaches_the_optimum_with_many_and_few_counts(synthetic_histograms, bins):
    """Exact counts of about 1e6 and 1 per bin: the likelihood is largest at the true slopes,
    which the fit reaches to 1e-4 (a relative tolerance on the likelihood, about 1e7 here,
    would stop it early on the poorly measured slope)."""
    zenith = [5, 15, 25, 35, 45, 50, 10, 40]
    runs = zenith_runs(synthetic_histograms, zenith, slopes=[-4.0, -1.5], exposure=np.tile([1e3, 1e-3], (8, 1)))
    maker = ObservingConditionsEstimator(bins=bins, interpolate=(), corrections={"ZEN_PNT": "cos"})
    (correction,) = maker.make_collection(runs).corrections
    assert_allclose(correction.coefficient, [-4.0, -1.5], atol=1e-4)
