"""The container image, built from the Dockerfile with podman and checked from the host.

The tier builds in an empty podman store of its own, as CI on a new machine does: a base image
cached by an earlier run must never hide a defect in how the base is made.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from cfwrap import __version__
from tests.conftest import ROOT, assert_kit_manifest
from tests.tlspeer import openssl_verify

pytestmark = [pytest.mark.image, pytest.mark.slow]

IMAGE = ROOT / "scripts" / "image"
TAG_A, TAG_B = "cfwrap-test-a", "cfwrap-test-b"


def _image(
    *args: str | Path,
    check: bool = True,
    script: Path = IMAGE,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CFWRAP_IMAGE"} | dict(env or {})
    result = subprocess.run(
        [script, *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        timeout=1800,
    )
    # The engine's own message (e.g. runc's "stat /bin/sh: permission denied") says what broke.
    if check and result.returncode != 0:
        pytest.fail(f"scripts/image {args[0]} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module", autouse=True)
def podman_store() -> Iterator[Path]:
    """An empty podman store for this module (CFWRAP_PODMAN_ROOT), removed afterwards.

    A store already named in CFWRAP_PODMAN_ROOT is used as it is, to iterate on a warm one.
    """
    if given := os.environ.get("CFWRAP_PODMAN_ROOT"):
        yield Path(given)
        return
    # /var/tmp, not /tmp: podman's vfs driver copies the whole image into every layer (GBs), and
    # /tmp may be a RAM-backed tmpfs on CI machines.
    store = Path(tempfile.mkdtemp(prefix="cfwrap-podman-store-", dir="/var/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CFWRAP_PODMAN_ROOT", str(store))
        yield store
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def built(podman_store: Path) -> Iterator[dict[str, float]]:
    """The image built twice from this checkout, the second time without any cache."""
    empty = not any(podman_store.iterdir())
    print(f"\npodman store {podman_store}: {'empty' if empty else 'in use'}")
    started = time.monotonic()
    result = _image("base", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    times = {"base": time.monotonic() - started}
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


# Each thing the image's user (uid 10001, not root) needs, run by that user: a `/` or a folder
# it cannot search makes the runtime's exec fail before cfwrap starts.
_USER_CHECKS = r"""
check() {
    name=$1; shift
    if out=$("$@" 2>&1); then echo "ok $name"; else echo "FAIL $name: $out"; fi
}
check uid test "$(id -u):$(id -g):$(id -un):$(id -gn)" = 10001:10001:cfwrap:cfwrap
check ls ls /
check cfwrap cfwrap --version
check cfssl cfssl version
check openssl openssl version
check python3 python3 -c 'import ssl, json'
check cfwrap-python /opt/cfwrap/bin/python -c 'import cfwrap.kit, cryptography'
check kit sh -c 'echo x >/kit/probe && rm /kit/probe'
check tmp sh -c 'f=$(mktemp) && rm "$f"'
stat -c 'mode %n %a %u:%g' / /usr /usr/bin /usr/lib /etc /opt /opt/cfwrap /tmp /kit
"""


def test_the_image_user_can_run_what_it_needs(built):
    result = _image(
        "run", "--tag", TAG_A, "--entrypoint", "/bin/sh", "-c", _USER_CHECKS, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    checks = [line for line in lines if not line.startswith("mode ")]
    assert checks == [
        f"ok {name}"
        for name in (
            "uid",
            "ls",
            "cfwrap",
            "cfssl",
            "openssl",
            "python3",
            "cfwrap-python",
            "kit",
            "tmp",
        )
    ]
    modes = {line.split()[1]: tuple(line.split()[2:]) for line in lines if line.startswith("mode ")}
    assert modes == {
        **{path: ("755", "0:0") for path in ("/", "/usr", "/usr/bin", "/usr/lib", "/etc", "/opt")},
        "/opt/cfwrap": ("755", "0:0"),
        "/tmp": ("1777", "0:0"),  # noqa: S108 (a folder inside the image, not a file written here)
        "/kit": ("700", "10001:10001"),
    }


def test_built_from_the_base_its_recipe_names(built):
    base = _image("base-tag").stdout.strip()
    assert base.startswith("localhost/cfwrap-base:")
    (base_info,) = json.loads(_image("inspect", base).stdout)
    (image_info,) = json.loads(_image("inspect", TAG_A).stdout)
    assert image_info["RootFS"]["Layers"][0] == base_info["RootFS"]["Layers"][0]


def test_a_changed_recipe_names_another_base(tmp_path):
    """The cached base is keyed by its recipe's lines, the mirror and debootstrap's version."""
    copy = tmp_path / "scripts"
    (copy / "lib").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "lib" / "debian.sh", copy / "lib" / "debian.sh")
    recipe = IMAGE.read_text()
    assert "--variant=minbase" in recipe and "chmod 0755" in recipe

    def tag(text: str, **env: str) -> str:
        (copy / "image").write_text(text)
        (copy / "image").chmod(0o755)
        env = {
            "CFWRAP_ENGINE": "podman",
            "CFWRAP_DEBIAN_MIRROR": "http://mirror.invalid/debian",
        } | env
        return _image("base-tag", script=copy / "image", env=env).stdout.strip()

    first = tag(recipe)
    assert tag(recipe) == first  # stable
    assert tag(recipe, CFWRAP_DEBIAN_MIRROR="http://other.invalid/debian") != first
    assert tag(recipe.replace("--variant=minbase", "--variant=buildd")) != first
    assert tag(recipe.replace("chmod 0755", "chmod 0700")) != first
    # Comments do not change what debootstrap makes, so they keep the cached base.
    assert (
        tag(recipe.replace("# tar records the root", "# (reworded) tar records the root")) == first
    )
