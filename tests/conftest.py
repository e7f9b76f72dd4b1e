"""Shared fixtures: real cfssl 1.6.5, kits made once per session, and a CLI runner."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cfwrap.cli import main

ROOT = Path(__file__).resolve().parent.parent
CFSSL_DIR = ROOT / ".tools" / "cfssl" / "bin"
OLD_CFSSL_DIR = ROOT / ".tools" / "cfssl-1.2.0" / "bin"


@dataclass(frozen=True)
class CliResult:
    """What an in-process ``cfwrap`` run returned and printed."""

    code: int
    out: str
    err: str


@pytest.fixture(scope="session", autouse=True)
def _real_cfssl() -> Iterator[None]:
    """Point every test at the project's cfssl 1.6.5 (installed by scripts/test)."""
    if not (CFSSL_DIR / "cfssl").is_file():
        subprocess.run([ROOT / "scripts" / "install-cfssl"], check=True)
    os.environ.pop("CFWRAP_CFSSL_DIR", None)
    yield


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``cfwrap`` in-process and capture its exit code, stdout and stderr."""

    def run(*argv: str | Path) -> CliResult:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        _CAPTURED.extend((captured.out, captured.err))  # for the secret scan at the end
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Quickstart kits for the default region and for another one, made once."""
    made = {}
    for region in ("global", "eu-west-1"):
        out = tmp_path_factory.mktemp("kits") / f"kit-{region}"
        code = main(
            [
                "quickstart",
                "--out",
                str(out),
                "--region",
                region,
                "--dns",
                "nomad.example.com",
                "--ip",
                "10.0.0.5",
            ]
        )
        assert code == 0
        made[region] = out
    return made


@pytest.fixture(scope="session")
def other_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kit from an unrelated CA, for the cases that must be rejected."""
    out = tmp_path_factory.mktemp("other") / "kit"
    assert main(["quickstart", "--out", str(out)]) == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry below ``folder`` (hidden ones included) with its mode and content hash."""
    result = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        result[str(path.relative_to(folder))] = (stat.S_IMODE(info.st_mode), digest)
    return result


def cert_argv(ca_dir: Path, role: str, out: Path, *extra: str | Path) -> list[str | Path]:
    """``cfwrap cert`` arguments for a role certificate from the CA in ``ca_dir``."""
    return ["cert", "--ca", ca_dir / "ca.pem", "--ca-key", ca_dir / "ca-key.pem",
            "--role", role, "--out", out, *extra]  # fmt: skip


def assert_kit_manifest(kit: Path) -> dict[str, Any]:
    """The kit's manifest validates against the checked-in schema and matches the disk."""
    import json

    import jsonschema

    from cfwrap import manifest

    data: dict[str, Any] = json.loads((kit / "manifest.json").read_text())
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    on_disk = {p.name for p in kit.iterdir()} - {"manifest.json"}
    assert {a.path for a in manifest.load(kit).artifacts} == on_disk
    assert manifest.differences(manifest.load(kit), manifest.scan(kit)) == []
    return data


_PRIVATE = re.compile(r"PRIVATE KEY-----")


def assert_no_secrets(text: str, *secrets: str) -> None:
    """Fail when text shows a PEM private key or any of the given secret values."""
    assert not _PRIVATE.search(text), "a private key PEM block leaked"
    for secret in secrets:
        assert secret.strip() not in text, "a secret value leaked"


# The secret scan: everything the run printed (captured per test) and every file it left under
# pytest's temporary root are checked at the end for private key and gossip key material.
_CAPTURED: list[str] = []


def _runs_cfwrap(args: object) -> bool:
    """Whether a process is cfwrap (its command, ``-m cfwrap``, or a script of this checkout).

    Other tools' output is theirs: cfssl prints the keys it makes, which is its job.
    """
    argv = [os.fsdecode(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    scripts = str(ROOT / "scripts")
    return any(re.search(r"(^|[/\s])cfwrap(\s|$)", a) or a.startswith(scripts) for a in argv)


@pytest.fixture(scope="session", autouse=True)
def _scan_subprocess_output() -> Iterator[None]:
    """Send what every cfwrap subprocess printed (the command, this checkout's scripts) to the scan.

    ``subprocess.run`` and ``communicate`` both end in ``Popen.communicate``: wrapping it once
    catches every captured output, whichever test started the process.
    """
    original = subprocess.Popen.communicate

    def communicate(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> Any:
        out, err = original(self, *args, **kwargs)
        for data in (out, err) if _runs_cfwrap(self.args) else ():
            if data:
                text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                _CAPTURED.append(text)
        return out, err

    subprocess.Popen.communicate = communicate  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.communicate = original  # type: ignore[method-assign]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep every test's captured stdout, stderr and log output for the secret scan."""
    _CAPTURED.extend(text for _, text in report.sections if text)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any test output or non-secret file holds secret material."""
    from tests.secretscan import leaks

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or getattr(session.config, "workerinput", None) is not None:
        return
    root = factory.getbasetemp()
    problems = leaks(root, _CAPTURED)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(
            f"secret scan: {len(_CAPTURED)} captured outputs and the files under {root}: "
            + ("clean" if not problems else f"{len(problems)} leak(s)")
        )
        for problem in problems:
            reporter.write_line(f"  {problem}", red=True)
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
