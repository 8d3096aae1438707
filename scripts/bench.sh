#!/usr/bin/env bash
# Benchmark: a cached GetSecret against an empty tonic call (grpc.health.v1
# Health/Check) on the same broker, in the same run, so that the machine's
# noise hits both alike. Prints each round, the medians, their ratio and the
# server's CPU time per call.
#
#   ./scripts/bench.sh                 # defaults below
#   ROUNDS=5 REQUESTS=100000 ./scripts/bench.sh
#   SHAPES="64x1 8x8" ./scripts/bench.sh
#
# A shape is CONNECTIONSxSTREAMS: h2load's -c and -m (concurrent streams per
# connection). The defaults are the three shapes the broker is measured at:
# one connection, 64 connections, and 8 connections of 8 streams each.
#
# Load comes from h2load (Debian nghttp2-client, installed when missing).
# h2load counts HTTP 200 as success even when grpc-status is not 0, so a
# sample of each call is checked first with nghttp, which shows trailers.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-40000}
SHAPES=${SHAPES:-"1x1 64x1 8x8"}
PORT=${PORT:-50151}

if ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then
  echo "installing nghttp2-client (h2load, nghttp)..."
  apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
fi

cargo build --release --quiet --bin secrets-broker
work=$(mktemp -d)
broker_pid=""
cleanup() {
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# gRPC frames: 1 byte "not compressed", 4 bytes length, the protobuf message.
# GetSecretRequest{name: "mistral-api-key"}: field 1, 15 bytes.
printf '\x00\x00\x00\x00\x11\x0a\x0fmistral-api-key' >"$work/get_secret.bin"
# HealthCheckRequest{}: empty.
printf '\x00\x00\x00\x00\x00' >"$work/health.bin"

LOG_LEVEL=WARNING ./target/release/secrets-broker serve --dev --listen "127.0.0.1:$PORT" \
  >"$work/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 50); do
  nghttp -n "http://127.0.0.1:$PORT/" >/dev/null 2>&1 && break
  sleep 0.1
done

url() { echo "http://127.0.0.1:$PORT/$1"; }
GET_SECRET=secretsbroker.v1.SecretsService/GetSecret
HEALTH=grpc.health.v1.Health/Check

# A sample of each: grpc-status must be 0. This also fills the cache.
for call in "$GET_SECRET:get_secret" "$HEALTH:health"; do
  path=${call%%:*}; body=${call##*:}
  trailers=$(nghttp -v -d "$work/$body.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "$(url "$path")" 2>&1 | grep -a 'grpc-status' || true)
  if ! grep -q 'grpc-status: 0' <<<"$trailers"; then
    echo "sample call $path did not answer grpc-status 0: ${trailers:-no grpc-status}" >&2
    exit 1
  fi
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$broker_pid/stat"; }
TICKS_PER_SECOND=$(getconf CLK_TCK)

# One h2load run; prints "rate cpu_us_per_call".
run() {
  local path=$1 body=$2 clients=$3 streams=$4 before after out total succeeded rate
  before=$(cpu_ticks)
  out=$(h2load -n "$REQUESTS" -c "$clients" -m "$streams" -d "$work/$body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' "$(url "$path")")
  after=$(cpu_ticks)
  read -r total succeeded < <(awk '/^requests:/ {print $2, $8}' <<<"$out")
  if [ "$total" != "$succeeded" ]; then
    echo "h2load: only $succeeded of $total requests succeeded for $path" >&2
    exit 1
  fi
  rate=$(awk '/^finished in/ {print $4}' <<<"$out")
  awk -v r="$rate" -v t=$((after - before)) -v hz="$TICKS_PER_SECOND" -v n="$REQUESTS" \
    'BEGIN { printf "%.0f %.1f\n", r, t / hz / n * 1e6 }'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo "secrets-broker benchmark: $ROUNDS interleaved rounds, $REQUESTS requests per run, $(nproc) cores"
for shape in $SHAPES; do
  clients=${shape%x*}; streams=${shape#*x}
  : >"$work/health.rates"; : >"$work/get.rates"; : >"$work/health.cpu"; : >"$work/get.cpu"
  for round in $(seq "$ROUNDS"); do
    read -r h_rate h_cpu < <(run "$HEALTH" health "$clients" "$streams")
    read -r g_rate g_cpu < <(run "$GET_SECRET" get_secret "$clients" "$streams")
    echo "$h_rate" >>"$work/health.rates"; echo "$h_cpu" >>"$work/health.cpu"
    echo "$g_rate" >>"$work/get.rates"; echo "$g_cpu" >>"$work/get.cpu"
    printf '  %5s, round %s: Health/Check %8s/s (%s us CPU/call)   GetSecret %8s/s (%s us CPU/call)\n' \
      "$shape" "$round" "$h_rate" "$h_cpu" "$g_rate" "$g_cpu"
  done
  h=$(median <"$work/health.rates"); g=$(median <"$work/get.rates")
  hc=$(median <"$work/health.cpu"); gc=$(median <"$work/get.cpu")
  ratio=$(awk -v g="$g" -v h="$h" 'BEGIN { printf "%.3f", g / h }')
  cpu_ratio=$(awk -v g="$gc" -v h="$hc" 'BEGIN { printf "%.2f", g / h }')
  printf '%5s (connections x streams), medians: Health/Check %s/s (%s us CPU), cached GetSecret %s/s (%s us CPU), rate ratio %s, CPU ratio %s\n' \
    "$shape" "$h" "$hc" "$g" "$gc" "$ratio" "$cpu_ratio"
done
