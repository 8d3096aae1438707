#!/usr/bin/env bash
# Generates the Python stubs of secretsbroker.v1 from proto/ into generated/
# (or $GENERATED_DIR). Needs grpcio-tools:  pip install grpcio grpcio-tools
#
#   ./gen.sh                       # -> examples/python/generated/
#   PYTHON=.venv/bin/python GENERATED_DIR=/tmp/stubs ./gen.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROTO_DIR="${PROTO_DIR:-$HERE/../../proto}"
OUT="${GENERATED_DIR:-$HERE/generated}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$OUT"
# grpc_tools.protoc adds the well-known types (google/protobuf/*.proto) itself.
"$PYTHON" -m grpc_tools.protoc -I"$PROTO_DIR" \
    --python_out="$OUT" --grpc_python_out="$OUT" \
    "$PROTO_DIR"/secretsbroker/v1/*.proto
echo "stubs written to $OUT"
