"""Gossip keys: what current Nomad expects, and the one-line answers for bad keys."""

from __future__ import annotations

import base64
import json

import pytest

from cfwrap import gossip
from cfwrap.errors import ExitCode
from tests.conftest import assert_no_secrets


@pytest.mark.parametrize("size", [16, 24, 32])
def test_generate_sizes(size):
    for _ in range(50):
        key = gossip.generate(size)
        assert len(base64.b64decode(key, validate=True)) == size
        assert not key.startswith("/")
        assert gossip.check(key) == size


def test_keygen_prints_a_32_byte_key(cli):
    result = cli("keygen")
    assert result.code == 0
    assert len(base64.b64decode(result.out.strip(), validate=True)) == 32
    assert result.err == ""
    as_json = json.loads(cli("keygen", "--json", "--bytes", "16").out)
    assert as_json["bytes"] == 16
    assert len(base64.b64decode(as_json["key"])) == 16


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("cg8StVXbQJ0gPvMd9o7yrg==", None),  # the old guide's 16-byte key is still valid
        ("", "empty"),
        ("not base64!", "not standard base64"),
        (base64.b64encode(b"x" * 20).decode(), "20 bytes"),
        ("/etc/nomad.d/gossip.key", "file path"),
    ],
)
def test_keygen_check(cli, tmp_path, key, needle):
    path = tmp_path / "key"
    path.write_text(key + "\n")
    result = cli("keygen", "--check", path)
    if needle is None:
        assert result.code == 0
        assert "valid (16 bytes" in result.err
        return
    assert result.code == ExitCode.INPUT
    assert needle in result.err
    assert len(result.err.strip().splitlines()) == 1
    if key:
        assert_no_secrets(result.err, key)


def test_keygen_check_reads_stdin(cli, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(gossip.generate() + "\n"))
    result = cli("keygen", "--check", "-", "--json")
    assert json.loads(result.out) == {"valid": True, "bytes": 32}
