#!/usr/bin/env bash
# The test command (README.md, .ci/run): set up a fresh Debian machine, then lint and test.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k reload -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
.venv/bin/ruff check gearvisor tests examples
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
