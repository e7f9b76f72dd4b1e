"""A large apply shares its new members with a second process (``cfwrap.plan.shards``).

The plans here are just above the size at which the second process starts, so its whole path
runs: its own cfssl, its half of the folders in the shared stage, its records handed back, its
failure reported as one line, and its death with the parent.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from cfwrap.plan import shards
from tests.handmade import wrapped_cfssl

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = shards.MIN_SHARE + 20


def plan(tmp: Path, clients: int = CLIENTS) -> Path:
    path = tmp / "c.toml"
    path.write_text(f'out = "tree"\n[regions.global]\nservers = 1\nclients = {clients}\n')
    return path


def cfwrap(
    *argv: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cfwrap", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_a_large_plan_is_shared_and_every_member_is_whole(tmp_path):
    path = plan(tmp_path)
    run = cfwrap("apply", path, cwd=tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    tree = tmp_path / "tree"
    ca = x509.load_pem_x509_certificate((tree / "ca/gen-1/ca.pem").read_bytes())
    folders = sorted((tree / "nodes/global").iterdir())
    assert len(folders) == CLIENTS + 1
    serials = set()
    for folder in folders:
        role = "server" if folder.name.startswith("server") else "client"
        cert = x509.load_pem_x509_certificate((folder / f"global-{role}-nomad.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        serials.add(cert.serial_number)
        recorded = json.loads((folder / "manifest.json").read_text())
        assert {a["path"] for a in recorded["artifacts"]} == {
            "ca.pem", f"global-{role}-nomad.pem", f"global-{role}-nomad-key.pem",
            f"global-{role}.hcl",
        }  # fmt: skip
    assert len(serials) == CLIENTS + 1
    index = json.loads((tree / "plan-manifest.json").read_text())
    assert sorted(m["folder"] for m in index["members"]) == sorted(
        f"nodes/global/{f.name}" for f in folders
    )
    assert not list(tree.glob(".cfwrap-stage-*"))
    status = cfwrap("status", path, cwd=tmp_path)
    status.communicate(timeout=120)
    assert status.returncode == 0
    again = cfwrap("apply", path, cwd=tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "No changes" in out, err


def test_a_failing_second_signer_is_one_line_and_places_nothing(tmp_path):
    # The second `cfssl serve` started (the parent's or the child's) fails as a broken cfssl
    # would; the apply must fail whole, whichever process it hit.
    state = tmp_path / "state"
    state.mkdir()
    body = (
        'if [ "$1" = serve ] && ! mkdir "' + str(state) + '/first" 2>/dev/null; then\n'
        '  echo "[ERROR] simulated: the second signer cannot start" >&2; exit 1\n'
        'fi\nexec "$REAL" "$@"'
    )
    fake = wrapped_cfssl(tmp_path / "fake", body)
    path = plan(tmp_path)
    run = cfwrap("--cfssl-dir", fake, "apply", path, cwd=tmp_path)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 6, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    tree = tmp_path / "tree"
    assert not (tree / "nodes").exists()
    assert not (tree / "plan-manifest.json").exists()
    assert not list(tree.glob(".cfwrap-stage-*"))


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in argv:
            found.append(int(entry.name))
    return found


def test_sigterm_stops_both_processes_and_their_signers(tmp_path):
    scratch = tmp_path / "scratch-marker"
    scratch.mkdir()
    path = plan(tmp_path, clients=3 * shards.MIN_SHARE)
    run = cfwrap("apply", path, cwd=tmp_path, env={"TMPDIR": str(scratch)})
    tree = tmp_path / "tree"
    deadline = time.monotonic() + 120
    # Wait until both processes are signing: the stage holds member folders.
    while time.monotonic() < deadline:
        stages = list(tree.glob(".cfwrap-stage-*/nodes/global/*")) if tree.exists() else []
        if len(stages) > 20 and len(_processes_with(str(scratch))) >= 2:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the apply never got going")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        _processes_with(str(scratch)) or _processes_with(str(path))
    ):
        time.sleep(0.1)
    assert _processes_with(str(scratch)) == [], "a cfssl outlived cfwrap"
    assert _processes_with(str(path)) == [], "the second process outlived cfwrap"
    assert not (tree / "nodes").exists()
    assert not list(tree.glob(".cfwrap-stage-*"))


def _taken(
    claims: shards.Claims, *, pause: float = 0.0, stop_after: int | None = None
) -> list[int]:
    taken: list[int] = []
    for n, chunk in enumerate(claims.take()):
        taken += chunk
        time.sleep(pause)
        if stop_after is not None and n + 1 >= stop_after:
            break
    return taken


def test_claims_give_each_item_to_exactly_one_of_two_processes():
    with shards.Claims(1000) as claims:
        helper = shards.fork(lambda _: [json.dumps(_taken(claims, pause=0.001))])
        try:
            mine = _taken(claims, pause=0.001)
            theirs = json.loads(next(iter(helper.join(on_wait=lambda: None))))
        finally:
            helper.stop()
    assert mine and theirs, "both processes took part"
    assert sorted(mine + theirs) == list(range(1000))  # every item once, none twice


def test_a_process_that_stops_claiming_leaves_the_rest_to_the_other():
    with shards.Claims(1000) as claims:
        helper = shards.fork(lambda _: [json.dumps(_taken(claims, stop_after=1))])
        try:
            theirs = json.loads(next(iter(helper.join(on_wait=lambda: None))))
            mine = _taken(claims)
        finally:
            helper.stop()
    assert len(theirs) == claims.chunk
    assert sorted(mine + theirs) == list(range(1000))


def test_claims_of_any_size_fit_the_pipe_and_cover_every_item():
    for total in (0, 1, shards.MIN_CHUNK + 1, 4096, 10**6 + 3):
        with shards.Claims(total) as claims:  # would block here if the tokens outgrew the pipe
            chunks = list(claims.take())
        assert len(chunks) <= shards.MAX_TURNS
        assert [i for chunk in chunks for i in chunk] == list(range(total))


def test_a_report_the_child_cannot_write_whole_is_never_taken_for_a_good_one():
    # A full temporary folder (here a file size limit) made the last flush fail after "ok" was
    # buffered: the child exited 0 and the parent read a cut-short record list.
    def run(_: shards.Report) -> list[str]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        return [f"nodes/a/client-{i}\t" + "x" * 100 for i in range(50)]  # 6 KB: all buffered

    helper = shards.fork(run)
    try:
        with pytest.raises(shards.HelperFailedError) as caught:
            list(helper.join(on_wait=lambda: None))
    finally:
        helper.stop()
    assert "temporary folder" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_stopped_child_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(shards, "STOP_GRACE", 0.3)

    def run(_: shards.Report) -> list[str]:
        time.sleep(60)
        return []

    helper = shards.fork(run)
    os.kill(helper.pid, signal.SIGSTOP)
    # Stopped for sure before the SIGTERM: one still pending with it would be taken after the
    # SIGTERM (the lower number goes first), and the child would end by that.
    _, stopped = os.waitpid(helper.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(stopped)
    started = time.monotonic()
    helper.stop()  # SIGTERM cannot end a stopped process: SIGKILL after the grace
    assert time.monotonic() - started < 5
    status = helper._status
    assert status is not None and os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


def test_the_parent_stops_claiming_once_the_child_has_failed():
    from cfwrap.errors import ToolFailedError

    def run(_: shards.Report) -> list[str]:
        raise ToolFailedError("cfssl", "simulated: the second signer cannot start")

    with shards.Claims(1000) as claims:
        helper = shards.fork(run)
        try:
            mine: list[int] = []
            for chunk in claims.take():
                if helper.failed():
                    break
                mine += chunk
                time.sleep(0.005)
            with pytest.raises(shards.HelperFailedError, match="second signer cannot start"):
                list(helper.join(on_wait=lambda: None))
        finally:
            helper.stop()
    assert len(mine) < 1000
