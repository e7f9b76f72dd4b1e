"""The README's first command on a fresh copy of the checkout, the installed ``cfwrap``, and the
benchmark scripts at toy sizes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import ROOT, assert_no_secrets
from tests.tlspeer import openssl_verify


def _fresh_copy(dest: Path) -> Path:
    """Copy what a clone would hold (tracked and unignored files), without .venv or .tools."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


@pytest.mark.slow
def test_quickstart_script_on_a_fresh_copy(tmp_path):
    clone = _fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "CFWRAP_"))}

    def quickstart() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["./scripts/quickstart"], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900, check=False)  # fmt: skip

    first = quickstart()
    assert first.returncode == 0, first.stderr
    kit = clone / "nomad-tls"
    assert (clone / ".tools" / "cfssl" / "bin" / "cfssl").is_file()
    data = json.loads((kit / "manifest.json").read_text())
    schema = json.loads((clone / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    listed = {a["path"] for a in data["artifacts"]}
    assert listed == {p.name for p in kit.iterdir()} - {"manifest.json"}
    check = subprocess.run(
        [clone / ".venv" / "bin" / "cfwrap", "manifest", kit],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    verify = openssl_verify(kit / "ca.pem", kit / "global-server-nomad.pem", "server.global.nomad")
    assert verify.returncode == 0
    # Paths printed on stdout; nothing secret on either stream.
    assert str(kit / "ca.pem").removeprefix(str(clone) + "/") in first.stdout
    assert_no_secrets(first.stdout + first.stderr, (kit / "gossip.key").read_text())
    # Running it again refuses to touch the kit.
    again = quickstart()
    assert again.returncode == 4
    assert again.stderr.strip().splitlines()[-1].startswith("cfwrap: error: ")
    assert json.loads((kit / "manifest.json").read_text()) == data


@pytest.mark.slow
def test_installed_command_end_to_end(tmp_path):
    cfwrap = ROOT / ".venv" / "bin" / "cfwrap"
    made = subprocess.run(
        [cfwrap, "-v", "quickstart", "--out", tmp_path / "kit", "--region", "dc-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    # Debug logs show each cfssl call and its output, never a key.
    assert "run: " in made.stderr
    assert "gencert" in made.stderr
    assert_no_secrets(made.stdout + made.stderr, (tmp_path / "kit" / "gossip.key").read_text())
    module = subprocess.run(
        [ROOT / ".venv" / "bin" / "python", "-m", "cfwrap", "manifest", tmp_path / "kit"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert module.returncode == 0, module.stderr
    bad = subprocess.run(
        [cfwrap, "quickstart", "--out", tmp_path / "x", "--region", "a/b"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 3
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def _bench(script: str, *args: str, tmp_path: Path, **env: str) -> str:
    """Run a benchmark script at toy sizes (so it cannot rot); its stdout, after checks."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "CFWRAP_"))}
    run = subprocess.run(
        [ROOT / "scripts" / script, *args],
        env={**keep, "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
    return run.stdout


@pytest.mark.slow
def test_bench_apply_smoke(tmp_path):
    out = _bench("bench-apply", "2", "1", tmp_path=tmp_path)
    assert out.count("certs/s") == 2
    cpu = r"^CPU \(user \+ system, all processes\) (shell |cfwrap): +[\d.]+ s, +[\d.]+ ms per"
    assert len(re.findall(cpu, out, re.M)) == 2
    verdict = r"^ratio cfwrap / shell: [\d.]+x +target at most 0\.15x: (PASS|MISS)$"
    assert re.search(verdict, out, re.M)


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path):
    # BENCH_TIME empty: the getrusage fallback, the path a machine without GNU time takes.
    out = _bench("bench-scale", "1,2", tmp_path=tmp_path, BENCH_TIME="")
    assert "peak RSS from getrusage" in out
    table = [line.split() for line in out.splitlines() if re.match(r" +\d+ ", line)]
    assert [row[0] for row in table] == ["1", "2"]
    assert all(float(cell) > 0 for row in table for cell in row)
    assert re.search(r"^time grows linearly .*: (PASS|MISS)$", out, re.M)
    assert re.search(r"^memory stays flat .*: (PASS|MISS)$", out, re.M)
    assert re.search(r"^no-op memory stays flat .*: (PASS|MISS)$", out, re.M)


@pytest.mark.slow
def test_bench_signer_smoke(tmp_path):
    out = _bench("bench-signer", "8", "2", "1", tmp_path=tmp_path)
    assert re.search(r"^signer: 8 certificates, 2 processes: [\d.]+ s wall", out, re.M)
    assert re.search(r"^shell loop .*: 8 certificates: [\d.]+ s wall", out, re.M)
    assert re.search(r"^signer / shell: [\d.]+x wall, [\d.]+x CPU$", out, re.M)


@pytest.mark.slow
def test_bench_quickstart_smoke(tmp_path):
    out = _bench("bench-quickstart", "1", tmp_path=tmp_path)
    assert re.search(r"^ratio cfwrap / shell: [\d.]+x +\(issue 11: at most 4x\)$", out, re.M)
    floor = r"^floor: python importing BaseModel, sh, cryptography\.x509: +[\d.]+ ms = [\d.]+x"
    assert re.search(floor, out, re.M)
