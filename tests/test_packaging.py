"""Packaging: the package list covers every directory that holds code or data, a real (non-editable) build is quiet
and installs a working `peftx`, and scripts/setup-venv.sh reinstalls the project only when it has to."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
SOURCE_DIRS = ("peftx", "cli", "exports")  # what package-dir maps


def _package_of(directory: Path) -> str:
    """The installed package name of a source directory, through the package-dir mapping."""
    rel = directory.relative_to(REPO).as_posix()
    best = max((src for src in SETUPTOOLS["package-dir"].values() if rel == src or rel.startswith(src + "/")), key=len)
    pkg = next(name for name, src in SETUPTOOLS["package-dir"].items() if src == best)
    rest = rel[len(best) :].strip("/")
    return pkg + ("." + rest.replace("/", ".") if rest else "")


def _source_files() -> dict[Path, list[Path]]:
    """Every source directory -> its files (no caches)."""
    out: dict[Path, list[Path]] = {}
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(REPO / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            files = [Path(dirpath) / f for f in filenames if not f.endswith((".pyc", ".pyo"))]
            out[Path(dirpath)] = files
    return out


def test_package_list_covers_every_directory_with_code_or_data() -> None:
    packages = set(SETUPTOOLS["packages"])
    data = SETUPTOOLS.get("package-data", {})
    missing, unshipped = [], []
    for directory, files in _source_files().items():
        if not files:
            continue
        pkg = _package_of(directory)
        if pkg not in packages:
            missing.append(f"{directory.relative_to(REPO)} ({pkg})")
            continue
        for f in files:
            if f.suffix != ".py" and not any(fnmatch.fnmatch(f.name, pat) for pat in data.get(pkg, [])):
                unshipped.append(str(f.relative_to(REPO)))
    assert not missing, f"directories with files that pyproject's packages does not list: {missing}"
    assert not unshipped, f"data files no package-data pattern ships: {unshipped}"
    assert PYPROJECT["project"]["license"] == "MIT"  # an SPDX string, not the deprecated table


def _copy_source(dst: Path) -> Path:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    for top in SOURCE_DIRS:
        shutil.copytree(REPO / top, dst / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


@pytest.mark.slow
def test_non_editable_install_is_quiet_and_works(tmp_path: Path) -> None:
    """Build a wheel from a copy of the sources (no setuptools warnings), install it into a scratch venv that sees
    this environment's dependencies but not its editable peftx, and run the console script from there."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_source(src)
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(wheel_dir),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    log = build.stdout + build.stderr
    noisy = [
        line for line in log.splitlines() if "Warning" in line or "deprecated" in line.lower() or "absent from" in line
    ]
    assert not noisy, "the build warns:\n" + "\n".join(noisy)
    (wheel,) = wheel_dir.glob("peftx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "peftx/" + _package_of(d).removeprefix("peftx").strip(".").replace(".", "/") + "/" + f.name
        for d, files in _source_files().items()
        for f in files
    }
    expected = {n.replace("peftx//", "peftx/") for n in expected}
    assert expected <= names, f"the wheel lacks {sorted(expected - names)[:10]}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # The dependencies (torch, timm, ...) from this environment, by path: a .pth entry adds the directory but runs
    # none of the .pth files inside it, so this environment's editable peftx stays out of sight. (Every site-packages
    # on sys.path: setup-venv.sh's per-clone venv sees the shared dependencies through a second one.)
    (site / "deps.pth").write_text("\n".join(_site_dirs()) + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import peftx, peftx.train, peftx.bench, peftx.bench.suites, peftx.exports, peftx.cli;"
            "import peftx.exports.targets as t; print(len(t.all_targets())); print(peftx.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.splitlines()[-1].startswith(str(site)), check.stdout  # the installed copy, not the repo
    assert int(check.stdout.splitlines()[0]) >= 4  # the op lists (package data) were found
    cli = subprocess.run(
        [str(venv / "bin" / "peftx"), "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert cli.returncode == 0 and "merge-export" in cli.stdout, cli.stderr[-3000:]
    assert cli.stderr == ""


def _site_dirs() -> list[str]:
    """This interpreter's site-packages directories: its own first, then any a .pth file added (setup-venv.sh's
    shared dependencies)."""
    own = sysconfig.get_path("purelib")
    return [own, *dict.fromkeys(p for p in sys.path if p.endswith("site-packages") and p != own)]


# ---------------------------------------------------------------------------------------------------- setup-venv.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for the venv's python: records how it was called; `pip install -e` creates bin/peftx as pip would.
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in *" -e "*) printf '#!/bin/sh\\n' > "$(dirname "$0")/peftx"; chmod +x "$(dirname "$0")/peftx";; esac
"""


def _clone(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup-venv.sh", root / "scripts" / "setup-venv.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO / "requirements.lock", root / "requirements.lock")
    return root


def _setup(clone: Path, venv: Path) -> tuple[str, list[str]]:
    before = (venv / "calls.log").read_text().splitlines() if (venv / "calls.log").exists() else []
    proc = subprocess.run(
        ["bash", str(clone / "scripts" / "setup-venv.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PEFTX_VENV": str(venv)},
    )
    assert proc.returncode == 0, proc.stderr
    after = (venv / "calls.log").read_text().splitlines() if (venv / "calls.log").exists() else []
    return proc.stdout.strip().splitlines()[-1], after[len(before) :]


def test_setup_venv_reinstalls_the_project_only_when_needed(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".complete").touch()  # the dependencies are installed: only the project's own install is at stake
    a, b = _clone(tmp_path / "a"), _clone(tmp_path / "b")

    printed, calls = _setup(a, venv)
    assert printed == str(venv)
    assert len(calls) == 1 and "-e " + str(a) in calls[0] and "--no-deps" in calls[0]
    assert _setup(a, venv)[1] == []  # nothing changed: no reinstall, nothing printed by pip
    (a / "pyproject.toml").write_text((a / "pyproject.toml").read_text() + "\n# changed\n")
    assert ["-e " + str(a) in c for c in _setup(a, venv)[1]] == [True]
    assert ["-e " + str(b) in c for c in _setup(b, venv)[1]] == [True]  # another clone: re-pointed at it
    assert ["-e " + str(a) in c for c in _setup(a, venv)[1]] == [True]  # and back
    (venv / "bin" / "peftx").unlink()  # an install that went missing is redone
    assert len(_setup(a, venv)[1]) == 1
    assert _setup(a, venv)[1] == []


def test_setup_venv_key_follows_the_lock_not_pyproject() -> None:
    """A pyproject change reinstalls the project into the same venv (above); only the lock (and the script, which
    names what is installed) select another venv."""
    (line,) = [x for x in (REPO / "scripts" / "setup-venv.sh").read_text().splitlines() if x.startswith("key=")]
    assert "requirements.lock" in line and "setup-venv.sh" in line and "pyproject.toml" not in line


# ---------------------------------------------------------------------------------------------------- make lint


def test_lint_tools_are_pinned_and_installed_by_the_setup() -> None:
    """`make lint` (CI runs it) calls ruff and mypy from the project venv: both must be pinned in the lock and
    installed by scripts/setup-venv.sh, or a fresh CI venv has no linter."""
    pinned = {
        line.split("==")[0].strip().lower()
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    setup = (REPO / "scripts" / "setup-venv.sh").read_text()
    (install,) = [x for x in setup.split("\n\n") if "-c requirements.lock" in x and "torch" in x]
    installed = set(install.replace("\\", " ").split())
    makefile = (REPO / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    for tool in ("ruff", "mypy"):
        assert tool in pinned, f"{tool} is not pinned in requirements.lock"
        assert tool in installed, f"scripts/setup-venv.sh does not install {tool}"
    assert "ruff check ." in lint and "ruff format --check ." in lint and "scripts/typecheck.sh" in lint
    assert "make lint" in (REPO / ".ci" / "run").read_text()
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120


def test_typecheck_tree_maps_every_package_dir() -> None:
    """scripts/typecheck.sh links cli/ and exports/ into build/typecheck/peftx under their installed names; a new
    package-dir mapping in pyproject must be linked there too, or mypy checks it under the wrong name."""
    script = (REPO / "scripts" / "typecheck.sh").read_text()
    for pkg, src in SETUPTOOLS["package-dir"].items():
        if pkg == "peftx":
            assert "for entry in peftx/*" in script
            continue
        leaf = pkg.split(".", 1)[1]
        assert f'ln -s ../../../{src} "$tree/peftx/{leaf}"' in script, f"{src} -> {pkg} is not linked"


def _project_clone(root: Path) -> Path:
    """A copy of what `pip install -e` needs from this repository (sources, pyproject, README, lock, the script)."""
    root.mkdir(parents=True)
    for name in (*SOURCE_DIRS, "scripts"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy(REPO / name, root / name)
    return root


@pytest.mark.slow
def test_two_clones_side_by_side_get_their_own_venv_over_one_shared_dependency_venv(tmp_path: Path) -> None:
    """The real script, the real `python -m venv` and `pip install -e`: each clone's venv imports its OWN sources
    and keeps doing so whichever clone ran the script last; the shared dependency venv holds no peftx; a clone that
    is gone has its venv removed. (The shared venv stands in for the real one: this interpreter's packages through a
    .pth file, marked complete, so nothing is downloaded.)"""
    import hashlib

    a, b = _project_clone(tmp_path / "a"), _project_clone(tmp_path / "b")
    key = hashlib.sha256((a / "requirements.lock").read_bytes() + (a / "scripts" / "setup-venv.sh").read_bytes())
    shared = tmp_path / "cache" / "peftx" / "venvs" / key.hexdigest()[:16]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(shared)], check=True, timeout=120)
    shared_site = Path(sysconfig.get_path("purelib", vars={"base": str(shared), "platbase": str(shared)}))
    (shared_site / "deps.pth").write_text("\n".join(_site_dirs()) + "\n")  # pip, setuptools, pytest, ...
    console_script = "import sys\nfrom pytest import console_main\nsys.exit(console_main())\n"
    (shared / "bin" / "pytest").write_text(f"#!{shared}/bin/python\n{console_script}")
    (shared / "bin" / "pytest").chmod(0o755)
    (shared / ".complete").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTX_VENV", "VIRTUAL_ENV", "PYTHONPATH")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")

    def setup(clone: Path) -> Path:
        done = subprocess.run(
            ["bash", str(clone / "scripts" / "setup-venv.sh")], capture_output=True, text=True, timeout=600, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return Path(done.stdout.strip().splitlines()[-1])

    def origin(venv: Path) -> str:
        code = "import importlib.util as u; print(u.find_spec('peftx').origin, u.find_spec('peftx.cli').origin)"
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip()

    venv_a, venv_b = setup(a), setup(b)
    assert venv_a != venv_b and shared not in (venv_a, venv_b)
    assert origin(venv_a) == f"{a}/peftx/__init__.py {a}/cli/__init__.py"
    assert origin(venv_b) == f"{b}/peftx/__init__.py {b}/cli/__init__.py"
    stamp = (venv_a / ".peftx-project").stat().st_mtime_ns
    assert setup(a) == venv_a and (venv_a / ".peftx-project").stat().st_mtime_ns == stamp  # reused, not reinstalled
    assert origin(venv_b) == f"{b}/peftx/__init__.py {b}/cli/__init__.py"  # a's set-up left b alone
    assert not list(shared_site.glob("*peftx*"))  # the shared venv holds no project install
    pytest_line = (venv_a / "bin" / "pytest").read_text().splitlines()[0]
    assert pytest_line == f"#!{venv_a}/bin/python" and (venv_a / "bin" / "peftx").exists()  # tools run as a's
    version = subprocess.run([str(venv_a / "bin" / "pytest"), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "pytest" in version.stdout + version.stderr
    shutil.rmtree(b)
    setup(_project_clone(tmp_path / "c"))
    assert not venv_b.exists() and venv_a.exists()  # a clone that is gone takes its venv with it
