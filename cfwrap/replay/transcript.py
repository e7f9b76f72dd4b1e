"""What a replay records: each step as typed, its exit codes, time, stderr and files; the end.

Written as JSON (validated against ``schemas/transcript.schema.json``) and as Markdown to read
beside the guide. Never holds key material: stdout and stderr pass through the runner's
redaction, secret outputs are replaced by their size, and files appear as sha256 and mode only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap.manifest import ToolRecord

SCHEMA_FILE = "transcript.schema.json"
_FROZEN = ConfigDict(frozen=True, extra="forbid")

Outcome = Literal["ok", "findings", "step-failed", "tool-missing"]


class FileChange(BaseModel):
    """A file a step created, changed or removed."""

    model_config = _FROZEN

    path: str
    change: Literal["created", "changed", "removed"]
    sha256: str | None
    mode: str | None


class StepRecord(BaseModel):
    """One step as it ran."""

    model_config = _FROZEN

    number: int
    say: str
    kind: Literal["run", "write"]
    command: str = Field(description="as a person would type it")
    stands_in_for: str | None = None
    exit_codes: list[int] = Field(description="one per pipeline stage")
    seconds: float
    stdout: str = Field(description="private keys removed; secrets replaced by their size")
    stderr: list[str] = Field(description="each stage's stderr, private keys removed")
    files: list[FileChange]
    ok: bool
    note: str = ""


class FindingRecord(BaseModel):
    """A doctor finding about what the guide made."""

    model_config = _FROZEN

    severity: Literal["error", "warning", "info"]
    path: str
    check: str
    message: str
    nomad_error: str
    fix: str


class ProbeRecord(BaseModel):
    """A real handshake between the guide's certificates."""

    model_config = _FROZEN

    name: str
    server_name: str
    expect_ok: bool
    ok: bool
    as_expected: bool
    error: str


class Transcript(BaseModel):
    """A whole replay."""

    model_config = _FROZEN

    schema_version: Literal[1] = 1
    guide: str
    title: str
    source: str
    started_at: datetime
    tools: list[ToolRecord] = Field(
        default_factory=list, description="the cfssl binaries the steps ran: path, package, sha256"
    )
    steps: list[StepRecord]
    outcome: Outcome
    stopped_because: str = ""
    missing_files: list[str] = Field(default_factory=list)
    extra_files: list[str] = Field(default_factory=list)
    findings: list[FindingRecord] = Field(default_factory=list)
    probes: list[ProbeRecord] = Field(default_factory=list)
    corrections: list[str] = Field(default_factory=list)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a transcript, as checked in under ``schemas/``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/transcript.schema.json",
        **Transcript.model_json_schema(),
    }


def _fence(text: str) -> list[str]:
    return ["```", text.rstrip("\n"), "```"] if text.strip() else []


def to_markdown(transcript: Transcript) -> str:
    """Render a transcript to read beside the guide."""
    lines = [
        f"# Replay: {transcript.title}",
        "",
        f"- guide: `{transcript.guide}` ({transcript.source})",
        f"- started: {transcript.started_at:%Y-%m-%d %H:%M:%S} UTC",
        *(
            f"- {t.name}: {t.package or 'no package'} {t.version or ''} (sha256 {t.sha256[:16]}...)"
            for t in transcript.tools
        ),
        f"- outcome: **{transcript.outcome}**"
        + (f": {transcript.stopped_because}" if transcript.stopped_because else ""),
    ]
    for step in transcript.steps:
        lines += _step_markdown(step)
    lines += _end_markdown(transcript)
    return "\n".join(lines) + "\n"


def _step_markdown(step: StepRecord) -> list[str]:
    lines = ["", f"## Step {step.number}: {step.say}", ""]
    if step.stands_in_for:
        lines += [f"The guide runs `{step.stands_in_for}`; cfwrap ran this instead:", ""]
    lines += ["```sh", f"$ {step.command}", "```", ""]
    codes = ", ".join(str(c) for c in step.exit_codes) or "-"
    lines.append(f"exit {codes} in {step.seconds:.3f}s" + (f"; {step.note}" if step.note else ""))
    if step.stdout.strip():
        lines += ["", "stdout:", *_fence(step.stdout)]
    for number, stderr in enumerate(step.stderr, 1):
        if stderr.strip():
            label = f"stderr (stage {number})" if len(step.stderr) > 1 else "stderr"
            lines += ["", f"{label}:", *_fence(stderr)]
    if step.files:
        lines += ["", "| file | change | mode | sha256 |", "|---|---|---|---|"]
        lines += [
            f"| `{f.path}` | {f.change} | {f.mode or ''} | `{(f.sha256 or '')[:16]}` |"
            for f in step.files
        ]
    return lines


def _end_markdown(transcript: Transcript) -> list[str]:
    lines = ["", "## The guide's table of files", ""]
    if not transcript.missing_files and not transcript.extra_files:
        lines.append("The folder holds exactly the files the guide lists.")
    lines += [f"- missing: `{name}`" for name in transcript.missing_files]
    lines += [f"- not in the guide's table: `{name}`" for name in transcript.extra_files]
    lines += ["", "## Nomad's rules", ""]
    if not transcript.findings:
        lines.append("No findings: the certificates pass Nomad's checks.")
    for f in transcript.findings:
        lines.append(f"- **{f.severity}** `{f.path}` {f.check}: {f.message}")
        if f.nomad_error:
            lines.append(f"  - Nomad says: `{f.nomad_error}`")
    if transcript.probes:
        lines += ["", "Real handshakes between the guide's certificates:", ""]
        for p in transcript.probes:
            mark = "as Nomad needs" if p.as_expected else "**not as Nomad needs**"
            got = "connected" if p.ok else f"refused ({p.error})"
            lines.append(f"- {p.name} [{p.server_name}]: {got}, {mark}")
    if transcript.corrections:
        lines += ["", "## Corrected commands", "", "```sh", *transcript.corrections, "```"]
    return lines
