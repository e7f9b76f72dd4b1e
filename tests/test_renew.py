"""``cfwrap renew``: due certificates renewed through a real signer or a local CA, once.

Certificates are made due by lifetime, not by faking the clock: a 24h certificate is inside a
30h window, and the signer's 48h renewals are not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cfwrap import files, parsers, verify
from tests.conftest import assert_kit_manifest, cert_argv, snapshot
from tests.test_signer import ROOT, RunningSigner, make_ca, start_signer
from tests.tlspeer import free_port


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSigner]:
    ca_dir = make_ca(tmp_path_factory.mktemp("renew"))
    running = start_signer(ca_dir, "--expiry", "48h")
    yield running
    assert running.stop()[0] == 143


def short_lived(cli, signer: RunningSigner, out: Path, role: str = "client") -> Path:
    """A 24h certificate from the signer's CA, made locally: due within 30h."""
    result = cli(*cert_argv(signer.ca_dir, role, out, "--expiry", "24h"))
    assert result.code == 0, result.err
    return out / f"global-{role}-nomad.pem"


def renew_argv(signer: RunningSigner, folder: Path, *extra: str | Path) -> list[str | Path]:
    return ["renew", folder, "--remote", f"127.0.0.1:{signer.port}",
            "--auth-key", signer.auth_dir / "client.key", "--ca", signer.ca_dir / "ca.pem",
            "--within", "30h", *extra]  # fmt: skip


def test_renew_twice_renews_once_and_execs_once(tmp_path, cli, signer):
    folder = tmp_path / "node"
    cert = short_lived(cli, signer, folder)
    old_cert, old_key = cert.read_bytes(), (folder / "global-client-nomad-key.pem").read_bytes()
    marker = tmp_path / "reloads"
    command = f"sh -c 'echo reload >> {marker}'"

    first = cli(*renew_argv(signer, folder, "--exec", command))
    assert first.code == 10, first.err
    assert first.out.strip() == str(cert)
    assert cert.read_bytes() != old_cert
    assert (folder / "global-client-nomad-key.pem").read_bytes() != old_key
    assert (folder / "global-client-nomad-key.pem").stat().st_mode & 0o777 == 0o600
    new = parsers.load_certificate(cert.read_bytes())
    roots = verify.load_pem_certificates((folder / "ca.pem").read_bytes())
    verify.check_issued(new, roots=roots, role="client", region="global", now=datetime.now(UTC))
    assert_kit_manifest(folder)

    before = snapshot(folder)
    second = cli(*renew_argv(signer, folder, "--exec", command))
    assert second.code == 0, second.err
    assert "nothing due within 30h" in second.err
    assert snapshot(folder) == before
    assert marker.read_text() == "reload\n"  # --exec ran exactly once


def test_keep_key_keeps_the_key(tmp_path, cli, signer):
    folder = tmp_path / "node"
    cert = short_lived(cli, signer, folder)
    key = (folder / "global-client-nomad-key.pem").read_bytes()
    old = cert.read_bytes()
    result = cli(*renew_argv(signer, folder, "--keep-key"))
    assert result.code == 10, result.err
    assert (folder / "global-client-nomad-key.pem").read_bytes() == key
    assert cert.read_bytes() != old
    assert_kit_manifest(folder)


def test_signer_down_fails_cleanly_and_runs_no_exec(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    before = snapshot(folder)
    marker = tmp_path / "reloads"
    argv = renew_argv(signer, folder, "--exec", f"touch {marker}")
    argv[argv.index("--remote") + 1] = f"127.0.0.1:{free_port()}"
    result = cli(*argv)
    assert result.code == 6, result.err
    assert "connection refused" in result.err and "the signer at https://" in result.err
    assert "cfssl failed" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert snapshot(folder) == before
    assert not marker.exists()
    # The signer back (here: the real one), the same command succeeds.
    assert cli(*renew_argv(signer, folder)).code == 10


def test_a_window_not_shorter_than_the_signers_lifetime_is_reported(tmp_path, cli):
    # The signer gives 24h: every renewal is inside a 30h window at once, so every run (every
    # timer tick) would renew again. The renewal lands, and the run fails, saying why.
    (tmp_path / "ca").mkdir()
    short = start_signer(make_ca(tmp_path / "ca"), "--expiry", "24h")
    try:
        folder = tmp_path / "node"
        cert = short_lived(cli, short, folder)
        old = cert.read_bytes()
        result = cli(*renew_argv(short, folder))
    finally:
        assert short.stop()[0] == 143
    assert result.code == 3, result.err
    assert (
        "cfwrap: error: global-client-nomad.pem: --within 30h: not shorter than the lifetime "
        "the signer gives (24h): every run renews it; give a window shorter" in result.err
    ), result.err
    assert "renewed 1, not due 0, failed 1" in result.err
    assert "Traceback" not in result.err
    assert result.out.strip() == str(cert)  # renewed all the same: it is a valid certificate
    assert cert.read_bytes() != old
    assert_kit_manifest(folder)


def test_a_renewal_that_ends_sooner_is_refused_and_the_folder_kept(tmp_path, cli):
    """A signer that gives 12h, for a certificate with 24h left: the renewal once replaced the
    better certificate, ran --exec, and then failed. Now it is refused before anything lands."""
    (tmp_path / "ca").mkdir()
    shorter = start_signer(make_ca(tmp_path / "ca"), "--expiry", "12h")
    marker = tmp_path / "reloads"
    try:
        folder = tmp_path / "node"
        short_lived(cli, shorter, folder)
        before = snapshot(folder)
        result = cli(*renew_argv(shorter, folder, "--exec", f"touch {marker}"))
    finally:
        assert shorter.stop()[0] == 143
    assert result.code == 7, result.err
    assert "cfwrap: error: global-client-nomad.pem: the signer's renewal: it ends " in result.err
    assert "before the certificate it would replace" in result.err
    assert "the folder is left as it was" in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert snapshot(folder) == before
    assert not marker.exists()


def test_a_failing_exec_has_its_own_code(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    result = cli(*renew_argv(signer, folder, "--exec", "false"))
    assert result.code == 11, result.err
    assert "--exec" in result.err


def test_an_exec_command_that_does_not_exist_is_named_as_such(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    result = cli(*renew_argv(signer, folder, "--exec", "nonexistent-cmd --flag"))
    assert result.code == 11, result.err
    line = result.err.strip().splitlines()[0]
    assert line.startswith("cfwrap: error: --exec: nonexistent-cmd: the --exec command was not")
    assert "cfssl" not in result.err and "install" not in result.err


def test_a_signer_of_another_ca_names_the_signer_and_the_fix(tmp_path, cli, signer):
    (tmp_path / "other").mkdir()
    other_ca = make_ca(tmp_path / "other")
    folder = tmp_path / "node"
    result = cli(*cert_argv(other_ca, "client", folder, "--expiry", "24h"))
    assert result.code == 0, result.err
    before = snapshot(folder)
    argv = renew_argv(signer, folder)
    argv[argv.index("--ca") + 1] = other_ca / "ca.pem"
    result = cli(*argv)
    assert result.code == 6, result.err
    assert f"the signer at https://127.0.0.1:{signer.port}: " in result.err
    assert f"did not verify against --ca {other_ca / 'ca.pem'}" in result.err
    assert "give the CA the signer was made from" in result.err
    assert "cfssl" not in result.err
    assert snapshot(folder) == before


def test_local_ca_renews_a_whole_kit(tmp_path, cli, kits):
    kit = shutil.copytree(kits["global"], tmp_path / "kit")
    old = {p.name: p.read_bytes() for p in kit.glob("*-nomad.pem")}
    result = cli("renew", kit, "--ca", kit / "ca.pem", "--ca-key", kit / "ca-key.pem",
                 "--within", "30d", "--force-renewal", "--json")  # fmt: skip
    assert result.code == 10, result.err
    assert len(result.out.split('"renewed"')[1].split("]")[0].split(",")) == 3
    roots = verify.load_pem_certificates((kit / "ca.pem").read_bytes())
    for name, data in old.items():
        assert (kit / name).read_bytes() != data
        role = name.split("-")[1]
        cert = parsers.load_certificate((kit / name).read_bytes())
        verify.check_issued(cert, roots=roots, role=role, region="global", now=datetime.now(UTC))
        facts = parsers.certificate_facts(cert)
        assert "nomad.example.com" in facts.dns_names or role == "cli"
    assert_kit_manifest(kit)
    again = cli("renew", kit, "--ca", kit / "ca.pem", "--ca-key", kit / "ca-key.pem",
                "--within", "30d")  # fmt: skip
    assert again.code == 0, again.err


@pytest.mark.parametrize("where", ["gossip.key", "server config"])
def test_the_gossip_key_never_shows_in_what_exec_printed(tmp_path, kits, where):
    """--exec's output is quoted when it fails, and logged with -v: the folder's gossip key in
    it is removed, as any private key is. A fresh process: nothing remembered from before."""
    kit = shutil.copytree(kits["global"], tmp_path / "kit")
    key = (kit / "gossip.key").read_text().strip()
    if where == "server config":  # a plan's server folder: the key is only in its HCL
        (kit / "gossip.key").unlink()
        assert f'encrypt = "{key}"' in (kit / "global-server.hcl").read_text()
    shown = tmp_path / "shown.txt"  # outside the folder: only what the folder holds counts
    shown.write_text(key + "\n")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cfwrap", "-v", "renew", kit, "--ca", kit / "ca.pem",
             "--ca-key", kit / "ca-key.pem", "--within", "30d", "--force-renewal",
             "--exec", f"sh -c 'echo key $(cat {shown}) rejected >&2; exit 1'"],
            capture_output=True, text=True, check=False, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    finally:
        shown.unlink()  # the key in a file: the suite's secret scan would rightly flag it
    assert done.returncode == 11, done.stderr
    assert "--exec: sh failed: key [secret removed] rejected (exit 1)" in done.stderr
    assert key not in done.stderr + done.stdout


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    ca = signer.ca_dir
    cases = [
        (["renew", folder, "--ca", ca / "ca.pem", "--within", "30h"], 2, "--remote"),
        ([*renew_argv(signer, folder)[:-2], "--within", "soon"], 3, "--within 'soon'"),
        (["renew", folder, "--ca", ca / "ca.pem", "--ca-key", ca / "ca-key.pem", "--within", "30h"],
         3, "every run would renew it"),
        (renew_argv(signer, empty), 3, "holds no role certificate"),
        (renew_argv(signer, folder, "--exec", "'unclosed"), 2, "--exec"),
        (renew_argv(signer, tmp_path / "missing"), 3, "No such file"),
    ]  # fmt: skip
    for argv, code, text in cases:
        before = snapshot(tmp_path)
        result = cli(*argv)
        assert result.code == code, (argv, result.err)
        assert text in result.err, (argv, result.err)
        assert len(result.err.strip().splitlines()) == 1
        assert "Traceback" not in result.err
        assert snapshot(tmp_path) == before


def test_a_second_run_at_once_is_refused(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    with files.FolderLock(folder.with_name("node.renew")):
        result = cli(*renew_argv(signer, folder))
    assert result.code == 4
    assert "another cfwrap renew is running" in result.err
    assert cli(*renew_argv(signer, folder)).code == 10


def test_the_real_command_exits_with_the_documented_codes(tmp_path, cli, signer):
    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    argv = [str(a) for a in renew_argv(signer, folder)]
    codes = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "cfwrap", *argv], capture_output=True, check=False, cwd=ROOT
        )
        codes.append(done.returncode)
    assert codes == [10, 0]
    help_text = subprocess.run(
        [sys.executable, "-m", "cfwrap", "renew", "--help"], capture_output=True, check=True,
        cwd=ROOT, text=True,
    ).stdout  # fmt: skip
    assert "0 nothing was due, 10 renewed" in help_text


def test_contrib_units_pass_systemd_analyze(tmp_path):
    analyzer = shutil.which("systemd-analyze")
    assert analyzer, "systemd-analyze is missing: ./scripts/test installs it"
    cfwrap_bin = ROOT / ".venv" / "bin" / "cfwrap"
    for name in ("cfwrap-renew.service", "cfwrap-renew.timer"):
        text = (ROOT / "contrib" / name).read_text()
        # The unit names the installed command; verify checks that it exists and is executable.
        (tmp_path / name).write_text(text.replace("/usr/local/bin/cfwrap", str(cfwrap_bin)))
    done = subprocess.run(
        [analyzer, "verify", "--man=no", "cfwrap-renew.service", "cfwrap-renew.timer"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    service = (ROOT / "contrib" / "cfwrap-renew.service").read_text()
    assert "SuccessExitStatus=10" in service and "--exec" in service
    timer = (ROOT / "contrib" / "cfwrap-renew.timer").read_text()
    assert "RandomizedDelaySec=" in timer and "Persistent=true" in timer


def test_one_damaged_certificate_file_does_not_stop_the_others(tmp_path, cli, kits):
    kit = shutil.copytree(kits["global"], tmp_path / "kit")
    (kit / "eu-server-nomad.pem").write_text("garbage\n")
    old = {p.name: p.read_bytes() for p in kit.glob("global-*-nomad.pem")}
    result = cli("renew", kit, "--ca", kit / "ca.pem", "--ca-key", kit / "ca-key.pem",
                 "--within", "30d", "--force-renewal")  # fmt: skip
    assert result.code == 3, result.err
    assert result.err.splitlines() == [
        "cfwrap: error: eu-server-nomad.pem: not renewed: not a PEM certificate (found: no PEM "
        "block); replace or remove it",
        "cfwrap: renewed 3, not due 0, failed 1",
    ]
    roots = verify.load_pem_certificates((kit / "ca.pem").read_bytes())
    for name, data in old.items():
        assert (kit / name).read_bytes() != data
        cert = parsers.load_certificate((kit / name).read_bytes())
        role = name.split("-")[1]
        verify.check_issued(cert, roots=roots, role=role, region="global", now=datetime.now(UTC))
    assert (kit / "eu-server-nomad.pem").read_text() == "garbage\n"


def test_a_window_a_fresh_renewal_would_fall_in_is_refused_up_front(tmp_path, cli):
    """cfssl starts a certificate 5 minutes back: a 3h certificate renewed has 2h55m left, so
    a 179m window renewed it on every run (and said "--within 2h ... (3h)")."""
    kit = tmp_path / "kit"
    assert cli("quickstart", "--out", kit, "--expiry", "3h").code == 0
    before = snapshot(kit)
    argv = ["renew", kit, "--ca", kit / "ca.pem", "--ca-key", kit / "ca-key.pem"]
    refused = cli(*argv, "--within", "179m")
    assert refused.code == 3, refused.err
    assert refused.err == (
        "cfwrap: error: --within 2h59m: not shorter than what a renewal of global-cli-nomad.pem "
        "has left when made (2h55m: its lifetime, 3h, less cfssl's 5-minute backdate): every run "
        "would renew it; give a window shorter than the lifetime, e.g. a third of it\n"
    )
    assert snapshot(kit) == before
    assert cli(*argv, "--within", "170m").code == 0  # not due: nothing to renew yet
    assert snapshot(kit) == before


def test_a_renewal_the_signer_got_wrong_names_the_signer(tmp_path, cli, signer):
    """The signer answers with a name the request did not ask for (here an address: its
    policy does not look at them). Refused before anything lands, and the message names the
    signer, not "the certificate cfssl issued ... check that cfssl is 1.6.5"."""
    from tests.test_remote_cert import Proxy, resigned

    folder = tmp_path / "node"
    short_lived(cli, signer, folder)
    before = snapshot(folder)

    def more(request: dict[str, object]) -> None:
        request["hosts"] = [*request["hosts"], "10.9.9.9"]  # type: ignore[misc]

    proxy = Proxy(signer).start()
    proxy.rewrite = resigned(signer, "client", more)
    try:
        argv = renew_argv(signer, folder)
        argv[argv.index("--remote") + 1] = proxy.address
        result = cli(*argv)
    finally:
        proxy.stop()
    assert result.code == 7, result.err
    assert f"the client certificate the signer at https://{proxy.address} issued" in result.err
    assert "10.9.9.9" in result.err and "cfssl" not in result.err
    assert snapshot(folder) == before
