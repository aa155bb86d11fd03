#!/usr/bin/env bash
# The test command: set up what is missing, check style, the layering rules (import-linter) and
# types (mypy), then run the whole suite (slow tests too) in two processes: most system tests wait
# on sockets, brokers and subprocesses, so two share even a two-core machine well (RADAI_TEST_PROCESSES
# sets another count; 0 runs in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/mypy
.venv/bin/python scripts/check_import_cycles.py
exec .venv/bin/pytest -q --durations=40 -n "${RADAI_TEST_PROCESSES:-2}" --dist worksteal "$@"
