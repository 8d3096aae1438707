#!/usr/bin/env bash
# Regenerates the stubs shipped in src/secretsbroker/v1 from ../../proto:
# messages and gRPC stubs (grpcio-tools) with their type stubs (.pyi,
# mypy-protobuf). Run it after changing the contract; the test suite checks
# that the shipped files match.
#
#   PYTHON=/path/to/python ./gen.sh [OUT]     (OUT defaults to ./src)
#
# PYTHON needs grpcio-tools and mypy-protobuf; nothing is needed at run time
# beyond the package's own dependencies.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROTO_DIR="${PROTO_DIR:-$HERE/../../proto}"
OUT="${1:-$HERE/src}"
PYTHON="${PYTHON:-python3}"
BIN="$(dirname "$PYTHON")"

mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I"$PROTO_DIR" \
    --python_out="$OUT" --grpc_python_out="$OUT" \
    --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --mypy_out="$OUT" \
    --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$OUT" \
    "$PROTO_DIR"/secretsbroker/v1/*.proto
for package in "$OUT/secretsbroker" "$OUT/secretsbroker/v1"; do
    touch "$package/__init__.py" "$package/py.typed"
done
