"""The plan manifest of a large fleet: written and read a piece at a time, any size it reaches.

The records of a fleet's members live in an unlinked file while an apply runs
(:class:`state.Records`), and the plan manifest is compared and written in pieces; these tests
hold the file to what a reader outside cfwrap sees (``json``, the checked-in schema).
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import jsonschema
import pytest

from cfwrap import files
from cfwrap.errors import VerificationError
from cfwrap.plan import state

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def manifest_head() -> state.PlanManifest:
    return state.PlanManifest(
        plan_sha256="a" * 64,
        phase="steady",
        signing_generation=1,
        trusted_generations=[1],
        cas=[
            state.CARecord(
                generation=1,
                folder="ca/gen-1",
                subject="CN=test",
                serial="01",
                fingerprint_sha256="b" * 64,
                not_after=WHEN,
            )
        ],
        members=[],
        tools=[],
    )


def member_record(n: int) -> bytes:
    return state.record_json(
        state.MemberRecord(
            folder=f"nodes/global/client-{n}",
            role="client",
            region="global",
            name=f"client-{n}",
            address=None,
            serial=f"{n:040x}",
            fingerprint_sha256=f"{n:064x}",
            not_before=WHEN,
            not_after=WHEN,
            ca_generation=1,
            files={f"file-{k}.pem": f"{n + k:064x}" for k in range(5)},
        )
    )


def test_records_come_back_by_folder_and_keep_no_name_on_disk(tmp_path: Path) -> None:
    records = state.Records(tmp_path)
    for n in range(1, 1001):
        records.put(f"nodes/global/client-{n}", member_record(n))
    records.put("nodes/global/client-7", member_record(7_000_000))  # replaced
    assert records["nodes/global/client-1"] == member_record(1)
    assert records["nodes/global/client-1000"] == member_record(1000)
    assert records["nodes/global/client-7"] == member_record(7_000_000)
    assert [folder for folder, _ in records.items()][:3] == [
        f"nodes/global/client-{n}" for n in (1, 2, 3)
    ]
    assert list(tmp_path.iterdir()) == []  # the records' file has no name
    with pytest.raises(KeyError):
        records["nodes/global/absent"]
    records.close()


def test_a_fleet_manifest_beyond_16_mib_is_written_read_and_left_alone(tmp_path: Path) -> None:
    """25,000 members: more than cfwrap reads of any other input (16 MiB), and still a plan."""
    count = 25_000
    lines = [member_record(n) for n in range(1, count + 1)]
    assert sum(len(line) for line in lines) > files.MAX_INPUT

    assert state.write(tmp_path, manifest_head(), lambda: lines) is True
    path = tmp_path / state.FILE_NAME
    data = json.loads(path.read_bytes())  # read as any JSON reader would
    assert len(data["members"]) == count
    assert data["members"][count - 1]["name"] == f"client-{count}"
    jsonschema.validate(data, json.loads((SCHEMAS / state.SCHEMA_FILE).read_text()))

    loaded = state.load(tmp_path)  # an apply of this tree must not call it too large
    assert loaded is not None and loaded.cas[0].fingerprint_sha256 == "b" * 64

    before = path.stat()
    assert state.write(tmp_path, manifest_head(), lambda: lines) is False  # same bytes: not written
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino

    lines[-1] = member_record(count + 1)  # one member's record changes: the file is rewritten
    assert state.write(tmp_path, manifest_head(), lambda: lines) is True
    assert json.loads(path.read_bytes())["members"][-1]["name"] == f"client-{count + 1}"


def test_a_damaged_member_far_down_the_manifest_is_named(tmp_path: Path) -> None:
    """Members past the schema's sample are still each validated on reading."""
    lines = [member_record(n) for n in range(1, 101)]
    state.write(tmp_path, manifest_head(), lambda: lines)
    path = tmp_path / state.FILE_NAME
    data = json.loads(path.read_bytes())
    data["members"][70]["fingerprint_sha256"] = "not a fingerprint"
    path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match=r"invalid at members/70/fingerprint_sha256"):
        state.load(tmp_path)


def test_records_fall_back_to_the_temporary_folder_when_the_tree_refuses_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run or ``status`` by a reader who may not write in the tree still works.

    Root may write anywhere here, so the tree's refusal (EACCES, EROFS) is played by a stand-in.
    """
    real = tempfile.TemporaryFile

    def refusing(*args: Any, dir: Path | None = None, **kwargs: Any) -> IO[bytes]:
        if dir is not None:
            raise PermissionError(13, "Permission denied", str(dir))
        made: IO[bytes] = real(*args, **kwargs)
        return made

    monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    records = state.Records(tmp_path)
    records.put("nodes/global/client-1", member_record(1))
    assert records["nodes/global/client-1"] == member_record(1)
    records.close()
