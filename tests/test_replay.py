"""`cfwrap replay`: published guides run for real, recorded, and judged by Nomad's rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509

from cfwrap.errors import ExitCode
from tests.conftest import CFSSL_DIR, ROOT, snapshot
from tests.tlspeer import openssl_verify

SEED_FILES = {
    "ca.pem",
    "ca-key.pem",
    "ca.csr",
    "nomad.pem",
    "nomad-key.pem",
    "nomad.csr",
    "nomad-csr.json",
}


def _private_key_bodies(folder: Path) -> list[str]:
    """Base64 lines of every private key the replay made (to look for in transcripts)."""
    bodies = []
    for path in folder.glob("*-key.pem"):
        bodies += [line for line in path.read_text().splitlines() if not line.startswith("-----")]
    return bodies


def _assert_transcripts_hold_no_keys(out: Path) -> None:
    texts = (out / "transcript.md").read_text() + (out / "transcript.json").read_text()
    assert "PRIVATE KEY" not in texts
    for line in _private_key_bodies(out / "files"):
        assert line not in texts


@pytest.fixture(scope="module")
def seed_replay(tmp_path_factory) -> tuple[int, Path, str]:
    from cfwrap.cli import main

    out = tmp_path_factory.mktemp("replay") / "seed"
    code = main(["replay", "nomad-encryption-2017", "--out", str(out)])
    return code, out, ""


def test_seed_guide_yields_exactly_its_files_and_the_finding(seed_replay):
    code, out, _ = seed_replay
    assert code == ExitCode.VERIFY_FAILED
    assert {p.name for p in (out / "files").iterdir()} == SEED_FILES
    assert {p.name for p in out.iterdir()} == {"files", "transcript.md", "transcript.json"}
    data = json.loads((out / "transcript.json").read_text())
    schema = json.loads((ROOT / "schemas" / "transcript.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    assert data["outcome"] == "findings"
    assert data["missing_files"] == []
    assert data["extra_files"] == []
    assert [s["command"] for s in data["steps"]] == [
        "cfwrap keygen --bytes 16",
        "cfssl print-defaults csr | cfssl gencert -initca - | cfssljson -bare ca",
        "cat > nomad-csr.json",
        "cfssl gencert -ca ca.pem -ca-key ca-key.pem nomad-csr.json | cfssljson -bare nomad",
    ]
    assert data["steps"][0]["stands_in_for"] == "nomad keygen"
    assert [(t["name"], t["package"]) for t in data["tools"]] == [
        ("cfssl", "golang-cfssl"),
        ("cfssljson", "golang-cfssl"),
    ]
    assert data["tools"][0]["version"].startswith("1.6.5")
    assert data["steps"][1]["exit_codes"] == [0, 0, 0]
    assert "[INFO] signed certificate" in data["steps"][1]["stderr"][1]
    created = {f["path"]: f for f in data["steps"][3]["files"]}
    assert created["nomad-key.pem"]["mode"] == "0600"
    assert created["nomad.pem"]["change"] == "created"
    findings = {(f["path"], f["check"]): f for f in data["findings"]}
    server = findings[("nomad.pem", "names.server")]
    assert "not server.global.nomad" in server["nomad_error"]
    assert ("nomad.pem", "names.both-roles") in findings
    assert findings[("step 1", "gossip.size")]["severity"] == "warning"
    probes = {p["name"]: p for p in data["probes"]}
    assert probes["rpc: client agent -> server"]["ok"] is False
    assert any(
        c.startswith(
            "cfwrap cert --ca ca.pem --ca-key ca-key.pem --role server "
            "--region global --out . --force"
        )
        for c in data["corrections"]
    )
    markdown = (out / "transcript.md").read_text()
    assert (
        "$ cfssl gencert -ca ca.pem -ca-key ca-key.pem nomad-csr.json | cfssljson -bare nomad"
        in markdown
    )
    assert "not server.global.nomad" in markdown
    assert "## Corrected commands" in markdown
    # What the guide made really is what the finding says.
    cert = x509.load_pem_x509_certificate((out / "files" / "nomad.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "server.regionglobal.nomad",
        "client.regionglobal.nomad",
    ]


def test_seed_transcripts_hold_no_key_material(seed_replay):
    _, out, _ = seed_replay
    _assert_transcripts_hold_no_keys(out)
    text = (out / "transcript.json").read_text()
    assert "[gossip key, 16 bytes, not shown]" in text


def test_corrected_guide_replays_clean_with_handshakes(cli, tmp_path):
    out = tmp_path / "corrected"
    result = cli("replay", "nomad-cfssl-corrected", "--out", out)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [str(out / "transcript.md"), str(out / "transcript.json")]
    data = json.loads((out / "transcript.json").read_text())
    assert data["outcome"] == "ok"
    assert data["findings"] == []
    assert data["missing_files"] == []
    assert data["extra_files"] == []
    probes = data["probes"]
    assert len(probes) == 8
    assert all(p["as_expected"] for p in probes)
    assert {p["name"] for p in probes if p["ok"]} == {
        "rpc: client agent -> server",
        "https: cli -> server as localhost",
        "https: cli -> server as 127.0.0.1",
        "api: cli -> client agent",
    }
    _assert_transcripts_hold_no_keys(out)
    files = out / "files"
    verify = openssl_verify(
        files / "nomad-agent-ca.pem", files / "server.pem", "server.global.nomad"
    )
    assert verify.returncode == 0


def test_guide_with_a_schema_error_names_the_field(cli, tmp_path):
    guide = tmp_path / "bad.toml"
    text = (ROOT / "cfwrap" / "replay" / "guides" / "nomad-encryption-2017.toml").read_text()
    guide.write_text(text.replace('kind = "write"', 'kind = "wirte"'))
    result = cli("replay", guide, "--out", tmp_path / "out")
    assert result.code == ExitCode.INPUT
    line = result.err.strip()
    assert line.startswith(f"cfwrap: error: {guide}: steps/2")
    assert "wirte" in line
    assert not (tmp_path / "out").exists()
    guide.write_text(
        text.replace(
            'pipeline = [["cfwrap", "keygen", "--bytes", "16"]]', 'pipeline = "cfwrap keygen"'
        )
    )
    result = cli("replay", guide, "--print")
    assert result.code == ExitCode.INPUT
    assert "steps/0/pipeline" in result.err


MISSING_TOOL_GUIDE = """
schema_version = 1
name = "needs-nomad"
title = "A guide that needs nomad"
source = "test"
expected_files = ["ca.pem"]

[[steps]]
kind = "run"
say = "make a CA"
pipeline = [["cfssl", "print-defaults", "csr"], ["cfssl", "gencert", "-initca", "-"],
            ["cfssljson", "-bare", "ca"]]

[[steps]]
kind = "run"
say = "generate a gossip key with nomad itself"
pipeline = [["nomad-not-installed-here", "keygen"]]

[[steps]]
kind = "run"
say = "never reached"
pipeline = [["cfssl", "version"]]
"""


def test_step_whose_tool_is_missing_stops_cleanly(cli, tmp_path):
    guide = tmp_path / "g.toml"
    guide.write_text(MISSING_TOOL_GUIDE)
    out = tmp_path / "out"
    result = cli("replay", guide, "--out", out)
    assert result.code == ExitCode.TOOL_MISSING
    assert len(result.err.strip().splitlines()) == 1
    assert "nomad-not-installed-here" in result.err
    data = json.loads((out / "transcript.json").read_text())
    assert data["outcome"] == "tool-missing"
    assert [s["number"] for s in data["steps"]] == [1, 2]
    assert data["steps"][1]["ok"] is False
    assert {p.name for p in (out / "files").iterdir()} == {"ca.pem", "ca-key.pem", "ca.csr"}


SILENT_FAILURE_GUIDE = """
schema_version = 1
name = "forgot-the-ca"
title = "cfssl gencert without -ca"
source = "test"
expected_files = ["nomad.pem"]

[[steps]]
kind = "run"
say = "issue without a CA: cfssl logs an error, prints nothing and exits 0"
pipeline = [["echo", '{"CN":"server.global.nomad"}'], ["cfssl", "gencert", "-"],
            ["cfssljson", "-bare", "nomad"]]
"""


def test_failing_step_stops_with_a_transcript(cli, tmp_path):
    guide = tmp_path / "g.toml"
    guide.write_text(SILENT_FAILURE_GUIDE)
    out = tmp_path / "out"
    result = cli("replay", guide, "--out", out)
    assert result.code == ExitCode.TOOL_FAILED
    assert "`cfssljson` exited 1" in result.err
    data = json.loads((out / "transcript.json").read_text())
    assert data["outcome"] == "step-failed"
    step = data["steps"][0]
    assert step["exit_codes"] == [0, 0, 1]
    assert "need a CA certificate" in step["stderr"][1]
    assert "unexpected end of JSON input" in step["stderr"][2]
    assert "exit 0, 0, 1 in " in (out / "transcript.md").read_text()


def test_existing_output_is_refused(cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    before = snapshot(tmp_path)
    result = cli("replay", "nomad-encryption-2017", "--out", tmp_path / "out")
    assert result.code == ExitCode.CONFLICT
    assert snapshot(tmp_path) == before


def test_list_and_usage(cli):
    result = cli("replay", "--list")
    assert result.out.split() == ["nomad-cfssl-corrected", "nomad-encryption-2017"]
    assert cli("replay", "nomad-encryption-2017").code == ExitCode.USAGE
    assert cli("replay", "no-such-guide", "--print").code == ExitCode.INPUT


@pytest.mark.slow
def test_printed_script_runs_and_makes_the_same_files(cli, tmp_path):
    result = cli("replay", "nomad-encryption-2017", "--print")
    script = tmp_path / "guide.sh"
    script.write_text(result.out)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cfwrap").write_text(f'#!/bin/sh\nexec {sys.executable} -m cfwrap "$@"\n')
    (bin_dir / "cfwrap").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{CFSSL_DIR}:{os.environ['PATH']}"}
    ran = subprocess.run(
        ["bash", script], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert {p.name for p in work.iterdir()} == SEED_FILES
