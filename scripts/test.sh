#!/usr/bin/env bash
# The test command: set up what is missing, check style, run the whole suite (slow tests too).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -q "$@"
