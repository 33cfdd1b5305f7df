#!/usr/bin/env bash
# The README's test command: install, check lint, import contracts and types, start PostgreSQL and
# Redis if needed, run the whole suite. Any failing step fails the build (set -e).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
lint-imports  # the contracts in pyproject.toml [tool.importlinter]
python3 -m mypy app worker models tests  # strict for models/ (pyproject.toml [tool.mypy])
bash scripts/services.sh
exec python3 -m pytest -q "$@"
