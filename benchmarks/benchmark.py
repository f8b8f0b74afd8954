"""Benchmark of `bkgtemplate.BackgroundModelEstimator` on the H.E.S.S. DL3 DR1 off runs.

Measured in one process, on (a) the off runs and (b) a scaled archive of ``--replicas``
copies of them (a data store in a temporary folder: each copy a file of its own whose headers
and index rows carry a new OBS_ID, see `make_replicated_store`):

- the read floor: astropy reading ENERGY, RA, DEC and TIME of the EVENTS HDU of every run;
- the estimator, 2D (energy, offset) and 3D (energy, fov_lon, fov_lat, ALTAZ), ``run()`` end to end;
- a per-run loop like the original gammapy tutorial (``obs.events``, SkyCoord separation,
  ``np.histogram2d``);
- on (b), the estimator with ``n_jobs=2`` against ``n_jobs=1``;
- peak memory (RSS) of each estimator at both sizes, each in a fresh subprocess.

Run ``python benchmarks/benchmark.py --help``; see ``benchmarks/README.md`` for how to read it.
"""

import argparse
import gzip
import io
import itertools
import json
import logging
import os
import platform
import resource
import shutil
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
GZIP_MAGIC = b"\x1f\x8b"
# Targets of issues 7 and 12: (name, numerator, denominator, bound, "max" or "min").
TARGETS = [
    ("2D estimator / read floor, (a)", ("a", "estimator_2d"), ("a", "floor"), 1.3, "max"),
    ("2D estimator / read floor, (b)", ("b", "estimator_2d"), ("b", "floor"), 1.3, "max"),
    ("tutorial loop / 2D estimator, (a)", ("a", "loop"), ("a", "estimator_2d"), 3.0, "min"),
    ("tutorial loop / 2D estimator, (b)", ("b", "loop"), ("b", "estimator_2d"), 3.0, "min"),
    ("ALTAZ 3D / 2D estimator, (a)", ("a", "estimator_3d"), ("a", "estimator_2d"), 2.0, "max"),
    ("ALTAZ 3D / 2D estimator, (b)", ("b", "estimator_3d"), ("b", "estimator_2d"), 2.0, "max"),
    ("n_jobs=1 / n_jobs=2 (2D), (b)", ("b", "estimator_2d"), ("b", "estimator_2d_njobs2"), 1.7, "min"),
]
# Peak memory of (b) over (a), each estimator in a fresh process ("flat memory").
MAX_MEMORY_RATIO = 1.1


def off_obs_ids(data_store, max_runs=None):
    """OBS_IDs of the runs with TARGET_NAME "Off data", in index order, at most ``max_runs``."""
    table = data_store.obs_table
    names = np.char.strip(np.asarray(table["TARGET_NAME"]).astype(str))
    obs_ids = [int(obs_id) for obs_id in table["OBS_ID"][names == OFF_TARGET]]
    return obs_ids[:max_runs] if max_runs else obs_ids


def _obs_id_cards(raw, obs_id, path):
    """Byte offsets of the ``OBS_ID`` cards in the headers of the FITS file ``raw`` (bytes).

    Each must be a fixed-format integer card holding ``obs_id``; anything else is refused.
    """
    with fits.open(io.BytesIO(raw)) as hdulist:
        spans = [(hdu.fileinfo()["hdrLoc"], hdu.fileinfo()["datLoc"]) for hdu in hdulist]
    cards = [pos for start, end in spans for pos in range(start, end, fits.Card.length) if raw[pos : pos + 8] == b"OBS_ID  "]
    for pos in cards:
        value = raw[pos + 10 : pos + 30].strip()
        if raw[pos + 8 : pos + 10] != b"= " or not value.isdigit() or int(value) != obs_id:
            raise ValueError(f"{path}: header card {raw[pos:pos + 30].decode(errors='replace')!r} is not OBS_ID = {obs_id}; cannot replicate run {obs_id}.")
    if not cards:
        raise ValueError(f"{path} has no OBS_ID header card; cannot replicate run {obs_id}.")
    return cards


def _replica_writer(path, obs_id, compresslevel):
    """A function writing copies of the run file ``path`` with their header OBS_ID set to a new id.

    The file is read and decompressed once. The copies are multi-member gzip files (RFC 1952,
    read like any other by gzip, astropy and gammapy): the bytes between the OBS_ID cards are
    compressed once here and shared by all copies, and each copy compresses only its 80-byte
    OBS_ID cards. Decompressed, a copy equals the original file except for those cards.
    """
    raw = Path(path).read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw
    cards = _obs_id_cards(raw, obs_id, path)
    bounds = [0] + [pos + fits.Card.length for pos in cards]
    shared = [gzip.compress(raw[start:end], compresslevel, mtime=0) for start, end in zip(bounds, cards + [len(raw)])]

    def write(new_path, new_id):
        members = [shared[0]]
        for pos, rest in zip(cards, shared[1:]):
            card = raw[pos : pos + 10] + f"{new_id:>20}".encode() + raw[pos + 30 : pos + fits.Card.length]
            members += [gzip.compress(card, compresslevel, mtime=0), rest]
        Path(new_path).write_bytes(b"".join(members))

    return write


def make_replicated_store(data_dir, out_dir, replicas, obs_ids, compresslevel=6):
    """Write a data store of ``replicas`` copies of the runs ``obs_ids`` under new OBS_IDs.

    Copy ``k`` (1 to ``replicas``) of run ``obs_id`` gets OBS_ID ``k * step + obs_id``, with
    ``step`` a power of ten above all OBS_IDs of the store, in its obs-index row, its HDU-index
    rows and its own file ``data/obs_id_<new id>.fits.gz``: the run's file with the OBS_ID header
    cards (EVENTS, AEFF) set to the new id, so that the archive passes the package's check that
    each events file holds the run its index row names. The events, IRFs, times and pointing are
    the original ones. The input folder is only read; the store is written to a temporary folder
    next to ``out_dir`` and renamed, so an interrupted build leaves nothing half-written.

    Parameters
    ----------
    data_dir : str or `~pathlib.Path`
        Folder of the original data store.
    out_dir : str or `~pathlib.Path`
        Folder of the new store; must not be ``data_dir`` or inside it. If it exists, it is
        reused when its obs index lists exactly the expected OBS_IDs and every file is there,
        and refused otherwise.
    replicas : int
        Number of copies.
    obs_ids : list of int
        Runs to replicate; all HDUs of each must be in one file.
    compresslevel : int, optional
        gzip level of the copies (the shared parts are compressed once per run). Default is 6,
        gzip's default, giving files the size of the originals.

    Returns
    -------
    data_store : `~gammapy.data.DataStore`
        The replicated store, opened with ``DataStore.from_dir``.
    """
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    if out_dir == data_dir or data_dir in out_dir.parents:
        raise ValueError(f"Refusing to write the replicated store {out_dir} into the input data folder {data_dir}.")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}.")
    original = DataStore.from_dir(data_dir)
    step = 10 ** len(str(max(int(i) for i in original.obs_table["OBS_ID"])))
    obs_ids = [int(obs_id) for obs_id in obs_ids]
    new_ids = {obs_id: [k * step + obs_id for k in range(1, replicas + 1)] for obs_id in obs_ids}
    expected = [new_ids[obs_id][k] for k in range(replicas) for obs_id in obs_ids]
    if out_dir.exists():
        return _reuse_replicated_store(out_dir, expected)

    obs_table = Table(original.obs_table)
    obs_rows = obs_table[np.isin(obs_table["OBS_ID"], obs_ids)]
    hdu_table = Table(original.hdu_table)
    hdu_rows = hdu_table[np.isin(hdu_table["OBS_ID"], obs_ids)]
    base_dir = Path(original.hdu_table.base_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / "data").mkdir()
        for obs_id in obs_ids:
            rows = hdu_table[hdu_table["OBS_ID"] == obs_id]
            files = {(str(row["FILE_DIR"]).strip(), str(row["FILE_NAME"]).strip()) for row in rows}
            if len(files) != 1:
                raise ValueError(f"Run {obs_id} has its HDUs in {len(files)} files; the replicated store needs one file per run.")
            write = _replica_writer(base_dir.joinpath(*files.pop()), obs_id, compresslevel)
            for new_id in new_ids[obs_id]:
                write(staging / "data" / _replica_name(new_id), new_id)
        obs_copies, hdu_copies = [], []
        for k in range(replicas):
            obs_copy, hdu_copy = obs_rows.copy(), hdu_rows.copy()
            obs_copy["OBS_ID"] = [new_ids[int(i)][k] for i in obs_copy["OBS_ID"]]
            hdu_copy["OBS_ID"] = [new_ids[int(i)][k] for i in hdu_copy["OBS_ID"]]
            hdu_copy["FILE_DIR"] = ["data"] * len(hdu_copy)
            hdu_copy["FILE_NAME"] = [_replica_name(i) for i in hdu_copy["OBS_ID"]]
            obs_copies.append(obs_copy)
            hdu_copies.append(hdu_copy)
        obs_new = vstack(obs_copies, metadata_conflicts="silent")
        hdu_new = vstack(hdu_copies, metadata_conflicts="silent")
        obs_new.meta, hdu_new.meta = dict(obs_table.meta), dict(hdu_table.meta)
        for table in (obs_new, hdu_new):
            table.meta.pop("BASE_DIR", None)
        obs_new.write(staging / "obs-index.fits.gz")
        hdu_new.write(staging / "hdu-index.fits.gz")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging)
        raise
    return DataStore.from_dir(out_dir)


def _replica_name(obs_id):
    return f"obs_id_{obs_id:07d}.fits.gz"


def _reuse_replicated_store(out_dir, expected):
    """The store in ``out_dir`` if it is the replicated store of ``expected`` OBS_IDs, else a ValueError."""
    try:
        data_store = DataStore.from_dir(out_dir)
        found = [int(obs_id) for obs_id in data_store.obs_table["OBS_ID"]]
        complete = all(Path(path).is_file() for path, _ in event_paths(data_store, found))
    except Exception:
        found, complete = None, False
    if found != expected or not complete:
        raise ValueError(f"{out_dir} exists and is not this replicated store; remove it or choose another folder.")
    log.info(f"Reusing the replicated store in {out_dir}")
    return data_store


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


def _status_mb(key):
    """A size from ``/proc/self/status`` in MB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident).

    ``VmHWM`` belongs to this program alone; ``ru_maxrss`` would not do: Linux carries it over
    ``fork`` and ``exec``, so in a subprocess it is at least the parent's resident size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(store_dir, max_runs=None, n_jobs=1, kind="2d"):
    """Peak RSS of one estimator (``kind`` "2d" or "3d") in this process (call it in a fresh one).

    The model is built by ``run``, which adds each run into one sum as it is filled: its peak
    should not grow with the number of runs (``fill`` keeps every run's histograms by design).

    Returns
    -------
    result : dict
        ``n_runs``, ``n_jobs``, ``kind``, ``rss_before_mb`` (after imports and opening the
        store), ``rss_after_mb`` (holding the model),
        ``peak_rss_mb`` (``VmHWM``, the peak of this process), ``peak_rss_children_mb``
        (``ru_maxrss`` of the largest worker, which counts the pages it shares with this
        process) and ``model_mb`` (the model's rates), in MB.
    """
    data_store = DataStore.from_dir(store_dir)
    obs_ids = off_obs_ids(data_store, max_runs)
    rss_before = _status_mb("VmRSS")
    estimator = make_estimators(n_jobs=n_jobs)[kind]
    model = estimator.run(data_store, obs_ids)
    rss_after = _status_mb("VmRSS")
    return {
        "n_runs": len(obs_ids),
        "n_jobs": n_jobs,
        "kind": kind,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "peak_rss_mb": _status_mb("VmHWM"),
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "model_mb": model.data.nbytes / 2**20,
    }


def memory_in_subprocess(store_dir, max_runs=None, n_jobs=1, kind="2d"):
    """Run `memory_probe` in a fresh Python process, so that each size and kind is measured on its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(store_dir), "--n-jobs", str(n_jobs), "--kind", kind]
    if max_runs:
        command += ["--max-runs", str(max_runs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _ratio(archives, numerator, denominator, statistic="best"):
    (archive_n, name_n), (archive_d, name_d) = numerator, denominator
    return archives[archive_n]["times"][name_n][statistic] / archives[archive_d]["times"][name_d][statistic]


def evaluate_targets(results):
    """Ratios of issues 7 and 12 and whether they meet their targets.

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
    for (kind, label), (key, what) in itertools.product([("2d", "2D"), ("3d", "ALTAZ 3D")], [("peak_rss_mb", "peak"), ("rss_after_mb", "held")]):
        if f"a_{kind}" in memory and f"b_{kind}" in memory:
            value = memory[f"b_{kind}"][key] / memory[f"a_{kind}"][key]
            rows.append(
                dict(
                    name=f"RSS {what} (b) / (a), {label}",
                    value=value,
                    value_median=value,
                    value_cpu=None,
                    bound=MAX_MEMORY_RATIO,
                    kind="max",
                    ok=bool(value <= MAX_MEMORY_RATIO),
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
        Folder for the scaled archive (written, or reused if it is the same archive, in
        ``workdir/replicated-<replicas>``). Default is None (a temporary folder, removed at the end).
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
        log.info(f"(b) writing {replicas} replicas of {len(obs_ids_a)} runs to {store_b_dir}")
        reused = store_b_dir.exists()
        start = time.perf_counter()
        store_b = make_replicated_store(data_dir, store_b_dir, replicas, obs_ids_a)
        build_s = time.perf_counter() - start
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
            "replicas": dict(
                folder=str(store_b_dir),
                reused=reused,
                build_s=build_s,
                n_files=sum(1 for path in store_b_dir.rglob("*") if path.is_file()),
                disk_mb=sum(path.stat().st_size for path in store_b_dir.rglob("*") if path.is_file()) / 1e6,
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
                f"{key}_{kind}{'_njobs2' if n_jobs == 2 else ''}": memory_in_subprocess(store_dir, runs, n_jobs, kind)
                for kind, n_jobs in [("2d", 1), ("3d", 1), ("2d", 2)]
                for key, store_dir, runs in [("a", data_dir, max_runs), ("b", store_b_dir, None)]
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
    rep = results["replicas"]
    how = "reused" if rep["reused"] else f"written in {rep['build_s']:.1f} s"
    lines.append(f"(b) replicated store: {rep['n_files']} files, {rep['disk_mb']:.0f} MB, {how} ({rep['folder']})")
    if "memory" in results:
        lines += ["", "peak RSS, each size in a fresh process [MB]:"]
        for key, mem in results["memory"].items():
            lines.append(
                f"  {key:<12}{mem['n_runs']:>5} runs, {mem['kind']}, n_jobs={mem['n_jobs']}: peak {mem['peak_rss_mb']:7.1f}"
                f"  (before {mem['rss_before_mb']:.1f}, after {mem['rss_after_mb']:.1f}, model {mem['model_mb']:.2f},"
                f" largest worker {mem['peak_rss_children_mb']:.1f})"
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
    parser.add_argument("--workdir", default=None, help="write (or reuse) the scaled archive here. Default: a temporary folder")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"JSON results. Default: {DEFAULT_OUTPUT}")
    parser.add_argument("--memory-probe", metavar="STORE_DIR", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-jobs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["2d", "3d"], default="2d", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.max_runs, args.n_jobs, args.kind)))
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
