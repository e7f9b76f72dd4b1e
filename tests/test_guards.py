"""Tests that go red when one of cfwrap's safety mechanisms is switched off (issue 13).

Each names the sabotage it guards against; ``scripts/sabotage`` applies each one to a throwaway
copy of the checkout and checks that these tests fail there. Every verdict comes from outside
cfwrap: cryptography, hashlib, the process table, the file system.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from cfwrap.errors import ExitCode
from tests.conftest import ROOT, cert_argv, snapshot
from tests.handmade import copy_kit, wrapped_cfssl

# --- sabotage: kit._check_issued returns at once --------------------------------------------


STRIP_PROFILE = """
args=()
while [ $# -gt 0 ]; do
    if [ "$1" = -profile ]; then shift 2; continue; fi
    args+=("$1"); shift
done
exec "$REAL" "${args[@]}"
"""


def test_a_certificate_from_cfssls_silent_default_profile_is_refused(cli, tmp_path):
    """Without -profile, real cfssl signs with the default (client auth only): refuse it."""
    fake = wrapped_cfssl(tmp_path / "strip", STRIP_PROFILE)
    out = tmp_path / "kit"
    result = cli("--cfssl-dir", fake, "quickstart", "--out", out)
    assert result.code == ExitCode.VERIFY_FAILED, result.err
    assert "extended key usage" in result.err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["strip"]


def test_a_certificate_signed_by_another_ca_is_refused(cli, tmp_path, kits, other_kit):
    swap = f"""
args=()
while [ $# -gt 0 ]; do
    case $1 in
        -ca) args+=(-ca {other_kit / "ca.pem"}); shift 2 ;;
        -ca-key) args+=(-ca-key {other_kit / "ca-key.pem"}); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
exec "$REAL" "${{args[@]}}"
"""
    fake = wrapped_cfssl(tmp_path / "swap", swap)
    node = tmp_path / "node"
    result = cli("--cfssl-dir", fake, *cert_argv(kits["global"], "client", node))
    assert result.code == ExitCode.VERIFY_FAILED, result.err
    assert "not signed by the CA" in result.err
    assert not node.exists()


# --- sabotage: no SIGTERM handler, or runner.stop_all does nothing -----------------------------


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, ExitCode.TERMINATED), (signal.SIGINT, ExitCode.INTERRUPTED)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_mid_run_stops_cfssl_and_leaves_nothing(tmp_path, sig, code):
    pids = tmp_path / "pids"
    # The process cfwrap starts records its pid, then is a long cfssl call (exec keeps the pid).
    fake = wrapped_cfssl(tmp_path / "slow", f"echo $$ >> {pids}\nexec sleep 60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfwrap", "--cfssl-dir", fake, "quickstart", "--out", "kit"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 30
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pids.exists(), "cfssl was never started"
    time.sleep(0.1)  # mid-run: the CA's cfssl call is in flight
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("slow", "pids"))
    assert leftovers == [], leftovers  # no kit, no staging folder, no lock file
    for pid in map(int, pids.read_text().split()):
        assert not _running(pid), f"the cfssl call cfwrap started (pid {pid}) still runs"


def _running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by init) does not run."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


# --- sabotage: the manifest's chain_verified / key_pair_verified hard-coded to true -------------


def test_manifest_verification_facts_match_cryptographys_own(cli, tmp_path, kits, other_kit):
    kit = copy_kit(kits["global"], tmp_path / "kit")
    # a certificate from another CA, and a key that belongs to another certificate
    for suffix in (".pem", "-key.pem"):
        (kit / f"global-client-nomad{suffix}").write_bytes(
            (other_kit / f"global-client-nomad{suffix}").read_bytes()
        )
    (kit / "global-cli-nomad-key.pem").write_bytes(
        (kits["global"] / "global-server-nomad-key.pem").read_bytes()
    )
    wrote = cli("manifest", "--write", kit)
    assert wrote.code == 0
    # Recorded as they are, and said: one warning line for each certificate that fails.
    assert sorted(wrote.err.splitlines()) == [
        f"cfwrap: warning: {kit}/global-cli-nomad.pem: its key file holds another key; recorded "
        "as it is: run `cfwrap doctor` on the folder before any node uses it",
        f"cfwrap: warning: {kit}/global-client-nomad.pem: it does not chain to a CA in the "
        "folder; recorded as it is: run `cfwrap doctor` on the folder before any node uses it",
    ]
    ca = x509.load_pem_x509_certificate((kit / "ca.pem").read_bytes())
    checked = 0
    for artifact in json.loads((kit / "manifest.json").read_text())["artifacts"]:
        info = artifact["certificate"]
        if info is None:
            continue
        cert = x509.load_pem_x509_certificate((kit / artifact["path"]).read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
            chained = True
        except Exception:  # any refusal by cryptography means: not chained
            chained = False
        assert info["chain_verified"] is chained, artifact["path"]
        key_file = kit / artifact["path"].replace(".pem", "-key.pem")
        if key_file.exists():
            key = load_pem_private_key(key_file.read_bytes(), None)
            assert info["key_pair_verified"] is (key.public_key() == cert.public_key())
        checked += 1
    verdicts = {
        a["path"]: (a["certificate"]["chain_verified"], a["certificate"]["key_pair_verified"])
        for a in json.loads((kit / "manifest.json").read_text())["artifacts"]
        if a["certificate"]
    }
    assert verdicts["global-client-nomad.pem"][0] is False
    assert verdicts["global-cli-nomad.pem"][1] is False
    assert checked == 4  # ca.pem and the three role certificates


# --- sabotage: check_lifetimes moved after the CA is made --------------------------------------


def test_a_leaf_outliving_its_ca_is_refused_before_cfssl_runs(cli, tmp_path):
    calls = tmp_path / "calls"
    fake = wrapped_cfssl(tmp_path / "rec", f'echo "$@" >> {calls}\nexec "$REAL" "$@"')
    result = cli("--cfssl-dir", fake, "quickstart", "--out", tmp_path / "kit", "--expiry", "50000h")
    assert result.code == ExitCode.INPUT
    assert "outlive its CA" in result.err
    assert not calls.exists(), "cfssl ran before the lifetimes were checked"
    assert not (tmp_path / "kit").exists()


# --- sabotage: an all-zero (or any fixed) gossip key -------------------------------------------


def test_gossip_keys_are_random(cli, tmp_path):
    keys = []
    for n in range(3):
        assert cli("quickstart", "--out", tmp_path / f"kit{n}").code == 0
        keys.append(base64.b64decode((tmp_path / f"kit{n}" / "gossip.key").read_text()))
    keys += [base64.b64decode(cli("keygen").out) for _ in range(3)]
    assert all(len(k) == 32 for k in keys)
    assert len(set(keys)) == len(keys), "two gossip keys are the same"
    assert all(len(set(k)) > 8 for k in keys), "a gossip key with too few distinct bytes"


def test_cert_into_an_existing_folder_leaves_it_alone_when_refused(cli, tmp_path, kits):
    """Checked by snapshot (hashlib and lstat), not by cfwrap's manifest comparer."""
    node = tmp_path / "node"
    assert cli(*cert_argv(kits["global"], "client", node)).code == 0
    before = snapshot(node)
    assert cli(*cert_argv(kits["global"], "client", node)).code == ExitCode.CONFLICT
    assert snapshot(node) == before
