#!/usr/bin/env bash
# Regenerates the Python stubs in clients/python from protos/ (needs grpcio-tools).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../clients/python"
python -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here"/attrserve/v1/*.proto
