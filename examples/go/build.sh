#!/usr/bin/env bash
# Builds the Go caller offline, from Debian's packages only (nothing is
# downloaded): golang-go, protobuf-compiler, protoc-gen-go,
# protoc-gen-go-grpc, golang-google-grpc-dev, golang-google-protobuf-dev and
# golang-github-golang-protobuf-1-5-dev (name it: apt otherwise picks
# golang/protobuf 1.3, and the caller builds but panics on its first reply).
#
#   ./build.sh [OUTPUT]     (default ./caller)
#
# The stubs are generated into a GOPATH of our own (the protos set no
# go_package: -M maps each file to the import path secretsbroker/v1), and
# built in GOPATH mode next to Debian's Go sources in /usr/share/gocode.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROTO_DIR="${PROTO_DIR:-$HERE/../../proto}"
# Both made absolute here: the build runs from inside the GOPATH, where a
# relative OUTPUT would land the binary (and a relative GOPATH would fail).
OUTPUT="$(realpath -m -- "${1:-$HERE/caller}")"
WORK="$(realpath -m -- "${GO_WORK_DIR:-$(mktemp -d)}")"
PACKAGE="secretsbroker/v1"

mkdir -p "$WORK/gopath/src/$PACKAGE" "$WORK/gopath/src/caller" "$WORK/cache"
mappings=()
for proto in secret secrets_service admin_service; do
    mappings+=("--go_opt=M$PACKAGE/$proto.proto=$PACKAGE;secretsbrokerv1")
    mappings+=("--go-grpc_opt=M$PACKAGE/$proto.proto=$PACKAGE;secretsbrokerv1")
done
protoc -I"$PROTO_DIR" -I/usr/include \
    --go_out="$WORK/gopath/src" --go_opt=paths=import \
    --go-grpc_out="$WORK/gopath/src" --go-grpc_opt=paths=import \
    "${mappings[@]}" \
    "$PROTO_DIR"/$PACKAGE/*.proto
cp "$HERE/caller.go" "$WORK/gopath/src/caller/main.go"
export GO111MODULE=off GOPATH="$WORK/gopath:/usr/share/gocode" GOCACHE="$WORK/cache" GOFLAGS=-mod=
(cd "$WORK/gopath/src/caller" && go build -o "$OUTPUT" .)
echo "built $OUTPUT"
