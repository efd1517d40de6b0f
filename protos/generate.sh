#!/usr/bin/env bash
# Regenerates the Python stubs in clients/python from protos/ (needs grpcio-tools), and the service's stubs of the
# Open Inference Protocol (KServe v2) from protos/kserve: messages only (the servicer registers its methods itself).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../clients/python"
python -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here"/attrserve/v1/*.proto
oip="$here/../service/attrserve_service/kserve"
python -m grpc_tools.protoc -I "$here/kserve" --python_out="$oip" --pyi_out="$oip" "$here"/kserve/grpc_predict_v2.proto
