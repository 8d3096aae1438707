#!/usr/bin/env bash
# Benchmark: a cached GetSecret against an empty tonic call (grpc.health.v1
# Health/Check) on the same broker, in the same run, interleaved, so that
# the machine's noise hits both alike. Prints each round, the medians,
# their ratio, the median of each round's own ratio (the two runs of a
# round are next to each other in time) and the server's CPU time per call
# (every thread's time on CPU, from schedstat; for the load generator's
# runs, from after its warm-up, so that TLS handshakes are not counted).
#
#   ./scripts/bench.sh                     # everything below
#   ROUNDS=31 REQUESTS=5000 ./scripts/bench.sh
#   SHAPES="64x1 8x8" PARTS="dev mtls" ./scripts/bench.sh
#
# Parts (PARTS, default all five):
#   dev   the embedded dev backend, h2load, the three shapes;
#   moto  the AWS backend over moto_server (a 213-byte JSON secret, cached),
#         h2load, the three shapes;
#   mtls  the dev backend plaintext and under mutual TLS, the same client
#         (examples/loadgen.rs, a tonic client; h2load cannot present a
#         client certificate) on warm connections: GetSecret's rate under
#         mTLS against plaintext, and Health/Check for reference. The
#         client writes each call in one write (one TLS record), as grpcio
#         does; it prints how many writes a call took. MTLS_REQUESTS
#         calls a run (three times REQUESTS unless set).
#   instructions
#         brokers under valgrind's callgrind: the broker's user-space
#         instructions per call, GetSecret against Health/Check (h2load,
#         with the functions GetSecret's extra goes to), and GetSecret
#         under mutual TLS against plaintext (the load generator), at
#         COUNT_SHAPES. Instructions are counted, not timed, so these
#         figures do not move with the machine's noise (they leave out the
#         kernel's share and the cost of cache misses, which the timed
#         parts include). COUNT_CALLS calls a run, COUNT_ROUNDS rounds.
#   profile
#         the dev broker under perf's cpu-clock sampling, h2load, at
#         SHAPES: microseconds a call by part of the broker (audit, cache,
#         names and policy, h2, tokio, the kernel...), for Health/Check
#         and GetSecret, and what GetSecret adds (scripts/bench_profile.py),
#         with the system calls and context switches a call (perf stat).
#         Unlike the instructions part, this counts time, the kernel's
#         included; the sampling itself costs a few percent. PROFILE_ROUNDS
#         runs of each (interleaved), PROFILE_REQUESTS calls a run. On a
#         machine where perf may not sample, the part says why and is
#         left out.
#
# A shape is CONNECTIONSxSTREAMS: concurrent streams per connection. The
# defaults are the three shapes the broker is measured at: one connection,
# 64 connections, and 8 connections of 8 streams each. The broker logs at
# INFO with its audit trail on (one line per call), metrics and the policy
# check on (an explicit policy under mTLS).
#
# Load comes from h2load (Debian nghttp2-client), moto_server from the test
# venv (.tools/venv): both installed by the test command's tool step
# (TOOLS_ONLY=1 ./scripts/test.sh) when missing. h2load counts HTTP 200 as success
# even when grpc-status is not 0, so a sample of each call is checked first
# with nghttp, which shows trailers.
set -euo pipefail
cd "$(dirname "$0")/.."

# Many short rounds rather than a few long ones: this kind of machine's
# speed swings by a third within seconds, both runs of a round see nearly
# the same machine when they are short, and the median of many rounds'
# ratios comes with a usable confidence interval.
ROUNDS=${ROUNDS:-15}
REQUESTS=${REQUESTS:-10000}
# Instructions are counted, not timed: a few rounds say it all.
COUNT_ROUNDS=${COUNT_ROUNDS:-3}
COUNT_SHAPES=${COUNT_SHAPES:-"1x1 64x1"}
PROFILE_ROUNDS=${PROFILE_ROUNDS:-3}
# Calls a sampled run: long enough that perf's start and stop are a small
# part of it (by default 50,000: about half a second at 64x1 and 8x8, five
# at 1x1). A quick run with fewer REQUESTS gets a quicker profile.
PROFILE_REQUESTS=${PROFILE_REQUESTS:-$((REQUESTS * 5))}
# Calls a run of the load generator (the mtls part): at 8x8, runs of
# 10,000 calls put the ratio of a round anywhere from 0.75 to 1.25; runs
# three times longer spread it about half as wide (0.88 to 1.12).
MTLS_REQUESTS=${MTLS_REQUESTS:-$((REQUESTS * 3))}
if (( ROUNDS < 1 || COUNT_ROUNDS < 1 || PROFILE_ROUNDS < 1 )); then
  echo "ROUNDS, COUNT_ROUNDS and PROFILE_ROUNDS must be at least 1" >&2
  exit 2
fi
SHAPES=${SHAPES:-"1x1 64x1 8x8"}
PARTS=${PARTS:-"dev moto mtls instructions profile"}
# Samples a second per thread on CPU: one sample is about 200 µs of CPU.
PROFILE_HZ=4999
COUNT_CALLS=${COUNT_CALLS:-4000}
# The brokers and moto listen on PORT to PORT+8. Below Linux's ephemeral
# range (32768-60999): the load generators open thousands of connections,
# and a port in that range can be held by one of their sockets (or taken
# by a connect to itself) just when a broker wants to listen on it.
PORT=${PORT:-20151}
VENV=.tools/venv

needs_valgrind=0
if [[ " $PARTS " == *" instructions "* ]] && ! command -v callgrind_control >/dev/null; then
  needs_valgrind=1
fi
needs_perf=0
if [[ " $PARTS " == *" profile "* ]] && ! command -v perf >/dev/null; then
  needs_perf=1
fi
if ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null ||
  [ "$needs_valgrind" = 1 ] || [ "$needs_perf" = 1 ] || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "installing the test tools (h2load, nghttp, valgrind, perf, moto_server) with the test command..."
  TOOLS_ONLY=1 ./scripts/test.sh
fi

cargo build --release --quiet --bin secrets-broker --example loadgen
BROKER=./target/release/secrets-broker
LOADGEN=./target/release/examples/loadgen
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

# gRPC frames: 1 byte "not compressed", 4 bytes length, the protobuf message.
# GetSecretRequest{name: "mistral-api-key"}: field 1, 15 bytes.
printf '\x00\x00\x00\x00\x11\x0a\x0fmistral-api-key' >"$work/get_secret.bin"
# HealthCheckRequest{}: empty.
printf '\x00\x00\x00\x00\x00' >"$work/health.bin"
GET_SECRET=secretsbroker.v1.SecretsService/GetSecret
HEALTH=grpc.health.v1.Health/Check

# start_broker NAME PORT ARGS...: serves in the background at INFO; sets
# broker_pid. Environment for it comes from BROKER_ENV (an array), and
# BROKER_WRAPPER (an array) runs it under another program.
BROKER_WRAPPER=()
start_broker() {
  local name=$1 port=$2; shift 2
  # Text logs whatever the caller's environment says: readiness is read
  # from them below.
  env "${BROKER_ENV[@]}" LOG_LEVEL=INFO LOG_FORMAT=text "${BROKER_WRAPPER[@]}" "$BROKER" serve \
    --listen "127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 &
  broker_pid=$!
  pids+=("$broker_pid")
  # Ready when it says it listens: a connect alone could reach another
  # process on the port while this broker fails to bind it.
  for _ in $(seq 600); do
    if grep -q "listening addr=127.0.0.1:$port " "$work/$name.log"; then return; fi
    if ! kill -0 "$broker_pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  # valgrind's own lines (==PID==) would hide the broker's.
  echo "the $name broker did not start:" >&2
  grep -v '^==[0-9]*==' "$work/$name.log" | tail >&2
  exit 1
}

# check_sample PORT: one call of each through nghttp; grpc-status must be 0.
# This also fills the cache. A call is tried three times, a second apart,
# so that a passing hiccup is not taken for a broken broker; one that
# answers wrongly fails all three, and nghttp's last lines are shown
# (frames and headers only: -n discards the body, which is the secret).
check_sample() {
  local port=$1 call path body out attempt
  for call in "$GET_SECRET:get_secret" "$HEALTH:health"; do
    path=${call%%:*}; body=${call##*:}
    for attempt in 1 2 3; do
      out=$(nghttp -v -n -t 30 -d "$work/$body.bin" -H 'content-type: application/grpc' \
        -H 'te: trailers' "http://127.0.0.1:$port/$path" 2>&1 || true)
      if grep -aq 'grpc-status: 0' <<<"$out"; then break; fi
      if [ "$attempt" = 3 ]; then
        echo "sample call $path did not answer grpc-status 0; nghttp's last lines:" >&2
        tail -n 8 <<<"$out" >&2
        exit 1
      fi
      sleep 1
    done
  done
}

# thread_cpu PID: "TID NANOSECONDS" for each thread of PID, its time on CPU
# from schedstat (exact; /proc/PID/stat counts 10 ms ticks, too coarse for
# short runs).
thread_cpu() {
  local task ns rest found=0
  for task in /proc/"$1"/task/*; do
    # A thread may end between the listing and the read: skip it.
    if read -r ns rest 2>/dev/null <"$task/schedstat"; then
      echo "${task##*/} $ns"
      found=1
    fi
  done
  if [ "$found" = 0 ]; then
    echo "no schedstat for process $1 (ended, or a kernel without it)" >&2
    exit 1
  fi
}

# cpu_per_call PID BEFORE_FILE: microseconds of the broker's CPU per request
# since the snapshot in BEFORE_FILE (threads born since count whole; a
# thread that ended since is left out, with what little it ran).
cpu_per_call() {
  thread_cpu "$1" | awk -v n="$REQUESTS" 'NR == FNR { before[$1] = $2; next }
    { t += $2 - before[$1] } END { printf "%.1f", t / n / 1000 }' "$2" -
}

# h2load_run PID PORT PATH BODY CLIENTS STREAMS: prints "rate cpu_us_per_call".
h2load_run() {
  local pid=$1 port=$2 path=$3 body=$4 clients=$5 streams=$6 out total succeeded rate
  thread_cpu "$pid" >"$work/cpu.before"
  out=$(h2load -n "$REQUESTS" -c "$clients" -m "$streams" -d "$work/$body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$port/$path")
  read -r total succeeded < <(awk '/^requests:/ {print $2, $8}' <<<"$out")
  if [ "$total" != "$succeeded" ]; then
    echo "h2load: only $succeeded of $total requests succeeded for $path" >&2
    exit 1
  fi
  rate=$(awk '/^finished in/ {printf "%.0f", $4}' <<<"$out")
  echo "$rate $(cpu_per_call "$pid" "$work/cpu.before")"
}

# loadgen_run PID PORT RPC CLIENTS STREAMS [TLS_DIR]: prints "rate cpu_us_per_call",
# both measured by the load generator after its warm-up (TLS handshakes are
# not per-call work).
loadgen_run() {
  local pid=$1 port=$2 rpc=$3 clients=$4 streams=$5 tls=${6:-}
  "$LOADGEN" run --addr "127.0.0.1:$port" --rpc "$rpc" --connections "$clients" \
    --streams "$streams" --requests "$MTLS_REQUESTS" --server-pid "$pid" ${tls:+--tls "$tls"} |
    awk '{print $2, $4}'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# median_interval: "median [low, high]" of the numbers on stdin, FORMAT
# (printf) for each: the 95% confidence interval of the median from order
# statistics (no assumption about the noise's distribution; the binomial's
# normal approximation picks the ranks). Below 6 numbers there is no such
# interval, and "(too few rounds for an interval)" says so.
median_interval() {
  sort -n | awk -v fmt="$1" '{a[NR]=$1} END {
    m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2
    k = int((NR - 1.96 * sqrt(NR)) / 2 + 0.5)
    if (k < 1) { printf fmt " (too few rounds for an interval)", m; exit }
    printf fmt " [" fmt ", " fmt "]", m, a[k], a[NR - k + 1]
  }'
}

# callgrind_dump PID OUT NAME: has the broker under callgrind (PID, its
# --callgrind-out-file OUT) write its counts since the last dump and zero
# them; sets `dump` to the file (callgrind numbers its dumps: OUT.N) and
# `instructions` to what it counted.
declare -A dumps_of
callgrind_dump() {
  local pid=$1 out=$2 name=$3 n
  n=$(( ${dumps_of[$out]:-0} + 1 )); dumps_of[$out]=$n
  dump="$work/$out.$n"
  if ! callgrind_control --dump="$name" "$pid" >/dev/null 2>&1 ||
    ! grep -q "^desc: Trigger: dump $name\$" "$dump" 2>/dev/null; then
    echo "callgrind did not write dump $n ($name) of broker $pid" >&2
    exit 1
  fi
  instructions=$(awk '/^totals:/ { print $2 }' "$dump")
}

# h2load_count PID CLIENTS STREAMS PATH BODY: COUNT_CALLS calls from h2load
# to the callgrind broker at $port, then its instructions per call in
# `counted` (and the dump in `dump`).
h2load_count() {
  h2load -n "$COUNT_CALLS" -c "$2" -m "$3" -d "$work/$5.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$port/$4" >/dev/null
  callgrind_dump "$1" callgrind.out "$5"
  counted=$(( instructions / COUNT_CALLS ))
}

# loadgen_count PID PORT OUT CLIENTS STREAMS [TLS_DIR]: COUNT_CALLS
# GetSecret calls from the load generator to a callgrind broker; its
# instructions per call in `counted` (and the dump in `dump`). The counters
# are zeroed after the generator's connects, handshakes and warm-up calls.
loadgen_count() {
  local pid=$1 port=$2 out=$3 clients=$4 streams=$5 tls=${6:-}
  "$LOADGEN" run --addr "127.0.0.1:$port" --rpc get --connections "$clients" \
    --streams "$streams" --requests "$COUNT_CALLS" ${tls:+--tls "$tls"} \
    --before-calls "callgrind_control --zero $pid >/dev/null 2>&1" >/dev/null
  callgrind_dump "$pid" "$out" calls
  counted=$(( instructions / COUNT_CALLS ))
}

# profile_difference A_DUMP B_DUMP CALLS: the functions whose own
# (exclusive) instructions per call grew most from A to B, from
# callgrind_annotate: what B does that A does not.
profile_difference() {
  {
    # --auto=no: no annotated source lines, whose costs would be summed
    # as functions when the binary has debug information.
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$1" | sed 's/^/a /'
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$2" | sed 's/^/b /'
  } | awk -v n="$3" '
    $2 ~ /^[0-9,]+$/ && /%\)/ {
      side = $1; count = $2; gsub(",", "", count)
      name = $0
      sub(/^[ab] +[0-9,]+ +\( *[0-9.]+%\) +/, "", name)
      sub(/ \[[^]]*\]$/, "", name)   # the object file
      sub(/^[^:]*:/, "", name)        # the source file, or ???
      if (name == "PROGRAM TOTALS") { total[side] = count; next }
      cost[name, side] += count; names[name] = 1
    }
    END {
      for (name in names) {
        # The entry points of threads come out with the cost of all
        # their callees: not an exclusive cost, left out.
        if (cost[name, "a"] > total["a"] / 2 || cost[name, "b"] > total["b"] / 2) continue
        printf "%8.0f %8.0f %8.0f  %.110s\n", (cost[name, "b"] - cost[name, "a"]) / n,
          cost[name, "a"] / n, cost[name, "b"] / n, name
      }
    }' | sort -rn | awk -v lines="${PROFILE_LINES:-20}" 'NR <= lines' 
}

# compare LABEL A_NAME B_NAME RUN_A RUN_B: ROUNDS interleaved rounds at each
# shape; RUN_A/RUN_B are commands taking CLIENTS STREAMS.
compare() {
  local label=$1 a_name=$2 b_name=$3 run_a=$4 run_b=$5 shape clients streams round
  local a_rate a_cpu b_rate b_cpu a b ac bc
  for shape in $SHAPES; do
    clients=${shape%x*}; streams=${shape#*x}
    : >"$work/a.rates"; : >"$work/b.rates"; : >"$work/a.cpu"; : >"$work/b.cpu"
    : >"$work/ratios"; : >"$work/cpu_ratios"
    for round in $(seq "$ROUNDS"); do
      # ABBA: the first of a round's two runs alternates, so that whatever
      # the previous run leaves behind (sockets in TIME_WAIT, the log
      # writer's backlog) does not always fall on the same side.
      if (( round % 2 )); then
        read -r a_rate a_cpu < <($run_a "$clients" "$streams")
        read -r b_rate b_cpu < <($run_b "$clients" "$streams")
      else
        read -r b_rate b_cpu < <($run_b "$clients" "$streams")
        read -r a_rate a_cpu < <($run_a "$clients" "$streams")
      fi
      echo "$a_rate" >>"$work/a.rates"; echo "$a_cpu" >>"$work/a.cpu"
      echo "$b_rate" >>"$work/b.rates"; echo "$b_cpu" >>"$work/b.cpu"
      awk -v a="$a_rate" -v b="$b_rate" 'BEGIN { printf "%.4f\n", b / a }' >>"$work/ratios"
      awk -v a="$a_cpu" -v b="$b_cpu" 'BEGIN { printf "%.4f\n", b / a }' >>"$work/cpu_ratios"
      printf '  %-5s %5s round %s: %s %8s/s (%s us CPU/call)   %s %8s/s (%s us CPU/call)\n' \
        "$label" "$shape" "$round" "$a_name" "$a_rate" "$a_cpu" "$b_name" "$b_rate" "$b_cpu"
    done
    a=$(median <"$work/a.rates"); b=$(median <"$work/b.rates")
    ac=$(median <"$work/a.cpu"); bc=$(median <"$work/b.cpu")
    printf '%-5s %5s medians: %s %s/s (%s us CPU), %s %s/s (%s us CPU), rate ratio %s, CPU ratio %s; median of per-round ratios [95%% interval]: rate %s, CPU %s\n' \
      "$label" "$shape" "$a_name" "$a" "$ac" "$b_name" "$b" "$bc" \
      "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b / a }')" \
      "$(awk -v a="$ac" -v b="$bc" 'BEGIN { printf "%.2f", b / a }')" \
      "$(median_interval %.3f <"$work/ratios")" \
      "$(median_interval %.2f <"$work/cpu_ratios")"
  done
}

# h2load comparisons of one broker: Health/Check (a) against GetSecret (b).
h2_health() { h2load_run "$pid" "$port" "$HEALTH" health "$@"; }
h2_get() { h2load_run "$pid" "$port" "$GET_SECRET" get_secret "$@"; }

echo "secrets-broker benchmark: $ROUNDS interleaved rounds, $REQUESTS requests per run ($MTLS_REQUESTS for the load generator), $(nproc) cores; ratios are b / a"

if [[ " $PARTS " == *" dev "* ]]; then
  BROKER_ENV=()
  port=$PORT; start_broker dev "$port" --dev; pid=$broker_pid
  check_sample "$port"
  compare dev Health/Check GetSecret h2_health h2_get
  kill "$pid"; wait "$pid" 2>/dev/null || true
fi

if [[ " $PARTS " == *" moto "* ]]; then
  moto_port=$((PORT + 1))
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
  pids+=("$!")
  BROKER_ENV=(AWS_ENDPOINT_URL="http://127.0.0.1:$moto_port" AWS_ACCESS_KEY_ID=bench
    AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=ap-east-1 AWS_EC2_METADATA_DISABLED=true)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null && break
    sleep 0.1
  done
  # A 213-byte JSON secret, as an API key with its metadata would be.
  value='{"api_key":"sk-bench-0123456789abcdef0123456789abcdef0123456789abcdef","organization":"insurecove","project":"claims-triage","endpoint":"https://api.mistral.ai/v1","model":"mistral-large-latest","rotated_by":"ops@insurecove"}'
  env "${BROKER_ENV[@]}" "$VENV/bin/python" - "$value" <<'EOF'
import os, sys, boto3
boto3.client("secretsmanager", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_secret(
    Name="insurecove/mistral-api-key", SecretString=sys.argv[1])
EOF
  port=$((PORT + 2)); start_broker moto "$port" --cache-ttl 3600; pid=$broker_pid
  check_sample "$port"
  compare moto Health/Check GetSecret h2_health h2_get
  kill "$pid"; wait "$pid" 2>/dev/null || true
fi

if [[ " $PARTS " == *" mtls "* ]]; then
  BROKER_ENV=()
  "$LOADGEN" make-pki "$work/pki"
  plain_port=$((PORT + 3)); start_broker plain "$plain_port" --dev; plain_pid=$broker_pid
  tls_port=$((PORT + 4))
  start_broker mtls "$tls_port" --dev --tls-cert "$work/pki/server.pem" \
    --tls-key "$work/pki/server-key.pem" --tls-client-ca "$work/pki/ca.pem" \
    --policy "$work/pki/policy.toml"
  tls_pid=$broker_pid
  lg_health_plain() { loadgen_run "$plain_pid" "$plain_port" health "$@"; }
  lg_get_plain() { loadgen_run "$plain_pid" "$plain_port" get "$@"; }
  lg_get_tls() { loadgen_run "$tls_pid" "$tls_port" get "$@" "$work/pki"; }
  # The generator writes each call once, as grpcio does (see OneWritePerCall
  # in examples/loadgen.rs); say how many writes a call took.
  for shape in $SHAPES; do
    clients=${shape%x*}; streams=${shape#*x}
    printf 'mtls  %5s load generator writes per call: plaintext %s, mTLS %s\n' "$shape" \
      "$("$LOADGEN" run --addr "127.0.0.1:$plain_port" --rpc get --connections "$clients" \
        --streams "$streams" --requests 2000 | awk '{print $4}')" \
      "$("$LOADGEN" run --addr "127.0.0.1:$tls_port" --rpc get --connections "$clients" \
        --streams "$streams" --requests 2000 --tls "$work/pki" | awk '{print $4}')"
  done
  compare plain Health/Check GetSecret lg_health_plain lg_get_plain
  compare mtls GetSecret-plaintext GetSecret-mTLS lg_get_plain lg_get_tls
  kill "$plain_pid" "$tls_pid"; wait "$plain_pid" "$tls_pid" 2>/dev/null || true
fi

if [[ " $PARTS " == *" instructions "* ]]; then
  BROKER_ENV=()
  port=$((PORT + 5))
  BROKER_WRAPPER=(valgrind --tool=callgrind "--callgrind-out-file=$work/callgrind.out")
  start_broker instructions "$port" --dev; pid=$broker_pid
  BROKER_WRAPPER=()
  check_sample "$port"
  for shape in $COUNT_SHAPES; do
    clients=${shape%x*}; streams=${shape#*x}
    # Warm both paths (first calls fill caches and tables), then count.
    h2load_count "$pid" "$clients" "$streams" "$HEALTH" health
    h2load_count "$pid" "$clients" "$streams" "$GET_SECRET" get_secret
    : >"$work/counts"
    for round in $(seq "$COUNT_ROUNDS"); do
      h2load_count "$pid" "$clients" "$streams" "$HEALTH" health
      health=$counted; health_dump=$dump
      h2load_count "$pid" "$clients" "$streams" "$GET_SECRET" get_secret
      get=$counted; get_dump=$dump
      echo "$health $get" >>"$work/counts"
      printf '  instructions %5s round %s: Health/Check %s per call   GetSecret %s per call\n' \
        "$shape" "$round" "$health" "$get"
    done
    awk '{ printf "%.4f\n", $2 / $1 }' "$work/counts" | median |
      awk -v calls="$COUNT_CALLS" -v shape="$shape" '{ printf "instructions %5s (user space, %s calls a run): median per-round ratio GetSecret / Health/Check %.3f\n", shape, calls, $1 }'
    echo "  where GetSecret's extra instructions go at $shape (last round; per call: extra, Health/Check, GetSecret):"
    profile_difference "$health_dump" "$get_dump" "$COUNT_CALLS"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true

  # The same client against a plaintext and a mutual-TLS broker, both
  # under callgrind: what TLS adds per call in the broker's user space.
  "$LOADGEN" make-pki "$work/pki-count"
  plain_port=$((PORT + 6)); tls_port=$((PORT + 7))
  BROKER_WRAPPER=(valgrind --tool=callgrind "--callgrind-out-file=$work/plain-callgrind.out")
  start_broker plain-count "$plain_port" --dev; plain_pid=$broker_pid
  BROKER_WRAPPER=(valgrind --tool=callgrind "--callgrind-out-file=$work/tls-callgrind.out")
  start_broker mtls-count "$tls_port" --dev --tls-cert "$work/pki-count/server.pem" \
    --tls-key "$work/pki-count/server-key.pem" --tls-client-ca "$work/pki-count/ca.pem" \
    --policy "$work/pki-count/policy.toml"
  tls_pid=$broker_pid
  BROKER_WRAPPER=()
  for shape in $COUNT_SHAPES; do
    clients=${shape%x*}; streams=${shape#*x}
    # Warm: the first handshakes and calls set up what later ones reuse.
    loadgen_count "$plain_pid" "$plain_port" plain-callgrind.out "$clients" "$streams"
    loadgen_count "$tls_pid" "$tls_port" tls-callgrind.out "$clients" "$streams" "$work/pki-count"
    : >"$work/counts"
    for round in $(seq "$COUNT_ROUNDS"); do
      loadgen_count "$plain_pid" "$plain_port" plain-callgrind.out "$clients" "$streams"
      plain=$counted
      plain_dump=$dump
      loadgen_count "$tls_pid" "$tls_port" tls-callgrind.out "$clients" "$streams" "$work/pki-count"
      tls=$counted; tls_dump=$dump
      echo "$plain $tls" >>"$work/counts"
      printf '  instructions %5s round %s: GetSecret-plaintext %s per call   GetSecret-mTLS %s per call\n' \
        "$shape" "$round" "$plain" "$tls"
    done
    awk '{ printf "%.4f\n", $2 / $1 }' "$work/counts" | median |
      awk -v calls="$COUNT_CALLS" -v shape="$shape" '{ printf "instructions %5s (user space, load generator, %s calls a run): median per-round ratio GetSecret mTLS / plaintext %.3f\n", shape, calls, $1 }'
    echo "  where mTLS's extra instructions go at $shape (last round; per call: extra, plaintext, mTLS):"
    profile_difference "$plain_dump" "$tls_dump" "$COUNT_CALLS"
  done
  kill "$plain_pid" "$tls_pid"; wait "$plain_pid" "$tls_pid" 2>/dev/null || true
fi

if [[ " $PARTS " == *" profile "* ]]; then
  BROKER_ENV=()
  port=$((PORT + 8)); start_broker profile "$port" --dev; pid=$broker_pid
  check_sample "$port"
  # What the kernel is asked to do a call: the same system calls and
  # switches for both RPCs would put the kernel's share of GetSecret's
  # extra down to how long they take, not to more of them.
  PROFILE_EVENTS=syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,context-switches
  # perf_record_run NAME PATH BODY CLIENTS STREAMS: one h2load run of
  # PROFILE_REQUESTS calls with the broker's threads sampled; appends
  # perf's listing to NAME.report, its counts of PROFILE_EVENTS to
  # NAME.stat, and the threads' time on CPU a call over the run
  # (schedstat, µs) to NAME.cpu.
  perf_record_run() {
    local name=$1 path=$2 body=$3 clients=$4 streams=$5 perf_pid stat_pid
    perf record -q -e cpu-clock -F "$PROFILE_HZ" -p "$pid" -o "$work/$name.data" \
      2>"$work/perf.log" &
    perf_pid=$!
    perf stat -x, -e "$PROFILE_EVENTS" -p "$pid" -o "$work/$name.stat.last" 2>/dev/null &
    stat_pid=$!
    # perf has no word for "attached to every thread": its header, then
    # a moment. Samples missed at either end show as a sampled total
    # below the schedstat one (printed under the table).
    for _ in $(seq 100); do [ -s "$work/$name.data" ] && break; sleep 0.05; done
    sleep 0.5
    REQUESTS=$PROFILE_REQUESTS h2load_run "$pid" "$port" "$path" "$body" "$clients" "$streams" |
      awk '{ print $2 }' >>"$work/$name.cpu"
    sleep 0.2
    # Stopped by SIGINT, perf exits with its status: not a failure. perf
    # stat may have stopped already (events this kernel cannot count).
    kill -INT "$perf_pid" "$stat_pid" 2>/dev/null || true
    wait "$perf_pid" || true
    wait "$stat_pid" || true
    cat "$work/$name.stat.last" >>"$work/$name.stat" 2>/dev/null || true
    if ! perf report -q -i "$work/$name.data" --stdio --no-children -g none --sort dso,sym -n \
      >"$work/$name.last" 2>>"$work/perf.log" || [ ! -s "$work/$name.last" ]; then
      echo "perf recorded no samples of the broker:" >&2; tail "$work/perf.log" >&2; exit 1
    fi
    cat "$work/$name.last" >>"$work/$name.report"
  }
  # events_a_call NAME: PROFILE_EVENTS a call over NAME's runs (perf
  # stat's CSV: count, unit, event, ...), or why there are none.
  events_a_call() {
    awk -F, -v n="$((PROFILE_REQUESTS * PROFILE_ROUNDS))" '
      /^#/ || NF < 3 { next }
      { event = $3; sub(/^syscalls:sys_enter_/, "", event) }
      $1 ~ /^[0-9]+$/ { count[event] += $1; if (!(event in order)) order[event] = ++events; next }
      { missing = missing " " event }
      END {
        if (events == 0) { printf "none counted here%s", (missing ? " (not supported:" missing ")" : ""); exit }
        for (e in order) names[order[e]] = e
        for (i = 1; i <= events; i++) printf "%s%s %.3f", (i > 1 ? ", " : ""), names[i], count[names[i]] / n
      }' "$work/$1.stat"
  }
  # on_cpu NAME: the threads' microseconds on CPU a call over NAME's runs
  # (all of PROFILE_REQUESTS calls).
  on_cpu() { awk '{ t += $1 } END { printf "%.2f", t / NR }' "$work/$1.cpu"; }
  # Some machines do not let perf sample (perf_event_paranoid, a
  # container's seccomp, a kernel without perf events): the part says so
  # and leaves the figures above as they are.
  if ! probe=$(perf record -q -e cpu-clock -F "$PROFILE_HZ" -p "$pid" -o "$work/probe.data" \
    -- sleep 0.2 2>&1); then
    echo "profile: perf cannot sample the broker on this machine, so this part is left out:" \
      "$(head -c 400 <<<"$probe" | tr '\n' ' ')"
    SHAPES_PROFILED=""
  else
    SHAPES_PROFILED=$SHAPES
  fi
  for shape in $SHAPES_PROFILED; do
    clients=${shape%x*}; streams=${shape#*x}
    : >"$work/health.report"; : >"$work/get_secret.report"
    : >"$work/health.cpu"; : >"$work/get_secret.cpu"
    : >"$work/health.stat"; : >"$work/get_secret.stat"
    # Warm both paths, unsampled.
    h2load_run "$pid" "$port" "$HEALTH" health "$clients" "$streams" >/dev/null
    h2load_run "$pid" "$port" "$GET_SECRET" get_secret "$clients" "$streams" >/dev/null
    for round in $(seq "$PROFILE_ROUNDS"); do
      if (( round % 2 )); then
        perf_record_run health "$HEALTH" health "$clients" "$streams"
        perf_record_run get_secret "$GET_SECRET" get_secret "$clients" "$streams"
      else
        perf_record_run get_secret "$GET_SECRET" get_secret "$clients" "$streams"
        perf_record_run health "$HEALTH" health "$clients" "$streams"
      fi
    done
    calls=$((PROFILE_REQUESTS * PROFILE_ROUNDS))
    echo "profile $shape (perf cpu-clock, $PROFILE_ROUNDS runs of $PROFILE_REQUESTS calls each; the broker's threads, kernel included):"
    python3 scripts/bench_profile.py "$PROFILE_HZ" "$calls" "$work/health.report" \
      "$calls" "$work/get_secret.report"
    echo "    on CPU over the same runs (schedstat; the sampled totals above include perf's" \
      "own moments before and after): Health/Check $(on_cpu health) µs a call, GetSecret" \
      "$(on_cpu get_secret) µs a call"
    echo "    system calls and context switches a call: Health/Check $(events_a_call health);" \
      "GetSecret $(events_a_call get_secret)"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
fi
