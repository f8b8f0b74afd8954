"""Smoke test of benchmarks/benchmark.py on a tiny configuration, and the invariants it relies on.

No wall-clock assertion: timings depend on the machine and its load. The timed functions are
checked for what they compute: each replica is the original run file with only its OBS_ID cards
changed, the replicated archive gives exactly ``replicas`` times the counts and exposure of the
original runs, and the tutorial-style loop agrees with the estimator.
"""

import gzip
import importlib.util
import json
from pathlib import Path
import numpy as np
from numpy.testing import assert_allclose
import pytest
from astropy.io import fits
from astropy.table import Table
from gammapy.data import DataStore
from bkgtemplate import BackgroundModelEstimator, RunError
from bkgtemplate.data import collect_runs, read_events
from bkgtemplate.geometry import SIDEREAL_RATE, fov_radec_to_altaz, parallactic_angle, sky_to_fov_altaz, sky_to_fov_radec

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
    replicated_dir = tmp_path_factory.mktemp("replicated") / "store"
    replicated = benchmark.make_replicated_store(data_dir, replicated_dir, REPLICAS, obs_ids)
    return original, obs_ids, replicated, replicated_dir


def test_replicated_store_has_a_file_per_run_with_its_obs_id(data_dir, stores):
    original, obs_ids, replicated, replicated_dir = stores
    new_ids = [int(obs_id) for obs_id in replicated.obs_table["OBS_ID"]]
    assert len(new_ids) == REPLICAS * N_RUNS
    assert len(set(new_ids)) == len(new_ids)
    assert not set(new_ids) & {int(obs_id) for obs_id in original.obs_table["OBS_ID"]}
    assert sorted(path.name for path in replicated_dir.iterdir()) == ["data", "hdu-index.fits.gz", "obs-index.fits.gz"]
    assert len(list((replicated_dir / "data").iterdir())) == len(new_ids)
    assert [row["TARGET_NAME"].strip() for row in replicated.obs_table] == ["Off data"] * len(new_ids)
    originals = dict(zip(obs_ids, benchmark.event_paths(original, obs_ids)))
    for new_id, (path, hdu) in zip(new_ids, benchmark.event_paths(replicated, new_ids)):
        # a file of its own inside the replicated store, every HDU row of the run pointing at it
        assert Path(path).parent == replicated_dir / "data"
        rows = replicated.hdu_table[replicated.hdu_table["OBS_ID"] == new_id]
        assert {str(name).strip() for name in rows["FILE_NAME"]} == {Path(path).name}
        old_id = new_id % _step(original)
        assert len(rows) == len(original.hdu_table[original.hdu_table["OBS_ID"] == old_id])
        old_path, old_hdu = originals[old_id]
        assert hdu == old_hdu
        with fits.open(path) as copy, fits.open(old_path) as source:
            assert [h.name for h in copy] == [h.name for h in source]
            for h_copy, h_source in zip(copy, source):
                # the headers differ only in OBS_ID, which is the new id wherever the original has one
                assert h_copy.header.get("OBS_ID") == (new_id if "OBS_ID" in h_source.header else None)
                assert [c.image for c in h_copy.header.cards if c.keyword != "OBS_ID"] == [c.image for c in h_source.header.cards if c.keyword != "OBS_ID"]
        # decompressed, the copy is the original file with only the OBS_ID values changed
        copy_bytes, source_bytes = gzip.open(path).read(), gzip.open(old_path).read()
        assert len(copy_bytes) == len(source_bytes)
        differing = np.flatnonzero(np.frombuffer(copy_bytes, np.uint8) != np.frombuffer(source_bytes, np.uint8))
        assert len(differing) > 0
        assert all(copy_bytes[i - i % 80 : i - i % 80 + 8] == b"OBS_ID  " for i in differing)


def _step(original):
    """The OBS_ID step between copies, computed here from the docstring's rule (a power of ten above all ids)."""
    return 10 ** len(str(int(max(original.obs_table["OBS_ID"]))))


def test_replicated_runs_pass_the_index_check(stores):
    """The package reads every replica: its EVENTS header names the run its index row names."""
    _, _, replicated, _ = stores
    new_ids = benchmark.off_obs_ids(replicated)
    for run in collect_runs(replicated, new_ids):
        events, _ = read_events(run)
        assert len(events["energy"]) > 0


def test_index_row_pointing_at_another_run_is_refused(stores, tmp_path):
    """What the old benchmark archive did (new OBS_ID, original file) is refused by the package."""
    original, obs_ids, _, _ = stores
    obs_table = Table(original.obs_table[original.obs_table["OBS_ID"] == obs_ids[0]])
    hdu_table = Table(original.hdu_table[original.hdu_table["OBS_ID"] == obs_ids[0]])
    obs_table["OBS_ID"] += 1
    hdu_table["OBS_ID"] += 1
    hdu_table["FILE_DIR"] = [str((Path(original.hdu_table.base_dir) / str(d).strip()).resolve()) for d in hdu_table["FILE_DIR"]]
    for table in (obs_table, hdu_table):
        table.meta.pop("BASE_DIR", None)
    obs_table.write(tmp_path / "obs-index.fits.gz")
    hdu_table.write(tmp_path / "hdu-index.fits.gz")
    with pytest.raises(RunError, match=f"holds run {obs_ids[0]}"):
        BackgroundModelEstimator().fill(DataStore.from_dir(tmp_path), [obs_ids[0] + 1])


def test_replicated_store_is_reused_or_refused(data_dir, stores, tmp_path):
    original, obs_ids, replicated, replicated_dir = stores
    before = {path: path.stat().st_mtime_ns for path in replicated_dir.rglob("*")}
    again = benchmark.make_replicated_store(data_dir, replicated_dir, REPLICAS, obs_ids)
    assert list(again.obs_table["OBS_ID"]) == list(replicated.obs_table["OBS_ID"])
    assert {path: path.stat().st_mtime_ns for path in replicated_dir.rglob("*")} == before
    # a folder that is not this replicated store (another number of replicas, a foreign folder)
    # is refused and left as it was
    with pytest.raises(ValueError, match="is not this replicated store"):
        benchmark.make_replicated_store(data_dir, replicated_dir, REPLICAS + 1, obs_ids)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not this replicated store"):
        benchmark.make_replicated_store(data_dir, foreign, REPLICAS, obs_ids)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    assert {path: path.stat().st_mtime_ns for path in replicated_dir.rglob("*")} == before


def test_failed_build_leaves_nothing_behind(data_dir, stores, tmp_path):
    """A run that cannot be replicated stops the build before the store exists, and its staging folder is removed."""
    _, obs_ids, _, _ = stores
    out_dir = tmp_path / "replicated"
    with pytest.raises(ValueError, match="Run 1 has its HDUs in 0 files"):
        benchmark.make_replicated_store(data_dir, out_dir, REPLICAS, [*obs_ids, 1])
    assert list(tmp_path.iterdir()) == []


def test_replicated_store_refuses_the_input_folder(data_dir, stores):
    _, obs_ids, _, _ = stores
    for out_dir in (data_dir, data_dir / "replicated"):
        with pytest.raises(ValueError, match="input data folder"):
            benchmark.make_replicated_store(data_dir, out_dir, REPLICAS, obs_ids)
    assert not (data_dir / "replicated").exists()
    assert not list(data_dir.glob(".replicated-*"))


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_replicated_archive_multiplies_counts_and_exposure(stores, kind):
    original, obs_ids, replicated, _ = stores
    estimator = benchmark.make_estimators()[kind]
    single = estimator.fill(original, obs_ids)
    scaled = estimator.fill(replicated, benchmark.off_obs_ids(replicated))
    assert single.counts.sum() > 0
    assert len(scaled) == REPLICAS * len(single)
    # run by run: copy k of run i has run i's counts and exposure
    for k in range(REPLICAS):
        copies = scaled.counts[k * N_RUNS : (k + 1) * N_RUNS]
        assert_allclose(copies, single.counts, atol=0)
    counts, exposure = scaled.sum()
    single_counts, single_exposure = single.sum()
    assert_allclose(counts, REPLICAS * single_counts, atol=0)
    assert_allclose(exposure.to_value("s MeV sr"), REPLICAS * single_exposure.to_value("s MeV sr"), rtol=1e-12)


def test_tutorial_loop_agrees_with_estimator(stores):
    original, obs_ids, _, _ = stores
    counts, exposure = benchmark.tutorial_loop(original, obs_ids)
    summed_counts, summed_exposure = BackgroundModelEstimator().fill(original, obs_ids).sum()
    assert counts.sum() > 0
    assert_allclose(summed_counts, counts, atol=0)
    # gammapy's observation duration (the loop) is the obs-index ONTIME (the estimator) here
    assert_allclose(summed_exposure.to_value("s MeV sr"), exposure, rtol=1e-12)


def test_read_floor_reads_every_event(stores):
    original, obs_ids, _, _ = stores
    n_events = benchmark.read_floor(benchmark.event_paths(original, obs_ids))
    assert n_events == sum(len(original.obs(obs_id, required_irf=[]).events.table) for obs_id in obs_ids)


def test_vectorised_altaz_path_matches_the_public_transforms(stores):
    """The fused per-event ALTAZ transform equals composing the RADEC transform and the rotation."""
    original, obs_ids, _, _ = stores
    run = collect_runs(original, obs_ids[:1])[0]
    events, (ra_pnt, dec_pnt) = read_events(run)
    hour_angle = run.hour_angle + SIDEREAL_RATE * (events["time"] - run.tstart)
    parallactic = parallactic_angle(hour_angle, run.dec_apparent, run.latitude)
    fused = sky_to_fov_altaz(events["ra"], events["dec"], ra_pnt, dec_pnt, parallactic)
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
    replicas = results["replicas"]
    assert replicas["n_files"] == REPLICAS * N_RUNS + 2 and replicas["disk_mb"] > 0 and not replicas["reused"]
    assert not Path(replicas["folder"]).exists()  # the temporary folder is removed
    printed = capsys.readouterr().out
    assert "estimator_2d" in printed and "target" in printed and str(output) in printed


@pytest.mark.slow
@pytest.mark.parametrize("kind, shape", [("2d", (15, 10)), ("3d", (15, 20, 20))])
def test_memory_probe_in_a_fresh_process(data_dir, kind, shape):
    memory = benchmark.memory_in_subprocess(data_dir, max_runs=N_RUNS, kind=kind)
    assert memory["n_runs"] == N_RUNS and memory["n_jobs"] == 1 and memory["kind"] == kind
    assert memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0
    # the model's rates in float64, whatever the number of runs
    assert memory["model_mb"] == pytest.approx(np.prod(shape) * 8 / 2**20)
