#!/usr/bin/env bash
# Installs checkov (pinned) into its own virtualenv, .venv/tools-checkov, beside the project's .venv.
#
# Why not the project's venv: checkov 3.3.30 pins networkx<2.7, packaging<24 and python-dateutil<3, and
# installing it there would downgrade what torch, pytest and the rest run with (networkx 3.x, packaging 26.x,
# python-dateutil 4.x). The tests in tests/deploy/ find it at .venv/tools-checkov/bin/checkov.
#
# Usage: deploy/tools/install-checkov.sh [PYTHON]   (PYTHON: the interpreter to build the venv from; default python3)
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
CHECKOV_VERSION=3.3.30
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/.venv/tools-checkov"
python=${1:-python3}

if [ -x "$venv/bin/checkov" ] && [ "$("$venv/bin/checkov" --version 2>/dev/null)" = "$CHECKOV_VERSION" ]; then
  exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
"$venv/bin/checkov" --version
