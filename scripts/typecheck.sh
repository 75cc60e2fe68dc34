#!/usr/bin/env bash
# mypy over peftx/, cli/ and exports/ under their installed names (peftx, peftx.cli, peftx.exports).
#
# pyproject's package-dir maps cli/ -> peftx.cli and exports/ -> peftx.exports; mypy cannot follow that mapping from
# the source tree (and does not see through the editable install's import hook). So build a tree of symlinks,
# build/typecheck/peftx/{every entry of peftx/, cli -> cli/, exports -> exports/}, and check the package there.
# Paths in the report are rewritten back to the source files. Extra arguments go to mypy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
tree="build/typecheck"
rm -rf "$tree"
mkdir -p "$tree/peftx"
for entry in peftx/*; do
  name="$(basename "$entry")"
  [ "$name" = "__pycache__" ] && continue
  ln -s "../../../peftx/$name" "$tree/peftx/$name"
done
ln -s ../../../cli "$tree/peftx/cli"
ln -s ../../../exports "$tree/peftx/exports"
set +e
MYPYPATH="$tree" "$python" -m mypy --config-file pyproject.toml --cache-dir build/mypy-cache -p peftx "$@" \
  | sed -e "s#^$tree/peftx/cli/#cli/#" -e "s#^$tree/peftx/exports/#exports/#" -e "s#^$tree/peftx/#peftx/#"
status=${PIPESTATUS[0]}
set -e
exit "$status"
