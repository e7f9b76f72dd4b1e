"""Finding cfssl's binaries, and knowing which version and build they are.

Search order: an explicit folder (``--cfssl-dir``), then ``$CFWRAP_CFSSL_DIR``, then the
checkout's ``.tools/cfssl/bin`` (made by ``scripts/install-cfssl``), then ``PATH``.

Debian's cfssl prints ``Version: dev`` for 1.6.5 (and ``Version: 1.2.0`` for bookworm's build), so
the version comes from the package the binary belongs to: the ``package.json`` that
``install-cfssl`` writes, or dpkg's database. Only a binary with neither is asked directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cfwrap.errors import ToolMissingError

ENV_DIR = "CFWRAP_CFSSL_DIR"
PROJECT_DIR = Path(__file__).resolve().parent.parent / ".tools" / "cfssl" / "bin"
MINIMUM = (1, 6)
PACKAGE = "golang-cfssl"
_DPKG = Path("/var/lib/dpkg")
_INSTALL_FIX = (
    "run ./scripts/install-cfssl (Debian trixie's golang-cfssl 1.6.5), or pass --cfssl-dir DIR "
    f"or set {ENV_DIR} to a folder holding cfssl 1.6.5"
)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Digest:
    """A file's SHA-256, computed in a thread from the start until someone asks for it.

    cfssl is ~13 MB: hashing it takes 15-50 ms, and hashlib lets go of the GIL while it works, so
    the hash is done on another core while cfwrap runs cfssl and checks what it made.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._value: str | None = None
        self._thread = threading.Thread(target=self._run, name="cfwrap-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # result() reads the file again and raises
            self._value = _file_sha256(self._path)

    def result(self) -> str:
        """The SHA-256 in hex, waiting for the thread if it is still at work.

        Raises:
            OSError: the file cannot be read.
        """
        self._thread.join()
        return self._value if self._value is not None else _file_sha256(self._path)


@dataclass(frozen=True)
class Tool:
    """A located binary and what is known of its provenance."""

    name: str
    path: Path
    package: str | None
    version: str | None
    #: The hash under way since the binary was found (None: computed when asked for).
    digest: _Digest | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of the binary's bytes (``cfssl version`` cannot tell builds apart)."""
        return self.digest.result() if self.digest is not None else _file_sha256(self.path)


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _from_install_dir(path: Path) -> tuple[str, str] | None:
    """Package and version from the package.json beside an install-cfssl folder."""
    meta = path.parent.parent / "package.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("version"), str):
        return str(data.get("package", PACKAGE)), data["version"]
    return None


def _from_dpkg(path: Path) -> tuple[str, str] | None:
    """Package and version from dpkg's database, when dpkg installed this very file."""
    target = str(path.resolve())
    for listing in sorted((_DPKG / "info").glob(f"{PACKAGE}*.list")):
        try:
            owned = {line.strip() for line in listing.read_text().splitlines()}
        except OSError:
            continue
        if target in owned or str(path) in owned:
            return PACKAGE, _dpkg_version(PACKAGE)
    return None


def _dpkg_version(package: str) -> str:
    try:
        status = (_DPKG / "status").read_text(errors="replace")
    except OSError:
        return "unknown"
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.M):
            match = re.search(r"^Version: (\S+)$", stanza, re.M)
            if match:
                return match.group(1)
    return "unknown"


def _probe_version(path: Path) -> str:
    """Ask a binary of unknown origin what it is; ``dev`` builds are tested by behaviour."""
    from cfwrap.errors import ToolFailedError
    from cfwrap.runner import Call, run

    out = run(Call.of([path, "version"])).stdout.decode("utf-8", "replace")
    match = re.search(r"Version:\s*(\S+)", out)
    version = match.group(1) if match else "unknown"
    if _version_tuple(version) is not None:
        return version
    # cfssl before 1.5 cannot make Ed25519 keys; 1.6 can. genkey makes a throwaway key in memory
    # (stdout is discarded by the runner's caller and redacted from logs).
    try:
        run(Call.of([path, "genkey", "-"], stdin=b'{"CN":"probe","key":{"algo":"ed25519"}}'))
    except ToolFailedError:
        return "older than 1.6 (cannot make ed25519 keys)"
    return "1.6+ (dev build)"


def _candidates(name: str, explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit / name]
    env = os.environ.get(ENV_DIR)
    if env:
        return [Path(env) / name]
    found = [PROJECT_DIR / name]
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    return found


def find(name: str, *, directory: Path | None = None) -> Tool:
    """Locate ``name`` (cfssl, cfssljson, multirootca) and check it is cfssl 1.6 or newer.

    Raises:
        ToolMissingError: not found, not executable, or older than 1.6.
    """
    where = "--cfssl-dir" if directory is not None else (ENV_DIR if os.environ.get(ENV_DIR) else "")
    for path in _candidates(name, directory):
        if path.is_file() and os.access(path, os.X_OK):
            return _identify(name, path)
        if where:
            raise ToolMissingError(name, f"no executable {path} (from {where})", fix=_INSTALL_FIX)
    raise ToolMissingError(name, "not installed", fix=_INSTALL_FIX)


def _identify(name: str, path: Path) -> Tool:
    known = _from_install_dir(path) or _from_dpkg(path)
    if known is None and name != "cfssl":
        # cfssljson and multirootca have no version command; they ship in cfssl's package.
        return Tool(name=name, path=path, package=None, version=None)
    package, version = known if known else (None, _probe_version(path))
    parsed = _version_tuple(version)
    too_old = parsed is not None and parsed < MINIMUM
    if too_old or version.startswith(("older", "unknown")):
        origin = f"{package} {version}" if package else f"version {version}"
        raise ToolMissingError(
            name, f"{path} is {origin}; cfwrap needs cfssl 1.6 or newer", fix=_INSTALL_FIX
        )
    return Tool(name=name, path=path, package=package, version=version, digest=_Digest(path))
