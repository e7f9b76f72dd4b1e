"""Bad input: one clear line, a named exit code, no traceback, nothing created or changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cfwrap.errors import ExitCode
from tests.conftest import snapshot


def _assert_one_clear_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cfwrap: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


QUICKSTART_CASES = [
    (["--region", "a/b"], ExitCode.INPUT, "path separator"),
    (["--region", ".."], ExitCode.INPUT, "'..'"),
    (["--region", "../etc"], ExitCode.INPUT, "'..'"),
    (["--region", "eu_west"], ExitCode.INPUT, "not a DNS label"),
    (["--region", "a" * 64], ExitCode.INPUT, "63"),
    (["--region", "a" * 52], ExitCode.INPUT, "at most 51"),
    (["--region", ""], ExitCode.INPUT, "empty region"),
    (["--region", "ünicode"], ExitCode.INPUT, "punycode"),
    (["--dns", "*.example.com"], ExitCode.INPUT, "wildcard"),
    (["--dns", "nomad.example.com."], ExitCode.INPUT, "trailing dot"),
    (["--dns", "a..example.com"], ExitCode.INPUT, "empty label"),
    (["--dns", "server.global.nomad"], ExitCode.INPUT, "one role"),
    (["--dns", "x/y.example.com"], ExitCode.INPUT, "path separator"),
    (["--dns", "10.0.0.5"], ExitCode.INPUT, "give addresses with --ip"),
    (["--ip", "1.2.3"], ExitCode.INPUT, "--ip"),
    (["--key-algo", "dsa"], ExitCode.USAGE, "invalid choice"),
    (["--key-algo", "ed25519"], ExitCode.USAGE, "invalid choice"),
    (["--key-size", "1024"], ExitCode.INPUT, "256, 384 or 521"),
    (["--key-algo", "rsa", "--key-size", "1024"], ExitCode.INPUT, "2048 to 8192"),
    (["--expiry=-1h"], ExitCode.INPUT, "negative"),
    (["--expiry", "abc"], ExitCode.INPUT, "not a duration"),
    (["--expiry", "1y"], ExitCode.INPUT, "not a duration"),
    (["--expiry", "0h"], ExitCode.INPUT, "shorter than"),
    (["--expiry", "9999999h"], ExitCode.INPUT, "longer than"),
    (["--expiry", "50000h"], ExitCode.INPUT, "outlive its CA"),
    (["--ca-expiry", "abc"], ExitCode.INPUT, "not a duration"),
    (["--gossip-bytes", "20"], ExitCode.USAGE, "invalid choice"),
    (["--no-such-flag"], ExitCode.USAGE, "unrecognized"),
]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    QUICKSTART_CASES,
    ids=[" ".join(c[0])[:40] for c in QUICKSTART_CASES],
)
def test_quickstart_refuses_bad_input_before_anything_runs(cli, tmp_path, args, code, needle):
    before = snapshot(tmp_path)
    result = cli("quickstart", "--out", tmp_path / "kit", *args)
    assert result.code == code
    _assert_one_clear_line(result.err, needle)
    assert result.out == ""
    assert snapshot(tmp_path) == before


def test_existing_output_is_not_touched_without_force(cli, kits, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(kits["global"], kit)
    before = snapshot(tmp_path)
    result = cli("quickstart", "--out", kit)
    assert result.code == ExitCode.CONFLICT
    _assert_one_clear_line(result.err, "already exists", "--force")
    assert snapshot(tmp_path) == before


def test_force_replaces_a_kit_and_keeps_the_old_one(cli, kits, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(kits["global"], kit)
    old_ca = (kit / "ca.pem").read_bytes()
    result = cli("quickstart", "--out", kit, "--force")
    assert result.code == 0, result.err
    assert (kit / "ca.pem").read_bytes() != old_ca
    (backup,) = tmp_path.glob("kit.replaced-*")
    assert (backup / "ca.pem").read_bytes() == old_ca
    assert (backup / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit", backup.name]


def test_output_symlink_is_refused(cli, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "kit").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    result = cli("quickstart", "--out", tmp_path / "kit")
    assert result.code == ExitCode.CONFLICT
    _assert_one_clear_line(result.err, "symlink")
    assert snapshot(tmp_path) == before


def test_missing_parent_folder_is_refused(cli, tmp_path):
    result = cli("quickstart", "--out", tmp_path / "no" / "kit")
    assert result.code == ExitCode.CONFLICT
    _assert_one_clear_line(result.err, "not an existing folder")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def ca_files(kits) -> tuple[Path, Path]:
    kit = kits["global"]
    return kit / "ca.pem", kit / "ca-key.pem"


def _cert_args(ca: Path, key: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["cert", "--ca", ca, "--ca-key", key, "--role", "server", "--out", out, *extra]


def test_cert_with_missing_ca_file(cli, tmp_path, ca_files):
    result = cli(*_cert_args(tmp_path / "nope.pem", ca_files[1], tmp_path / "out"))
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "nope.pem", "No such file")
    assert list(tmp_path.iterdir()) == []


def test_cert_with_leaf_as_ca(cli, tmp_path, kits):
    kit = kits["global"]
    result = cli(
        *_cert_args(
            kit / "global-server-nomad.pem", kit / "global-server-nomad-key.pem", tmp_path / "out"
        )
    )
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "not a CA certificate")
    assert list(tmp_path.iterdir()) == []


def test_cert_with_ca_key_that_does_not_match(cli, tmp_path, ca_files, other_kit):
    result = cli(*_cert_args(ca_files[0], other_kit / "ca-key.pem", tmp_path / "out"))
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "does not belong")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "not-pem", "encrypted"])
def test_cert_with_damaged_ca_files(cli, tmp_path, ca_files, damage):
    ca, key = ca_files
    bad = tmp_path / "bad.pem"
    if damage == "truncated":
        bad.write_bytes(ca.read_bytes()[:200])
        args = _cert_args(bad, key, tmp_path / "out")
    elif damage == "not-pem":
        bad.write_text("hello\n")
        args = _cert_args(bad, key, tmp_path / "out")
    else:
        bad.write_text(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
        )
        args = _cert_args(ca, bad, tmp_path / "out")
    before = snapshot(tmp_path)
    result = cli(*args)
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "bad.pem")
    assert snapshot(tmp_path) == before


def test_cert_that_would_outlive_its_ca(cli, tmp_path, ca_files):
    result = cli(*_cert_args(*ca_files, tmp_path / "out", "--expiry", "50000h"))
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "outlive its CA")
    assert list(tmp_path.iterdir()) == []


def test_cert_refuses_existing_files_without_force(cli, tmp_path, ca_files):
    out = tmp_path / "out"
    assert cli(*_cert_args(*ca_files, out)).code == 0
    before = snapshot(tmp_path)
    result = cli(*_cert_args(*ca_files, out))
    assert result.code == ExitCode.CONFLICT
    _assert_one_clear_line(result.err, "already exists")
    assert snapshot(tmp_path) == before


def test_cli_certificate_takes_no_server_names(cli, tmp_path, ca_files):
    args = [
        "cert",
        "--ca",
        ca_files[0],
        "--ca-key",
        ca_files[1],
        "--role",
        "cli",
        "--out",
        tmp_path / "out",
        "--dns",
        "x.example.com",
    ]
    result = cli(*args)
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "cli certificate")
    assert list(tmp_path.iterdir()) == []


def test_ca_from_a_csr_json_with_unknown_keys_is_refused(cli, tmp_path):
    csr = tmp_path / "ca-csr.json"
    csr.write_text('{"CN": "My CA", "key": {"algo": "ecdsa", "size": 256}, "hots": ["x"]}')
    before = snapshot(tmp_path)
    result = cli("ca", "--out", tmp_path / "ca", "--csr", csr)
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "hots", "Extra inputs are not permitted")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cn", ["", "x" * 65])
def test_ca_with_a_bad_common_name(cli, tmp_path, cn):
    result = cli("ca", "--out", tmp_path / "ca", "--cn", cn)
    assert result.code == ExitCode.INPUT
    _assert_one_clear_line(result.err, "--cn")
    assert list(tmp_path.iterdir()) == []


def test_no_command_prints_help_and_exits_usage(cli):
    result = cli()
    assert result.code == ExitCode.USAGE
    assert "quickstart" in result.err
