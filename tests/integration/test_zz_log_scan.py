"""The leak scan; its file name sorts it after every other test module.

Every file under target/test-logs/ (broker, moto, CLI and proxy logs of
this run) is read, and none may contain a secret value the suite used:
support.SECRET_VALUES (the dev seed, moto seeding, the tests' secrets files,
the test PKI's private keys), plus the values of any secrets file a logged
command line names (`--secrets-file PATH` / BROKER_SECRETS_FILE=PATH) and
that still exists. Each value is looked for as is, JSON-escaped (how a JSON
log line or a Debug string shows it) and JSON-escaped twice. Values shorter
than support.MIN_SCANNED_LENGTH are skipped (and listed).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import support

SECRETS_FILE_IN_COMMAND = re.compile(r"(?:--secrets-file[ =]|BROKER_SECRETS_FILE=)(\S+)")


def forms(value: str) -> list[tuple[str, str]]:
    """The ways a value can show up in a log line."""
    found = {value: "value"}
    for ensure_ascii in (True, False):
        once = json.dumps(value, ensure_ascii=ensure_ascii)[1:-1]
        twice = json.dumps(once, ensure_ascii=ensure_ascii)[1:-1]
        found.setdefault(once, "JSON-escaped value")
        found.setdefault(twice, "twice JSON-escaped value")
    return [(what, text) for text, what in found.items()]


def scan(files: list[Path], values) -> list[str]:
    """Findings 'file: what of value' for every value (any form) in any file."""
    findings = []
    patterns = [(value, what, text.encode()) for value in sorted(values) for what, text in forms(value)]
    for path in files:
        data = path.read_bytes()
        for value, what, needle in patterns:
            if needle in data:
                line = data[: data.index(needle)].count(b"\n") + 1
                findings.append(f"{path.relative_to(path.parents[1])}:{line}: {what} of {value!r}")
    return findings


def register_logged_secrets_files(files: list[Path]) -> list[Path]:
    """Registers the values of the secrets files the logged commands name."""
    seen = []
    for path in files:
        head = path.read_bytes()[:20000].decode(errors="replace")
        for match in SECRETS_FILE_IN_COMMAND.finditer(head):
            secrets_file = Path(match.group(1))
            if secrets_file in seen or not secrets_file.is_file():
                continue
            seen.append(secrets_file)
            text = secrets_file.read_text(errors="replace")
            try:
                data = tomllib.loads(text) if secrets_file.suffix == ".toml" else json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict):
                support.register_secrets_file(data)
    return seen


def test_the_scan_finds_planted_values(tmp_path):
    """The scan itself: a value written raw, JSON-escaped or escaped twice is found."""
    value = '{"api_key":"planted-SENTINEL-ef31","note":"ünï"}'
    (tmp_path / "logs").mkdir()
    raw = tmp_path / "logs" / "raw.log"
    raw.write_text(f"INFO got {value}\n")
    escaped = tmp_path / "logs" / "escaped.log"
    escaped.write_text(json.dumps({"fields": {"message": value}}) + "\n")
    twice = tmp_path / "logs" / "twice.log"
    twice.write_text(json.dumps({"fields": {"message": json.dumps(value)}}) + "\n")
    clean = tmp_path / "logs" / "clean.log"
    clean.write_text("INFO nothing to see: planted-SENTINEL\n")
    findings = scan([raw, escaped, twice, clean], {value})
    assert [f.split(":")[0] for f in findings] == ["logs/raw.log", "logs/escaped.log", "logs/twice.log"], findings


def test_no_secret_value_in_any_log():
    support.dev_seed()                     # registers the seed, whoever used it
    files = sorted(p for p in support.LOG_DIR.rglob("*") if p.is_file())
    assert files, (
        f"no files under {support.LOG_DIR}: the scan runs after the other tests of the same run"
    )
    secrets_files = register_logged_secrets_files(files)
    values = set(support.SECRET_VALUES)
    assert values, "no secret values registered"
    findings = scan(files, values)
    print(
        f"scanned {len(files)} files for {len(values)} values "
        f"(+ {len(secrets_files)} secrets files named in logged commands); "
        f"skipped as shorter than {support.MIN_SCANNED_LENGTH}: {sorted(support.SHORT_SECRET_VALUES)}"
    )
    assert not findings, f"secret values in the test logs ({len(findings)}):\n" + "\n".join(findings[:50])
