#!/usr/bin/env bash
# The fast suite against the oldest releases setup.cfg admits of transformers, datasets, accelerate and numpy (its
# declared floors), in a virtualenv of its own (CPU torch first, as scripts/setup.sh). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CAVMAE_FLOORS_VENV:-.venv-floors}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" scripts/floor_constraints.py > "$VENV/floors.txt"
echo "floors: $(tr '\n' ' ' < "$VENV/floors.txt")"
"$VENV/bin/python" -m pip install --quiet -c "$VENV/floors.txt" -e ".[dev]"
"$VENV/bin/python" -m pytest -m "not slow" -q "$@"
