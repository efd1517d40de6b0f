#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh needs on a GPU machine that has torch but no network.
# They land in .whl/ (git-ignored); carry that folder to the GPU machine with the checkout.
# The GPU image runs Python 3.12; these are the packages it lacks (or holds too old for our generated stubs),
# and py-spy for bench/gpu_profile.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    captum==0.9.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    protobuf==7.36.2 pytest-asyncio==1.5.0 prometheus_client==0.26.0 py-spy==0.4.2
ls -la .whl
du -sh .whl
