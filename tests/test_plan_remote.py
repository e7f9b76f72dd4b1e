"""Plans through a central signer (``apply --remote``): a real ``cfwrap signer`` (multirootca)
on a loopback port issues every member's certificate; keys stay in the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.test_signer import ROOT, RunningSigner, make_ca, start_signer

PLAN = """\
out = "tree"
operators = ["alice"]

[regions.global]
servers = [{ name = "nomad-1", dns = ["nomad-1.example.com"], ip = ["10.0.0.11"] }]
clients = 1

[regions.eu]
servers = 1
clients = 1
"""


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSigner]:
    ca_dir = make_ca(tmp_path_factory.mktemp("plan-signer"))
    running = start_signer(
        ca_dir, "--region", "global", "--region", "eu", "--allow-dns", "example.com"
    )
    yield running
    code, err = running.stop()
    assert code == 143, err


def cfwrap(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cfwrap", *map(str, argv)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def remote_args(signer: RunningSigner) -> list[str]:
    return [
        "--remote", f"127.0.0.1:{signer.port}",
        "--auth-dir", str(signer.auth_dir),
        "--ca", str(signer.ca_dir / "ca.pem"),
    ]  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, and every folder's mtime."""
    seen: dict[str, tuple[bytes, int]] = {}
    for path in sorted(root.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        seen[str(path.relative_to(root))] = (data, path.stat().st_mtime_ns)
    return seen


def test_a_plan_is_issued_by_the_signer_and_keys_stay_here(tmp_path, signer):
    (tmp_path / "c.toml").write_text(PLAN)
    done = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Plan: 7 to add" in done.stdout
    assert "  + ca signer (the signer's CA, from --ca)" in done.stdout.splitlines()
    tree = tmp_path / "tree"
    assert not list((tree / "ca").glob("gen-*")), "a signer's tree has no CA of its own"
    ca_pem = (signer.ca_dir / "ca.pem").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert (tree / "ca" / "signer" / "ca.pem").read_bytes() == ca_pem
    folders = {
        "nodes/global/nomad-1": ("server", "global"),
        "nodes/global/client-1": ("client", "global"),
        "nodes/eu/server-1": ("server", "eu"),
        "nodes/eu/client-1": ("client", "eu"),
        "operators/alice": ("cli", "global"),
    }
    for folder, (role, region) in folders.items():
        here = tree / folder
        assert (here / "ca.pem").read_bytes() == ca_pem
        cert = x509.load_pem_x509_certificate((here / f"{region}-{role}-nomad.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"{role}.{region}.nomad" in names.get_values_for_type(x509.DNSName)
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        want = {ExtendedKeyUsageOID.CLIENT_AUTH}
        if role != "cli":
            want.add(ExtendedKeyUsageOID.SERVER_AUTH)
        assert ekus == want, folder
        key = here / f"{region}-{role}-nomad-key.pem"
        assert key.stat().st_mode & 0o777 == 0o600
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        assert load_pem_private_key(key.read_bytes(), None).public_key() == cert.public_key()
    extra = x509.load_pem_x509_certificate(
        (tree / "nodes/global/nomad-1/global-server-nomad.pem").read_bytes()
    )
    sans = extra.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "nomad-1.example.com" in sans.get_values_for_type(x509.DNSName)

    status = cfwrap("status", "c.toml", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert '"issuer": "signer"' in status.stdout

    before = snapshot(tree)
    forgot = cfwrap("apply", "c.toml", cwd=tmp_path)  # --remote forgotten, in cron say
    assert forgot.returncode == 3, forgot.stdout + forgot.stderr
    assert "issued by a central signer" in forgot.stderr
    assert snapshot(tree) == before
    again = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "No changes" in again.stdout
    assert snapshot(tree) == before


def test_remote_refusals_are_one_line_and_write_nothing(tmp_path, signer):
    (tmp_path / "c.toml").write_text(PLAN)
    rotate = cfwrap("apply", "c.toml", "--rotate-ca", *remote_args(signer), cwd=tmp_path)
    assert rotate.returncode == 3
    assert "rotated at the signer" in rotate.stderr
    half = cfwrap("apply", "c.toml", "--remote", f"127.0.0.1:{signer.port}", cwd=tmp_path)
    assert half.returncode == 3 and "go together" in half.stderr
    keys = tmp_path / "keys"
    shutil.copytree(signer.auth_dir, keys)
    (keys / "cli.key").unlink()
    args = remote_args(signer)
    args[3] = str(keys)
    missing = cfwrap("apply", "c.toml", *args, cwd=tmp_path)
    assert missing.returncode == 3 and "cli.key" in missing.stderr
    for result in (rotate, half, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "tree").exists()


def test_a_name_the_signer_refuses_leaves_the_tree_as_it_was(tmp_path, signer):
    (tmp_path / "c.toml").write_text(PLAN)
    assert cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path).returncode == 0
    tree = tmp_path / "tree"
    before = snapshot(tree)
    (tmp_path / "c.toml").write_text(PLAN.replace('"nomad-1.example.com"', '"nomad-1.example.org"'))
    refused = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert snapshot(tree) == before


def test_a_tree_with_its_own_ca_is_not_issued_by_a_signer(tmp_path, signer):
    (tmp_path / "c.toml").write_text(PLAN)
    assert cfwrap("apply", "c.toml", cwd=tmp_path).returncode == 0
    mixed = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert mixed.returncode == 3
    assert "has its own CA" in mixed.stderr


def test_the_signers_ca_the_tree_keeps_is_written_only_once_the_signer_proved_it(tmp_path, signer):
    """A wrong --ca once replaced ca/signer/ca.pem before the signer was dialled (the run then
    failed, and the wrong CA stayed); a deleted one was never put back (status: "no CA yet"
    for good); a first apply to a signer that was down bound the tree to a signer for good."""
    (tmp_path / "c.toml").write_text(PLAN)
    down = remote_args(signer)
    down[1] = "127.0.0.1:1"
    failed = cfwrap("apply", "c.toml", *down, cwd=tmp_path)
    assert failed.returncode == 6, failed.stderr
    assert failed.stderr.startswith("cfwrap: error: the signer at https://127.0.0.1:1: ")
    assert "cfssl" not in failed.stderr
    assert not (tmp_path / "tree").exists()  # no trace of a first run that made nothing
    assert cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path).returncode == 0
    tree = tmp_path / "tree"
    kept = tree / "ca/signer/ca.pem"
    (tmp_path / "other").mkdir()
    other = make_ca(tmp_path / "other")
    wrong = remote_args(signer)
    wrong[5] = str(other / "ca.pem")
    before = snapshot(tree)
    refused = cfwrap("apply", "c.toml", *wrong, cwd=tmp_path)
    assert refused.returncode == 3, refused.stdout + refused.stderr  # before any dial
    assert "--ca: is not the CA this tree was issued by" in refused.stderr
    assert snapshot(tree) == before
    # Swapped by hand: status says so; deleted: apply puts it back from --ca.
    kept.write_bytes((other / "ca.pem").read_bytes())
    status = cfwrap("status", "c.toml", cwd=tmp_path)
    assert status.returncode == 9, status.stdout
    assert "not the signer's CA the plan manifest records" in status.stdout
    kept.write_bytes((signer.ca_dir / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    status = cfwrap("status", "c.toml", cwd=tmp_path)
    assert status.returncode == 9, status.stdout  # the right CA, and another after it
    kept.unlink()
    status = cfwrap("status", "c.toml", cwd=tmp_path)
    assert status.returncode == 9
    assert "is gone: run apply --remote" in status.stdout, status.stdout
    again = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "  + ca signer (the signer's CA, from --ca)" in again.stdout.splitlines()
    assert kept.read_bytes() == (signer.ca_dir / "ca.pem").read_bytes()
    assert cfwrap("status", "c.toml", cwd=tmp_path).returncode == 0
    kept.unlink()
    kept.mkdir()  # a dry run promised "+ ca signer", and the apply then failed (exit 8)
    for extra in (["--dry-run"], []):
        folder = cfwrap("apply", "c.toml", *extra, *remote_args(signer), cwd=tmp_path)
        assert folder.returncode == 4, folder.stdout + folder.stderr
        assert len(folder.stderr.strip().splitlines()) == 1, folder.stderr
        assert "ca.pem: is a folder, not a regular file; remove it" in folder.stderr


def test_a_first_run_that_fails_writing_the_signers_ca_can_be_run_again(
    tmp_path, signer, monkeypatch, capsys
):
    """The signer's CA marks a first run's folder as a plan's tree: written after the gossip
    key, a failure between the two left a folder every later command refused ("holds files,
    but no plan's tree")."""
    from cfwrap.cli import main
    from cfwrap.plan import apply

    (tmp_path / "c.toml").write_text(PLAN)

    def full(*_: object) -> None:  # the disk fills (or the run is killed) right there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(apply._Run, "_keep_signer_ca", full)
    assert main(["apply", str(tmp_path / "c.toml"), *remote_args(signer)]) == 8
    monkeypatch.undo()
    capsys.readouterr()
    again = cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert cfwrap("status", "c.toml", cwd=tmp_path).returncode == 0


def test_another_signers_ca_is_refused_never_a_reissue_of_the_fleet(tmp_path, signer):
    """A second signer, with a CA of its own, answers as well as the first: an apply through it
    once reissued every member under its CA at once (bundles trusting it alone), a rotation
    without its phases that cuts the cluster in two. It is refused, dry run too."""
    (tmp_path / "c.toml").write_text(PLAN)
    assert cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path).returncode == 0
    tree = tmp_path / "tree"
    before = snapshot(tree)
    (tmp_path / "other").mkdir()
    other = start_signer(
        make_ca(tmp_path / "other"), "--region", "global", "--region", "eu",
        "--allow-dns", "example.com",
    )  # fmt: skip
    try:
        for extra in (["--dry-run"], []):
            refused = cfwrap("apply", "c.toml", *extra, *remote_args(other), cwd=tmp_path)
            assert refused.returncode == 3, refused.stdout + refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert "Traceback" not in refused.stderr
            assert "--ca: is not the CA this tree was issued by" in refused.stderr
            assert "give the plan a new out" in refused.stderr
        assert snapshot(tree) == before
        # A new out is a new tree: the other signer issues it whole.
        (tmp_path / "c.toml").write_text(PLAN.replace('out = "tree"', 'out = "tree-2"'))
        moved = cfwrap("apply", "c.toml", *remote_args(other), cwd=tmp_path)
        assert moved.returncode == 0, moved.stderr
    finally:
        code, err = other.stop()
        assert code == 143, err
    leaf = x509.load_pem_x509_certificate(
        (tmp_path / "tree-2/nodes/eu/client-1/eu-client-nomad.pem").read_bytes()
    )
    ca = x509.load_pem_x509_certificate((other.ca_dir / "ca.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert snapshot(tree) == before
    # With no tree yet nothing records a CA: a wrong --ca fails on TLS, and leaves no trace.
    (tmp_path / "c.toml").write_text(PLAN.replace('out = "tree"', 'out = "tree-3"'))
    wrong = remote_args(signer)
    wrong[5] = str(other.ca_dir / "ca.pem")
    failed = cfwrap("apply", "c.toml", *wrong, cwd=tmp_path)
    assert failed.returncode == 6, failed.stdout + failed.stderr
    assert "its TLS certificate did not verify against --ca" in failed.stderr  # named
    assert not (tmp_path / "tree-3").exists()


def test_a_ca_file_with_more_than_the_ca_is_refused(tmp_path, signer):
    """--ca's bytes become every member's bundle: a file with the right CA first and another
    CA (or the CA's key) after it passed the check of the CA and landed in every ca.pem."""
    (tmp_path / "c.toml").write_text(PLAN)
    assert cfwrap("apply", "c.toml", *remote_args(signer), cwd=tmp_path).returncode == 0
    tree = tmp_path / "tree"
    before = snapshot(tree)
    (tmp_path / "other").mkdir()
    other = make_ca(tmp_path / "other")
    ca = (signer.ca_dir / "ca.pem").read_bytes()
    for name, data in (
        ("both.pem", ca + (other / "ca.pem").read_bytes()),
        ("withkey.pem", ca + (signer.ca_dir / "ca-key.pem").read_bytes()),
    ):
        (tmp_path / name).write_bytes(data)
        args = remote_args(signer)
        args[5] = str(tmp_path / name)
        try:
            refused = cfwrap("apply", "c.toml", *args, "--renew-within", "36500d", cwd=tmp_path)
        finally:
            (tmp_path / name).unlink()  # a key outside its CA folder: the secret scan flags it
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "holds 2 PEM blocks" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "PRIVATE KEY" not in refused.stderr
        assert snapshot(tree) == before
    for bundle in tree.rglob("ca.pem"):
        assert bundle.read_bytes() == ca
