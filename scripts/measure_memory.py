"""Peak memory of each tutorial notebook, executed in order with papermill as `make run` does.

Each notebook runs in its own papermill process; its process tree is sampled with psutil
every ``--interval`` seconds, and the peak resident memory (RSS) of the kernel (with any
processes it starts) and of the whole tree (papermill and kernel) is reported. Binder gives a
session 2 GB; the notebooks should stay below 1.5 GB so that JupyterLab fits beside them.
Sampling can miss a peak shorter than the interval: the figures are lower bounds.

Usage::

    GAMMAPY_DATA=/path/to/gammapy-data python scripts/measure_memory.py --output-dir /tmp/mem
"""

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import psutil
from run_notebooks import notebook_parameters
from bkgtemplate.data import find_data_dir

log = logging.getLogger("measure_memory")

REPO = Path(__file__).resolve().parent.parent
LIMIT_GB = 1.5


def tree_rss(process):
    """RSS in bytes of ``process`` and its descendants, and of the kernel part of that tree."""
    total = kernel = 0
    try:
        members = [process] + process.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    kernel_pids = set()
    for member in members:
        try:
            rss = member.memory_info().rss
            if member.pid in kernel_pids or "ipykernel" in " ".join(member.cmdline()):
                kernel += rss
                kernel_pids.update(child.pid for child in member.children(recursive=True))
            total += rss
        except psutil.NoSuchProcess:
            continue
    return total, kernel


def measure(notebook, output_dir, parameters, interval):
    """Execute ``notebook`` with papermill; return (peak tree RSS, peak kernel RSS) in bytes."""
    command = [
        sys.executable, "-m", "papermill", str(notebook), str(output_dir / "executed" / notebook.name),
        "--cwd", str(notebook.parent), "-k", "python3", "--no-progress-bar",
    ]  # fmt: skip
    for name, value in notebook_parameters(notebook, parameters).items():
        command += ["-p", name, str(value)]
    peak_total = peak_kernel = 0
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as popen:
        process = psutil.Process(popen.pid)
        while popen.poll() is None:
            total, kernel = tree_rss(process)
            peak_total, peak_kernel = max(peak_total, total), max(peak_kernel, kernel)
            time.sleep(interval)
        stderr = popen.stderr.read()
    if popen.returncode != 0:
        raise RuntimeError(f"{notebook.name} failed (exit code {popen.returncode}): {stderr[-2000:]}")
    return peak_total, peak_kernel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=None, help="Default is a temporary folder.")
    parser.add_argument("--data-dir", default=None, help="Default is $GAMMAPY_DATA/hess-dl3-dr1.")
    parser.add_argument("--notebooks-dir", default=str(REPO / "notebooks"), help="Default is notebooks/.")
    parser.add_argument("--interval", type=float, default=0.1, help="Sampling interval in s. Default is 0.1.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bkgtemplate-memory-") as tmp:
        output_dir = Path(args.output_dir or tmp).absolute()
        (output_dir / "executed").mkdir(parents=True, exist_ok=True)
        parameters = {"data_dir": str(find_data_dir(args.data_dir)), "output_dir": str(output_dir)}
        log.info(f"Data: {parameters['data_dir']}; output: {output_dir}")
        rows = []
        for notebook in sorted(Path(args.notebooks_dir).glob("0*.ipynb")):
            start = time.perf_counter()
            total, kernel = measure(notebook, output_dir, parameters, args.interval)
            rows.append((notebook.name, kernel / 1e9, total / 1e9, time.perf_counter() - start))
            log.info(f"{notebook.name}: kernel peak {kernel / 1e9:.2f} GB, with papermill {total / 1e9:.2f} GB")

    print(f"\n{'notebook':40s} {'kernel peak GB':>15s} {'tree peak GB':>13s} {'time s':>7s}")
    for name, kernel, total, seconds in rows:
        flag = "" if kernel < LIMIT_GB else f"  above {LIMIT_GB} GB"
        print(f"{name:40s} {kernel:15.2f} {total:13.2f} {seconds:7.0f}{flag}")
    return 0 if all(kernel < LIMIT_GB for _, kernel, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
