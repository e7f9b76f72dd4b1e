"""``cfwrap replay``: run a guide's steps for real in a fresh folder, record them, judge the result.

``DIR/files`` is where the steps run (real binaries, real pipes, cfssljson included, for
fidelity); ``DIR/transcript.md`` and ``DIR/transcript.json`` record them. The whole of ``DIR`` is
built beside its target and moved into place at the end, also when a step fails.

Secrets stay out of the transcripts and logs by value: before and after each step, every private
key and gossip key in the folder is handed to the runner, which removes them (in any of the forms
tools print them in) from whatever it logs or returns; a step's secret output is never logged.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cfwrap import doctor, files, gossip, tools
from cfwrap.doctor import probe
from cfwrap.errors import ConflictError, FileSystemError, ToolFailedError, ToolMissingError
from cfwrap.manifest import tool_record
from cfwrap.replay.guide import Check, Guide, RunStep, WriteStep
from cfwrap.replay.transcript import (
    FileChange,
    FindingRecord,
    Outcome,
    ProbeRecord,
    StepRecord,
    Transcript,
    to_markdown,
)
from cfwrap.runner import (
    Call,
    redact,
    redact_text,
    remember_secrets_in,
    run_pipeline,
)

FILES = "files"
_CFSSL_FAMILY = ("cfssl", "cfssljson", "multirootca")
#: Commands whose output is a gossip key, whatever the guide calls it: never shown or logged.
_GOSSIP_MAKERS = (
    ("cfwrap", "keygen"),
    ("nomad", "keygen"),
    ("nomad", "operator", "keygen"),
    ("nomad", "operator", "gossip", "keyring", "generate"),
    ("consul", "keygen"),
)
#: Files larger than this are recorded by size and time, not hashed: a step can make a sparse
#: file of any size (``truncate -s 1T``), and reading it all would take minutes.
HASH_LIMIT = 64 * 1024 * 1024
#: The most cfwrap reads of one file in the folder when it looks for the secrets in it.
SECRET_SCAN_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class ReplayResult:
    """A finished replay: where it is, and what it found."""

    folder: Path
    transcript: Transcript

    @property
    def markdown(self) -> Path:
        """The Markdown transcript."""
        return self.folder / "transcript.md"

    @property
    def json(self) -> Path:
        """The JSON transcript."""
        return self.folder / "transcript.json"


def _identity(folder: Path) -> tuple[int, int] | None:
    """The device and inode of ``folder`` itself (not what a symlink there points to)."""
    try:
        info = os.lstat(folder)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    """Each regular file below ``folder`` (``certs/ca.pem`` too) with its sha256 and mode.

    Symlinks, FIFOs and devices are never opened, nor symlinked folders entered; past
    :data:`HASH_LIMIT` a file's size and time stand in for its sha256, and past
    :data:`_SECRET_SCAN_FILES` files the rest are not listed.
    """
    state: dict[str, tuple[str, str]] = {}
    for top, dirs, names in os.walk(folder):  # never into a symlinked folder
        dirs.sort()
        for name in sorted(names):
            if len(state) >= _SECRET_SCAN_FILES:
                return state
            path = Path(top) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                mode = f"0{stat.S_IMODE(info.st_mode):03o}"
                state[str(path.relative_to(folder))] = (_digest(path, info), mode)
    return state


def _digest(path: Path, info: os.stat_result) -> str:
    """A regular file's sha256, read in blocks; for a large or unreadable file, a stand-in."""
    if info.st_size > HASH_LIMIT:
        return f"size {info.st_size}, modified {info.st_mtime_ns}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the lstat
            return "not a regular file"
        digest = hashlib.sha256()
        while block := f.read(1 << 20):
            digest.update(block)
            if f.tell() > HASH_LIMIT:
                return f"size over {HASH_LIMIT}, modified {info.st_mtime_ns}"
        return digest.hexdigest()


#: The most files below a replay's folder read for secrets after each step.
_SECRET_SCAN_FILES = 10_000


def _remember_secrets(folder: Path, seen: dict[str, tuple[int, int]]) -> None:
    """Hand every private key and gossip key in ``folder`` to the runner, to be removed by value.

    ``seen`` holds each file's size and time when it was last looked at, so an unchanged file is
    read once. FIFOs, devices and files over :data:`SECRET_SCAN_LIMIT` are not read.
    """
    # Every folder below too (a step may keep its keys in sub/), up to a bound on the count.
    for path in sorted(folder.rglob("*"))[:_SECRET_SCAN_FILES]:
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size > SECRET_SCAN_LIMIT:
            continue
        stamp = (info.st_size, info.st_mtime_ns)
        name = str(path.relative_to(folder))
        if seen.get(name) == stamp:
            continue
        seen[name] = stamp
        try:
            data = files.read_input(path, limit=SECRET_SCAN_LIMIT)
        except OSError:
            continue
        remember_secrets_in(data)


def _makes_gossip_key(stage: list[str]) -> bool:
    words = tuple(word for word in stage if not word.startswith("-"))
    return any(words[: len(maker)] == maker for maker in _GOSSIP_MAKERS)


def _changes(
    before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]]
) -> list[FileChange]:
    changes = [
        FileChange(
            path=redact_text(name),  # a step may name a file after a secret
            change="created" if name not in before else "changed",
            sha256=after[name][0],
            mode=after[name][1],
        )
        for name in after
        if before.get(name) != after[name]
    ]
    changes += [
        FileChange(path=redact_text(n), change="removed", sha256=None, mode=None)
        for n in before
        if n not in after
    ]
    return changes


def _argv(stage: list[str], cfssl_dir: Path | None, used: dict[str, tools.Tool]) -> list[str]:
    """Resolve a stage's program: cfssl's family from cfwrap's search, cfwrap itself, or PATH.

    The cfssl binaries found are added to ``used``, for the transcript.

    Raises:
        ToolMissingError: the program is not installed.
    """
    program, args = stage[0], stage[1:]
    if program in _CFSSL_FAMILY:
        tool = used.get(program) or tools.find(program, directory=cfssl_dir)
        used[program] = tool
        return [str(tool.path), *args]
    if program == "cfwrap":
        return [sys.executable, "-m", "cfwrap", *args]
    found = shutil.which(program)
    if found is None:
        raise ToolMissingError(
            program,
            "not installed, and the guide's step needs it",
            fix=f"install {program}, or replay a guide that does not need it",
        )
    return [found, *args]


def _failed_silently(stderr: list[str]) -> bool:
    """Treat cfssl's ERROR lines as failure: it can log an error and still exit 0."""
    return any("[ERROR]" in text or "[CRITICAL]" in text for text in stderr)


class _Run:
    """State of one replay while it runs."""

    def __init__(self, guide: Guide, work: Path, cfssl_dir: Path | None) -> None:
        self.guide = guide
        self.work = work
        self.cfssl_dir = cfssl_dir
        self.steps: list[StepRecord] = []
        self.findings: list[FindingRecord] = []
        self.tools: dict[str, tools.Tool] = {}
        self.scanned: dict[str, tuple[int, int]] = {}
        #: The folder's identity: a step may move it and leave a symlink in its place.
        self.identity = _identity(work)

    def run_step(self, number: int, step: RunStep | WriteStep) -> str:
        """Run one step and record it; return why the replay must stop ('' to go on)."""
        _remember_secrets(self.work, self.scanned)  # what the step may read and print
        before = _snapshot(self.work)
        started = time.monotonic()
        if isinstance(step, WriteStep):
            return self._write(number, step, before, started)
        return self._run(number, step, before, started)

    def _write(
        self, number: int, step: WriteStep, before: dict[str, tuple[str, str]], started: float
    ) -> str:
        """Write a step's file; a name an earlier step took (a symlink too) stops the replay.

        The guide's own ``cat >`` would write through a symlink an earlier step planted, or
        over its file: cfwrap does neither, and says which step's file is in the way.
        """
        path = self.work / step.path
        why = ""
        if _identity(self.work) != self.identity:
            why = "the replay's folder was moved or replaced (by a symlink?) by an earlier step"
        elif os.path.lexists(path):
            kind = "a symlink" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            why = f"{step.path} is already there ({kind} an earlier step made)"
        else:
            try:
                files.write_new(path, step.content.encode(), mode=int(step.mode, 8))
            except (ConflictError, FileSystemError) as e:
                why = _shown(e.message, self.work)
        self.steps.append(
            StepRecord(
                number=number,
                say=step.say,
                kind="write",
                command=f"cat > {step.path}",
                exit_codes=[],
                seconds=time.monotonic() - started,
                stdout="",
                stderr=[],
                files=_changes(before, _snapshot(self.work)),
                ok=not why,
                note=why,
            )
        )
        return f"step-failed: step {number} (cat > {step.path}) failed: {why}" if why else ""

    def _run(
        self, number: int, step: RunStep, before: dict[str, tuple[str, str]], started: float
    ) -> str:
        def record(codes: list[int], stdout: str, stderr: list[str], ok: bool, note: str) -> None:
            self.steps.append(
                StepRecord(
                    number=number,
                    say=step.say,
                    kind="run",
                    command=step.command(),
                    stands_in_for=step.stands_in_for,
                    exit_codes=codes,
                    seconds=round(time.monotonic() - started, 4),
                    stdout=stdout,
                    stderr=stderr,
                    files=_changes(before, _snapshot(self.work)),
                    ok=ok,
                    note=note,
                )
            )

        secret = step.output != "show" or any(_makes_gossip_key(s) for s in step.pipeline)
        try:
            calls = [
                Call.of(
                    _argv(stage, self.cfssl_dir, self.tools),
                    cwd=self.work,
                    secret_stdout=secret and index == len(step.pipeline) - 1,
                    # what the step wrote, before its output is logged (-v)
                    on_exit=functools.partial(_remember_secrets, self.work, self.scanned),
                    group=True,  # what a step starts in the background ends with it
                )
                for index, stage in enumerate(step.pipeline)
            ]
        except ToolMissingError as e:
            record([], "", [], ok=False, note=redact_text(str(e)))
            return f"tool-missing: step {number} needs {e.tool}: {redact_text(e.message)}"
        try:
            results = run_pipeline(calls, check=False)
        except ToolFailedError as e:
            record([], "", [], ok=False, note=redact_text(str(e)))
            return f"step-failed: step {number}: {redact_text(str(e))}"
        _remember_secrets(self.work, self.scanned)  # keys the step made, before its output shows
        codes = [r.returncode for r in results]
        stderr = [redact(r.stderr).decode("utf-8", "replace") for r in results]
        stdout, note = self._stdout(step, results[-1].stdout)
        ok = all(c == 0 for c in codes) and not _failed_silently(stderr)
        if ok and step.output == "gossip-key" and note.startswith("invalid"):
            ok = False
        record(codes, stdout, stderr, ok, note)
        if ok:
            return ""
        if all(c == 0 for c in codes):
            why = "a tool logged an error but exited 0"
        else:
            failed = next(i for i, c in enumerate(codes) if c != 0)
            why = f"`{step.pipeline[failed][0]}` exited {codes[failed]}"
        return f"step-failed: step {number} ({step.command()}) failed: {why}"

    def _stdout(self, step: RunStep, data: bytes) -> tuple[str, str]:
        """What the transcript may show of a step's stdout, and a note about it."""
        if step.output == "secret" or (
            step.output == "show" and any(_makes_gossip_key(s) for s in step.pipeline)
        ):
            return f"[secret output, {len(data)} bytes, not shown]", ""
        if step.output == "gossip-key":
            try:
                size = gossip.check(data.decode("utf-8", "replace"))
            except ValueError as e:
                return "[gossip key, not shown]", f"invalid gossip key: {e}"
            if size < gossip.DEFAULT_SIZE:
                self.findings.append(
                    FindingRecord(
                        severity="warning",
                        path=f"step {len(self.steps) + 1}",
                        check="gossip.size",
                        message=f"a {size}-byte gossip key (AES-{size * 8}); current Nomad makes "
                        f"{gossip.DEFAULT_SIZE} bytes (AES-256)",
                        nomad_error="",
                        fix="cfwrap keygen",
                    )
                )
            return f"[gossip key, {size} bytes, not shown]", f"a valid {size}-byte gossip key"
        return redact(data).decode("utf-8", "replace"), ""


def _compare(guide: Guide, work: Path) -> tuple[list[str], list[str]]:
    """Files the guide's table (and its own written files) name but are missing; and extras."""
    present = sorted(p.name for p in work.iterdir())
    patterns = [*guide.expected_files, *(s.path for s in guide.steps if isinstance(s, WriteStep))]
    missing = [p for p in patterns if not fnmatch.filter(present, p)]
    extra = [n for n in present if not any(fnmatch.fnmatch(n, p) for p in patterns)]
    return missing, [redact_text(n) for n in extra]  # a step may name a file after a secret


def _shown(text: str, work: Path) -> str:
    """Text for a transcript: secrets removed, paths in the folder relative to it.

    Relative, because the folder is renamed at the end.
    """
    return redact_text(text.replace(f"{work}/", "").replace(str(work), "."))


def _regular(path: Path) -> bool:
    """A regular file (through a symlink too): doctor and the probes read nothing else."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _judge(guide: Guide, work: Path) -> tuple[list[FindingRecord], list[ProbeRecord]]:
    """Check the guide's certificates with doctor and real handshakes."""
    findings: dict[tuple[str, str], FindingRecord] = {}
    options = doctor.Options()
    for check in guide.checks:
        if not _regular(work / check.cert) or not _regular(work / check.ca):
            continue
        report = doctor.diagnose_files(
            cert=work / check.cert,
            key=work / check.key if check.key and _regular(work / check.key) else None,
            ca=work / check.ca,
            role=check.role,
            region=check.region,
            options=options,
        )
        for f in report.findings:
            record = _finding(f.to_json(), work)
            findings.setdefault((record.path, record.check), record)
    probes = _probes(guide.checks, work)
    for f in doctor.probe_findings(probes):
        if f.severity != "info":
            record = _finding(f.to_json(), work)
            findings.setdefault((record.path, record.check), record)
    records = [ProbeRecord.model_validate(_shown_fields(p.to_json(), work)) for p in probes]
    return list(findings.values()), records


def _finding(data: dict[str, object], work: Path) -> FindingRecord:
    """A doctor finding as the transcript records it."""
    return FindingRecord.model_validate(_shown_fields(data, work))


def _shown_fields(data: dict[str, object], work: Path) -> dict[str, object]:
    """Every text field through :func:`_shown` (``severity`` is a fixed word)."""
    return {
        k: _shown(v, work) if isinstance(v, str) and k != "severity" else v for k, v in data.items()
    }


def _probes(checks: list[Check], work: Path) -> list[probe.ProbeResult]:
    sides: dict[str, probe.Side] = {}
    for check in checks:
        if check.key and _regular(work / check.cert) and _regular(work / check.key):
            sides.setdefault(check.role, probe.Side(work / check.cert, work / check.key))
    if not checks or not _regular(work / checks[0].ca):
        return []
    plan = probe.nomad_probes(
        region=checks[0].region,
        server=sides.get("server"),
        client=sides.get("client"),
        cli=sides.get("cli"),
    )
    return [probe.run(p, work / checks[0].ca) for p in plan]


def replay(
    guide: Guide,
    *,
    out: Path,
    cfssl_dir: Path | None = None,
    force: bool = False,
    wait: float = 0.0,
) -> ReplayResult:
    """Run ``guide`` in ``out/files`` and write its transcripts into ``out``.

    Raises:
        ConflictError: ``out`` exists and is not empty (without ``force``), or is locked.
    """
    started_at = datetime.now(UTC)
    with files.Staging(out, force=force, wait=wait) as staging:
        work = staging.path / FILES
        work.mkdir(mode=files.DIR_MODE)
        run = _Run(guide, work, cfssl_dir)
        stopped = ""
        for number, step in enumerate(guide.steps, 1):
            stopped = run.run_step(number, step)
            if stopped:
                break
        missing: list[str] = []
        extra: list[str] = []
        findings = list(run.findings)
        probes: list[ProbeRecord] = []
        if not stopped:
            missing, extra = _compare(guide, work)
            judged, probes = _judge(guide, work)
            findings += judged
        errors = any(f.severity == "error" for f in findings) or bool(missing)
        outcome: Outcome = "ok"
        if stopped:
            outcome = "tool-missing" if stopped.startswith("tool-missing") else "step-failed"
        elif errors:
            outcome = "findings"
        corrections: list[str] = []
        if outcome != "ok":
            fixes = [
                f.fix
                for f in findings
                if f.severity == "error" and f.fix.startswith(("cfwrap ", "chmod ", "chown "))
            ]
            corrections = [*dict.fromkeys(fixes), *guide.corrections]
        transcript = Transcript(
            guide=guide.name,
            title=guide.title,
            source=guide.source,
            started_at=started_at,
            tools=[tool_record(t) for t in run.tools.values()],
            steps=run.steps,
            outcome=outcome,
            stopped_because=stopped.partition(": ")[2],
            missing_files=missing,
            extra_files=extra,
            findings=findings,
            probes=probes,
            corrections=corrections,
        )
        _write_transcripts(staging.path, transcript)
        staging.commit()
    return ReplayResult(out, transcript)


def _write_transcripts(folder: Path, transcript: Transcript) -> None:
    import jsonschema

    from cfwrap import schema_files
    from cfwrap.replay.transcript import SCHEMA_FILE

    data = json.loads(transcript.model_dump_json())
    jsonschema.Draft202012Validator(schema_files.load(SCHEMA_FILE)).validate(data)
    files.write_new(
        folder / "transcript.json",
        (json.dumps(data, indent=2) + "\n").encode(),
        mode=files.PUBLIC_MODE,
    )
    files.write_new(
        folder / "transcript.md", to_markdown(transcript).encode(), mode=files.PUBLIC_MODE
    )
