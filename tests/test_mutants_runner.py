"""Tests that kill mutmut's survivors in cfwrap/runner.py (scripts/mutation runner).

Keys come from cryptography and their private numbers are written out in hex here; processes are
judged by /proc, not by the runner's own bookkeeping.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from cfwrap import runner
from cfwrap.errors import ToolFailedError


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _minimal_hex(number: int) -> str:
    return format(number, "x").rjust((number.bit_length() + 7) // 8 * 2, "0")


def _children() -> list[int]:
    """This process's child processes, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == os.getpid():
                found.append(int(entry.name))
    return found


def test_stop_all_kills_a_running_tool_at_once():
    before = set(_children())
    failures: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(runner.Call.of(["sleep", "30"]))
        except ToolFailedError as e:
            failures.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while not set(_children()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(_children()) - before, "sleep never started"
    time.sleep(0.5)  # the runner registers the tool just after it forks
    started = time.monotonic()
    runner.stop_all()
    thread.join(10)
    assert time.monotonic() - started < 5
    assert [str(e) for e in failures] == ["sleep failed: killed by signal 9"]
    assert not set(_children()) - before
    runner.stop_all()  # nothing left to stop: harmless


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (b"", "no error message"),
        (b"\n  \n", "no error message"),
        (b'noise\n{"code":2400,"message":"invalid curve"}\n', "invalid curve"),
        # The last JSON line that has a message wins; a broken one is passed over.
        (b'{"message":"first"}\n{"message":"second"}\n{not json\n', "second"),
        (b'{"message":"kept"}\n{"code":1}\n', "kept"),
        (b'{"message":""}\n[ERROR] empty message skipped\n', "empty message skipped"),
        (b'{"message":5}\nplain last line\n', "plain last line"),
        (b"[INFO] fine\n[ERROR] bad thing\n[INFO] later\n", "bad thing"),
        (b"[CRITICAL] worse\n", "worse"),
        (b"first\nlast \xff line\n", "last \ufffd line"),
        (b"x" * 300, "x" * 300),
        (b"y" * 301, "y" * 300 + "... (301 characters)"),
        (b"tab\there bell\x07", "tab\there bell\\x07"),
    ],
)
def test_failure_reason_picks_the_line_that_says_why(stderr, reason):
    assert runner.failure_reason(stderr) == reason


def test_a_remembered_text_secret_of_sixteen_bytes_is_removed():
    runner.remember_secret("sixteen-byte-val")
    runner.remember_secret(b"  fifteen-bytes  ")  # stripped: too short to remember
    assert runner.redact(b"a sixteen-byte-val b fifteen-bytes") == (
        b"a [secret removed] b fifteen-bytes"
    )


def _key_with_whole_bytes() -> ec.EllipticCurvePrivateKey:
    """An EC key whose private value fills whole bytes (no spare leading zero bits)."""
    while True:
        key = ec.generate_private_key(ec.SECP256R1())
        if key.private_numbers().private_value.bit_length() % 8 == 0:
            return key


def test_private_numbers_of_every_key_type_are_removed_in_hex():
    ec_key = _key_with_whole_bytes()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dsa_key = dsa.generate_private_key(key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for key in (ec_key, rsa_key, dsa_key, ed_key):
        assert runner.remember_private_keys(_pem(key)) == 1
    r = rsa_key.private_numbers()
    numbers = [ec_key.private_numbers().private_value, r.d, r.p, r.q, r.dmp1, r.dmq1, r.iqmp,
               dsa_key.private_numbers().x]  # fmt: skip
    shown = [_minimal_hex(n) for n in numbers]
    raw = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()
    for value in [*shown, raw]:
        colons = ":".join(value[i : i + 2] for i in range(0, len(value), 2))
        for form in (value, value.upper(), colons):
            out = runner.redact(f"dump: {form} end".encode())
            assert value[4:-4].encode() not in out.lower(), form
            assert out.endswith(b" end")


def test_a_fresh_secret_store_remembers_and_derives(tmp_path):
    store = runner._Secrets()
    store.add_literal(b"exactly-16-bytes")
    key = _key_with_whole_bytes()
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    store.add_key(der)
    store.add_key(der)
    literals, numbers = store.patterns()
    assert literals == [der, b"exactly-16-bytes"]
    assert len(numbers) == 1
    value = _minimal_hex(key.private_numbers().private_value)
    assert numbers[0].fullmatch(value.encode())
    assert store.patterns()[1] == numbers  # derived once, kept


def test_a_failing_pipeline_stage_is_an_error_by_default():
    stages = [runner.Call.of(["sh", "-c", "echo oops >&2; exit 3"]), runner.Call.of(["cat"])]
    with pytest.raises(ToolFailedError) as caught:
        runner.run_pipeline(stages)
    assert caught.value.returncode == 3
    assert runner.run_pipeline(stages, check=False)[0].returncode == 3


def test_a_failing_first_stage_is_named_with_its_own_message():
    stages = [runner.Call.of(["sh", "-c", "echo oops >&2; exit 3"]), runner.Call.of(["cat"])]
    with pytest.raises(ToolFailedError) as caught:
        runner.run_pipeline(stages)
    assert str(caught.value) == "sh failed: oops (exit 3)"
    assert [r.returncode for r in runner.run_pipeline(stages, check=False)] == [3, 0]
