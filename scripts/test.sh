#!/usr/bin/env bash
# The test suite (fast tests; the real-size ones are marked slow: add `-m slow` to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -m "not slow" -q "$@"
