#!/usr/bin/env bash
# Set up, then run the checks: ruff, mypy, and the pytest suite (unit + real end-to-end tests
# that build and boot images with Packer and QEMU). Pass pytest arguments through, e.g.
#   bash scripts/test.sh -m "not slow"     # the fast part only (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check vmbuild tests bench
.venv/bin/mypy vmbuild tests bench
# The slowest tests are listed at the end: the suite's time is kept under an hour.
.venv/bin/python -m pytest --durations=25 "$@"
