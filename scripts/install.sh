#!/usr/bin/env bash
# Install cttriage and what it needs on a fresh Debian-like machine with Python 3.11.
# torch goes first, pinned to the CPU build, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e '.[test]'
# dcmtk: a real PACS-side DICOM client/node (storescu/storescp) for tests and manual checks;
# dicom3tools: dciodvfy checks the SR, SEG and secondary capture we send back to the PACS;
# orthanc: a real PACS (C-STORE, C-FIND/C-MOVE of priors, exports) for the integration tests;
# docker-compose: validates docker-compose.yml (no Docker engine is needed for `config`);
# chromium: the headless browser of tests/test_browser.py (Playwright drives Debian's build; never
# `playwright install`, which downloads its own).
missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}") >/dev/null || echo "warning: could not install ${missing[*]}" >&2
fi
