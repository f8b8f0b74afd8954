"""The files around the package say the same as pyproject.toml and the README: environment files,
Binder, the Makefile, CI and the notebook runner."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README = (REPO / "README.md").read_text()
ATTRIBUTION = (
    "This work made use of data from the H.E.S.S. DL3 public test data release 1 "
    "(HESS DL3 DR1, H.E.S.S. collaboration, 2018)."
)
TEST_COMMAND = "make test"
RUN_COMMAND = "make run"


def pyproject_requirements(*extras):
    lines = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        lines += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def conda_to_pep440(spec):
    """A conda version spec ("=2.1", ">=1,<2", "2.1.*") as a PEP 440 specifier set."""
    spec = spec.replace(" ", "")
    if not spec:
        return SpecifierSet()
    if re.fullmatch(r"=[^=<>!].*", spec):  # conda "=2.1" means 2.1.*
        spec = "==" + spec[1:].removesuffix(".*") + ".*"
    elif re.fullmatch(r"[0-9].*", spec):
        spec = "==" + spec
    return SpecifierSet(spec)


def environment_requirements(path):
    """{name: (specifier set, extras)} of a conda environment file, its pip section included."""
    environment = yaml.safe_load(path.read_text())
    found = {}
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            for line in entry.get("pip", []):
                if line.startswith("-"):
                    continue
                requirement = Requirement(line)
                found[canonicalize_name(requirement.name)] = (
                    requirement.specifier,
                    requirement.extras,
                )
        else:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", entry).groups()
            found[canonicalize_name(name)] = (conda_to_pep440(spec), set())
    return environment, found


@pytest.mark.parametrize(
    "filename, extras",
    [
        ("environment.yml", ("notebooks", "test")),
        ("binder/environment.yml", ("notebooks",)),
    ],
)
def test_environment_files_follow_pyproject(filename, extras):
    environment, found = environment_requirements(REPO / filename)
    assert environment["name"] == "bkgtemplate"
    problems = []
    for requirement in pyproject_requirements(*extras):
        name = canonicalize_name(requirement.name)
        if name not in found:
            problems.append(f"{requirement} missing")
            continue
        specifier, entry_extras = found[name]
        if specifier != requirement.specifier or not requirement.extras <= set(entry_extras):
            problems.append(f"{requirement} given as {name}{sorted(entry_extras)}{specifier}")
    assert not problems, f"{filename} differs from pyproject.toml: {problems}"


def requirement_names(requirements):
    return {canonicalize_name(requirement.name) for requirement in requirements}


def installed_closure(requirements, extra=None):
    """Names of the installed distributions that ``requirements`` pull in, transitively, and of
    the requirements not installed here (their own dependencies cannot be followed)."""
    seen, missing = set(), set()
    todo = [(requirement, {"extra": extra or ""}) for requirement in requirements]
    while todo:
        requirement, environment = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            missing.add(name)
            continue
        for extra_name in [""] + sorted(requirement.extras):
            todo += [(Requirement(line), {"extra": extra_name}) for line in requires]
    return {name for name, _ in seen} - missing, missing


def test_ray_only_in_the_distributed_extra():
    """`pip install -e ".[notebooks]"` (make run, Binder) installs no ray; ray comes only with
    the optional distributed extra, which CI adds to the test extras."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "ray" in requirement_names(Requirement(line) for line in extras["distributed"])
    for extra in ["notebooks", "test"]:
        assert "ray" not in requirement_names(pyproject_requirements(extra)), extra
    for filename in ["environment.yml", "binder/environment.yml"]:
        assert "ray" not in environment_requirements(REPO / filename)[1], filename
    # nor through a dependency: follow the installed distributions' metadata
    closure, missing = installed_closure(pyproject_requirements("notebooks"))
    assert {"gammapy", "jupyterlab", "ipywidgets"} <= closure, f"not installed here: {missing}"
    assert "ray" not in closure


@pytest.mark.slow
def test_pip_resolves_notebooks_extra_without_ray(tmp_path):
    """What pip would install for `.[notebooks]` in an empty environment (resolved from the
    package index, nothing installed): no ray. A copy of the project keeps build files out of it."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, project / name)
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    result = subprocess.run(
        command + ["--report", str(report), f"{project}[notebooks]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 and re.search(r"Could not find a version|connection|Network", result.stderr, re.I):
        pytest.skip(f"pip cannot resolve from the package index here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr[-2000:]
    names = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert {"bkgtemplate", "gammapy", "jupyterlab", "ipywidgets", "papermill"} <= names
    assert "ray" not in names


def test_installed_closure():
    closure, missing = installed_closure([Requirement("pytest"), Requirement("no-such-dist-xyz")])
    assert {"pytest", "pluggy", "iniconfig"} <= closure
    assert missing == {"no-such-dist-xyz"}
    with_marker = [Requirement('pytest; extra == "other"')]
    assert installed_closure(with_marker) == (set(), set())
    assert "pytest" in installed_closure(with_marker, extra="other")[0]


def test_environment_python_matches_requires_python():
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for filename in ["environment.yml", "binder/environment.yml"]:
        _, found = environment_requirements(REPO / filename)
        specifier, _ = found["python"]
        versions = [spec.version.removesuffix(".*") for spec in specifier]
        assert versions and all(version in requires for version in versions), filename


def test_conda_to_pep440():
    assert conda_to_pep440("=2.1") == SpecifierSet("==2.1.*")
    assert conda_to_pep440(">=0.10,<0.12") == SpecifierSet(">=0.10,<0.12")
    assert conda_to_pep440("2.1") == SpecifierSet("==2.1")
    assert conda_to_pep440("") == SpecifierSet()


@pytest.mark.parametrize("name", ["postBuild", "start"])
def test_binder_scripts_executable(name):
    path = REPO / "binder" / name
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK), f"chmod +x binder/{name}"
    # what a fresh clone gets is the mode git records, not the one on this disk
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return
    staged = subprocess.run(
        ["git", "ls-files", "--stage", f"binder/{name}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if staged:
        assert staged.startswith("100755"), f"git update-index --chmod=+x binder/{name}"


def test_binder_postbuild():
    text = (REPO / "binder" / "postBuild").read_text()
    assert re.search(r"^set -e", text, re.M)
    assert re.search(r"pip install (.* )?-e \.$", text, re.M)
    assert "gammapy download datasets --out" in text
    assert "hess-dl3-dr1" in text


def test_binder_start():
    text = (REPO / "binder" / "start").read_text()
    assert "export GAMMAPY_DATA=" in text
    assert text.strip().splitlines()[-1] == 'exec "$@"'


def test_readme():
    assert "https://mybinder.org/badge_logo.svg" in README
    assert "(https://mybinder.org/v2/gh/" in README
    assert ATTRIBUTION in " ".join(README.split())
    assert "No scientific publications may be derived from the data" in README
    for command in [RUN_COMMAND, TEST_COMMAND]:
        assert re.search(rf"^{command}$", README, re.M), f"README lacks the line {command!r}"


def test_ci_runs_the_readme_test_command():
    text = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert re.search(rf"^{TEST_COMMAND}( |$)", text, re.M), f".ci/run does not call {TEST_COMMAND}"
    assert "BKGTEMPLATE_REQUIRE_HESS=1" in text
    # the optional pieces that tests marked `ci` need, and that CI=true makes required
    assert re.search(r"^export CI=true$", text, re.M)
    assert re.search(rf"^{TEST_COMMAND} .*TEST_EXTRAS=notebooks,test,distributed", text, re.M)
    assert re.search(r"apt-get update -qq$", text, re.M)
    assert re.search(r"apt-get install -y -qq .*\\\n\s*chromium chromium-driver", text)


def make_dry_run(target, *variables):
    # when the tests themselves run under `make test`, the parent make's variables would make
    # this one print "Entering/Leaving directory" lines, and its command-line variables (CI's
    # TEST_EXTRAS) reach the environment
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TEST_EXTRAS")}
    command = ["make", "-n", "-B", "--no-print-directory", target, *variables]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, env=env).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_installs_only_the_extras_it_needs():
    """`make run` installs the notebooks extra (no ray, no test tools); `make test` adds test,
    and CI's TEST_EXTRAS adds distributed."""
    installs = {
        ("run",): '-m pip install -e ".[notebooks]"',
        ("test",): '-m pip install -e ".[notebooks,test]"',
        ("test", "TEST_EXTRAS=notebooks,test,distributed"): '-m pip install -e ".[notebooks,test,distributed]"',
    }
    for args, install in installs.items():
        lines = [line for line in make_dry_run(*args).splitlines() if "pip install" in line]
        assert len(lines) == 1 and lines[0].endswith(install), (args, lines)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_test_command():
    command = make_dry_run("test").strip().splitlines()[-1]
    assert "MPLBACKEND=Agg" in command
    assert re.search(r"-m pytest tests( notebooks)? --nbval-lax", command), command


def test_package_does_not_know_the_project_folder():
    for path in (REPO / "src" / "bkgtemplate").rglob("*.py"):
        assert "../shared" not in path.read_text(), f"{path.name} mentions ../shared"


HESS_TESTS = """
import pytest

@pytest.fixture
def hess_dir():  # stands in for the conftest's fixture without importing gammapy
    pytest.skip("data absent")

def test_with_fixture(hess_dir):
    pass

@pytest.mark.hess
def test_marked():
    pytest.skip("no data")

@pytest.mark.hess
@pytest.mark.xfail(reason="expected")
def test_xfail():
    assert False

def test_plain():
    pytest.skip("not a real-data test")
"""


def run_with_our_conftest(tmp_path, name, text, **env):
    """Run the test file ``text`` with the project's conftest in a fresh pytest process."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    hess: real data\n    ci: in CI\n")
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env)  # nbval's import alone takes seconds
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("require", ["0", "1"])
def test_require_hess_turns_skips_into_failures(tmp_path, require):
    result = run_with_our_conftest(tmp_path, "test_hess.py", HESS_TESTS, BKGTEMPLATE_REQUIRE_HESS=require,
                                   GAMMAPY_DATA=str(tmp_path / "none"))
    out = result.stdout
    assert "ran=0 skipped=2" in out, out
    if require == "1":
        assert result.returncode == 1, out
        assert "ERROR test_hess.py::test_with_fixture" in out
        assert "FAILED test_hess.py::test_marked" in out
        assert "BKGTEMPLATE_REQUIRE_HESS is set but this real-data (hess) test was skipped" in out
    else:
        assert result.returncode == 0, out
        assert "SKIPPED" in out and "FAILED" not in out
    assert "XFAIL test_hess.py::test_xfail" in out
    assert "SKIPPED [1] test_hess.py" in out  # test_plain is never turned into a failure


CI_TESTS = """
import pytest

@pytest.mark.ci
def test_optional_piece():
    pytest.importorskip("no_such_module_xyz", reason="piece absent")

@pytest.mark.ci
@pytest.mark.hess
def test_optional_piece_on_real_data():
    pytest.skip("data absent")

def test_plain():
    pytest.skip("not a ci test")
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_ci_turns_skips_of_ci_tests_into_failures(tmp_path, ci):
    result = run_with_our_conftest(tmp_path, "test_ci.py", CI_TESTS, CI=ci, BKGTEMPLATE_REQUIRE_HESS="0")
    out = result.stdout
    if ci:
        assert result.returncode == 1, out
        assert "FAILED test_ci.py::test_optional_piece" in out
        assert re.search(r"CI=true but this test \(marked ci\) was skipped: .*piece absent", out), out
    else:
        assert result.returncode == 0, out
        assert re.search(r"SKIPPED \[1\] test_ci.py:\d+: piece absent", out), out
    # real data not required here: its absence may skip a ci test, and plain skips stay skips
    assert re.search(r"SKIPPED \[1\] test_ci.py:\d+: data absent", out), out
    assert re.search(r"SKIPPED \[1\] test_ci.py:\d+: not a ci test", out), out


def write_notebook(path, parameters):
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": kernelspec})
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    record = (
        "import json, pathlib\n"
        "pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)\n"
        "names = [n for n in ('data_dir', 'output_dir', 'source_targets') if n in globals()]\n"
        f"(pathlib.Path(output_dir) / '{path.stem}.json').write_text(\n"
        "    json.dumps({n: globals()[n] for n in names}))\n"
    )
    notebook.cells = [cell, nbformat.v4.new_code_cell(record)]
    nbformat.write(notebook, path)


def test_run_notebooks_products(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import run_notebooks

    old = tmp_path / "old.fits"
    old.touch()
    os.utime(old, (1000, 1000))
    for name in [
        "bkg.fits", "bkg.fits.gz", "runs.ecsv", "notes.txt", "store/hdu-index.fits.gz",
        "store/obs-index.fits.gz", "store/bkg/run1.fits", "executed/01.ipynb",
        "simulated-archive/hdu-index.fits.gz", "simulated-archive/data/run1.fits",
    ]:  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    found = run_notebooks.products(tmp_path, since=2000)
    assert found == {
        "models": [tmp_path / "bkg.fits", tmp_path / "bkg.fits.gz"],
        "tables": [tmp_path / "runs.ecsv"],
        "other files": [tmp_path / "notes.txt"],
        "data stores": [tmp_path / "store"],
    }
    text = run_notebooks.summary(tmp_path, "real data at /data", [tmp_path / "executed" / "01.ipynb"], 2000)
    assert f"  Data stores:\n    {tmp_path / 'store'}/\n" in text
    assert str(old) not in text


@pytest.mark.slow
def test_run_notebooks_script(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import run_notebooks

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    assert run_notebooks.main(["--notebooks-dir", str(notebooks)]) == 0  # none yet: a warning

    write_notebook(notebooks / "01_first.ipynb", "data_dir = None\noutput_dir = 'output'\n")
    write_notebook(
        notebooks / "02_second.ipynb",
        "data_dir = None\noutput_dir = 'output'\nsource_targets = ['Crab']\n",
    )
    store = tmp_path / "store"
    store.mkdir()
    for name in ["obs-index.fits.gz", "hdu-index.fits.gz"]:
        (store / name).touch()

    output = tmp_path / "output"
    args = ["--notebooks-dir", str(notebooks), "--output-dir", str(output)]
    assert run_notebooks.main(args + ["--data-dir", str(store)]) == 0
    assert sorted(p.name for p in (output / "executed").iterdir()) == [
        "01_first.ipynb",
        "02_second.ipynb",
    ]
    first = json.loads((output / "01_first.json").read_text())
    assert first == {"data_dir": str(store), "output_dir": str(output)}
    second = json.loads((output / "02_second.json").read_text())
    assert second["source_targets"] == ["Crab"]  # real data: the notebook's own default
    # the closing summary repeats the data and lists every product
    summary = capsys.readouterr().out.split("\nSummary\n")[1].splitlines()
    assert summary[:2] == [f"  Data: real data at {store}", f"  Executed notebooks (2): {output / 'executed'}"]
    assert summary[2:] == ["  Other files:", f"    {output / '01_first.json'}", f"    {output / '02_second.json'}"]

    # without data: the simulated archive, with its source target where a notebook declares one
    def simulate_archive(path, n_off_runs=24, n_source_runs=6, seed=0, overwrite=False):
        assert seed == 0 and overwrite
        path.mkdir(parents=True)
        for name in ["obs-index.fits.gz", "hdu-index.fits.gz"]:
            (path / name).touch()
        return path

    simulate = types.ModuleType("bkgtemplate.simulate")
    simulate.simulate_archive = simulate_archive
    monkeypatch.setitem(sys.modules, "bkgtemplate.simulate", simulate)
    monkeypatch.delenv("GAMMAPY_DATA", raising=False)
    assert run_notebooks.main(args) == 0
    first = json.loads((output / "01_first.json").read_text())
    assert first["data_dir"] == str(output / "simulated-archive")
    assert "source_targets" not in first
    second = json.loads((output / "02_second.json").read_text())
    assert second["source_targets"] == ["Simulated source"]
    data_line = capsys.readouterr().out.split("\nSummary\n")[1].splitlines()[0]
    assert data_line.startswith(f"  Data: the SIMULATED archive at {output / 'simulated-archive'} (no real data: ")
    assert data_line.endswith("results are not H.E.S.S. results")

    assert run_notebooks.main(args + ["--data-dir", str(tmp_path / "nowhere")]) == 1
