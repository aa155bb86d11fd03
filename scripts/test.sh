#!/usr/bin/env bash
# The test command: set up what is missing, check style, the layering rules (import-linter) and
# types (mypy), then run the whole suite (slow tests too).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/mypy
.venv/bin/python scripts/check_import_cycles.py
exec .venv/bin/pytest -q --durations=40 "$@"
