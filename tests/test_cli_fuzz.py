"""The whole command line driven with generated argv: every command and flag, hostile values.

Whatever the argv, ``main`` returns one of the named exit codes and never lets an exception
(a traceback) out; an error is one line on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfwrap.cli import main
from cfwrap.errors import ExitCode

pytestmark = pytest.mark.slow

NAMED = {int(c) for c in ExitCode}

COMMANDS: dict[str, list[str]] = {
    "quickstart": ["--out", "--force", "--json", "--wait", "--region", "--dns", "--ip",
                   "--expiry", "--key-algo", "--key-size", "--ca-expiry", "--gossip-bytes",
                   "--tls-dir"],
    "ca": ["--out", "--force", "--json", "--wait", "--csr", "--cn", "--expiry", "--key-algo",
           "--key-size"],
    "cert": ["--ca", "--ca-key", "--role", "--out", "--force", "--json", "--wait", "--region",
             "--dns", "--ip", "--expiry", "--key-algo", "--key-size"],
    "keygen": ["--bytes", "--check", "--json"],
    "doctor": ["--ca", "--cert", "--key", "--role", "--region", "--warn-within", "--probe",
               "--connect", "--json"],
    "replay": ["--out", "--force", "--print", "--list", "--json", "--wait"],
    "manifest": ["--write", "--json", "--wait"],
}  # fmt: skip
GLOBAL = ["--version", "-v", "--cfssl-dir"]

HOSTILE = [
    "", ".", "..", "/", "*", "-", "--", "-1", "0", "nan", "inf", "1e400", "9" * 40,
    "99999999999999999999999h", "8760h", "1h", "global", "EU", "eu-west-1", "server.eu.nomad",
    "client.global.nomad", "*.example.com", "a" * 64, "a" * 300, "x\ny", "x\x00y"[:1] + "\ty",
    "\u202e", "\udcff", "${x}", "%{x}", "'; touch PWNED; '", "$(touch PWNED)", "../../etc",
    "/dev/zero", "/dev/null", "/proc/self/mem", "/etc/shadow", "server", "client", "cli", "rsa",
    "ecdsa", "256", "384", "521", "2048", "16", "32", "127.0.0.1:1", "127.0.0.1:0", "[::1]:1",
    "::1", "10.0.0.5", "1.2.3", "nomad-encryption-2017", "nomad-cfssl-corrected", "kit",
    "kit/../kit", "ca.pem", "ca-key.pem",
]  # fmt: skip

values = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    for flag in draw(st.lists(st.sampled_from(GLOBAL), max_size=2)):
        argv.append(flag)
        if flag == "--cfssl-dir":
            argv.append(draw(values))
    command = draw(st.sampled_from([*COMMANDS, "bogus"]))
    argv.append(command)
    flags = COMMANDS.get(command, [])
    if command in ("doctor", "manifest", "replay") and draw(st.booleans()):
        argv.append(draw(values))
    for _ in range(draw(st.integers(0, 6))):
        if flags and draw(st.integers(0, 9)) > 0:
            argv.append(draw(st.sampled_from(flags)))
        argv.append(draw(values))
    return argv


@settings(
    max_examples=int(os.environ.get("CFWRAP_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=argvs())
def test_any_argv_gives_a_named_exit_code_and_no_traceback(argv, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "kit").mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    code = main(argv)  # an escaping exception fails the test: that is the traceback
    captured = capsys.readouterr()
    assert code in NAMED, (argv, code, captured.err)
    assert "Traceback" not in captured.err
    if code not in (ExitCode.OK, ExitCode.VERIFY_FAILED, ExitCode.BROKEN_PIPE):
        lines = captured.err.strip().splitlines()
        # doctor and manifest may report lines before their one-line verdict
        assert lines, argv
        assert lines[-1].startswith(("cfwrap: error: ", "cfwrap: stopped")), (argv, lines)
    assert not Path(work / "PWNED").exists()
