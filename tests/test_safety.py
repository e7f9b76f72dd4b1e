"""Nothing lost, nothing leaked: interruption, concurrency, hostile input, full/read-only disks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cfwrap.errors import ExitCode
from tests.conftest import cert_argv, snapshot
from tests.handmade import copy_kit, mounted_tmpfs, wrapped_cfssl
from tests.secretscan import leaks

PYTHON = [sys.executable, "-m", "cfwrap"]


@pytest.fixture(scope="module")
def slow_cfssl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cfssl that takes 0.4 s per call, then is the real one (package.json says 1.6.5)."""
    root = tmp_path_factory.mktemp("slow")
    return wrapped_cfssl(root, 'sleep 0.4\nexec "$REAL" "$@"', version="1.6.5-slow-test")


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _start(args: list[str | Path], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PYTHON, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _valid_kit(kit: Path) -> bool:
    if not (kit / "manifest.json").is_file():
        return False
    from cfwrap import manifest

    return manifest.differences(manifest.load(kit), manifest.scan(kit)) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("after", [0.25, 0.6, 0.95, 1.3])
def test_killed_fresh_run_leaves_no_kit_and_a_rerun_works(tmp_path, slow_cfssl, sig, after):
    proc = _start(["--cfssl-dir", slow_cfssl, "quickstart", "--out", "kit"], tmp_path)
    time.sleep(after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    kit = tmp_path / "kit"
    # Either it finished before the signal (a whole kit) or there is no kit at all.
    assert _valid_kit(kit) or not kit.exists(), sorted(p.name for p in kit.iterdir())
    if sig == signal.SIGTERM and proc.returncode == ExitCode.TERMINATED:
        assert b"nothing was left half-written" in err
        assert _leftovers(tmp_path, "kit") == []
    if not kit.exists():
        rerun = _start(["quickstart", "--out", "kit"], tmp_path)
        assert rerun.wait(timeout=60) == 0
        assert rerun.stdout is not None and rerun.stderr is not None
        rerun.stdout.close()
        rerun.stderr.close()
    assert _valid_kit(kit)
    assert _leftovers(tmp_path, "kit") == []  # the rerun swept a killed run's staging folder


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.3, 0.7, 1.1])
def test_killed_forced_rerun_keeps_the_old_kit(tmp_path, slow_cfssl, kits, after):
    kit = tmp_path / "kit"
    shutil.copytree(kits["global"], kit)
    old = snapshot(kit)
    proc = _start(["--cfssl-dir", slow_cfssl, "quickstart", "--out", "kit", "--force"], tmp_path)
    time.sleep(after)
    proc.kill()
    proc.communicate(timeout=30)
    backups = sorted(tmp_path.glob("kit.replaced-*"))
    if kit.exists() and snapshot(kit) == old:
        assert backups == []  # untouched
    elif kit.exists():
        assert _valid_kit(kit)  # finished: the new kit, and the old one kept
        assert len(backups) == 1 and snapshot(backups[0]) == old
    else:
        assert len(backups) == 1 and snapshot(backups[0]) == old  # between the two renames
    rerun = subprocess.run(
        [*PYTHON, "quickstart", "--out", "kit", "--force"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _valid_kit(kit)
    assert _leftovers(tmp_path, "kit") == []


@pytest.mark.slow
def test_two_runs_on_one_folder_exactly_one_wins(tmp_path, slow_cfssl):
    first = _start(["--cfssl-dir", slow_cfssl, "quickstart", "--out", "kit"], tmp_path)
    second = _start(["--cfssl-dir", slow_cfssl, "quickstart", "--out", "kit"], tmp_path)
    results = sorted([first.communicate(timeout=60), second.communicate(timeout=60)])
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, ExitCode.CONFLICT]
    loser_err = next(err for out, err in results if not out)
    assert loser_err.count(b"\n") == 1
    assert b"another cfwrap is writing here" in loser_err or b"already exists" in loser_err
    assert _valid_kit(tmp_path / "kit")
    assert _leftovers(tmp_path, "kit") == []


@pytest.mark.slow
def test_wait_lets_the_second_run_follow_the_first(tmp_path, slow_cfssl):
    args = ["--cfssl-dir", slow_cfssl, "quickstart", "--out", "kit", "--force", "--wait", "60"]
    first = _start(args, tmp_path)
    time.sleep(0.2)
    second = _start(args, tmp_path)
    assert first.wait(timeout=60) == 0
    assert second.wait(timeout=60) == 0
    for proc in (first, second):
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert _valid_kit(tmp_path / "kit")
    assert len(list(tmp_path.glob("kit.replaced-*"))) == 1


def test_stale_lock_does_not_block(cli, tmp_path):
    # A lock file left by a process that died holding it: flock died with the process.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|"
            "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
            "time.sleep(60)",
            str(tmp_path / ".kit.cfwrap.lock"),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    assert cli("quickstart", "--out", tmp_path / "kit").code == ExitCode.CONFLICT
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert (tmp_path / ".kit.cfwrap.lock").exists()
    assert cli("quickstart", "--out", tmp_path / "kit").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"]


# Hostile inputs beyond the flag table in test_bad_input.py: files and file systems.


def _expired_ca(folder: Path) -> tuple[Path, Path]:
    """A CA that expired in 2021 (cfssl cannot backdate a CA, so cryptography makes it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2021, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir()
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "ca-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return folder / "ca.pem", key_path


def _cert(cli, ca: Path, key: Path, out: Path):
    return cli("cert", "--ca", ca, "--ca-key", key, "--role", "server", "--out", out)


def test_expired_ca_is_refused(cli, tmp_path):
    ca, key = _expired_ca(tmp_path / "old")
    before = snapshot(tmp_path)
    result = _cert(cli, ca, key, tmp_path / "out")
    assert result.code == ExitCode.INPUT
    assert result.err.strip() == (
        f"cfwrap: error: {ca}: the CA expired on 2021-01-01; make a new CA with `cfwrap ca`"
    )
    assert snapshot(tmp_path) == before


def test_encrypted_ca_key_is_refused(cli, tmp_path, kits):
    kit = kits["global"]
    loaded = serialization.load_pem_private_key((kit / "ca-key.pem").read_bytes(), None)
    encrypted = tmp_path / "enc-key.pem"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret-passphrase"),
        )
    )
    encrypted.chmod(0o600)
    before = snapshot(tmp_path)
    result = _cert(cli, kit / "ca.pem", encrypted, tmp_path / "out")
    assert result.code == ExitCode.INPUT
    assert "encrypted private key; cfssl needs it unencrypted" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_crlf_pem_is_read_like_lf(cli, tmp_path, kits):
    """Windows line ends are still PEM: cfssl (Go's pem) and cfwrap both accept them."""
    kit = kits["global"]
    for name in ("ca.pem", "ca-key.pem"):
        (tmp_path / name).write_bytes((kit / name).read_bytes().replace(b"\n", b"\r\n"))
    (tmp_path / "ca-key.pem").chmod(0o600)
    result = _cert(cli, tmp_path / "ca.pem", tmp_path / "ca-key.pem", tmp_path / "out")
    assert result.code == 0, result.err
    issued = x509.load_pem_x509_certificate(
        (tmp_path / "out" / "global-server-nomad.pem").read_bytes()
    )
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate((kit / "ca.pem").read_bytes()))


def test_full_disk_is_a_clean_filesystem_error(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=24k,mode=0755") as small:
        result = cli("quickstart", "--out", small / "kit")
        assert result.code == ExitCode.FILESYSTEM
        assert result.err.startswith("cfwrap: error: ")
        assert "No space left on device" in result.err
        assert len(result.err.strip().splitlines()) == 1
        assert list(small.iterdir()) == []


def test_read_only_folder_is_a_clean_filesystem_error(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = cli("quickstart", "--out", ro / "kit")
        assert result.code == ExitCode.FILESYSTEM
        assert "Read-only file system" in result.err
        assert len(result.err.strip().splitlines()) == 1
        assert list(ro.iterdir()) == []


def test_output_symlink_inside_kit_is_not_written_through(cli, tmp_path, kits):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.pem"
    target.write_text("precious\n")
    (out / "global-server-nomad.pem").symlink_to(target)
    kit = kits["global"]
    result = cli(*cert_argv(kit, "server", out, "--force"))
    assert result.code == ExitCode.CONFLICT
    assert "symlink" in result.err
    assert target.read_text() == "precious\n"


def test_secret_scan_finds_a_planted_leak(tmp_path, kits):
    shutil.copytree(kits["global"], tmp_path / "kit")
    body = (tmp_path / "kit" / "ca-key.pem").read_text().splitlines()[1]
    (tmp_path / "kit" / "notes.txt").write_text(f"oops {body}\n")
    assert leaks(tmp_path, []) == [f"secret material in {tmp_path / 'kit' / 'notes.txt'}"]
    gossip = (tmp_path / "kit" / "gossip.key").read_text().strip()
    assert leaks(tmp_path / "kit" / "x", [f"log: {gossip}"]) == []  # nothing secret there
    assert len(leaks(tmp_path, ["fine", f"log: {gossip}"])) == 2
    (tmp_path / "kit" / "notes.txt").unlink()


def test_secret_scan_reads_every_file_whatever_its_mode(tmp_path, kits):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    body = (kit / "global-server-nomad-key.pem").read_text().splitlines()[1]
    transcript = tmp_path / "transcript.json"
    transcript.write_text(json.dumps({"stdout": body}))
    transcript.chmod(0o600)  # a mode is no licence to hold a key
    assert leaks(tmp_path, []) == [f"secret material in {transcript}"]
    transcript.unlink()


def test_secret_scan_sees_what_subprocesses_printed(tmp_path):
    """The output of cfwrap run as a subprocess reaches the scan (cfssl's own does not)."""
    from tests.conftest import _CAPTURED, ROOT

    before = len(_CAPTURED)
    made = subprocess.run(
        [sys.executable, "-m", "cfwrap", "keygen"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    subprocess.run(["echo", "another tool"], capture_output=True, check=True)
    assert _CAPTURED[before:] == [made.stdout]
    (tmp_path / "gossip.key").write_text(made.stdout)  # now that value is a secret
    assert leaks(tmp_path, _CAPTURED[before:]) == [
        f"secret material in captured output #0: {made.stdout[:80]!r}"
    ]
    del _CAPTURED[before:]
    (tmp_path / "gossip.key").unlink()


def test_a_killed_certs_copy_of_the_ca_key_is_swept_by_the_next_run(tmp_path, kits):
    """cfssl reads the CA key from a scratch copy in $TMPDIR: after a SIGKILL, the next run
    (whatever command) removes it; a live run's copy is left alone (helper-28)."""
    pids, temp = tmp_path / "pids", tmp_path / "tmp"
    pids.mkdir()
    temp.mkdir()
    blocked = wrapped_cfssl(
        tmp_path / "blocked",
        'case "$*" in *-ca-key*) echo $$ > "$PIDS/$$"; exec sleep 60;; esac\nexec "$REAL" "$@"',
        version="1.6.5-blocked-test",
    )
    env = {**os.environ, "TMPDIR": str(temp), "PIDS": str(pids)}
    ca = kits["global"]
    argv = [
        *PYTHON,
        "--cfssl-dir",
        str(blocked),
        *map(str, cert_argv(ca, "server", tmp_path / "a")),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(pids.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (left,) = temp.iterdir()  # cfssl is signing: the copy is there
        assert left.name.startswith(f"cfwrap-{proc.pid}-")
        assert (left / "ca-key.pem").read_bytes() == (ca / "ca-key.pem").read_bytes()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        for pid in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.name), signal.SIGKILL)
    assert left.exists()  # nothing cleans up after a SIGKILL but the next run
    no_pid = temp / "cfwrap-99999999999999999999-abcdefgh"  # no process has such a pid
    no_pid.mkdir()
    rerun = subprocess.run(
        [*PYTHON, *map(str, cert_argv(ca, "client", tmp_path / "b"))],
        env=env, capture_output=True, check=False, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert list(temp.iterdir()) == [no_pid]  # left alone, never a traceback (helper-30)


def test_a_mount_point_as_out_is_refused_before_cfssl_runs(tmp_path):
    # helper-28: an empty tmpfs as --out got a whole kit issued, then "Device or resource busy".
    with mounted_tmpfs(tmp_path / "mnt", "size=1m") as mount:
        done = subprocess.run([*PYTHON, "quickstart", "--out", str(mount)], cwd=tmp_path,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == ExitCode.CONFLICT, done.stderr
        assert "is a mount point" in done.stderr and done.stderr.count("\n") == 1
        assert list(mount.iterdir()) == []
        inside = subprocess.run([*PYTHON, "quickstart", "--out", str(mount / "nomad-tls")],
                                cwd=tmp_path, capture_output=True, text=True,
                                check=False)  # fmt: skip
        assert inside.returncode == 0, inside.stderr
        assert (mount / "nomad-tls" / "manifest.json").is_file()
