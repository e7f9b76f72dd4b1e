"""`cfwrap replay`: published guides run for real, recorded, and judged by Nomad's rules."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509

from cfwrap.errors import ExitCode
from tests.conftest import CFSSL_DIR, ROOT, CliResult, assert_no_secrets, snapshot
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
def _what_files_are(folder: Path) -> dict[str, object]:
    """Each file as the guide's reader would compare it: mode, and for a certificate its names,
    usages and key; for a key its type; for anything else its bytes (keys and serials differ)."""
    import stat

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    facts: dict[str, object] = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
        if data.startswith(b"-----BEGIN CERTIFICATE-----"):
            cert = x509.load_pem_x509_certificate(data)
            facts[path.name] = (
                mode,
                cert.subject.rfc4514_string(),
                cert.issuer.rfc4514_string(),
                sorted(str(e.oid.dotted_string) for e in cert.extensions),
                str(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
                if path.name != "ca.pem"
                else None,
                type(cert.public_key()).__name__,
            )
        elif b"PRIVATE KEY-----" in data:
            facts[path.name] = (mode, type(load_pem_private_key(data, None)).__name__)
        elif path.suffix == ".csr":
            csr = x509.load_pem_x509_csr(data)
            facts[path.name] = (mode, csr.subject.rfc4514_string(), csr.is_signature_valid)
        else:
            facts[path.name] = (mode, data)
    return facts


def test_printed_script_runs_and_makes_the_same_files(cli, tmp_path, seed_replay):
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
    # The same files as the replay made: names, modes, certificates' names, extensions and key
    # types, the CSR JSON byte for byte (only keys and serials may differ between two runs).
    assert _what_files_are(work) == _what_files_are(seed_replay[1] / "files")


# --- Hostile guides (issue 9): injection, secrets, unbounded output, refused input ------------

GUIDE_HEAD = """
schema_version = 1
name = "hostile"
title = {title}
source = {source}
expected_files = []
corrections = {corrections}
"""


def _guide(tmp_path: Path, steps: str, **fields: object) -> Path:
    values = {"title": "a guide", "source": "test", "corrections": [], **fields}
    head = GUIDE_HEAD.format(**{k: json.dumps(v) for k, v in values.items()})
    path = tmp_path / "guide.toml"
    path.write_text(head + steps)
    return path


def _one_error_line(result: CliResult, code: ExitCode) -> str:
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfwrap: error: "), result.err
    return lines[0]


INJECTION = "\ntouch PWNED-{}\n"
RUN_STEP = """
[[steps]]
kind = "run"
say = {say}
stands_in_for = {stands_in_for}
pipeline = [["cfssl", "version"]]
"""


def _run_script(script: str, tmp_path: Path) -> Path:
    """Run a printed script with bash; cfssl is a stub, touch and the rest are real."""
    work = tmp_path / "script-run"
    work.mkdir()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("cfssl", "cfssljson", "cfwrap"):
        (stubs / tool).write_text("#!/bin/sh\nexit 0\n")
        (stubs / tool).chmod(0o755)
    (tmp_path / "guide.sh").write_text(script)
    subprocess.run(
        ["bash", tmp_path / "guide.sh"],
        cwd=work,
        env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(work)},
        capture_output=True,
        check=False,
        timeout=30,
    )
    return work


@pytest.mark.parametrize("field", ["title", "source", "say", "stands_in_for"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r", "\u2028", "\x1b"])
def test_a_control_character_in_shown_text_is_refused(cli, tmp_path, field, newline):
    values = {f: "fine" for f in ("title", "source", "say", "stands_in_for")}
    values[field] = f"harmless{newline}touch PWNED"
    steps = RUN_STEP.format(say=json.dumps(values.pop("say")), stands_in_for=json.dumps(
        values.pop("stands_in_for")))  # fmt: skip
    guide = _guide(tmp_path, steps, **values)
    result = cli("replay", guide, "--print")
    line = _one_error_line(result, ExitCode.INPUT)
    assert "control character" in line
    assert result.out == ""


def test_the_printed_script_cannot_be_broken_out_of(tmp_path):
    from cfwrap.replay.guide import Guide, RunStep, WriteStep, to_shell

    # Built without validation, as a caller in code could: the renderer alone must hold.
    content = "EOF\n$(touch PWNED-content)\n`touch PWNED-tick`\nEOF_\n"
    steps: list[RunStep | WriteStep] = [
        RunStep.model_construct(
            kind="run",
            say=INJECTION.format("say"),
            pipeline=[["cfssl", "version", INJECTION.format("arg"), "$(touch PWNED-sub)"]],
            stands_in_for=INJECTION.format("stands-in"),
            output="show",
        ),
        WriteStep.model_construct(
            kind="write",
            say="w",
            path="f.json",
            content=content,
            mode="0644",
        ),
    ]
    guide = Guide.model_construct(
        schema_version=1,
        name="hostile",
        title=INJECTION.format("title"),
        source=INJECTION.format("source") + "\rtouch PWNED-cr",
        steps=steps,
        expected_files=[],
        checks=[],
        corrections=[],
    )
    script = to_shell(guide)
    work = _run_script(script, tmp_path)
    assert sorted(p.name for p in work.iterdir()) == ["f.json"]
    assert (work / "f.json").read_text() == content
    assert "\r" not in script


def test_printed_script_of_a_refused_guide_is_never_written(cli, tmp_path):
    steps = RUN_STEP.format(say=json.dumps(INJECTION.format("say")), stands_in_for='"x"')
    guide = _guide(tmp_path, steps, title=INJECTION.format("title"))
    result = cli("replay", guide, "--print")
    _one_error_line(result, ExitCode.INPUT)
    work = _run_script(result.out, tmp_path)
    assert list(work.iterdir()) == []


FAILING_STEP = """
[[steps]]
kind = "run"
say = "a step that prints markdown and fails"
pipeline = [["sh", "-c", "printf '```\\n# not a heading\\n<script>x</script>\\n````\\n'; exit 1"]]
"""


def _blocks(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split Markdown as CommonMark does: the lines outside code fences, and each fenced block.

    A fence of N backticks closes only on a line of at least N backticks and nothing else.
    """
    outside: list[str] = []
    blocks: list[list[str]] = []
    fence = ""
    for line in lines:
        if fence:
            if line.strip().startswith(fence) and set(line.strip()) == {"`"}:
                fence = ""
            else:
                blocks[-1].append(line)
        elif line.startswith("```"):
            fence = "`" * (len(line) - len(line.lstrip("`")))
            blocks.append([])
        else:
            outside.append(line)
    return outside, blocks


def test_corrections_and_output_stay_inside_their_code_blocks(cli, tmp_path):
    corrections = ["```", "<script>alert(1)</script>", "echo `x` ````", "# not a heading"]
    guide = _guide(tmp_path, FAILING_STEP, corrections=corrections, title="<b>t</b> `x`")
    out = tmp_path / "out"
    result = cli("replay", guide, "--out", out)
    assert result.code == ExitCode.TOOL_FAILED
    outside, blocks = _blocks((out / "transcript.md").read_text().splitlines())
    assert [line for line in outside if line.startswith("#")] == [
        "# Replay: \\<b>t\\</b> \\`x\\`",
        "## Step 1: a step that prints markdown and fails",
        "## The guide's table of files",
        "## Nomad's rules",
        "## Corrected commands",
    ]
    assert not re.search(r"(?<!\\)<script>", "\n".join(outside))  # only as text: \\<script>
    assert blocks[1] == ["```", "# not a heading", "<script>x</script>", "````"]  # stdout
    assert blocks[-1] == corrections


BAD_GUIDES = {
    "not UTF-8": b'schema_version = 1\ntitle = "\xff"\n',
    "nested 10,000 deep": b"a = " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
    "nested 40 deep": b"a = " + b"[" * 40 + b"]" * 40 + b"\n",
    "an empty stage": textwrap.dedent(
        """
        schema_version = 1
        name = "x"
        title = "x"
        source = "x"
        expected_files = []
        [[steps]]
        kind = "run"
        say = "x"
        pipeline = [[]]
        """
    ).encode(),
    "NUL in argv": textwrap.dedent(
        """
        schema_version = 1
        name = "x"
        title = "x"
        source = "x"
        expected_files = []
        [[steps]]
        kind = "run"
        say = "x"
        pipeline = [["echo", "a\\u0000b"]]
        """
    ).encode(),
    "a region that is no DNS label": (
        ROOT / "cfwrap" / "replay" / "guides" / "nomad-encryption-2017.toml"
    )
    .read_bytes()
    .replace(b'region = "global"', b'region = "a\\nb"', 1),
    "2 MiB": b"# " + b"x" * (2 * 1024 * 1024) + b"\n",
}


@pytest.mark.parametrize("why", BAD_GUIDES)
def test_a_bad_guide_file_is_one_line_and_exit_3(cli, tmp_path, why):
    guide = tmp_path / "bad.toml"
    guide.write_bytes(BAD_GUIDES[why])
    for args in (["--print"], ["--out", tmp_path / "out"]):
        _one_error_line(cli("replay", guide, *args), ExitCode.INPUT)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_a_guide_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    guide = Path(kind) if kind.startswith("/") else tmp_path / "guide.toml"
    if kind == "fifo":
        os.mkfifo(guide)
    elif kind == "folder":
        guide.mkdir()
    done = subprocess.run(  # in a process of its own: reading a FIFO would block forever
        [sys.executable, "-m", "cfwrap", "replay", guide, "--print"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == ExitCode.INPUT
    assert done.stderr.startswith("cfwrap: error: ") and done.stderr.count("\n") == 1
    assert "not a regular file" in done.stderr


def test_deep_nesting_in_a_real_process_prints_no_traceback(tmp_path):
    guide = tmp_path / "deep.toml"
    guide.write_bytes(BAD_GUIDES["nested 10,000 deep"])
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", "replay", guide, "--print"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == ExitCode.INPUT
    assert done.stdout == ""
    assert (
        done.stderr == f"cfwrap: error: {guide}: nested too deeply to be a guide "
        "(more than 16 levels)\n"
    )


def _private_hex(key_file: Path) -> list[str]:
    """The key's private numbers in hex, as openssl -text and asn1parse print them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    value = key.private_numbers().private_value
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return [raw.hex(), raw.hex().upper(), ":".join(f"{b:02x}" for b in raw)]


LEAKY_STEPS = """
[[steps]]
kind = "run"
say = "a gossip key, kept in a file too (the guide does not say it is secret)"
pipeline = [["cfwrap", "keygen"], ["tee", "gossip.key"]]

[[steps]]
kind = "run"
say = "make a CA"
pipeline = [["cfssl", "print-defaults", "csr"], ["cfssl", "gencert", "-initca", "-"],
            ["cfssljson", "-bare", "ca"]]

[[steps]]
kind = "run"
say = "print the private scalar"
pipeline = [["openssl", "ec", "-in", "ca-key.pem", "-text", "-noout"]]

[[steps]]
kind = "run"
say = "parse the key"
pipeline = [["openssl", "asn1parse", "-in", "ca-key.pem"]]

[[steps]]
kind = "run"
say = "the key as one line of base64"
pipeline = [["openssl", "pkey", "-in", "ca-key.pem", "-outform", "DER"], ["base64", "-w0"]]

[[steps]]
kind = "run"
say = "print the key and the gossip key"
pipeline = [["cat", "ca-key.pem", "gossip.key"]]

[[steps]]
kind = "run"
say = "and fail, naming them"
pipeline = [["sh", "-c", "cat gossip.key >&2; openssl ec -in ca-key.pem -text >&2; exit 1"]]
"""


def test_no_secret_reaches_a_log_or_transcript_in_any_form(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("-v", "replay", _guide(tmp_path, LEAKY_STEPS), "--out", out)
    assert result.code == ExitCode.TOOL_FAILED
    files = out / "files"
    gossip_key = (files / "gossip.key").read_text().strip()
    assert len(base64.b64decode(gossip_key)) == 32
    key_lines = [
        line for line in (files / "ca-key.pem").read_text().splitlines() if "-----" not in line
    ]
    shown = {
        "log": result.err,
        "stdout": result.out,
        "transcript.md": (out / "transcript.md").read_text(),
        "transcript.json": (out / "transcript.json").read_text(),
    }
    for name, text in shown.items():
        assert_no_secrets(text, gossip_key, *key_lines)
        flat = re.sub(r"[\s:]", "", text).lower()
        for form in _private_hex(files / "ca-key.pem"):
            assert form not in text, name
            assert form.replace(":", "").lower() not in flat, name
    assert "priv: [private key removed]" in shown["transcript.md"]
    assert "stdout: [secret, 45 bytes, not shown]" in shown["log"]


def test_the_keygen_step_of_the_2017_guide_is_not_logged(cli, tmp_path):
    result = cli("-v", "replay", "nomad-encryption-2017", "--out", tmp_path / "out")
    assert result.code == ExitCode.VERIFY_FAILED
    assert "stdout: [secret, 25 bytes, not shown]" in result.err
    # No valid gossip key of any size anywhere in the log, whatever its value.
    for token in re.findall(r"[A-Za-z0-9+/]{22,44}={0,2}", result.err):
        try:
            size = len(base64.b64decode(token, validate=True))
        except ValueError:
            continue
        assert size not in (16, 24, 32) or len(token) != 4 * ((size + 2) // 3), token


BIG_STEP = """
[[steps]]
kind = "run"
say = "print 100 MB"
pipeline = [["head", "-c", "100000000", "/dev/zero"], ["base64"]]

[[steps]]
kind = "run"
say = "make a sparse file past the hashing limit"
pipeline = [["truncate", "-s", "100M", "big.bin"]]
"""

PEAK = """
import resource, subprocess, sys, time
started = time.monotonic()
done = subprocess.run([sys.executable, "-m", "cfwrap", "replay", sys.argv[1], "--out", sys.argv[2]],
                      capture_output=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      time.monotonic() - started)
"""


@pytest.mark.slow
def test_100_mb_of_output_is_cut_with_bounded_memory(tmp_path):
    guide = _guide(tmp_path, BIG_STEP)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", PEAK, guide, out],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    code, peak_kib, seconds = done.stdout.split()
    print(f"replay of a 100 MB step: peak RSS {peak_kib} KiB, {float(seconds):.2f}s")
    assert int(code) == 0, done.stderr
    assert int(peak_kib) < 150 * 1024  # 943,724 KiB before the cap
    assert float(seconds) < 60
    for name in ("transcript.md", "transcript.json"):
        assert (out / name).stat().st_size < 3 * 1024 * 1024
    data = json.loads((out / "transcript.json").read_text())
    assert (
        f"\n[output cut at 1 MiB; {133_333_336 + 1_754_386 - 1024 * 1024} bytes dropped]\n"
        in data["steps"][0]["stdout"]
    )
    sparse = data["steps"][1]["files"][0]
    assert sparse["path"] == "big.bin" and sparse["sha256"].startswith("size 104857600,")
    (out / "files" / "big.bin").unlink()  # the session's secret scan reads every file whole


FIFO_STEPS = """
[[steps]]
kind = "run"
say = "make a CA"
pipeline = [["cfssl", "print-defaults", "csr"], ["cfssl", "gencert", "-initca", "-"],
            ["cfssljson", "-bare", "ca"]]

[[steps]]
kind = "run"
say = "a FIFO where the key should be"
pipeline = [["mkfifo", "server-key.pem"]]

[[checks]]
cert = "ca.pem"
key = "server-key.pem"
ca = "ca.pem"
role = "server"
"""


def test_a_fifo_made_by_a_step_is_never_read(tmp_path):
    guide = _guide(tmp_path, FIFO_STEPS)
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", "replay", guide, "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert "Traceback" not in done.stderr
    assert done.returncode == ExitCode.VERIFY_FAILED, done.stderr
    data = json.loads((tmp_path / "out" / "transcript.json").read_text())
    assert data["steps"][1]["files"] == []  # a FIFO is not a file the snapshot opens


def test_printed_script_shows_no_control_character_and_writes_files_exactly(cli, tmp_path):
    """Arguments and file contents with CR, ESC and bidi characters: exact, and never raw."""
    args = ["\r\x1b[2K# fake comment", "it's \u202e here", "plain"]
    contents = {
        "none.txt": "no newline at end",
        "empty.txt": "",
        "two.txt": "ends twice\n\n",
        "cr.txt": "a\r\nEOF\r\nb\n",
        "plain.txt": "one line\n",
    }
    steps = (
        '[[steps]]\nkind = "run"\nsay = "s"\npipeline = [["./record", '
        + ", ".join(json.dumps(a) for a in args)
        + "]]\n"
    )
    for name, content in contents.items():
        steps += (
            f'[[steps]]\nkind = "write"\nsay = "w"\npath = "{name}"\n'
            f"content = {json.dumps(content)}\n"
        )
    result = cli("replay", _guide(tmp_path, steps), "--print")
    assert result.code == 0, result.err
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u202e]", result.out), "a raw control character"
    work = tmp_path / "work"
    work.mkdir()
    record = work / "record"
    record.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\0" "$a"; done > argv\n')
    record.chmod(0o755)
    script = tmp_path / "guide.sh"
    script.write_text(result.out)
    subprocess.run(["bash", script], cwd=work, check=True, capture_output=True)
    assert (work / "argv").read_bytes().decode().split("\0")[:-1] == args
    for name, content in contents.items():
        assert (work / name).read_bytes() == content.encode(), name


KEYS_IN_OTHER_FORMS = [
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout"], ["openssl", "asn1parse"]],
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["base64", "-w0"]],
    [["sh", "-c", 'echo "encrypt = $(openssl rand -base64 32)"; echo next']],
    [["sh", "-c", "mkdir -p sub && openssl ecparam -genkey -name prime256v1 -noout -out sub/k.pem"
      " && openssl ec -in sub/k.pem -outform DER 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo"]],
    [["sh", "-c", "openssl ecparam -genkey -name prime256v1 -noout | openssl ec -text -noout"
      " | tr -d ' '"]],
    # Base64 wrapped at 76 (helper-29), and hex dumps of every layout.
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["base64"]],
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["xxd"]],
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["hexdump", "-C"]],
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["od", "-A", "x", "-t", "x1z"]],
    [["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-outform", "DER"],
     ["xxd", "-i"]],
    # Lines that look like a dump but hold no hex bytes (helper-30: a traceback).
    [["sh", "-c", "printf '000000 abc\\n'; head -c 32 /dev/zero | od -b; echo x | od -c"]],
    [["sh", "-c", 'echo "server { Encrypt = \\"$(openssl rand -base64 32)\\" }"']],
    # A gossip key in a Nomad JSON config, and one kept in a file, then dumped and named.
    [["sh", "-c", 'echo "{\\"server\\": {\\"encrypt\\": \\"$(openssl rand -base64 32)\\"}}"']],
    [["sh", "-c", "while :; do k=$(openssl rand -base64 32); case $k in */*) continue;; esac;"
      ' break; done; echo "$k" > gossip.key; touch "$k.txt"; base64 -d gossip.key | xxd -p;'
      " base64 -d gossip.key | xxd"]],
]  # fmt: skip


def _key_material(text: str) -> list[str]:
    """Private keys written out in any form cryptography can read back, and dumps of them."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    found = []
    runs = [(r, "base64") for r in re.findall(r"[A-Za-z0-9+/]{64,}={0,2}", text)]
    runs += [(r, "hex") for r in re.findall(r"(?:[0-9a-fA-F]{2}[:\s]?){48,}", text)]
    for run, kind in runs:
        try:
            if kind == "base64":
                der = base64.b64decode(run + "=" * (-len(run) % 4))
            else:
                der = bytes.fromhex(re.sub(r"[:\s]", "", run))
            load_der_private_key(der, None)
        except (ValueError, TypeError):
            continue
        found.append(f"a DER private key in {kind}")
    # Wrapped base64, its lines joined; hex dumps as xxd, hexdump -C and od -t x1z lay them out.
    wrapped = r"(?m)(?:^[A-Za-z0-9+/]{16,}\n)+[A-Za-z0-9+/]*=*"
    joined = ["".join(b.split()) for b in re.findall(wrapped, text)]
    ders = [base64.b64decode(r + "=" * (-len(r) % 4)) for r in joined if len(r) % 4 != 1]
    for line in (r"^[0-9a-f]{8}: (.{39})  .*", r"^[0-9a-f]{8}  (.{48})  \|.*",
                 r"^[0-9a-f]{6} (.{47}) *>.*"):  # fmt: skip
        for block in re.finditer(f"(?m)(?:{line}\n?)+", text.replace("\\n", "\n")):
            hexes = re.findall(f"(?m){line}", block.group())
            ders.append(bytes.fromhex("".join(hexes).replace(" ", "")))
    c_arrays = re.findall(r"(?m)(?:^ *0x[0-9a-f]{2}(?:, 0x[0-9a-f]{2})*,?\n)+", text)
    ders += [bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", a)) for a in c_arrays]
    for der in ders:
        try:
            load_der_private_key(der, None)
        except (ValueError, TypeError):
            continue
        found.append("a DER private key wrapped or dumped")
    found += re.findall(r"\[HEX DUMP\]:[0-9A-Fa-f]{32,}", text)
    found += re.findall(r'(?i)encrypt"? ?[=:] "?[A-Za-z0-9+/]{43}=', text)
    found += re.findall(r"priv:\s*\n\s*[0-9a-f]{2}:", text)
    return found


def test_keys_printed_in_other_forms_never_reach_transcripts_or_logs(tmp_path):
    steps = "".join(
        f'[[steps]]\nkind = "run"\nsay = "s"\npipeline = {json.dumps(p)}\n'
        for p in KEYS_IN_OTHER_FORMS
    )
    guide = _guide(tmp_path, steps)
    ran = subprocess.run(
        [sys.executable, "-m", "cfwrap", "-v", "replay", guide, "--out", tmp_path / "r"],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    transcript = json.loads((tmp_path / "r" / "transcript.json").read_text())
    assert [s["exit_codes"] for s in transcript["steps"]] == [
        [0, 0], [0, 0], [0], [0], [0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0], [0], [0],
        [0]
    ]  # fmt: skip
    gossip = base64.b64decode((tmp_path / "r" / "files" / "gossip.key").read_text())
    (tmp_path / "r" / "files" / "gossip.key").unlink()  # the file is named after it: both go
    for named in (tmp_path / "r" / "files").glob("*.txt"):
        named.unlink()
    for where, text in (
        ("transcript.json", (tmp_path / "r" / "transcript.json").read_text()),
        ("transcript.md", (tmp_path / "r" / "transcript.md").read_text()),
        ("the -v log", ran.stderr),
    ):
        assert _key_material(text) == [], where
        flat = re.sub(r"(?m)^[0-9a-f]{6,8}:?|[^0-9a-f\n]|\n", "", text.lower())
        assert gossip.hex() not in flat, where  # xxd -p, or xxd's lines with their offsets
        assert_no_secrets(text, base64.b64encode(gossip).decode())


def _gone(pid: int) -> bool:
    """No such process, or one that has ended and waits to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


BACKGROUND_STEP = """
[[steps]]
kind = "run"
say = "start something in the background"
pipeline = [["sh", "-c", "sleep 300 >/dev/null 2>&1 </dev/null & echo $! > bg.pid; {then}"]]
"""


@pytest.mark.parametrize("how", ["the step ends", "cfwrap is stopped"])
def test_what_a_step_starts_in_the_background_ends_with_it(tmp_path, how):
    # helper-29: a guide's `cmd &` outlived the replay and changed its folder afterwards.
    then = "echo started" if how == "the step ends" else "wait"
    guide = _guide(tmp_path, BACKGROUND_STEP.format(then=then))
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfwrap", "replay", guide, "--out", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if how == "cfwrap is stopped":  # the step waits: its staging folder stays while it runs
        background = 0
        deadline = time.monotonic() + 60
        while not background and proc.poll() is None and time.monotonic() < deadline:
            for written in tmp_path.glob(".r.*/files/bg.pid"):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    background = int(written.read_text())
            time.sleep(0.05)
        assert background, "the step never started its background process"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.TERMINATED, err
    else:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, ExitCode.VERIFY_FAILED), err
        background = int((out / "files" / "bg.pid").read_text())
    deadline = time.monotonic() + 10
    while not _gone(background) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = not _gone(background)
    if alive:
        os.kill(background, signal.SIGKILL)
    assert not alive, "the step's background process outlived it"


def test_files_a_step_makes_in_a_subfolder_are_recorded(tmp_path):
    # helper-29: `cfssljson -bare certs/ca` made certs/ca-key.pem, and the step's table was empty.
    steps = """
[[steps]]
kind = "run"
say = "files in a subfolder"
pipeline = [["sh", "-c", "mkdir -p certs/in && echo a > certs/a.txt && echo b > certs/in/b.txt"]]
"""
    out = tmp_path / "r"
    done = subprocess.run(
        [sys.executable, "-m", "cfwrap", "replay", _guide(tmp_path, steps), "--out", out],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode in (0, ExitCode.VERIFY_FAILED), done.stderr
    made = json.loads((out / "transcript.json").read_text())["steps"][0]["files"]
    assert {f["path"]: f["change"] for f in made} == {
        "certs/a.txt": "created", "certs/in/b.txt": "created"
    }  # fmt: skip


def _write_after(cli, tmp_path: Path, pipeline: str) -> tuple[CliResult, Path, Path]:
    """Replay a run step (``pipeline``, ``{outside}`` filled in), then a write of csr.json."""
    outside = tmp_path / "outside"
    outside.mkdir()
    steps = f"""
[[steps]]
kind = "run"
say = "get in the write's way"
pipeline = {pipeline.format(outside=outside)}

[[steps]]
kind = "write"
say = "write the CSR"
path = "csr.json"
content = "{{}}"
"""
    out = tmp_path / "out"
    return cli("replay", _guide(tmp_path, steps), "--out", out), out, outside


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        ('[["ln", "-s", "{outside}/target.json", "csr.json"]]', "a symlink"),
        ('[["sh", "-c", "echo made > csr.json"]]', "a file"),
        ('[["mkdir", "csr.json"]]', "a folder"),
    ],
    ids=["symlink", "file", "folder"],
)
def test_a_write_step_whose_name_an_earlier_step_took_stops_with_a_transcript(
    cli, tmp_path, first, kind
):
    """Nothing is written through an earlier step's symlink or over its file; the replay says so."""
    result, out, outside = _write_after(cli, tmp_path, first)
    assert result.code == ExitCode.TOOL_FAILED, result.err
    assert f"csr.json is already there ({kind} an earlier step made)" in result.err
    data = json.loads((out / "transcript.json").read_text())
    assert data["outcome"] == "step-failed"
    assert [(s["number"], s["ok"]) for s in data["steps"]] == [(1, True), (2, False)]
    assert kind in data["steps"][1]["note"]
    assert list(outside.iterdir()) == []  # nothing written through the link
    if kind == "a file":
        assert (out / "files" / "csr.json").read_text() == "made\n"  # the step's, untouched


def test_a_write_step_after_its_folder_was_swapped_for_a_symlink_writes_nothing(cli, tmp_path):
    """helper-32: a step moved the replay's folder away and left a symlink to elsewhere."""
    swap = '[["sh", "-c", "cd .. && mv files moved && ln -s {outside} files"]]'
    result, out, outside = _write_after(cli, tmp_path, swap)
    assert result.code == ExitCode.TOOL_FAILED, result.err
    assert "the replay's folder was moved or replaced" in result.err
    assert list(outside.iterdir()) == []
    data = json.loads((out / "transcript.json").read_text())
    assert [(s["number"], s["ok"]) for s in data["steps"]] == [(1, True), (2, False)]
