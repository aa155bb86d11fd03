#!/usr/bin/env bash
# The demo command: set up what is missing, then run radai on embedded defaults (SQLite database,
# SQLite broker, ./var) and send it the bundled sample studies. Extra arguments go to `radai demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/radai demo "$@"
