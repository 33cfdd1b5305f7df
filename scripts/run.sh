#!/usr/bin/env bash
# The README's run command: install, then start the whole service on this machine (SQLite,
# in-process worker) and push a generated demo study through DICOM to show it being scored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec cttriage serve --demo
