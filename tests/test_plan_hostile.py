"""What a hostile or careless hand does to a plan's tree, and how apply and status answer.

Each case came from an attack on the finished plans: a read-only command that changed files, a
symlink that sent keys out of the tree, a CA swapped or added by hand, a scratch copy of a CA
key left in TMPDIR by a killed run, values the plan should never have accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfwrap.cli import main
from tests.test_plan import applied, one_line_error, tree_state, write_plan

ROOT = Path(__file__).resolve().parent.parent
PLAN = 'out = "tree"\noperators = ["alice"]\n[regions.global]\nservers = 1\nclients = 2\n'


def apply_plan(tmp: Path, text: str = PLAN) -> Path:
    (tmp / "c.toml").write_text(text)
    assert main(["apply", str(tmp / "c.toml")]) == 0
    return tmp / "tree"


def run(
    tmp: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfwrap", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_read_only_commands_leave_a_cut_short_update_alone(tmp_path):
    tree = apply_plan(tmp_path)
    folder = tree / "nodes/global/client-1"
    journal = folder / ".cfwrap-journal.json"
    # A journal naming the key as new: undoing it would delete the key.
    journal.write_text('{"old": {"global-client-nomad-key.pem": null}}\n')
    before = files_of(tree)
    status = run(tmp_path, "status", "c.toml")
    assert status.returncode == 9
    assert "cut short" in status.stdout
    dry = run(tmp_path, "apply", "c.toml", "--dry-run")
    assert dry.returncode == 4, dry.stderr
    line = one_line(dry)
    assert "cut short" in line
    # Not "move the folder away so that apply issues it anew": a needless new key.
    assert line.endswith("run the apply itself: it puts the folder back first, then compares it")
    assert files_of(tree) == before, "a read-only command changed the tree"
    assert journal.exists()


def test_apply_puts_back_a_cut_short_update_under_its_lock(tmp_path):
    tree = apply_plan(tmp_path)
    folder = tree / "nodes/global/client-1"
    hcl = folder / "global-client.hcl"
    original = hcl.read_bytes()
    kept = folder / ".cfwrap-0123abcd.old"
    os.link(hcl, kept)
    hcl.unlink()
    hcl.write_bytes(b"# half-written by a killed run\n")
    (folder / ".cfwrap-journal.json").write_text(
        '{"old": {"global-client.hcl": ".cfwrap-0123abcd.old"}}\n'
    )
    again = run(tmp_path, "apply", "c.toml")
    assert again.returncode == 0, again.stderr
    assert "No changes" in again.stdout
    assert hcl.read_bytes() == original
    assert not (folder / ".cfwrap-journal.json").exists()


@pytest.mark.parametrize("inside", ["nodes", "nodes/global/client-1", "retired", "ca"])
def test_a_symlinked_folder_in_the_tree_is_refused(tmp_path, inside):
    tree = apply_plan(tmp_path)
    (tree / "retired").mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    shutil.move(tree / inside, outside)
    (tree / inside).symlink_to(outside)
    before = files_of(outside)
    # A change that writes below each of them: a new node, a renewal, a retirement, a new CA.
    (tmp_path / "c.toml").write_text(
        PLAN.replace("servers = 1\nclients = 2", "servers = 2\nclients = 1")
    )
    result = run(tmp_path, "apply", "c.toml", "--renew-within", "36500d")
    assert result.returncode == 4, result.stderr
    assert "symlink" in one_line(result)
    assert files_of(outside) == before, "apply wrote through the symlink"


def test_a_symlinked_file_in_a_member_folder_is_refused(tmp_path):
    tree = apply_plan(tmp_path)
    key = tree / "nodes/global/client-1/global-client-nomad-key.pem"
    elsewhere = tmp_path / "elsewhere.pem"
    shutil.copy(key, elsewhere)
    key.unlink()
    key.symlink_to(elsewhere)
    result = run(tmp_path, "apply", "c.toml", "--renew-within", "36500d")
    assert result.returncode == 4
    assert "symlink" in one_line(result)
    renewed = [p for p in (tree / "retired").rglob("*.pem")] if (tree / "retired").exists() else []
    assert renewed == [], "other members were renewed before the refusal"


def test_a_ca_generation_placed_or_swapped_by_hand_is_refused(tmp_path):
    tree = apply_plan(tmp_path)
    other = tmp_path / "other"
    assert main(["ca", "--out", str(other), "--cn", "Not The Plan's CA"]) == 0
    bundles = files_of(tree / "nodes")
    extra = tree / "ca/gen-2"
    extra.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(other / name, extra / name)
    added = run(tmp_path, "apply", "c.toml")
    assert added.returncode == 7
    assert "not in plan-manifest.json" in one_line(added)
    shutil.rmtree(extra)
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(other / name, tree / "ca/gen-1" / name)
    swapped = run(tmp_path, "apply", "c.toml")
    assert swapped.returncode == 7
    assert "another CA" in one_line(swapped)
    assert files_of(tree / "nodes") == bundles


def test_two_generations_without_the_plan_manifest_are_refused(tmp_path):
    tree = apply_plan(tmp_path)
    assert run(tmp_path, "apply", "c.toml", "--rotate-ca").returncode == 0
    assert run(tmp_path, "apply", "c.toml", "--rotate-ca").returncode == 0
    (tree / "plan-manifest.json").unlink()
    before = files_of(tree)
    result = run(tmp_path, "apply", "c.toml", "--dry-run")
    assert result.returncode == 7
    assert "phase is unknown" in one_line(result)
    assert files_of(tree) == before


def test_a_killed_runs_scratch_copy_of_the_ca_key_is_swept(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    gone_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no such process
    left = scratch / f"cfwrap-signer-{gone_pid}-abcdefgh"
    left.mkdir(mode=0o700)
    (left / "ca-key.pem").write_text("a CA key copy left by a SIGKILLed run\n")
    alive = scratch / f"cfwrap-signer-{os.getpid()}-ijklmnop"
    alive.mkdir(mode=0o700)
    (tmp_path / "c.toml").write_text(PLAN)
    result = run(tmp_path, "apply", "c.toml", env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    assert not left.exists()
    assert alive.exists(), "a live process's scratch folder was removed"
    assert list(scratch.iterdir()) == [alive]


def test_an_unrelated_folder_is_not_filled(tmp_path):
    unrelated = tmp_path / "tree"
    (unrelated / "ca").mkdir(parents=True)
    (unrelated / "nodes/global/mystuff").mkdir(parents=True)
    (unrelated / "important.txt").write_text("data\n")
    (tmp_path / "c.toml").write_text(PLAN)
    result = run(tmp_path, "apply", "c.toml")
    assert result.returncode == 4
    assert "no plan's tree" in one_line(result)
    assert (unrelated / "nodes/global/mystuff").is_dir()
    only_dotfiles = tmp_path / "dots"
    (only_dotfiles / ".git").mkdir(parents=True)
    (tmp_path / "d.toml").write_text(PLAN.replace('out = "tree"', 'out = "dots"'))
    dots = run(tmp_path, "apply", "d.toml")
    assert dots.returncode == 4
    assert sorted(p.name for p in only_dotfiles.iterdir()) == [".git"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[regions.global]\nservers = true\n", "regions.global.servers"),
        ('[regions.global]\nservers = [{ name = "a", address = "..:80" }]\n', "address"),
        ('[regions.global]\nservers = [{ name = "a", address = "[1.2.3.4]:80" }]\n', "address"),
        ("x = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ],
)
def test_values_a_plan_must_not_accept(tmp_path, text, where):
    (tmp_path / "c.toml").write_text(text)
    result = run(tmp_path, "apply", "c.toml", "--dry-run")
    assert result.returncode == 3
    assert where in one_line(result)


# cfssl's part of the signing config that cfwrap writes for `cfssl serve`: a wrapper that drops
# "server auth" from the client profile, as a wrong or tampered cfssl would.
STRIP_SERVER_AUTH = """
if [ "$1" = serve ]; then
  for i in $(seq 1 $#); do
    if [ "${!i}" = -config ]; then j=$((i + 1)); config="${!j}"; fi
  done
  python3 - "$config" <<'PY'
import json, sys
path = sys.argv[1]
data = json.load(open(path))
profile = data["signing"]["profiles"]["client"]
profile["usages"] = [u for u in profile["usages"] if u != "server auth"]
json.dump(data, open(path, "w"))
PY
fi
exec "$REAL" "$@"
"""


def test_a_certificate_that_does_not_fit_the_plan_is_refused(tmp_path):
    from tests.handmade import wrapped_cfssl

    fake = wrapped_cfssl(tmp_path / "fake", STRIP_SERVER_AUTH)
    (tmp_path / "c.toml").write_text(PLAN)
    result = run(tmp_path, "--cfssl-dir", str(fake), "apply", "c.toml")
    assert result.returncode == 7, result.stderr
    line = one_line(result)
    assert "the certificate cfssl issued for global/client-" in line
    assert "server" in line.lower()
    tree = tmp_path / "tree"
    assert not (tree / "nodes").exists()
    assert not (tree / "plan-manifest.json").exists()


def test_leaves_that_would_outlive_the_ca_on_disk_are_refused(tmp_path):
    (tmp_path / "c.toml").write_text(
        'out = "tree"\nleaf_expiry = "1000h"\noperators = ["alice"]\n[ca]\nexpiry = "2000h"\n'
        "[regions.global]\nservers = 1\nclients = 2\n"
    )
    assert run(tmp_path, "apply", "c.toml").returncode == 0
    tree = tmp_path / "tree"
    before = files_of(tree)
    # The plan now wants year-long leaves (and a longer CA, which only a rotation would make):
    # the CA on disk ends in 2000h, before such leaves would.
    (tmp_path / "c.toml").write_text(
        'out = "tree"\nleaf_expiry = "8760h"\noperators = ["alice"]\n[ca]\nexpiry = "43800h"\n'
        "[regions.global]\nservers = 1\nclients = 2\n"
    )
    result = run(tmp_path, "apply", "c.toml")
    assert result.returncode == 3, result.stderr
    line = one_line(result)
    assert "CA gen-1" in line and "expires on" in line and "--rotate-ca" in line
    assert files_of(tree) == before


@pytest.mark.parametrize("target", ["a copy", "nothing"])
def test_a_symlinked_plan_manifest_is_refused_by_every_command_alike(tmp_path, target):
    """Dangling or not: a dry run used to read a dangling one as "no manifest, no changes"."""
    tree = apply_plan(tmp_path)
    manifest = tree / "plan-manifest.json"
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(manifest, elsewhere)
    if target == "nothing":
        elsewhere.unlink()
    manifest.unlink()
    manifest.symlink_to(elsewhere)
    for argv in (["apply", "c.toml", "--dry-run"], ["status", "c.toml"], ["apply", "c.toml"]):
        result = run(tmp_path, *argv)
        assert result.returncode == 4, (argv, result.stderr)
        assert "plan-manifest.json: is a symlink" in one_line(result)
    assert manifest.is_symlink()
    assert elsewhere.exists() == (target == "a copy")


# --- a fourth attack: what was lost, swapped or put in a file's place -------------------------


def test_a_lost_ca_generation_is_refused_never_made_anew(cli, tmp_path):
    """A CA folder moved away (a root kept offline) once got a new, unrelated CA of the same
    number, and the whole fleet was reissued under it; status said "no CA yet: run apply"."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    tree = tmp_path / "tree"
    (tree / "ca/gen-1").rename(tmp_path / "offline")
    before = tree_state(tree)
    for argv in (("apply", plan), ("apply", plan, "--dry-run"), ("apply", plan, "--rotate-ca")):
        line = one_line_error(cli(*argv), 7)
        assert "ca/gen-1: is missing, but plan-manifest.json records it" in line, line
    assert tree_state(tree) == before
    status = cli("status", plan, "--json")
    assert status.code == 9
    rows = {r["node"]: r for r in json.loads(status.out)["certificates"]}
    assert rows["ca gen-1"]["state"] == "missing"
    assert "put the CA folder back" in rows["ca gen-1"]["detail"]
    assert "ca" not in rows  # not "no CA yet: run apply"
    (tmp_path / "offline").rename(tree / "ca/gen-1")
    assert cli("status", plan).code == 0
    assert "No changes" in applied(cli, plan).out


def test_the_new_ca_lost_mid_rotation_is_refused(cli, tmp_path):
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    applied(cli, plan, "--rotate-ca")  # phase 1: gen-2 made, bundles trust both
    tree = tmp_path / "tree"
    (tree / "ca/gen-2").rename(tmp_path / "gen-2")
    before = tree_state(tree)
    for argv in (("apply", plan), ("apply", plan, "--rotate-ca")):
        assert "ca/gen-2: is missing" in one_line_error(cli(*argv), 7)
    assert tree_state(tree) == before
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["ca gen-2"]["state"] == "missing"


@pytest.mark.parametrize("rotate", [(), ("--rotate-ca",)], ids=["apply", "apply-rotate-ca"])
def test_a_phase_3_stopped_after_retiring_the_old_ca_is_still_finished(cli, tmp_path, rotate):
    """Phase 3 moves the old CA under retired/ last, then records: a stop between the two
    leaves a manifest that still names the old CA. That one is not lost, and the same apply
    (with --rotate-ca, as the stop's message says) finishes phase 3, never starts a rotation."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    applied(cli, plan, "--rotate-ca")
    applied(cli, plan, "--rotate-ca")
    tree = tmp_path / "tree"
    recorded = (tree / "plan-manifest.json").read_bytes()
    applied(cli, plan, "--rotate-ca")  # phase 3
    (tree / "plan-manifest.json").write_bytes(recorded)  # as if it stopped before recording
    assert not (tree / "ca/gen-1").exists()
    assert list(tree.glob("retired/*/ca/ca/gen-1"))
    before = tree_state(tree / "nodes")
    applied(cli, plan, *rotate)
    recorded = json.loads((tree / "plan-manifest.json").read_text())
    assert recorded["phase"] == "steady"
    assert [c["generation"] for c in recorded["cas"]] == [2]
    assert sorted(p.name for p in (tree / "ca").iterdir()) == ["gen-2"]
    assert tree_state(tree / "nodes") == before  # nothing reissued, no bundle changed
    assert cli("status", plan).code == 0


@pytest.mark.parametrize("key", ["ecdsa", "rsa"])
def test_a_key_that_does_not_pair_is_changed_even_under_a_rewritten_manifest(cli, tmp_path, key):
    text = PLAN + ('[key]\nalgo = "rsa"\nsize = 2048\n' if key == "rsa" else "")
    plan = write_plan(tmp_path, text)
    applied(cli, plan)
    folder = tmp_path / "tree/nodes/global/client-2"
    key = folder / "global-client-nomad-key.pem"
    key.write_bytes(
        (tmp_path / "tree/nodes/global/client-1/global-client-nomad-key.pem").read_bytes()
    )
    assert cli("manifest", folder, "--write").code == 0  # the manifest now agrees with the swap
    tree = tmp_path / "tree"
    before = tree_state(tree)
    line = one_line_error(cli("apply", plan), 4)
    assert "global-client-nomad-key.pem does not belong to global-client-nomad.pem" in line
    assert tree_state(tree) == before
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["global/client-2"]["state"] == "changed"
    assert rows["global/client-2"]["detail"] == (
        "global-client-nomad-key.pem does not belong to global-client-nomad.pem"
    )
    assert rows["global/client-1"]["state"] == "ok"


def test_a_second_key_in_a_members_key_file_is_changed(cli, tmp_path):
    """Its own key first (it pairs), then another node's: Nomad reads the first, but the file
    now carries another node's secret to this one."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    tree = tmp_path / "tree"
    own = tree / "nodes/global/client-1/global-client-nomad-key.pem"
    other = tree / "nodes/global/client-2/global-client-nomad-key.pem"
    own.write_bytes(own.read_bytes() + other.read_bytes())
    assert cli("manifest", own.parent, "--write").code == 0
    before = tree_state(tree)
    line = one_line_error(cli("apply", plan, "--dry-run"), 4)
    assert "global-client-nomad-key.pem holds more than one PEM block" in line
    assert tree_state(tree) == before
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["global/client-1"]["state"] == "changed"


def test_a_lost_intermediate_is_refused_never_made_anew(cli, tmp_path):
    """One region's intermediate moved away: apply once made a new one and reissued the
    region under it, and status said all was ok."""
    plan = write_plan(
        tmp_path,
        'out = "tree"\n[ca]\nintermediates = true\n[regions.global]\nservers = 1\n'
        "[regions.eu]\nservers = 1\nclients = 1\n",
    )
    applied(cli, plan)
    tree = tmp_path / "tree"
    (tree / "ca/gen-1/eu").rename(tmp_path / "eu")
    before = tree_state(tree)
    for argv in (("apply", plan), ("apply", plan, "--dry-run")):
        assert "ca/gen-1/eu: is missing, but plan-manifest.json" in one_line_error(cli(*argv), 7)
    assert tree_state(tree) == before
    status = cli("status", plan, "--json")
    assert status.code == 9
    rows = {r["node"]: r for r in json.loads(status.out)["certificates"]}
    assert rows["ca gen-1 eu"]["state"] == "missing"
    assert rows["ca gen-1 eu"]["region"] == "eu"
    (tmp_path / "eu").rename(tree / "ca/gen-1/eu")
    assert cli("status", plan).code == 0


def test_a_moved_member_that_was_also_changed_is_changed_not_missing(cli, tmp_path):
    plan = write_plan(tmp_path, PLAN.replace("[regions.global]", "[regions.eu]\n[regions.global]"))
    applied(cli, plan)
    env = tmp_path / "tree/operators/alice/eu-cli.env"
    env.write_text(env.read_text() + "# edited\n")
    plan.write_text(PLAN + "[regions.eu]\n")  # alice now follows global
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["operators/alice"]["state"] == "changed"
    assert rows["operators/alice"]["detail"] == "eu-cli.env changed"
    assert "eu-cli.env changed" in one_line_error(cli("apply", plan), 4)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_member_file_that_is_no_file_is_a_row_not_an_abort(cli, tmp_path, kind):
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    cert = tmp_path / "tree/nodes/global/client-1/global-client-nomad.pem"
    cert.unlink()
    os.mkfifo(cert) if kind == "fifo" else cert.mkdir()
    status = cli("status", plan, "--json")
    assert status.code == 9, status.err
    rows = {r["node"]: r for r in json.loads(status.out)["certificates"]}
    what = "a FIFO" if kind == "fifo" else "a folder"
    assert rows["global/client-1"] == rows["global/client-1"] | {
        "state": "changed",
        "detail": f"global-client-nomad.pem is {what}, not a regular file",
    }
    assert rows["global/client-2"]["state"] == "ok"
    line = one_line_error(cli("apply", plan), 4)
    assert f"global-client-nomad.pem is {what}, not a regular file" in line


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_something_extra_in_a_member_folder_is_changed(cli, tmp_path, kind):
    """A regular file cfwrap did not write is "not in its manifest"; a FIFO or folder, too."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    extra = tmp_path / "tree/nodes/global/client-1/extra"
    os.mkfifo(extra) if kind == "fifo" else extra.mkdir()
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    what = "a FIFO" if kind == "fifo" else "a folder"
    detail = f"extra is {what}, not a regular file: cfwrap wrote no such thing here"
    assert rows["global/client-1"]["state"] == "changed"
    assert rows["global/client-1"]["detail"] == detail
    assert rows["global/client-2"]["state"] == "ok"
    tree = tmp_path / "tree"
    before = tree_state(tree)
    assert detail in one_line_error(cli("apply", plan), 4)
    assert tree_state(tree) == before


@pytest.mark.parametrize("out", ["afile", "afile/tree", "afile/deeper/tree"])
def test_an_out_that_runs_into_a_file_gets_one_answer_from_every_command(cli, tmp_path, out):
    (tmp_path / "afile").write_text("not a folder\n")
    plan = write_plan(tmp_path, PLAN.replace('out = "tree"', f'out = "{out}"'))
    lines = {
        " ".join(argv): one_line_error(cli(*argv, plan), 4)
        for argv in (("apply",), ("apply", "--dry-run"), ("status",))
    }
    assert len(set(lines.values())) == 1, lines
    assert "is not a folder; point the plan's out at a folder" in lines["apply"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "plan.toml"]
    assert (tmp_path / "afile").read_text() == "not a folder\n"


_ONE_REGION_INTERMEDIATES = (
    'out = "tree"\n[ca]\nintermediates = true\n[regions.global]\nservers = 1\nclients = 1\n'
)


def test_with_the_root_key_offline_a_lost_intermediate_is_still_named(cli, tmp_path):
    """The root's key away and its only intermediate lost: once blamed on the key ("ca-key.pem:
    No such file or directory; ... move it away"), as if the root were not offline."""
    plan = write_plan(tmp_path, _ONE_REGION_INTERMEDIATES)
    applied(cli, plan)
    gen = tmp_path / "tree/ca/gen-1"
    (gen / "ca-key.pem").rename(tmp_path / "root-key.pem")
    (gen / "global").rename(tmp_path / "global")
    before = tree_state(tmp_path / "tree")
    line = one_line_error(cli("apply", plan), 7)
    assert "ca/gen-1/global: is missing, but plan-manifest.json records it" in line, line
    assert tree_state(tmp_path / "tree") == before
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["ca gen-1 global"]["state"] == "missing"
    # Back, but with its key gone: the file is named, under its region.
    (tmp_path / "global").rename(gen / "global")
    (gen / "global/ca-key.pem").unlink()
    assert "ca/gen-1: global/ca-key.pem: No such file" in one_line_error(cli("apply", plan), 7)


def test_an_intermediates_key_file_with_a_second_key_is_changed(cli, tmp_path):
    plan = write_plan(tmp_path, _ONE_REGION_INTERMEDIATES)
    applied(cli, plan)
    key = tmp_path / "tree/ca/gen-1/global/ca-key.pem"
    other = tmp_path / "tree/nodes/global/client-1/global-client-nomad-key.pem"
    key.write_bytes(key.read_bytes() + other.read_bytes())
    rows = {r["node"]: r for r in json.loads(cli("status", plan, "--json").out)["certificates"]}
    assert rows["ca gen-1 global"]["state"] == "changed"
    assert rows["ca gen-1 global"]["detail"] == "global/ca-key.pem holds more than its one key"
    assert "holds more than its one key" in one_line_error(cli("apply", plan), 4)


def test_a_phase_2_stopped_before_it_was_recorded_is_finished_never_undone(cli, tmp_path):
    """Phase 2 reissues every leaf under the new CA, then records; stopped between the two, a
    plain apply (or a cron renewal) reissued those leaves back under the old CA."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    applied(cli, plan, "--rotate-ca")
    tree = tmp_path / "tree"
    recorded = (tree / "plan-manifest.json").read_bytes()
    applied(cli, plan, "--rotate-ca")  # phase 2
    (tree / "plan-manifest.json").write_bytes(recorded)  # as if it stopped before recording
    before = tree_state(tree)
    for argv in (("apply", plan), ("apply", plan, "--renew-within", "30d")):
        line = one_line_error(cli(*argv), 7)
        assert "is already signed by CA gen-2" in line, line
        assert line.endswith("run apply --rotate-ca to finish phase 2")
    assert tree_state(tree) == before
    nodes = tree_state(tree / "nodes")
    applied(cli, plan, "--rotate-ca")
    assert json.loads((tree / "plan-manifest.json").read_text())["phase"] == "new-leaves"
    assert tree_state(tree / "nodes") == nodes  # every leaf was done: none reissued again
    assert cli("status", plan).code == 0


def test_a_phase_3_stopped_among_the_bundles_needs_action(cli, tmp_path):
    """Phase 3 updates every bundle, then retires the old CA and records: a stop among the
    bundles leaves folders that already drop the old CA while the tree records phase 2. Each
    folder agrees with its own manifest; status names it, and apply --rotate-ca finishes it."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    applied(cli, plan, "--rotate-ca")
    applied(cli, plan, "--rotate-ca")
    tree = tmp_path / "tree"
    shutil.copytree(tree, tmp_path / "phase-2")
    applied(cli, plan, "--rotate-ca")  # phase 3, whole
    done = tmp_path / "phase-3"
    tree.rename(done)
    (tmp_path / "phase-2").rename(tree)
    client = "nodes/global/client-1"
    shutil.rmtree(tree / client)
    shutil.copytree(done / client, tree / client)  # the one folder phase 3 reached
    status = cli("status", plan, "--json")
    assert status.code == 9
    rows = {r["node"]: r for r in json.loads(status.out)["certificates"]}
    assert rows["global/client-1"]["state"] == "changed"
    assert rows["global/client-1"]["detail"] == (
        "its ca.pem already drops the old CA, while plan-manifest.json records phase 2 (a phase "
        "3 that stopped?): run apply --rotate-ca to finish phase 3"
    )
    assert {r["state"] for n, r in rows.items() if n != "global/client-1"} == {"ok"}
    applied(cli, plan, "--rotate-ca")
    assert cli("status", plan).code == 0
    bundle = (tree / client / "ca.pem").read_bytes()
    assert bundle == (done / client / "ca.pem").read_bytes()
    assert bundle.count(b"BEGIN CERTIFICATE") == 1


def test_a_bundle_swapped_under_a_rewritten_manifest_needs_action(cli, tmp_path):
    """The folder's manifest rewritten over another bundle agrees with it; the plan manifest
    does not, and status says which file."""
    plan = write_plan(tmp_path, PLAN)
    applied(cli, plan)
    folder = tmp_path / "tree/nodes/global/client-2"
    other = write_plan(tmp_path / "other", PLAN)
    applied(cli, other)
    shutil.copy(tmp_path / "other/tree/nodes/global/client-2/ca.pem", folder / "ca.pem")
    assert cli("manifest", folder, "--write").code == 0
    status = cli("status", plan, "--json")
    assert status.code == 9
    rows = {r["node"]: r for r in json.loads(status.out)["certificates"]}
    assert rows["global/client-2"]["state"] == "changed"
    assert rows["global/client-2"]["detail"].startswith(
        "ca.pem is not the one plan-manifest.json records"
    )
    assert rows["global/client-1"]["state"] == "ok"
