#!/usr/bin/env bash
# The README's test command: install, start PostgreSQL and Redis if needed, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
exec python3 -m pytest -q "$@"
