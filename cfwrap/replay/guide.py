"""The guide format: a published tutorial's steps as data, validated against its schema on load.

A guide lists steps (commands, with real pipes, and files to write), the files the guide says
should exist afterwards (its own table), the certificates to check against Nomad's rules, and
the corrected commands to show when the guide goes wrong. Guides are TOML files; the ones cfwrap
ships live in ``cfwrap/replay/guides``.

A guide comes from anywhere, and what it says is shown to people (``--print`` writes it as a shell
script; the transcript as Markdown). So text meant as one line (titles, what a step says,
commands shown, corrections) may hold no control character at all (a newline would end the
script's ``#`` comment and run the next line), no string anywhere may hold NUL, and the renderers
quote or escape whatever they show besides.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cfwrap import files
from cfwrap.errors import InputError
from cfwrap.replay import GUIDES, shipped

if TYPE_CHECKING:
    import jsonschema
    from pydantic_core import ErrorDetails

SCHEMA_FILE = "guide.schema.json"
_FROZEN = ConfigDict(frozen=True, extra="forbid")
_FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"
#: The largest guide file cfwrap reads; the shipped ones are about 4 KiB.
MAX_GUIDE = 1024 * 1024
#: How deeply a guide's TOML may nest; a valid guide needs 5 (steps, a step, pipeline, a stage).
MAX_DEPTH = 16
# Control characters (C0, DEL, C1), Unicode line and paragraph separators, and the bidi controls
# that can make a line read differently from what it does ("Trojan Source", CVE-2021-42574).
_CONTROLS = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_CONTROLS}]")
#: Text shown on one line (a script comment, a heading): no control characters at all.
OneLine = Annotated[str, Field(pattern=f"^[^{_CONTROLS}]*$")]
#: An argument or file content: anything but NUL, which no argv or file name can carry.
NoNul = Annotated[str, Field(pattern=r"^[^\x00]*$")]


class RunStep(BaseModel):
    """Run a command, or several joined by pipes, in the replay folder."""

    model_config = _FROZEN

    kind: Literal["run"]
    say: OneLine = Field(description="what the guide says at this step")
    pipeline: list[Annotated[list[NoNul], Field(min_length=1)]] = Field(
        min_length=1, description="argv of each stage of `a | b | c`, as the guide writes it"
    )
    stands_in_for: OneLine | None = Field(
        default=None, description="the guide's own command, when it needs a tool cfwrap lacks"
    )
    output: Literal["show", "secret", "gossip-key"] = Field(
        default="show",
        description="what stdout is: shown (keys removed), a secret, or a gossip key to check",
    )

    def command(self) -> str:
        """The command as a person would type it."""
        return " | ".join(shlex.join(stage) for stage in self.pipeline)


class WriteStep(BaseModel):
    """Write a file the guide shows, exactly as shown."""

    model_config = _FROZEN

    kind: Literal["write"]
    say: OneLine
    path: str = Field(pattern=_FILE_NAME, description="a file name in the replay folder")
    content: NoNul
    mode: str = Field(default="0644", pattern=r"^0[0-7]{3}$")


class Check(BaseModel):
    """A certificate the guide made, and the Nomad role it claims to serve."""

    model_config = _FROZEN

    cert: str = Field(pattern=_FILE_NAME)
    key: str | None = Field(default=None, pattern=_FILE_NAME)
    ca: str = Field(pattern=_FILE_NAME)
    role: Literal["server", "client", "cli"]
    region: str = Field(default="global", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Guide(BaseModel):
    """A published guide, replayable."""

    model_config = _FROZEN

    schema_version: Literal[1]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=100)
    title: OneLine
    source: OneLine = Field(description="where the guide was published")
    steps: list[Annotated[RunStep | WriteStep, Field(discriminator="kind")]] = Field(min_length=1)
    expected_files: list[OneLine] = Field(
        description="the guide's table of files; glob patterns such as *.csr allowed"
    )
    checks: list[Check] = Field(default_factory=list)
    corrections: list[OneLine] = Field(
        default_factory=list,
        description="commands that do what the guide meant, correctly (shown, never run)",
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a guide, as checked in under ``schemas/``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/guide.schema.json",
        **Guide.model_json_schema(),
    }


def load(name_or_path: str) -> Guide:
    """Load a shipped guide by name, or a guide file by path, validating it against the schema.

    Raises:
        InputError: no such guide; not a regular file, or larger than :data:`MAX_GUIDE`; not
            UTF-8 TOML; nested deeper than :data:`MAX_DEPTH`; or a schema error (with the path
            of the bad field).
    """
    import jsonschema

    from cfwrap import schema_files

    path = GUIDES / f"{name_or_path}.toml" if name_or_path in shipped() else Path(name_or_path)
    shown = _one_line(str(path))
    try:
        data = _parse(files.read_input_text(path, limit=MAX_GUIDE))
    except files.UnreadableInput as e:  # says itself what to give instead
        raise InputError(shown, e.strerror or str(e)) from None
    except OSError as e:
        raise InputError(
            _one_line(name_or_path),
            e.strerror or str(e),
            fix=f"give a guide file, or one of: {', '.join(shipped())}",
        ) from None
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise InputError(shown, _one_line(str(e))) from None
    schema = schema_files.load(SCHEMA_FILE)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(data)
    )
    if error is not None:
        where, message = _explain(data, error)
        raise InputError(f"{shown}: {where}", message, fix="see schemas/guide.schema.json")
    try:
        return Guide.model_validate(data)
    except ValidationError:  # a rule the JSON Schema cannot state
        where, message = _explain(data, None)
        raise InputError(f"{shown}: {where}", message) from None


def _parse(text: str) -> dict[str, Any]:
    """Parse a guide's TOML, refusing nesting beyond :data:`MAX_DEPTH`.

    Raises:
        ValueError: not valid TOML, or nested too deeply.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise ValueError(_TOO_DEEP) from None
    # Iteratively, so the check itself cannot exhaust the stack.
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(_TOO_DEEP)
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return data


_TOO_DEEP = f"nested too deeply to be a guide (more than {MAX_DEPTH} levels)"


def _one_line(text: str) -> str:
    """Text for a one-line message: control characters shown as escapes, and at most 200 long."""
    text = _CONTROL.sub(_escape, text)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _explain(data: object, error: jsonschema.ValidationError | None) -> tuple[str, str]:
    """The path and reason of a schema error, as precisely as can be said.

    For a step (a union chosen by ``kind``), jsonschema can only say that no branch matched;
    pydantic knows the branch from ``kind`` and names the field inside it.
    """
    from pydantic import ValidationError

    try:
        Guide.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        # pydantic puts the union's tag into the path (steps/0/run/pipeline): drop it.
        if len(loc) > 2 and loc[0] == "steps" and loc[2] in ("run", "write"):
            del loc[2]
        return _one_line("/".join(loc) or "(top)"), _one_line(_reason(first))
    if error is None:
        return "(top)", "not a valid guide"
    return _one_line("/".join(str(p) for p in error.absolute_path) or "(top)"), _one_line(
        error.message
    )


def _reason(error: ErrorDetails) -> str:
    """The reason pydantic gives, in words a guide's author can act on for cfwrap's patterns."""
    pattern = str((error.get("ctx") or {}).get("pattern", ""))
    if pattern.startswith("^[^\\x00-"):
        return "holds a control character (a newline, say); it must be one line of text"
    if pattern == r"^[^\x00]*$":
        return "holds a NUL character, which no argument or file can carry"
    return str(error["msg"])


def to_shell(guide: Guide) -> str:
    """The guide as a shell script a person can run in an empty folder.

    Nothing from the guide reaches the shell unquoted: text goes into comments through
    :func:`_comment` (one ``#`` line per line, control characters escaped), argv through
    :func:`shlex.join`, file names through :func:`shlex.quote`, and file content into a quoted
    here-document whose end marker appears nowhere in it.
    """
    lines = [
        "#!/usr/bin/env bash",
        *_comment(guide.title),
        *_comment(f"Source: {guide.source}"),
        "# Written by cfwrap replay --print: run it in an empty folder. pipefail makes a failing",
        "# stage stop the script, which the guide's own pipes would not.",
        "set -euo pipefail",
    ]
    for number, step in enumerate(guide.steps, 1):
        lines += ["", *_comment(f"Step {number}: {step.say}")]
        if isinstance(step, RunStep):
            if step.stands_in_for:
                lines += _comment(f"The guide runs `{step.stands_in_for}`; this stands in for it:")
            lines.append(" | ".join(" ".join(map(_word, stage)) for stage in step.pipeline))
        else:
            lines += _write_file(step.path, step.content)
            lines.append(f"chmod {shlex.quote(step.mode)} {shlex.quote(step.path)}")
    return "\n".join(lines) + "\n"


def _word(text: str) -> str:
    """One shell word that is exactly ``text``, and shows no control character raw.

    Plain text is single-quoted as usual; text with a control, separator or bidi character
    uses bash's ``$'...'`` quoting with escapes, so ``cat guide.sh`` on a terminal shows what
    runs (a raw CR or escape sequence could hide the start of the line).
    """
    from cfwrap.text import UNSAFE

    if not UNSAFE.search(text):
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + UNSAFE.sub(_escape, escaped) + "'"


def _write_file(path: str, content: str) -> list[str]:
    """Shell lines that write ``content`` to ``path`` byte for byte.

    A quoted here-document where it can hold the content exactly (one final newline, nothing
    unsafe but tabs and newlines); ``printf '%s'`` with one ``$'...'`` word otherwise.
    """
    from cfwrap.text import UNSAFE

    body = content.removesuffix("\n")
    plain = not UNSAFE.search(body.replace("\n", "").replace("\t", ""))
    if plain and content.endswith("\n") and not body.endswith("\n"):
        marker = "EOF"
        while marker in content:
            marker += "_"
        return [f"cat > {shlex.quote(path)} <<'{marker}'", body, marker]
    return [f"printf '%s' {_word(content)} > {shlex.quote(path)}"]


def _comment(text: str) -> list[str]:
    """Shell comment lines that hold ``text`` and nothing else.

    Each line of ``text`` gets its own ``#``, and control characters (CR, which a terminal uses to
    hide what came before it, among them) are shown as escapes: no character can end the
    comment, whatever a caller passes.
    """
    return [f"# {_CONTROL.sub(_escape, line)}".rstrip() for line in text.split("\n")]


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
