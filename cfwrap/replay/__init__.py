"""``cfwrap replay``: run a guide's steps for real in a fresh folder, record them, judge the result.

``DIR/files`` is where the steps run (real binaries, real pipes, cfssljson included, for
fidelity); ``DIR/transcript.md`` and ``DIR/transcript.json`` record them. The whole of ``DIR`` is
built beside its target and moved into place at the end, also when a step fails.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cfwrap import doctor, files, gossip, tools
from cfwrap.doctor import probe
from cfwrap.errors import ToolFailedError, ToolMissingError
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
from cfwrap.runner import Call, redact, run_pipeline

FILES = "files"
_CFSSL_FAMILY = ("cfssl", "cfssljson", "multirootca")


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


def _snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    state = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink():
            mode = f"0{stat.S_IMODE(path.stat().st_mode):03o}"
            state[path.name] = (hashlib.sha256(path.read_bytes()).hexdigest(), mode)
    return state


def _changes(
    before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]]
) -> list[FileChange]:
    changes = [
        FileChange(
            path=name,
            change="created" if name not in before else "changed",
            sha256=after[name][0],
            mode=after[name][1],
        )
        for name in after
        if before.get(name) != after[name]
    ]
    changes += [
        FileChange(path=n, change="removed", sha256=None, mode=None)
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

    def run_step(self, number: int, step: RunStep | WriteStep) -> str:
        """Run one step and record it; return why the replay must stop ('' to go on)."""
        before = _snapshot(self.work)
        started = time.monotonic()
        if isinstance(step, WriteStep):
            files.write_new(self.work / step.path, step.content.encode(), mode=int(step.mode, 8))
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
                    ok=True,
                )
            )
            return ""
        return self._run(number, step, before, started)

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

        try:
            calls = [
                Call.of(_argv(stage, self.cfssl_dir, self.tools), cwd=self.work)
                for stage in step.pipeline
            ]
        except ToolMissingError as e:
            record([], "", [], ok=False, note=str(e))
            return f"tool-missing: step {number} needs {e.tool}: {e.message}"
        try:
            results = run_pipeline(calls, check=False)
        except ToolFailedError as e:
            record([], "", [], ok=False, note=str(e))
            return f"step-failed: step {number}: {e}"
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
        if step.output == "secret":
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
    return missing, extra


def _relative(text: str, work: Path) -> str:
    """Paths inside the replay folder, relative to it (the folder is renamed at the end)."""
    return text.replace(f"{work}/", "").replace(str(work), ".")


def _judge(guide: Guide, work: Path) -> tuple[list[FindingRecord], list[ProbeRecord]]:
    """Check the guide's certificates with doctor and real handshakes."""
    findings: dict[tuple[str, str], FindingRecord] = {}
    options = doctor.Options()
    for check in guide.checks:
        if not (work / check.cert).is_file():
            continue
        report = doctor.diagnose_files(
            cert=work / check.cert,
            key=work / check.key if check.key else None,
            ca=work / check.ca,
            role=check.role,
            region=check.region,
            options=options,
        )
        for f in report.findings:
            record = FindingRecord(
                severity=f.severity,
                path=_relative(f.path, work),
                check=f.check,
                message=_relative(f.message, work),
                nomad_error=f.nomad_error,
                fix=_relative(f.fix, work),
            )
            findings.setdefault((record.path, record.check), record)
    probes = _probes(guide.checks, work)
    for f in doctor.probe_findings(probes):
        if f.severity != "info":
            findings.setdefault((f.path, f.check), FindingRecord(**f.to_json()))
    records = [ProbeRecord(**p.to_json()) for p in probes]
    return list(findings.values()), records


def _probes(checks: list[Check], work: Path) -> list[probe.ProbeResult]:
    sides: dict[str, probe.Side] = {}
    for check in checks:
        if check.key and (work / check.cert).is_file() and (work / check.key).is_file():
            sides.setdefault(check.role, probe.Side(work / check.cert, work / check.key))
    if not checks or not (work / checks[0].ca).is_file():
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
