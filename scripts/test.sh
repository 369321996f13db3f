#!/usr/bin/env bash
# Run corral's test suite from a fresh checkout: makes .venv, installs corral
# with its test extra, then runs lint, types and pytest (real runner
# subprocesses and real mlx on tiny generated models; no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CORRAL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m ruff check corral runner supervisor scripts tests
# mypy sees the installed names (corral.supervisor, corral.runner) through links.
mkdir -p .typecheck/corral
ln -sfn ../../supervisor .typecheck/corral/supervisor
ln -sfn ../../runner .typecheck/corral/runner
ln -sfn ../../corral/__init__.py .typecheck/corral/__init__.py
"$VENV/bin/python" -m mypy
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
