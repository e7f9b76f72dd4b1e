"""`cfwrap status`: healthy, expiring, tampered and missing certificates, and `--connect` against
loopback TLS peers the test starts."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.test_plan import CFWRAP, applied, one_line_error, tree_state, write_plan
from tests.tlspeer import free_port

PLAN = """\
out = "tree"
leaf_expiry = "{expiry}"
operators = ["alice"]

[regions.eu]
clients = 1

[[regions.eu.servers]]
name = "nomad-1"
address = "127.0.0.1:{port1}"

[[regions.eu.servers]]
name = "nomad-2"
address = "127.0.0.1:{port2}"

[[regions.eu.servers]]
name = "nomad-3"
address = "127.0.0.1:{port3}"
"""

NODES = ["eu/nomad-1", "eu/nomad-2", "eu/nomad-3", "eu/client-1", "operators/alice"]
#: The servers' gossip key has a row of its own.
GOSSIP = {"gossip.key": "ok"}


def _plan(folder: Path, *, expiry: str = "2160h", ports: tuple[int, int, int] = (1, 2, 3)) -> Path:
    port1, port2, port3 = ports
    return write_plan(folder, PLAN.format(expiry=expiry, port1=port1, port2=port2, port3=port3))


def _table(out: str) -> dict[str, str]:
    """NODE -> STATE column of the printed table."""
    rows = {}
    for line in out.splitlines()[1:-1]:
        parts = line.split()
        node = " ".join(parts[:2]) if parts[0] == "ca" else parts[0]
        state = line[line.rindex("  ") + 2 :] if "  " in line else parts[-1]
        rows[node] = state.split(":")[0].strip()
    return rows


def test_healthy_plan_is_all_ok(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    result = cli("status", plan)
    assert result.code == 0, result.out
    table = _table(result.out)
    assert table == {"ca gen-1": "ok", **dict.fromkeys(NODES, "ok"), **GOSSIP}, result.out
    assert result.out.splitlines()[-1] == "7 ok, 0 need action (phase: steady)"
    data = json.loads(cli("status", plan, "--json").out)
    assert data["needs_action"] == 0
    assert data["phase"] == "steady"
    rows = {r["node"]: r for r in data["certificates"]}
    assert {n: r["state"] for n, r in rows.items()} == table
    assert rows["eu/nomad-1"]["issuer"] == "gen-1"
    assert rows["eu/nomad-1"]["role"] == "server"
    assert rows["operators/alice"]["role"] == "cli"
    assert 89 < rows["eu/client-1"]["days_left"] <= 90


def test_expiring_plan_needs_action(cli, tmp_path):
    plan = _plan(tmp_path, expiry="240h")
    applied(cli, plan)
    result = cli("status", plan, "--within", "30d")
    assert result.code == 9, result.out
    table = _table(result.out)
    assert table == {"ca gen-1": "ok", **dict.fromkeys(NODES, "expiring"), **GOSSIP}, result.out
    data = json.loads(cli("status", plan, "--within", "30d", "--json").out)
    assert data["needs_action"] == len(NODES)
    leaves = [r for r in data["certificates"] if r["role"] not in ("ca", "gossip-key")]
    assert len(leaves) == len(NODES)
    assert all(9 < r["days_left"] <= 10 for r in leaves)
    # Outside the window, the same tree is healthy.
    assert cli("status", plan, "--within", "9d").code == 0
    # And the installed command exits 9 too (cron and monitoring read the code).
    run = subprocess.run(
        [CFWRAP, "status", plan, "--within", "30d"], capture_output=True, timeout=60, check=False
    )
    assert run.returncode == 9, run.stderr


def test_tampered_certificate_or_hcl_is_changed_and_apply_refuses_it(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    root = tmp_path / "tree"
    # nomad-2's certificate replaced by nomad-1's (valid, same names, other bytes); one byte of
    # client-1's HCL changed.
    cert = root / "nodes/eu/nomad-2/eu-server-nomad.pem"
    cert.write_bytes((root / "nodes/eu/nomad-1/eu-server-nomad.pem").read_bytes())
    hcl = root / "nodes/eu/client-1/eu-client.hcl"
    text = hcl.read_text()
    assert "verify_https_client    = true" in text
    hcl.write_text(text.replace("verify_https_client    = true", "verify_https_client    = True"))
    result = cli("status", plan)
    assert result.code == 9
    table = _table(result.out)
    assert table["eu/nomad-2"] == "changed", result.out
    assert table["eu/client-1"] == "changed", result.out
    assert table["eu/nomad-1"] == table["eu/nomad-3"] == "ok"
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["eu/client-1"]["detail"] == "eu-client.hcl changed"
    assert rows["eu/nomad-2"]["detail"] == "eu-server-nomad.pem changed"
    # apply will not overwrite what someone changed by hand: one line, exit 4, nothing written.
    before = tree_state(root)
    line = one_line_error(cli("apply", plan), 4)
    assert "changed on disk" in line
    assert "nodes/eu/" in line
    assert tree_state(root) == before


def test_a_damaged_certificate_is_changed_not_missing(cli, tmp_path):
    """One flipped bit in a node's certificate: the file is there, changed on disk.

    ``status`` reports ``missing`` (with the detail "eu-server-nomad.pem changed"): a
    certificate that no longer parses takes the missing branch of ``status._member_row``.
    """
    plan = _plan(tmp_path)
    applied(cli, plan)
    cert = tmp_path / "tree/nodes/eu/nomad-2/eu-server-nomad.pem"
    data = bytearray(cert.read_bytes())
    data[100] ^= 0x01
    cert.write_bytes(bytes(data))
    result = cli("status", plan)
    assert result.code == 9
    assert _table(result.out)["eu/nomad-2"] == "changed", result.out


def test_planned_node_not_applied_is_missing(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    plan.write_text(plan.read_text() + '\n[[regions.eu.servers]]\nname = "nomad-4"\n')
    result = cli("status", plan)
    assert result.code == 9
    assert _table(result.out)["eu/nomad-4"] == "missing", result.out
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["eu/nomad-4"]["days_left"] is None
    assert rows["eu/nomad-4"]["detail"] == "not issued yet: run apply"
    assert {n: r["state"] for n, r in rows.items() if n != "eu/nomad-4"} == {
        "ca gen-1": "ok", **dict.fromkeys(NODES, "ok"), **GOSSIP
    }  # fmt: skip


def test_a_missing_or_damaged_gossip_key_needs_action_and_apply_keeps_the_clusters_key(
    cli, tmp_path
):
    # Deleting gossip.key once made apply write a new key into every server's agent file:
    # the running cluster's key was then gone from the tree, and new servers would not join.
    plan = _plan(tmp_path)
    applied(cli, plan)
    root = tmp_path / "tree"
    key_file = root / "gossip.key"
    key = key_file.read_text().strip()
    server_hcl = root / "nodes/eu/nomad-1/eu-server.hcl"
    assert f'encrypt = "{key}"' in server_hcl.read_text()
    key_file.unlink()
    result = cli("status", plan)
    assert result.code == 9, result.out
    assert _table(result.out)["gossip.key"] == "missing", result.out
    before = tree_state(root)
    for argv in (("apply", plan), ("apply", plan, "--dry-run")):
        line = one_line_error(cli(*argv), 4)
        assert "gossip.key: is missing, but 3 servers' agent files hold" in line, line
        assert key not in line
    assert tree_state(root) == before
    key_file.write_text("not a key\n")
    row = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert (row["gossip.key"]["state"], row["gossip.key"]["role"]) == ("changed", "gossip-key")
    # Renaming the servers while it is missing does not make a new key either: the servers
    # on disk (retired by this apply, still running) hold the cluster's key.
    key_file.unlink()
    before = tree_state(root)
    renamed = write_plan(tmp_path, plan.read_text().replace("nomad-", "srv-"), name="renamed.toml")
    line = one_line_error(cli("apply", renamed), 4)
    assert "gossip.key: is missing, but 3 servers' agent files hold" in line, line
    assert tree_state(root) == before
    key_file.write_text(key + "\n")
    key_file.chmod(0o644)
    row = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert row["gossip.key"]["detail"].startswith("mode 0644"), row
    line = one_line_error(cli("apply", plan), 4)
    assert "gossip.key: has mode 0644, but it holds the servers' shared secret" in line
    key_file.chmod(0o600)
    assert cli("status", plan).code == 0
    assert "No changes" in applied(cli, plan).out
    assert f'encrypt = "{key}"' in server_hcl.read_text()


def test_a_key_mode_and_a_ca_file_changed_on_disk_are_changed(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    root = tmp_path / "tree"
    (root / "nodes/eu/nomad-1/eu-server-nomad-key.pem").chmod(0o644)
    with (root / "ca/gen-1/ca.pem").open("a") as f:
        f.write("x\n")
    result = cli("status", plan)
    assert result.code == 9
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["eu/nomad-1"]["state"] == "changed"
    assert rows["eu/nomad-1"]["detail"] == (
        "eu-server-nomad-key.pem has mode 0644, its manifest says 0600"
    )
    assert rows["ca gen-1"]["state"] == "changed"
    assert rows["ca gen-1"]["detail"].startswith("ca.pem: content changed")
    # apply refuses both: the CA first (every bundle and signature comes from it).
    before = tree_state(root)
    line = one_line_error(cli("apply", plan), 4)
    assert "ca/gen-1: changed on disk since cfwrap wrote it: ca.pem: content changed" in line
    ca_pem = root / "ca/gen-1/ca.pem"
    ca_pem.write_bytes(ca_pem.read_bytes().removesuffix(b"x\n"))
    (root / "ca/gen-1/ca-key.pem").chmod(0o644)
    line = one_line_error(cli("apply", plan), 4)
    assert "ca/gen-1: changed on disk since cfwrap wrote it: ca-key.pem: mode 0644" in line
    (root / "ca/gen-1/ca-key.pem").chmod(0o600)
    line = one_line_error(cli("apply", plan), 4)
    assert "nodes/eu/nomad-1: changed on disk" in line and "mode 0644" in line, line
    assert {k: v for k, v in tree_state(root).items() if k != "ca/gen-1/ca.pem"} == {
        k: v for k, v in before.items() if k != "ca/gen-1/ca.pem"
    }


def test_a_foreign_ca_appended_to_the_ca_never_reaches_a_bundle(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    other = write_plan(tmp_path / "other", 'out = "tree"\n[regions.eu]\n')
    applied(cli, other)
    root = tmp_path / "tree"
    with (root / "ca/gen-1/ca.pem").open("ab") as f:
        f.write((tmp_path / "other/tree/ca/gen-1/ca.pem").read_bytes())
    before = tree_state(root)
    for argv in (("apply", plan), ("apply", plan, "--dry-run")):
        line = one_line_error(cli(*argv), 4)
        assert "ca/gen-1: changed on disk since cfwrap wrote it" in line, line
    assert tree_state(root) == before
    assert (root / "nodes/eu/nomad-1/ca.pem").read_bytes().count(b"BEGIN") == 1


def test_a_folder_copied_from_another_node_is_changed_and_apply_refuses_it(cli, tmp_path):
    # nomad-2's files (its manifest too) copied over nomad-1's: each folder agrees with its own
    # manifest, but two servers now share one key. status compares each certificate with the
    # plan manifest's record; apply refuses two members holding one certificate.
    plan = _plan(tmp_path)
    applied(cli, plan)
    root = tmp_path / "tree"
    for path in (root / "nodes/eu/nomad-2").iterdir():
        (root / "nodes/eu/nomad-1" / path.name).write_bytes(path.read_bytes())
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["eu/nomad-1"]["state"] == "changed"
    assert rows["eu/nomad-1"]["detail"].startswith(
        "its certificate is not the one the plan manifest records"
    )
    assert rows["eu/nomad-2"]["state"] == "ok"
    before = tree_state(root)
    line = one_line_error(cli("apply", plan), 4)
    assert "nodes/eu/nomad-1: holds the same certificate (and so the same key) as " in line
    assert tree_state(root) == before


def test_an_apply_that_did_not_finish_shows_in_status_until_the_next_apply(cli, tmp_path):
    # An apply writes its plan manifest last: one cut short (Ctrl-C, a full disk) leaves
    # renewed folders the manifest does not record. Here the old manifest is put back.
    plan = _plan(tmp_path)
    applied(cli, plan)
    root = tmp_path / "tree"
    old_manifest = (root / "plan-manifest.json").read_bytes()
    applied(cli, plan, "--renew-within", "400d")
    (root / "plan-manifest.json").write_bytes(old_manifest)
    result = cli("status", plan)
    assert result.code == 9
    assert {_table(result.out)[n] for n in NODES} == {"changed"}, result.out
    healed = applied(cli, plan)
    assert healed.out.splitlines() == [
        "No changes. The tree matches the plan.",
        "The plan manifest was rewritten to match the tree (the plan file changed, or an "
        "earlier apply did not finish).",
    ]
    assert cli("status", plan).code == 0


def test_status_reads_a_plan_manifest_formatted_by_hand(cli, tmp_path):
    # jq, or json.dump with an indent: one member over several lines, in another order.
    plan = _plan(tmp_path)
    applied(cli, plan)
    path = tmp_path / "tree/plan-manifest.json"
    data = json.loads(path.read_text())
    data["members"].reverse()
    path.write_text(json.dumps(data, indent=2))
    result = cli("status", plan)
    assert (result.code, result.err) == (0, ""), result.out + result.err
    assert set(_table(result.out).values()) == {"ok"}


def test_a_region_renamed_only_in_case_is_refused(cli, tmp_path):
    # To Go, EU and eu are one name: two intermediates and two folders for one region.
    text = 'out = "tree"\n[ca]\nintermediates = true\n[regions.global]\n[regions.eu]\n'
    plan = write_plan(tmp_path, text)
    applied(cli, plan)
    before = tree_state(tmp_path / "tree")
    plan.write_text(text.replace("[regions.eu]", "[regions.EU]"))
    for argv in (("apply", plan), ("apply", plan, "--dry-run")):
        line = one_line_error(cli(*argv), 4)
        assert "the tree's region 'eu' and the plan's 'EU' differ only in case" in line, line
    assert tree_state(tmp_path / "tree") == before


def test_an_intermediates_key_mode_or_an_extra_certificate_is_changed(cli, tmp_path):
    plan = write_plan(
        tmp_path, 'out = "tree"\n[ca]\nintermediates = true\n[regions.eu]\nservers = 1\n'
    )
    applied(cli, plan)
    gen = tmp_path / "tree/ca/gen-1"
    (gen / "eu/ca-key.pem").chmod(0o644)
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["ca gen-1 eu"]["state"] == "changed"
    assert rows["ca gen-1 eu"]["detail"] == "eu/ca-key.pem has mode 0644, cfwrap wrote it 0600"
    assert "ca/gen-1/eu: changed on disk" in one_line_error(cli("apply", plan), 4)
    (gen / "eu/ca-key.pem").chmod(0o600)
    with (gen / "eu/ca.pem").open("ab") as f:
        f.write((gen / "ca.pem").read_bytes())
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["ca gen-1 eu"]["detail"] == "eu/ca.pem holds more than its one certificate"
    assert "ca/gen-1/eu: changed on disk" in one_line_error(cli("apply", plan), 4)


def test_gossip_turned_on_later_makes_a_key_even_where_paths_say_encrypt(cli, tmp_path):
    # No server holds a key while gossip is off: turning it on makes one. A node_tls_dir with
    # "encrypt" in it is a path, not a key (the check reads the setting, not the word).
    text = (
        'out = "tree"\ngossip = false\nnode_tls_dir = "/etc/nomad.d/encrypted/tls"\n'
        "[regions.eu]\nservers = 2\n"
    )
    plan = write_plan(tmp_path, text)
    applied(cli, plan)
    plan.write_text(text.replace("gossip = false", "gossip = true"))
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert (rows["gossip.key"]["state"], rows["gossip.key"]["detail"]) == (
        "missing",
        "not made yet: run apply",
    )
    result = applied(cli, plan)
    assert "+ gossip.key (the servers' gossip key)" in result.out
    key = (tmp_path / "tree/gossip.key").read_text().strip()
    assert f'encrypt = "{key}"' in (tmp_path / "tree/nodes/eu/server-1/eu-server.hcl").read_text()
    assert cli("status", plan).code == 0


def test_a_region_folder_its_members_left_empty_does_not_block_a_case_rename(cli, tmp_path):
    text = 'out = "tree"\n[regions.global]\n[regions.EU]\n'
    plan = write_plan(tmp_path, text)
    applied(cli, plan)
    plan.write_text('out = "tree"\n[regions.global]\n')
    applied(cli, plan)  # EU's members are retired; its folder stays, empty
    assert list((tmp_path / "tree/nodes/EU").iterdir()) == []
    plan.write_text('out = "tree"\n[regions.global]\n[regions.eu]\n')
    assert "+ eu/server-1 (server)" in applied(cli, plan).out


def test_apply_json_carries_every_note(cli, tmp_path):
    plan = _plan(tmp_path)
    applied(cli, plan)
    plan.write_text(plan.read_text() + '\n[ca]\ncommon_name = "Other CA"\n')
    data = json.loads(applied(cli, plan, "--json").out)
    assert data["changes"] == []
    assert [n.split(" (")[0] for n in data["notes"]] == [
        "The plan's ca settings differ from CA gen-1",
        "The plan manifest was rewritten to match the tree",
    ]


def test_status_of_a_plan_never_applied(cli, tmp_path):
    plan = _plan(tmp_path)
    result = cli("status", plan)
    assert result.code == 9
    assert set(_table(result.out).values()) == {"missing"}
    assert not (tmp_path / "tree").exists()


@contextmanager
def _tls_server(port: int, cert: Path, key: Path, ca: Path) -> Iterator[None]:
    """A loopback TLS server that serves ``cert`` to every connection until the block ends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_connect_compares_what_each_node_serves(cli, tmp_path):
    ports = (free_port(), free_port(), free_port())
    assert len(set(ports)) == 3
    plan = _plan(tmp_path, ports=ports)
    applied(cli, plan)
    root = tmp_path / "tree" / "nodes" / "eu"

    def files(node: str) -> tuple[Path, Path, Path]:
        folder = root / node
        return folder / "eu-server-nomad.pem", folder / "eu-server-nomad-key.pem", folder / "ca.pem"

    # nomad-1 serves its own certificate, nomad-2 serves nomad-1's, nomad-3 is not listening.
    with _tls_server(ports[0], *files("nomad-1")), _tls_server(ports[1], *files("nomad-1")):
        result = cli("status", plan, "--connect")
        data = json.loads(cli("status", plan, "--connect", "--json").out)
    assert result.code == 9, result.out
    table = _table(result.out)
    assert table["eu/nomad-1"] == "ok", result.out
    assert table["eu/nomad-2"] == "serving-other", result.out
    assert table["eu/nomad-3"] == "unreachable", result.out
    assert table["eu/client-1"] == "ok"  # no address: not dialled
    rows = {r["node"]: r for r in data["certificates"]}
    assert rows["eu/nomad-1"]["served"] == "same"
    assert rows["eu/nomad-2"]["served"] == "other"
    assert rows["eu/nomad-3"]["served"] == "-"
    assert rows["eu/client-1"]["served"] is None
    assert {n: r["state"] for n, r in rows.items()} == table
    # With every node serving its own certificate, --connect is all ok.
    with (
        _tls_server(ports[0], *files("nomad-1")),
        _tls_server(ports[1], *files("nomad-2")),
        _tls_server(ports[2], *files("nomad-3")),
    ):
        assert cli("status", plan, "--connect").code == 0


def test_connect_on_a_damaged_folder_or_an_unusable_operator_key_gives_rows(cli, tmp_path):
    """Once a traceback (a certificate that does not parse) or exit 3 naming doctor's flags
    (the operator's key swapped, a bundle gone) for the whole table: now each is a row."""
    ports = (free_port(), free_port(), free_port())
    plan = _plan(tmp_path, ports=ports)
    applied(cli, plan)
    eu = tmp_path / "tree/nodes/eu"

    def served(node: str) -> tuple[Path, Path, Path]:
        folder = eu / node
        return folder / "eu-server-nomad.pem", folder / "eu-server-nomad-key.pem", folder / "ca.pem"

    (eu / "nomad-1/eu-server-nomad.pem").write_text("garbage\n")
    (eu / "nomad-2/ca.pem").unlink()
    alice = tmp_path / "tree/operators/alice/eu-cli-nomad-key.pem"
    alice.write_bytes((eu / "nomad-3/eu-server-nomad-key.pem").read_bytes())
    with (
        _tls_server(ports[0], *served("nomad-3")),
        _tls_server(ports[1], *served("nomad-3")),
        _tls_server(ports[2], *served("nomad-3")),
    ):
        result = cli("status", plan, "--connect", "--json")
    assert result.code == 9, result.err
    assert "Traceback" not in result.err
    rows = {r["node"]: r for r in json.loads(result.out)["certificates"]}
    assert rows["eu/nomad-1"]["state"] == "changed"  # not dialled: not the tree's certificate
    assert rows["eu/nomad-1"]["served"] is None
    assert rows["eu/nomad-2"]["state"] == "changed"
    assert rows["eu/nomad-2"]["detail"] == "ca.pem is gone"
    assert rows["operators/alice"]["state"] == "changed"
    # Dialled without the operator's unusable pair: the agent does not demand one here.
    assert rows["eu/nomad-3"]["state"] == "ok"
    assert rows["eu/nomad-3"]["served"] == "same"


def test_connect_dials_every_node_at_once(cli, tmp_path):
    """Three agents that accept and never answer: dialled one after another, each waited out
    its timeout in turn (ten seconds a node). The listener lets go once all three are open."""
    port = free_port()
    plan = _plan(tmp_path, ports=(port, port, port))
    applied(cli, plan)
    listener = socket.create_server(("127.0.0.1", port), backlog=16)
    listener.settimeout(0.2)
    most = 0
    stop = threading.Event()

    def hold() -> None:
        nonlocal most
        held: list[socket.socket] = []
        while not stop.is_set() and len(held) < 3:
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            most = max(most, sum(map(_still_open, held)))
        for conn in held:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        result = cli("status", plan, "--connect")
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert most == 3, "the three dials were never open at the same time"
    table = _table(result.out)
    assert [table[f"eu/nomad-{i}"] for i in (1, 2, 3)] == ["unreachable"] * 3, result.out


def _still_open(conn: socket.socket) -> bool:
    """The peer has not closed ``conn`` (what it sent so far is read and dropped)."""
    try:
        while conn.recv(65536, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def test_status_and_a_dry_run_wait_out_an_apply_at_work(cli, tmp_path):
    """A real apply of 400 clients runs beside them: while it holds the tree, status and a dry
    run say so (exit 4, one line) instead of reporting a half-written tree as changed; with
    --wait they answer once it ends. They take no lock: the apply never sees them."""
    import time

    plan = write_plan(tmp_path, 'out = "tree"\n[regions.global]\nclients = 400\n')
    lock = tmp_path / ".tree.cfwrap.lock"
    busy = subprocess.Popen(
        [CFWRAP, "apply", plan], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not lock.exists() and busy.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.exists(), "the apply ended before it was seen at work"
        for argv in (("status", plan), ("apply", plan, "--dry-run")):
            line = one_line_error(cli(*argv), 4)
            assert line == (
                f"cfwrap: error: {tmp_path / 'tree'}: an apply is writing this tree now; run "
                "this again when it ends, or pass --wait SECONDS"
            ), line
        waited = cli("status", plan, "--wait", "120")
    finally:
        _, err = busy.communicate(timeout=120)
    assert busy.returncode == 0, err
    assert waited.code == 0, waited.err  # every row ok: it read the tree the apply finished
    assert "403 ok, 0 need action" in waited.out  # the CA, 400 clients, 1 server, gossip.key
    assert "No changes" in cli("apply", plan, "--dry-run", "--wait", "5").out


def test_a_read_an_apply_overlapped_is_refused_or_read_again(cli, tmp_path, monkeypatch):
    """An apply that starts and ends while status reads rewrites the plan manifest: what was
    read may be half the old tree. Status says to run it again; with --wait it reads again."""
    from cfwrap.plan import status

    plan = write_plan(tmp_path, 'out = "tree"\n[regions.global]\nclients = 2\n')
    applied(cli, plan)
    read = status.rows
    reads = []

    def rows_while_an_apply_runs(*args, **kwargs):
        found = read(*args, **kwargs)
        reads.append(found)
        if len(reads) <= 2:  # a renewal of every leaf lands meanwhile, twice
            applied(cli, plan, "--renew-within", "36500d")
        return found

    monkeypatch.setattr(status, "rows", rows_while_an_apply_runs)
    line = one_line_error(cli("status", plan), 4)
    assert line.endswith(
        "tree: an apply wrote this tree while it was read; run this again, or pass --wait SECONDS"
    )
    again = cli("status", plan, "--wait", "30")  # overlapped once more, then read whole
    assert again.code == 0, again.err
    assert len(reads) == 3
    assert "5 ok, 0 need action" in again.out


def test_a_lock_held_in_another_pid_namespace_is_seen(tmp_path):
    """status in a container, apply on the host: /proc/locks lists only the reader's own
    namespace's holders, so a lookup there said "not held" and status read a half-written
    tree. The probe sees the lock itself."""
    import sys

    from cfwrap import files
    from tests.conftest import ROOT

    target = tmp_path / "tree"
    probe = (
        "import sys; from pathlib import Path; from cfwrap import files; "
        "print(files.lock_held(Path(sys.argv[1])))"
    )
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", probe, target]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    with files.FolderLock(target):
        inside = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
        assert inside.stdout.strip() == "True", inside.stderr
        assert files.lock_held(target)
    after = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    assert after.stdout.strip() == "False", after.stderr
    assert not files.lock_held(target)


def test_a_read_an_apply_broke_is_read_again_not_reported(cli, tmp_path, monkeypatch):
    """A dry run meeting an apply half-way through once said "changed on disk ... move the
    folder away so that apply issues it anew", harmful advice: what a half-written tree looks
    like is no answer. An error raised while an apply wrote the tree counts as an overlap."""
    from cfwrap.errors import ConflictError
    from cfwrap.plan import apply

    plan = write_plan(tmp_path, 'out = "tree"\n[regions.global]\nclients = 2\n')
    applied(cli, plan)
    diff = apply.diff
    calls = []

    applying: list[int] = []

    def diff_while_an_apply_runs(*args, **kwargs):
        if applying:  # the apply's own diff
            return diff(*args, **kwargs)
        calls.append(1)
        if len(calls) <= 2:  # an apply lands meanwhile, and what was read made no sense
            applying.append(1)
            try:
                applied(cli, plan, "--renew-within", "36500d")
            finally:
                applying.clear()
            raise ConflictError(tmp_path / "tree/nodes/global/client-1", "changed on disk")
        return diff(*args, **kwargs)

    monkeypatch.setattr(apply, "diff", diff_while_an_apply_runs)
    line = one_line_error(cli("apply", plan, "--dry-run"), 4)
    assert line.endswith("an apply wrote this tree while it was read; run this again, or pass "
                         "--wait SECONDS"), line  # fmt: skip
    again = cli("apply", plan, "--dry-run", "--wait", "30")
    assert again.code == 0, again.err
    assert "No changes" in again.out and len(calls) == 3
