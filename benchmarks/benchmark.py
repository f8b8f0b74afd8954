"""Benchmark of `bkgtemplate.BackgroundModelEstimator` on the H.E.S.S. DL3 DR1 off runs.

Measured in one process, on (a) the off runs and (b) a scaled archive of ``--replicas``
copies of them (a temporary data store whose index points N times at the same files under
new OBS_IDs):

- the read floor: astropy reading ENERGY, RA, DEC and TIME of the EVENTS HDU of every run;
- the estimator, 2D (energy, offset) and 3D (energy, fov_lon, fov_lat, ALTAZ), ``run()`` end to end;
- a per-run loop like the original gammapy tutorial (``obs.events``, SkyCoord separation,
  ``np.histogram2d``);
- on (b), the estimator with ``n_jobs=2`` against ``n_jobs=1``;
- peak memory (RSS) of the estimator at both sizes, each in a fresh subprocess.

Run ``python benchmarks/benchmark.py --help``; see ``benchmarks/README.md`` for how to read it.
"""

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import numpy as np
import astropy
from astropy.io import fits
from astropy.table import Table, vstack
import gammapy
from gammapy.data import DataStore
from bkgtemplate import BackgroundModelEstimator, default_energy_axis, default_fov_axes, default_offset_axis
from bkgtemplate.data import find_data_dir
from bkgtemplate.geometry import offset_solid_angle

log = logging.getLogger("benchmark")

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "output" / "benchmark.json"
FLOOR_COLUMNS = ("ENERGY", "RA", "DEC", "TIME")
OFF_TARGET = "Off data"
# Targets of issue 7: (name, numerator, denominator, bound, "max" or "min").
TARGETS = [
    ("2D estimator / read floor, (a)", ("a", "estimator_2d"), ("a", "floor"), 1.3, "max"),
    ("2D estimator / read floor, (b)", ("b", "estimator_2d"), ("b", "floor"), 1.3, "max"),
    ("tutorial loop / 2D estimator, (a)", ("a", "loop"), ("a", "estimator_2d"), 3.0, "min"),
    ("tutorial loop / 2D estimator, (b)", ("b", "loop"), ("b", "estimator_2d"), 3.0, "min"),
    ("ALTAZ 3D / 2D estimator, (a)", ("a", "estimator_3d"), ("a", "estimator_2d"), 2.0, "max"),
    ("ALTAZ 3D / 2D estimator, (b)", ("b", "estimator_3d"), ("b", "estimator_2d"), 2.0, "max"),
    ("n_jobs=1 / n_jobs=2 (2D), (b)", ("b", "estimator_2d"), ("b", "estimator_2d_njobs2"), 1.7, "min"),
]


def off_obs_ids(data_store, max_runs=None):
    """OBS_IDs of the runs with TARGET_NAME "Off data", in index order, at most ``max_runs``."""
    table = data_store.obs_table
    names = np.char.strip(np.asarray(table["TARGET_NAME"]).astype(str))
    obs_ids = [int(obs_id) for obs_id in table["OBS_ID"][names == OFF_TARGET]]
    return obs_ids[:max_runs] if max_runs else obs_ids


def make_replicated_store(data_dir, out_dir, replicas, obs_ids):
    """Write a data store whose index holds ``replicas`` copies of ``obs_ids`` under new OBS_IDs.

    The HDU index rows point at the original files with an absolute FILE_DIR, so nothing
    is copied and the input folder is only read. Copy ``k`` (1 to ``replicas``) of run
    ``obs_id`` gets OBS_ID ``k * step + obs_id``, with ``step`` a power of ten above all OBS_IDs.

    Parameters
    ----------
    data_dir : str or `~pathlib.Path`
        Folder of the original data store.
    out_dir : str or `~pathlib.Path`
        Folder for the new index files; must not be ``data_dir`` or inside it.
    replicas : int
        Number of copies.
    obs_ids : list of int
        Runs to replicate.

    Returns
    -------
    data_store : `~gammapy.data.DataStore`
        The replicated store, opened with ``DataStore.from_dir``.
    """
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    if out_dir == data_dir or data_dir in out_dir.parents:
        raise ValueError(f"Refusing to write the replicated index {out_dir} into the input data folder {data_dir}.")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}.")
    original = DataStore.from_dir(data_dir)
    step = 10 ** len(str(max(int(i) for i in original.obs_table["OBS_ID"])))

    obs_table = Table(original.obs_table)
    obs_rows = obs_table[np.isin(obs_table["OBS_ID"], obs_ids)]
    hdu_table = Table(original.hdu_table)
    hdu_rows = hdu_table[np.isin(hdu_table["OBS_ID"], obs_ids)]
    base_dir = Path(original.hdu_table.base_dir)
    hdu_rows["FILE_DIR"] = [str((base_dir / str(d).strip()).resolve()) for d in hdu_rows["FILE_DIR"]]

    obs_copies, hdu_copies = [], []
    for k in range(1, replicas + 1):
        obs_copy, hdu_copy = obs_rows.copy(), hdu_rows.copy()
        obs_copy["OBS_ID"] += k * step
        hdu_copy["OBS_ID"] += k * step
        obs_copies.append(obs_copy)
        hdu_copies.append(hdu_copy)
    obs_new, hdu_new = vstack(obs_copies, metadata_conflicts="silent"), vstack(hdu_copies, metadata_conflicts="silent")
    obs_new.meta, hdu_new.meta = dict(obs_table.meta), dict(hdu_table.meta)
    for table in (obs_new, hdu_new):
        table.meta.pop("BASE_DIR", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    obs_new.write(out_dir / "obs-index.fits.gz", overwrite=True)
    hdu_new.write(out_dir / "hdu-index.fits.gz", overwrite=True)
    return DataStore.from_dir(out_dir)


def event_paths(data_store, obs_ids):
    """Path and HDU name of the events of each run, from the HDU index."""
    locations = [data_store.hdu_table.hdu_location(obs_id, hdu_type="events") for obs_id in obs_ids]
    return [(str(location.path()), location.hdu_name) for location in locations]


def read_floor(paths, columns=FLOOR_COLUMNS):
    """Astropy reading only the needed columns of the EVENTS HDU of every run.

    Parameters
    ----------
    paths : list of (str, str)
        File path and HDU name of each run (see `event_paths`).
    columns : tuple of str, optional
        Columns read. Default is ENERGY, RA, DEC, TIME.

    Returns
    -------
    n_events : int
        Number of events read.
    """
    n_events = 0
    for path, hdu in paths:
        with fits.open(path, memmap=False) as hdulist:
            data = hdulist[hdu].data
            arrays = [np.asarray(data[name]) for name in columns]
            n_events += len(arrays[0])
    return n_events


def tutorial_loop(data_store, obs_ids, energy_axis=None, offset_axis=None, safe_threshold=True):
    """Counts and exposure of a 2D model, computed run by run as in the original tutorial.

    gammapy ``obs.events`` per run, offsets from a SkyCoord separation (``events.offset``),
    ``np.histogram2d``; exposure ontime (``obs.observation_time_duration``) x dE x dOmega
    (exact ring solid angle), zero below ``SAFE_ENERGY_LO`` as in the estimator, so that
    both compute the same counts and exposure.

    Returns
    -------
    counts, exposure : `~numpy.ndarray`
        Shape (n_energy, n_offset); exposure in s MeV sr.
    """
    energy_axis = energy_axis or default_energy_axis()
    offset_axis = offset_axis or default_offset_axis()
    energy_edges = energy_axis.edges.to_value("TeV")
    offset_edges = offset_axis.edges.to_value("deg")
    solid_angle = offset_solid_angle(offset_axis).to_value("sr")
    d_energy = energy_axis.bin_width.to_value("MeV")
    rows = data_store.obs_table.select_obs_id(obs_ids)
    thresholds = dict(zip((int(i) for i in rows["OBS_ID"]), rows["SAFE_ENERGY_LO"].quantity.to_value("TeV")))

    counts = np.zeros((energy_axis.nbin, offset_axis.nbin))
    exposure = np.zeros_like(counts)
    for obs_id in obs_ids:
        obs = data_store.obs(obs_id, required_irf="all-optional")
        events = obs.events
        offset = events.offset.to_value("deg")
        run_counts = np.histogram2d(events.energy.to_value("TeV"), offset, bins=(energy_edges, offset_edges))[0]
        used = energy_edges[:-1] >= thresholds[obs_id] * (1 - 1e-6) if safe_threshold else np.ones(len(d_energy), bool)
        run_counts[~used] = 0
        counts += run_counts
        ontime = obs.observation_time_duration.to_value("s")
        exposure += ontime * np.outer(d_energy * used, solid_angle)
    return counts, exposure


def make_estimators(n_jobs=1):
    """The 2D and ALTAZ 3D estimators with the default axes."""
    lon, lat = default_fov_axes()
    return {
        "2d": BackgroundModelEstimator(n_jobs=n_jobs),
        "3d": BackgroundModelEstimator(fov_lon_axis=lon, fov_lat_axis=lat, fov_alignment="ALTAZ", n_jobs=n_jobs),
    }


def time_interleaved(functions, repeats):
    """Time each function ``repeats`` times after one warm-up call, rotating the order each round.

    Parameters
    ----------
    functions : dict of callable
        Name to function of no argument.
    repeats : int
        Timed calls per function.

    Returns
    -------
    times : dict
        Per name: ``best``, ``median`` and ``all`` wall-clock times, and ``cpu_best``, the CPU
        time of this process and its finished children (pool workers) in the fastest call, in s.
    """
    names = list(functions)
    for name in names:
        functions[name]()
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start = _cpu_time()
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(_cpu_time() - cpu_start)
    return {
        name: {
            "best": min(values),
            "median": float(np.median(values)),
            "all": values,
            "cpu_best": cpu[name][int(np.argmin(values))],
        }
        for name, values in times.items()
    }


def _cpu_time():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure_archive(data_store, obs_ids, repeats, with_loop=True, with_njobs2=False):
    """Times of the floor, the estimators and the tutorial loop on one archive (see module doc)."""
    paths = event_paths(data_store, obs_ids)
    estimators = make_estimators(n_jobs=1)
    functions = {
        "floor": lambda: read_floor(paths),
        "estimator_2d": lambda: estimators["2d"].run(data_store, obs_ids),
        "estimator_3d": lambda: estimators["3d"].run(data_store, obs_ids),
    }
    if with_njobs2:
        estimator_2 = make_estimators(n_jobs=2)["2d"]
        functions["estimator_2d_njobs2"] = lambda: estimator_2.run(data_store, obs_ids)
    if with_loop:
        functions["loop"] = lambda: tutorial_loop(data_store, obs_ids)
    n_events = read_floor(paths)
    return {"n_runs": len(obs_ids), "n_events": int(n_events), "times": time_interleaved(functions, repeats)}


def _rss_now_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(store_dir, max_runs=None, n_jobs=1):
    """Peak RSS of the 2D and ALTAZ 3D estimators in this process (call it in a fresh one).

    Returns
    -------
    result : dict
        ``n_runs``, ``rss_before_mb`` (after imports and opening the store), ``peak_rss_mb``
        (``ru_maxrss`` of this process) and ``peak_rss_children_mb`` (largest worker), in MB.
    """
    data_store = DataStore.from_dir(store_dir)
    obs_ids = off_obs_ids(data_store, max_runs)
    rss_before = _rss_now_mb()
    for estimator in make_estimators(n_jobs=n_jobs).values():
        estimator.run(data_store, obs_ids)
    return {
        "n_runs": len(obs_ids),
        "n_jobs": n_jobs,
        "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def memory_in_subprocess(store_dir, max_runs=None, n_jobs=1):
    """Run `memory_probe` in a fresh Python process, so that each size is measured on its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(store_dir), "--n-jobs", str(n_jobs)]
    if max_runs:
        command += ["--max-runs", str(max_runs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _ratio(archives, numerator, denominator, statistic="best"):
    (archive_n, name_n), (archive_d, name_d) = numerator, denominator
    return archives[archive_n]["times"][name_n][statistic] / archives[archive_d]["times"][name_d][statistic]


def evaluate_targets(results):
    """Ratios of issue 7 and whether they meet their targets.

    ``value`` is the ratio of the best wall-clock times (what the targets are about),
    ``value_median`` that of the medians and ``value_cpu`` that of the CPU times (None for
    the n_jobs speed-up, where the CPU time is spread over the workers).
    """
    rows = []
    archives = results["archives"]
    for name, numerator, denominator, bound, kind in TARGETS:
        if numerator[1] not in archives.get(numerator[0], {}).get("times", {}):
            continue
        if denominator[1] not in archives.get(denominator[0], {}).get("times", {}):
            continue
        value = _ratio(archives, numerator, denominator)
        parallel = "njobs2" in numerator[1] + denominator[1]
        rows.append(
            dict(
                name=name,
                value=value,
                value_median=_ratio(archives, numerator, denominator, "median"),
                value_cpu=None if parallel else _ratio(archives, numerator, denominator, "cpu_best"),
                bound=bound,
                kind=kind,
                ok=bool(value <= bound if kind == "max" else value >= bound),
            )
        )
    memory = results.get("memory", {})
    if "a" in memory and "b" in memory:
        value = memory["b"]["peak_rss_mb"] / memory["a"]["peak_rss_mb"]
        rows.append(
            dict(
                name="peak RSS (b) / (a), n_jobs=1",
                value=value,
                value_median=value,
                value_cpu=None,
                bound=1.1,
                kind="max",
                ok=bool(value <= 1.1),
            )
        )
    return rows


def run_benchmark(data_dir=None, replicas=20, repeats=3, max_runs=None, workdir=None, with_loop=True, with_memory=True):
    """Build the scaled archive and measure everything; see the module docstring.

    Parameters
    ----------
    data_dir : str or `~pathlib.Path`, optional
        Folder of the H.E.S.S. DL3 DR1 data. Default is None (``$GAMMAPY_DATA/hess-dl3-dr1``).
    replicas : int, optional
        Copies of the off runs in archive (b). Default is 20 (900 runs).
    repeats : int, optional
        Timed calls per method, after one warm-up. Default is 3.
    max_runs : int, optional
        Use only the first off runs (for quick checks). Default is None (all 45).
    workdir : str or `~pathlib.Path`, optional
        Folder for the scaled archive's index files. Default is None (a temporary folder).
    with_loop, with_memory : bool, optional
        Measure the tutorial loop, the peak memory. Default is True.

    Returns
    -------
    results : dict
        Configuration, times per archive and method, memory, and the targets.
    """
    data_dir = find_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="bkgtemplate-bench-") as tmp:
        store_b_dir = Path(workdir or tmp) / f"replicated-{replicas}"
        store_a = DataStore.from_dir(data_dir)
        obs_ids_a = off_obs_ids(store_a, max_runs)
        store_b = make_replicated_store(data_dir, store_b_dir, replicas, obs_ids_a)
        obs_ids_b = [int(obs_id) for obs_id in store_b.obs_table["OBS_ID"]]
        results = {
            "config": dict(
                data_dir=str(data_dir),
                replicas=replicas,
                repeats=repeats,
                max_runs=max_runs,
                cpu_count=os.cpu_count(),
                python=platform.python_version(),
                numpy=np.__version__,
                astropy=astropy.__version__,
                gammapy=gammapy.__version__,
                load_average=os.getloadavg(),
            ),
            "archives": {},
        }
        log.info(f"(a) {len(obs_ids_a)} runs")
        results["archives"]["a"] = measure_archive(store_a, obs_ids_a, repeats, with_loop=with_loop)
        log.info(f"(b) {len(obs_ids_b)} runs")
        results["archives"]["b"] = measure_archive(store_b, obs_ids_b, repeats, with_loop=with_loop, with_njobs2=True)
        if with_memory:
            log.info("peak memory, each size in a fresh process")
            results["memory"] = {
                "a": memory_in_subprocess(data_dir, max_runs),
                "b": memory_in_subprocess(store_b_dir),
                "a_njobs2": memory_in_subprocess(data_dir, max_runs, n_jobs=2),
                "b_njobs2": memory_in_subprocess(store_b_dir, n_jobs=2),
            }
        results["config"]["load_average_end"] = os.getloadavg()
    results["targets"] = evaluate_targets(results)
    return results


def format_table(results):
    """The results as a plain-text report."""
    archives = results["archives"]
    headers = [f"({key}) {archive['n_runs']} runs" for key, archive in archives.items()]
    lines = [f"{'':<20}" + "".join(f"{header:^30}" for header in headers)]
    lines.append(f"{'time [s]':<20}" + f"{'best':>10}{'median':>10}{'cpu':>10}" * len(archives))
    for name in ["floor", "estimator_2d", "estimator_3d", "estimator_2d_njobs2", "loop"]:
        cells = []
        for archive in archives.values():
            t = archive["times"].get(name)
            cells.append(f"{t['best']:>10.3f}{t['median']:>10.3f}{t['cpu_best']:>10.3f}" if t else f"{'-':>10}" * 3)
        if any(name in archive["times"] for archive in archives.values()):
            lines.append(f"{name:<20}" + "".join(cells))
    lines.append(f"{'events read':<20}" + "".join(f"{archive['n_events']:>30}" for archive in archives.values()))
    if "memory" in results:
        lines += ["", "peak RSS, each size in a fresh process [MB]:"]
        for key, mem in results["memory"].items():
            lines.append(
                f"  {key:<9}{mem['n_runs']:>5} runs, n_jobs={mem['n_jobs']}: peak {mem['peak_rss_mb']:7.1f}"
                f"  (before the estimator {mem['rss_before_mb']:.1f}, largest worker {mem['peak_rss_children_mb']:.1f})"
            )
    lines += ["", f"{'ratio':<38}{'best':>7}{'median':>8}{'cpu':>7}   target"]
    for row in results["targets"]:
        sign = "<=" if row["kind"] == "max" else ">="
        cpu = "-" if row["value_cpu"] is None else f"{row['value_cpu']:.2f}"
        status = "ok" if row["ok"] else "MISSED"
        lines.append(
            f"{row['name']:<38}{row['value']:>7.2f}{row['value_median']:>8.2f}{cpu:>7}   {sign} {row['bound']:<4} {status}"
        )
    config = results["config"]
    if config["max_runs"] or config["replicas"] != 20:
        lines.append("(the targets are meant for all 45 runs and 20 replicas; fixed costs dominate smaller runs)")
    lines.append(f"load average at start {config['load_average'][0]:.2f}, at end {config.get('load_average_end', [float('nan')])[0]:.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="H.E.S.S. DL3 DR1 folder. Default: $GAMMAPY_DATA/hess-dl3-dr1")
    parser.add_argument("--replicas", type=int, default=20, help="copies of the off runs in archive (b). Default: 20")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method after a warm-up. Default: 3")
    parser.add_argument("--max-runs", type=int, default=None, help="use only the first off runs. Default: all")
    parser.add_argument("--no-loop", action="store_true", help="skip the tutorial-style loop")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="smoke run: --max-runs 5 --replicas 2 --repeats 1")
    parser.add_argument("--workdir", default=None, help="keep the scaled archive's index here. Default: a temporary folder")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"JSON results. Default: {DEFAULT_OUTPUT}")
    parser.add_argument("--memory-probe", metavar="STORE_DIR", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.max_runs, args.n_jobs)))
        return 0

    if args.quick:
        args.max_runs, args.replicas, args.repeats = args.max_runs or 5, 2, 1
    results = run_benchmark(
        data_dir=args.data_dir,
        replicas=args.replicas,
        repeats=args.repeats,
        max_runs=args.max_runs,
        workdir=args.workdir,
        with_loop=not args.no_loop,
        with_memory=not args.no_memory,
    )
    print(format_table(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {output}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("bkgtemplate", "gammapy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.exit(main())
