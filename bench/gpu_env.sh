# shellcheck shell=bash
# Sourced by bench/gpu_check.sh and bench/gpu_profile.sh, from the checkout's root: PY, and PYTHONPATH = the checkout's
# packages plus the wheels of .whl/ (bench/gpu_wheels.sh), installed into SITE. The wheels are for the GPU image's
# Python 3.12; where they do not install (a CPU try with the project's .venv), it says so and goes on.
PY=${PY:-python3}
SITE=/tmp/attrserve-gpu-site
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "warning: .whl/ did not install for $PY; going on with what it has" >&2
fi
export PYTHONPATH="$PWD/engine:$PWD/service:$PWD/clients/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
