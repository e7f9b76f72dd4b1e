"""The runner, cfwrap's one door to outside tools: bounded output, secrets removed, timeouts.

Real binaries throughout (coreutils, openssl, cfssl); the runner's own module-level state (the
secrets it has seen) is what is under test, so the tests that need a clean slate run a fresh
Python process.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cfwrap import runner
from cfwrap.errors import ToolFailedError
from cfwrap.runner import Call, redact, run, run_pipeline
from tests.conftest import ROOT, assert_no_secrets

HEAD = shutil.which("head") or "/usr/bin/head"
BASE64 = shutil.which("base64") or "/usr/bin/base64"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
SH = "/bin/sh"
MiB = 1024 * 1024
# base64 of 100,000,000 bytes, wrapped at 76 columns: 133,333,336 characters and 1,754,386 newlines.
BIG_BASE64 = 133_333_336 + 1_754_386


def test_output_over_the_cap_is_cut_and_says_so():
    last = run_pipeline([Call.of([HEAD, "-c", "100000000", "/dev/zero"]), Call.of([BASE64])])[-1]
    assert last.returncode == 0
    note = f"\n[output cut at 1 MiB; {BIG_BASE64 - MiB} bytes dropped]\n".encode()
    assert last.stdout.count(note) == 1
    assert len(last.stdout) == MiB + len(note)
    assert last.stdout_dropped == BIG_BASE64 - MiB
    head, tail = last.stdout.split(note)
    assert head == ((b"A" * 76 + b"\n") * (len(head) // 77 + 1))[: len(head)]
    assert tail.endswith(b"A" * 16 + b"==\n")  # the end stays: where a tool says what failed


def test_a_stream_without_newlines_is_cut_too():
    # sh buffers by line by default: a stream with no newline was gathered whole before.
    result = run(Call.of([HEAD, "-c", "50000000", "/dev/zero"]))
    assert len(result.stdout) < MiB + 100
    assert result.stdout_dropped == 50_000_000 - MiB


def test_stderr_is_capped_and_kept_for_the_error():
    with pytest.raises(ToolFailedError) as caught:
        run(
            Call.of(
                [
                    SH,
                    "-c",
                    f"{HEAD} -c 5000000 /dev/zero >&2; echo >&2; echo last words >&2; exit 3",
                ]
            )
        )
    error = caught.value
    assert error.returncode == 3
    assert str(error) == "sh failed: last words (exit 3)"
    assert "bytes dropped" in error.stderr
    assert len(error.stderr) < 2 * MiB


def test_a_failure_reason_is_one_bounded_line():
    with pytest.raises(ToolFailedError) as caught:
        run(Call.of([SH, "-c", "printf 'bad \\033[2J news %0500d\\n' 0 >&2; exit 1"]))
    message = str(caught.value)
    assert "\x1b" not in message and "\r" not in message and "\n" not in message
    assert message.startswith("sh failed: bad \\x1b[2J news 000")
    assert len(message) < 400


def test_small_output_is_whole_and_not_a_terminal():
    result = run(Call.of([SH, "-c", "[ -t 1 ] && echo tty || echo pipe; printf 'e\\n' >&2"]))
    assert (result.stdout, result.stderr) == (b"pipe\n", b"e\n")
    assert (result.stdout_dropped, result.stderr_dropped) == (0, 0)


def test_stdin_still_reaches_the_tool():
    assert run(Call.of(["/bin/cat"], stdin=b"fed\n")).stdout == b"fed\n"


def test_a_timeout_still_stops_a_tool_that_prints_forever():
    started = time.monotonic()
    with pytest.raises(ToolFailedError, match="no answer within 1s"):
        run(Call.of(["/usr/bin/yes"], timeout=1.0))
    assert time.monotonic() - started < 10


PEAK = """
import resource, sys
from cfwrap.runner import Call, run_pipeline
stages = [Call.of([sys.argv[1], "-c", "100000000", "/dev/zero"])]
stages += [Call.of([a]) for a in sys.argv[2:]]
last = run_pipeline(stages)[-1]
print(len(last.stdout), last.stdout_dropped)
"""
# Peak RSS is measured from a small parent: Linux keeps ru_maxrss across exec, so a process forked
# from pytest would report pytest's own size.
MEASURE = """
import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout
print(out.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.parametrize("then", [[BASE64], []], ids=["base64 lines", "no newline at all"])
def test_peak_memory_stays_near_the_cap_for_100_mb_of_output(then):
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-c", PEAK, HEAD, *then],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    ).stdout.split()
    kept, dropped, peak_kib = map(int, out)
    print(f"100 MB through the runner: peak RSS {peak_kib} KiB, {time.monotonic() - started:.2f}s")
    assert kept + dropped > 100_000_000
    assert peak_kib < 80 * 1024  # it held 100 MB twice over before the cap


KEYGEN_THEN_ECHO = """
import logging, sys
from cfwrap.runner import Call, run
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # the root: sh logs too
key = run(Call.of([sys.executable, "-m", "cfwrap", "keygen"], secret_stdout=True)).stdout
run(Call.of(["/bin/echo", "later the key shows up again:", key.decode().strip()]))
print(key.decode().strip())
"""


def test_secret_stdout_is_never_logged_and_its_value_is_removed_later():
    done = subprocess.run(
        [sys.executable, "-c", KEYGEN_THEN_ECHO],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    key = done.stdout.strip()
    assert len(base64.b64decode(key)) == 32
    assert "[secret, 45 bytes, not shown]" in done.stderr
    assert "later the key shows up again: [secret removed]" in done.stderr
    assert_no_secrets(done.stderr, key)


def test_argv_at_info_output_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="cfwrap.runner"):
        run(Call.of(["/bin/echo", "hello there"]))
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, "run: /bin/echo 'hello there'") in records
    assert any(level == logging.DEBUG and "stdout: hello there" in m for level, m in records)


def test_env_adds_variables_to_the_tools_environment_and_shows_them(caplog, monkeypatch):
    monkeypatch.setenv("CFWRAP_TEST_KEPT", "kept")
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    script = 'echo "$GOMAXPROCS $CFWRAP_TEST_KEPT"'
    call = Call.of(["/bin/sh", "-c", script], env={"GOMAXPROCS": "1"})
    with caplog.at_level(logging.INFO, logger="cfwrap.runner"):
        done = run(call)
    assert done.stdout == b"1 kept\n"  # set on top of cfwrap's own environment, not instead
    assert "run: GOMAXPROCS=1 /bin/sh -c " in caplog.text
    assert run(Call.of(["/bin/sh", "-c", script])).stdout == b" kept\n"  # cfwrap's own: untouched


@pytest.fixture
def ec_key_file(tmp_path: Path) -> tuple[Path, int]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ca-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path, key.private_numbers().private_value


def _hex_forms(number: int) -> list[str]:
    """A private number as tools print it: openssl -text's ``00:ab:..``, asn1parse's ``AB..``."""
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    plain = raw.hex()
    return [plain, plain.upper(), ":".join(f"{b:02x}" for b in raw)]


def _flat(text: str) -> str:
    return re.sub(r"[\s:]", "", text).lower()


def _pem_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("-----")]


def _openssl(*args: str | Path) -> bytes:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, check=True).stdout


def test_openssl_text_dumps_are_removed_by_pattern(ec_key_file):
    path, scalar = ec_key_file
    # Straight from openssl, not through the runner: nothing has remembered this key.
    text = redact(_openssl("ec", "-in", path, "-text", "-noout")).decode()
    assert "priv: [private key removed]" in text
    assert "pub:" in text  # the public half stays readable
    assert _hex_forms(scalar)[0] not in _flat(text)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = rsa_key.private_numbers()
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    dump = subprocess.run(
        [OPENSSL, "pkey", "-text", "-noout"], input=pem, capture_output=True, check=True
    ).stdout
    text = redact(dump).decode()
    for label in ("privateExponent", "prime1", "prime2", "exponent1", "exponent2", "coefficient"):
        assert f"{label}: [private key removed]" in text
    for number in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp):
        assert _hex_forms(number)[0][2:40] not in _flat(text)


def test_known_keys_are_removed_by_value_in_every_form(ec_key_file):
    path, scalar = ec_key_file
    assert runner.remember_private_keys(path.read_bytes()) == 1
    der = _openssl("pkey", "-in", path, "-outform", "DER")
    outputs = {
        "asn1parse": run(Call.of([OPENSSL, "asn1parse", "-in", path])).stdout,
        "one-line base64": run_pipeline(
            [Call.of([OPENSSL, "pkey", "-in", path, "-outform", "DER"]), Call.of([BASE64, "-w0"])]
        )[-1].stdout,
        "hex": run(Call.of([OPENSSL, "ec", "-in", path, "-text", "-noout"])).stdout,
        "cat": run(Call.of(["/bin/cat", path])).stdout,
        "der": run(Call.of([OPENSSL, "pkey", "-in", path, "-outform", "DER"])).stdout,
    }
    for name, output in outputs.items():
        shown = redact(output).decode("utf-8", "replace")
        assert_no_secrets(shown, *_pem_lines(path))
        for form in _hex_forms(scalar):
            assert form not in shown, name
        assert _hex_forms(scalar)[0] not in _flat(shown), name
        assert base64.b64encode(der).decode() not in shown, name
        assert der not in redact(output), name


def test_cfssl_ed25519_key_label_is_removed(tmp_path):
    # cfssl writes Ed25519 keys as "Ed25519 PRIVATE KEY" (lower case letters in the label).
    csr = json.dumps({"CN": "ed", "key": {"algo": "ed25519"}}).encode()
    cfssl = ROOT / ".tools" / "cfssl" / "bin"
    made = run(Call.of([cfssl / "cfssl", "gencert", "-initca", "-"], stdin=csr)).stdout
    key = json.loads(made)["key"]
    assert key.startswith("-----BEGIN Ed25519 PRIVATE KEY-----")
    (tmp_path / "ed-key.pem").write_text(key)
    (tmp_path / "ed-key.pem").chmod(0o600)
    shown = redact(key.encode()).decode()
    assert shown == "[private key removed]\n"
    assert_no_secrets(shown, *_pem_lines(tmp_path / "ed-key.pem"))


def test_a_lone_base64_key_is_not_logged():
    key = base64.b64encode(b"k" * 16 + b"\x01" * 8).decode()  # 24 bytes: AES-192's size
    assert redact(f"{key}\n".encode()) == b"[a base64 key, not shown]\n"
    assert redact(b"not a key\n") == b"not a key\n"


SIGTERM_GUIDE = """
schema_version = 1
name = "slow"
title = "a step that takes a while"
source = "test"
expected_files = []

[[steps]]
kind = "run"
say = "wait, and print a lot while waiting"
pipeline = [["sh", "-c", "yes | head -c 50000000; exec sleep 60"]]
"""


@pytest.mark.slow
def test_sigterm_still_stops_the_running_tool_and_rolls_back(tmp_path):
    (tmp_path / "slow.toml").write_text(textwrap.dedent(SIGTERM_GUIDE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfwrap", "replay", "slow.toml", "--out", "out"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    step: list[int] = []
    while time.monotonic() < deadline:  # wait for the step's sleep to start
        ps = subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(proc.pid)], capture_output=True, check=False
        )
        step = [int(line.split()[0]) for line in ps.stdout.splitlines() if b"sleep 60" in line
                or b"sh -c" in line]  # fmt: skip
        if step:
            break
        time.sleep(0.1)
    assert step, "the step never started"
    time.sleep(0.5)
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert err.decode().strip() == "cfwrap: stopped; nothing was left half-written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.toml"]
    # The step's own process (its sh became the sleep), not any "sleep 60" on the machine: other
    # test runs may be sleeping at the same time.
    for pid in step:
        assert _gone(pid), f"the step's process {pid} outlived cfwrap"


def _gone(pid: int, seconds: float = 5) -> bool:
    """Whether a process has exited (a zombie counts), waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --- a service's output, line by line as it is written ----------------------------------------


def test_a_services_stderr_reaches_its_consumer_line_by_line_while_it_runs():
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    script = "echo first >&2; sleep 0.5; printf 'second\\r\\nthird' >&2; sleep 0.5; echo ' end' >&2"
    service = runner.start_service(
        Call.of([SH, "-c", f"{script}; exec sleep 30"]), on_line=lines.put
    )
    try:
        # The first line comes without any output after it (sh would hold it back: it was read
        # before sh was told not to buffer) and long before the service ends.
        assert lines.get(timeout=5) == "first"
        started = time.monotonic()
        assert lines.get(timeout=5) == "second"
        assert lines.get(timeout=5) == "third end"  # a line written in two pieces is one line
        assert time.monotonic() - started >= 0.3  # handed over as written, not earlier
        assert service.alive()
        assert service.stderr_tail() == "first\nsecond\r\nthird end\n"
    finally:
        result = service.stop()
    assert result.stderr == b"first\nsecond\r\nthird end\n"
    assert lines.empty()


def test_service_lines_are_capped_and_the_last_piece_comes_at_stop():
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    size = 2 * runner.LINE_CAP + 100
    script = f"head -c {size} /dev/zero | tr '\\0' x >&2; exec sleep 30"
    service = runner.start_service(Call.of([SH, "-c", script]), on_line=lines.put)
    assert lines.get(timeout=10) == "x" * runner.LINE_CAP
    assert lines.get(timeout=10) == "x" * runner.LINE_CAP
    assert lines.empty()  # 100 bytes without a newline wait for more
    service.stop()
    assert lines.get_nowait() == "x" * 100
    assert lines.empty()


def test_service_lines_have_secrets_removed():
    secret = "f00dfeed" * 8
    runner.remember_secret(secret)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    service = runner.start_service(
        Call.of([SH, "-c", f"echo key={secret} >&2; exec sleep 30"]), on_line=lines.put
    )
    try:
        assert lines.get(timeout=5) == "key=[secret removed]"
    finally:
        service.stop()


def test_a_failing_consumer_never_blocks_the_service(tmp_path, caplog):
    seen: list[str] = []

    def consumer(line: str) -> None:
        seen.append(line)
        raise RuntimeError("the consumer broke")

    # 3 MB after the first line: more than a pipe holds, so the service blocks unless read on.
    marker = tmp_path / "wrote-it-all"
    script = f"echo one >&2; head -c 3000000 /dev/zero | tr '\\0' 'y' >&2; touch {marker}"
    service = runner.start_service(
        Call.of([SH, "-c", f"{script}; exec sleep 30"]), on_line=consumer
    )
    try:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the service was blocked on its stderr"
            time.sleep(0.05)
    finally:
        result = service.stop()
    assert seen == ["one"]
    assert isinstance(service.line_error, RuntimeError)
    assert result.stderr_dropped > 0
    assert "its output consumer failed" in caplog.text
