"""Where a call's CPU time goes, by part of the broker: the benchmark's
`profile` part (scripts/bench.sh) runs this over two `perf report` listings
of the same broker, one taken under Health/Check load and one under
GetSecret load, and prints microseconds a call for each part, kernel
included (callgrind's counts leave the kernel out), and what GetSecret
adds.

    python3 scripts/bench_profile.py HZ CALLS_A A_REPORT CALLS_B B_REPORT

A report is `perf report --stdio --no-children -g none --sort dso,sym -n`
of a `perf record -e cpu-clock -F HZ` run: each sample is 1/HZ seconds of
a thread on CPU.
"""

import collections
import re
import sys

# A function of the broker's own process goes to the part whose pattern
# occurs first in its name: `<&secrets_broker::telemetry::writer::BufferedLog
# as std::io::Write>::write` is the audit's, `<tonic::codec::encode::
# EncodeBody<T,U> as http_body::Body>::poll_frame` tonic's.
PARTS = [
    ("audit line", r"secrets_broker::(telemetry|api::audit)"),
    ("cache lookup", r"secrets_broker::cache|dashmap::"),
    ("names, policy", r"secrets_broker::(names|policy|identity)|arc_swap::"),
    (
        "answer message",
        r"secrets_broker::api::message|secrets_broker_contract|prost::",
    ),
    (
        "GetSecret's handler, metrics",
        r"secrets_broker::api|secrets_broker::metrics",
    ),
    ("Health's handler", r"tonic_health::"),
    ("the broker's gate", r"secrets_broker::transport"),
    ("tonic", r"tonic::|tonic_prost::"),
    ("h2, hyper, http", r"h2::|hyper::|hyper_util::|http::|http_body|bytes::"),
    ("tokio", r"tokio::|tokio_util::"),
    ("tower, axum", r"tower::|tower_layer::|axum::|matchit::"),
]
COMPILED = [(part, re.compile(pattern)) for part, pattern in PARTS]


def part_of(dso, symbol):
    """The part a sample's function belongs to."""
    if dso == "[kernel.kallsyms]":
        return "kernel (network, scheduling)"
    if dso == "[vdso]":
        return "clock reads (vdso)"
    if dso.startswith("libc"):
        if re.search(r"mem(move|cpy|set|cmp)", symbol):
            return "libc memcpy, memcmp"
        return "libc malloc, free, other"
    found = [
        (match.start(), part)
        for part, pattern in COMPILED
        if (match := pattern.search(symbol))
    ]
    return min(found)[1] if found else "other"


def samples_by_part(path):
    """Samples per part in one report; with the top functions kept too."""
    parts = collections.Counter()
    functions = collections.Counter()
    with open(path) as report:
        for line in report:
            # "  12.34%   1234  secrets-broker  [.] h2::...": percent,
            # samples, object, then the function after "[.] " or "[k] ".
            fields = line.split(None, 3)
            if len(fields) < 4 or not fields[0].endswith("%"):
                continue
            samples, dso = int(fields[1]), fields[2]
            symbol = fields[3].split("] ", 1)[-1].strip()
            parts[part_of(dso, symbol)] += samples
            functions[symbol] += samples
    return parts, functions


def main():
    hz = float(sys.argv[1])
    calls_a, (parts_a, functions_a) = float(sys.argv[2]), samples_by_part(sys.argv[3])
    calls_b, (parts_b, functions_b) = float(sys.argv[4]), samples_by_part(sys.argv[5])

    def a_call(samples, calls):
        return samples / hz / calls * 1e6

    def extra(counts_a, counts_b, key):
        return a_call(counts_b[key], calls_b) - a_call(counts_a[key], calls_a)

    print(f"    {'µs a call':<32}{'Health':>8} {'GetSecret':>10} {'extra':>7}")
    for part in sorted(set(parts_a) | set(parts_b), key=lambda p: -extra(parts_a, parts_b, p)):
        print(
            f"    {part:<32}{a_call(parts_a[part], calls_a):8.2f}"
            f" {a_call(parts_b[part], calls_b):10.2f} {extra(parts_a, parts_b, part):+7.2f}"
        )
    total_a = a_call(sum(parts_a.values()), calls_a)
    total_b = a_call(sum(parts_b.values()), calls_b)
    print(
        f"    {'all':<32}{total_a:8.2f} {total_b:10.2f} {total_b - total_a:+7.2f}"
        f"   GetSecret / Health/Check {total_b / total_a:.3f}"
    )
    print("    the functions that add most (µs a call: extra, Health/Check, GetSecret):")
    names = set(functions_a) | set(functions_b)
    for name in sorted(names, key=lambda n: -extra(functions_a, functions_b, n))[:12]:
        print(
            f"      {extra(functions_a, functions_b, name):+6.3f} "
            f"{a_call(functions_a[name], calls_a):6.3f} "
            f"{a_call(functions_b[name], calls_b):6.3f}  {name[:100]}"
        )


if __name__ == "__main__":
    main()
