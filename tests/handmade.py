"""Certificates made with cfssl by hand, the way users make them, for doctor to find fault with."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import CFSSL_DIR

CFSSL = CFSSL_DIR / "cfssl"
EC_USAGES = ["signing", "digital signature", "server auth", "client auth"]


def _write_outputs(stdout: bytes, folder: Path, stem: str) -> Path:
    """What ``| cfssljson -bare STEM`` does (key 0600), without cfssljson."""
    data = json.loads(stdout)
    (folder / f"{stem}.pem").write_text(data["cert"])
    key = folder / f"{stem}-key.pem"
    key.write_text(data["key"])
    key.chmod(0o600)
    return folder / f"{stem}.pem"


def make_ca(folder: Path, *, expiry: str = "43800h", stem: str = "ca") -> Path:
    """A CA from a CSR JSON, via ``cfssl gencert -initca``."""
    folder.mkdir(parents=True, exist_ok=True)
    csr = {"CN": "Hand CA", "key": {"algo": "ecdsa", "size": 256}, "ca": {"expiry": expiry}}
    made = subprocess.run(
        [CFSSL, "gencert", "-initca", "-"],
        input=json.dumps(csr).encode(),
        capture_output=True,
        check=True,
    )
    return _write_outputs(made.stdout, folder, stem)


def issue(
    folder: Path,
    stem: str,
    *,
    cn: str,
    hosts: list[str],
    ca: Path,
    profile: dict[str, Any] | None = None,
) -> Path:
    """A leaf signed by ``ca`` with a one-off signing profile (or cfssl's defaults)."""
    csr = {"CN": cn, "hosts": hosts, "key": {"algo": "ecdsa", "size": 256}}
    argv: list[str | Path] = [
        CFSSL,
        "gencert",
        "-ca",
        ca,
        "-ca-key",
        ca.with_name(ca.name.replace(".pem", "-key.pem")),
    ]
    if profile is not None:
        config = folder / f".{stem}-config.json"
        config.write_text(json.dumps({"signing": {"default": profile}}))
        argv += ["-config", config]
    made = subprocess.run(
        [*argv, "-"], input=json.dumps(csr).encode(), capture_output=True, check=True
    )
    return _write_outputs(made.stdout, folder, stem)


def wrapped_cfssl(root: Path, body: str, *, version: str = "1.6.5") -> Path:
    """A ``cfssl`` that runs ``body`` (bash; ``$REAL`` is the real cfssl) and its folder for
    ``--cfssl-dir``; its package.json names golang-cfssl ``version``, as install-cfssl's does."""
    (root / "bin").mkdir(parents=True)
    fake = root / "bin" / "cfssl"
    fake.write_text(f"#!/bin/bash\nREAL={CFSSL}\n{body}\n")
    fake.chmod(0o755)
    (root / "package.json").write_text(json.dumps({"package": "golang-cfssl", "version": version}))
    return root / "bin"


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at ``where`` (a new folder) for full-disk and read-only cases."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


def copy_kit(kit: Path, dest: Path) -> Path:
    """A private copy of a kit that a test may damage.

    The agent HCL and the CLI's env file name the kit's files by absolute path; the copy's point
    at the copy, so a damaged copy is judged by its own files, not the untouched original.
    """
    shutil.copytree(kit, dest)
    rewritten = {}
    for path in [*dest.glob("*.hcl"), *dest.glob("*.env")]:
        text = path.read_text()
        assert str(kit) in text, path
        path.write_text(text.replace(f"{kit}/", f"{dest}/"))
        rewritten[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = dest / "manifest.json"
    if manifest.is_file() and rewritten:  # the copy's manifest describes the copy
        data = json.loads(manifest.read_text())
        for artifact in data["artifacts"]:
            artifact["sha256"] = rewritten.get(artifact["path"], artifact["sha256"])
        manifest.write_text(json.dumps(data, indent=2) + "\n")
    for path in dest.iterdir():
        os.utime(path)
    return dest
