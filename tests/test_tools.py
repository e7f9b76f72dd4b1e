"""Finding cfssl, refusing old or broken ones, and cfssl's silent failures (real and fake)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cfwrap import tools
from cfwrap.errors import ExitCode, ToolFailedError
from cfwrap.runner import Call, failure_reason, redact, run
from tests.conftest import CFSSL_DIR, OLD_CFSSL_DIR, ROOT, snapshot


@pytest.fixture(scope="session")
def old_cfssl_dir() -> Path:
    """Debian 12's own golang-cfssl 1.2.0, fetched like the real one (the thing users have)."""
    if not (OLD_CFSSL_DIR / "cfssl").is_file():
        subprocess.run(
            [
                ROOT / "scripts" / "install-cfssl",
                "--suite",
                "bookworm",
                "--want",
                "1.2.0",
                "--dest",
                OLD_CFSSL_DIR.parent,
            ],
            check=True,
        )
    return OLD_CFSSL_DIR


def _fake(folder: Path, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "cfssl"
    # A fake that claims to be 1.6.5 when asked, then misbehaves on gencert.
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = version ]; then echo "Version: 1.6.5"; exit 0; fi\n' + script
    )
    fake.chmod(0o755)
    return folder


def test_project_cfssl_is_found_with_package_and_hash():
    tool = tools.find("cfssl")
    assert tool.path == CFSSL_DIR / "cfssl"
    assert tool.package == "golang-cfssl"
    assert tool.version is not None
    assert tool.version.startswith("1.6.5")
    meta = json.loads((CFSSL_DIR.parent / "package.json").read_text())
    assert tool.sha256 == meta["sha256"]["cfssl"]


def test_version_command_reports_cfssl(cli):
    result = cli("--version")
    assert result.code == 0
    info = json.loads(result.out)
    assert info["cfssl"]["version"].startswith("1.6.5")
    assert len(info["cfssl"]["sha256"]) == 64


def test_explicit_folder_and_environment_win(monkeypatch, tmp_path):
    copy = tmp_path / "bin"
    copy.mkdir()
    shutil.copy2(CFSSL_DIR / "cfssl", copy / "cfssl")
    tool = tools.find("cfssl", directory=copy)
    assert tool.path == copy / "cfssl"
    assert tool.package is None  # no package.json or dpkg record: asked by behaviour
    assert tool.version == "1.6+ (dev build)"
    monkeypatch.setenv(tools.ENV_DIR, str(copy))
    assert tools.find("cfssl").path == copy / "cfssl"


def test_missing_explicit_folder_is_an_error_not_a_fallback(cli, tmp_path):
    result = cli("--cfssl-dir", tmp_path, "quickstart", "--out", tmp_path / "kit")
    assert result.code == ExitCode.TOOL_MISSING
    assert "install-cfssl" in result.err
    assert list(tmp_path.iterdir()) == []


def test_debian_12_cfssl_is_refused_by_package(cli, tmp_path, old_cfssl_dir):
    result = cli("--cfssl-dir", old_cfssl_dir, "quickstart", "--out", tmp_path / "kit")
    assert result.code == ExitCode.TOOL_MISSING
    line = result.err.strip()
    assert "golang-cfssl 1.2.0" in line
    assert "needs cfssl 1.6" in line
    assert "./scripts/install-cfssl" in line
    assert list(tmp_path.iterdir()) == []


def test_debian_12_cfssl_is_refused_by_its_version_output(cli, tmp_path, old_cfssl_dir):
    loose = tmp_path / "bin"
    loose.mkdir()
    shutil.copy2(old_cfssl_dir / "cfssl", loose / "cfssl")  # no package.json beside it
    result = cli("--cfssl-dir", loose, "quickstart", "--out", tmp_path / "kit")
    assert result.code == ExitCode.TOOL_MISSING
    assert "version 1.2.0" in result.err


@pytest.mark.parametrize(
    ("script", "needle"),
    [
        # cfssl's real silent failure: an error on stderr, nothing on stdout, exit 0.
        ('echo "[ERROR] cannot sign without a CA" >&2; exit 0\n', "printed nothing"),
        ("echo 'not json at all'; exit 0\n", "not the JSON object"),
        ('echo \'{"cert":"garbage"}\'; exit 0\n', "no valid 'cert' PEM"),
        ('echo \'{"code":2400,"message":"invalid curve"}\' >&2; exit 1\n', "invalid curve"),
    ],
    ids=["silent-empty", "garbage", "missing-fields", "json-error"],
)
def test_fake_cfssl_failures_are_named_and_write_nothing(cli, tmp_path, script, needle):
    fake = _fake(tmp_path / "fake", script)
    work = tmp_path / "work"
    work.mkdir()
    result = cli("--cfssl-dir", fake, "quickstart", "--out", work / "kit")
    assert result.code == ExitCode.TOOL_FAILED
    lines = result.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cfwrap: error: cfssl failed: ")
    assert needle in lines[0]
    assert "Traceback" not in result.err
    assert snapshot(work) == {}


def test_unknown_profile_is_refused_before_cfssl_runs(kits):
    from cfwrap import cfssl
    from cfwrap.errors import InputError
    from cfwrap.specs import CertSpec, signing_config

    spec = CertSpec(role="server")
    with pytest.raises(InputError, match="cfssl would silently use the default"):
        cfssl.gencert(
            tools.find("cfssl"),
            ca_cert=Path("ca.pem"),
            ca_key=Path("ca-key.pem"),
            config_file=Path("cfssl.json"),
            config=signing_config([spec]),
            profile="servr",
            csr=spec.csr(),
        )


def test_runner_keeps_cfssls_own_message():
    call = Call.of(
        [CFSSL_DIR / "cfssl", "gencert", "-initca", "-"],
        stdin=b'{"CN":"x","key":{"algo":"ecdsa","size":123}}',
    )
    with pytest.raises(ToolFailedError) as caught:
        run(call)
    assert caught.value.returncode == 1
    assert "invalid" in str(caught.value).lower()


def test_missing_binary_is_tool_missing(tmp_path):
    from cfwrap.errors import ToolMissingError

    with pytest.raises(ToolMissingError):
        run(Call.of([tmp_path / "nope"]))


def test_redact_removes_keys_from_tool_output():
    pem = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n"
    out = redact(b'{"cert":"C","key":"-----BEGIN EC PRIVATE KEY-----\\nabc","csr":"R"}\n' + pem)
    assert b"PRIVATE KEY-----" not in out
    assert b"MHcCAQEE" not in out
    assert b"abc" not in out
    assert failure_reason(b"2026/01/01 [INFO] x\n2026/01/01 [ERROR] it broke\n") == "it broke"


def test_a_large_rsa_key_gets_the_time_it_takes():
    # helper-28: three RSA 8192 leaves made at once on two cores outran the 120 s timeout.
    from cfwrap import cfssl
    from cfwrap.models import CSR, KeySpec
    from cfwrap.runner import DEFAULT_TIMEOUT

    tool = tools.find("cfssl")
    sizes = {("ecdsa", 256): DEFAULT_TIMEOUT, ("rsa", 2048): DEFAULT_TIMEOUT,
             ("rsa", 4096): 300.0, ("rsa", 8192): 1200.0}  # fmt: skip
    for (algo, size), timeout in sizes.items():
        csr = CSR(CN="x", key=KeySpec(algo=algo, size=size))
        assert cfssl.initca(tool, csr).timeout == timeout
