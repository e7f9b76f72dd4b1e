"""What a replay records: each step as typed, its exit codes, time, stderr and files; the end.

Written as JSON (validated against ``schemas/transcript.schema.json``) and as Markdown to read
beside the guide. Never holds key material: stdout and stderr pass through the runner's
redaction, secret outputs are replaced by their size, and files appear as sha256 and mode only.
"""

from __future__ import annotations

import re
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
    sha256: str | None = Field(
        description="of the content; for a file over 64 MiB, its size and time stand in"
    )
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


# Characters that would change what a reader sees: C0 and C1 controls (a newline ends a list item
# or opens a new block, CR and ESC rewrite a terminal's line), Unicode line separators and bidi
# controls. In a block of tool output, newlines and tabs are the text itself and stay.
_OTHER_CONTROLS = r"\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
_IN_LINE = re.compile(rf"[\x00-\x0a{_OTHER_CONTROLS}]")
_IN_BLOCK = re.compile(rf"[\x00-\x08{_OTHER_CONTROLS}]")
# Markdown punctuation that could open a link, an image, emphasis, a code span, a table cell or
# raw HTML inside ordinary text.
_MARKUP = re.compile(r"([\\`*_\[\]<|])")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _text(value: str) -> str:
    """Text from a guide, a tool or a file name, as plain Markdown text on one line."""
    return _MARKUP.sub(r"\\\1", _IN_LINE.sub(_visible, value))


def _code(value: str, *, cell: bool = False) -> str:
    """An inline code span that shows ``value`` as it is, on one line, and cannot be closed early.

    The delimiter is one backtick longer than the longest run inside (CommonMark 6.1). In a
    table ``cell``, ``|`` is escaped, as GitHub's tables require even inside code.
    """
    value = _IN_LINE.sub(_visible, value)
    if cell:
        value = value.replace("|", "\\|")
    ticks = "`" * (max((len(run) for run in re.findall("`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") or not value.strip() else ""
    return f"{ticks}{pad}{value}{pad}{ticks}"


def _fence(text: str, info: str = "") -> list[str]:
    """A fenced block that holds ``text`` whole, however many backticks it holds.

    The fence is longer than any backtick run in the text (CommonMark 4.5), so no line of the
    text can close it.
    """
    if not text.strip():
        return []
    text = _IN_BLOCK.sub(_visible, text.rstrip("\n"))
    ticks = "`" * max(3, max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return [f"{ticks}{info}", text, ticks]


def to_markdown(transcript: Transcript) -> str:
    """Render a transcript to read beside the guide.

    Every value comes from a guide file, a tool or a file name, so none may shape the page: text
    goes through :func:`_text`, names through :func:`_code`, output and commands through
    :func:`_fence`.
    """
    lines = [
        f"# Replay: {_text(transcript.title)}",
        "",
        f"- guide: {_code(transcript.guide)} ({_text(transcript.source)})",
        f"- started: {transcript.started_at:%Y-%m-%d %H:%M:%S} UTC",
        *(
            f"- {_text(t.name)}: {_text(t.package or 'no package')} {_text(t.version or '')} "
            f"(sha256 {t.sha256[:16]}...)"
            for t in transcript.tools
        ),
        f"- outcome: **{transcript.outcome}**"
        + (f": {_text(transcript.stopped_because)}" if transcript.stopped_because else ""),
    ]
    for step in transcript.steps:
        lines += _step_markdown(step)
    lines += _end_markdown(transcript)
    return "\n".join(lines) + "\n"


def _step_markdown(step: StepRecord) -> list[str]:
    lines = ["", f"## Step {step.number}: {_text(step.say)}", ""]
    if step.stands_in_for:
        lines += [f"The guide runs {_code(step.stands_in_for)}; cfwrap ran this instead:", ""]
    lines += [*_fence(f"$ {step.command}", "sh"), ""]
    codes = ", ".join(str(c) for c in step.exit_codes) or "-"
    note = f"; {_text(step.note)}" if step.note else ""
    lines.append(f"exit {codes} in {step.seconds:.3f}s{note}")
    if step.stdout.strip():
        lines += ["", "stdout:", *_fence(step.stdout)]
    for number, stderr in enumerate(step.stderr, 1):
        if stderr.strip():
            label = f"stderr (stage {number})" if len(step.stderr) > 1 else "stderr"
            lines += ["", f"{label}:", *_fence(stderr)]
    if step.files:
        lines += ["", "| file | change | mode | sha256 |", "|---|---|---|---|"]
        lines += [
            f"| {_code(f.path, cell=True)} | {f.change} | {f.mode or ''} "
            f"| {_code((f.sha256 or '')[:16], cell=True)} |"
            for f in step.files
        ]
    return lines


def _end_markdown(transcript: Transcript) -> list[str]:
    lines = ["", "## The guide's table of files", ""]
    if not transcript.missing_files and not transcript.extra_files:
        lines.append("The folder holds exactly the files the guide lists.")
    lines += [f"- missing: {_code(name)}" for name in transcript.missing_files]
    lines += [f"- not in the guide's table: {_code(name)}" for name in transcript.extra_files]
    lines += ["", "## Nomad's rules", ""]
    if not transcript.findings:
        lines.append("No findings: the certificates pass Nomad's checks.")
    for f in transcript.findings:
        lines.append(f"- **{f.severity}** {_code(f.path)} {_text(f.check)}: {_text(f.message)}")
        if f.nomad_error:
            lines.append(f"  - Nomad says: {_code(f.nomad_error)}")
    if transcript.probes:
        lines += ["", "Real handshakes between the guide's certificates:", ""]
        for p in transcript.probes:
            mark = "as Nomad needs" if p.as_expected else "**not as Nomad needs**"
            got = "connected" if p.ok else f"refused ({_text(p.error)})"
            lines.append(f"- {_text(p.name)} \\[{_text(p.server_name)}\\]: {got}, {mark}")
    if transcript.corrections:
        lines += ["", "## Corrected commands", "", *_fence("\n".join(transcript.corrections), "sh")]
    return lines
