"""The plan manifest of a large fleet: written and read a piece at a time, any size it reaches.

The records of a fleet's members live in an unlinked file while an apply runs
(:class:`state.Records`), and the plan manifest is compared and written in pieces; these tests
hold the file to what a reader outside cfwrap sees (``json``, the checked-in schema).
"""

from __future__ import annotations

import json
import resource
import tempfile
import tracemalloc
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


def _twenty_members(root: Path) -> Path:
    """A plan manifest of twenty members written into ``root``; its path."""
    state.write(root, manifest_head(), lambda: [member_record(n) for n in range(1, 21)])
    return root / state.FILE_NAME


def test_records_come_back_by_folder_and_keep_no_name_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temporary folder, watched
    records = state.Records()
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


def test_records_stay_in_memory_when_no_temporary_file_can_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full or read-only temporary folder costs memory, never an apply or a dry run."""

    def refusing(*args: Any, **kwargs: Any) -> IO[bytes]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    records = state.Records()
    records.put("nodes/global/client-1", member_record(1))
    assert records["nodes/global/client-1"] == member_record(1)
    assert list(records.items()) == [("nodes/global/client-1", member_record(1))]


@pytest.mark.parametrize("room", [0, 100])
def test_records_move_to_memory_when_the_file_stops_taking_them(room: int) -> None:
    """The temporary folder fills up mid-run: nothing is lost, nothing comes back cut short.

    Played by a file size limit: at the file's end a write fails (EFBIG; Python ignores
    SIGXFSZ), and ``room`` bytes before it a write is cut short without an error, as on a
    file system that fills up in the middle of a record.
    """
    records = state.Records()
    for n in range(1, 11):
        records.put(f"nodes/global/client-{n}", member_record(n))
    written = sum(len(member_record(n)) for n in range(1, 11))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (written + room, hard))
    try:
        for n in range(11, 21):
            records.put(f"nodes/global/client-{n}", member_record(n))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [line for _, line in records.items()] == [member_record(n) for n in range(1, 21)]
    records.close()


def test_a_fleet_manifest_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """25,000 members (17.5 MB) are read a line at a time: parsed whole they took ~60 MB."""
    lines = [member_record(n) for n in range(1, 25_001)]
    state.write(tmp_path, manifest_head(), lambda: lines)
    tracemalloc.start()  # counts what is allocated from here on
    try:
        assert state.load(tmp_path) is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{peak / 1e6:.1f} MB"


def test_a_manifest_laid_out_by_hand_is_read_when_small_and_refused_when_large(
    tmp_path: Path,
) -> None:
    path = _twenty_members(tmp_path)
    data = json.loads(path.read_bytes())
    path.write_text(json.dumps(data, indent=4))  # another layout: parsed whole, as JSON
    assert state.load(tmp_path) is not None
    data["members"] = [data["members"][0]] * 30_000  # the same, past 16 MiB
    path.write_text(json.dumps(data, indent=4))
    assert path.stat().st_size > files.MAX_INPUT
    with pytest.raises(VerificationError, match="not laid out as cfwrap writes it"):
        state.load(tmp_path)


def test_a_manifest_cut_short_in_its_members_is_not_valid_json(tmp_path: Path) -> None:
    path = _twenty_members(tmp_path)
    text = path.read_bytes()
    path.write_bytes(text[: text.index(b"client-15")])
    with pytest.raises(VerificationError, match="not valid JSON"):
        state.load(tmp_path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (member_record(3) + b",\n", member_record(3) + b"\n"),  # no comma between members
        (member_record(20) + b"\n", member_record(20) + b",\n"),  # one after the last
        (member_record(20) + b"\n  ],", member_record(20) + b"\n  ] x,"),  # after the list
    ],
)
def test_a_member_list_that_is_not_json_is_refused_as_the_whole_document_would_be(
    tmp_path: Path, old: bytes, new: bytes
) -> None:
    path = _twenty_members(tmp_path)
    text = path.read_bytes()
    assert text.count(old) == 1
    path.write_bytes(text.replace(old, new))
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_bytes())  # what any JSON reader says
    with pytest.raises(VerificationError, match="not valid JSON"):
        state.load(tmp_path)


def test_a_second_members_key_is_refused_not_skipped(tmp_path: Path) -> None:
    """The reader puts its own list in place of the streamed one: a second one must not hide."""
    path = _twenty_members(tmp_path)
    text = path.read_bytes()
    old = member_record(20) + b"\n  ],"
    assert text.count(old) == 1
    path.write_bytes(text.replace(old, old + b'\n  "members": [{"folder": "x", "note": "evil"}],'))
    with pytest.raises(VerificationError, match="the key 'members' appears twice"):
        state.load(tmp_path)
