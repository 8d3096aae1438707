"""scripts/bench_profile.py, the benchmark's profile by part: given two
`perf report` listings it must put each function in its part (by the crate
path that comes first in its name) and turn samples into microseconds a
call. The benchmark itself is not run by the suite (it is timed); its
arithmetic and grouping are checked here on listings of a known content.
"""

from __future__ import annotations

import re
import subprocess
import sys

import support

SCRIPT = support.REPO_ROOT / "scripts" / "bench_profile.py"

# As `perf report -q --stdio --no-children -g none --sort dso,sym -n`
# prints them: percent, samples, object, [k] or [.], function.
HEALTH = """\
    50.00%           500  [kernel.kallsyms]  [k] tcp_sendmsg_locked
    30.00%           300  secrets-broker     [.] h2::proto::connection::Connection<T,P,B>::poll
    20.00%           200  secrets-broker     [.] <tonic_health::server::HealthService as tonic_health::generated::grpc_health_v1::health_server::Health>::check::{{closure}}
"""
GET_SECRET = """\
    40.00%           600  [kernel.kallsyms]  [k] tcp_sendmsg_locked
    20.00%           300  secrets-broker     [.] h2::proto::connection::Connection<T,P,B>::poll
    10.00%           150  secrets-broker     [.] <&secrets_broker::telemetry::writer::BufferedLog as std::io::Write>::write
     5.00%            75  secrets-broker     [.] <dashmap::DashMap<K,V,S> as dashmap::t::Map<K,V,S>>::_get
     5.00%            75  secrets-broker     [.] core::ptr::drop_in_place<tower::util::map_future::MapFuture<secrets_broker::api::routes::SecretsRoutes>>
    10.00%           150  libc.so.6          [.] __memmove_avx512_unaligned_erms
    10.00%           150  secrets-broker     [.] secrets_broker::api::secrets::SecretsApi::get_secret_now
"""


def run_profile(tmp_path, hz, calls_health, calls_get):
    health = tmp_path / "health.report"
    get_secret = tmp_path / "get_secret.report"
    health.write_text(HEALTH)
    get_secret.write_text(GET_SECRET)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(hz), str(calls_health), str(health), str(calls_get), str(get_secret)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {}
    for line in done.stdout.splitlines():
        # "    part name     1.00     2.00   +1.00"
        match = re.match(r"^    (\S.*?)\s+(-?[0-9.]+)\s+(-?[0-9.]+)\s+([+-][0-9.]+)", line)
        if match and not line.startswith("      "):
            rows[match.group(1)] = tuple(float(x) for x in match.group(2, 3, 4))
    return rows, done.stdout


def test_samples_become_microseconds_a_call_by_part(tmp_path):
    # 100,000 samples a second: a sample is 10 µs; over 10 calls, 1 µs a call.
    rows, out = run_profile(tmp_path, 100_000, 10, 10)
    assert rows["kernel (network, scheduling)"] == (500.0, 600.0, 100.0), out
    assert rows["h2, hyper, http"] == (300.0, 300.0, 0.0), out
    assert rows["Health's handler"] == (200.0, 0.0, -200.0), out
    assert rows["audit line"] == (0.0, 150.0, 150.0), out
    assert rows["cache lookup"] == (0.0, 75.0, 75.0), out
    # The first crate path in the name decides: a tower future that wraps
    # the broker's route is tower's.
    assert rows["tower, axum"] == (0.0, 75.0, 75.0), out
    assert rows["libc memcpy, memcmp"] == (0.0, 150.0, 150.0), out
    assert rows["GetSecret's handler, metrics"] == (0.0, 150.0, 150.0), out
    assert rows["all"] == (1000.0, 1500.0, 500.0), out
    assert "GetSecret / Health/Check 1.500" in out
    # Parts are listed by what GetSecret adds, most first.
    parts = [name for name in rows if name != "all"]
    extras = [rows[name][2] for name in parts]
    assert extras == sorted(extras, reverse=True), out


def test_each_side_is_divided_by_its_own_calls(tmp_path):
    rows, out = run_profile(tmp_path, 100_000, 10, 20)
    assert rows["h2, hyper, http"] == (300.0, 150.0, -150.0), out
    assert rows["all"] == (1000.0, 750.0, -250.0), out
