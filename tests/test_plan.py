"""Cluster plans (issue 11): the plan model, `plan init`, and what `apply` writes and leaves alone.

Real cfssl, real files. The helpers at the top are shared by test_plan_tls, test_plan_rotation
and test_plan_status.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import resource
import select
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfwrap.plan import model
from tests.conftest import ROOT, CliResult

CFWRAP = ROOT / ".venv" / "bin" / "cfwrap"
Cli = Callable[..., CliResult]

#: A small plan: one region, one named server, one client by count, one operator.
SMALL = """\
out = "tree"
leaf_expiry = "720h"
operators = ["alice"]

[regions.eu]
clients = 1

[[regions.eu.servers]]
name = "nomad-1"
dns = ["nomad-1.example.eu"]
ip = ["10.1.0.1"]
"""


def write_plan(folder: Path, text: str, name: str = "plan.toml") -> Path:
    """Write a plan file into ``folder`` (made if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def tree_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """``root`` and every file and folder under it: content hash, mode, and st_mtime_ns."""
    info = root.lstat()
    result = {".": ("dir", info.st_mode, info.st_mtime_ns)}  # a file made and unlinked shows
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        result[str(path.relative_to(root))] = (digest, info.st_mode, info.st_mtime_ns)
    return result


def applied(cli: Cli, plan: Path, *extra: str) -> CliResult:
    """``cfwrap apply PLAN`` in-process; it must succeed."""
    result = cli("apply", plan, *extra)
    assert result.code == 0, result.err
    return result


def change_lines(out: str) -> list[str]:
    """The change lines apply prints (``+``, ``~``, ``-/+``, ``-``), without the summary."""
    return [line.strip() for line in out.splitlines() if re.match(r"^\s*(\+|~|-/\+|-) ", line)]


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def one_line_error(result: CliResult, code: int) -> str:
    """The run failed with ``code``, wrote no data and said why on exactly one line."""
    assert result.code == code, (result.code, result.err)
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("cfwrap: error: "), result.err
    assert "Traceback" not in result.err
    return lines[0]


# --- the plan model and `plan init` ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "regions", "servers", "clients", "operators"),
    [
        ((), ["global"], 3, 2, 1),
        (("--regions", "global,eu", "--servers", "2", "--clients", "2", "--operators", "1"),
         ["global", "eu"], 2, 2, 1),
        (("--regions", "EU,us-east-1", "--servers", "0", "--clients", "0", "--operators", "0"),
         ["EU", "us-east-1"], 0, 0, 0),
        (("--regions", "a", "--servers", "5", "--clients", "7", "--operators", "3"),
         ["a"], 5, 7, 3),
    ],
)  # fmt: skip
def test_plan_init_is_valid_as_printed(
    cli, tmp_path, *, flags, regions, servers, clients, operators
):
    printed = cli("plan", "init", *flags)
    assert printed.code == 0, printed.err
    path = write_plan(tmp_path, printed.out)
    plan = model.load(path)
    assert list(plan.regions) == regions
    members = list(plan.members())
    for region in regions:
        assert sum(m.role == "server" and m.region == region for m in members) == servers
        assert sum(m.role == "client" and m.region == region for m in members) == clients
    assert sum(m.role == "cli" for m in members) == operators
    assert printed.out.count("\n# ") >= 5  # commented
    # And apply takes it as printed (a dry run: the plan is valid all the way to the diff).
    dry = cli("apply", path, "--dry-run")
    assert dry.code == 0, dry.err
    assert f"Plan: {1 + 1 + len(regions) * (servers + clients) + operators} to add" in dry.out


def test_plan_schema_accepts_what_plan_init_prints(cli):
    """Editors validate plan files with schemas/plan.schema.json: the starter must pass.

    ``operators = ["operator-1"]`` (names as strings) is accepted by the model's before-validator,
    but the generated schema only allows tables there.
    """
    printed = cli("plan", "init", "--operators", "2")
    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(tomllib.loads(printed.out)))
    assert errors == [], [e.message for e in errors]


_REGION = st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,8}[a-zA-Z0-9]", fullmatch=True)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    regions=st.lists(_REGION, min_size=1, max_size=3, unique_by=str.lower),
    servers=st.integers(0, 4),
    clients=st.integers(0, 4),
    operators=st.integers(0, 3),
)
def test_plan_init_is_valid_for_any_small_counts_and_regions(
    cli, tmp_path_factory, *, regions, servers, clients, operators
):
    printed = cli(
        "plan", "init", "--regions", ",".join(regions), "--servers", str(servers),
        "--clients", str(clients), "--operators", str(operators),
    )  # fmt: skip
    assert printed.code == 0, printed.err
    plan = model.load(write_plan(tmp_path_factory.mktemp("init"), printed.out))
    assert list(plan.regions) == regions
    assert len(list(plan.members())) == len(regions) * (servers + clients) + operators


@pytest.mark.parametrize("regions", ["eu,eu", "eu,EU"])
def test_plan_init_refuses_a_region_twice_in_any_case(cli, regions):
    result = cli("plan", "init", "--regions", regions)
    assert result.code == 2
    assert result.out == ""
    assert result.err.count("\n") == 1
    assert "a region is named twice (Go compares names in any case)" in result.err


_NAMED_NODE_ERRORS = {
    "bad-dns-name": (
        '[[regions.eu.servers]]\nname = "a"\ndns = ["ok.example.com", "bad name"]\n',
        "regions.eu.servers.0.dns.1",
    ),
    "bad-ip": (
        '[[regions.eu.clients]]\nname = "a"\nip = ["10.0.0.300"]\n',
        "regions.eu.clients.0.ip.0",
    ),
    "bad-node-name": ('[[regions.eu.servers]]\nname = "Bad_Name"\n', "regions.eu.servers.0.name"),
    "bad-address": (
        '[[regions.eu.servers]]\nname = "a"\naddress = "10.0.0.1"\n',
        "regions.eu.servers.0.address",
    ),
}


_BAD_PLANS = {
    "negative-count": ("[regions.eu]\nservers = -1\n", "regions.eu.servers"),
    "unknown-field": ("colour = 1\n[regions.eu]\n", "colour"),
    "unknown-field-deep": ("[regions.eu]\nservers = 1\ngossip = false\n", "regions.eu.gossip"),
    "no-regions": ('out = "x"\n', "regions"),
    "bad-region": ('[regions."e.u"]\nservers = 1\n', "regions"),
    "duplicate-node": (
        '[[regions.eu.servers]]\nname = "a"\n[[regions.eu.clients]]\nname = "a"\n',
        "regions.eu",
    ),
    "operator-unknown-region": (
        'operators = [{ name = "ann", region = "us" }]\n[regions.eu]\n',
        "region 'us' is not in regions",
    ),
    "operator-twice": ('operators = ["ann", "ann"]\n[regions.eu]\n', "listed twice"),
    "leaf-outlives-ca": (
        'leaf_expiry = "50000h"\n[ca]\nexpiry = "43800h"\n[regions.eu]\n',
        "outlives the CA",
    ),
    # cfssl starts each certificate at its own minute: as long as its CA is a minute longer.
    "leaf-ends-with-ca": (
        'leaf_expiry = "43800h"\n[ca]\nexpiry = "43800h"\n[regions.eu]\n',
        "or ends with it: it must end at least 1h before",
    ),
    "intermediate-ends-with-root": (
        '[ca]\nintermediates = true\nexpiry = "26280h"\n[regions.eu]\n',
        "ca.intermediate_expiry 26280h outlives the root (ca.expiry 26280h), or ends with it",
    ),
    "leaf-outlives-intermediate": (
        'leaf_expiry = "30000h"\n[ca]\nintermediates = true\n[regions.eu]\n',
        "outlives the CA",
    ),
    "tls-dir-relative": ('node_tls_dir = "etc/nomad.d/tls"\n[regions.eu]\n', "node_tls_dir"),
    "key-algo": ('[key]\nalgo = "ed25519"\nsize = 256\n[regions.eu]\n', "key"),
    # Go would take EU's server certificate as server.eu.nomad (it ignores case).
    "regions-differ-in-case": (
        "[regions.EU]\nservers = 1\n[regions.eu]\nservers = 1\n",
        "regions 'EU' and 'eu' differ only in case",
    ),
    # TOML's types are exact: a value of another type is refused, never converted.
    "count-as-string": ('[regions.eu]\nservers = "3"\n', "regions.eu.servers '3': a count must"),
    "count-as-float": ("[regions.eu]\nservers = 3.0\n", "regions.eu.servers: a count must"),
    "gossip-as-string": ('gossip = "no"\n[regions.eu]\n', "gossip 'no'"),
    "gossip-as-number": ("gossip = 0\n[regions.eu]\n", "gossip: Input should be a valid boolean"),
    "key-size-as-string": ('[key]\nsize = "256"\n[regions.eu]\n', "key.size '256'"),
    "intermediates-as-string": (
        '[ca]\nintermediates = "yes"\n[regions.eu]\n',
        "ca.intermediates 'yes'",
    ),
    "expiry-as-number": ("leaf_expiry = 720\n[regions.eu]\n", "leaf_expiry: Input should be"),
    "version-true": ("version = true\n[regions.eu]\n", "version: version must be the integer 1"),
    "version-float": ("version = 1.0\n[regions.eu]\n", "version: version must be the integer 1"),
    "bad-ip-named-plainly": (
        '[[regions.eu.servers]]\nname = "a"\nip = ["::g"]\n',
        "regions.eu.servers.0.ip.0 '::g': not an IPv4 or IPv6 address",
    ),
    "a-date": (
        '[[regions.eu.servers]]\nname = "a"\nip = [1979-05-27]\n',
        "regions.eu.servers.0.ip.0: a date, which no field takes",
    ),
    # Python's \d and float() take other scripts' digits; Go's durations (cfssl) do not.
    "expiry-in-arabic-indic-digits": (
        'leaf_expiry = "\u0667\u0662\u0660h"\n[regions.eu]\n',
        "leaf_expiry",
    ),
    "a-byte-order-mark": ("\ufeff[regions.eu]\n", "starts with a byte order mark"),
}


@pytest.mark.parametrize("case", sorted(_BAD_PLANS))
def test_bad_plan_names_the_field_on_one_line_and_writes_nothing(cli, tmp_path, case):
    text, where = _BAD_PLANS[case]
    path = write_plan(tmp_path, text)
    for argv in (("apply", path), ("apply", path, "--dry-run"), ("status", path)):
        line = one_line_error(cli(*argv), 3)
        assert where in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


@pytest.mark.parametrize("case", sorted(_NAMED_NODE_ERRORS))
def test_plan_error_inside_a_named_node_gives_its_path(cli, tmp_path, case):
    """A list of named nodes with one bad value: the message points into the list.

    ``servers`` and ``clients`` are ``int | tuple[Node, ...]``; pydantic's first error is the
    ``int`` branch's ("regions.eu.servers.int: Input should be a valid integer"), which names no
    field of the plan.
    """
    text, where = _NAMED_NODE_ERRORS[case]
    path = write_plan(tmp_path, text)
    line = one_line_error(cli("apply", path), 3)
    assert where in line, line
    assert ".int:" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


@pytest.mark.parametrize(
    ("text", "why"),
    [("regions = [\n", "not valid TOML"), ("\xff\xfe", "not UTF-8"), (None, "No such file")],
)
def test_unreadable_plan_is_refused_on_one_line(cli, tmp_path, text, why):
    path = tmp_path / "plan.toml"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe[regions.eu]\n")
    elif text is not None:
        path.write_text(text)
    line = one_line_error(cli("apply", path), 3)
    assert why in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if text is None else ["plan.toml"])


def test_out_is_relative_to_the_plan_not_the_working_folder(cli, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_plan(tmp_path / "plans", SMALL)
    applied(cli, path)
    assert (tmp_path / "plans" / "tree" / "plan-manifest.json").is_file()
    assert list(elsewhere.iterdir()) == []


def test_absolute_out_is_used_as_given(cli, tmp_path):
    target = tmp_path / "abs" / "cluster"
    target.parent.mkdir()
    path = write_plan(tmp_path / "plans", SMALL.replace('out = "tree"', f'out = "{target}"'))
    applied(cli, path)
    assert (target / "nodes" / "eu" / "nomad-1" / "eu-server-nomad.pem").is_file()
    assert not (tmp_path / "plans" / "tree").exists()


def test_out_whose_parent_is_missing_is_refused(cli, tmp_path):
    path = write_plan(tmp_path, SMALL.replace('out = "tree"', 'out = "no/such/tree"'))
    line = one_line_error(cli("apply", path), 3)
    assert "out 'no/such/tree'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


# --- idempotency, partial change, dry run -----------------------------------------------------


def test_second_apply_writes_nothing(cli, tmp_path):
    path = write_plan(tmp_path, SMALL)
    first = applied(cli, path)
    assert "Plan: 5 to add" in first.out  # CA, gossip key, server, client, operator
    root = tmp_path / "tree"
    before = tree_state(root)
    assert len(before) > 20
    time.sleep(0.02)  # a rewrite of identical bytes would still move an mtime
    again = applied(cli, path)
    assert change_lines(again.out) == []
    assert "No changes" in again.out
    assert tree_state(root) == before


def test_status_and_dry_run_write_nothing_either(cli, tmp_path, monkeypatch):
    path = write_plan(tmp_path, SMALL)
    applied(cli, path)
    before = tree_state(tmp_path / "tree")
    # As on a file system without O_TMPFILE (NFS, FUSE): a temporary file made in the tree
    # would have a name for a moment, and move the root's mtime.
    monkeypatch.setattr(tempfile, "_O_TMPFILE_WORKS", False)
    assert cli("status", path, "--within", "7d").code == 0
    assert cli("apply", path, "--dry-run").code == 0
    assert cli("apply", path).code == 0
    assert tree_state(tmp_path / "tree") == before


def test_dry_run_and_an_unchanged_apply_need_no_disk_space(cli, tmp_path):
    """Nothing to write, nothing written: a full disk (here: a file size limit of 0) is no error.

    In a child process with RLIMIT_FSIZE 0, so every write of a byte fails with EFBIG.
    """
    path = write_plan(tmp_path, SMALL)
    applied(cli, path)
    before = tree_state(tmp_path / "tree")
    for extra in (["--dry-run"], []):
        run = subprocess.run(
            [CFWRAP, "apply", path, *extra],
            capture_output=True,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)),
            check=False,
        )
        assert (run.returncode, run.stderr) == (0, ""), extra
        assert "No changes" in run.stdout
    assert tree_state(tmp_path / "tree") == before


_NAMED = """\
out = "tree"
leaf_expiry = "720h"

[regions.eu]
clients = 0

[[regions.eu.servers]]
name = "nomad-1"

[[regions.eu.servers]]
name = "{second}"

[[regions.eu.servers]]
name = "nomad-3"
"""


def test_one_node_added_and_one_removed(cli, tmp_path):
    path = write_plan(tmp_path, _NAMED.format(second="nomad-2"))
    applied(cli, path)
    root = tmp_path / "tree"
    before = tree_state(root)
    removed = root / "nodes" / "eu" / "nomad-2"
    removed_files = {p.name: p.read_bytes() for p in removed.iterdir()}
    path.write_text(_NAMED.format(second="nomad-9"))
    # A dry run shows exactly what the apply then does, and changes nothing.
    dry = applied(cli, path, "--dry-run")
    assert "dry run" in dry.out
    assert tree_state(root) == before
    result = applied(cli, path)
    lines = change_lines(result.out)
    assert lines == change_lines(dry.out)
    assert sorted(lines) == ["+ eu/nomad-9 (server)", "- eu/nomad-2 (not in the plan)"], lines
    assert "Plan: 1 to add, 0 to change, 1 to retire." in result.out
    # The removed node is kept whole under retired/<stamp>/removed/.
    (retired,) = (root / "retired").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", retired.name)
    kept = retired / "removed" / "nodes" / "eu" / "nomad-2"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == removed_files
    assert not removed.exists()
    assert (root / "nodes" / "eu" / "nomad-9" / "eu-server-nomad.pem").is_file()
    # Everything of the nodes that stayed is untouched: bytes and mtimes.
    after = tree_state(root)
    for name in ("nomad-1", "nomad-3"):
        prefix = f"nodes/eu/{name}"
        mine = {k: v for k, v in before.items() if k.startswith(prefix)}
        assert len(mine) == 6
        assert {k: after[k] for k in mine} == mine
    for ca_file in [k for k in before if k.startswith("ca/")]:
        assert after[ca_file] == before[ca_file]
    # The plan manifest lists the new node and not the removed one.
    recorded = json.loads((root / "plan-manifest.json").read_text())
    assert sorted(m["name"] for m in recorded["members"]) == ["nomad-1", "nomad-3", "nomad-9"]
    assert recorded["retired"] == [str(kept.relative_to(root))]


_TWO_REGIONS = """\
out = "tree"
operators = ["alice"]

[regions.{first}]
[regions.{second}]

[[regions.eu.servers]]
name = "eu-1"

[[regions.global.{role}]]
name = "edge"
"""


def test_a_member_moved_to_another_region_or_role_is_issued_anew(cli, tmp_path):
    """An operator follows the first region and keeps its folder; a named node may change role.

    Their files are named after region and role, so the folder holds what cfwrap wrote for
    another certificate: it is retired whole and the member issued anew (once refused as
    "changed on disk", with the operator shown missing and no way forward).
    """
    path = write_plan(tmp_path, _TWO_REGIONS.format(first="global", second="eu", role="servers"))
    applied(cli, path)
    root = tmp_path / "tree"
    alice, edge = root / "operators/alice", root / "nodes/global/edge"
    old = {p.name: p.read_bytes() for p in alice.iterdir()}
    # The region tables swapped (alice now follows eu), and edge moved from servers to clients.
    path.write_text(_TWO_REGIONS.format(first="eu", second="global", role="clients"))
    before = tree_state(root)
    dry = applied(cli, path, "--dry-run")
    assert tree_state(root) == before
    result = applied(cli, path)
    assert change_lines(result.out) == change_lines(dry.out)
    assert sorted(change_lines(result.out)) == [
        "+ global/server-1 (server)",  # a region's servers default to one
        "-/+ global/edge (it holds global-server-nomad.pem, the plan now gives it "
        "global-client-nomad.pem; its folder is retired)",
        "-/+ operators/alice (it holds global-cli-nomad.pem, the plan now gives it "
        "eu-cli-nomad.pem; its folder is retired)",
    ], result.out
    # Each folder holds exactly what its new role and region need, and nothing of the old.
    assert sorted(p.name for p in alice.iterdir()) == [
        "ca.pem", "eu-cli-nomad-key.pem", "eu-cli-nomad.pem", "eu-cli.env", "manifest.json"
    ]  # fmt: skip
    assert sorted(p.name for p in edge.iterdir()) == [
        "ca.pem", "global-client-nomad-key.pem", "global-client-nomad.pem", "global-client.hcl",
        "manifest.json",
    ]  # fmt: skip
    cli_cert = load_cert(alice / "eu-cli-nomad.pem")
    san = cli_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cli.eu.nomad"]
    assert cli_cert.subject.rfc4514_string() == "CN=cli.eu.nomad"
    eku = cli_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    client = load_cert(edge / "global-client-nomad.pem")
    san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "client.global.nomad" in san.get_values_for_type(x509.DNSName)
    assert "server.global.nomad" not in san.get_values_for_type(x509.DNSName)
    assert "encrypt" not in (edge / "global-client.hcl").read_text()  # no gossip key now
    # The old folders are kept whole under retired/<stamp>/replaced/, and recorded.
    (stamp,) = (root / "retired").iterdir()
    kept = stamp / "replaced/operators/alice"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == old
    assert (stamp / "replaced/nodes/global/edge/global-server-nomad-key.pem").is_file()
    recorded = json.loads((root / "plan-manifest.json").read_text())
    assert str(kept.relative_to(root)) in recorded["retired"]
    assert cli("status", path).code == 0
    assert change_lines(applied(cli, path).out) == []


def test_what_a_failed_apply_retired_is_still_recorded_by_the_next(cli, tmp_path):
    # The apply retires nomad-2, then fails on nomad-3's in-place reissue (another process
    # holds its folder): it ends before its plan manifest. The next apply lists the retired
    # folder all the same: the move is not lost from the record.
    from cfwrap.files import FolderLock

    path = write_plan(tmp_path, _NAMED.format(second="nomad-2"))
    applied(cli, path)
    root = tmp_path / "tree"
    changed = _NAMED.format(second="nomad-9").replace(
        'name = "nomad-3"', 'name = "nomad-3"\ndns = ["n3.example.com"]'
    )
    path.write_text(changed)
    with FolderLock(root / "nodes" / "eu" / "nomad-3"):
        failed = cli("apply", path)
    assert failed.code == 4, failed.err
    assert "another cfwrap" in failed.err
    # One line that also says what had landed before the failure.
    assert failed.err.count("\n") == 1
    assert failed.err.rstrip().endswith(
        "(2 of the 3 changes had been made, each whole (what a reissue replaced is under "
        "retired/); run the same apply again to finish)"
    ), failed.err
    (kept,) = root.glob("retired/*/removed/nodes/eu/nomad-2")
    assert json.loads((root / "plan-manifest.json").read_text())["retired"] == []
    result = applied(cli, path)
    assert change_lines(result.out) == ["-/+ eu/nomad-3 (names changed (+n3.example.com))"]
    recorded = json.loads((root / "plan-manifest.json").read_text())
    assert recorded["retired"] == [str(kept.relative_to(root))]
    assert sorted(m["name"] for m in recorded["members"]) == ["nomad-1", "nomad-3", "nomad-9"]
    # Folders of other shapes, and symlinks, under retired/ are not taken for retired ones.
    (root / "retired" / "notes").mkdir()
    (root / "retired" / "notes" / "removed" / "nodes" / "eu" / "x").mkdir(parents=True)
    (kept.parent / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    before = tree_state(root)
    assert "No changes" in applied(cli, path).out
    assert tree_state(root) == before


def test_a_renewal_stopped_midway_says_how_much_of_it_was_made(cli, tmp_path, monkeypatch):
    # In-place reissues land one folder at a time. A stop between two of them (Ctrl-C: the
    # handler raises KeyboardInterrupt in the main thread, as here) must not claim that
    # nothing was done: it says how many changes were made, and the next apply finishes.
    from cfwrap.plan import apply

    path = write_plan(tmp_path, _NAMED.format(second="nomad-2"))
    applied(cli, path)
    real_update = apply._Run._update
    calls: list[int] = []

    def update_then_stop(self, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        real_update(self, *args)

    monkeypatch.setattr(apply._Run, "_update", update_then_stop)
    stopped = cli("apply", path, "--renew-within", "400d")
    assert stopped.code == 130
    assert stopped.err == (
        "cfwrap: stopped; nothing was left half-written, but 1 of the 3 changes had been made, "
        "each whole (what a reissue replaced is under retired/); run the same apply again to "
        "finish\n"
    )
    monkeypatch.setattr(apply._Run, "_update", real_update)
    # The leaves live 30 days: status looks 1 day ahead, to see only what the stop left.
    assert cli("status", path, "--within", "1d").code == 9  # one renewed, not yet recorded
    again = applied(cli, path, "--renew-within", "400d")
    assert "Plan: 0 to add, 3 to change, 0 to retire." in again.out  # every one is due again
    assert cli("status", path, "--within", "1d").code == 0


def test_changed_ca_settings_are_named_as_waiting_for_the_next_rotation(cli, tmp_path):
    # A CA cannot change: new ca settings apply to the next generation. The apply says so
    # instead of a bare "No changes", and changes no certificate.
    path = write_plan(tmp_path, SMALL)
    applied(cli, path)
    root = tmp_path / "tree"
    before = {k: v for k, v in tree_state(root).items() if k not in (".", "plan-manifest.json")}
    path.write_text(SMALL + '\n[ca]\ncommon_name = "Other CA"\nintermediates = true\n')
    for extra in (["--dry-run"], []):
        out = applied(cli, path, *extra).out
        assert out.splitlines()[0] == "No changes. The tree matches the plan.", out
        assert (
            "The plan's ca settings differ from CA gen-1 (its name is 'Nomad Agent CA 1', the "
            "plan's would be 'Other CA 1'; its root signs the leaves, the plan wants "
            "intermediates): a CA cannot change, so they take effect with the next rotation "
            "(apply --rotate-ca)."
        ) in out.splitlines(), out
    assert {
        k: v for k, v in tree_state(root).items() if k not in (".", "plan-manifest.json")
    } == before
    rotated = applied(cli, path, "--rotate-ca")
    assert "+ ca gen-2 (a new CA)" in change_lines(rotated.out)
    assert load_cert(root / "ca/gen-2/ca.pem").subject.rfc4514_string() == "CN=Other CA 2"
    assert load_cert(root / "ca/gen-2/eu/ca.pem").issuer.rfc4514_string() == "CN=Other CA 2"
    # An intermediate's lifetime is a ca setting too, once the new CA signs (phases 2 and 3).
    applied(cli, path, "--rotate-ca")
    applied(cli, path, "--rotate-ca")
    path.write_text(path.read_text() + 'intermediate_expiry = "17520h"\n')
    out = applied(cli, path).out
    assert "its intermediate of eu lives 1095 days, ca.intermediate_expiry says 17520h" in out, out


@pytest.mark.parametrize("clients", [3, 9])
def test_a_renewal_never_lists_the_region_folder_for_each_member(
    cli, tmp_path, monkeypatch, clients
):
    # Each in-place reissue locks its member's folder. The lock used to list the folder's
    # parent (the region's, thousands of members) to sweep staging folders beside it: a
    # fleet's renewal grew with the square of its size (19.4 s for 2,000 clients, 4.8 s for
    # 500). Now the region's folder is not listed at all while members are reissued.
    from cfwrap import files

    path = write_plan(tmp_path, f'out = "tree"\n[regions.eu]\nservers = 0\nclients = {clients}\n')
    applied(cli, path)
    region = tmp_path / "tree" / "nodes" / "eu"
    listed: list[Path] = []
    real_entries = files._entries

    def entries(folder: Path) -> list[Path]:
        listed.append(folder)
        return real_entries(folder)

    monkeypatch.setattr(files, "_entries", entries)
    result = applied(cli, path, "--renew-within", "400d")
    assert f"Plan: 0 to add, {clients} to change, 0 to retire." in result.out
    assert listed.count(region) == 0, listed


def test_a_fresh_dry_run_creates_no_tree(cli, tmp_path):
    path = write_plan(tmp_path, SMALL)
    dry = applied(cli, path, "--dry-run")
    assert len(change_lines(dry.out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]
    real = applied(cli, path)
    assert change_lines(real.out) == change_lines(dry.out)


def test_changed_node_tls_dir_rewrites_the_agent_files(cli, tmp_path):
    """The HCL names the files by node_tls_dir: a new node_tls_dir must reach every node."""
    path = write_plan(tmp_path, SMALL)
    applied(cli, path)
    path.write_text('node_tls_dir = "/opt/nomad/tls"\n' + SMALL)
    result = applied(cli, path)
    hcl = tmp_path / "tree" / "nodes" / "eu" / "nomad-1" / "eu-server.hcl"
    assert 'ca_file   = "/opt/nomad/tls/ca.pem"' in hcl.read_text(), result.out
    assert "~ eu/nomad-1" in result.out


# --- renewal -----------------------------------------------------------------------------------


def _node_files(root: Path) -> tuple[Path, Path]:
    folder = root / "nodes" / "eu" / "nomad-1"
    return folder / "eu-server-nomad.pem", folder / "eu-server-nomad-key.pem"


def _public(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("keep_key", [False, True])
def test_renewal_reissues_inside_the_window(cli, tmp_path, keep_key):
    path = write_plan(tmp_path, SMALL)
    applied(cli, path)
    root = tmp_path / "tree"
    cert_path, key_path = _node_files(root)
    old_cert, old_key = cert_path.read_bytes(), key_path.read_bytes()
    old = load_cert(cert_path)
    assert applied(cli, path, "--renew-within", "20d").out.startswith("No changes")  # 30d left
    # cfssl rounds validity to the minute, so a renewal within the same minute would end at the
    # same time. Half an hour more lifetime is inside apply's slack (no reissue for it), so only
    # the renewal brings it, and the new not_after is later by exactly that.
    path.write_text(SMALL.replace('"720h"', '"720h30m"'))
    assert applied(cli, path).out.startswith("No changes")
    result = applied(cli, path, "--renew-within", "60d", *(["--keep-key"] if keep_key else []))
    lines = change_lines(result.out)
    assert len(lines) == 3, lines  # the server, the client and the operator
    assert all(re.fullmatch(r"-/\+ \S+ \(expires in 30 days\)", line) for line in lines), lines
    new = load_cert(cert_path)
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc - old.not_valid_after_utc == timedelta(minutes=30)
    assert new.not_valid_after_utc - new.not_valid_before_utc == timedelta(hours=720, minutes=30)
    assert new.subject == old.subject
    assert new.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ) == old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    if keep_key:
        assert key_path.read_bytes() == old_key
        assert _public(new) == _public(old)
    else:
        assert key_path.read_bytes() != old_key
        assert _public(new) != _public(old)
    assert key_path.stat().st_mode & 0o777 == 0o600
    # What the renewal replaced is kept under retired/<stamp>/replaced/.
    (stamp,) = (root / "retired").iterdir()
    kept = stamp / "replaced" / "nodes" / "eu" / "nomad-1"
    assert (kept / cert_path.name).read_bytes() == old_cert
    if keep_key:
        assert not (kept / key_path.name).exists()  # nothing replaced it
    else:
        assert (kept / key_path.name).read_bytes() == old_key
        assert (kept / key_path.name).stat().st_mode & 0o777 == 0o600
    # The renewed folder is consistent: its manifest matches, the next apply does nothing.
    assert applied(cli, path).out.startswith("No changes")
    assert cli("status", path, "--within", "7d").code == 0


@pytest.mark.parametrize("window", ["\u0663\u0660d", "\u0663\u0660h", "0d", "30", "36501d", "1m"])
def test_a_window_cfwrap_cannot_use_is_a_usage_error(cli, tmp_path, window):
    path = write_plan(tmp_path, SMALL)
    for argv in (
        ("apply", path, f"--renew-within={window}"),
        ("status", path, f"--within={window}"),
    ):
        result = cli(*argv)
        assert result.code == 2, (argv, result.err)
        assert len(result.err.strip().splitlines()) == 1, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


def test_keep_key_without_renew_within_is_refused(cli, tmp_path):
    path = write_plan(tmp_path, SMALL)
    line = one_line_error(cli("apply", path, "--keep-key"), 3)
    assert "--keep-key" in line and "--renew-within" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


# --- the installed command: piped output, and the progress bar on a terminal ------------------


def test_piped_apply_prints_no_carriage_return(tmp_path):
    path = write_plan(tmp_path, SMALL)
    run = subprocess.run([CFWRAP, "apply", path], capture_output=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert b"\r" not in run.stdout + run.stderr
    assert b"Plan: 5 to add" in run.stdout
    assert run.stderr == b""
    again = subprocess.run([CFWRAP, "apply", path], capture_output=True, timeout=120, check=False)
    assert again.returncode == 0
    assert again.stdout.startswith(b"No changes.")


@pytest.mark.skipif(sys.platform != "linux", reason="pty semantics")
def test_apply_on_a_terminal_shows_a_progress_bar(tmp_path):
    path = write_plan(tmp_path, SMALL)
    main_fd, child_fd = pty.openpty()
    try:
        proc = subprocess.Popen(
            [CFWRAP, "apply", path],
            stdout=subprocess.PIPE,
            stderr=child_fd,
            stdin=subprocess.DEVNULL,
        )
        os.close(child_fd)
        seen = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main_fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(main_fd)
    assert proc.returncode == 0, seen
    assert b"cfwrap: issuing [" in seen, seen
    assert b"\r" in seen
    assert b"3/3" in seen  # server, client, operator
    assert b"\r" not in out  # stdout is a pipe: data only


def test_plan_schema_is_checked_in_and_current():
    """tests/test_schemas.py compares every schema; this pins that the plan's are among them."""
    from cfwrap import schema_files

    names = set(schema_files.generated())
    assert {"plan.schema.json", "plan-manifest.schema.json"} <= names
