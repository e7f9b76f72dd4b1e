"""Hostile input, as an attacker (or an unlucky user) would give it, to the installed command.

Every case runs ``python -m cfwrap`` as a separate process (so a hang is caught by a time bound,
not by a stuck test run) in a folder of prepared traps: FIFOs, devices, huge and damaged files,
certificates with malformed extensions, encrypted and swapped keys, corrupt manifests. Each must
end with one line on stderr, a named exit code, no traceback, within the bound, with every file
of the arena byte-identical and no key material in anything printed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cfwrap.errors import ExitCode
from tests.conftest import ROOT, assert_no_secrets
from tests.secretscan import secrets_in

pytestmark = pytest.mark.slow

#: No case may take longer than this (the worst honest one issues a certificate: ~1 s).
BOUND = 30.0
NAMED = {int(c) for c in ExitCode}


def run_cfwrap(
    *args: str | Path, cwd: Path, stdin: bytes = b"", stdout: int | None = None
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cfwrap", *map(os.fsencode, map(str, args))],
        cwd=cwd,
        input=stdin,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=BOUND,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return result, time.monotonic() - started


def tree(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry below ``folder`` with its mode and, for regular files, its content hash.

    Never opens anything but regular files: the arena holds FIFOs and device nodes.
    """
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = ""
        if stat.S_ISREG(info.st_mode) and info.st_size < 1 << 20:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISREG(info.st_mode):
            digest = f"size {info.st_size}"
        state[str(path.relative_to(folder))] = (stat.S_IMODE(info.st_mode), digest)
    return state


def _malformed_san_cert(ca_dir: Path, out: Path) -> None:
    """A leaf signed by the kit's CA whose SAN extension is not valid DER (cfssl cannot)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.global.nomad")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x05a"),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = out.with_name(out.name.replace(".pem", "-key.pem"))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)


def _encrypt_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret pass phrase"),
        )
    )


@pytest.fixture(scope="module")
def arena(kits, tmp_path_factory) -> Path:
    """A folder of traps, made once; no case may change any of it."""
    root: Path = tmp_path_factory.mktemp("arena")
    kit = root / "kit"
    shutil.copytree(kits["global"], kit)
    os.mkfifo(root / "fifo")
    (root / "folder").mkdir()
    with (root / "huge.pem").open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "not-utf8").write_bytes(b"\xff\xfe-----BEGIN\n")
    (root / "big-stdin").write_bytes(b"A" * (2 * 1024 * 1024))
    for name, csr in {
        "nul-cn.json": {"CN": "Evil\u0000CA"},
        "newline-cn.json": {"CN": "Evil\nCA"},
        "control-name.json": {"CN": "CA", "names": [{"O": "Acme\u001b[31m"}]},
        "pathlen-clash.json": {"CN": "CA", "ca": {"pathlen": 2, "pathlenzero": True}},
        "list.json": ["CN"],
        "good.json": {"CN": "Acme CA", "names": [{"C": "DE", "O": "Acme"}]},
    }.items():
        (root / name).write_text(json.dumps(csr))
    _malformed_san_cert(kit, root / "badsan.pem")

    fifo_kit = root / "fifo-kit"
    shutil.copytree(kit, fifo_kit)
    os.mkfifo(fifo_kit / "x.pem")
    os.mkfifo(fifo_kit / "trap-key.pem")

    hcl_fifo = root / "hcl-fifo"
    shutil.copytree(kit, hcl_fifo)
    server_hcl = hcl_fifo / "global-server.hcl"
    text = server_hcl.read_text().replace(
        str(kits["global"] / "global-server-nomad-key.pem"), str(root / "fifo")
    )
    server_hcl.write_text(text)

    for name in ("corrupt-manifest", "deep-manifest", "symlink-key", "badsan-kit"):
        shutil.copytree(kit, root / name)
    (root / "corrupt-manifest" / "manifest.json").write_text("{not json")
    (root / "deep-manifest" / "manifest.json").write_text("[" * 100_000)
    key = root / "symlink-key" / "global-server-nomad-key.pem"
    key.unlink()
    key.symlink_to(root / "kit" / "global-server-nomad-key.pem")
    shutil.copy(root / "badsan.pem", root / "badsan-kit" / "global-server-nomad.pem")
    shutil.copy(root / "badsan-key.pem", root / "badsan-kit" / "global-server-nomad-key.pem")

    enc = root / "enc-kit"
    shutil.copytree(kit, enc)
    _encrypt_key(enc / "global-server-nomad-key.pem")
    _encrypt_key(enc / "global-cli-nomad-key.pem")
    swapped = root / "swapped-kit"
    shutil.copytree(kit, swapped)
    server_key = swapped / "global-server-nomad-key.pem"
    client_key = swapped / "global-client-nomad-key.pem"
    server_bytes = server_key.read_bytes()
    server_key.write_bytes(client_key.read_bytes())
    client_key.write_bytes(server_bytes)

    for name, body in {
        "deep.toml": "a = " + "[" * 50_000 + "]" * 50_000 + "\n",
        "not-utf8.toml": None,
        "empty-stage.toml": (
            'schema_version = 1\nname = "x"\ntitle = "t"\nsource = "s"\nexpected_files = []\n'
            '[[steps]]\nkind = "run"\nsay = "s"\npipeline = [[]]\n'
        ),
    }.items():
        if body is None:
            (root / name).write_bytes(b'title = "\xff"\n')
        else:
            (root / name).write_text(body)
    return root


@dataclass(frozen=True)
class Case:
    """One hostile invocation: its argv (``{A}`` is the arena), and what must come of it."""

    name: str
    argv: tuple[str, ...]
    code: ExitCode
    needle: str = ""
    stdin: str = ""
    one_line: bool = True
    out_to: str = ""  # "full": stdout is /dev/full
    extra: Callable[[Path], None] | None = field(default=None, compare=False)


def c(name: str, code: ExitCode, needle: str, *argv: str, **kw: object) -> Case:
    return Case(name, argv, code, needle, **kw)  # type: ignore[arg-type]


IN, U, C, F, V = (
    ExitCode.INPUT,
    ExitCode.USAGE,
    ExitCode.CONFLICT,
    ExitCode.FILESYSTEM,
    (ExitCode.VERIFY_FAILED),
)
CERT = ("cert", "--ca", "{A}/kit/ca.pem", "--ca-key", "{A}/kit/ca-key.pem")
LONG = "a" * 300
LABEL64 = "b" * 64

CASES = [
    # output folders
    c("out dot", IN, "current folder", "quickstart", "--out", ".", "--force"),
    c("out dotdot", IN, "current folder", "quickstart", "--out", "..", "--force"),
    c("out root", IN, "current folder", "quickstart", "--out", "/", "--force"),
    c("out 300 chars", IN, "at most", "quickstart", "--out", LONG),
    c("out not utf-8", IN, "not UTF-8", "quickstart", "--out", "{A}/\udcff\udcfe"),
    c("out is a file", C, "not a folder", "quickstart", "--out", "{A}/good.json"),
    c("out under a file", C, "not an existing folder", "quickstart", "--out", "{A}/fifo/k"),
    c("cert out dot", IN, "current folder", *CERT, "--role", "cli", "--out", "."),
    c("ca out dot", IN, "current folder", "ca", "--out", "."),
    c("replay out dot", IN, "current folder", "replay", "nomad-encryption-2017", "--out", "."),
    # values written into configuration
    c(
        "tls-dir newline",
        IN,
        "control character",
        "quickstart",
        "--out",
        "{A}/new",
        "--tls-dir",
        "/etc/nomad\nhttp = false",
    ),
    c("tls-dir template", IN, "template", "quickstart", "--out", "{A}/new", "--tls-dir", "/x/${y}"),
    c(
        "tls-dir tab",
        IN,
        "control character",
        "quickstart",
        "--out",
        "{A}/new",
        "--tls-dir",
        "/a\tb",
    ),
    # numbers
    c(
        "expiry huge",
        IN,
        "longer than",
        "quickstart",
        "--out",
        "{A}/new",
        "--expiry",
        "99999999999999999999999h",
    ),
    c(
        "expiry 400 digits",
        IN,
        "longer than",
        "quickstart",
        "--out",
        "{A}/new",
        "--expiry",
        "9" * 400 + "h",
    ),
    c(
        "ca-expiry float exp",
        IN,
        "not a duration",
        "quickstart",
        "--out",
        "{A}/new",
        "--ca-expiry",
        "1e400h",
    ),
    c(
        "key-size huge",
        IN,
        "key size",
        "quickstart",
        "--out",
        "{A}/new",
        "--key-size",
        "99999999999999999999",
    ),
    c("key-size words", U, "invalid int", "quickstart", "--out", "{A}/new", "--key-size", "x"),
    c("gossip bytes", U, "invalid choice", "quickstart", "--out", "{A}/new", "--gossip-bytes", "7"),
    c("wait nan", U, "0 or more", "quickstart", "--out", "{A}/new", "--wait", "nan"),
    c("wait negative", U, "0 or more", "manifest", "{A}/kit", "--wait", "-3"),
    c("warn-within huge", IN, "36500", "doctor", "{A}/kit", "--warn-within", "9999999999"),
    c("warn-within negative", IN, "number of days", "doctor", "{A}/kit", "--warn-within", "-1"),
    c(
        "warn-within arabic digit",
        IN,
        "number of days",
        "doctor",
        "{A}/kit",
        "--warn-within",
        "\u0663",
    ),
    # names: regions, DNS, roles
    c(
        "region underscore",
        IN,
        "not a DNS label",
        "quickstart",
        "--out",
        "{A}/new",
        "--region",
        "eu_west",
    ),
    c("region newline", IN, "--region", "quickstart", "--out", "{A}/new", "--region", "eu\nx"),
    c("region too long", IN, "at most 51", "quickstart", "--out", "{A}/new", "--region", "a" * 52),
    c("region shell", IN, "--region", "doctor", "{A}/kit", "--region", "global --out /x; touch y"),
    c("dns newline", IN, "--dns", "quickstart", "--out", "{A}/new", "--dns", "a\nb.example"),
    c(
        "server for two regions",
        IN,
        "other than this certificate's own",
        *CERT,
        "--role",
        "server",
        "--out",
        "{A}/new",
        "--dns",
        "server.eu.nomad",
        "--dns",
        "server.us.nomad",
    ),
    c(
        "server other region caps",
        IN,
        "other than this certificate's own",
        *CERT,
        "--role",
        "server",
        "--out",
        "{A}/new",
        "--dns",
        "server.EU.nomad",
    ),
    c(
        "client other region",
        IN,
        "other than this certificate's own",
        *CERT,
        "--role",
        "client",
        "--out",
        "{A}/new",
        "--dns",
        "client.us.nomad",
    ),
    c(
        "quickstart role name",
        IN,
        "other than this certificate's own",
        "quickstart",
        "--out",
        "{A}/new",
        "--dns",
        "SERVER.global.nomad",
    ),
    # input files that are not files, or not small
    c(
        "ca fifo",
        IN,
        "FIFO",
        "cert",
        "--ca",
        "{A}/fifo",
        "--ca-key",
        "{A}/kit/ca-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca-key fifo",
        IN,
        "FIFO",
        "cert",
        "--ca",
        "{A}/kit/ca.pem",
        "--ca-key",
        "{A}/fifo",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca dev zero",
        IN,
        "character device",
        "cert",
        "--ca",
        "/dev/zero",
        "--ca-key",
        "{A}/kit/ca-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca-key dev zero",
        IN,
        "character device",
        "cert",
        "--ca",
        "{A}/kit/ca.pem",
        "--ca-key",
        "/dev/zero",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca folder",
        IN,
        "folder",
        "cert",
        "--ca",
        "{A}/folder",
        "--ca-key",
        "{A}/kit/ca-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca huge",
        IN,
        "larger than",
        "cert",
        "--ca",
        "{A}/huge.pem",
        "--ca-key",
        "{A}/kit/ca-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca malformed san",
        IN,
        "damaged certificate",
        "cert",
        "--ca",
        "{A}/badsan.pem",
        "--ca-key",
        "{A}/badsan-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c(
        "ca not utf-8 path",
        IN,
        "not UTF-8",
        "cert",
        "--ca",
        "{A}/\udcff",
        "--ca-key",
        "{A}/kit/ca-key.pem",
        "--role",
        "cli",
        "--out",
        "{A}/new",
    ),
    c("csr fifo", IN, "FIFO", "ca", "--out", "{A}/new", "--csr", "{A}/fifo"),
    c("csr dev zero", IN, "character device", "ca", "--out", "{A}/new", "--csr", "/dev/zero"),
    c("csr deep", IN, "nested too deeply", "ca", "--out", "{A}/new", "--csr", "{A}/deep.json"),
    c("csr huge", IN, "larger than", "ca", "--out", "{A}/new", "--csr", "{A}/huge.pem"),
    c("csr not utf-8", IN, "not JSON", "ca", "--out", "{A}/new", "--csr", "{A}/not-utf8"),
    c("csr a list", IN, "CSR", "ca", "--out", "{A}/new", "--csr", "{A}/list.json"),
    c(
        "csr NUL in CN",
        IN,
        "control character",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/nul-cn.json",
    ),
    c(
        "csr newline in CN",
        IN,
        "control character",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/newline-cn.json",
    ),
    c(
        "csr escape in O",
        IN,
        "control character",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/control-name.json",
    ),
    c(
        "csr pathlen clash",
        IN,
        "disagree",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/pathlen-clash.json",
    ),
    c("csr with --cn", IN, "--cn", "ca", "--out", "{A}/new", "--csr", "{A}/good.json", "--cn", "X"),
    c(
        "csr with --expiry",
        IN,
        "--expiry",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/good.json",
        "--expiry",
        "1000h",
    ),
    c(
        "csr with --key-algo",
        IN,
        "--key-algo",
        "ca",
        "--out",
        "{A}/new",
        "--csr",
        "{A}/good.json",
        "--key-algo",
        "rsa",
    ),
    c("cn newline", IN, "control character", "ca", "--out", "{A}/new", "--cn", "a\nb"),
    c("keygen check fifo", IN, "FIFO", "keygen", "--check", "{A}/fifo"),
    c("keygen check dev zero", IN, "character device", "keygen", "--check", "/dev/zero"),
    c(
        "keygen check huge stdin",
        IN,
        "more than 1 MiB",
        "keygen",
        "--check",
        "-",
        stdin="{A}/big-stdin",
    ),
    c("keygen check not utf-8", IN, "not UTF-8", "keygen", "--check", "{A}/not-utf8"),
    c("doctor cert fifo", IN, "not a regular file", "doctor", "--cert", "{A}/fifo"),
    c("replay guide fifo", IN, "FIFO", "replay", "{A}/fifo", "--print"),
    c("replay guide dev zero", IN, "character device", "replay", "/dev/zero", "--print"),
    c("replay guide huge", IN, "larger than", "replay", "{A}/huge.pem", "--print"),
    c("replay guide deep", IN, "{A}/deep.toml", "replay", "{A}/deep.toml", "--print"),
    c("replay guide not utf-8", IN, "{A}/not-utf8.toml", "replay", "{A}/not-utf8.toml", "--print"),
    c("replay empty stage", IN, "pipeline", "replay", "{A}/empty-stage.toml", "--print"),
    # cert into an existing folder: refused before anything, the folder untouched
    c(
        "cert corrupt manifest",
        V,
        "not valid JSON",
        *CERT,
        "--role",
        "cli",
        "--out",
        "{A}/corrupt-manifest",
    ),
    c(
        "cert deep manifest",
        V,
        "nested too deeply",
        *CERT,
        "--role",
        "cli",
        "--out",
        "{A}/deep-manifest",
    ),
    c(
        "cert force onto symlinked key",
        C,
        "symlink",
        *CERT,
        "--role",
        "server",
        "--out",
        "{A}/symlink-key",
        "--force",
    ),
    c("manifest corrupt", V, "not valid JSON", "manifest", "{A}/corrupt-manifest"),
    c("manifest deep", V, "nested too deeply", "manifest", "{A}/deep-manifest"),
    # live peers
    c(
        "connect 64-char label",
        IN,
        "neither an IP address",
        "doctor",
        "{A}/kit",
        "--connect",
        f"{LABEL64}.example.com:4646",
    ),
    c("connect port", IN, "1 to 65535", "doctor", "{A}/kit", "--connect", "127.0.0.1:99999"),
    c("connect newline host", IN, "neither", "doctor", "{A}/kit", "--connect", "a\nb:1"),
    c(
        "connect missing key",
        IN,
        "not a regular file",
        "doctor",
        "--ca",
        "{A}/kit/ca.pem",
        "--cert",
        "{A}/kit/global-cli-nomad.pem",
        "--key",
        "{A}/nope.pem",
        "--connect",
        "127.0.0.1:1",
    ),
    c(
        "connect fifo key",
        IN,
        "not a regular file",
        "doctor",
        "--ca",
        "{A}/kit/ca.pem",
        "--cert",
        "{A}/kit/global-cli-nomad.pem",
        "--key",
        "{A}/fifo",
        "--connect",
        "127.0.0.1:1",
    ),
    c(
        "connect encrypted key",
        IN,
        "cannot use them",
        "doctor",
        "{A}/enc-kit",
        "--connect",
        "127.0.0.1:1",
    ),
    c(
        "connect swapped key",
        IN,
        "cannot use them",
        "doctor",
        "--ca",
        "{A}/kit/ca.pem",
        "--cert",
        "{A}/kit/global-cli-nomad.pem",
        "--key",
        "{A}/kit/global-server-nomad-key.pem",
        "--connect",
        "127.0.0.1:1",
    ),
    # output streams
    c("stdout full", F, "standard output", "keygen", out_to="full"),
    c("cfssl-dir not utf-8", IN, "not UTF-8", "--cfssl-dir", "{A}/\udcff", "keygen"),
]

# Not one-line errors: reports (exit 0 or 7) that must still finish, change nothing, leak nothing.
REPORTS = [
    c("doctor fifo in kit", V, "", "doctor", "{A}/fifo-kit", one_line=False),
    c("doctor hcl key_file fifo", V, "", "doctor", "{A}/hcl-fifo", "--probe", one_line=False),
    c("doctor probe encrypted keys", V, "", "doctor", "{A}/enc-kit", "--probe", one_line=False),
    c("doctor probe swapped keys", V, "", "doctor", "{A}/swapped-kit", "--probe", one_line=False),
    c("doctor malformed san", V, "", "doctor", "{A}/badsan-kit", "--probe", one_line=False),
    c("manifest malformed san", V, "", "manifest", "{A}/badsan-kit", one_line=False),
    c(
        "doctor loose malformed san",
        V,
        "",
        "doctor",
        "--cert",
        "{A}/badsan.pem",
        "--key",
        "{A}/badsan-key.pem",
        "--ca",
        "{A}/kit/ca.pem",
        one_line=False,
    ),
]


def _argv(case: Case, arena: Path) -> list[str]:
    return [a.replace("{A}", str(arena)) for a in case.argv]


@pytest.mark.parametrize("case", CASES + REPORTS, ids=lambda case: case.name)
def test_hostile_input(case: Case, arena: Path, tmp_path: Path) -> None:
    before = tree(arena)
    secrets = secrets_in(arena)
    stdin = Path(case.stdin.replace("{A}", str(arena))).read_bytes() if case.stdin else b""
    if case.out_to == "full":
        with Path("/dev/full").open("wb") as full:
            result, took = run_cfwrap(
                *_argv(case, arena), cwd=tmp_path, stdin=stdin, stdout=full.fileno()
            )
    else:
        result, took = run_cfwrap(*_argv(case, arena), cwd=tmp_path, stdin=stdin)
    err = result.stderr.decode("utf-8", "backslashreplace")
    out = (result.stdout or b"").decode("utf-8", "backslashreplace")
    assert "Traceback" not in err + out, err
    assert result.returncode in NAMED, (result.returncode, err)
    assert result.returncode == case.code, err
    if case.one_line:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("cfwrap: error: "), err
        assert case.needle.replace("{A}", str(arena)) in lines[0], lines[0]
        assert out == ""
    assert took < BOUND
    assert tree(arena) == before, "the arena changed"
    assert list(tmp_path.iterdir()) == [], "the working folder changed"
    assert_no_secrets(err + out, *secrets)


def test_the_matrix_covers_every_class():
    """At least 60 cases, and every command among them."""
    assert len(CASES) + len(REPORTS) >= 60
    commands = {
        next(a for a in case.argv if not a.startswith("-") and "{A}" not in a) for case in CASES
    }
    assert commands >= {"quickstart", "cert", "ca", "keygen", "doctor", "manifest", "replay"}


def test_closed_stdout_is_quiet_and_named(tmp_path):
    """``cfwrap replay --list | head -c0``: exit 141 (128 + SIGPIPE) and nothing on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfwrap", "keygen", "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader goes away before cfwrap writes
    _, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == ExitCode.BROKEN_PIPE, err
    assert err == b""
