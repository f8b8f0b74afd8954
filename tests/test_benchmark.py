"""Smoke test of benchmarks/benchmark.py on a tiny configuration, and the invariants it relies on.

No wall-clock assertion: timings depend on the machine and its load. The timed functions are
checked for what they compute: the replicated archive gives exactly ``replicas`` times the counts
and exposure of the original runs, and the tutorial-style loop agrees with the estimator.
"""

import importlib.util
import json
from pathlib import Path
from numpy.testing import assert_allclose
import pytest
from gammapy.data import DataStore
from bkgtemplate import BackgroundModelEstimator
from bkgtemplate.runs import collect_runs

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
LOCAL_HESS_DIR = Path("/work/shared/gammapy-data/hess-dl3-dr1")
N_RUNS = 3
REPLICAS = 2

pytestmark = pytest.mark.hess


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bkgtemplate_benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()


@pytest.fixture(scope="module")
def data_dir(request):
    """The shared ``hess_dir`` fixture where conftest provides it, else the project's data folder."""
    try:
        return Path(request.getfixturevalue("hess_dir"))
    except pytest.FixtureLookupError:
        if not (LOCAL_HESS_DIR / "obs-index.fits.gz").is_file():
            pytest.skip(f"real H.E.S.S. data absent: {LOCAL_HESS_DIR}")
        return LOCAL_HESS_DIR


@pytest.fixture(scope="module")
def stores(data_dir, tmp_path_factory):
    """The original store with its first off runs, and the replicated store built from them."""
    original = DataStore.from_dir(data_dir)
    obs_ids = benchmark.off_obs_ids(original, N_RUNS)
    replicated_dir = tmp_path_factory.mktemp("replicated")
    replicated = benchmark.make_replicated_store(data_dir, replicated_dir, REPLICAS, obs_ids)
    return original, obs_ids, replicated, replicated_dir


def test_replicated_store_points_at_the_original_files(data_dir, stores):
    original, obs_ids, replicated, replicated_dir = stores
    new_ids = [int(obs_id) for obs_id in replicated.obs_table["OBS_ID"]]
    assert len(new_ids) == REPLICAS * N_RUNS
    assert len(set(new_ids)) == len(new_ids)
    assert not set(new_ids) & {int(obs_id) for obs_id in original.obs_table["OBS_ID"]}
    assert sorted(path.name for path in replicated_dir.iterdir()) == ["hdu-index.fits.gz", "obs-index.fits.gz"]
    # every copy reads the same events file as its original run (compared resolved: the data
    # folder may be reached through a symbolic link)
    original_files = {(Path(path).resolve(), hdu) for path, hdu in benchmark.event_paths(original, obs_ids)}
    for path, hdu in benchmark.event_paths(replicated, new_ids):
        assert Path(path).is_file()
        assert (Path(path).resolve(), hdu) in original_files
    assert [row["TARGET_NAME"].strip() for row in replicated.obs_table] == ["Off data"] * len(new_ids)


def test_replicated_store_refuses_the_input_folder(data_dir, stores):
    _, obs_ids, _, _ = stores
    for out_dir in (data_dir, data_dir / "replicated"):
        with pytest.raises(ValueError, match="input data folder"):
            benchmark.make_replicated_store(data_dir, out_dir, REPLICAS, obs_ids)
    assert not (data_dir / "replicated").exists()


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_replicated_archive_multiplies_counts_and_exposure(stores, kind):
    original, obs_ids, replicated, _ = stores
    estimator = benchmark.make_estimators()[kind]
    single = estimator.fill_histograms(original, obs_ids)
    scaled = estimator.fill_histograms(replicated, benchmark.off_obs_ids(replicated))
    assert single.counts.sum() > 0
    assert_allclose(scaled.counts, REPLICAS * single.counts, atol=0)
    assert_allclose(scaled.exposure.to_value("s MeV sr"), REPLICAS * single.exposure.to_value("s MeV sr"), rtol=1e-12)
    assert len(scaled.obs_ids) == REPLICAS * len(single.obs_ids)


def test_tutorial_loop_agrees_with_estimator(stores):
    original, obs_ids, _, _ = stores
    counts, exposure = benchmark.tutorial_loop(original, obs_ids)
    histograms = BackgroundModelEstimator().fill_histograms(original, obs_ids)
    assert counts.sum() > 0
    assert_allclose(histograms.counts, counts, atol=0)
    # gammapy's observation duration (the loop) is the obs-index ONTIME (the estimator) here
    assert_allclose(histograms.exposure.to_value("s MeV sr"), exposure, rtol=1e-12)


def test_read_floor_reads_every_event(stores):
    original, obs_ids, _, _ = stores
    n_events = benchmark.read_floor(benchmark.event_paths(original, obs_ids))
    assert n_events == sum(len(original.obs(obs_id, required_irf=[]).events.table) for obs_id in obs_ids)


def test_vectorised_altaz_path_matches_the_public_transforms(stores):
    """The fused per-event ALTAZ transform of the estimator equals composing the public functions."""
    from bkgtemplate.fov import _sky_to_fov_altaz, fov_radec_to_altaz, sky_to_fov_radec
    from bkgtemplate.histograms import _parallactic
    from bkgtemplate.runs import read_events

    original, obs_ids, _, _ = stores
    run = collect_runs(original, obs_ids[:1])[0]
    events, (ra_pnt, dec_pnt) = read_events(run)
    parallactic = _parallactic(run, events["time"])
    fused = _sky_to_fov_altaz(events["ra"], events["dec"], ra_pnt, dec_pnt, parallactic)
    composed = fov_radec_to_altaz(*sky_to_fov_radec(events["ra"], events["dec"], ra_pnt, dec_pnt), parallactic)
    assert_allclose(fused, composed, rtol=0, atol=1e-13)


def test_benchmark_command_writes_results(data_dir, tmp_path, capsys):
    output = tmp_path / "out" / "benchmark.json"
    argv = ["--data-dir", str(data_dir), "--max-runs", str(N_RUNS), "--replicas", str(REPLICAS)]
    assert benchmark.main([*argv, "--repeats", "1", "--no-memory", "--output", str(output)]) == 0
    results = json.loads(output.read_text())

    assert results["config"]["replicas"] == REPLICAS
    archives = results["archives"]
    assert archives["a"]["n_runs"] == N_RUNS
    assert archives["b"]["n_runs"] == REPLICAS * N_RUNS
    assert archives["b"]["n_events"] == REPLICAS * archives["a"]["n_events"]
    for key, names in [("a", {"floor", "estimator_2d", "estimator_3d", "loop"}), ("b", {"floor", "estimator_2d", "estimator_3d", "estimator_2d_njobs2", "loop"})]:
        assert set(archives[key]["times"]) == names
        for times in archives[key]["times"].values():
            assert len(times["all"]) == 1
            assert times["best"] == min(times["all"]) > 0
    targets = {row["name"]: row for row in results["targets"]}
    assert len(targets) == len(benchmark.TARGETS)
    for row in targets.values():
        assert row["kind"] in ("max", "min") and isinstance(row["ok"], bool) and row["value"] > 0
    printed = capsys.readouterr().out
    assert "estimator_2d" in printed and "targets" in printed and str(output) in printed


@pytest.mark.slow
def test_memory_probe_in_a_fresh_process(data_dir):
    memory = benchmark.memory_in_subprocess(data_dir, max_runs=N_RUNS)
    assert memory["n_runs"] == N_RUNS and memory["n_jobs"] == 1
    assert memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0
