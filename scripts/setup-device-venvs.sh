#!/usr/bin/env bash
# Create (or reuse) the two device-stand-in virtual environments in which tests/test_device_python.py runs a bundle's
# infer.py: what a person at a device has, and nothing of peftx (no torch, no peftx).
#
#   jp5  CPython 3.8 + requirements-device-jp5.txt (Pillow 7.0.0, numpy 1.21.6, onnxruntime 1.16.3): JetPack 5
#   new  CPython 3.13 (else 3.12) + requirements-device-new.txt (the newest Pillow, numpy 2, onnxruntime)
#
# Usage:  scripts/setup-device-venvs.sh               create both when missing (quiet when they exist)
#         scripts/setup-device-venvs.sh --path NAME   print NAME's venv path (jp5 | new) and create nothing
#
# Like scripts/setup-venv.sh, each venv lives OUTSIDE the clone, keyed on the hash of its requirements file, this
# script and the interpreter's exact version, so CI's fresh clone reuses it; everything comes from the package index
# pip is configured with (PyPI). Interpreters: $PEFTX_DEVICE_PYTHON_JP5 / $PEFTX_DEVICE_PYTHON_NEW, else python3.8 /
# python3.13 / python3.12 on PATH, else pyenv's. Location: $PEFTX_DEVICE_VENVS (default ~/.cache/peftx/device-venvs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
root="${PEFTX_DEVICE_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/peftx/device-venvs}"
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"

die() { echo "setup-device-venvs.sh: $*" >&2; exit 2; }

find_python() {  # find_python NAME: the interpreter for NAME, or nothing
  local name=$1 override minors minor candidate
  case "$name" in
    jp5) override="${PEFTX_DEVICE_PYTHON_JP5:-}"; minors="3.8" ;;
    new) override="${PEFTX_DEVICE_PYTHON_NEW:-}"; minors="3.13 3.12" ;;
    *) die "unknown venv '$name' (jp5 or new)" ;;
  esac
  if [[ -n "$override" ]]; then echo "$override"; return; fi
  for minor in $minors; do  # the first that runs (a pyenv shim on PATH may not: no version selected)
    for candidate in "$(command -v "python$minor" 2> /dev/null || true)" \
        "$(ls -d "$pyenv_root"/versions/"$minor".*/bin/"python$minor" 2> /dev/null | sort -V | tail -n 1 || true)"; do
      if [[ -n "$candidate" ]] && "$candidate" -c pass > /dev/null 2>&1; then echo "$candidate"; return; fi
    done
  done
}

venv_path() {  # venv_path NAME: where NAME's venv lives for this requirements file, script and interpreter
  local name=$1 python version key
  python=$(find_python "$name")
  [[ -n "$python" ]] || return 1
  version=$("$python" -c 'import sys; print(sys.version.split()[0])' 2> /dev/null) || return 1
  key=$( (cat "requirements-device-$name.txt" scripts/setup-device-venvs.sh; echo "$version") | sha256sum | cut -c1-16)
  echo "$root/$name-py$version-$key"
}

create() {  # create NAME: make NAME's venv unless it is complete
  local name=$1 python venv
  python=$(find_python "$name")
  if [[ -z "$python" ]]; then
    [[ "$name" == jp5 ]] && want="CPython 3.8" || want="CPython 3.13 or 3.12"
    die "no $want for the '$name' device venv — install it (pyenv install), or set PEFTX_DEVICE_PYTHON_${name^^}"
  fi
  venv=$(venv_path "$name") || die "$python does not run"
  [[ -f "$venv/.complete" ]] && return
  echo "setup: creating $venv (the $name device stack, under a minute)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # pip's own messages go to stderr (stdout stays free for --path); the requirements file pins every package.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "requirements-device-$name.txt" >&2
  touch "$venv/.complete"
}

if [[ "${1:-}" == --path ]]; then
  [[ "${2:-}" == jp5 || "${2:-}" == new ]] || die "--path needs a name: jp5 or new, got '${2:-}'"
  venv_path "$2" || die "no interpreter for the '$2' device venv"
  exit 0
fi
[[ $# -eq 0 ]] || die "unknown argument '$1' (usage: $0 [--path jp5|new])"
create jp5
create new
