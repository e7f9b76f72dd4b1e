"""The guide format: a published tutorial's steps as data, validated against its schema on load.

A guide lists steps (commands, with real pipes, and files to write), the files the guide says
should exist afterwards (its own table), the certificates to check against Nomad's rules, and
the corrected commands to show when the guide goes wrong. Guides are TOML files; the ones cfwrap
ships live in ``cfwrap/replay/guides``.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap.errors import InputError

if TYPE_CHECKING:
    import jsonschema

SCHEMA_FILE = "guide.schema.json"
GUIDES = Path(__file__).resolve().parent / "guides"
_FROZEN = ConfigDict(frozen=True, extra="forbid")
_FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"


class RunStep(BaseModel):
    """Run a command, or several joined by pipes, in the replay folder."""

    model_config = _FROZEN

    kind: Literal["run"]
    say: str = Field(description="what the guide says at this step")
    pipeline: list[list[str]] = Field(
        min_length=1, description="argv of each stage of `a | b | c`, as the guide writes it"
    )
    stands_in_for: str | None = Field(
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
    say: str
    path: str = Field(pattern=_FILE_NAME, description="a file name in the replay folder")
    content: str
    mode: str = Field(default="0644", pattern=r"^0[0-7]{3}$")


class Check(BaseModel):
    """A certificate the guide made, and the Nomad role it claims to serve."""

    model_config = _FROZEN

    cert: str = Field(pattern=_FILE_NAME)
    key: str | None = Field(default=None, pattern=_FILE_NAME)
    ca: str = Field(pattern=_FILE_NAME)
    role: Literal["server", "client", "cli"]
    region: str = "global"


class Guide(BaseModel):
    """A published guide, replayable."""

    model_config = _FROZEN

    schema_version: Literal[1]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str
    source: str = Field(description="where the guide was published")
    steps: list[Annotated[RunStep | WriteStep, Field(discriminator="kind")]] = Field(min_length=1)
    expected_files: list[str] = Field(
        description="the guide's table of files; glob patterns such as *.csr allowed"
    )
    checks: list[Check] = Field(default_factory=list)
    corrections: list[str] = Field(
        default_factory=list, description="commands that do what the guide meant, correctly"
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a guide, as checked in under ``schemas/``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/guide.schema.json",
        **Guide.model_json_schema(),
    }


def shipped() -> list[str]:
    """Names of the guides that ship with cfwrap."""
    return sorted(p.stem for p in GUIDES.glob("*.toml"))


def load(name_or_path: str) -> Guide:
    """Load a shipped guide by name, or a guide file by path, validating it against the schema.

    Raises:
        InputError: no such guide, not TOML, or a schema error (with the path of the bad field).
    """
    import jsonschema

    from cfwrap import schema_files

    path = GUIDES / f"{name_or_path}.toml" if name_or_path in shipped() else Path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise InputError(
            name_or_path,
            e.strerror or str(e),
            fix=f"give a guide file, or one of: {', '.join(shipped())}",
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(str(path), f"not valid TOML ({e})") from None
    schema = schema_files.load(SCHEMA_FILE)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(data)
    )
    if error is not None:
        where, message = _explain(data, error)
        raise InputError(f"{path}: {where}", message, fix="see schemas/guide.schema.json")
    return Guide.model_validate(data)


def _explain(data: object, error: jsonschema.ValidationError) -> tuple[str, str]:
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
        return "/".join(loc) or "(top)", str(first["msg"])
    return "/".join(str(p) for p in error.absolute_path) or "(top)", error.message


def to_shell(guide: Guide) -> str:
    """The guide as a shell script a person can run in an empty folder."""
    lines = [
        "#!/usr/bin/env bash",
        f"# {guide.title}",
        f"# Source: {guide.source}",
        "# Written by cfwrap replay --print: run it in an empty folder. pipefail makes a failing",
        "# stage stop the script, which the guide's own pipes would not.",
        "set -euo pipefail",
    ]
    for number, step in enumerate(guide.steps, 1):
        lines += ["", f"# Step {number}: {step.say}"]
        if isinstance(step, RunStep):
            if step.stands_in_for:
                lines.append(f"# The guide runs `{step.stands_in_for}`; this stands in for it:")
            lines.append(step.command())
        else:
            marker = "EOF"
            while marker in step.content:
                marker += "_"
            lines += [
                f"cat > {shlex.quote(step.path)} <<'{marker}'",
                step.content.rstrip("\n"),
                marker,
                f"chmod {step.mode} {shlex.quote(step.path)}",
            ]
    return "\n".join(lines) + "\n"
