"""The container image, built from the Dockerfile with podman and checked from the host."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfwrap import __version__
from tests.conftest import ROOT, assert_kit_manifest
from tests.tlspeer import openssl_verify

pytestmark = [pytest.mark.image, pytest.mark.slow]

IMAGE = ROOT / "scripts" / "image"
TAG_A, TAG_B = "cfwrap-test-a", "cfwrap-test-b"


def _image(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CFWRAP_IMAGE"}
    return subprocess.run(
        [IMAGE, *map(str, args)], capture_output=True, text=True, env=env, check=check, timeout=1800
    )


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, float]]:
    """The image built twice from this checkout, the second time without any cache."""
    times = {}
    for tag, extra in ((TAG_A, []), (TAG_B, ["--no-cache"])):
        started = time.monotonic()
        result = _image("build", "--tag", tag, *extra, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        times[tag] = time.monotonic() - started
    print(f"\nimage build times: {times}")  # reported in the issue note
    yield times
    _image("remove", TAG_A, TAG_B)


def test_dockerfile_lint_is_clean():
    hadolint = Path(shutil.which("hadolint") or ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run(
        [hadolint, ROOT / "Dockerfile"], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_quickstart_in_the_container_as_non_root(built, tmp_path):
    kit_host = tmp_path / "kit"
    kit_host.mkdir()
    os.chown(kit_host, 10001, 10001)  # the image's user; the host then checks its work
    made = _image("run", "--tag", TAG_A, "--kit", kit_host, "quickstart", "--out", "/kit/nomad-tls")
    assert "/kit/nomad-tls/manifest.json" in made.stdout
    kit = kit_host / "nomad-tls"
    data = assert_kit_manifest(kit)  # valid, and it matches the files the container wrote
    verify = openssl_verify(kit / "ca.pem", kit / "global-server-nomad.pem", "server.global.nomad")
    assert verify.returncode == 0, verify.stderr
    for path in kit.iterdir():
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (10001, 10001), path.name  # not root
        if path.name.endswith("-key.pem") or path.name == "gossip.key":
            assert stat.S_IMODE(info.st_mode) == 0o600, path.name
    assert stat.S_IMODE(kit.stat().st_mode) == 0o700
    # --version in the image names the same cfssl as the kit's manifest.
    version = json.loads(_image("run", "--tag", TAG_A, "--version").stdout)
    (tool,) = data["tools"]
    assert version["cfwrap"] == __version__
    assert version["cfssl"] == {
        "path": "/usr/bin/cfssl",
        "package": "golang-cfssl",
        "version": tool["version"],
        "sha256": tool["sha256"],
    }
    assert tool["version"].startswith("1.6.5")


def test_labels_and_contents(built):
    (info,) = json.loads(_image("inspect", TAG_A).stdout)
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["io.cfwrap.cfssl.version"].startswith("1.6.5")
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"] == ["cfwrap"]
    print(f"\nimage size: {info['Size'] / 1e6:.0f} MB")  # reported in the issue note

    def listing(folder: str) -> set[str]:
        out = _image("run", "--tag", TAG_A, "--entrypoint", "/bin/ls", "-A", folder).stdout
        return set(out.split())

    usr_bin = listing("/usr/bin")
    assert {"cfssl", "cfssljson", "multirootca", "openssl", "python3"} <= usr_bin
    assert not {"gcc", "cc", "make", "cfssl-bundle", "cfssl-scan", "cfssl-newkey"} & usr_bin
    assert listing("/var/lib/apt/lists") <= {"partial", "lock", "auxfiles"}
    # Our packages' docs are excluded (the base's own files predate the exclusion).
    assert listing("/usr/share/doc/golang-cfssl") <= {"copyright"}
    site = listing("/opt/cfwrap/lib/python3.13/site-packages")
    assert any(name.startswith("cfwrap-") for name in site)
    assert not any(name.startswith("setuptools") for name in site)


def _fingerprint(tag: str) -> dict[str, str]:
    script = (
        "dpkg-query -W -f '${Package}=${Version}\\n'; echo ---; "
        "/opt/cfwrap/bin/pip freeze --all --disable-pip-version-check; echo ---; "
        "sha256sum /usr/bin/cfssl /usr/bin/cfssljson /usr/bin/multirootca"
    )
    out = _image("run", "--tag", tag, "--entrypoint", "/bin/bash", "-c", script).stdout
    packages, freeze, hashes = out.split("---\n")
    return {"packages": packages, "freeze": freeze, "hashes": hashes}


def test_two_builds_install_the_same_things(built):
    a, b = _fingerprint(TAG_A), _fingerprint(TAG_B)
    assert a == b
    assert "golang-cfssl=1.6.5" in a["packages"]
    assert "cryptography==" in a["freeze"]
    assert "cfwrap @ file:" in a["freeze"] or "cfwrap==" in a["freeze"]
