#!/usr/bin/env bash
# Regenerates the TypeScript messages and grpc-js service clients in src/gen/ from protos/ (the generated code is
# committed). Needs grpcio-tools for protoc (`$PYTHON -m grpc_tools.protoc`, PYTHON defaults to `python`) and
# `npm ci` in this folder for the ts-proto plugin. Usage: ./generate.sh [OUT_DIR] (default: src/gen).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
protos="$here/../../protos"
out="${1:-$here/src/gen}"
plugin="$here/node_modules/.bin/protoc-gen-ts_proto"
if [ ! -x "$plugin" ]; then
  echo "generate.sh: $plugin is missing: run \`npm ci\` in $here first" >&2
  exit 1
fi
# ts-proto options: grpc-js service clients for Node; 64-bit ints as bigint (shapes, seeds up to 2^64-1);
# no protoc version in the headers (it follows the grpcio-tools installed, the output must not).
opts=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=bigint,useExactTypes=false,annotateFilesWithVersion=false
rm -rf "$out/attrserve" "$out/google"
mkdir -p "$out"
"${PYTHON:-python}" -m grpc_tools.protoc -I "$protos" \
  --plugin=protoc-gen-ts_proto="$plugin" \
  --ts_proto_out="$out" --ts_proto_opt="$opts" \
  "$protos"/attrserve/v1/*.proto
