#!/usr/bin/env bash
# The main job on a fresh machine: bash tools/demo.sh [--items N --sales N]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e . 2>&1 | grep -v '^WARNING: Location' || true
exec .venv/bin/exchange demo --home demo "$@"
