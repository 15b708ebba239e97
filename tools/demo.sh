#!/usr/bin/env bash
# The main job on a fresh machine: bash tools/demo.sh [--items N --sales N]
# Runs from any folder (the venv and demo/ live in the checkout); its last lines name the paths
# as typed from the folder it was started in.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install -q -e "$root" 2>&1 | grep -v '^WARNING: Location' || true
exec "$root/.venv/bin/exchange" demo --home "$root/demo" "$@"
